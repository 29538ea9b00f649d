"""Ship the audit log to the shared state store's audit stream (a bounded Redis stream a
central collector reads), exactly once and in order, surviving store outages.

The local audit log is the spool. Every record is written there first, before its
response completes (log.py); the shipper tails the file (tail.py) on the proxy's event
loop, reads batches of up to 500 records or 1 MiB in a worker thread, and hands each batch
to `StateStore.append_audit`, which appends the records above this replica's stream
cursor and advances the cursor atomically. So:

* no loss: the position only moves past a batch once the store has acknowledged it;
  while the store is unreachable (StateUnavailable) the shipper backs off (`retry_initial`
  .. `retry_max`, doubling) and the records wait in the log, then drain in order;
* no duplicates: a batch sent again (its acknowledgement was lost, or the process died
  between the append and noting it) is skipped by the store, whose cursor already covers
  it; records carry their seq and hash (the chain's ids) into the stream;
* resume from the store: on start, and after every failure, the shipper asks the store
  for the cursor and continues after it, so a restart re-sends nothing. Before each
  further batch it checks the store still holds what it acknowledged: a store that lost
  its data (a Redis restarted without persistence, or from an older snapshot) gets
  everything after what it still has, even when no call failed in between. (One extra
  round trip per batch, off the request path; a batch is sent while the next gathers.)

The cursor is per *replica key* `f"{replica_id}/{first record's hash[:16]}"`: a new log
file starts a new chain at seq 1 and gets a new cursor. When the log is replaced while
running (renamed, and a new file started), the old file is shipped to its last whole line
first, then the new one from its start. Records in a file that is replaced while the
proxy is down are not shipped: rotate the log only when `lag` is 0.

A line that is not a chain record (or whose seq does not increase) halts shipping at that
line, after everything before it (fail closed: `last_error` says where, `casb audit
verify` says why). Nothing here logs or reports record contents: seq numbers, offsets,
the replica key (a hash prefix) and errors only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from casb.audit.tail import AuditFile, BadRecord, parse_record
from casb.state.store import StateStore, StateUnavailable, StreamEntry
from casb.tasks import stop_tasks

log = logging.getLogger(__name__)

BATCH_RECORDS = 500
BATCH_BYTES = 1 << 20
POLL_INTERVAL = 1.0  # the file is checked at least this often, notify() or not
_MAX_ERROR = 200

T = TypeVar("T")


class StreamError(Exception):
    """The store answered, but not as the StateStore contract says (names no content)."""


def replica_key(replica_id: str, first_hash: str) -> str:
    """The stream cursor's name for one log file: this replica and its chain's first record."""
    return f"{replica_id}/{first_hash[:16]}"


def _short(exc: BaseException) -> str:
    """An error for last_error and logs: the type and the store's message, never data."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:_MAX_ERROR]


