"""Forward the audit log to a syslog collector: RFC 5424 messages over TCP or TLS, framed
by RFC 6587 octet counting (`MSG-LEN SP SYSLOG-MSG`). The audit log itself is the spool.

Why sessions. Plain syslog has no acknowledgements, and a successful send(2) only means
the local kernel took the bytes: advancing on it loses up to a socket buffer (megabytes)
whenever a collector goes away. So records travel in *sessions*: connect, send batches
(up to 500 records or 1 MiB each) while there are records to send, then end the stream
(TLS close_notify, TCP FIN) and wait for the collector to close its side. A session is
*confirmed* when the collector closed cleanly (FIN, not RST: Linux resets instead when a
socket is closed with unread data, or when data arrives after the close) and the kernel
reports none of our bytes unacknowledged (SIOCOUTQ, Linux; skipped where unsupported).
Only then does the cursor advance, to the session's last record, and it is persisted
(temp file + fsync + rename). A session ends after `session_records` records,
`session_seconds`, or `linger` seconds without new records: confirmation lags delivery
by up to session_seconds + linger, and a collector sees one connection per session.

Delivery guarantee, precisely: at-least-once up to the collector's read(2). Every record
is sent until a session carrying it is confirmed; a failed session (refused, reset, timed
out, not confirmed) is sent again from the cursor, in order, after an exponential backoff
(`retry_initial` .. `retry_max`). So the collector may receive a record more than once,
only records after the last persisted cursor, and only from a session that was not
confirmed; it de-duplicates on the record's seq and hash (carried in the structured
data). What a collector loses *after* reading (a crash before its own commit) no plain
syslog sender can see. Records are never skipped, except those `format_message` returns
None for; a line that is not a chain record (invalid JSON, no integer "seq" or string
"hash", seq not increasing) or that `format_message` fails on halts forwarding at that
line (fail closed: `last_error` says where; `casb audit verify` says why), after
everything before it was delivered.

Resume: the cursor file holds the last confirmed record's seq, hash and byte offsets. On
start the line at those offsets must be that record; else the file is scanned for it.
If the record is not in the file (the log was replaced or truncated: a new chain), the
forwarder logs a warning and replays the file from its start: a duplicate is visible and
harmless (the hash tells it apart), a gap is neither. If the audit log is replaced while
running (rename + new file), the old file is delivered to its end first, then the new one
from its start.

Reading the log (whole lines, replacement, parsing a record's seq and hash) is tail.py,
shared with the Redis audit stream shipper (stream.py).

Nothing here logs or reports record contents: only seq numbers, offsets and errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import ssl
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casb.audit.syslog import octet_frame
from casb.audit.tail import START, AuditFile, BadRecord, Cursor, parse_record
from casb.config import SyslogSink

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # TCP connect + TLS handshake
IO_TIMEOUT = 10.0  # one blocked send: a collector that stops reading fails the session
CONFIRM_TIMEOUT = 5.0  # for the collector to close its side after our end of stream
POLL_INTERVAL = 1.0  # the file is checked at least this often, notify() or not
BATCH_RECORDS = 500
BATCH_BYTES = 1 << 20
_MAX_ERROR = 200

MessageFormatter = Callable[[dict[str, Any]], bytes | None]


class ForwarderError(Exception):
    """The syslog sink cannot be set up (unreadable CA bundle or client certificate)."""


class _Unconfirmed(Exception):
    """The collector did not confirm a session: its records are sent again."""


def tls_context(sink: SyslogSink) -> ssl.SSLContext:
    """Verify the collector against `ca_bundle` (the system CAs without one), hostname
    checked, TLS 1.2 or later; present the client certificate when configured."""
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=None if sink.ca_bundle is None else str(sink.ca_bundle),
        )
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if sink.client_cert_file is not None and sink.client_key_file is not None:
            ctx.load_cert_chain(str(sink.client_cert_file), str(sink.client_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ForwarderError(f"syslog sink TLS setup failed: {exc}") from exc
    return ctx


def _short(exc: BaseException) -> str:
    """An error for last_error and logs: the type and the OS/TLS message, never data."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:_MAX_ERROR]


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes we sent that the peer's TCP has not acknowledged (0 where not supported)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _save_cursor(path: Path, cursor: Cursor) -> None:
    """Atomically replace the cursor file: write a temp file, fsync it, rename it over."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, cursor.to_json())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable where directories sync
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass(frozen=True, slots=True)
class _Entry:
    at: Cursor
    frame: bytes | None  # None: format_message skipped the record


class AuditForwarder:
    """Copies the audit log to one syslog collector from a daemon thread (see the module
    docstring for the delivery guarantee). start() once, notify() after each append,
    stop() at shutdown; the properties are for health and metrics."""

    def __init__(
        self,
        sink: SyslogSink,
        audit_path: Path,
        format_message: MessageFormatter,
        *,
        cursor_path: Path | None = None,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        session_records: int = 10_000,
        session_seconds: float = 5.0,
        linger: float = 0.5,
    ) -> None:
        if not 0 < retry_initial <= retry_max:
            raise ValueError("need 0 < retry_initial <= retry_max")
        self._sink = sink
        self._format = format_message
        self._tls = tls_context(sink) if sink.transport == "tls" else None
        self._cursor_path = cursor_path or sink.cursor_file or Path(f"{audit_path}.syslog-cursor")
        self._retry_initial, self._retry_max = retry_initial, retry_max
        self._session_records, self._session_seconds = session_records, session_seconds
        self._linger = linger
        self._file = AuditFile(audit_path)
        self._cursor = START  # last confirmed record
        self._sent_seq = 0  # last record handed to a connection
        self._parsed_seq = 0  # last record read from the file
        self._last_seen = 0  # seq of the file's last whole line
        self._seen_size = -1
        self._ahead: deque[_Entry] = deque()
        self._ahead_bytes = 0
        self._backoff = retry_initial
        self._next_attempt = 0.0
        self._failures = 0
        self._conn_error: str | None = None
        self._blocked_error: str | None = None  # set: a bad line stops reading
        self._persist_error: str | None = None
        self._sock: socket.socket | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._aborted = False  # stop() cut the connection: nothing on it is confirmed
        self._failed_while_stopping = False  # stop() drains once, it does not retry
        self._stop_deadline = float("inf")
        self._thread: threading.Thread | None = None

    # -- status (read from other threads; each a single attribute read) ------------------

    @property
    def delivered_seq(self) -> int:
        """The seq of the last record a collector confirmed."""
        return self._cursor.seq

    @property
    def sent_seq(self) -> int:
        """The seq of the last record sent (confirmed or not)."""
        return self._sent_seq

    @property
    def lag(self) -> int:
        """Records in the audit log not yet confirmed by the collector."""
        return max(0, max(self._last_seen, self._parsed_seq) - self._cursor.seq)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def running(self) -> bool:
        """Whether the forwarding thread is alive (started and not stopped)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def last_error(self) -> str | None:
        """Why forwarding is failing or halted (None when it is not); never record data."""
        return self._conn_error or self._blocked_error or self._persist_error

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("an AuditForwarder is started once")
        self._thread = threading.Thread(target=self._run, name="casb-syslog", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New records were appended: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered (and confirmed) within `timeout`, then close.
        Unconfirmed records stay after the cursor and are sent by the next start."""
        thread = self._thread
        if thread is None:
            return
        self._stop_deadline = time.monotonic() + max(0.0, timeout)
        self._stopping.set()
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():  # blocked in a send or a wait for the collector: cut it
            self._aborted = True
            sock = self._sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
            thread.join(1.0)

    # -- the forwarding thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._resume()
            while True:
                self._refresh()
                self._fill()
                self._pass_skipped()
                if self._stopping.is_set() and (
                    not self._ahead
                    or self._failed_while_stopping
                    or max(time.monotonic(), self._next_attempt) >= self._stop_deadline
                ):
                    return
                if not self._ahead:
                    self._wait(POLL_INTERVAL)
                    continue
                delay = self._next_attempt - time.monotonic()
                if delay > 0:
                    self._wait(min(delay, POLL_INTERVAL))
                    continue
                self._attempt()
        except Exception as exc:  # a bug: report it rather than die silently
            self._conn_error = f"forwarder stopped: {_short(exc)}"
            log.exception("syslog forwarder stopped")
        finally:
            self._file.close()

    def _wait(self, seconds: float) -> None:
        if self._stopping.is_set():
            seconds = min(seconds, max(0.0, self._stop_deadline - time.monotonic()))
        self._wake.wait(seconds)
        self._wake.clear()

    def _remaining(self, limit: float) -> float:
        """`limit` seconds, or less if stop()'s deadline comes first."""
        if self._stopping.is_set():
            return max(0.0, min(limit, self._stop_deadline - time.monotonic()))
        return limit

    # -- reading the audit log -----------------------------------------------------------

    def _resume(self) -> None:
        """Position after the cursor's record, or at the start if it is not in the file."""
        saved = self._load_cursor()
        if saved.seq == 0 or not self._file.open():
            if saved.seq:
                log.warning(
                    "audit log %s is missing but the syslog cursor names seq %d: "
                    "forwarding the new log from its start",
                    self._file.path,
                    saved.seq,
                )
            return
        found = self._at(saved) or self._scan_for(saved)
        if found is None:
            self._file.seek(0)
            log.warning(
                "syslog cursor seq %d is not in %s (the log was replaced or truncated): "
                "replaying it from the start; the collector may see duplicates",
                saved.seq,
                self._file.path,
            )
            return
        self._cursor = found
        self._sent_seq = self._parsed_seq = found.seq
        self._file.seek(found.end)
        if found != saved:  # same record, moved: remember where it is now
            self._persist(found)
        log.info("syslog forwarding resumes after seq %d", found.seq)

    def _load_cursor(self) -> Cursor:
        try:
            return Cursor.from_json(self._cursor_path.read_bytes())
        except FileNotFoundError:
            return START
        except (OSError, ValueError) as exc:
            log.warning(
                "syslog cursor %s is unreadable (%s): forwarding from the start of the log",
                self._cursor_path,
                _short(exc),
            )
            return START

    def _at(self, saved: Cursor) -> Cursor | None:
        """The saved cursor, if its offsets still hold that record."""
        line = self._file.read_at(saved.start, saved.end)
        if len(line) != saved.end - saved.start or not line.endswith(b"\n"):
            return None
        try:
            record = parse_record(line)
        except BadRecord:
            return None
        return saved if (record["seq"], record["hash"]) == (saved.seq, saved.hash) else None

    def _scan_for(self, saved: Cursor) -> Cursor | None:
        """Find the saved record by seq and hash, reading the file from the start."""
        self._file.seek(0)
        while (item := self._file.next_line()) is not None:
            start, line = item
            try:
                record = parse_record(line)
            except BadRecord:
                return None
            if record["seq"] >= saved.seq:
                if (record["seq"], record["hash"]) != (saved.seq, saved.hash):
                    return None
                return Cursor(saved.seq, saved.hash, start, start + len(line))
        return None

    def _refresh(self) -> None:
        """Open the log once it exists; follow a replacement or a truncation; note the
        last seq in the file for `lag`. Runs between sessions only."""
        if not self._file.open():
            return
        size = self._file.size()
        pos = self._file.pos
        if size < max(pos, self._cursor.end):
            log.warning(
                "audit log %s shrank below what was read (delivered through seq %d): "
                "replaying it from the start",
                self._file.path,
                self._cursor.seq,
            )
            self._restart_file(reopen=False)
            size = self._file.size()
        elif not self._ahead and self._cursor.end == pos and self._file.replaced():
            # Everything read from the old file is confirmed; what is left of it, if
            # anything, is a partial or bad line that can never be sent.
            log.warning(
                "audit log %s was replaced: delivered the old file through seq %d "
                "(%d bytes after it unsendable), forwarding the new one from its start",
                self._file.path,
                self._cursor.seq,
                size - pos,
            )
            self._restart_file(reopen=True)
            if not self._file.is_open:
                return
            size = self._file.size()
        if size != self._seen_size:
            self._seen_size = size
            last = self._file.last_seq(size)
            if last is not None:
                self._last_seen = last

    def _restart_file(self, *, reopen: bool) -> None:
        if reopen:
            self._file.reopen()
        self._file.seek(0)
        self._ahead.clear()
        self._ahead_bytes = 0
        self._blocked_error = None
        self._cursor = START
        self._sent_seq = self._parsed_seq = self._last_seen = 0
        self._seen_size = -1
        self._persist(START)

    def _fill(self) -> None:
        """Read whole lines into the queue of records to send, up to one batch ahead."""
        if not self._file.is_open or self._blocked_error is not None:
            return
        while len(self._ahead) < BATCH_RECORDS and self._ahead_bytes < BATCH_BYTES:
            item = self._file.next_line()
            if item is None:
                return
            start, line = item
            try:
                entry = self._entry(start, line)
            except BadRecord as exc:
                self._file.seek(start)  # stay on the bad line: nothing after it is sent
                self._blocked_error = f"forwarding halted at byte {start} of the audit log: {exc}"
                log.error(
                    "syslog forwarding halted at byte %d of %s (after seq %d): %s; "
                    "run `casb audit verify` on it",
                    start,
                    self._file.path,
                    self._parsed_seq,
                    exc,
                )
                return
            self._ahead.append(entry)
            self._ahead_bytes += len(entry.frame or b"")
            self._parsed_seq = entry.at.seq

    def _entry(self, start: int, line: bytes) -> _Entry:
        record = parse_record(line)
        seq = record["seq"]
        if seq <= self._parsed_seq:
            raise BadRecord(f"seq {seq} does not follow seq {self._parsed_seq}")
        at = Cursor(seq, record["hash"], start, start + len(line))
        try:
            message = self._format(record)
        except Exception as exc:  # the formatter's message could quote the record
            raise BadRecord(f"format_message failed on seq {seq}: {type(exc).__name__}") from None
        if message is None:
            return _Entry(at, None)
        if not message:
            raise BadRecord(f"format_message returned an empty message for seq {seq}")
        return _Entry(at, octet_frame(message))

    def _take_batch(self) -> list[_Entry]:
        self._fill()
        batch: list[_Entry] = []
        size = 0
        while self._ahead and len(batch) < BATCH_RECORDS:
            nbytes = len(self._ahead[0].frame or b"")
            if batch and size + nbytes > BATCH_BYTES:
                break
            batch.append(self._ahead.popleft())
            size += nbytes
            self._ahead_bytes -= nbytes
            if not self._ahead:
                self._fill()
        return batch

    def _pass_skipped(self) -> None:
        """Records format_message skips need no collector: confirm leading ones at once."""
        last = None
        while self._ahead and self._ahead[0].frame is None:
            last = self._ahead.popleft().at
        if last is not None:
            self._sent_seq = max(self._sent_seq, last.seq)
            self._advance(last)

    # -- sessions ------------------------------------------------------------------------

    def _attempt(self) -> None:
        try:
            self._session()
        except (OSError, _Unconfirmed) as exc:
            self._failed(exc)
            return
        if self._failures:
            log.info(
                "syslog collector reachable again: delivered through seq %d", self.delivered_seq
            )
        self._failures = 0
        self._backoff = self._retry_initial
        self._conn_error = None

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        self._failed_while_stopping = self._stopping.is_set()
        self._conn_error = _short(exc)
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(
            level,
            "syslog delivery failed (%s); resending after seq %d in %.1fs",
            self._conn_error,
            self._cursor.seq,
            self._backoff,
        )
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._retry_max)
        # Rewind to the cursor: everything after it is read and sent again.
        self._file.seek(self._cursor.end)
        self._ahead.clear()
        self._ahead_bytes = 0
        self._blocked_error = None
        self._parsed_seq = self._sent_seq = self._cursor.seq

    def _session(self) -> None:
        sock = self._connect()
        self._sock = sock
        try:
            began, count = time.monotonic(), 0
            last: Cursor | None = None
            while True:
                batch = self._take_batch()
                if batch:
                    data = b"".join(e.frame for e in batch if e.frame is not None)
                    if data:
                        sock.sendall(data)
                    last = batch[-1].at
                    self._sent_seq = last.seq
                    count += len(batch)
                    if (
                        count >= self._session_records
                        or time.monotonic() - began >= self._session_seconds
                        or (self._stopping.is_set() and time.monotonic() >= self._stop_deadline)
                    ):
                        break
                elif not self._more_within_linger():
                    break
            if last is None:
                return
            self._confirm(sock)
            self._advance(last)
        finally:
            self._sock = None
            with contextlib.suppress(OSError):
                sock.close()

    def _more_within_linger(self) -> bool:
        """Wait up to `linger` for more records (not when stopping: drain and close)."""
        end = time.monotonic() + self._linger
        while not self._stopping.is_set():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            self._wait(remaining)
            self._fill()
            if self._ahead:
                return True
        return False

    def _connect(self) -> socket.socket:
        host, port = self._sink.host, self._sink.port
        timeout = max(0.05, self._remaining(CONNECT_TIMEOUT))
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            sock = raw if self._tls is None else self._tls.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        sock.settimeout(IO_TIMEOUT)
        return sock

    def _confirm(self, sock: socket.socket) -> None:
        """End our stream and wait for the collector to close cleanly after reading it
        all (see the module docstring); _Unconfirmed or OSError if it did not."""
        deadline = time.monotonic() + max(0.05, self._remaining(CONFIRM_TIMEOUT))
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        if isinstance(sock, ssl.SSLSocket):
            # close_notify, then the collector's; one that closes without sending it
            # is judged by the TCP close below.
            with contextlib.suppress(ssl.SSLEOFError, ssl.SSLZeroReturnError):
                sock.unwrap()
        sock.shutdown(socket.SHUT_WR)  # for TLS this also drops the TLS layer: raw reads
        discarded = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Unconfirmed("the collector did not close the connection in time")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                raise _Unconfirmed("the collector reset the connection: not confirmed") from None
            if not data:
                break
            discarded += len(data)  # a collector has nothing to say; ignore it
            if discarded > 1 << 20:
                raise _Unconfirmed("the collector sent data instead of closing")
        if self._aborted:  # our own shutdown ended the wait, not the collector
            raise _Unconfirmed("stopped before the collector confirmed")
        while (unacked := _unacknowledged(sock)) > 0:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise _Unconfirmed(f"the connection failed: {os.strerror(err)}")
            if time.monotonic() >= deadline:
                raise _Unconfirmed(f"{unacked} bytes unacknowledged when the collector closed")
            time.sleep(0.005)  # the ACK of our FIN is in flight on a connection now closed
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise _Unconfirmed(f"the connection failed: {os.strerror(err)}")

    def _advance(self, cursor: Cursor) -> None:
        self._persist(cursor)  # first: delivered_seq never runs ahead of the file
        self._cursor = cursor
        log.debug("syslog delivered through seq %d", cursor.seq)

    def _persist(self, cursor: Cursor) -> None:
        try:
            _save_cursor(self._cursor_path, cursor)
        except OSError as exc:  # delivered all the same; a restart would send them again
            self._persist_error = f"cannot save the syslog cursor: {_short(exc)}"
            log.error("cannot save syslog cursor %s: %s", self._cursor_path, _short(exc))
            return
        self._persist_error = None
