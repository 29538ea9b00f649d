"""Decoding of the ``aws-chunked`` body encoding of S3 uploads, as it streams.

boto3 (and the other AWS SDKs) send PutObject / UploadPart bodies over https as
``Content-Encoding: aws-chunked`` with ``x-amz-content-sha256:
STREAMING-UNSIGNED-PAYLOAD-TRAILER``, ``x-amz-decoded-content-length: N`` and
``x-amz-trailer: x-amz-checksum-crc32`` (or another checksum). The body is::

    hex-size[;chunk-signature=SIG]\\r\\n DATA \\r\\n   (repeated)
    0[;chunk-signature=SIG]\\r\\n
    [\\r\\n]                        (signed-trailer form, as in AWS's example)
    name:value\\r\\n ...             (the declared trailers; x-amz-trailer-signature
                                     in the signed-trailer form)
    \\r\\n

The proxy must see the object's bytes (DLP, envelope encryption) and re-signs what it
forwards, so it decodes the body. :class:`AwsChunkedDecoder` is push-based with bounded
memory (one framing line, at most 4 KiB, is buffered; data passes through as slices).
Anything malformed raises :class:`AwsChunkedError` with a reason that never quotes the
body: bad or oversized size lines, data not followed by CRLF, bytes after the end, a total
other than the declared decoded length, undeclared or repeated trailers, too many trailer
lines, a truncated body (at :meth:`~AwsChunkedDecoder.finish`).

Chunk signatures (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]``, and the SigV4a ECDSA
forms) are checked for shape and stripped, not verified: they chain from the client's
request signature, made with credentials the client should not hold and the proxy drops.

The trailing checksum is the client's checksum over what it meant to send: for crc32,
sha1 and sha256 (base64 of the big-endian digest) it is recomputed over the decoded bytes
and a mismatch raises. crc32c and crc64nvme need a library casb does not have (no
``crc32c`` / ``awscrt`` package); they are accepted unverified
(:attr:`~AwsChunkedDecoder.checksum_verified` stays ``None``). The trailer arrives after
the data: a mismatch is raised from the last :meth:`~AwsChunkedDecoder.feed` or from
:meth:`~AwsChunkedDecoder.finish`, after the pieces were handed out, so the caller must
not complete the upstream request when it raises.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import zlib
from typing import Final, Literal, Protocol

MAX_LINE: Final = 4 * 1024
MAX_TRAILER_LINES: Final = 16

UNSIGNED_TRAILER: Final = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
SIGNED: Final = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
SIGNED_TRAILER: Final = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
ECDSA: Final = "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD"
ECDSA_TRAILER: Final = "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER"
MODES: Final = frozenset({UNSIGNED_TRAILER, SIGNED, SIGNED_TRAILER, ECDSA, ECDSA_TRAILER})

CHECKSUM_TRAILERS: Final = frozenset(
    {
        "x-amz-checksum-crc32",
        "x-amz-checksum-crc32c",
        "x-amz-checksum-crc64nvme",
        "x-amz-checksum-sha1",
        "x-amz-checksum-sha256",
    }
)
TRAILER_SIGNATURE: Final = "x-amz-trailer-signature"

_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_HMAC_SIG = re.compile(rb"chunk-signature=[0-9a-f]{64}")
_ECDSA_SIG = re.compile(rb"chunk-signature=[0-9a-f*]{1,144}")
_TRAILER_LINE = re.compile(rb"([A-Za-z0-9\-]{1,64}):[ \t]*([\x21-\x7e]{0,512})[ \t]*")

_State = Literal["size", "data", "data_crlf", "trailers", "done", "failed"]


class AwsChunkedError(Exception):
    """The body is not a well-formed aws-chunked encoding; ``reason`` is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


def _hasher(trailer: str) -> _Hash | None:
    if trailer == "x-amz-checksum-crc32":
        return _Crc32()
    if trailer == "x-amz-checksum-sha1":
        return hashlib.sha1(usedforsecurity=False)
    if trailer == "x-amz-checksum-sha256":
        return hashlib.sha256()
    return None  # crc32c, crc64nvme: no implementation available


