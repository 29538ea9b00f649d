"""Revocation and rate limits through the real Pipeline (real verifier, policy, router,
audit log) against the real in-memory state store: what is refused, with which status
and headers, and what the audit record says — also when the store cannot answer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from casb.config import RateLimit
from casb.exchange import Forward, Refusal, Transaction
from casb.identity.revocation import RevocationChecker
from casb.ratelimit import RateLimiter
from casb.runtime import Runtime
from casb.state.memory import MemoryState
from tests.jwks_server import TestKey
from tests.unit.test_pipeline import AUD, ISS, make_runtime, request
from tests.unit.test_ratelimit import StoreWithOutage


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


STUDY = "/pacs/studies/1.2.3/series/4.5/instances/6.7"


@pytest.fixture(scope="module")
def key() -> TestKey:
    return TestKey.generate("ES256")


def token(key: TestKey, *, sub: str = "u1", jti: str | None = None, iat: int | None = None) -> str:
    now = int(time.time()) if iat is None else iat
    return key.sign(
        {
            "iss": ISS,
            "aud": AUD,
            "sub": sub,
            "iat": now,
            "exp": now + 300,
            "roles": ["radiologist"],
            "jti": jti or uuid.uuid4().hex,
        }
    )


def runtime(
    tmp_path: Path,
    key: TestKey,
    store: Any,
    *,
    limits: list[RateLimit] | None = None,
    degraded_mode: str = "fail_closed",
    clock: Callable[[], float] = time.monotonic,
) -> Runtime:
    """The pipeline with store-backed checks, as Runtime builds it from `state:`."""
    rt = make_runtime(tmp_path, key)
    rt.pipeline.revocation = RevocationChecker(
        store,  # type: ignore[arg-type]
        degraded_mode=degraded_mode,  # type: ignore[arg-type]
        clock=clock,
    )
    if limits is not None:
        rt.pipeline.rate_limiter = RateLimiter(store, limits, degraded_mode=degraded_mode)  # type: ignore[arg-type]
    return rt


def last_record(tmp_path: Path) -> dict[str, Any]:
    rec: dict[str, Any] = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    if rec.get("type") != "request":  # a checkpoint line follows at close
        rec = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-2])
    return rec


def refused(tx: Transaction) -> Refusal:
    assert isinstance(tx.outcome, Refusal), tx.outcome
    return tx.outcome


async def test_a_revoked_token_is_refused_401_and_audited(tmp_path: Path, key: TestKey) -> None:
    store = MemoryState()
    rt = runtime(tmp_path, key, store)
    await store.revoke_token("jti-revoked", expires_at=time.time() + 600)

    tx = await rt.pipeline.decide(request(STUDY, token(key, jti="jti-revoked")))
    r = refused(tx)
    assert (r.status, r.code, r.message) == (401, "token_revoked", "the token was revoked")
    assert dict(r.headers)["WWW-Authenticate"] == (
        'Bearer realm="casb", error="invalid_token", error_description="the token was revoked"'
    )
    rt.pipeline.finish(tx, status=401)
    rec = last_record(tmp_path)
    assert rec["error"] == "token_revoked" and rec["decision"] == "deny"
    assert rec["principal"]["sub"] == "u1"  # who tried: the token was genuine
    assert rec["reasons"] == ["the token was revoked (by its id)"]
    assert "jti-revoked" not in json.dumps(rec)

    other = await rt.pipeline.decide(request(STUDY, token(key, jti="another")))
    assert isinstance(other.outcome, Forward), other.reasons


async def test_a_subject_revocation_refuses_tokens_issued_before_it(
    tmp_path: Path, key: TestKey
) -> None:
    store = MemoryState()
    rt = runtime(tmp_path, key, store)
    now = int(time.time())
    await store.revoke_subject("u1", before=now - 10, expires_at=now + 600)

    tx = await rt.pipeline.decide(request(STUDY, token(key, iat=now - 20)))
    assert refused(tx).code == "token_revoked"
    assert tx.reasons == (
        "the token was revoked (all of its subject's tokens issued before a time)",
    )
    fresh = await rt.pipeline.decide(request(STUDY, token(key, iat=now - 5)))
    assert isinstance(fresh.outcome, Forward), fresh.reasons
    other = await rt.pipeline.decide(request(STUDY, token(key, sub="u2", iat=now - 20)))
    assert isinstance(other.outcome, Forward), other.reasons


async def test_over_the_rate_limit_is_429_with_retry_after_and_audited(
    tmp_path: Path, key: TestKey
) -> None:
    limits = [RateLimit(name="retrievals", actions=["retrieve"], requests=2, window_seconds=3600)]
    rt = runtime(tmp_path, key, MemoryState(), limits=limits)
    tok = token(key)
    for _ in range(2):
        tx = await rt.pipeline.decide(request(STUDY, tok))
        assert isinstance(tx.outcome, Forward), tx.reasons
        rt.pipeline.finish(tx, status=200)
    # a search is another action: not limited
    search = await rt.pipeline.decide(request("/pacs/studies", tok))
    assert isinstance(search.outcome, Forward)

    tx = await rt.pipeline.decide(request(STUDY, tok))
    r = refused(tx)
    assert (r.status, r.code) == (429, "rate_limited")
    retry_after = int(dict(r.headers)["Retry-After"])
    assert 1 <= retry_after <= 3600
    rt.pipeline.finish(tx, status=429)
    rec = last_record(tmp_path)
    assert rec["error"] == "rate_limited" and rec["status"] == 429
    assert rec["rule_id"] == "radiologist-read"  # the policy allowed; the limit refused
    assert any("rate limit 'retrievals'" in reason for reason in rec["reasons"])


async def test_bytes_are_charged_when_the_request_finishes(tmp_path: Path, key: TestKey) -> None:
    limits = [RateLimit(name="volume", bytes=1000, window_seconds=3600)]
    store = MemoryState()
    rt = runtime(tmp_path, key, store, limits=limits)
    tok = token(key)
    tx = await rt.pipeline.decide(request(STUDY, tok))
    assert isinstance(tx.outcome, Forward), tx.reasons
    rt.pipeline.finish(tx, status=200, bytes_in=10, bytes_out=2000)
    await rt.pipeline.drain_charges()
    tx = await rt.pipeline.decide(request(STUDY, tok))
    assert refused(tx).code == "rate_limited"
    assert "1000 bytes per 3600 s" in refused(tx).message


async def test_a_request_the_policy_denies_is_not_counted(tmp_path: Path, key: TestKey) -> None:
    limits = [RateLimit(name="all", requests=1, window_seconds=3600)]
    rt = runtime(tmp_path, key, MemoryState(), limits=limits)
    tok = token(key)
    denied = await rt.pipeline.decide(request("/pacs/studies/1.2", tok, method="DELETE"))
    assert refused(denied).code == "forbidden"
    allowed = await rt.pipeline.decide(request(STUDY, tok))
    assert isinstance(allowed.outcome, Forward), allowed.reasons


async def test_fail_closed_refuses_503_when_the_store_is_down(tmp_path: Path, key: TestKey) -> None:
    store = StoreWithOutage(MemoryState())
    limits = [RateLimit(name="retrievals", requests=100)]
    rt = runtime(tmp_path, key, store, limits=limits)
    store.down = True
    tx = await rt.pipeline.decide(request(STUDY, token(key)))
    r = refused(tx)
    assert (r.status, r.code) == (503, "state_unavailable")
    assert dict(r.headers)["Retry-After"] == "1"
    rt.pipeline.finish(tx, status=503)
    rec = last_record(tmp_path)
    assert rec["error"] == "state_unavailable" and rec["decision"] == "deny"
    assert "token revocations" in rec["reasons"][0]

    rt.pipeline.revocation = None  # the rate limit alone fails closed too
    tx = await rt.pipeline.decide(request(STUDY, token(key)))
    assert refused(tx).code == "state_unavailable"
    assert "rate limits" in tx.reasons[0]


async def test_cached_mode_allows_with_a_degraded_state_warning(
    tmp_path: Path, key: TestKey
) -> None:
    store = StoreWithOutage(MemoryState())
    limits = [RateLimit(name="retrievals", requests=100)]
    clock = Clock()
    rt = runtime(tmp_path, key, store, limits=limits, degraded_mode="cached", clock=clock)
    tok = token(key)
    seen = await rt.pipeline.decide(request(STUDY, tok))
    assert isinstance(seen.outcome, Forward) and seen.warnings == []
    store.down = True
    clock.now += 10  # the revocation answer is stale: the store is asked, and is down
    tx = await rt.pipeline.decide(request(STUDY, tok))
    assert isinstance(tx.outcome, Forward), tx.reasons
    assert tx.warnings == ["degraded_state"]
    rt.pipeline.finish(tx, status=200)
    rec = last_record(tmp_path)
    assert rec["decision"] == "allow" and rec["warnings"] == ["degraded_state"]

    # each check says so on its own
    checker = rt.pipeline.revocation
    rt.pipeline.revocation = None
    alone = await rt.pipeline.decide(request(STUDY, tok))
    assert isinstance(alone.outcome, Forward) and alone.warnings == ["degraded_state"]
    rt.pipeline.revocation, rt.pipeline.rate_limiter = checker, None
    alone = await rt.pipeline.decide(request(STUDY, tok))
    assert isinstance(alone.outcome, Forward) and alone.warnings == ["degraded_state"]

    # a token this replica has never seen cannot be checked: refused even in cached mode
    unseen = await rt.pipeline.decide(request(STUDY, token(key)))
    assert refused(unseen).code == "state_unavailable"
