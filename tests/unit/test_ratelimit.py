"""Rate limits: which counters a request charges (pure), and enforcement against the real
in-memory state store, including what happens when the store cannot answer."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from casb.config import RateLimit
from casb.context import Action, Principal
from casb.ratelimit import (
    Admission,
    LocalCounters,
    RateLimiter,
    counter_key,
    principal_key,
    select_counters,
)
from casb.state.memory import MemoryState
from casb.state.store import Consumed, Revocation, StateUnavailable

T0 = 1_700_000_040.0  # a multiple of 60: windows of 60 s start here


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StoreWithOutage:
    """Test double of the store's failure mode only: the real MemoryState, except that
    while `down` every call raises StateUnavailable (as a backend that cannot reach
    Redis does)."""

    backend = "memory"

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StateUnavailable("connection refused")

    async def revocation(self, jti: str | None, subject: str) -> Revocation:
        self._check()
        return await self.inner.revocation(jti, subject)

    async def consume(self, key: str, amount: int, limit: int, window_seconds: int) -> Consumed:
        self._check()
        return await self.inner.consume(key, amount, limit, window_seconds)

    async def charge(self, key: str, amount: int, window_seconds: int) -> None:
        self._check()
        await self.inner.charge(key, amount, window_seconds)

    def __getattr__(self, name: str) -> Any:  # the rest of StateStore, unchanged
        return getattr(self.inner, name)


def alice(*roles: str) -> Principal:
    return Principal(
        subject="alice@hospital.example", issuer="https://idp.test", roles=frozenset(roles)
    )


def limit(name: str = "retrievals", **kw: Any) -> RateLimit:
    kw.setdefault("requests", 2)
    return RateLimit(name=name, **kw)


# -- pure ---------------------------------------------------------------------------
def test_counter_keys_hash_the_principal_never_name_it() -> None:
    p = alice("radiologist")
    digest = hashlib.sha256(b"https://idp.test\0alice@hospital.example").hexdigest()[:32]
    assert principal_key(p) == digest
    assert counter_key("retrievals", p, "requests") == f"retrievals:{digest}:requests"
    other_issuer = Principal(subject=p.subject, issuer="https://other.test", roles=p.roles)
    assert principal_key(other_issuer) != digest  # same sub at another IdP: another user


def test_limits_match_by_action_destination_and_role() -> None:
    limits = [
        limit("reads", actions=["retrieve"], destinations=["pacs"], requests=10),
        limit("research", roles=["researcher"], requests=5, bytes=1000, window_seconds=3600),
        limit("everything", requests=100),
    ]
    radiologist, researcher = alice("radiologist"), alice("researcher", "radiologist")
    names = [
        (c.name, c.kind) for c in select_counters(limits, radiologist, Action.RETRIEVE, "pacs")
    ]
    assert names == [("reads", "requests"), ("everything", "requests")]
    names = [(c.name, c.kind) for c in select_counters(limits, radiologist, Action.SEARCH, "pacs")]
    assert names == [("everything", "requests")]
    assert [c.name for c in select_counters(limits, radiologist, "retrieve", "research")] == [
        "everything"
    ]
    counters = select_counters(limits, researcher, Action.RETRIEVE, "pacs")
    # byte budgets come first: checking them charges nothing
    assert [(c.name, c.kind, c.amount, c.limit, c.window_seconds) for c in counters] == [
        ("research", "bytes", 0, 1000, 3600),
        ("reads", "requests", 1, 10, 60),
        ("research", "requests", 1, 5, 3600),
        ("everything", "requests", 1, 100, 60),
    ]
    assert counters[0].key.endswith(":bytes") and counters[1].key.endswith(":requests")


def test_local_counters_use_fixed_windows_aligned_to_the_epoch() -> None:
    clock = Clock(T0 + 50)
    local = LocalCounters(clock=clock)
    assert local.consume("k", 1, 2, 60).allowed
    assert local.consume("k", 1, 2, 60) == Consumed(True, 2)
    refused = local.consume("k", 1, 2, 60)
    assert not refused.allowed and refused.retry_after == pytest.approx(10)
    clock.now = T0 + 60  # the next window
    assert local.consume("k", 1, 2, 60) == Consumed(True, 1)


def test_local_counters_stay_bounded() -> None:
    local = LocalCounters(clock=Clock(), max_entries=3)
    for i in range(10):
        local.charge(f"k{i}", 1, 60)
    assert len(local) == 3


# -- enforcement with the real memory store -----------------------------------------
async def test_requests_are_counted_and_the_next_is_refused_with_retry_after() -> None:
    clock = Clock(T0 + 20.5)
    limiter = RateLimiter(MemoryState(clock=clock), [limit(requests=2)], clock=clock)
    p = alice("radiologist")
    assert (await limiter.admit(p, Action.RETRIEVE, "pacs")).allowed
    assert (await limiter.admit(p, Action.RETRIEVE, "pacs")).allowed
    refused = await limiter.admit(p, Action.RETRIEVE, "pacs")
    assert not refused.allowed and not refused.degraded
    assert refused.retry_after == 40  # ceil(39.5): the window ends at T0 + 60
    assert refused.refused_by is not None and refused.refused_by.name == "retrievals"
    assert "rate limit 'retrievals': 2 requests per 60 s" in refused.reason
    assert "alice" not in refused.reason
    # another principal has its own budget; the window's end gives a new one
    bob = Principal(subject="bob", issuer="https://idp.test", roles=frozenset())
    assert (await limiter.admit(bob, Action.RETRIEVE, "pacs")).allowed
    clock.now = T0 + 60
    assert (await limiter.admit(p, Action.RETRIEVE, "pacs")).allowed


async def test_a_limit_counts_across_replicas_sharing_the_store() -> None:
    clock = Clock()
    store = MemoryState(clock=clock)
    a = RateLimiter(store, [limit(requests=3)], clock=clock)
    b = RateLimiter(store, [limit(requests=3)], clock=clock)
    p = alice()
    results = [await r.admit(p, Action.SEARCH, "pacs") for r in (a, b, a, b)]
    assert [r.allowed for r in results] == [True, True, True, False]


async def test_requests_without_a_matching_limit_charge_nothing() -> None:
    store = MemoryState()
    limiter = RateLimiter(store, [limit(actions=["store"], requests=1)])
    for _ in range(3):
        admission = await limiter.admit(alice(), Action.RETRIEVE, "pacs")
        assert admission == Admission(allowed=True)


async def test_bytes_are_charged_after_the_fact_and_refuse_once_spent() -> None:
    clock = Clock()
    store = MemoryState(clock=clock)
    limiter = RateLimiter(store, [limit("volume", requests=None, bytes=1000)], clock=clock)
    p = alice()
    first = await limiter.admit(p, Action.RETRIEVE, "pacs")
    assert first.allowed and [c.name for c in first.byte_counters] == ["volume"]
    await limiter.charge_bytes(first, 999)
    second = await limiter.admit(p, Action.RETRIEVE, "pacs")
    assert second.allowed  # 999 < 1000: one byte left, so the request may go
    await limiter.charge_bytes(second, 5000)  # a request can overshoot ...
    third = await limiter.admit(p, Action.RETRIEVE, "pacs")
    assert not third.allowed  # ... and the budget is spent for the rest of the window
    assert third.refused_by is not None and third.refused_by.kind == "bytes"
    assert "1000 bytes per 60 s" in third.reason
    # the shared counter holds both charges
    key = counter_key("volume", p, "bytes")
    assert (await store.consume(key, 0, 10**9, 60)).used == 5999


async def test_a_byte_budget_used_exactly_is_spent() -> None:
    clock = Clock()
    limiter = RateLimiter(
        MemoryState(clock=clock), [limit("volume", requests=None, bytes=1000)], clock=clock
    )
    await limiter.charge_bytes(await limiter.admit(alice(), Action.RETRIEVE, "pacs"), 1000)
    assert not (await limiter.admit(alice(), Action.RETRIEVE, "pacs")).allowed


async def test_a_byte_refusal_does_not_count_a_request() -> None:
    clock = Clock()
    store = MemoryState(clock=clock)
    limiter = RateLimiter(store, [limit("both", requests=5, bytes=10)], clock=clock)
    p = alice()
    await limiter.charge_bytes(await limiter.admit(p, Action.RETRIEVE, "pacs"), 10)
    assert not (await limiter.admit(p, Action.RETRIEVE, "pacs")).allowed
    assert (await store.consume(counter_key("both", p, "requests"), 0, 99, 60)).used == 1


# -- when the store cannot answer ---------------------------------------------------
async def test_fail_closed_raises_when_the_store_is_down() -> None:
    store = StoreWithOutage(MemoryState())
    limiter = RateLimiter(store, [limit(actions=["retrieve"])])  # type: ignore[arg-type]
    store.down = True
    with pytest.raises(StateUnavailable):
        await limiter.admit(alice(), Action.RETRIEVE, "pacs")
    # no matching limit: nothing to ask the store
    assert (await limiter.admit(alice(), Action.STORE, "pacs")).allowed is True


async def test_a_store_that_does_not_answer_in_time_is_unavailable() -> None:
    class NeverAnswers(StoreWithOutage):
        async def consume(self, key: str, amount: int, limit: int, window: int) -> Consumed:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    limiter = RateLimiter(NeverAnswers(MemoryState()), [limit()], timeout_seconds=0.05)  # type: ignore[arg-type]
    with pytest.raises(StateUnavailable, match="in time"):
        await limiter.admit(alice(), Action.RETRIEVE, "pacs")


async def test_cached_mode_counts_locally_from_the_last_counts_seen() -> None:
    clock = Clock()
    store = StoreWithOutage(MemoryState(clock=clock))
    limiter = RateLimiter(store, [limit(requests=3)], degraded_mode="cached", clock=clock)  # type: ignore[arg-type]
    p = alice()
    assert (await limiter.admit(p, Action.RETRIEVE, "pacs")).allowed  # the store counts 1
    await store.inner.consume(counter_key("retrievals", p, "requests"), 1, 3, 60)  # another replica
    second = await limiter.admit(p, Action.RETRIEVE, "pacs")
    assert second.allowed and not second.degraded  # the store counts 3: this replica saw it
    store.down = True
    degraded = await limiter.admit(p, Action.RETRIEVE, "pacs")
    assert degraded.degraded and not degraded.allowed  # counted on from 3, not from its own 2
    store.down = False
    clock.now = T0 + 60
    assert (await limiter.admit(p, Action.RETRIEVE, "pacs")).allowed
    store.down = True
    results = [await limiter.admit(p, Action.RETRIEVE, "pacs") for _ in range(3)]
    assert [(r.allowed, r.degraded) for r in results] == [(True, True), (True, True), (False, True)]
    assert results[-1].retry_after == 60


async def test_byte_charges_the_store_missed_are_sent_when_it_is_back() -> None:
    clock = Clock()
    store = StoreWithOutage(MemoryState(clock=clock))
    limiter = RateLimiter(store, [limit("volume", requests=None, bytes=100)], clock=clock)  # type: ignore[arg-type]
    p = alice()
    key = counter_key("volume", p, "bytes")
    admission = await limiter.admit(p, Action.RETRIEVE, "pacs")
    store.down = True
    await limiter.charge_bytes(admission, 70)  # never raises
    assert limiter.pending_charges == 1
    store.down = False
    await limiter.charge_bytes(admission, 40)
    assert limiter.pending_charges == 0
    assert (await store.inner.consume(key, 0, 10**9, 60)).used == 110
    # a charge queued in a window that has ended is dropped, not charged to the next
    store.down = True
    await limiter.charge_bytes(admission, 500)
    clock.now = T0 + 60
    store.down = False
    await limiter.flush()
    assert limiter.pending_charges == 0
    assert (await store.inner.consume(key, 0, 10**9, 60)).used == 0
