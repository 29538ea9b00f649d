"""What the edge does to an object-store request and response for envelope encryption:
the header changes and the body transform. Pure code (no mitmproxy): the addon applies
the returned changes and runs the transforms on the streamed bodies.

Upload: the plaintext length comes from Content-Length (or, for an aws-chunked body,
x-amz-decoded-content-length); the body is decoded from aws-chunked if need be and
sealed chunk by chunk; the forwarded request carries the ciphertext length and the
envelope metadata, and loses every header computed over the plaintext (Content-MD5,
x-amz-checksum-*, Azure's MD5/CRC64), which would no longer match or would leak a
digest of the plaintext.

Download: a Range (S3/GCS `Range`, Azure `x-ms-range`) is translated to the ciphertext
chunks covering it (with the destination's chunk size; a suffix range fetches the whole
object); the response's metadata gives the wrapped key; only authenticated plaintext
comes out; the client sees the plaintext length, Content-Range and no envelope
metadata or checksums of the ciphertext.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from casb.encryption.envelope import (
    TAG_BYTES,
    EnvelopeError,
    EnvelopeHeader,
    IntegrityError,
    Opener,
    ciphertext_length,
    new_object,
    open_object,
    open_range,
    parse_range,
    plaintext_range,
)
from casb.encryption.envelope_ops import META_PREFIX, meta_name
from casb.exchange import EnvelopeSpec
from casb.objectstore.aws_chunked import AwsChunkedDecoder, AwsChunkedError

Transform = Callable[[bytes], list[bytes]]  # b"" = end of body; raises on failure

# Computed over the plaintext by the client: wrong for the ciphertext, and a digest of
# the plaintext must not be stored next to it.
_PLAINTEXT_DIGESTS = (
    "content-md5",
    "x-amz-sdk-checksum-algorithm",
    "x-amz-trailer",
    "x-amz-decoded-content-length",
    "x-ms-content-crc64",
    "x-ms-blob-content-md5",
    "x-goog-hash",
)
_CHECKSUM_PREFIX = "x-amz-checksum-"
_RANGE_HEADERS = {"s3": "range", "gcs": "range", "azure_blob": "x-ms-range"}
_COALESCE = 64 * 1024
_BYTES_RANGE = re.compile(r"bytes=([0-9]{1,19})-([0-9]{0,19})")


class EnvelopeRefused(Exception):
    """The request cannot be served with envelope encryption: `status` and a reason safe
    to show the client."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


@dataclass(slots=True)
class HeaderChanges:
    remove: list[str] = field(default_factory=list)  # lower-case names
    set: list[tuple[str, str]] = field(default_factory=list)
    status: int | None = None


