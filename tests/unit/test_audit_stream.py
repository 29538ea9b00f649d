"""The audit stream shipper against the real in-memory state store: every record once and
in order, a store outage drains in order afterwards, restart resumes from the store's
cursor, a batch the store took twice is not duplicated, a replaced log gets a new replica
key, a partial last line waits, a bad line halts. Also the tail reader's seek by seq.

The store's failure mode (StateUnavailable) comes from `UnavailableStore`, a wrapper that
refuses calls while it is "down" and otherwise passes them to the real MemoryState."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from casb.audit.chain import GENESIS_HASH, sealed_line
from casb.audit.stream import AuditStreamShipper, replica_key
from casb.audit.tail import AuditFile
from casb.state.memory import MemoryState
from casb.state.store import StateUnavailable, StreamEntry

REPLICA = "replica-a"
MAX_LEN = 100_000


class Chain:
    """Appends hash-chained records to a JSONL file, as AuditLog does."""

    def __init__(self, path: Path, tag: str = "a") -> None:
        self.path, self.tag = path, tag
        self.seq, self.prev = 0, GENESIS_HASH
        self.lines: dict[int, bytes] = {}

    def line(self, pad: int = 0) -> bytes:
        record = {"request_id": f"{self.tag}{self.seq + 1}", "status": 200, "pad": "x" * pad}
        line, self.prev = sealed_line(record, self.seq + 1, self.prev)
        self.seq += 1
        self.lines[self.seq] = line
        return line

    def append(
        self, n: int = 1, *, pad: int = 0, shipper: AuditStreamShipper | None = None
    ) -> None:
        for _ in range(n):
            with self.path.open("ab") as fh:
                fh.write(self.line(pad))
            if shipper is not None:
                shipper.notify()

    @property
    def key(self) -> str:
        first = json.loads(self.lines[1])
        return replica_key(REPLICA, first["hash"])


class UnavailableStore:
    """The state store's failure mode, around a real MemoryState: while `down`, or for
    the next `fail_calls` audit calls, a call raises StateUnavailable without reaching the
    store; for the next `lose_answers` appends, the store appends and then the answer is
    lost (StateUnavailable), as when a connection drops after Redis ran the command.
    Records each append batch's seqs as sent."""

    backend = "memory"

    def __init__(self, inner: MemoryState) -> None:
        self.inner = inner
        self.down = False
        self.fail_calls = 0
        self.lose_answers = 0
        self.sent: list[list[int]] = []

    def _refuse(self) -> None:
        if self.down:
            raise StateUnavailable("state store unreachable (test outage)")
        if self.fail_calls > 0:
            self.fail_calls -= 1
            raise StateUnavailable("state store unreachable (test outage)")

    async def append_audit(self, replica: str, entries: Sequence[StreamEntry], max_len: int) -> int:
        self._refuse()
        self.sent.append([e.seq for e in entries])
        cursor = await self.inner.append_audit(replica, entries, max_len)
        if self.lose_answers > 0:
            self.lose_answers -= 1
            raise StateUnavailable("connection lost before the reply (test)")
        return cursor

    async def audit_cursor(self, replica: str) -> int:
        self._refuse()
        return await self.inner.audit_cursor(replica)


def stream(store: MemoryState, key: str | None = None) -> list[tuple[int, str, bytes]]:
    return [(r.seq, r.hash, r.line) for r in store.audit_entries() if key in (None, r.replica)]


def expected(chain: Chain, seqs: Sequence[int]) -> list[tuple[int, str, bytes]]:
    out = []
    for s in seqs:
        line = chain.lines[s]
        out.append((s, json.loads(line)["hash"], line.rstrip(b"\n")))
    return out


