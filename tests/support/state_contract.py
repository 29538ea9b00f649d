"""The StateStore contract (casb/state/store.py) as checks every backend must pass.

Each check is an async function of a `Harness` (a fresh, empty store plus a way to
read its audit stream). tests/unit/test_state_memory.py runs them on MemoryState and
tests/integration/test_state_redis.py on RedisState against a real redis-server, so
both backends are held to one set of behaviours:

    @pytest.mark.parametrize("check", CHECKS, ids=check_id)
    async def test_contract(harness: Harness, check: Check) -> None:
        await check(harness)

Checks that depend on time passing use short real intervals and poll for the outcome
with a deadline; MemoryState's injected clock covers the exact boundaries separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from casb.state import (
    PolicyBundle,
    StateConflict,
    StateStore,
    StreamEntry,
)

# (replica, seq, hash, record line), oldest first
StreamView = list[tuple[str, int, str, bytes]]


@dataclass
class Harness:
    store: StateStore
    read_stream: Callable[[], Awaitable[StreamView]]


Check = Callable[[Harness], Awaitable[None]]
CHECKS: list[Check] = []
FAR = 10**9  # a rate-limit window this long (~31 years) does not roll over mid-test


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


def check_id(fn: Check) -> str:
    return fn.__name__.removeprefix("check_")


def bundle(*texts: str) -> PolicyBundle:
    """A bundle of files policy-0.yaml, policy-1.yaml...; its version a hash of them."""
    files = {f"policy-{i}.yaml": text for i, text in enumerate(texts)}
    digest = hashlib.sha256(repr(sorted(files.items())).encode())
    return PolicyBundle(files=files, version=f"sha256:{digest.hexdigest()}")


def entry(seq: int) -> StreamEntry:
    return StreamEntry(seq=seq, hash=f"h{seq:04d}", line=b'{"seq": %d, "event": "test"}' % seq)


async def until(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0) -> None:
    """Poll `cond` until it holds; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def collecting(it: AsyncIterator[str]) -> AsyncIterator[list[str]]:
    """Drain a notification iterator into a list in the background."""
    got: list[str] = []

    async def run() -> None:
        async for version in it:
            got.append(version)

    task = asyncio.create_task(run())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


# -- policy bundles --------------------------------------------------------------------
@check
async def check_empty_store(h: Harness) -> None:
    s = h.store
    assert await s.current_policy() is None
    assert await s.current_policy_version() is None
    assert list(await s.policy_versions()) == []
    assert await s.audit_cursor("replica-a/0000") == 0
    assert not (await s.revocation("jti-1", "alice")).revokes(time.time())
    health = await s.ping()
    assert health.ok, health.detail
    assert health.backend == s.backend


@check
async def check_publish_makes_current(h: Harness) -> None:
    s = h.store
    b = bundle("rules: [a]\n", "roles: {x: [y]}\n")
    before = time.time()
    published = await s.publish_policy(b, author="alice", comment="first")
    assert published.version == b.version
    assert (published.author, published.comment, published.current) == ("alice", "first", True)
    assert before - 1 <= published.published_at <= time.time() + 1
    assert await s.current_policy_version() == b.version
    current = await s.current_policy()
    assert current is not None
    meta, stored = current
    assert meta == published
    assert stored.version == b.version
    assert dict(stored.files) == dict(b.files)


@check
async def check_republish_keeps_first_record(h: Harness) -> None:
    s = h.store
    a, b = bundle("a: 1\n"), bundle("b: 2\n")
    first = await s.publish_policy(a, author="alice", comment="one")
    await s.publish_policy(b, author="bob")
    again = await s.publish_policy(a, author="carol", comment="again")
    assert (again.author, again.comment, again.published_at) == ("alice", "one", first.published_at)
    assert again.current
    versions = await s.policy_versions()
    assert sorted(v.version for v in versions) == sorted([a.version, b.version])
    assert [v.version for v in versions if v.current] == [a.version]


