"""The JSONL audit log: one hash-chained record per line, appended and flushed per record.

One writer per file (an exclusive advisory lock), so replicas must use separate files.
A record is written with a single write(2) on an O_APPEND descriptor before the response
completes; a write that fails raises AuditError and the caller fails closed.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

from casb.audit.chain import GENESIS_HASH, record_hash, sealed_line

_TAIL_CHUNK = 64 * 1024


class AuditError(Exception):
    """The audit log cannot be opened or written."""


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
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
            self._seq, self._prev = _read_tail(path)
        except AuditError:
            os.close(self._fd)
            raise
        self._lock = threading.Lock()
        self.healthy = True  # False after a failed write, until a write succeeds again

    @property
    def records_written(self) -> int:
        return self._seq

    def append(self, record: dict[str, Any]) -> str:
        """Seal `record` into the chain and write it; returns its hash."""
        with self._lock:
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
            self.healthy = True
            self._seq += 1
            self._prev = digest
            return digest

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_tail(path: Path) -> tuple[int, str]:
    """The seq and hash of the last record, to continue the chain across restarts."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return 0, GENESIS_HASH
        pos, tail = size, b""
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
            if tail.count(b"\n") >= 2 or pos == 0:
                break
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
    return record["seq"], record["hash"]
