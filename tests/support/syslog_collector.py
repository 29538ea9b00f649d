"""A real syslog collector for tests: TCP or TLS on a loopback port, RFC 6587 octet-counted
frames (`MSG-LEN SP MSG`), one thread per connection.

It keeps every message with the number of the connection it came on, can be stopped and
started again on the same port (a collector that goes down and comes back), and can be
told to drop the connection after K more messages: it then resets the connection
(SO_LINGER 0, an RST, as when a collector dies) and throws away whatever else it had
read, like a collector that crashed before handling it. On end of stream it closes its
side cleanly (close_notify first under TLS), as rsyslog and syslog-ng do.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_MAX_LEN_DIGITS = 9  # frames up to 999,999,999 bytes: anything longer is garbage


@dataclass(frozen=True, slots=True)
class Received:
    connection: int  # 1, 2, ... in accept order (across restarts)
    message: bytes


class SyslogCollector:
    def __init__(
        self,
        *,
        tls: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """`tls`: (cert, key) to serve TLS; `client_ca`: require client certificates
        issued by it."""
        self.host, self.port = host, port
        self._ctx: ssl.SSLContext | None = None
        if tls is not None:
            self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            if client_ca is not None:
                self._ctx.verify_mode = ssl.CERT_REQUIRED
                self._ctx.load_verify_locations(str(client_ca))
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._errors: list[str] = []
        self._connections = 0
        self._drops: list[int] = []  # messages to go before each next reset
        self._listener: socket.socket | None = None
        self._waker: tuple[socket.socket, socket.socket] | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # -- control --------------------------------------------------------------------------

    def start(self) -> SyslogCollector:
        """Listen (on the same port as before after a stop())."""
        if self._listener is not None:
            raise RuntimeError("already listening")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._waker = socket.socketpair()
        self._spawn(self._accept_loop, listener, self._waker[0])
        return self

    def stop(self) -> None:
        """Stop listening and reset every open connection (a collector going down)."""
        listener, waker = self._listener, self._waker
        if listener is None or waker is None:
            return
        self._listener = self._waker = None
        waker[1].send(b"x")
        with self._cond:
            self._stopping = True  # the readers see the waker and close with an RST
        for t in self._threads:
            t.join(5)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._threads:
            raise RuntimeError("collector threads did not stop")
        listener.close()
        for s in waker:
            s.close()
        with self._cond:
            self._stopping = False

    def __enter__(self) -> SyslogCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_after(self, *counts: int) -> None:
        """Reset the connection that brings the K-th message from now; with more
        counts, then the one that brings the K2-th message after that, and so on."""
        if not all(k >= 1 for k in counts):
            raise ValueError("counts must be at least 1")
        with self._cond:
            self._drops.extend(counts)

    @property
    def drops_pending(self) -> int:
        with self._cond:
            return len(self._drops)

    # -- results --------------------------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    @property
    def errors(self) -> list[str]:
        """Framing errors and failed TLS handshakes, as the collector saw them."""
        with self._cond:
            return list(self._errors)

    @property
    def connections(self) -> int:
        with self._cond:
            return self._connections

    def wait_for(self, predicate: Callable[[SyslogCollector], bool], timeout: float = 10) -> None:
        """Wait until predicate(self) holds (re-checked on every message, error and
        connection); AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"collector: condition not met in {timeout}s "
                        f"({len(self._messages)} messages, {self._connections} connections, "
                        f"errors {self._errors[-3:]})"
                    )
                self._cond.wait(remaining)

    # -- server ---------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self, listener: socket.socket, waker: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([listener, waker], [], [])
            if waker in ready:
                return
            conn, _ = listener.accept()
            with self._cond:
                self._connections += 1
                number = self._connections
                self._cond.notify_all()
            self._spawn(self._serve, conn, number, waker)

    def _serve(self, conn: socket.socket, number: int, waker: socket.socket) -> None:
        sock = conn
        try:
            if self._ctx is not None:
                conn.settimeout(5)
                try:
                    sock = self._ctx.wrap_socket(conn, server_side=True)
                except OSError as exc:
                    self._error(f"handshake: {exc}")
                    return
            sock.setblocking(False)
            self._read_frames(sock, number, waker)
        finally:
            if self._stopping:
                _reset(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _read_frames(self, sock: socket.socket, number: int, waker: socket.socket) -> None:
        buf = b""
        while True:
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                ready, _, _ = select.select([sock, waker], [], [])
                if waker in ready:
                    return  # stop(): drop everything, as a crash would
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                continue  # readable, but not a whole TLS record yet
            except OSError:
                return  # reset by the peer
            if not data:
                break
            buf += data
            while True:
                parsed = _next_frame(buf)
                if parsed is None:
                    break
                if isinstance(parsed, str):
                    self._error(parsed)
                    _reset(sock)
                    return
                message, buf = parsed
                if self._store(number, message):
                    _reset(sock)
                    return
        if buf:
            self._error(f"connection {number} ended inside a frame ({len(buf)} bytes)")
        if isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                sock.setblocking(True)
                sock.settimeout(5)
                sock.unwrap()

    def _store(self, number: int, message: bytes) -> bool:
        """Keep the message; True when the connection is to be dropped now."""
        with self._cond:
            self._messages.append(Received(number, message))
            drop = False
            if self._drops:
                self._drops[0] -= 1
                if self._drops[0] == 0:
                    self._drops.pop(0)
                    drop = True
            self._cond.notify_all()
            return drop

    def _error(self, text: str) -> None:
        with self._cond:
            self._errors.append(text)
            self._cond.notify_all()


def _next_frame(buf: bytes) -> tuple[bytes, bytes] | str | None:
    """(message, rest) for a whole frame at the start of buf; None when more bytes are
    needed; an error string when buf does not start with `MSG-LEN SP`."""
    space = buf.find(b" ", 0, _MAX_LEN_DIGITS + 1)
    if space < 0:
        if len(buf) > _MAX_LEN_DIGITS or not buf.isdigit():
            return "bad frame: no MSG-LEN" if buf else None
        return None
    digits = buf[:space]
    if not digits.isdigit() or digits.startswith(b"0"):
        return "bad frame: MSG-LEN is not a positive decimal"
    end = space + 1 + int(digits)
    if len(buf) < end:
        return None
    return buf[space + 1 : end], buf[end:]


def _reset(sock: socket.socket) -> None:
    """Close with an RST (what a crash or an abort does), not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        socket.socket.close(sock)