def _get(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


def _one(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    values = _get(headers, name)
    if len(values) > 1:
        raise EnvelopeRefused(400, "bad_request", f"more than one {name} header")
    return values[0].strip() if values else None


def _length(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise EnvelopeRefused(400, "bad_request", f"invalid {name} header")
    return int(value)


def is_aws_chunked(headers: Sequence[tuple[str, str]]) -> bool:
    """Is the body aws-chunked framed? S3 reads the framing from x-amz-content-sha256
    (STREAMING-...), with or without Content-Encoding: aws-chunked; so does casb."""
    codings = ",".join(_get(headers, "content-encoding")).lower()
    if "aws-chunked" in (c.strip() for c in codings.split(",")):
        return True
    return any(
        v.strip().upper().startswith("STREAMING-") for v in _get(headers, "x-amz-content-sha256")
    )


def aws_chunked_decoder(headers: Sequence[tuple[str, str]]) -> AwsChunkedDecoder:
    """The decoder for an aws-chunked request body (EnvelopeRefused if it is malformed)."""
    declared = _length(
        _one(headers, "x-amz-decoded-content-length"), "x-amz-decoded-content-length"
    )
    if declared is None:
        raise EnvelopeRefused(
            411, "length_required", "an aws-chunked body needs x-amz-decoded-content-length"
        )
    try:
        return AwsChunkedDecoder(
            declared,
            mode=_one(headers, "x-amz-content-sha256") or "",
            trailer=_one(headers, "x-amz-trailer"),
        )
    except AwsChunkedError as exc:
        raise EnvelopeRefused(400, "bad_request", exc.reason) from None


def decoded_body_headers(headers: Sequence[tuple[str, str]]) -> HeaderChanges:
    """Header changes when an aws-chunked body is forwarded decoded (plain bytes)."""
    changes = HeaderChanges(
        remove=[
            "x-amz-decoded-content-length",
            "x-amz-trailer",
            "x-amz-sdk-checksum-algorithm",
            "content-encoding",
        ]
    )
    rest = [
        c.strip()
        for v in _get(headers, "content-encoding")
        for c in v.split(",")
        if c.strip() and c.strip().lower() != "aws-chunked"
    ]
    if rest:
        changes.set.append(("Content-Encoding", ", ".join(rest)))
    return changes


@dataclass(slots=True)
class UploadPlan:
    header: EnvelopeHeader
    changes: HeaderChanges
    transform: Transform


def plan_upload(kind: str, headers: Sequence[tuple[str, str]], spec: EnvelopeSpec) -> UploadPlan:
    """Seal the request body: header changes and the body transform."""
    chunked = is_aws_chunked(headers)
    decoder = aws_chunked_decoder(headers) if chunked else None
    length = (
        decoder.declared_length
        if decoder is not None
        else _length(_one(headers, "content-length"), "Content-Length")
    )
    if length is None:
        raise EnvelopeRefused(
            411,
            "length_required",
            "envelope-encrypted uploads need a Content-Length (the ciphertext length is "
            "computed from it)",
        )
    header, sealer = new_object(spec.keys, length, spec.chunk_bytes)
    changes = decoded_body_headers(headers) if chunked else HeaderChanges()
    changes.remove += [
        *_PLAINTEXT_DIGESTS,
        "x-amz-content-sha256",  # the client's hash of the plaintext (the proxy signs anew)
        *(n.lower() for n, _ in headers if n.lower().startswith(_CHECKSUM_PREFIX)),
        "transfer-encoding",
    ]
    # the client must not plant its own envelope metadata next to ours
    prefix = META_PREFIX[kind]
    changes.remove += [
        n.lower()
        for n, _ in headers
        if n.lower().startswith(prefix) and n.lower()[len(prefix) :].startswith("casb")
    ]
    changes.set += [(meta_name(kind, k), v) for k, v in header.to_metadata().items()]
    changes.set.append(("Content-Length", str(ciphertext_length(length, spec.chunk_bytes))))

    held: list[bytes] = []
    pending = bytearray()
    fed = 0

    def to_sealer(piece: bytes) -> list[bytes]:
        # The network hands over pieces of a few KiB and sealing costs per call: small
        # pieces are gathered to _COALESCE bytes (bounded memory), and flushed as soon
        # as the declared length is complete.
        nonlocal fed
        fed += len(piece)
        if fed > length:
            return sealer.feed(bytes(pending) + piece)  # raises: longer than declared
        if not pending and (len(piece) >= _COALESCE or fed == length):
            return sealer.feed(piece)
        pending.extend(piece)
        if len(pending) < _COALESCE and fed < length:
            return []
        gathered = bytes(pending)
        pending.clear()
        return sealer.feed(gathered)

    def finish() -> list[bytes]:
        out = sealer.feed(bytes(pending)) if pending else []
        pending.clear()
        return out + sealer.finish()

    def seal(data: bytes) -> list[bytes]:
        if decoder is None:
            return to_sealer(data) if data else finish()
        out: list[bytes] = []
        for piece in decoder.feed(data) if data else decoder.finish():
            out += to_sealer(piece)
        return out if data else out + finish()

    def transform(data: bytes) -> list[bytes]:
        # The latest sealed chunk is held back until the body ended well (length and
        # the client's checksum trailer checked): the store never gets a complete
        # object from a body that fails at its very end.
        out = seal(data)
        if not data:
            out, held[:] = [*held, *out], []
            return out
        if out:
            out, held[:] = [*held, *out[:-1]], out[-1:]
        return out

    return UploadPlan(header, changes, transform)


def whole_transform(transform: Transform, body: bytes) -> bytes:
    return b"".join([*transform(body), *transform(b"")]) if body else b"".join(transform(b""))


# -- downloads --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeAsked:
    """The client's Range: (start, end or None) or a suffix of `suffix` bytes."""

    start: int | None
    end: int | None
    suffix: int | None
    header: str  # the header it came in (range / x-ms-range)


def range_request(
    kind: str, headers: Sequence[tuple[str, str]], spec: EnvelopeSpec
) -> tuple[RangeAsked | None, HeaderChanges]:
    """Translate the client's Range into the ciphertext range to ask the store for."""
    changes = HeaderChanges(remove=["if-range"])
    asked: RangeAsked | None = None
    for name in ("range", "x-ms-range"):
        value = _one(headers, name)
        if value is None:
            continue
        if asked is not None:
            raise EnvelopeRefused(400, "bad_request", "both Range and x-ms-range given")
        changes.remove.append(name)
        compact = value.replace(" ", "")
        m = _BYTES_RANGE.fullmatch(compact)
        if m is not None:
            start, end = int(m.group(1)), (int(m.group(2)) if m.group(2) else None)
            if end is not None and end < start:
                raise EnvelopeRefused(
                    416, "range_not_satisfiable", "the range ends before it starts"
                )
            asked = RangeAsked(start, end, None, name)
        elif re.fullmatch(r"bytes=-[0-9]{1,19}", compact):
            asked = RangeAsked(None, None, int(compact[7:]), name)
        else:
            raise EnvelopeRefused(
                416 if compact.startswith("bytes=") else 400,
                "range_not_satisfiable",
                "only one byte range (bytes=START-END, START- or -N) is supported",
            )
    if asked is not None and asked.start is not None:
        size, full = spec.chunk_bytes, spec.chunk_bytes + TAG_BYTES
        first = asked.start // size
        last = "" if asked.end is None else str((asked.end // size + 1) * full - 1)
        changes.set.append((_RANGE_HEADERS[kind].title(), f"bytes={first * full}-{last}"))
    return asked, changes


def envelope_metadata(kind: str, headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    prefix = META_PREFIX[kind]
    return {
        n.lower()[len(prefix) :]: v for n, v in headers if n.lower().startswith(prefix + "casb")
    }


def read_header(kind: str, headers: Sequence[tuple[str, str]]) -> EnvelopeHeader:
    meta = envelope_metadata(kind, headers)
    if not meta:
        raise IntegrityError(
            "the object is not envelope-encrypted (no casb envelope metadata): an object "
            "in this destination must have been stored through the proxy"
        )
    return EnvelopeHeader.from_metadata(meta)


@dataclass(slots=True)
class DownloadPlan:
    changes: HeaderChanges
    opener: Opener | None  # None: HEAD, no body
    length: int  # plaintext bytes the client receives


def _check_body_length(headers: Sequence[tuple[str, str]], expected: int) -> None:
    """The store's Content-Length must be the ciphertext the metadata describes: a
    body of any other size is not this object (and is not buffered to find out)."""
    values = _get(headers, "content-length")
    if len(values) > 1 or (values and values[0].strip() != str(expected)):
        raise IntegrityError("the stored object's size does not match its envelope metadata")


def _response_range_start(headers: Sequence[tuple[str, str]]) -> int | None:
    value = _one(headers, "content-range")
    if value is None:
        return None
    m = re.fullmatch(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)", value.strip())
    if m is None:
        raise IntegrityError("the store answered with an unreadable Content-Range")
    return int(m.group(1))


def plan_download(
    kind: str,
    status: int,
    headers: Sequence[tuple[str, str]],
    spec: EnvelopeSpec,
    asked: RangeAsked | None,
    *,
    head: bool,
) -> DownloadPlan:
    """How to turn the store's answer (2xx) into the plaintext answer. IntegrityError /
    EnvelopeError when the object cannot be opened; EnvelopeRefused for an unsatisfiable
    range."""
    header = read_header(kind, headers)
    prefix = META_PREFIX[kind]
    changes = HeaderChanges(
        remove=[
            *(n.lower() for n, _ in headers if n.lower().startswith(prefix + "casb")),
            *(n.lower() for n, _ in headers if n.lower().startswith(_CHECKSUM_PREFIX)),
            "content-md5",
            "x-ms-content-crc64",
            "x-ms-blob-content-md5",
            "x-goog-hash",
            "x-goog-stored-content-length",
            "content-range",
            "transfer-encoding",
        ]
    )
    total = header.length
    if asked is None or head:
        changes.set.append(("Content-Length", str(total)))
        if head:
            if status == 206:  # a ranged HEAD: answer it as a whole-object HEAD
                changes.status = 200
            return DownloadPlan(changes, None, total)
        if status == 206:
            raise IntegrityError("the store answered a partial object to a whole-object read")
        _check_body_length(headers, header.ciphertext_length)
        return DownloadPlan(changes, open_object(spec.keys, header), total)
    if total == 0:
        raise EnvelopeRefused(416, "range_not_satisfiable", "the object is empty")
    end: int | None
    try:
        if asked.suffix is not None:
            bounds = parse_range(f"bytes=-{asked.suffix}", total)
            if bounds is None:
                raise EnvelopeRefused(416, "range_not_satisfiable", "the range is not satisfiable")
            start, end = bounds
        else:
            assert asked.start is not None
            start, end = asked.start, asked.end
        span = plaintext_range(header, start, end)
    except EnvelopeError:
        raise EnvelopeRefused(
            416, "range_not_satisfiable", "the range starts beyond the end of the object"
        ) from None
    got = _response_range_start(headers) if status == 206 else 0
    if asked.suffix is None and status == 206:
        if header.chunk_size != spec.chunk_bytes or got != span.cipher_start:
            raise EnvelopeError(
                "the object was stored with another chunk size than this destination uses: "
                "read it whole"
            )
        _check_body_length(headers, span.cipher_end - span.cipher_start + 1)
        opener = open_range(spec.keys, header, span)
    else:
        # the whole object came back (a suffix range, or a store that ignored Range)
        if status == 206:
            raise IntegrityError("the store answered a partial object to a whole-object read")
        _check_body_length(headers, header.ciphertext_length)
        opener = _slicing_opener(spec, header, span.start, span.length)
    changes.status = 206
    changes.set += [
        ("Content-Length", str(span.length)),
        ("Content-Range", span.content_range(total)),
    ]
    return DownloadPlan(changes, opener, span.length)


def _slicing_opener(spec: EnvelopeSpec, header: EnvelopeHeader, skip: int, limit: int) -> Opener:
    dek_opener = open_object(spec.keys, header)
    return _Sliced(dek_opener, skip, limit)  # type: ignore[return-value]


class _Sliced:
    """An Opener over the whole object whose output is cut to [skip, skip+limit)."""

    def __init__(self, inner: Opener, skip: int, limit: int) -> None:
        self.inner, self.skip, self.limit = inner, skip, limit

    def _cut(self, pieces: list[bytes]) -> list[bytes]:
        out = []
        for p in pieces:
            if self.skip:
                n = min(self.skip, len(p))
                self.skip -= n
                p = p[n:]
            p = p[: self.limit]
            self.limit -= len(p)
            if p:
                out.append(p)
        return out

    def feed(self, data: bytes) -> list[bytes]:
        return self._cut(self.inner.feed(data))

    def finish(self) -> list[bytes]:
        return self._cut(self.inner.finish())


def opener_transform(opener: Opener) -> Transform:
    def transform(data: bytes) -> list[bytes]:
        return opener.feed(data) if data else opener.finish()

    return transform