def parse_trailer_header(value: str | None) -> tuple[str, ...]:
    """The names an ``x-amz-trailer`` header declares (lower-cased); AwsChunkedError for
    a name that is not an S3 checksum trailer, or a repeated one."""
    if value is None or not value.strip():
        return ()
    names = tuple(part.strip().lower() for part in value.split(","))
    for name in names:
        if name not in CHECKSUM_TRAILERS:
            raise AwsChunkedError("x-amz-trailer declares an unsupported trailer")
    if len(set(names)) != len(names):
        raise AwsChunkedError("x-amz-trailer declares a trailer twice")
    return names


class AwsChunkedDecoder:
    """Push-based aws-chunked decoder; see the module docstring.

    ``declared_length`` is ``x-amz-decoded-content-length``; ``mode`` the request's
    ``x-amz-content-sha256`` (one of :data:`MODES`); ``trailer`` its ``x-amz-trailer``
    header. The constructor raises AwsChunkedError for an unsupported mode or trailer, a
    negative length, or a trailer declared in a mode without trailers.
    """

    def __init__(
        self,
        declared_length: int,
        *,
        mode: str = UNSIGNED_TRAILER,
        trailer: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise AwsChunkedError("unsupported x-amz-content-sha256 for aws-chunked")
        if declared_length < 0:
            raise AwsChunkedError("invalid x-amz-decoded-content-length")
        self.declared_length = declared_length
        self.mode = mode
        self.declared_trailers = parse_trailer_header(trailer)
        self._has_trailer = mode.endswith("-TRAILER")
        if self.declared_trailers and not self._has_trailer:
            raise AwsChunkedError("x-amz-trailer declared for a body without trailers")
        self._signature = (
            None if mode == UNSIGNED_TRAILER else _HMAC_SIG if "HMAC" in mode else _ECDSA_SIG
        )
        self._hashers = {
            name: hasher for name in self.declared_trailers if (hasher := _hasher(name)) is not None
        }
        self._state: _State = "size"
        self._line = bytearray()
        self._remaining = 0  # data bytes left in the current chunk
        self._crlf_left = 0  # bytes of the CRLF after the data still expected
        self._framed = 0  # sum of the chunk sizes announced so far
        self._decoded = 0  # payload bytes handed out so far
        self._trailers: dict[str, str] = {}
        self._trailer_lines = 0
        self._blank_skipped = False
        self._trailer_signature = False
        self.checksum_verified: str | None = None

    @property
    def trailers(self) -> dict[str, str]:
        """The trailers received (lower-cased names; x-amz-trailer-signature excluded)."""
        return dict(self._trailers)

    @property
    def decoded_length(self) -> int:
        """Payload bytes decoded so far."""
        return self._decoded

    @property
    def done(self) -> bool:
        """The whole encoding, trailers included, has been read."""
        return self._state == "done"

    # -- input ------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[bytes]:
        """Decoded payload pieces found in ``data`` (possibly none). ``feed(b"")`` is a
        no-op: the end of the body is :meth:`finish`."""
        if self._state == "failed":
            raise AwsChunkedError("aws-chunked body already failed")
        out: list[bytes] = []
        try:
            self._feed(memoryview(data), out)
        except AwsChunkedError:
            self._state = "failed"
            raise
        return out

    def finish(self) -> list[bytes]:
        """The end of the body: AwsChunkedError unless the encoding ended properly."""
        if self._state == "failed":
            raise AwsChunkedError("aws-chunked body already failed")
        try:
            if self._state == "trailers" and self._blank_skipped and not self._line:
                # "0;chunk-signature=...\r\n\r\n": the body ended without trailer lines.
                self._complete()
        except AwsChunkedError:
            self._state = "failed"
            raise
        if self._state != "done":
            self._state = "failed"
            raise AwsChunkedError("aws-chunked body is truncated")
        return []

    def _feed(self, view: memoryview, out: list[bytes]) -> None:
        pos, size = 0, len(view)
        while pos < size:
            state = self._state
            if state == "data":
                take = min(self._remaining, size - pos)
                piece = bytes(view[pos : pos + take])
                pos += take
                self._remaining -= take
                self._decoded += take
                for hasher in self._hashers.values():
                    hasher.update(piece)
                out.append(piece)
                if self._remaining == 0:
                    self._state = "data_crlf"
                    self._crlf_left = 2
            elif state == "data_crlf":
                expected = b"\r\n"[2 - self._crlf_left]
                if view[pos] != expected:
                    raise AwsChunkedError("chunk data is not followed by CRLF")
                pos += 1
                self._crlf_left -= 1
                if self._crlf_left == 0:
                    self._state = "size"
            elif state in ("size", "trailers"):
                end = self._find_lf(view, pos)
                if end < 0:
                    self._append_line(view[pos:])
                    return
                self._append_line(view[pos : end + 1])
                pos = end + 1
                line = bytes(self._line)
                self._line.clear()
                if not line.endswith(b"\r\n"):
                    raise AwsChunkedError("aws-chunked line does not end with CRLF")
                if state == "size":
                    self._size_line(line[:-2])
                else:
                    self._trailer_line(line[:-2])
            else:  # done
                raise AwsChunkedError("data after the end of the aws-chunked body")

    @staticmethod
    def _find_lf(view: memoryview, start: int) -> int:
        # memoryview has no find(); scan a bounded window so a long line stays cheap.
        window = bytes(view[start : start + MAX_LINE + 1])
        index = window.find(b"\n")
        return -1 if index < 0 else start + index

    def _append_line(self, piece: memoryview) -> None:
        if len(self._line) + len(piece) > MAX_LINE:
            raise AwsChunkedError("aws-chunked line longer than 4 KiB")
        self._line += piece

    # -- framing ----------------------------------------------------------------------

    def _size_line(self, line: bytes) -> None:
        hex_size, sep, extension = line.partition(b";")
        if not _SIZE.fullmatch(hex_size):
            raise AwsChunkedError("invalid chunk size")
        if self._signature is None:
            if sep:
                raise AwsChunkedError("unexpected chunk extension")
        elif not sep or not self._signature.fullmatch(extension):
            raise AwsChunkedError("missing or invalid chunk signature")
        chunk = int(hex_size, 16)
        if self._framed + chunk > self.declared_length:
            raise AwsChunkedError("body longer than x-amz-decoded-content-length")
        if chunk == 0:
            if self._framed != self.declared_length:
                raise AwsChunkedError("body shorter than x-amz-decoded-content-length")
            self._state = "trailers"
            return
        self._framed += chunk
        self._remaining = chunk
        self._state = "data"

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            if (
                self._has_trailer
                and self._signature is not None
                and not self._blank_skipped
                and self._trailer_lines == 0
                and not self._trailer_signature
            ):
                # Either the end ("0;chunk-signature=...\r\n\r\n") or the blank line AWS's
                # signed-trailer example puts before the trailers: finish() or the next
                # line decides.
                self._blank_skipped = True
                return
            self._complete()
            return
        if not self._has_trailer:
            raise AwsChunkedError("data after the end of the aws-chunked body")
        self._trailer_lines += 1
        if self._trailer_lines > MAX_TRAILER_LINES:
            raise AwsChunkedError("too many aws-chunked trailer lines")
        match = _TRAILER_LINE.fullmatch(line)
        if match is None:
            raise AwsChunkedError("malformed aws-chunked trailer")
        name = match.group(1).decode("ascii").lower()
        value = match.group(2).decode("ascii")
        if name == TRAILER_SIGNATURE and self._signature is not None:
            if self._trailer_signature or not self._signature.fullmatch(
                b"chunk-signature=" + match.group(2)
            ):
                raise AwsChunkedError("invalid trailer signature")
            self._trailer_signature = True
            return
        if name not in self.declared_trailers:
            raise AwsChunkedError("trailer not declared in x-amz-trailer")
        if name in self._trailers:
            raise AwsChunkedError("trailer sent twice")
        if self._trailer_signature:
            raise AwsChunkedError("trailer after the trailer signature")
        self._trailers[name] = value

    def _complete(self) -> None:
        missing = [name for name in self.declared_trailers if name not in self._trailers]
        if missing:
            raise AwsChunkedError("declared trailer missing")
        if self._signature is not None and self._has_trailer and not self._trailer_signature:
            raise AwsChunkedError("trailer signature missing")
        self._verify_checksums()
        self._state = "done"

    def _verify_checksums(self) -> None:
        for name, hasher in self._hashers.items():
            try:
                sent = base64.b64decode(self._trailers[name], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise AwsChunkedError("checksum trailer is not base64") from exc
            if not hmac.compare_digest(sent, hasher.digest()):
                raise AwsChunkedError(f"{name} does not match the body")
            self.checksum_verified = name