@check
async def check_rollback_and_unknown_version(h: Harness) -> None:
    s = h.store
    a, b = bundle("a: 1\n"), bundle("b: 2\n")
    await s.publish_policy(a, author="alice")
    await s.publish_policy(b, author="bob")
    rolled = await s.set_current_policy(a.version, author="carol", comment="rollback")
    assert rolled.version == a.version and rolled.current and rolled.author == "alice"
    assert await s.current_policy_version() == a.version
    assert (rolled.activated_by, rolled.activation_comment) == ("carol", "rollback")
    current = await s.current_policy()
    assert current is not None and dict(current[1].files) == dict(a.files)
    # who made it current is kept (the audit of the change names the rollback's author)
    meta = current[0]
    assert (meta.author, meta.activated_by, meta.activation_comment) == (
        "alice",
        "carol",
        "rollback",
    )
    assert meta.activated_at >= meta.published_at
    republished = await s.publish_policy(b, author="dave", comment="again")
    assert (republished.author, republished.activated_by) == ("bob", "dave")
    current = await s.current_policy()
    assert current is not None and current[0].activated_by == "dave"
    await s.set_current_policy(a.version, author="carol", comment="rollback")
    with pytest.raises(StateConflict):
        await s.set_current_policy(bundle("never published\n").version, author="eve")
    assert await s.current_policy_version() == a.version
    with pytest.raises(ValueError):
        await s.set_current_policy("v1", author="eve")


@check
async def check_versions_newest_first(h: Harness) -> None:
    s = h.store
    published = []
    for i in range(4):
        published.append(await s.publish_policy(bundle(f"n: {i}\n"), author=f"u{i}"))
    versions = await s.policy_versions()
    assert [v.version for v in versions] == [p.version for p in reversed(published)]
    assert [v.current for v in versions] == [True, False, False, False]
    assert [v.author for v in versions] == ["u3", "u2", "u1", "u0"]
    limited = await s.policy_versions(limit=2)
    assert [v.version for v in limited] == [published[3].version, published[2].version]
    assert list(await s.policy_versions(limit=0)) == []


@check
async def check_publish_refuses_malformed_bundles(h: Harness) -> None:
    s = h.store
    with pytest.raises(ValueError):
        await s.publish_policy(PolicyBundle(files={"a.yaml": "x"}, version="latest"), author="a")
    with pytest.raises(ValueError):
        await s.publish_policy(PolicyBundle(files={}, version=bundle("x").version), author="a")
    assert await s.current_policy_version() is None


@check
async def check_notifications(h: Harness) -> None:
    s = h.store
    a, b, c = bundle("a: 1\n"), bundle("b: 2\n"), bundle("c: 3\n")
    await s.publish_policy(a, author="alice")
    await s.publish_policy(b, author="alice")
    async with collecting(s.policy_notifications()) as got:
        # A subscription may take a moment to be in place (pub/sub): move the pointer
        # until a move is seen; from then on every move must arrive.
        async def seen_b() -> bool:
            if b.version not in got:
                await s.set_current_policy(b.version, author="alice")
                await asyncio.sleep(0.05)  # poll interval for the subscription to settle
            return b.version in got

        await until(seen_b, "a notification of the current version")
        await s.set_current_policy(a.version, author="bob", comment="rollback")

        async def seen_a() -> bool:
            return bool(got) and got[-1] == a.version

        await until(seen_a, "the rollback's notification")
        await s.publish_policy(c, author="carol")

        async def seen_c() -> bool:
            return bool(got) and got[-1] == c.version

        await until(seen_c, "the new version's notification")


@check
async def check_notifications_reach_every_subscriber(h: Harness) -> None:
    s = h.store
    a, b = bundle("a: 1\n"), bundle("b: 2\n")
    await s.publish_policy(a, author="alice")
    async with (
        collecting(s.policy_notifications()) as one,
        collecting(s.policy_notifications()) as two,
    ):

        async def both_saw_a() -> bool:
            if a.version not in one or a.version not in two:
                await s.set_current_policy(a.version, author="alice")
                await asyncio.sleep(0.05)  # poll interval for the subscriptions to settle
            return a.version in one and a.version in two

        await until(both_saw_a, "both subscribers")
        await s.publish_policy(b, author="bob")

        async def both_saw_b() -> bool:
            return b.version in one and b.version in two

        await until(both_saw_b, "both subscribers to see the new version")


