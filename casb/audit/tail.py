"""Read the audit log as it grows: whole lines from a byte offset, each parsed as a chain
record (seq and hash), for the consumers that copy it elsewhere (the syslog forwarder,
forwarder.py, and the Redis audit stream shipper, stream.py).

The log is appended one whole line per record (log.py), so a reader sees at worst a
partial last line, which waits until its newline is written. A reader also notices when
the path names another file than the one it has open (the log was replaced: rotated or
moved aside and a new chain started) and can find a record by seq without reading the
whole file (seq increases with the byte offset).

Nothing here returns or reports record contents in errors: only offsets and seq numbers.
Blocking file I/O: asyncio callers run it in a worker thread.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casb.audit.chain import GENESIS_HASH

_READ_CHUNK = 256 * 1024
_TAIL_CHUNK = 64 * 1024
_BISECT_UNTIL = 64 * 1024  # below this span, seek_after() reads lines one by one


class BadRecord(Exception):
    """A line of the audit log is not a chain record (the message names no content)."""


def parse_record(line: bytes) -> dict[str, Any]:
    """One JSONL line as a chain record: a JSON object with a positive integer "seq" and
    a string "hash". BadRecord (naming no content) if it is not one. The hash is not
    verified here (`casb audit verify` does that)."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BadRecord("not valid JSON") from None
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise BadRecord("no positive integer seq")
    if not isinstance(record.get("hash"), str):
        raise BadRecord("no hash")
    return record


@dataclass(frozen=True, slots=True)
class Cursor:
    """A record's place in the audit log: its seq and hash, and the byte offsets of its
    line (start, end: end is just past the newline)."""

    seq: int
    hash: str
    start: int
    end: int

    def to_json(self) -> bytes:
        body = {"seq": self.seq, "hash": self.hash, "start": self.start, "end": self.end}
        return json.dumps(body, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Cursor:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        seq, start, end = (_count(data.get(k)) for k in ("seq", "start", "end"))
        digest = data.get("hash")
        if not isinstance(digest, str) or start > end:
            raise ValueError("bad hash or offsets")
        return cls(seq, digest, start, end)


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("seq, start and end must be non-negative integers")
    return value


START = Cursor(0, GENESIS_HASH, 0, 0)  # nothing read yet: the beginning of the file


class AuditFile:
    """Reads whole lines of the audit log from a byte offset; a partial last line waits
    until its newline is written. One thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._pos = 0  # file offset of the next unread line
        self._buf = b""  # bytes read from the file; _buf[_at] is at file offset _pos
        self._at = 0

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    @property
    def pos(self) -> int:
        """The offset of the next line next_line() returns."""
        return self._pos

    def open(self) -> bool:
        """Open the file if it is not open (positioned at its start); False if it does
        not exist (yet)."""
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return False
            self.seek(0)
        return True

    def reopen(self) -> bool:
        """Close the file and open whatever the path names now, at its start."""
        self.close()
        return self.open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def seek(self, offset: int) -> None:
        """Read from `offset` next (a line start)."""
        self._pos, self._buf, self._at = offset, b"", 0

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def next_line(self) -> tuple[int, bytes] | None:
        """(start offset, line with its newline), or None until a whole line is there."""
        while True:
            nl = self._buf.find(b"\n", self._at)
            if nl >= 0:
                start, line = self._pos, self._buf[self._at : nl + 1]
                self._pos, self._at = start + len(line), nl + 1
                return start, line
            pending = self._buf[self._at :]
            more = os.pread(self._fd, _READ_CHUNK, self._pos + len(pending))
            if not more:
                return None
            self._buf, self._at = pending + more, 0

    def read_at(self, start: int, end: int) -> bytes:
        return os.pread(self._fd, end - start, start)

    def replaced(self) -> bool:
        """Whether the path now names another file than the one open (rotation)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False  # moved away, no new file yet: keep reading the old one
        mine = os.fstat(self._fd)
        return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)

    def last_seq(self, size: int) -> int | None:
        """The seq of the last whole line (for `lag`), reading backwards from the end."""
        pos, tail = size, b""
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            tail = os.pread(self._fd, step, pos) + tail
            end = tail.rfind(b"\n")
            if end >= 0 and (pos == 0 or tail.rfind(b"\n", 0, end) >= 0):
                break
        end = tail.rfind(b"\n")
        if end < 0:
            return None
        try:
            return int(parse_record(tail[tail.rfind(b"\n", 0, end) + 1 : end + 1])["seq"])
        except BadRecord:
            return None

    def first_record(self) -> tuple[int, str] | None:
        """The seq and hash of the file's first line, None until it is whole; BadRecord
        if it is not a chain record. Does not move the read position."""
        item = self._line_from(0)
        if item is None:
            return None
        record = parse_record(item[1])
        return int(record["seq"]), str(record["hash"])

    def seek_after(self, seq: int) -> None:
        """Position at the first whole line whose record's seq is above `seq` (at the end
        of the whole lines if there is none): halves the file by byte offset while the
        span is large (seq increases with the offset), then reads line by line. A line
        that is not a record stops the search there, so the reader reports it."""
        lo, hi = 0, self.size()
        # lo is a line start and every line before it has a seq <= `seq`.
        while hi - lo > _BISECT_UNTIL:
            mid = (lo + hi) // 2
            item = self._line_from(mid)
            if item is None or item[0] >= hi:
                hi = mid
                continue
            start, line = item
            try:
                probe = parse_record(line)["seq"]
            except BadRecord:
                break
            if probe <= seq:
                lo = start + len(line)
            else:
                hi = mid
        self.seek(lo)
        while (item := self.next_line()) is not None:
            start, line = item
            try:
                above = parse_record(line)["seq"] > seq
            except BadRecord:
                above = True
            if above:
                self.seek(start)
                return

    def _line_from(self, offset: int) -> tuple[int, bytes] | None:
        """The first whole line starting at or after `offset` (offset 0 is a line start;
        elsewhere the line starts after the next newline at or after offset - 1)."""
        start = 0
        if offset > 0:
            at = offset - 1
            while True:
                chunk = os.pread(self._fd, _TAIL_CHUNK, at)
                if not chunk:
                    return None
                nl = chunk.find(b"\n")
                if nl >= 0:
                    start = at + nl + 1
                    break
                at += len(chunk)
        line = b""
        while True:
            chunk = os.pread(self._fd, _TAIL_CHUNK, start + len(line))
            if not chunk:
                return None
            nl = chunk.find(b"\n")
            if nl >= 0:
                return start, line + chunk[: nl + 1]
            line += chunk
