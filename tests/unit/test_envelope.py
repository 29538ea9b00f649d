"""The envelope format (casb.encryption.envelope): round trips, the documented layout,
tampering of every kind, ranges, Range headers and metadata parsing."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from casb.encryption.envelope import (
    MAX_CHUNK_SIZE,
    EnvelopeError,
    EnvelopeHeader,
    IntegrityError,
    Opener,
    Sealer,
    ciphertext_length,
    new_object,
    open_object,
    open_range,
    parse_range,
    plaintext_range,
)
from casb.encryption.keyring import LocalKeyring

CHUNK = 64
TAG = 16


@pytest.fixture(scope="module")
def keys() -> LocalKeyring:
    rng = random.Random(7)
    return LocalKeyring(
        "kek-a",
        {"kek-a": rng.randbytes(32), "kek-b": rng.randbytes(32), "kek-c": rng.randbytes(32)},
    )


def splits(data: bytes, rng: random.Random, max_piece: int) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(data):
        n = rng.randint(0, max_piece)  # empty pieces too
        pieces.append(data[pos : pos + n])
        pos += n
    return pieces


def seal(
    keys: LocalKeyring, data: bytes, chunk: int = CHUNK, rng: random.Random | None = None
) -> tuple[EnvelopeHeader, list[bytes]]:
    """The header and the sealed chunks (the Sealer's output cut at chunk boundaries)."""
    rng = rng or random.Random(1)
    header, sealer = new_object(keys, len(data), chunk)
    out: list[bytes] = []
    for piece in splits(data, rng, 3 * chunk):
        out += sealer.feed(piece)
    out += sealer.finish()
    assert all(out)  # never an empty piece (it would end a chunked HTTP body)
    body = b"".join(out)
    return header, chunks_of(body, chunk)


def chunks_of(body: bytes, chunk: int) -> list[bytes]:
    return [body[i : i + chunk + TAG] for i in range(0, max(len(body), 1), chunk + TAG)]


def open_all(
    keys: LocalKeyring, header: EnvelopeHeader, pieces: list[bytes]
) -> tuple[bytes, Exception | None]:
    """What the Opener released before it stopped, and the error it stopped with."""
    released: list[bytes] = []
    try:
        opener = open_object(keys, header)
        for piece in pieces:
            released += opener.feed(piece)
        released += opener.finish()
    except EnvelopeError as exc:
        return b"".join(released), exc
    return b"".join(released), None


def data_of(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("seed", range(5))
def test_round_trip_with_random_splits(keys: LocalKeyring, length: int, seed: int) -> None:
    rng = random.Random(seed)
    data = data_of(length, seed)
    header, sealer = new_object(keys, length, CHUNK)
    sealed: list[bytes] = []
    fed = 0
    for piece in splits(data, rng, 3 * CHUNK):
        fed += len(piece)
        sealed += sealer.feed(piece)
        # streaming: everything fed is out already, each completed chunk with its tag
        done = fed // CHUNK if fed < length else max(1, -(-length // CHUNK))
        assert sum(map(len, sealed)) == fed + TAG * done
    sealed += sealer.finish()
    assert all(sealed)
    chunks = chunks_of(b"".join(sealed), CHUNK)
    n = max(1, -(-length // CHUNK))
    assert [len(c) for c in chunks] == [CHUNK + TAG] * (n - 1) + [length - (n - 1) * CHUNK + TAG]
    body = b"".join(chunks)
    assert len(body) == ciphertext_length(length, CHUNK) == header.ciphertext_length
    assert length < 8 or data[:8] not in body  # short plaintexts may occur by chance
    reread = EnvelopeHeader.from_metadata(header.to_metadata())
    assert reread == header
    opener = open_object(keys, reread)
    out: list[bytes] = []
    for piece in splits(body, rng, 3 * CHUNK):
        out += opener.feed(piece)
    out += opener.finish()
    assert all(out)  # never an empty piece (it would end a chunked HTTP body)
    assert b"".join(out) == data


def test_round_trip_large_chunks_in_proxy_sized_pieces(keys: LocalKeyring) -> None:
    chunk, piece = 1024 * 1024, 64 * 1024
    data = data_of(2 * chunk + chunk // 2)
    header, sealer = new_object(keys, len(data), chunk)
    sealed: list[bytes] = []
    for pos in range(0, len(data), piece):
        sealed += sealer.feed(data[pos : pos + piece])
    sealed += sealer.finish()
    assert len(chunks_of(b"".join(sealed), chunk)) == 3
    opener = open_object(keys, header)
    body = memoryview(b"".join(sealed))
    out: list[bytes] = []
    for pos in range(0, len(body), piece):
        out += opener.feed(body[pos : pos + piece])
    assert b"".join(out + opener.finish()) == data


def test_whole_body_in_one_feed(keys: LocalKeyring) -> None:
    data = data_of(5 * CHUNK)
    header, sealer = new_object(keys, len(data), CHUNK)
    sealed = sealer.feed(data) + sealer.finish()
    assert len(chunks_of(b"".join(sealed), CHUNK)) == 5
    opener = open_object(keys, header)
    assert b"".join(opener.feed(b"".join(sealed)) + opener.finish()) == data


def test_each_object_gets_a_fresh_key_and_nonce(keys: LocalKeyring) -> None:
    data = data_of(CHUNK)
    h1, c1 = seal(keys, data)
    h2, c2 = seal(keys, data)
    assert h1.nonce_prefix != h2.nonce_prefix
    assert h1.wrapped_key != h2.wrapped_key
    assert c1 != c2


def test_the_layout_is_the_documented_one(keys: LocalKeyring) -> None:
    """Chunk i = AES-256-GCM(DEK, prefix || i BE32 || final, AAD = label || size || length)."""
    data = data_of(2 * CHUNK + 3)
    header, chunks = seal(keys, data)
    dek = keys.unwrap(
        header.kek_id,
        header.wrapped_key,
        header.nonce_prefix + CHUNK.to_bytes(4, "big") + len(data).to_bytes(8, "big"),
    )
    aad = b"casb-envelope/1\0" + CHUNK.to_bytes(4, "big") + len(data).to_bytes(8, "big")
    aead = AESGCM(dek)
    for i, chunk in enumerate(chunks):
        final = i == len(chunks) - 1
        nonce = header.nonce_prefix + i.to_bytes(4, "big") + (b"\x01" if final else b"\x00")
        assert aead.decrypt(nonce, chunk, aad) == data[i * CHUNK : (i + 1) * CHUNK]
        wrong_flag = nonce[:-1] + (b"\x00" if final else b"\x01")
        with pytest.raises(InvalidTag):
            aead.decrypt(wrong_flag, chunk, aad)
    assert header.to_metadata() == {
        "casb-envelope": "1",
        "casb-kek": "kek-a",
        "casb-dek": header.to_metadata()["casb-dek"],
        "casb-nonce": header.to_metadata()["casb-nonce"],
        "casb-chunk": "64",
        "casb-length": str(len(data)),
    }


# -- the Sealer's length contract -----------------------------------------------------------


def test_sealer_refuses_more_bytes_as_soon_as_they_come(keys: LocalKeyring) -> None:
    _, sealer = new_object(keys, 10, CHUNK)
    assert sum(map(len, sealer.feed(b"x" * 6))) == 6
    with pytest.raises(EnvelopeError, match="longer than its declared length of 10"):
        sealer.feed(b"x" * 5)
    with pytest.raises(EnvelopeError):  # and it stays refused
        sealer.finish()


def test_sealer_refuses_bytes_after_a_full_object(keys: LocalKeyring) -> None:
    _, sealer = new_object(keys, CHUNK, CHUNK)
    assert sum(map(len, sealer.feed(b"x" * CHUNK))) == CHUNK + TAG  # tag included at once
    with pytest.raises(EnvelopeError, match="longer"):
        sealer.feed(b"x")


def test_sealer_refuses_too_few_bytes(keys: LocalKeyring) -> None:
    _, sealer = new_object(keys, 2 * CHUNK, CHUNK)
    assert sum(map(len, sealer.feed(b"x" * (CHUNK + 1)))) == CHUNK + TAG + 1
    with pytest.raises(EnvelopeError, match=f"after {CHUNK + 1} of its declared {2 * CHUNK}"):
        sealer.finish()
    with pytest.raises(EnvelopeError):
        sealer.feed(b"x")


def test_sealer_empty_object_is_one_empty_final_chunk(keys: LocalKeyring) -> None:
    header, sealer = new_object(keys, 0, CHUNK)
    assert sealer.feed(b"") == []
    sealed = sealer.finish()
    assert [len(c) for c in sealed] == [TAG]
    opener = open_object(keys, header)
    assert opener.feed(sealed[0]) == []
    assert opener.finish() == []


@pytest.mark.parametrize(
    ("length", "chunk"),
    [(-1, CHUNK), (10, 15), (10, MAX_CHUNK_SIZE + 1), (10, 0), (16 * (2**32), 16), (1, True)],
)
def test_new_object_refuses_bad_sizes(keys: LocalKeyring, length: int, chunk: int) -> None:
    with pytest.raises(EnvelopeError):
        new_object(keys, length, chunk)


def test_ciphertext_length() -> None:
    assert ciphertext_length(0, 64) == 16
    assert ciphertext_length(1, 64) == 17
    assert ciphertext_length(64, 64) == 80
    assert ciphertext_length(65, 64) == 97
    assert ciphertext_length(10 * 2**20, 2**20) == 10 * 2**20 + 160


# -- tampering ----------------------------------------------------------------------------

PLAIN = data_of(3 * CHUNK + 5, seed=42)  # four chunks: 64, 64, 64, 5


def sealed_object(keys: LocalKeyring) -> tuple[EnvelopeHeader, list[bytes]]:
    return seal(keys, PLAIN)


def flip(chunk: bytes, bit: int) -> bytes:
    b = bytearray(chunk)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def assert_refused(
    keys: LocalKeyring, header: EnvelopeHeader, pieces: list[bytes], good_chunks: int
) -> IntegrityError:
    """Fed chunk by chunk, exactly the chunks before the bad one come out; fed in random
    splits, at most those. Either way IntegrityError."""
    released, error = open_all(keys, header, pieces)
    assert isinstance(error, IntegrityError)
    assert released == PLAIN[: good_chunks * CHUNK]
    for seed in range(3):
        body = b"".join(pieces)
        released, error = open_all(keys, header, splits(body, random.Random(seed), 2 * CHUNK))
        assert isinstance(error, IntegrityError)
        assert PLAIN[: good_chunks * CHUNK].startswith(released)
        assert len(released) % CHUNK == 0
    return error


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("where", ["first", "middle", "tag"])
def test_a_flipped_bit_in_any_chunk(keys: LocalKeyring, index: int, where: str) -> None:
    header, chunks = sealed_object(keys)
    size = len(chunks[index]) * 8
    bit = {"first": 0, "middle": size // 2 - 3, "tag": size - 1}[where]
    chunks[index] = flip(chunks[index], bit)
    error = assert_refused(keys, header, chunks, good_chunks=index)
    assert f"chunk {index} does not authenticate" in error.message


def test_two_chunks_swapped(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    assert_refused(keys, header, chunks, good_chunks=1)


def test_last_chunk_dropped(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    error = assert_refused(keys, header, chunks[:-1], good_chunks=3)
    assert "truncated" in error.message


def test_truncated_inside_a_chunk(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    assert_refused(keys, header, [*chunks[:2], chunks[2][:10]], good_chunks=2)


def test_middle_chunk_dropped(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    assert_refused(keys, header, [chunks[0], *chunks[2:]], good_chunks=1)


def test_a_chunk_appended(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    error = assert_refused(keys, header, [*chunks, chunks[1]], good_chunks=4)
    assert "extra data" in error.message


def test_a_byte_appended(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    assert_refused(keys, header, [*chunks, b"\0"], good_chunks=4)


def test_the_final_chunk_of_another_object(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    _, other = seal(keys, data_of(len(PLAIN), seed=9))
    assert_refused(keys, header, [*chunks[:3], other[3]], good_chunks=3)


def with_meta(header: EnvelopeHeader, **changes: str) -> EnvelopeHeader:
    meta = header.to_metadata()
    meta.update({f"casb-{k}": v for k, v in changes.items()})
    return EnvelopeHeader.from_metadata(meta)


MetaChange = Callable[[EnvelopeHeader, EnvelopeHeader], EnvelopeHeader]
META_TAMPERING: dict[str, MetaChange] = {
    "length up": lambda h, o: with_meta(h, length=str(h.length + 1)),
    "length down": lambda h, o: with_meta(h, length=str(h.length - 1)),
    "length down to a chunk boundary": lambda h, o: with_meta(h, length=str(3 * CHUNK)),
    "chunk size": lambda h, o: with_meta(h, chunk=str(CHUNK * 2)),
    "kek id (another key)": lambda h, o: with_meta(h, kek="kek-b"),
    "kek id (unknown)": lambda h, o: with_meta(h, kek="kek-zz"),
    "wrapped key of another object": lambda h, o: with_meta(h, dek=o.to_metadata()["casb-dek"]),
    "nonce prefix": lambda h, o: with_meta(h, nonce=o.to_metadata()["casb-nonce"]),
}


@pytest.mark.parametrize("change", sorted(META_TAMPERING))
def test_changed_metadata(keys: LocalKeyring, change: str) -> None:
    header, chunks = sealed_object(keys)
    other, _ = sealed_object(keys)
    tampered = META_TAMPERING[change](header, other)
    assert tampered != header
    released, error = open_all(keys, tampered, chunks)
    assert isinstance(error, IntegrityError)
    assert released == b""
    if change == "kek id (unknown)":
        assert error.message == "unknown key-encryption key 'kek-zz'"
    else:
        assert "the data key does not unwrap" in error.message


def test_changed_length_fails_in_the_chunks_too(keys: LocalKeyring) -> None:
    """Second line of defence: even with the DEK in hand (not bound by the wrap), a body
    read under another length or chunk size does not authenticate."""
    header, chunks = sealed_object(keys)
    dek = keys.unwrap(header.kek_id, header.wrapped_key, header.wrap_context())
    for field, value in (("length", 3 * CHUNK), ("chunk_size", 2 * CHUNK)):
        moved = EnvelopeHeader(**{**header.__dict__, field: value})
        opener = Opener(dek, moved)
        with pytest.raises(IntegrityError, match="chunk 0 does not authenticate"):
            opener.feed(b"".join(chunks)[: moved.sealed_size(0)])


def test_an_opener_stays_failed(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    opener = open_object(keys, header)
    with pytest.raises(IntegrityError) as first:
        opener.feed(flip(chunks[0], 5))
    with pytest.raises(IntegrityError) as again:
        opener.feed(chunks[1])
    assert again.value is first.value
    with pytest.raises(IntegrityError):
        opener.finish()


def test_a_keyring_without_the_key(keys: LocalKeyring) -> None:
    header, _ = sealed_object(keys)
    other = LocalKeyring("kek-b", {"kek-b": bytes(32)})
    with pytest.raises(IntegrityError, match="unknown key-encryption key 'kek-a'"):
        open_object(other, header)


# -- ranges -------------------------------------------------------------------------------


def check_range(
    keys: LocalKeyring, header: EnvelopeHeader, body: bytes, data: bytes, a: int, b: int | None
) -> None:
    span = plaintext_range(header, a, b)
    end = len(data) - 1 if b is None else min(b, len(data) - 1)
    assert (span.start, span.end, span.length) == (a, end, end - a + 1)
    assert span.first_chunk == a // header.chunk_size
    assert span.last_chunk == end // header.chunk_size
    fetched = body[span.cipher_start : span.cipher_end + 1]
    assert len(fetched) == span.cipher_end - span.cipher_start + 1
    opener = open_range(keys, header, span)
    out = b"".join(opener.feed(fetched) + opener.finish())
    assert out == data[a : end + 1]
    # the plain ranged Opener, trimmed by the caller, gives the same
    raw = open_object(keys, header, first_chunk=span.first_chunk, last_chunk=span.last_chunk)
    whole = b"".join(raw.feed(fetched) + raw.finish())
    assert whole[span.skip : span.skip + span.length] == out


def test_every_range_of_a_small_object(keys: LocalKeyring) -> None:
    data = data_of(4 * 16 + 6, seed=3)  # five chunks of 16: 16, 16, 16, 16, 6
    header, chunks = seal(keys, data, chunk=16)
    body = b"".join(chunks)
    for a in range(len(data)):
        check_range(keys, header, body, data, a, None)
        for b in range(a, len(data) + 3):
            check_range(keys, header, body, data, a, b)


def test_ranges_at_chunk_edges_of_a_larger_object(keys: LocalKeyring) -> None:
    chunk = 1000
    data = data_of(7 * chunk + 1, seed=4)
    header, chunks = seal(keys, data, chunk=chunk)
    body = b"".join(chunks)
    edges = sorted({0, 1, len(data) - 1} | {k * chunk + d for k in range(1, 8) for d in (-1, 0, 1)})
    edges = [e for e in edges if 0 <= e < len(data)]
    for a in edges:
        for b in [*edges, len(data), None]:
            if b is None or b >= a:
                check_range(keys, header, body, data, a, b)


def test_a_range_with_a_tampered_or_missing_chunk(keys: LocalKeyring) -> None:
    header, chunks = sealed_object(keys)
    body = b"".join(chunks)
    span = plaintext_range(header, CHUNK + 3, 3 * CHUNK + 1)  # chunks 1..3
    fetched = body[span.cipher_start : span.cipher_end + 1]
    opener = open_range(keys, header, span)
    with pytest.raises(IntegrityError, match="chunk 2"):
        opener.feed(fetched[: CHUNK + TAG] + flip(fetched[CHUNK + TAG :], 9))
    opener = open_range(keys, header, span)
    opener.feed(fetched[:-1])
    with pytest.raises(IntegrityError, match="truncated"):
        opener.finish()
    # the fetched bytes must be those of the range: chunk 2 in place of chunk 1 fails
    opener = open_object(keys, header, first_chunk=1, last_chunk=1)
    with pytest.raises(IntegrityError, match="chunk 1"):
        opener.feed(chunks[2])


def test_the_final_chunk_must_be_sealed_as_final(keys: LocalKeyring) -> None:
    """A chunk with the right key, index and AAD but without the final flag cannot end
    the object (nor can a final chunk stand in the middle): a ranged read of the last
    chunk alone relies on it."""
    header, chunks = sealed_object(keys)
    dek = keys.unwrap(header.kek_id, header.wrapped_key, header.wrap_context())
    aad = b"casb-envelope/1\0" + CHUNK.to_bytes(4, "big") + len(PLAIN).to_bytes(8, "big")
    prefix = header.nonce_prefix
    not_final = AESGCM(dek).encrypt(prefix + (3).to_bytes(4, "big") + b"\0", PLAIN[-5:], aad)
    assert len(not_final) == len(chunks[3])
    opener = open_object(keys, header, first_chunk=3)
    with pytest.raises(IntegrityError, match="chunk 3"):
        opener.feed(not_final)
    early_final = AESGCM(dek).encrypt(prefix + (1).to_bytes(4, "big") + b"\1", PLAIN[64:128], aad)
    opener = open_object(keys, header, first_chunk=1, last_chunk=1)
    with pytest.raises(IntegrityError, match="chunk 1"):
        opener.feed(early_final)
    opener = open_object(keys, header, first_chunk=3)  # the genuine one opens
    assert opener.feed(chunks[3]) == [PLAIN[-5:]]


@pytest.mark.parametrize(("a", "b"), [(-1, 3), (len(PLAIN), None), (5, 4)])
def test_plaintext_range_refuses_bad_bounds(keys: LocalKeyring, a: int, b: int | None) -> None:
    header, _ = sealed_object(keys)
    with pytest.raises(EnvelopeError):
        plaintext_range(header, a, b)


def test_plaintext_range_headers(keys: LocalKeyring) -> None:
    header, _ = sealed_object(keys)
    span = plaintext_range(header, 70, None)
    assert span.cipher_range_header == f"bytes={CHUNK + TAG}-{header.ciphertext_length - 1}"
    assert span.content_range(len(PLAIN)) == f"bytes 70-{len(PLAIN) - 1}/{len(PLAIN)}"


def test_opener_refuses_a_chunk_range_outside_the_object(keys: LocalKeyring) -> None:
    header, _ = sealed_object(keys)
    for first, last in ((0, 4), (2, 1), (-1, 0)):
        with pytest.raises(EnvelopeError):
            open_object(keys, header, first_chunk=first, last_chunk=last)


@pytest.mark.parametrize(
    ("value", "length", "expected"),
    [
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=0-", 10, (0, 9)),
        ("bytes=3-5", 10, (3, 5)),
        ("bytes=9-9", 10, (9, 9)),
        ("bytes=5-100", 10, (5, 9)),
        ("bytes=5-99999999999999999999999", 10, (5, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-10", 10, (0, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=-0", 10, None),
        ("bytes=10-", 10, None),
        ("bytes=10-20", 10, None),
        ("bytes=0-0", 0, None),
        ("bytes=-5", 0, None),
        ("bytes=0-", 0, None),
        ("Bytes=1-2", 10, (1, 2)),
        ("BYTES=1-2", 10, (1, 2)),
        (" bytes=1-2\t", 10, (1, 2)),
        ("bytes=1-2, ", 10, (1, 2)),  # empty list elements are allowed (RFC 9110 5.6.1)
    ],
)
def test_parse_range(value: str, length: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(value, length) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "bytes",
        "bytes=",
        "bytes=,",
        "bytes=-",
        "bytes=5-3",
        "bytes=a-b",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes=1--2",
        "bytes=1 -2",
        "bytes =1-2",
        "bytes=0x1-2",
        "bytes=\u0661-\u0662",  # Arabic-Indic digits
        "bytes=1.0-2",
        "items=0-5",
        "=0-5",
        "bytes=0-5;x",
        "bytes=" + "1" * 300 + "-",
    ],
)
def test_parse_range_malformed(value: str) -> None:
    with pytest.raises(EnvelopeError, match=r"(?i)range"):
        parse_range(value, 10)


@pytest.mark.parametrize("value", ["bytes=0-1,3-4", "bytes=0-1, -2", "bytes=0-0,0-0"])
def test_parse_range_refuses_several_ranges(value: str) -> None:
    with pytest.raises(EnvelopeError, match="multiple ranges"):
        parse_range(value, 10)


# -- metadata -----------------------------------------------------------------------------


def test_metadata_names_are_case_and_separator_insensitive(keys: LocalKeyring) -> None:
    header, _ = sealed_object(keys)
    meta = header.to_metadata()
    upper = {k.upper(): v for k, v in meta.items()}
    azure = {k.replace("-", "_"): v for k, v in meta.items()}
    mixed = {"Casb-Envelope": "1", **{k: v for k, v in meta.items() if k != "casb-envelope"}}
    noise = {**meta, "content-type": "x", "casb-other": "y", "caf\u00e9": "z"}
    for variant in (upper, azure, mixed, noise):
        assert EnvelopeHeader.from_metadata(variant) == header
    same_twice = {**meta, "CASB-KEK": meta["casb-kek"]}
    assert EnvelopeHeader.from_metadata(same_twice) == header


def test_metadata_field_given_twice_with_two_values(keys: LocalKeyring) -> None:
    header, _ = sealed_object(keys)
    meta = {**header.to_metadata(), "CASB_LENGTH": "1"}
    with pytest.raises(EnvelopeError, match="casb-length is given twice"):
        EnvelopeHeader.from_metadata(meta)


def test_metadata_only_ascii_names(keys: LocalKeyring) -> None:
    header, _ = sealed_object(keys)
    meta = header.to_metadata()
    # U+212A KELVIN SIGN lower-cases to "k": it must not alias casb-kek
    meta["casb-\u212aek"] = meta.pop("casb-kek")
    with pytest.raises(EnvelopeError, match="casb-kek missing"):
        EnvelopeHeader.from_metadata(meta)


@pytest.mark.parametrize(
    "name", ["casb-kek", "casb-dek", "casb-nonce", "casb-chunk", "casb-length"]
)
def test_metadata_missing_field(keys: LocalKeyring, name: str) -> None:
    header, _ = sealed_object(keys)
    meta = header.to_metadata()
    del meta[name]
    with pytest.raises(EnvelopeError, match=f"incomplete: {name} missing"):
        EnvelopeHeader.from_metadata(meta)


def test_metadata_not_an_envelope() -> None:
    with pytest.raises(EnvelopeError, match="not an envelope"):
        EnvelopeHeader.from_metadata({"content-type": "application/dicom"})


SECRETISH = "Zm9vYmFyYmF6cXV4"  # a value that must never be echoed


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("casb-envelope", "2"),
        ("casb-envelope", " 1"),
        ("casb-envelope", "01"),
        ("casb-kek", "bad id"),
        ("casb-kek", ""),
        ("casb-kek", "k" * 65),
        ("casb-dek", "not base64!"),
        ("casb-dek", ""),
        ("casb-dek", "QUJD"),  # fine base64 ...
        ("casb-dek", "A" * 6000),
        ("casb-nonce", "AAAAAAAA"),  # 6 bytes
        ("casb-nonce", "AAAAAAAAAAA="),  # 8 bytes
        ("casb-nonce", "AAAAAAAAAA"),  # no padding
        ("casb-chunk", "0"),
        ("casb-chunk", "15"),
        ("casb-chunk", str(MAX_CHUNK_SIZE + 1)),
        ("casb-chunk", "-64"),
        ("casb-chunk", "+64"),
        ("casb-chunk", "064"),
        ("casb-chunk", " 64"),
        ("casb-chunk", "1e3"),
        ("casb-chunk", "6_4"),
        ("casb-chunk", "\u0666\u0664"),
        ("casb-length", "-1"),
        ("casb-length", ""),
        ("casb-length", str(2**80)),
        ("casb-length", str(64 * (2**32 - 1) + 1)),  # more than 2**32-1 chunks of 64
        ("casb-length", SECRETISH),
    ],
)
def test_metadata_malformed(keys: LocalKeyring, name: str, value: str) -> None:
    header, _ = sealed_object(keys)
    meta = {**header.to_metadata(), name: value}
    if value == "QUJD":  # ... but the wrong key: refused at unwrap, not at parsing
        with pytest.raises(IntegrityError):
            open_object(keys, EnvelopeHeader.from_metadata(meta))
        return
    with pytest.raises(EnvelopeError) as caught:
        EnvelopeHeader.from_metadata(meta)
    message = caught.value.message
    assert message and len(message) < 120
    if len(value) > 3:
        assert value.strip() not in message  # never echoed


def test_header_repr_hides_the_wrapped_key(keys: LocalKeyring) -> None:
    header, _ = sealed_object(keys)
    assert "wrapped_key" not in repr(header)


def test_sealer_and_opener_accept_any_buffer(keys: LocalKeyring) -> None:
    data = data_of(2 * CHUNK + 1)
    header, sealer = new_object(keys, len(data), CHUNK)
    sealed = sealer.feed(bytearray(data[:70])) + sealer.feed(memoryview(data)[70:])
    sealed += sealer.finish()
    opener = open_object(keys, header)
    body = bytearray(b"".join(sealed))
    assert b"".join(opener.feed(memoryview(body)) + opener.finish()) == data


def test_a_sealer_from_a_known_key() -> None:
    """Sealer/Opener can be built from a DEK directly (a KMS adapter that hands one out)."""
    dek = os.urandom(32)
    header = EnvelopeHeader(1, "k", b"w", bytes(7), CHUNK, 3)
    sealed = b"".join(Sealer(dek, header).feed(b"abc"))
    assert Opener(dek, header).feed(sealed) == [b"abc"]
    with pytest.raises(ValueError):
        Sealer(dek[:16], header)


def test_after_an_error_every_call_raises_even_mid_chunk(keys: LocalKeyring) -> None:
    data = data_of(1000)
    header, sealer = new_object(keys, len(data), 1024)
    assert len(b"".join(sealer.feed(data[:100]))) == 100  # a chunk is open
    with pytest.raises(EnvelopeError, match="longer"):
        sealer.feed(data[100:] + b"!")
    with pytest.raises(EnvelopeError, match="already sealed"):
        sealer.feed(data[100:200])
    header, sealer = new_object(keys, len(data), 1024)
    body = b"".join(sealer.feed(data) + sealer.finish())
    opener = open_object(keys, header)
    assert opener.feed(body[:100]) == []  # a chunk is open, nothing verified yet
    with pytest.raises(IntegrityError, match="extra data"):
        opener.feed(body[100:] + b"!")
    with pytest.raises(IntegrityError, match="extra data"):
        opener.feed(body[100:200])
    with pytest.raises(IntegrityError, match="extra data"):
        opener.finish()


def test_unverified_plaintext_is_held_back(keys: LocalKeyring) -> None:
    chunk = 200 * 1024  # several update() calls per chunk
    data = data_of(2 * chunk)
    header, sealer = new_object(keys, len(data), chunk)
    body = b"".join(sealer.feed(data) + sealer.finish())
    opener = open_object(keys, header)
    assert opener.feed(body[: chunk + TAG - 1]) == []  # all but the last tag byte
    first = opener.feed(body[chunk + TAG - 1 : chunk + TAG])
    assert b"".join(first) == data[:chunk]
    assert all(0 < len(p) <= 64 * 1024 for p in first)
    tampered = body[: 2 * (chunk + TAG) - 1] + bytes([body[-1] ^ 1])
    opener = open_object(keys, header)
    released = opener.feed(tampered[:-1])
    assert b"".join(released) == data[:chunk]  # only the verified first chunk
    with pytest.raises(IntegrityError, match="chunk 1"):
        opener.feed(tampered[-1:])
