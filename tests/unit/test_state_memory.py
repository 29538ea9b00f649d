"""MemoryState: the whole StateStore contract (tests/support/state_contract.py), then
what an injected clock can pin down exactly: expiry at the boundary, fixed windows
aligned to the epoch, retry_after, the later expiry kept, and the sweep that keeps
memory bounded; and notification delivery (per subscriber, across threads, on close)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from casb.state import MemoryState, StateStore
from tests.support.state_contract import (
    CHECKS,
    Check,
    Harness,
    StreamView,
    bundle,
    check_id,
    collecting,
    entry,
    until,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z, a multiple of 20 s and of 100 s


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def harness() -> Harness:
    store = MemoryState()

    async def read() -> StreamView:
        return [(r.replica, r.seq, r.hash, r.line) for r in store.audit_entries()]

    return Harness(store=store, read_stream=read)


@pytest.mark.parametrize("check", CHECKS, ids=check_id)
async def test_contract(harness: Harness, check: Check) -> None:
    await check(harness)


def test_is_a_state_store() -> None:
    store: StateStore = MemoryState()
    assert store.backend == "memory"


# -- expiry and windows by the injected clock -------------------------------------------
async def test_revocation_expires_exactly_at_expires_at() -> None:
    clock = Clock()
    s = MemoryState(clock=clock)
    await s.revoke_token("j", expires_at=T0 + 60)
    await s.revoke_subject("alice", before=T0 - 1, expires_at=T0 + 60)
    clock.now = T0 + 59.999
    r = await s.revocation("j", "alice")
    assert r.jti_revoked and r.subject_before == T0 - 1
    clock.now = T0 + 60
    r = await s.revocation("j", "alice")
    assert not r.jti_revoked and r.subject_before is None


async def test_revocation_keeps_the_later_expiry() -> None:
    clock = Clock()
    s = MemoryState(clock=clock)
    await s.revoke_subject("alice", before=T0, expires_at=T0 + 600)
    await s.revoke_subject("alice", before=T0 - 50, expires_at=T0 + 10)  # shorter, earlier
    await s.revoke_token("j", expires_at=T0 + 600)
    await s.revoke_token("j", expires_at=T0 + 10)
    clock.now = T0 + 300
    r = await s.revocation("j", "alice")
    assert r.jti_revoked and r.subject_before == T0
    # A later expiry with an earlier `before` extends the entry, keeping `before`.
    await s.revoke_subject("alice", before=T0 - 50, expires_at=T0 + 900)
    clock.now = T0 + 800
    assert (await s.revocation(None, "alice")).subject_before == T0


async def test_subjects_are_held_by_hash() -> None:
    s = MemoryState(clock=Clock())
    await s.revoke_subject("alice@hospital.test", before=T0, expires_at=T0 + 60)
    assert "alice@hospital.test" not in repr(vars(s))


async def test_windows_align_to_the_epoch_and_reset() -> None:
    clock = Clock(T0 + 5)  # 5 s into a 20 s window
    s = MemoryState(clock=clock)
    assert (await s.consume("k", 2, 2, 20)).allowed
    refused = await s.consume("k", 1, 2, 20)
    assert (refused.allowed, refused.used, refused.retry_after) == (False, 2, 15.0)
    clock.now = T0 + 19.5
    assert (await s.consume("k", 1, 2, 20)).retry_after == 0.5
    clock.now = T0 + 20  # the next window
    again = await s.consume("k", 1, 2, 20)
    assert (again.allowed, again.used) == (True, 1)


async def test_expired_entries_are_swept() -> None:
    clock = Clock()
    s = MemoryState(clock=clock)
    for n in range(50):
        await s.revoke_token(f"j{n}", expires_at=T0 + 10)
        await s.consume(f"k{n}", 1, 5, 10)
    clock.now = T0 + 3600
    await s.revoke_token("fresh", expires_at=T0 + 7200)
    assert len(s._revoked_jti) == 1
    assert s._counters == {}


# -- notifications ------------------------------------------------------------------------
async def test_subscribed_when_created() -> None:
    s = MemoryState()
    it = s.policy_notifications()
    b = bundle("a: 1\n")
    await s.publish_policy(b, author="alice")  # before anyone awaits the iterator
    assert await asyncio.wait_for(it.__anext__(), 1) == b.version
    await it.aclose()


async def test_closed_iterator_ends_and_stops_receiving() -> None:
    s = MemoryState()
    it = s.policy_notifications()
    await it.aclose()
    await s.publish_policy(bundle("a: 1\n"), author="alice")
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()


async def test_aclose_of_the_store_ends_iterators() -> None:
    s = MemoryState()
    it = s.policy_notifications()
    waiting = asyncio.create_task(it.__anext__())
    await asyncio.sleep(0)  # let the task start waiting
    await s.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)


async def test_notification_from_another_thread() -> None:
    s = MemoryState()
    b = bundle("from a thread\n")
    async with collecting(s.policy_notifications()) as got:
        thread = threading.Thread(target=lambda: asyncio.run(s.publish_policy(b, author="worker")))
        thread.start()

        async def arrived() -> bool:
            return got == [b.version]

        await until(arrived, "the notification published from another thread")
        thread.join()


async def test_a_slow_reader_keeps_the_newest() -> None:
    s = MemoryState()
    it = s.policy_notifications()
    versions = [bundle(f"n: {i}\n").version for i in range(200)]
    for i in range(200):
        await s.publish_policy(bundle(f"n: {i}\n"), author="a")
    seen = [await it.__anext__() for _ in range(64)]
    assert seen == versions[-64:]
    await it.aclose()


# -- audit stream -------------------------------------------------------------------------
async def test_audit_stream_trims_exactly() -> None:
    s = MemoryState()
    await s.append_audit("r/1", [entry(n) for n in range(1, 21)], 5)
    assert [r.seq for r in s.audit_entries()] == [16, 17, 18, 19, 20]
    assert await s.audit_cursor("r/1") == 20
