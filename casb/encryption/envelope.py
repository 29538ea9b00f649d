"""Envelope encryption of stored objects: the streaming format (version 1).

Decides how the proxy encrypts an object it stores and how it checks and decrypts it on
the way back. Pure code: the edge feeds bytes in (`Sealer`, `Opener`) and forwards what
comes out. Memory stays bounded: the Sealer holds no plaintext (ciphertext leaves as the
plaintext arrives, each chunk's tag right after its last byte); the Opener holds at most
one chunk, whose plaintext it releases only once the chunk's tag verified.

Format, version 1
-----------------
Per object, a fresh 32-byte data key (DEK) and a random 7-byte nonce prefix.

The plaintext of ``length`` bytes is cut into chunks of ``chunk_size`` bytes; the last
may be shorter, and an empty object is one empty chunk. So there are
``N = max(1, ceil(length / chunk_size))`` chunks, at most 2**32 - 1. Chunk ``i``
(0-based) is sealed with AES-256-GCM under the DEK:

    nonce = nonce_prefix (7 bytes) || i (4 bytes, big-endian) || final (1 byte)
            final = 0x01 for chunk N-1, 0x00 for every other chunk
    AAD   = b"casb-envelope/1\\0" || chunk_size (4 bytes BE) || length (8 bytes BE)
    sealed chunk = AES-256-GCM ciphertext || 16-byte tag

This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar, "Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015). The stored
body is the sealed chunks concatenated, nothing else: each is ``chunk_size + 16`` bytes,
the last ``length - (N-1) * chunk_size + 16``; the body is ``length + 16 * N`` bytes
(`ciphertext_length`). Chunk ``i`` starts at byte ``i * (chunk_size + 16)``, so a
plaintext byte range maps to a ciphertext byte range (`plaintext_range`): a ranged read
fetches and verifies whole chunks, and drops the bytes outside the range after that.

The DEK is wrapped by the primary key-encryption key (KEK) of the keyring
(`casb.encryption.keyring`), with the wrap context
``nonce_prefix (7) || chunk_size (4 bytes BE) || length (8 bytes BE)``: the wrapped key
only unwraps together with the metadata it was made for.

Object metadata (user metadata; names in lower case, the store adds its own prefix such
as ``x-amz-meta-``), all ASCII text:

    casb-envelope   "1" (the format version)
    casb-kek        the KEK id, ^[A-Za-z0-9._-]{1,64}$
    casb-dek        the wrapped DEK, standard base64 with padding (1 to 4096 bytes;
                    60 with the local keyring, see `casb.encryption.keyring`)
    casb-nonce      the nonce prefix, standard base64 with padding (7 bytes)
    casb-chunk      chunk_size, decimal without sign or leading zero, 16 .. 64 MiB
    casb-length     the plaintext length, decimal without sign or leading zero

When reading metadata, names are compared case-insensitively (ASCII) and ``_`` counts
as ``-`` (Azure metadata names cannot hold ``-``); a field given twice with different
values, a missing or malformed field, another version or a size out of bounds raise
`EnvelopeError`.

What is detected (each raises `IntegrityError`, and no plaintext of a chunk is released
before its tag verified): any flipped bit (the chunk's tag); chunks reordered, dropped
or duplicated (the index in the nonce); truncation at a chunk boundary (the final flag:
the last chunk received is not sealed as final, or bytes are missing at `finish`);
extension (bytes after the final chunk); a changed length or chunk size (they are in the
AAD of every chunk and in the DEK's wrap context); a changed nonce prefix, KEK id or
wrapped key, or the wrapped key of another object (the DEK does not unwrap).

Not detected by the format: replacing an object (body and metadata together) with
another object sealed under the same keyring, e.g. under another name, or with an older
version of itself. The object's identity is not bound in version 1.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    AEADEncryptionContext,
    Cipher,
    algorithms,
    modes,
)

from casb.encryption.errors import EnvelopeError, IntegrityError
from casb.encryption.keyring import KeyEncryptionKeys, is_key_id

__all__ = [
    "DEK_BYTES",
    "FORMAT_VERSION",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "META_FIELDS",
    "MIN_CHUNK_SIZE",
    "NONCE_PREFIX_BYTES",
    "TAG_BYTES",
    "EnvelopeError",
    "EnvelopeHeader",
    "IntegrityError",
    "Opener",
    "PlainRange",
    "Sealer",
    "chunk_count",
    "ciphertext_length",
    "new_object",
    "open_object",
    "open_range",
    "parse_range",
    "plaintext_range",
]

FORMAT_VERSION = 1
DEK_BYTES = 32
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_CHUNKS = 2**32 - 1
MAX_WRAPPED_KEY_BYTES = 4096

META_VERSION = "casb-envelope"
META_KEK = "casb-kek"
META_DEK = "casb-dek"
META_NONCE = "casb-nonce"
META_CHUNK = "casb-chunk"
META_LENGTH = "casb-length"
# Every metadata name of the format (what to strip when an envelope's metadata must not
# reach a client).
META_FIELDS = (META_VERSION, META_KEK, META_DEK, META_NONCE, META_CHUNK, META_LENGTH)

_AAD_PREFIX = b"casb-envelope/1\0"
_NONCE_TAIL = struct.Struct(">IB")
_SIZES = struct.Struct(">IQ")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_RANGE_SPEC = re.compile(r"([0-9]+)?-([0-9]+)?")
_MAX_RANGE_HEADER = 256
# The most bytes given to one update() of the streaming cipher: with cryptography 44,
# update() of 128 KiB or more is several times slower per byte than of 64 KiB.
_UPDATE_BYTES = 64 * 1024
_TAMPERED_KEY = "the data key does not unwrap: wrong key or tampered metadata"


# -- sizes -------------------------------------------------------------------------------


def chunk_count(length: int, chunk_size: int) -> int:
    """How many chunks an object of `length` bytes has (an empty object has one)."""
    return max(1, -(-length // chunk_size))


def _check_sizes(length: int, chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise EnvelopeError("the chunk size must be an integer")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise EnvelopeError(
            f"the chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise EnvelopeError("the length must be a non-negative integer")
    if chunk_count(length, chunk_size) > MAX_CHUNKS:
        raise EnvelopeError("the object is too large for its chunk size")


def ciphertext_length(length: int, chunk_size: int) -> int:
    """The stored body's size for a plaintext of `length` bytes: ``length + 16 * N``."""
    _check_sizes(length, chunk_size)
    return length + TAG_BYTES * chunk_count(length, chunk_size)