# -- revocation ------------------------------------------------------------------------
@check
async def check_revoke_token(h: Harness) -> None:
    s = h.store
    now = time.time()
    await s.revoke_token("jti-1", expires_at=now + 600)
    r = await s.revocation("jti-1", "alice")
    assert r.jti_revoked and r.subject_before is None and r.revokes(now)
    other = await s.revocation("jti-2", "alice")
    assert not other.jti_revoked and not other.revokes(now)
    no_jti = await s.revocation(None, "alice")
    assert not no_jti.jti_revoked and not no_jti.revokes(None)


@check
async def check_revoke_subject_keeps_latest_before(h: Harness) -> None:
    s = h.store
    now = time.time()
    await s.revoke_subject("alice@hospital.test", before=now, expires_at=now + 600)
    r = await s.revocation("jti-9", "alice@hospital.test")
    assert r.subject_before == now and not r.jti_revoked
    assert r.revokes(now - 10) and not r.revokes(now) and not r.revokes(now + 10)
    assert r.revokes(None), "a token without iat cannot show it is newer"
    assert (await s.revocation(None, "alice@hospital.test")).subject_before == now
    assert (await s.revocation(None, "bob@hospital.test")).subject_before is None
    # An earlier `before` does not shrink the revocation; a later one extends it.
    await s.revoke_subject("alice@hospital.test", before=now - 100, expires_at=now + 600)
    assert (await s.revocation(None, "alice@hospital.test")).subject_before == now
    await s.revoke_subject("alice@hospital.test", before=now + 50.25, expires_at=now + 600)
    assert (await s.revocation(None, "alice@hospital.test")).subject_before == now + 50.25


@check
async def check_revocations_expire(h: Harness) -> None:
    s = h.store
    now = time.time()
    await s.revoke_token("short", expires_at=now + 0.3)
    await s.revoke_subject("carol", before=now, expires_at=now + 0.3)
    await s.revoke_token("long", expires_at=now + 600)
    assert (await s.revocation("short", "carol")).jti_revoked
    assert (await s.revocation("short", "carol")).subject_before == now

    async def gone() -> bool:
        r = await s.revocation("short", "carol")
        return not r.jti_revoked and r.subject_before is None

    await until(gone, "the revocations to expire", timeout=5)
    assert (await s.revocation("long", "carol")).jti_revoked


@check
async def check_revocation_already_expired_is_not_stored(h: Harness) -> None:
    s = h.store
    now = time.time()
    await s.revoke_token("old", expires_at=now - 5)
    await s.revoke_subject("dave", before=now, expires_at=now - 5)
    r = await s.revocation("old", "dave")
    assert not r.jti_revoked and r.subject_before is None


