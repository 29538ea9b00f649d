"""RevocationChecker against the real in-memory state store: revoked by jti, by subject
before a time, the one-second cache, and what happens when the store cannot answer."""

from __future__ import annotations

import argparse
import asyncio
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest

from casb.context import Principal
from casb.identity.cli_revoke import add_revoke_command, parse_time
from casb.identity.revocation import RevocationCheck, RevocationChecker
from casb.state.memory import MemoryState
from casb.state.store import Revocation, StateUnavailable
from tests.unit.test_ratelimit import StoreWithOutage

NOW = 1_700_000_000.0
LATER = NOW + 3600


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def principal(jti: str | None = "t1", *, sub: str = "alice", iat: float | None = NOW) -> Principal:
    return Principal(
        subject=sub,
        issuer="https://idp.test",
        roles=frozenset(),
        token_id=jti,
        issued_at=iat,
        expires_at=None if iat is None else iat + 300,
    )


def checker(store: object, **kw: object) -> tuple[RevocationChecker, Clock]:
    clock = Clock()
    return RevocationChecker(store, clock=clock, **kw), clock  # type: ignore[arg-type]


async def test_a_revoked_jti_is_revoked_and_no_other() -> None:
    store = MemoryState(clock=lambda: NOW)
    await store.revoke_token("t1", expires_at=LATER)
    check, _ = checker(store)
    assert await check.check(principal("t1")) == RevocationCheck(True, False, "jti")
    assert await check.check(principal("t2")) == RevocationCheck(False)
    assert await check.check(principal(None)) == RevocationCheck(False)


async def test_a_subject_revocation_covers_tokens_issued_before_its_time() -> None:
    store = MemoryState(clock=lambda: NOW)
    await store.revoke_subject("alice", before=NOW, expires_at=LATER)
    check, _ = checker(store)
    old = await check.check(principal("a", iat=NOW - 1))
    assert old.revoked and old.by == "subject"
    assert "subject" in old.reason and "alice" not in old.reason
    assert not (await check.check(principal("b", iat=NOW))).revoked  # issued at/after: fine
    assert (await check.check(principal("c", iat=None))).revoked  # cannot show it is newer
    assert not (await check.check(principal("d", sub="bob", iat=NOW - 1))).revoked


async def test_every_answer_is_asked_again_after_at_most_a_second() -> None:
    store = MemoryState(clock=lambda: NOW)
    check, clock = checker(store)
    assert not (await check.check(principal())).revoked
    await store.revoke_token("t1", expires_at=LATER)
    clock.now = 0.9
    assert not (await check.check(principal())).revoked  # the cached answer, < 1 s old
    clock.now = 1.0
    assert (await check.check(principal())).revoked


async def test_a_revoked_answer_is_kept_even_when_the_store_goes_down() -> None:
    outage = StoreWithOutage(MemoryState(clock=lambda: NOW))
    await outage.inner.revoke_token("t1", expires_at=LATER)
    check, clock = checker(outage)
    assert (await check.check(principal())).revoked
    outage.down = True
    clock.now = 60.0
    # revocations never shrink: no need to ask again, and no reason to fail
    assert await check.check(principal()) == RevocationCheck(True, False, "jti")


async def test_fail_closed_raises_when_the_store_cannot_answer() -> None:
    outage = StoreWithOutage(MemoryState(clock=lambda: NOW))
    check, clock = checker(outage)
    assert not (await check.check(principal())).revoked
    outage.down = True
    clock.now = 5.0
    with pytest.raises(StateUnavailable):
        await check.check(principal())


async def test_cached_mode_uses_the_last_answer_seen_and_says_so() -> None:
    outage = StoreWithOutage(MemoryState(clock=lambda: NOW))
    await outage.inner.revoke_subject("alice", before=NOW - 10, expires_at=LATER)
    check, clock = checker(outage, degraded_mode="cached")
    assert await check.check(principal("t1")) == RevocationCheck(False)
    outage.down = True
    clock.now = 30.0
    assert await check.check(principal("t1")) == RevocationCheck(False, degraded=True)
    # a token of the same subject whose jti was never seen: nothing to decide with
    with pytest.raises(StateUnavailable):
        await check.check(principal("t2"))
    # without a jti, the subject's revocation seen decides by iat, also when down
    outage.down = False
    assert await check.check(principal(None, iat=NOW - 20)) == RevocationCheck(
        True, False, "subject"
    )
    outage.down = True
    clock.now = 60.0
    assert await check.check(principal(None, iat=NOW - 20)) == RevocationCheck(
        True, False, "subject"
    )


async def test_a_store_that_does_not_answer_in_time_is_unavailable() -> None:
    class NeverAnswers(StoreWithOutage):
        async def revocation(self, jti: str | None, subject: str) -> Revocation:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    check, _ = checker(NeverAnswers(MemoryState()), timeout_seconds=0.05)
    with pytest.raises(StateUnavailable, match="in time"):
        await check.check(principal())


def test_the_cache_cannot_outlast_a_second() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        RevocationChecker(MemoryState(), cache_seconds=5)


def test_the_cache_is_bounded() -> None:
    async def run() -> int:
        check = RevocationChecker(MemoryState(), max_entries=2)
        for i in range(5):
            await check.check(principal(f"t{i}"))
        return len(check._seen)

    assert asyncio.run(run()) == 2


# -- casb token revoke --------------------------------------------------------------
def revoke_cli(tmp_path: Path, url: str, *argv: str) -> int:
    config = tmp_path / "casb.yaml"
    config.write_text(
        "environment: dev\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "destinations: {pacs: {upstream: 'https://pacs.example.org'}}\n"
        f"state: {{url: '{url}', timeout_seconds: 0.5}}\n"
    )
    parser = argparse.ArgumentParser(prog="casb token")
    add_revoke_command(parser.add_subparsers(required=True))
    args = parser.parse_args(["revoke", "--config", str(config), *argv])
    code: int = args.func(args)
    return code


def test_times_are_iso_8601_with_an_offset_or_epoch_seconds() -> None:
    may_day = datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()
    assert parse_time("2024-05-01T12:00:00Z") == may_day
    assert parse_time("2024-05-01T14:00:00+02:00") == may_day
    assert parse_time(str(int(may_day))) == may_day
    assert parse_time("1714564800.5") == may_day + 0.5
    with pytest.raises(Exception, match="no UTC offset"):
        parse_time("2024-05-01T12:00:00")
    with pytest.raises(Exception, match="not a time"):
        parse_time("yesterday")


def test_revoke_refuses_memory_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert revoke_cli(tmp_path, "memory://", "--jti", "t1") == 2
    err = capsys.readouterr().err
    assert "memory://" in err and "shared store" in err


def test_revoke_checks_its_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "redis://127.0.0.1:6390/0"
    assert revoke_cli(tmp_path, url, "--jti", "t1", "--before", "0") == 2
    assert "--before goes with --sub" in capsys.readouterr().err
    assert revoke_cli(tmp_path, url, "--sub", "alice", "--expires", "2001-01-01T00:00:00Z") == 2
    err = capsys.readouterr().err
    assert "has passed" in err and "alice" not in err
    with pytest.raises(SystemExit):  # argparse: exactly one of --jti / --sub
        revoke_cli(tmp_path, url, "--jti", "t1", "--sub", "alice")


def test_revoke_fails_when_the_store_cannot_be_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert revoke_cli(tmp_path, f"redis://127.0.0.1:{port}/0", "--sub", "alice") == 1
    captured = capsys.readouterr()
    assert "cannot be reached" in captured.err
    assert captured.out == "" and "alice" not in captured.err