def _chunk_aad(chunk_size: int, length: int) -> bytes:
    return _AAD_PREFIX + _SIZES.pack(chunk_size, length)


def _buffer(data: memoryview | bytes) -> bytes:
    # cryptography reads any buffer (a memoryview slice avoids a copy); its stubs only
    # say bytes.
    return cast(bytes, data)


def _wrap_context(nonce_prefix: bytes, chunk_size: int, length: int) -> bytes:
    return nonce_prefix + _SIZES.pack(chunk_size, length)


# -- the header --------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeHeader:
    """Everything needed to open an object, as stored in its metadata."""

    version: int
    kek_id: str
    wrapped_key: bytes = field(repr=False)
    nonce_prefix: bytes
    chunk_size: int
    length: int

    def __post_init__(self) -> None:
        if self.version != FORMAT_VERSION or isinstance(self.version, bool):
            raise EnvelopeError("unsupported envelope version")
        if not isinstance(self.kek_id, str) or not is_key_id(self.kek_id):
            raise EnvelopeError(f"envelope metadata {META_KEK} is malformed")
        if (
            not isinstance(self.wrapped_key, bytes)
            or not 0 < len(self.wrapped_key) <= MAX_WRAPPED_KEY_BYTES
        ):
            raise EnvelopeError(f"envelope metadata {META_DEK} is malformed")
        if not isinstance(self.nonce_prefix, bytes) or len(self.nonce_prefix) != NONCE_PREFIX_BYTES:
            raise EnvelopeError(f"envelope metadata {META_NONCE} is malformed")
        _check_sizes(self.length, self.chunk_size)

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.length, self.chunk_size)

    @property
    def ciphertext_length(self) -> int:
        return self.length + TAG_BYTES * self.chunk_count

    def sealed_size(self, index: int) -> int:
        """The stored size of chunk `index` (its plaintext plus the tag)."""
        last = self.chunk_count - 1
        if not 0 <= index <= last:
            raise EnvelopeError("chunk index out of range")
        if index < last:
            return self.chunk_size + TAG_BYTES
        return self.length - last * self.chunk_size + TAG_BYTES

    def wrap_context(self) -> bytes:
        """The context the DEK is wrapped with: nonce prefix, chunk size, length."""
        return _wrap_context(self.nonce_prefix, self.chunk_size, self.length)

    def to_metadata(self) -> dict[str, str]:
        """The object metadata (lower-case names, without the store's prefix)."""
        return {
            META_VERSION: str(self.version),
            META_KEK: self.kek_id,
            META_DEK: base64.b64encode(self.wrapped_key).decode("ascii"),
            META_NONCE: base64.b64encode(self.nonce_prefix).decode("ascii"),
            META_CHUNK: str(self.chunk_size),
            META_LENGTH: str(self.length),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> EnvelopeHeader:
        """Read the header from object metadata; `EnvelopeError` saying what is wrong."""
        fields: dict[str, str] = {}
        for key, value in metadata.items():
            if not isinstance(key, str) or not key.isascii():
                continue
            name = key.lower().replace("_", "-")
            if name not in META_FIELDS:
                continue
            if not isinstance(value, str):
                raise EnvelopeError(f"envelope metadata {name} is malformed")
            if fields.get(name, value) != value:
                raise EnvelopeError(f"envelope metadata {name} is given twice")
            fields[name] = value
        version = fields.get(META_VERSION)
        if version is None:
            raise EnvelopeError(f"not an envelope: {META_VERSION} metadata missing")
        if version != str(FORMAT_VERSION):
            raise EnvelopeError("unsupported envelope version")
        for name in META_FIELDS:
            if name not in fields:
                raise EnvelopeError(f"envelope metadata incomplete: {name} missing")
        if not is_key_id(fields[META_KEK]):
            raise EnvelopeError(f"envelope metadata {META_KEK} is malformed")
        return cls(
            version=FORMAT_VERSION,
            kek_id=fields[META_KEK],
            wrapped_key=_base64_field(fields, META_DEK, MAX_WRAPPED_KEY_BYTES),
            nonce_prefix=_base64_field(fields, META_NONCE, NONCE_PREFIX_BYTES),
            chunk_size=_decimal_field(fields, META_CHUNK),
            length=_decimal_field(fields, META_LENGTH),
        )


def _base64_field(fields: Mapping[str, str], name: str, max_bytes: int) -> bytes:
    value = fields[name]
    if len(value) > 4 * -(-max_bytes // 3):
        raise EnvelopeError(f"envelope metadata {name} is too long")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"envelope metadata {name} is not valid base64") from None
    if not decoded:
        raise EnvelopeError(f"envelope metadata {name} is empty")
    return decoded


def _decimal_field(fields: Mapping[str, str], name: str) -> int:
    value = fields[name]
    if _DECIMAL.fullmatch(value) is None:
        raise EnvelopeError(f"envelope metadata {name} is not a decimal number")
    return int(value)


# -- sealing -----------------------------------------------------------------------------


def new_object(
    keys: KeyEncryptionKeys, length: int, chunk_size: int
) -> tuple[EnvelopeHeader, Sealer]:
    """Start sealing an object of exactly `length` bytes: its header (store it as the
    object's metadata) and the `Sealer` to feed the plaintext through."""
    _check_sizes(length, chunk_size)
    dek = os.urandom(DEK_BYTES)
    nonce_prefix = os.urandom(NONCE_PREFIX_BYTES)
    kek_id, wrapped = keys.wrap(dek, _wrap_context(nonce_prefix, chunk_size, length))
    header = EnvelopeHeader(
        version=FORMAT_VERSION,
        kek_id=kek_id,
        wrapped_key=wrapped,
        nonce_prefix=nonce_prefix,
        chunk_size=chunk_size,
        length=length,
    )
    return header, Sealer(dek, header)


class Sealer:
    """Push-based encryption of one object: `feed` plaintext pieces of any size and get
    back the sealed bytes produced so far, in order (never an empty piece); `finish` at
    the end. The pieces follow the input, not the chunks: a chunk's ciphertext leaves
    as its plaintext arrives and its tag right after its last byte, so the Sealer holds
    no plaintext at all, and the concatenation of everything returned is the body.
    Feeding more than the header's length, or finishing with less, raises
    `EnvelopeError` and the Sealer is unusable afterwards."""

    __slots__ = (
        "_aad",
        "_aes",
        "_chunk_size",
        "_closed",
        "_enc",
        "_fed",
        "_index",
        "_last",
        "_last_size",
        "_left",
        "_length",
        "_prefix",
    )

    def __init__(self, dek: bytes, header: EnvelopeHeader) -> None:
        if len(dek) != DEK_BYTES:
            raise ValueError(f"a data key is {DEK_BYTES} bytes")
        # The streaming GCM interface, not AESGCM: chunks arrive in pieces, and gathering
        # them into one buffer first would cost a copy of every byte.
        self._aes = algorithms.AES(dek)
        self._prefix = header.nonce_prefix
        self._aad = _chunk_aad(header.chunk_size, header.length)
        self._length = header.length
        self._chunk_size = header.chunk_size
        self._last = header.chunk_count - 1
        self._last_size = header.length - self._last * header.chunk_size
        self._index = 0
        self._enc: AEADEncryptionContext | None = None
        self._left = 0  # plaintext bytes the open chunk still takes
        self._fed = 0
        self._closed = False

    def _close(self) -> None:
        self._closed = True
        self._enc = None

    def _start_chunk(self) -> AEADEncryptionContext:
        index = self._index
        final = index == self._last
        nonce = self._prefix + _NONCE_TAIL.pack(index, final)
        enc = Cipher(self._aes, modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(self._aad)
        self._enc = enc
        self._left = self._last_size if final else self._chunk_size
        return enc

    def _end_chunk(self, enc: AEADEncryptionContext) -> bytes:
        tail = enc.finalize() + enc.tag  # GCM's finalize gives no more ciphertext
        self._enc = None
        self._index += 1
        return tail

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        enc = self._enc  # None once closed
        n = len(data)
        if enc is not None and type(data) is bytes and 0 < n < self._left and n <= _UPDATE_BYTES:
            # The common case, kept short: a piece inside the open chunk (so within the
            # length too), small enough for one update().
            self._fed += n
            self._left -= n
            return [enc.update(data)]
        if self._closed:
            raise EnvelopeError("the object is already sealed")
        src = memoryview(data).cast("B")
        n = src.nbytes
        if self._fed + n > self._length:
            self._close()
            raise EnvelopeError(
                f"the body is longer than its declared length of {self._length} bytes"
            )
        self._fed += n
        out: list[bytes] = []
        pos = 0
        while pos < n:
            enc = self._enc or self._start_chunk()
            take = min(self._left, n - pos, _UPDATE_BYTES)
            out.append(enc.update(_buffer(src if take == n else src[pos : pos + take])))
            pos += take
            self._left -= take
            if self._left == 0:
                out.append(self._end_chunk(enc))
        return out

    def finish(self) -> list[bytes]:
        if self._closed:
            raise EnvelopeError("the object is already sealed")
        self._close()
        if self._fed != self._length:
            raise EnvelopeError(
                f"the body ended after {self._fed} of its declared {self._length} bytes"
            )
        if self._length == 0:  # the one empty chunk
            return [self._end_chunk(self._start_chunk())]
        return []


# -- opening -----------------------------------------------------------------------------


def _unwrap(keys: KeyEncryptionKeys, header: EnvelopeHeader) -> bytes:
    dek = keys.unwrap(header.kek_id, header.wrapped_key, header.wrap_context())
    if len(dek) != DEK_BYTES:
        raise IntegrityError(_TAMPERED_KEY)
    return dek


def open_object(
    keys: KeyEncryptionKeys,
    header: EnvelopeHeader,
    *,
    first_chunk: int = 0,
    last_chunk: int | None = None,
) -> Opener:
    """Unwrap the object's DEK (`IntegrityError` if it does not unwrap) and return the
    `Opener` for its body, or for chunks `first_chunk`..`last_chunk` of it."""
    return Opener(_unwrap(keys, header), header, first_chunk=first_chunk, last_chunk=last_chunk)


def open_range(keys: KeyEncryptionKeys, header: EnvelopeHeader, span: PlainRange) -> Opener:
    """The `Opener` for a ranged read: feed it exactly the ciphertext bytes
    ``span.cipher_start..span.cipher_end``; it outputs exactly the plaintext bytes
    ``span.start..span.end`` (the front of the first chunk and the tail of the last
    are dropped after they verified)."""
    return Opener(
        _unwrap(keys, header),
        header,
        first_chunk=span.first_chunk,
        last_chunk=span.last_chunk,
        skip=span.skip,
        limit=span.length,
    )


class Opener:
    """Push-based decryption of one object (or of chunks `first_chunk`..`last_chunk`,
    when the caller fetched exactly those ciphertext bytes): `feed` ciphertext pieces of
    any size and get back plaintext, in order (never an empty piece); `finish` at the
    end. A chunk's plaintext is held back until its tag verified, then released (in
    pieces of at most 64 KiB); at most one chunk is held. `IntegrityError` on a bad
    tag, on data beyond the last expected chunk, and at `finish` on missing data; after
    one, every call raises it again and nothing more is released. `skip` drops that many
    plaintext bytes at the front of the output and `limit` caps its length (ranged
    reads, see `open_range`)."""

    __slots__ = (
        "_aad",
        "_aes",
        "_dec",
        "_error",
        "_expected",
        "_final",
        "_finished",
        "_full",
        "_held",
        "_index",
        "_last",
        "_left",
        "_limit",
        "_prefix",
        "_received",
        "_skip",
        "_tag",
    )

    def __init__(
        self,
        dek: bytes,
        header: EnvelopeHeader,
        *,
        first_chunk: int = 0,
        last_chunk: int | None = None,
        skip: int = 0,
        limit: int | None = None,
    ) -> None:
        if len(dek) != DEK_BYTES:
            raise ValueError(f"a data key is {DEK_BYTES} bytes")
        final = header.chunk_count - 1
        last = final if last_chunk is None else last_chunk
        if not 0 <= first_chunk <= last <= final:
            raise EnvelopeError("chunk range outside the object")
        if skip < 0 or (limit is not None and limit < 0):
            raise EnvelopeError("skip and limit must not be negative")
        # The streaming GCM interface, not AESGCM: decrypting the pieces as they come
        # (holding their plaintext until the tag) saves gathering each chunk first.
        self._aes = algorithms.AES(dek)
        self._prefix = header.nonce_prefix
        self._aad = _chunk_aad(header.chunk_size, header.length)
        self._final = final
        self._full = header.chunk_size  # ciphertext bytes before the tag: a full chunk
        self._last = header.sealed_size(final) - TAG_BYTES  # ... and the final chunk
        self._index = first_chunk
        # Chunks first..last: all full but the object's final chunk.
        self._expected = (last - first_chunk) * (self._full + TAG_BYTES) + header.sealed_size(last)
        self._dec: AEADDecryptionContext | None = None
        self._left = 0  # ciphertext bytes of the open chunk still to come, before its tag
        self._tag = bytearray()
        self._held: list[bytes] = []  # plaintext of the open chunk: not verified yet
        self._received = 0
        self._skip = skip
        self._limit = limit
        self._error: IntegrityError | None = None
        self._finished = False

    def _fail(self, message: str) -> IntegrityError:
        self._dec = None
        self._held = []
        self._error = IntegrityError(message)
        return self._error

    def _start_chunk(self) -> AEADDecryptionContext:
        index = self._index
        final = index == self._final
        nonce = self._prefix + _NONCE_TAIL.pack(index, final)
        dec = Cipher(self._aes, modes.GCM(nonce)).decryptor()
        dec.authenticate_additional_data(self._aad)
        self._dec = dec
        self._left = self._last if final else self._full
        return dec

    def _end_chunk(self, dec: AEADDecryptionContext) -> list[bytes]:
        try:
            dec.finalize_with_tag(bytes(self._tag))
        except InvalidTag:
            raise self._fail(
                f"chunk {self._index} does not authenticate: the object was modified or is corrupt"
            ) from None
        verified = self._held
        self._held = []
        self._tag = bytearray()
        self._dec = None
        self._index += 1
        return verified

    def _trim(self, pieces: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for piece in pieces:
            if self._skip:
                cut = min(self._skip, len(piece))
                self._skip -= cut
                piece = piece[cut:]
            if self._limit is not None:
                piece = piece[: self._limit]
                self._limit -= len(piece)
            if piece:
                out.append(piece)
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        dec = self._dec  # None once failed or finished
        n = len(data)
        if dec is not None and type(data) is bytes and 0 < n < self._left and n <= _UPDATE_BYTES:
            # The common case, kept short: a piece inside the open chunk's ciphertext
            # (so within the expected length), small enough for one update().
            self._received += n
            self._left -= n
            self._held.append(dec.update(data))
            return []
        if self._error is not None:
            raise self._error
        if self._finished:
            raise EnvelopeError("the object is already finished")
        src = memoryview(data).cast("B")
        n = src.nbytes
        if self._received + n > self._expected:
            raise self._fail("extra data after the final chunk: the object was modified")
        self._received += n
        out: list[bytes] = []
        pos = 0
        while pos < n:
            dec = self._dec or self._start_chunk()
            if self._left:
                take = min(self._left, n - pos, _UPDATE_BYTES)
                self._held.append(dec.update(_buffer(src if take == n else src[pos : pos + take])))
                self._left -= take
                pos += take
                continue
            take = min(TAG_BYTES - len(self._tag), n - pos)
            self._tag += src[pos : pos + take]
            pos += take
            if len(self._tag) == TAG_BYTES:
                out += self._end_chunk(dec)
        if self._skip or self._limit is not None:
            return self._trim(out)
        return out

    def finish(self) -> list[bytes]:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise EnvelopeError("the object is already finished")
        if self._received != self._expected:
            raise self._fail("the object is truncated: chunks are missing")
        self._finished = True
        return []


# -- ranges ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlainRange:
    """A plaintext byte range (inclusive ends) and what to fetch and decrypt for it."""

    start: int  # first plaintext byte
    end: int  # last plaintext byte (inclusive)
    cipher_start: int  # first ciphertext byte to fetch
    cipher_end: int  # last ciphertext byte to fetch (inclusive, like HTTP Range)
    first_chunk: int
    last_chunk: int
    skip: int  # plaintext bytes of first_chunk before `start`
    length: int  # plaintext bytes to output: end - start + 1

    @property
    def cipher_range_header(self) -> str:
        """The upstream request's ``Range`` value."""
        return f"bytes={self.cipher_start}-{self.cipher_end}"

    def content_range(self, total: int) -> str:
        """The client response's ``Content-Range`` value."""
        return f"bytes {self.start}-{self.end}/{total}"


def plaintext_range(header: EnvelopeHeader, start: int, end_inclusive: int | None) -> PlainRange:
    """Map plaintext bytes ``start..end_inclusive`` (None: to the end; past the end is
    clamped) to the chunks and ciphertext bytes holding them."""
    length = header.length
    if not 0 <= start < length:
        raise EnvelopeError("the range starts outside the object")
    end = length - 1 if end_inclusive is None else min(end_inclusive, length - 1)
    if end < start:
        raise EnvelopeError("the range ends before it starts")
    size = header.chunk_size
    first, last = start // size, end // size
    full = size + TAG_BYTES
    return PlainRange(
        start=start,
        end=end,
        cipher_start=first * full,
        cipher_end=last * full + header.sealed_size(last) - 1,
        first_chunk=first,
        last_chunk=last,
        skip=start - first * size,
        length=end - start + 1,
    )


def parse_range(value: str, length: int) -> tuple[int, int] | None:
    """Parse an HTTP ``Range`` header (RFC 9110 section 14.1.2) for an object of `length`
    bytes: ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n``, one range only. Returns the
    inclusive (start, end), clamped to the object; None when it is not satisfiable (the
    caller answers 416); `EnvelopeError` when malformed, another unit, or several
    ranges."""
    malformed = "malformed Range header"
    if len(value) > _MAX_RANGE_HEADER:
        raise EnvelopeError(malformed)
    unit, sep, rest = value.strip(" \t").partition("=")
    if not sep or unit.lower() != "bytes":
        raise EnvelopeError("malformed Range header: only bytes=START-END is supported")
    specs = [s for s in (part.strip(" \t") for part in rest.split(",")) if s]
    if not specs:
        raise EnvelopeError(malformed)
    if len(specs) > 1:
        raise EnvelopeError("multiple ranges in one request are not supported")
    match = _RANGE_SPEC.fullmatch(specs[0])
    if match is None:
        raise EnvelopeError(malformed)
    first, last = match.groups()
    if first is None:
        if last is None:
            raise EnvelopeError(malformed)
        suffix = int(last)
        if suffix == 0 or length == 0:
            return None
        return max(0, length - suffix), length - 1
    start = int(first)
    end = length - 1 if last is None else int(last)
    if last is not None and end < start:
        raise EnvelopeError(malformed)
    if start >= length:
        return None
    return start, min(end, length - 1)