# -- rate limits -----------------------------------------------------------------------
@check
async def check_consume_up_to_the_limit(h: Harness) -> None:
    s = h.store
    results = [await s.consume("lim:p1:requests", 1, 3, FAR) for _ in range(3)]
    assert [(c.allowed, c.used, c.retry_after) for c in results] == [
        (True, 1, 0.0),
        (True, 2, 0.0),
        (True, 3, 0.0),
    ]
    refused = await s.consume("lim:p1:requests", 1, 3, FAR)
    assert not refused.allowed and refused.used == 3
    window_end = (time.time() // FAR + 1) * FAR
    assert window_end - time.time() - 5 < refused.retry_after <= window_end - time.time() + 5
    other = await s.consume("lim:p2:requests", 1, 3, FAR)
    assert other.allowed and other.used == 1


@check
async def check_consume_refuses_what_would_pass_the_limit(h: Harness) -> None:
    s = h.store
    assert (await s.consume("bytes", 7, 10, FAR)).used == 7
    too_much = await s.consume("bytes", 4, 10, FAR)
    assert not too_much.allowed and too_much.used == 7 and too_much.retry_after > 0
    fits = await s.consume("bytes", 3, 10, FAR)
    assert fits.allowed and fits.used == 10
    assert (await s.consume("bytes", 0, 10, FAR)).allowed
    assert not (await s.consume("bytes", 1, 10, FAR)).allowed
    with pytest.raises(ValueError):
        await s.consume("bytes", -1, 10, FAR)
    with pytest.raises(ValueError):
        await s.consume("bytes", 1, 10, 0)


@check
async def check_charge_counts_without_a_limit(h: Harness) -> None:
    s = h.store
    assert (await s.consume("dl:bytes", 100, 1000, FAR)).used == 100
    await s.charge("dl:bytes", 5000, FAR)
    refused = await s.consume("dl:bytes", 0, 1000, FAR)
    assert refused.used == 5100 and not refused.allowed
    await s.charge("fresh:bytes", 7, FAR)
    assert (await s.consume("fresh:bytes", 1, 100, FAR)).used == 8


@check
async def check_window_resets(h: Harness) -> None:
    s = h.store
    first = await s.consume("tick", 2, 2, 1)
    assert first.allowed
    refused = await s.consume("tick", 1, 2, 1)
    if refused.allowed:  # the one-second window rolled over between the two calls
        refused = await s.consume("tick", 2, 2, 1)
    assert not refused.allowed and 0 < refused.retry_after <= 1.0

    async def allowed_again() -> bool:
        return (await s.consume("tick", 1, 2, 1)).allowed

    await until(allowed_again, "the next window", timeout=3)


# -- audit stream ----------------------------------------------------------------------
@check
async def check_append_audit_once(h: Harness) -> None:
    s = h.store
    batch = [entry(1), entry(2), entry(3)]
    assert await s.append_audit("r1/abcd", batch, 1000) == 3
    assert await s.append_audit("r1/abcd", batch, 1000) == 3  # sent twice: appended once
    assert await s.append_audit("r1/abcd", [entry(2), entry(3), entry(4), entry(5)], 1000) == 5
    assert await s.append_audit("r1/abcd", [], 1000) == 5
    assert await s.audit_cursor("r1/abcd") == 5
    view = await h.read_stream()
    assert [(r, seq) for r, seq, _, _ in view] == [("r1/abcd", n) for n in range(1, 6)]
    assert view[0][2:] == (entry(1).hash, entry(1).line)


@check
async def check_append_audit_per_replica(h: Harness) -> None:
    s = h.store
    await s.append_audit("r1/aaaa", [entry(1), entry(2)], 1000)
    assert await s.append_audit("r2/bbbb", [entry(1)], 1000) == 1
    assert await s.audit_cursor("r1/aaaa") == 2
    assert await s.audit_cursor("r2/bbbb") == 1
    view = await h.read_stream()
    assert [(r, seq) for r, seq, _, _ in view] == [("r1/aaaa", 1), ("r1/aaaa", 2), ("r2/bbbb", 1)]


@check
async def check_append_audit_refuses_disorder(h: Harness) -> None:
    s = h.store
    with pytest.raises(ValueError):
        await s.append_audit("r1/cccc", [entry(2), entry(1)], 1000)
    with pytest.raises(ValueError):
        await s.append_audit("r1/cccc", [entry(1), entry(1)], 1000)
    with pytest.raises(ValueError):
        await s.append_audit("r1/cccc", [entry(0)], 1000)
    assert await s.audit_cursor("r1/cccc") == 0
    assert await h.read_stream() == []


@check
async def check_append_audit_bounded(h: Harness) -> None:
    s = h.store
    for start in range(1, 301, 50):
        await s.append_audit("r1/dddd", [entry(n) for n in range(start, start + 50)], 10)
    view = await h.read_stream()
    # Redis trims approximately (whole macro nodes of up to 100 entries): at least
    # max_len are kept, far fewer than were appended, and always the newest.
    assert 10 <= len(view) <= 110
    assert [seq for _, seq, _, _ in view] == list(range(301 - len(view), 301))