class AuditStreamShipper:
    """Copies the audit log at `audit_path` into `store`'s audit stream (see the module
    docstring). start() on the event loop, notify() after each append (from any thread),
    aclose() at shutdown; the properties are for health and metrics."""

    def __init__(
        self,
        store: StateStore,
        audit_path: Path,
        replica_id: str,
        *,
        max_len: int,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        poll_interval: float = POLL_INTERVAL,
        batch_records: int = BATCH_RECORDS,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        if not 0 < retry_initial <= retry_max:
            raise ValueError("need 0 < retry_initial <= retry_max")
        if max_len < 1 or batch_records < 1 or batch_bytes < 1 or poll_interval <= 0:
            raise ValueError("max_len, batch_records, batch_bytes and poll_interval must be > 0")
        if not replica_id or "/" in replica_id:
            raise ValueError("replica_id must be non-empty and contain no '/'")
        self._store = store
        self._replica_id = replica_id
        self._max_len = max_len
        self._retry_initial, self._retry_max = retry_initial, retry_max
        self._poll_interval = poll_interval
        self._batch_records, self._batch_bytes = batch_records, batch_bytes
        self._file = AuditFile(audit_path)
        self._key: str | None = None  # the current file's replica key, once it has a line
        self._synced = False  # the position follows the store's cursor for _key
        self._cursor = 0  # the last seq the store holds for _key
        self._parsed_seq = 0  # the last seq read from the file
        self._last_seen = 0  # the seq of the file's last whole line
        self._seen_size = -1
        self._drained = False  # the last read reached the end of the whole lines
        self._backoff = retry_initial
        self._failures = 0
        self._connected = False
        self._store_error: str | None = None
        self._halted: str | None = None  # a bad line stops reading
        self._halt_logged: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- status (single attribute reads: safe from other threads) -----------------------

    @property
    def replica_key(self) -> str | None:
        """The store cursor's name for the current log file (None until it has a line)."""
        return self._key

    @property
    def shipped_seq(self) -> int:
        """The last seq of the current log file the store has acknowledged."""
        return self._cursor

    @property
    def lag(self) -> int:
        """Records in the audit log not yet in the stream (an upper bound until the store
        has answered once)."""
        return max(0, max(self._last_seen, self._parsed_seq) - self._cursor)

    @property
    def connected(self) -> bool:
        """Whether the last store call succeeded."""
        return self._connected

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def last_error(self) -> str | None:
        """Why shipping is failing or halted (None when it is not); never record data."""
        return self._store_error or self._halted

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start shipping on the running event loop (call it from a coroutine)."""
        if self._task is not None:
            raise RuntimeError("an AuditStreamShipper is started once")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = self._loop.create_task(self._run(), name="casb-audit-stream")

    def notify(self) -> None:
        """New records were appended: look now rather than at the next poll. Callable
        from any thread; a no-op before start() and after the loop closed."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
                loop.call_soon_threadsafe(self._wake.set)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Ship what can be shipped within `timeout` (no retries after a failure), then
        stop. What the store has not acknowledged is shipped by the next start."""
        task = self._task
        if task is None or task.done():
            return
        self._stop.set()
        self._wake.set()
        await asyncio.wait({task}, timeout=max(0.0, timeout))
        await stop_tasks((task,), "audit stream")  # cancels it if still shipping

    # -- the shipping task ---------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                try:
                    progressed = await self._cycle()
                except Exception as exc:
                    self._failed(exc)
                    if self._stop.is_set():
                        return
                    await self._back_off(self._backoff_delay())
                    continue
                if progressed:
                    continue
                if self._stop.is_set():
                    return
                await self._wait(self._wake, self._poll_interval)
        finally:
            await self._blocking(self._file.close)

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: see distribution.py
                await event.wait()
        event.clear()

    async def _back_off(self, seconds: float) -> None:
        """Wait before the next store call; keep `lag` current meanwhile (appends still
        wake it, to look at the file) and return at once on stop."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            await self._wait(self._wake, min(left, self._poll_interval))
            if not self._stop.is_set():
                await self._blocking(self._refresh)

    async def _cycle(self) -> bool:
        """Look at the file and ship one batch if there is one; True if the position
        moved (shipped, or resynced to the store's cursor)."""
        await self._blocking(self._refresh)
        key = self._key
        if key is None:
            return False
        fresh = not self._synced
        if fresh:
            cursor = await self._store.audit_cursor(key)
            self._store_ok()
            await self._blocking(lambda: self._resume_after(cursor))
        batch = await self._blocking(self._read_batch)
        if not batch:
            return False
        if not fresh:
            # Does the store still hold what it acknowledged? A Redis that restarted
            # without its data (or with an older snapshot) answers less: send it again.
            # Without this check the next append would move its cursor past the loss.
            held = await self._store.audit_cursor(key)
            self._store_ok()
            if held != self._cursor:
                log.warning(
                    "audit stream cursor for %s is %d where %d was acknowledged (the store "
                    "lost data, or another shipper uses this replica id): resyncing",
                    key,
                    held,
                    self._cursor,
                )
                await self._blocking(lambda: self._resume_after(held))
                return True
        cursor = await self._store.append_audit(key, batch, self._max_len)
        self._store_ok()
        if cursor < batch[-1].seq:
            # Not what append_audit promises: back off, then resync and send again.
            raise StreamError(
                f"the store's cursor is {cursor} after appending through seq {batch[-1].seq}"
            )
        self._cursor = cursor
        log.debug("audit stream holds %s through seq %d", key, cursor)
        return True

    def _store_ok(self) -> None:
        if self._failures:
            log.info("audit stream store reachable again (after %d failures)", self._failures)
        self._failures = 0
        self._backoff = self._retry_initial
        self._connected = True
        self._store_error = None

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self._connected = False
        self._store_error = _short(exc)
        # Resync before sending again: the store may have taken the last batch (only its
        # answer was lost), or lost what it had. Records stay in the log meanwhile.
        self._synced = False
        if isinstance(exc, StateUnavailable):
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            log.log(
                level,
                "audit stream store unavailable (%s); retrying after seq %d in %.1fs",
                self._store_error,
                self._cursor,
                self._backoff,
            )
        else:  # not the store's failure mode: a bug, report it loudly but keep trying
            log.error(
                "audit stream shipping failed (%s); retrying in %.1fs",
                self._store_error,
                self._backoff,
                exc_info=self._failures == 1 and not isinstance(exc, StreamError),
            )

    def _backoff_delay(self) -> float:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self._retry_max)
        return delay

    async def _blocking(self, fn: Callable[[], T]) -> T:
        """Run file I/O in a worker thread. If the task is cancelled meanwhile, wait for
        the thread to finish first: the file is used by one thread at a time."""
        fut = asyncio.get_running_loop().run_in_executor(None, fn)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    # -- reading the audit log (in a worker thread) --------------------------------------

    def _refresh(self) -> None:
        """Open the log once it exists and name its replica key; follow a replacement
        (once this file is shipped to its end) or a truncation; note its last seq."""
        if not self._file.open():
            return
        size = self._file.size()
        if size < self._file.pos:
            log.warning(
                "audit log %s shrank below what was read (shipped through seq %d of %s): "
                "shipping it from the start",
                self._file.path,
                self._cursor,
                self._key,
            )
            self._new_file(reopen=False)
            size = self._file.size()
        elif self._file.replaced() and (
            self._key is None  # nothing shipped from it: it never had a whole record
            or (self._drained and self._synced and self._at_end())
        ):
            # What is left of the old file, if anything, is a partial or bad line that
            # can never be shipped.
            log.info(
                "audit log %s was replaced: shipped %s through seq %d (%d bytes after it "
                "unshippable), shipping the new file",
                self._file.path,
                self._key,
                self._cursor,
                size - self._file.pos,
            )
            self._new_file(reopen=True)
            if not self._file.is_open:
                return
            size = self._file.size()
        if self._key is None:
            try:
                first = self._file.first_record()
            except BadRecord as exc:
                self._halt(0, exc)
                return
            if first is None:
                return
            self._key = replica_key(self._replica_id, first[1])
        if size != self._seen_size:
            self._seen_size = size
            last = self._file.last_seq(size)
            if last is not None:
                self._last_seen = last

    def _at_end(self) -> bool:
        """No whole line after the read position (a record appended since the last read
        still belongs to this file's stream)."""
        item = self._file.next_line()
        if item is None:
            return True
        self._file.seek(item[0])
        return False

    def _new_file(self, *, reopen: bool) -> None:
        if reopen:
            self._file.reopen()
        self._file.seek(0)
        self._key = None
        self._synced = False
        self._cursor = self._parsed_seq = self._last_seen = 0
        self._seen_size = -1
        self._drained = False
        self._halted = self._halt_logged = None

    def _resume_after(self, cursor: int) -> None:
        """Continue after the store's cursor for this file (found by seq)."""
        self._file.seek_after(cursor)
        self._cursor = self._parsed_seq = cursor
        self._synced = True
        self._halted = None
        self._drained = False
        if cursor > self._last_seen and self._file.pos == self._file.size():
            # Only a truncated or restored file has fewer records than the stream holds
            # from it: its records up to the cursor look shipped to the store.
            log.error(
                "the audit stream holds %s through seq %d but %s ends at seq %d: "
                "records up to seq %d will not be shipped again; run `casb audit verify`",
                self._key,
                cursor,
                self._file.path,
                self._last_seen,
                cursor,
            )
        log.info("audit stream shipping %s after seq %d", self._key, cursor)

    def _read_batch(self) -> list[StreamEntry]:
        """Up to batch_records whole lines / batch_bytes (at least one line) as entries."""
        if self._halted is not None:
            return []
        batch: list[StreamEntry] = []
        size = 0
        self._drained = False
        while len(batch) < self._batch_records:
            item = self._file.next_line()
            if item is None:
                self._drained = True
                break
            start, line = item
            if batch and size + len(line) > self._batch_bytes:
                self._file.seek(start)
                break
            try:
                record = parse_record(line)
                seq = record["seq"]
                if seq <= self._parsed_seq:
                    raise BadRecord(f"seq {seq} does not follow seq {self._parsed_seq}")
            except BadRecord as exc:
                self._file.seek(start)  # stay on the bad line: nothing after it is shipped
                self._halt(start, exc)
                break
            batch.append(StreamEntry(seq=seq, hash=record["hash"], line=line.rstrip(b"\n")))
            size += len(line)
            self._parsed_seq = seq
        return batch

    def _halt(self, start: int, exc: BadRecord) -> None:
        message = f"audit stream halted at byte {start} of the audit log: {exc}"
        self._halted = message
        if message == self._halt_logged:  # found again after a resync or a poll
            return
        self._halt_logged = message
        log.error(
            "audit stream shipping halted at byte %d of %s (after seq %d): %s; "
            "run `casb audit verify` on it",
            start,
            self._file.path,
            self._parsed_seq,
            exc,
        )


__all__ = ["AuditStreamShipper", "StreamError", "replica_key"]
