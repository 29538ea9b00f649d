"""The JSONL audit log: one hash-chained record per line, appended and flushed per record,
with a signed checkpoint (checkpoint.py) every so many records or seconds.

One writer per file (an exclusive advisory lock), so replicas must use separate files.
A record is written with a single write(2) on an O_APPEND descriptor before the response
completes (and with fsync, fdatasync(2)'d); a write that fails raises AuditError and the
caller fails closed.

Records carry a "type": "request" (one per request, record.py), "policy_change" and the
like (append_event), "checkpoint" (written here only).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from casb.audit.chain import CHAIN_FIELDS, GENESIS_HASH, record_hash, sealed_line

if TYPE_CHECKING:
    from casb.audit.checkpoint import CheckpointSigner

_TAIL_CHUNK = 64 * 1024
CHECKPOINT = "checkpoint"


class AuditError(Exception):
    """The audit log cannot be opened or written, or a key it needs cannot be used."""


def utc_timestamp(at: datetime | None = None) -> str:
    """ISO 8601 UTC with milliseconds and a Z, as every audit record's "time"."""
    at = at or datetime.now(UTC)
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends records to `path`. With a `signer`, a signed checkpoint follows every
    `every_records` records, is written by maybe_checkpoint() once `every_seconds` have
    passed since the first record no checkpoint covers (call it from a timer), and by
    close(). `clock` (monotonic seconds) is injectable for tests."""

    def __init__(
        self,
        path: Path,
        *,
        signer: CheckpointSigner | None = None,
        every_records: int = 1000,
        every_seconds: float = 60.0,
        fsync: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_records < 1 or every_seconds <= 0:
            raise ValueError("every_records must be >= 1 and every_seconds > 0")
        self.path = path
        self._signer = signer
        self._every_records = every_records
        self._every_seconds = every_seconds
        self._fsync = fsync
        self._clock = clock
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"{path}: cannot open audit log: {exc.strerror}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise AuditError(
                f"{path}: another process is writing this audit log; "
                "give each proxy process its own audit.path"
            ) from exc
        try:
            self._seq, self._prev, covered = _read_tail(path)
        except AuditError:
            os.close(self._fd)
            raise
        # Records since the last checkpoint, and when the first of them was counted. A
        # tail a previous run left uncovered (it crashed) counts as one record from now:
        # the next timed checkpoint, or close(), covers it.
        self._uncovered = 0 if covered else 1
        self._uncovered_since: float | None = None if covered else clock()
        self._lock = threading.Lock()
        self._sync_failure: str | None = None
        self.healthy = True  # False after a failed write, until a write succeeds again

    @property
    def records_written(self) -> int:
        """The seq of the last record (checkpoints included)."""
        return self._seq

    @property
    def uncovered_records(self) -> int:
        """Records written since the last checkpoint (a lower bound after a restart)."""
        return self._uncovered

    def append(self, record: dict[str, Any]) -> str:
        """Seal `record` into the chain and write it; returns its hash. A checkpoint
        follows when one is due by record count."""
        if record.get("type") == CHECKPOINT or not CHAIN_FIELDS.isdisjoint(record):
            raise ValueError("a record must not be a checkpoint nor carry seq/prev_hash/hash")
        with self._lock:
            digest = self._write(record)
            self._uncovered += 1
            if self._uncovered_since is None:
                self._uncovered_since = self._clock()
            if self._signer is not None and self._uncovered >= self._every_records:
                self._write_checkpoint(self._signer)
            return digest

    def append_event(self, type: str, fields: dict[str, Any]) -> str:
        """Append a record that is not a request (e.g. "policy_change"): `fields` plus the
        type and the current time. Returns its hash."""
        if "type" in fields or "time" in fields:
            raise ValueError("append_event sets type and time itself")
        return self.append({"type": type, "time": utc_timestamp(), **fields})

    def maybe_checkpoint(self) -> bool:
        """Append a checkpoint if records are uncovered and `every_seconds` have passed
        since the first of them. Returns whether one was written."""
        with self._lock:
            since = self._uncovered_since
            if self._signer is None or since is None:
                return False
            if self._clock() - since < self._every_seconds:
                return False
            self._write_checkpoint(self._signer)
            return True

    def checkpoint(self) -> bool:
        """Append a checkpoint now if any record is uncovered (and there is a signer)."""
        with self._lock:
            if self._signer is None or self._uncovered == 0:
                return False
            self._write_checkpoint(self._signer)
            return True

    def close(self) -> None:
        """Write a final checkpoint over the uncovered records (with a signer), then
        close. The file is closed even when that checkpoint fails (AuditError)."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                if self._signer is not None and self._uncovered and self._sync_failure is None:
                    self._write_checkpoint(self._signer)
            finally:
                os.close(self._fd)
                self._fd = -1

    # -- under the lock -------------------------------------------------------------
    def _write_checkpoint(self, signer: CheckpointSigner) -> None:
        now = utc_timestamp()
        cp = signer.sign(covers_seq=self._seq, head_hash=self._prev, time=now)
        self._write({"type": CHECKPOINT, "time": now, "checkpoint": cp})
        self._uncovered, self._uncovered_since = 0, None

    def _write(self, record: dict[str, Any]) -> str:
        if self._fd < 0:
            raise AuditError(f"{self.path}: the audit log is closed")
        if self._sync_failure is not None:
            # After a failed fdatasync the kernel may have dropped the unwritten pages
            # and a later fdatasync can succeed without them: durability is unknown
            # until restart (which re-reads the tail), so stay failed.
            raise AuditError(self._sync_failure)
        line, digest = sealed_line(record, self._seq + 1, self._prev)
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            self.healthy = False
            raise AuditError(f"{self.path}: audit write failed: {exc.strerror}") from exc
        if written != len(line):
            # A partial line would break the chain for every later record.
            self.healthy = False
            raise AuditError(f"{self.path}: short audit write ({written}/{len(line)} bytes)")
        # The line is in the file: the chain moves on even if the sync below fails.
        self._seq += 1
        self._prev = digest
        if self._fsync:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self.healthy = False
                self._sync_failure = (
                    f"{self.path}: fdatasync failed ({exc.strerror}); records may not be on "
                    "disk: check the disk, run `casb audit verify`, restart"
                )
                raise AuditError(self._sync_failure) from exc
        self.healthy = True
        return digest


def _read_tail(path: Path) -> tuple[int, str, bool]:
    """The seq and hash of the last record, to continue the chain across restarts, and
    whether it is a checkpoint (nothing uncovered; an empty log counts as covered)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size == 0:
                return 0, GENESIS_HASH, True
            pos, tail = size, b""
            while pos > 0:
                step = min(_TAIL_CHUNK, pos)
                pos -= step
                fh.seek(pos)
                tail = fh.read(step) + tail
                if tail.count(b"\n") >= 2 or pos == 0:
                    break
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit log: {exc.strerror}") from exc
    if not tail.endswith(b"\n"):
        raise AuditError(
            f"{path}: the last audit record is incomplete; run "
            "`casb audit verify` on it and move the file aside"
        )
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(last)
        if record.get("hash") != record_hash(record) or not isinstance(record.get("seq"), int):
            raise ValueError
    except (ValueError, AttributeError) as exc:
        raise AuditError(
            f"{path}: the last audit record is corrupt; run "
            "`casb audit verify` on it and move the file aside"
        ) from exc
    return record["seq"], record["hash"], record.get("type") == CHECKPOINT