async def until(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
def audit(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def memory() -> MemoryState:
    return MemoryState()


@pytest.fixture
def flaky(memory: MemoryState) -> UnavailableStore:
    return UnavailableStore(memory)


Make = Callable[..., AuditStreamShipper]


@pytest.fixture
async def make(audit: Path, flaky: UnavailableStore) -> AsyncIterator[Make]:
    started: list[AuditStreamShipper] = []

    def make(store: object = None, path: Path | None = None, **kw: object) -> AuditStreamShipper:
        opts: dict[str, object] = {"max_len": MAX_LEN, "retry_initial": 0.01, "retry_max": 0.05}
        opts.update(kw)
        shipper = AuditStreamShipper(store or flaky, path or audit, REPLICA, **opts)  # type: ignore[arg-type]
        shipper.start()
        started.append(shipper)
        return shipper

    yield make
    for shipper in started:
        await shipper.aclose(timeout=1)


# -- the tail reader's seek by seq --------------------------------------------------------


def test_seek_after_lands_on_the_next_record(audit: Path) -> None:
    chain = Chain(audit)
    rng = random.Random(7)
    for _ in range(3000):  # lines of 100 B .. 40 kB: many bisection steps, uneven spans
        chain.append(pad=rng.choice([10, 200, 3000, 40_000]))
    f = AuditFile(audit)
    assert f.open()
    try:
        for target in [0, 1, 2, 17, 1499, 1500, 2998, 2999, *rng.sample(range(3000), 40)]:
            f.seek_after(target)
            item = f.next_line()
            assert item is not None and item[1] == chain.lines[target + 1], target
        for target in (3000, 10**9):
            f.seek_after(target)
            assert f.next_line() is None and f.pos == audit.stat().st_size
        assert f.first_record() == (1, json.loads(chain.lines[1])["hash"])
    finally:
        f.close()


def test_seek_after_stops_at_a_line_that_is_not_a_record(audit: Path) -> None:
    chain = Chain(audit)
    chain.append(5)
    bad_at = audit.stat().st_size
    with audit.open("ab") as fh:
        fh.write(b"not json\n")
    chain.append(5)
    f = AuditFile(audit)
    assert f.open()
    try:
        f.seek_after(7)  # past the bad line: the scan stops on it rather than skip it
        assert f.pos == bad_at
        f.seek_after(3)
        item = f.next_line()
        assert item is not None and item[1] == chain.lines[4]
    finally:
        f.close()


# -- shipping ------------------------------------------------------------------------------


async def test_ships_every_record_once_in_order(
    audit: Path, memory: MemoryState, flaky: UnavailableStore, make: Make
) -> None:
    chain = Chain(audit)
    chain.append(700, pad=100)  # before start: more than one 500-record batch
    shipper = make()
    chain.append(300, pad=5000, shipper=shipper)  # 1.5 MB more: the 1 MiB limit splits it
    await until(lambda: shipper.shipped_seq == 1000, "1000 records shipped")
    assert stream(memory) == expected(chain, range(1, 1001))
    assert {r.replica for r in memory.audit_entries()} == {chain.key}
    assert shipper.replica_key == chain.key
    assert all(len(b) <= 500 for b in flaky.sent)
    assert max(len(b) for b in flaky.sent) == 500
    sizes = [sum(len(chain.lines[s]) for s in b) for b in flaky.sent]
    assert all(size <= 1 << 20 for size in sizes)
    assert [s for b in flaky.sent for s in b] == list(range(1, 1001))  # nothing sent twice
    assert (shipper.lag, shipper.connected, shipper.last_error) == (0, True, None)


async def test_store_outage_in_the_middle_drains_in_order(
    audit: Path, memory: MemoryState, flaky: UnavailableStore, make: Make
) -> None:
    chain = Chain(audit)
    shipper = make()
    chain.append(20, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 20, "first records")
    flaky.down = True
    chain.append(30, shipper=shipper)
    await until(lambda: shipper.last_error is not None, "the outage noticed")
    assert "StateUnavailable" in (shipper.last_error or "")
    assert not shipper.connected
    await until(lambda: shipper.lag == 30, "the lag to show the spooled records")
    chain.append(30, shipper=shipper)
    assert stream(memory) == expected(chain, range(1, 21))  # nothing reached the store
    flaky.down = False
    await until(lambda: shipper.shipped_seq == 80, "the spool drained")
    assert stream(memory) == expected(chain, range(1, 81))
    assert (shipper.lag, shipper.connected, shipper.last_error) == (0, True, None)


async def test_store_unavailable_at_start(
    audit: Path, memory: MemoryState, flaky: UnavailableStore, make: Make
) -> None:
    chain = Chain(audit)
    chain.append(12)
    flaky.fail_calls = 5
    shipper = make()
    await until(lambda: shipper.shipped_seq == 12, "delivery after the failures")
    assert flaky.fail_calls == 0
    assert stream(memory) == expected(chain, range(1, 13))


async def test_lag_stays_current_while_backing_off(
    audit: Path, flaky: UnavailableStore, make: Make
) -> None:
    chain = Chain(audit)
    chain.append(4)
    flaky.down = True
    shipper = make(retry_initial=30, retry_max=30, poll_interval=30)
    await until(lambda: shipper.last_error is not None and shipper.lag == 4, "a failure")
    chain.append(6, shipper=shipper)  # the next try is 30 s away; appends still count
    await until(lambda: shipper.lag == 10, "the lag to follow the appends")


async def test_restart_resumes_from_the_store_cursor(
    audit: Path, memory: MemoryState, flaky: UnavailableStore, make: Make
) -> None:
    chain = Chain(audit)
    chain.append(50)
    first = make()
    await until(lambda: first.shipped_seq == 50, "first run")
    await first.aclose()
    assert not first.running
    chain.append(30)
    flaky.sent.clear()
    second = make()
    await until(lambda: second.shipped_seq == 80, "second run")
    assert flaky.sent[0][0] == 51  # nothing already in the stream was sent again
    assert stream(memory) == expected(chain, range(1, 81))


async def test_lost_answer_is_not_duplicated(
    audit: Path, memory: MemoryState, flaky: UnavailableStore, make: Make
) -> None:
    chain = Chain(audit)
    chain.append(40)
    flaky.lose_answers = 1  # the store appends 1..40, the shipper hears StateUnavailable
    shipper = make()
    await until(lambda: shipper.shipped_seq == 40 and flaky.lose_answers == 0, "delivery")
    chain.append(10, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 50, "more records")
    assert stream(memory) == expected(chain, range(1, 51))


async def test_a_batch_appended_before_a_crash_is_not_duplicated(
    audit: Path, memory: MemoryState, flaky: UnavailableStore, make: Make
) -> None:
    """The process died after the store appended a batch, before it noted that: the next
    shipper re-reads the file and sends that batch again; the store keeps one copy."""
    chain = Chain(audit)
    chain.append(25)
    batch = [
        StreamEntry(s, json.loads(chain.lines[s])["hash"], chain.lines[s][:-1])
        for s in range(1, 16)
    ]
    assert await memory.append_audit(chain.key, batch, MAX_LEN) == 15
    # Resending the same batch (as a shipper that never learnt it went) appends nothing.
    assert await memory.append_audit(chain.key, batch, MAX_LEN) == 15
    shipper = make()
    await until(lambda: shipper.shipped_seq == 25, "delivery")
    assert stream(memory) == expected(chain, range(1, 26))


async def test_a_store_that_lost_its_data_gets_everything_again(
    audit: Path, flaky: UnavailableStore, make: Make
) -> None:
    chain = Chain(audit)
    shipper = make()
    chain.append(10, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 10, "first records")
    flaky.down = True  # Redis restarts without persistence: the stream and cursors go
    chain.append(5, shipper=shipper)
    await until(lambda: shipper.last_error is not None, "the outage noticed")
    fresh = MemoryState()
    flaky.inner = fresh
    flaky.down = False
    await until(lambda: shipper.shipped_seq == 15, "the file shipped again")
    assert stream(fresh) == expected(chain, range(1, 16))


async def test_a_store_that_lost_its_data_while_idle_gets_everything_again(
    audit: Path, flaky: UnavailableStore, make: Make
) -> None:
    """No call failed: the store restarted empty between two appends (redis-py reconnects
    quietly). The next batch must not move the fresh store's cursor past the loss."""
    chain = Chain(audit)
    shipper = make()
    chain.append(10, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 10, "first records")
    fresh = MemoryState()
    flaky.inner = fresh
    chain.append(5, shipper=shipper)
    await until(lambda: len(fresh.audit_entries()) == 15, "the file shipped again")
    assert stream(fresh) == expected(chain, range(1, 16))
    assert shipper.shipped_seq == 15 and shipper.last_error is None


async def test_a_store_restored_from_an_older_snapshot_gets_the_rest(
    audit: Path, memory: MemoryState, flaky: UnavailableStore, make: Make
) -> None:
    chain = Chain(audit)
    chain.append(8)
    older = MemoryState()
    head = [
        StreamEntry(s, json.loads(chain.lines[s])["hash"], chain.lines[s][:-1]) for s in (1, 2, 3)
    ]
    await older.append_audit(chain.key, head, MAX_LEN)  # what the snapshot had
    shipper = make()
    await until(lambda: shipper.shipped_seq == 8, "first run")
    flaky.inner = older
    chain.append(2, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 10 and len(older.audit_entries()) == 10, "rest")
    assert stream(older) == expected(chain, range(1, 11))


async def test_replaced_log_gets_a_new_replica_key(
    audit: Path, memory: MemoryState, make: Make
) -> None:
    old = Chain(audit, "old")
    shipper = make()
    old.append(5, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 5, "the old log")
    audit.rename(audit.with_name("audit.jsonl.1"))
    new = Chain(audit, "new")  # a new chain: seq 1.. again, other hashes
    new.append(3, shipper=shipper)
    await until(lambda: shipper.replica_key == new.key and shipper.shipped_seq == 3, "new log")
    assert old.key != new.key and new.key.startswith(f"{REPLICA}/")
    assert stream(memory, old.key) == expected(old, range(1, 6))
    assert stream(memory, new.key) == expected(new, range(1, 4))
    assert await memory.audit_cursor(old.key) == 5


async def test_replaced_log_ships_the_old_file_to_its_end_first(
    audit: Path, memory: MemoryState, flaky: UnavailableStore, make: Make
) -> None:
    old = Chain(audit, "old")
    shipper = make()
    old.append(5, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 5, "the first records")
    flaky.down = True
    old.append(4, shipper=shipper)  # spooled in the old file
    await until(lambda: shipper.last_error is not None, "the outage noticed")
    audit.rename(audit.with_name("audit.jsonl.1"))
    new = Chain(audit, "new")
    new.append(3, shipper=shipper)
    flaky.down = False
    await until(lambda: shipper.replica_key == new.key and shipper.shipped_seq == 3, "new log")
    assert stream(memory, old.key) == expected(old, range(1, 10))
    assert stream(memory, new.key) == expected(new, range(1, 4))
    assert [r.replica for r in memory.audit_entries()] == [old.key] * 9 + [new.key] * 3


async def test_partial_last_line_waits_for_its_newline(
    audit: Path, memory: MemoryState, make: Make
) -> None:
    chain = Chain(audit)
    chain.append(3)
    tail = chain.line()
    with audit.open("ab") as fh:
        fh.write(tail[:40])
    shipper = make()
    await until(lambda: shipper.shipped_seq == 3, "the whole lines")
    assert stream(memory) == expected(chain, range(1, 4))
    with audit.open("ab") as fh:
        fh.write(tail[40:])
    shipper.notify()
    await until(lambda: shipper.shipped_seq == 4, "the completed line")
    assert stream(memory) == expected(chain, range(1, 5))


async def test_a_partial_first_line_waits_for_the_replica_key(
    audit: Path, memory: MemoryState, make: Make
) -> None:
    chain = Chain(audit)
    first = chain.line()
    with audit.open("ab") as fh:
        fh.write(first[:30])
    shipper = make()
    await until(lambda: shipper.lag == 0 and shipper.running, "the shipper running")
    assert shipper.replica_key is None
    with audit.open("ab") as fh:
        fh.write(first[30:])
    chain.append(2, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 3, "delivery")
    assert shipper.replica_key == chain.key
    assert stream(memory) == expected(chain, range(1, 4))


async def test_bad_line_halts_after_what_precedes_it(
    audit: Path,
    memory: MemoryState,
    flaky: UnavailableStore,
    make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chain = Chain(audit)
    chain.append(5)
    flaky.lose_answers = 1  # a resync re-reads the lines before the bad one: halts again
    with audit.open("ab") as fh:
        fh.write(b'{"patient": "DOE^JANE"}\n')  # not a record (and never echoed)
    chain.append(3)
    with caplog.at_level(logging.DEBUG, logger="casb.audit.stream"):
        shipper = make()
        await until(
            lambda: "halted at byte" in (shipper.last_error or "") and shipper.shipped_seq == 5,
            "the halt, after what precedes the bad line",
        )
    assert flaky.sent == [[1, 2, 3, 4, 5]]  # once, and again never: the answer was lost
    assert shipper.lag == 3
    assert stream(memory) == expected(chain, range(1, 6))
    assert "DOE" not in caplog.text and "halted" in caplog.text
    assert caplog.text.count("halted at byte") == 1  # reported once, not at every poll


async def test_seq_going_backwards_halts(audit: Path, memory: MemoryState, make: Make) -> None:
    chain = Chain(audit)
    chain.append(4)
    with audit.open("ab") as fh:
        fh.write(chain.lines[2])  # a record repeated: seq 2 after seq 4
    shipper = make()
    await until(lambda: shipper.last_error is not None, "the halt")
    assert "does not follow" in (shipper.last_error or "")
    await until(lambda: shipper.shipped_seq == 4, "the records before it")
    assert stream(memory) == expected(chain, range(1, 5))


async def test_aclose_is_prompt_while_the_store_is_down(
    audit: Path, flaky: UnavailableStore, make: Make
) -> None:
    Chain(audit).append(3)
    flaky.down = True
    shipper = make(retry_initial=30, retry_max=30)
    await until(lambda: shipper.last_error is not None, "a failure")
    began = time.monotonic()
    await shipper.aclose(timeout=5)
    assert time.monotonic() - began < 1
    assert not shipper.running
    assert shipper.lag == 3


class UnderstatingStore(UnavailableStore):
    """Appends, then answers a cursor of 0 once: a store breaking append_audit's promise."""

    async def append_audit(self, replica: str, entries: Sequence[StreamEntry], max_len: int) -> int:
        cursor = await super().append_audit(replica, entries, max_len)
        if self.sent == [[e.seq for e in entries]]:
            return 0
        return cursor


async def test_a_cursor_behind_the_batch_is_an_error_then_a_resync(
    audit: Path, memory: MemoryState, make: Make
) -> None:
    chain = Chain(audit)
    chain.append(6)
    store = UnderstatingStore(memory)
    shipper = make(store, retry_initial=0.2, retry_max=0.2)
    await until(lambda: shipper.last_error is not None, "the broken promise noticed")
    assert "StreamError" in (shipper.last_error or "") and shipper.shipped_seq == 0
    await until(lambda: shipper.shipped_seq == 6 and shipper.last_error is None, "the resync")
    assert stream(memory) == expected(chain, range(1, 7))


class HangingStore(UnavailableStore):
    """A store that never answers appends (a partitioned network without a timeout)."""

    async def append_audit(self, replica: str, entries: Sequence[StreamEntry], max_len: int) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_aclose_cancels_a_store_call_that_hangs(
    audit: Path, memory: MemoryState, make: Make
) -> None:
    Chain(audit).append(3)
    shipper = make(HangingStore(memory))
    await until(lambda: shipper.replica_key is not None and shipper.connected, "a cursor")
    began = time.monotonic()
    await shipper.aclose(timeout=0.2)
    assert time.monotonic() - began < 1
    assert not shipper.running and shipper.shipped_seq == 0


async def test_aclose_drains_what_was_appended(
    audit: Path, memory: MemoryState, make: Make
) -> None:
    chain = Chain(audit)
    shipper = make(poll_interval=60)
    chain.append(2, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 2, "first records")
    chain.append(7)  # never notified; the poll is a minute away
    await shipper.aclose(timeout=5)
    assert stream(memory) == expected(chain, range(1, 10))


async def test_notify_from_another_thread(audit: Path, memory: MemoryState, make: Make) -> None:
    chain = Chain(audit)
    shipper = make(poll_interval=60)  # only notify() can wake it in time
    chain.append(1)
    await until(lambda: shipper.shipped_seq == 1, "the first record")
    writer = threading.Thread(target=lambda: chain.append(4, shipper=shipper))
    writer.start()
    await asyncio.to_thread(writer.join)
    await until(lambda: shipper.shipped_seq == 5, "records notified from a thread")


async def test_log_appearing_after_start(audit: Path, memory: MemoryState, make: Make) -> None:
    shipper = make()
    await until(lambda: shipper.running, "running")
    chain = Chain(audit)
    chain.append(3, shipper=shipper)
    await until(lambda: shipper.shipped_seq == 3, "delivery")
    assert stream(memory) == expected(chain, range(1, 4))


def test_rejects_bad_arguments(audit: Path, memory: MemoryState) -> None:
    with pytest.raises(ValueError):
        AuditStreamShipper(memory, audit, "a/b", max_len=1000)
    with pytest.raises(ValueError):
        AuditStreamShipper(memory, audit, REPLICA, max_len=1000, retry_initial=2, retry_max=1)
