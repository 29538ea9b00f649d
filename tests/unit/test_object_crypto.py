"""casb.encryption.object_crypto and envelope_ops: what the edge does to object-store
requests and responses for envelope encryption. Uploads are sealed with plan_upload's
transform and read back through plan_download's opener, the way the addon chains them,
with S3 (x-amz-meta-casb-*) and Azure (x-ms-meta-casb_*) metadata."""

from __future__ import annotations

import base64
import random
import re
import zlib
from collections.abc import Sequence

import pytest

from casb.encryption.envelope import (
    TAG_BYTES,
    EnvelopeError,
    EnvelopeHeader,
    IntegrityError,
    ciphertext_length,
    open_object,
)
from casb.encryption.envelope_ops import EnvelopeOp, envelope_op, meta_name
from casb.encryption.keyring import LocalKeyring
from casb.encryption.object_crypto import (
    EnvelopeRefused,
    HeaderChanges,
    RangeAsked,
    UploadPlan,
    opener_transform,
    plan_download,
    plan_upload,
    range_request,
    whole_transform,
)
from casb.exchange import EnvelopeSpec
from casb.objectstore.aws_chunked import AwsChunkedError

KEK = "kek-test"
KEYS = LocalKeyring(KEK, {KEK: bytes(range(32))})
CHUNK = 64
FULL = CHUNK + TAG_BYTES
SPEC = EnvelopeSpec(KEYS, CHUNK, 1 << 20)
PLAIN = bytes((i * 37 + 11) % 256 for i in range(300))  # 4 full chunks and 44 bytes
CT_LEN = ciphertext_length(len(PLAIN), CHUNK)  # 300 + 5 * 16 = 380
UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
Headers = list[tuple[str, str]]


# -- helpers ------------------------------------------------------------------------------


def apply(headers: Sequence[tuple[str, str]], changes: HeaderChanges) -> Headers:
    """What the addon does with HeaderChanges (remove, then set = replace every value)."""
    gone = set(changes.remove) | {n.lower() for n, _ in changes.set}
    return [(n, v) for n, v in headers if n.lower() not in gone] + list(changes.set)


def values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name.lower()]


def run(transform: object, pieces: Sequence[bytes]) -> bytes:
    """Feed the pieces then the end of the body; everything the transform returned."""
    assert callable(transform)
    out: list[bytes] = []
    for piece in pieces:
        if piece:
            out += transform(piece)
    out += transform(b"")
    return b"".join(out)


def cut(data: bytes, rng: random.Random, max_piece: int) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, max_piece)
        pieces.append(data[pos : pos + n])
        pos += n
    return pieces


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def aws_chunked(data: bytes, size: int, trailer: tuple[str, str] | None = None) -> bytes:
    """The unsigned aws-chunked encoding of `data` (what boto3 sends over https)."""
    out = bytearray()
    for pos in range(0, len(data), size):
        piece = data[pos : pos + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    out += b"0\r\n"
    if trailer is not None:
        out += f"{trailer[0]}:{trailer[1]}\r\n".encode()
    return bytes(out + b"\r\n")


def chunked_headers(length: int, encoded: int, *, trailer: bool = True) -> Headers:
    headers = [
        ("Content-Encoding", "aws-chunked"),
        ("x-amz-content-sha256", UNSIGNED_TRAILER),
        ("x-amz-decoded-content-length", str(length)),
        ("Content-Length", str(encoded)),
        ("x-amz-sdk-checksum-algorithm", "CRC32"),
    ]
    if trailer:
        headers.append(("x-amz-trailer", "x-amz-checksum-crc32"))
    return headers


def ranged(stored: Headers, first: int, last: int, total: int) -> Headers:
    """The headers of a store's 206 answer for ciphertext bytes first..last."""
    return [
        *((n, v) for n, v in stored if n.lower() != "content-length"),
        ("Content-Length", str(last - first + 1)),
        ("Content-Range", f"bytes {first}-{last}/{total}"),
    ]


def store(kind: str, plain: bytes = PLAIN, seed: int = 1) -> tuple[bytes, Headers]:
    """Seal `plain` as an upload; the stored body and the metadata headers a store
    returns with it (plus its own Content-Length, ETag and checksum)."""
    plan = plan_upload(kind, [("Content-Length", str(len(plain)))], SPEC)
    body = run(plan.transform, cut(plain, random.Random(seed), 50))
    meta = [(n, v) for n, v in plan.changes.set if n.lower() != "content-length"]
    stored = [
        *meta,
        ("Content-Length", str(len(body))),
        ("ETag", '"abc"'),
        ("x-amz-checksum-crc32", crc32_b64(body)),
        ("Content-MD5", "AAAAAAAAAAAAAAAAAAAAAA=="),
        ("x-ms-content-crc64", "AAAAAAAAAAA="),
    ]
    return body, stored


def upstream_slice(ct: bytes, changes: HeaderChanges, kind: str) -> tuple[int, int]:
    """The byte range a store answers for the Range the proxy forwards (clamped)."""
    name = {"s3": "range", "gcs": "range", "azure_blob": "x-ms-range"}[kind]
    [value] = values(changes.set, name)
    m = re.fullmatch(r"bytes=([0-9]+)-([0-9]*)", value)
    assert m is not None, value
    first = int(m.group(1))
    last = len(ct) - 1 if not m.group(2) else min(int(m.group(2)), len(ct) - 1)
    return first, last


# -- plan_upload: headers -----------------------------------------------------------------


def test_upload_headers_for_s3() -> None:
    headers = [
        ("Content-Length", str(len(PLAIN))),
        ("Content-Type", "application/dicom"),
        ("Content-MD5", "q1w2e3r4t5y6u7i8o9p0aa=="),
        ("x-amz-checksum-crc32", crc32_b64(PLAIN)),
        ("X-Amz-Checksum-SHA256", "c2hhMjU2"),
        ("x-amz-sdk-checksum-algorithm", "CRC32"),
        ("X-Amz-Meta-Casb-Kek", "planted-kek"),
        ("x-amz-meta-casb-dek", "cGxhbnRlZA=="),
        ("x-amz-meta-casb_nonce", "cGxhbnRlZA=="),  # read as casb-nonce on the way back
        ("x-amz-meta-study", "kept"),
        ("Transfer-Encoding", "chunked"),
    ]
    plan = plan_upload("s3", headers, SPEC)
    removed = set(plan.changes.remove)
    assert {
        "content-md5",
        "x-amz-checksum-crc32",
        "x-amz-checksum-sha256",
        "x-amz-sdk-checksum-algorithm",
        "x-amz-meta-casb-kek",
        "x-amz-meta-casb-dek",
        "x-amz-meta-casb_nonce",
        "transfer-encoding",
    } <= removed
    assert "x-amz-meta-study" not in removed and "content-type" not in removed
    out = apply(headers, plan.changes)
    assert values(out, "content-length") == [str(CT_LEN)]
    assert values(out, "content-type") == ["application/dicom"]
    assert values(out, "x-amz-meta-study") == ["kept"]
    assert not values(out, "content-md5") and not values(out, "transfer-encoding")
    assert not [n for n, _ in out if n.lower().startswith("x-amz-checksum-")]
    assert "planted-kek" not in [v for _, v in out]
    meta = {n: v for n, v in out if n.lower().startswith("x-amz-meta-casb")}
    assert set(meta) == {
        "x-amz-meta-casb-envelope",
        "x-amz-meta-casb-kek",
        "x-amz-meta-casb-dek",
        "x-amz-meta-casb-nonce",
        "x-amz-meta-casb-chunk",
        "x-amz-meta-casb-length",
    }
    assert meta["x-amz-meta-casb-kek"] == KEK
    assert (meta["x-amz-meta-casb-chunk"], meta["x-amz-meta-casb-length"]) == ("64", "300")
    header = EnvelopeHeader.from_metadata({n[len("x-amz-meta-") :]: v for n, v in meta.items()})
    assert header == plan.header


def test_upload_headers_for_azure_use_underscores() -> None:
    headers = [
        ("Content-Length", "10"),
        ("x-ms-blob-type", "BlockBlob"),
        ("x-ms-content-crc64", "AAAAAAAAAAA="),
        ("x-ms-blob-content-md5", "AAAAAAAAAAAAAAAAAAAAAA=="),
        ("Content-MD5", "AAAAAAAAAAAAAAAAAAAAAA=="),
        ("x-ms-meta-CASB_kek", "planted"),
        ("x-ms-meta-casb_length", "99999"),
        ("x-ms-meta-owner", "kept"),
    ]
    plan = plan_upload("azure_blob", headers, SPEC)
    out = apply(headers, plan.changes)
    names = [n for n, _ in out]
    assert not {"x-ms-content-crc64", "x-ms-blob-content-md5", "Content-MD5"} & set(names)
    assert "x-ms-meta-CASB_kek" not in names and "99999" not in [v for _, v in out]
    meta = sorted(n for n in names if n.lower().startswith("x-ms-meta-casb"))
    assert meta == sorted(
        meta_name("azure_blob", f)
        for f in (
            "casb-envelope",
            "casb-kek",
            "casb-dek",
            "casb-nonce",
            "casb-chunk",
            "casb-length",
        )
    )
    assert all("-" not in n[len("x-ms-meta-") :] for n in meta)  # C# identifiers
    assert values(out, "x-ms-meta-owner") == ["kept"]
    assert values(out, "x-ms-blob-type") == ["BlockBlob"]
    assert values(out, "content-length") == [str(10 + TAG_BYTES)]


def test_upload_headers_for_gcs() -> None:
    headers = [
        ("Content-Length", "0"),
        ("x-goog-hash", "crc32c=AAAAAA==,md5=AAAAAAAAAAAAAAAAAAAAAA=="),
        ("x-goog-meta-casb-envelope", "1"),
    ]
    plan = plan_upload("gcs", headers, SPEC)
    out = apply(headers, plan.changes)
    assert not values(out, "x-goog-hash")
    assert values(out, "x-goog-meta-casb-kek") == [KEK]
    assert values(out, "x-goog-meta-casb-length") == ["0"]
    assert values(out, "content-length") == [str(TAG_BYTES)]  # one empty chunk
    assert len(whole_transform(plan.transform, b"")) == TAG_BYTES


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([], 411),
        ([("Content-Length", "1"), ("content-length", "1")], 400),
        ([("Content-Length", "abc")], 400),
        ([("Content-Length", "-1")], 400),
        ([("Content-Length", "+5")], 400),
        ([("Content-Length", "1" * 20)], 400),
        ([("Content-Encoding", "aws-chunked"), ("Content-Length", "10")], 411),
        (
            [
                ("Content-Encoding", "aws-chunked"),
                ("x-amz-decoded-content-length", "10"),
                ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
            ],
            400,
        ),
        (
            [
                ("Content-Encoding", "aws-chunked"),
                ("x-amz-decoded-content-length", "10"),
                ("x-amz-decoded-content-length", "11"),
                ("x-amz-content-sha256", UNSIGNED_TRAILER),
            ],
            400,
        ),
        (
            [
                ("Content-Encoding", "aws-chunked"),
                ("x-amz-decoded-content-length", "10"),
                ("x-amz-content-sha256", UNSIGNED_TRAILER),
                ("x-amz-trailer", "x-amz-meta-foo"),
            ],
            400,
        ),
    ],
)
def test_upload_needs_one_readable_length(headers: Headers, status: int) -> None:
    with pytest.raises(EnvelopeRefused) as info:
        plan_upload("s3", headers, SPEC)
    assert info.value.status == status
    assert "abc" not in info.value.reason  # never echoes the value


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "\uff15"])
@pytest.mark.parametrize("name", ["Content-Length", "x-amz-decoded-content-length"])
def test_a_length_in_non_ascii_digits_is_refused(name: str, value: str) -> None:
    # str.isdigit() holds for "²", Arabic-Indic and full-width digits: the length must be
    # ASCII digits, refused with EnvelopeRefused 400 (not a ValueError, not accepted).
    headers = [(name, value)]
    if name != "Content-Length":
        headers += [("Content-Encoding", "aws-chunked"), ("x-amz-content-sha256", UNSIGNED_TRAILER)]
    with pytest.raises(EnvelopeRefused) as info:
        plan_upload("s3", headers, SPEC)
    assert info.value.status == 400


# -- plan_upload: the transform -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_sealed_upload_opens_to_the_plaintext(seed: int) -> None:
    plan = plan_upload("s3", [("Content-Length", str(len(PLAIN)))], SPEC)
    body = run(plan.transform, cut(PLAIN, random.Random(seed), 3 * CHUNK))
    assert len(body) == CT_LEN and PLAIN[:32] not in body
    assert whole_transform(opener_transform(open_object(KEYS, plan.header)), body) == PLAIN


def test_the_last_sealed_piece_is_held_until_the_body_ends() -> None:
    plan = plan_upload("s3", [("Content-Length", str(len(PLAIN)))], SPEC)
    early = b"".join(p for piece in cut(PLAIN, random.Random(3), 40) for p in plan.transform(piece))
    assert len(early) < CT_LEN  # every plaintext byte is in, the end not yet
    rest = b"".join(plan.transform(b""))
    assert len(early + rest) == CT_LEN
    opener = opener_transform(open_object(KEYS, plan.header))
    assert whole_transform(opener, early + rest) == PLAIN


def test_a_short_body_never_yields_the_complete_object() -> None:
    plan = plan_upload("s3", [("Content-Length", str(len(PLAIN)))], SPEC)
    got: list[bytes] = []
    for piece in cut(PLAIN[:-1], random.Random(5), 30):
        got += plan.transform(piece)
    with pytest.raises(EnvelopeError):
        plan.transform(b"")
    released = b"".join(got)
    assert len(released) < CT_LEN - TAG_BYTES  # the final chunk is not complete
    with pytest.raises(IntegrityError):
        whole_transform(opener_transform(open_object(KEYS, plan.header)), released)


def test_a_body_longer_than_declared_is_refused() -> None:
    plan = plan_upload("s3", [("Content-Length", "10")], SPEC)
    with pytest.raises(EnvelopeError):
        plan.transform(b"x" * 11)


def chunked_plan(encoded: bytes, *, trailer: bool = True) -> UploadPlan:
    return plan_upload("s3", chunked_headers(len(PLAIN), len(encoded), trailer=trailer), SPEC)


def test_aws_chunked_upload_is_decoded_then_sealed() -> None:
    encoded = aws_chunked(PLAIN, 70, ("x-amz-checksum-crc32", crc32_b64(PLAIN)))
    headers = [*chunked_headers(len(PLAIN), len(encoded)), ("x-amz-checksum-crc32", "x")]
    plan = plan_upload("s3", headers, SPEC)
    out = apply(headers, plan.changes)
    for gone in (
        "content-encoding",
        "x-amz-decoded-content-length",
        "x-amz-trailer",
        "x-amz-sdk-checksum-algorithm",
        "x-amz-checksum-crc32",
    ):
        assert not values(out, gone), gone
    assert values(out, "content-length") == [str(CT_LEN)]  # the ciphertext, not `encoded`
    for seed in range(3):
        plan = plan_upload("s3", headers, SPEC)
        body = run(plan.transform, cut(encoded, random.Random(seed), 23))
        assert len(body) == CT_LEN and b"\r\n0\r\n" not in body
        assert whole_transform(opener_transform(open_object(KEYS, plan.header)), body) == PLAIN


@pytest.mark.parametrize(
    "codings", [["aws-chunked,gzip"], ["gzip, AWS-Chunked"], ["aws-chunked", "gzip"]]
)
def test_aws_chunked_with_another_coding_keeps_that_coding(codings: list[str]) -> None:
    headers = [
        *[("Content-Encoding", c) for c in codings],
        *[h for h in chunked_headers(5, 100) if h[0] != "Content-Encoding"],
    ]
    out = apply(headers, plan_upload("s3", headers, SPEC).changes)
    assert values(out, "content-encoding") == ["gzip"]


def final_chunk_start() -> int:
    return (len(PLAIN) // CHUNK) * FULL  # the fifth (final) sealed chunk


@pytest.mark.parametrize("split", ["trailer_apart", "one_piece", "bytewise"])
def test_a_bad_trailer_checksum_never_yields_the_complete_object(split: str) -> None:
    encoded = aws_chunked(PLAIN, 100, ("x-amz-checksum-crc32", crc32_b64(b"other")))
    plan = chunked_plan(encoded)
    data_end = encoded.index(b"\r\n0\r\n") + 2
    if split == "trailer_apart":
        pieces = [encoded[:data_end], encoded[data_end:]]
    elif split == "one_piece":
        pieces = [encoded]
    else:
        pieces = [encoded[i : i + 1] for i in range(len(encoded))]
    released: list[bytes] = []
    with pytest.raises(AwsChunkedError, match="does not match"):
        for piece in [*pieces, b""]:
            released += plan.transform(piece)
    got = b"".join(released)
    assert len(got) < CT_LEN  # the final sealed chunk is never whole
    assert got == b"" or len(got) <= CT_LEN - TAG_BYTES
    if split == "trailer_apart":
        assert len(got) > final_chunk_start()  # everything before it did stream
    with pytest.raises(IntegrityError):
        whole_transform(opener_transform(open_object(KEYS, plan.header)), got)


def test_a_truncated_aws_chunked_body_never_yields_the_complete_object() -> None:
    encoded = aws_chunked(PLAIN, 100, ("x-amz-checksum-crc32", crc32_b64(PLAIN)))
    plan = chunked_plan(encoded)
    end = encoded.index(b"\r\n0\r\n") + 2  # every data byte, no final chunk or trailer
    released = plan.transform(encoded[:end])
    with pytest.raises(AwsChunkedError, match="truncated"):
        plan.transform(b"")
    got = b"".join(released)
    assert final_chunk_start() < len(got) < CT_LEN


def test_a_missing_declared_trailer_never_yields_the_complete_object() -> None:
    encoded = aws_chunked(PLAIN, 100)  # x-amz-trailer declared, no trailer sent
    plan = chunked_plan(encoded)
    released: list[bytes] = []
    with pytest.raises(AwsChunkedError):
        for piece in cut(encoded, random.Random(2), 60):
            released += plan.transform(piece)
        released += plan.transform(b"")
    assert len(b"".join(released)) < CT_LEN


# -- range_request ------------------------------------------------------------------------


def test_no_range_asks_for_the_whole_object() -> None:
    asked, changes = range_request("s3", [("Content-Length", "0")], SPEC)
    assert asked is None
    assert changes.set == [] and changes.remove == ["if-range"]


@pytest.mark.parametrize(
    ("kind", "header", "value", "asked", "upstream"),
    [
        ("s3", "Range", "bytes=100-199", RangeAsked(100, 199, None, "range"), "bytes=80-319"),
        ("s3", "range", "bytes=0-0", RangeAsked(0, 0, None, "range"), "bytes=0-79"),
        ("s3", "Range", "bytes=64-127", RangeAsked(64, 127, None, "range"), "bytes=80-159"),
        ("s3", "Range", "bytes=63-64", RangeAsked(63, 64, None, "range"), "bytes=0-159"),
        ("s3", "Range", "bytes=100-", RangeAsked(100, None, None, "range"), "bytes=80-"),
        ("gcs", "Range", "bytes = 5 - 9", RangeAsked(5, 9, None, "range"), "bytes=0-79"),
        (
            "azure_blob",
            "x-ms-range",
            "bytes=128-128",
            RangeAsked(128, 128, None, "x-ms-range"),
            "bytes=160-239",
        ),
        # Azure also honours a plain Range: it is sent on as x-ms-range
        ("azure_blob", "Range", "bytes=0-", RangeAsked(0, None, None, "range"), "bytes=0-"),
    ],
)
def test_a_range_becomes_the_chunks_covering_it(
    kind: str, header: str, value: str, asked: RangeAsked, upstream: str
) -> None:
    got, changes = range_request(kind, [(header, value), ("If-Range", '"etag"')], SPEC)
    assert got == asked
    assert {"if-range", header.lower()} <= set(changes.remove)
    upstream_name = {"s3": "Range", "gcs": "Range", "azure_blob": "X-Ms-Range"}[kind]
    assert changes.set == [(upstream_name, upstream)]


def test_a_suffix_range_fetches_the_whole_object() -> None:
    asked, changes = range_request("s3", [("Range", "bytes=-50")], SPEC)
    assert asked == RangeAsked(None, None, 50, "range")
    assert "range" in changes.remove and changes.set == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("Range", "bytes=0-1"), ("x-ms-range", "bytes=0-1")], 400),
        ([("Range", "bytes=0-1"), ("range", "bytes=2-3")], 400),
        ([("Range", "bytes=0-1,4-5")], 416),
        ([("Range", "bytes=5-1")], 416),
        ([("Range", "bytes=abc")], 416),
        ([("Range", "bytes=")], 416),
        ([("Range", "bytes=-")], 416),
        ([("Range", "bytes=1" + "0" * 19 + "-")], 416),
        ([("Range", "items=0-1")], 400),
        ([("Range", "")], 400),
        ([("x-ms-range", "0-1")], 400),
    ],
)
def test_unreadable_ranges_are_refused(headers: Headers, status: int) -> None:
    with pytest.raises(EnvelopeRefused) as info:
        range_request("azure_blob", headers, SPEC)
    assert info.value.status == status


# -- plan_download ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "azure_blob", "gcs"])
def test_a_whole_object_read(kind: str) -> None:
    ct, stored = store(kind)
    plan = plan_download(kind, 200, stored, SPEC, None, head=False)
    assert plan.length == len(PLAIN) and plan.changes.status is None
    out = apply(stored, plan.changes)
    assert values(out, "content-length") == [str(len(PLAIN))]
    assert values(out, "etag") == ['"abc"']
    assert not [n for n, _ in out if "casb" in n.lower()]
    assert not values(out, "x-amz-checksum-crc32") and not values(out, "content-md5")
    assert not values(out, "x-ms-content-crc64")
    assert plan.opener is not None
    assert run(opener_transform(plan.opener), cut(ct, random.Random(4), 33)) == PLAIN


RANGES = [
    (0, 0),
    (0, 63),
    (63, 64),
    (100, 199),
    (128, 191),
    (250, None),
    (0, 299),
    (299, 299),
    (10, 10_000),
    (256, 299),
]


@pytest.mark.parametrize("kind", ["s3", "azure_blob"])
@pytest.mark.parametrize(("start", "end"), RANGES)
def test_ranged_reads_round_trip(kind: str, start: int, end: int | None) -> None:
    ct, stored = store(kind)
    name = "Range" if kind == "s3" else "x-ms-range"
    value = f"bytes={start}-" + ("" if end is None else str(end))
    asked, req_changes = range_request(kind, [(name, value)], SPEC)
    first, last = upstream_slice(ct, req_changes, kind)
    assert first % FULL == 0  # whole chunks are fetched
    answer = ranged(stored, first, last, len(ct))
    plan = plan_download(kind, 206, answer, SPEC, asked, head=False)
    stop = len(PLAIN) - 1 if end is None else min(end, len(PLAIN) - 1)
    expected = PLAIN[start : stop + 1]
    assert plan.changes.status == 206 and plan.length == len(expected)
    out = apply(answer, plan.changes)
    assert values(out, "content-range") == [f"bytes {start}-{stop}/{len(PLAIN)}"]
    assert values(out, "content-length") == [str(len(expected))]
    assert not [n for n, _ in out if "casb" in n.lower()]
    assert plan.opener is not None
    pieces = cut(ct[first : last + 1], random.Random(start), 17)
    assert run(opener_transform(plan.opener), pieces) == expected


@pytest.mark.parametrize(("start", "end"), RANGES)
def test_a_store_that_ignores_range_still_gives_the_slice(start: int, end: int | None) -> None:
    ct, stored = store("s3")
    value = f"bytes={start}-" + ("" if end is None else str(end))
    asked, _ = range_request("s3", [("Range", value)], SPEC)
    plan = plan_download("s3", 200, stored, SPEC, asked, head=False)
    stop = len(PLAIN) - 1 if end is None else min(end, len(PLAIN) - 1)
    assert plan.changes.status == 206 and plan.opener is not None
    assert (
        run(opener_transform(plan.opener), cut(ct, random.Random(9), 41))
        == (PLAIN[start : stop + 1])
    )


@pytest.mark.parametrize(("suffix", "start"), [(50, 250), (1, 299), (300, 0), (5000, 0)])
def test_a_suffix_range_is_cut_from_the_whole_object(suffix: int, start: int) -> None:
    ct, stored = store("azure_blob")
    asked, _ = range_request("azure_blob", [("x-ms-range", f"bytes=-{suffix}")], SPEC)
    plan = plan_download("azure_blob", 200, stored, SPEC, asked, head=False)
    out = apply(stored, plan.changes)
    assert plan.changes.status == 206
    assert values(out, "content-range") == [f"bytes {start}-299/300"]
    assert values(out, "content-length") == [str(300 - start)]
    assert plan.opener is not None
    assert run(opener_transform(plan.opener), cut(ct, random.Random(1), 64)) == PLAIN[start:]


def test_a_suffix_range_answered_partially_is_refused() -> None:
    ct, stored = store("s3")
    asked, _ = range_request("s3", [("Range", "bytes=-10")], SPEC)
    answer = ranged(stored, 300, 379, len(ct))
    with pytest.raises(IntegrityError):
        plan_download("s3", 206, answer, SPEC, asked, head=False)


@pytest.mark.parametrize("value", ["bytes=300-", "bytes=300-400", "bytes=9999-", "bytes=-0"])
def test_a_range_beyond_the_end_is_416(value: str) -> None:
    ct, stored = store("s3")
    asked, _ = range_request("s3", [("Range", value)], SPEC)
    answer = ranged(stored, 320, 379, len(ct))
    for status, headers in ((206, answer), (200, stored)):
        with pytest.raises(EnvelopeRefused) as info:
            plan_download("s3", status, headers, SPEC, asked, head=False)
        assert (info.value.status, info.value.code) == (416, "range_not_satisfiable")


def test_any_range_of_an_empty_object_is_416() -> None:
    _, stored = store("s3", b"")
    asked, _ = range_request("s3", [("Range", "bytes=0-")], SPEC)
    with pytest.raises(EnvelopeRefused) as info:
        plan_download("s3", 200, stored, SPEC, asked, head=False)
    assert info.value.status == 416


def test_a_partial_answer_to_a_whole_read_is_refused() -> None:
    ct, stored = store("s3")
    answer = ranged(stored, 0, 79, len(ct))
    with pytest.raises(IntegrityError):
        plan_download("s3", 206, answer, SPEC, None, head=False)


@pytest.mark.parametrize("content_range", [None, "bytes 0-159/380", "bytes junk", "bytes 80-*/380"])
def test_a_partial_answer_from_the_wrong_place_is_refused(content_range: str | None) -> None:
    _, stored = store("s3")
    asked, _ = range_request("s3", [("Range", "bytes=100-110")], SPEC)  # asks from 80
    answer = stored + ([("Content-Range", content_range)] if content_range else [])
    with pytest.raises(EnvelopeError):
        plan_download("s3", 206, answer, SPEC, asked, head=False)


def test_an_object_stored_with_another_chunk_size_cannot_be_read_by_range() -> None:
    ct, stored = store("s3")
    other = EnvelopeSpec(KEYS, 2 * CHUNK, 1 << 20)
    asked, _ = range_request("s3", [("Range", "bytes=0-9")], other)
    answer = ranged(stored, 0, 159, len(ct))
    with pytest.raises(EnvelopeError, match="chunk size"):
        plan_download("s3", 206, answer, other, asked, head=False)
    whole = plan_download("s3", 200, stored, other, None, head=False)  # read whole: fine
    assert whole.opener is not None
    assert whole_transform(opener_transform(whole.opener), ct) == PLAIN


def test_a_tampered_ranged_read_releases_nothing_of_the_bad_chunk() -> None:
    ct, stored = store("s3")
    asked, changes = range_request("s3", [("Range", "bytes=100-199")], SPEC)
    first, last = upstream_slice(ct, changes, "s3")
    body = bytearray(ct[first : last + 1])
    body[FULL + 3] ^= 1  # second fetched chunk
    answer = ranged(stored, first, last, len(ct))
    plan = plan_download("s3", 206, answer, SPEC, asked, head=False)
    assert plan.opener is not None
    transform = opener_transform(plan.opener)
    got = transform(bytes(body[:FULL]))
    assert b"".join(got) == PLAIN[100:128]  # the verified first chunk only
    with pytest.raises(IntegrityError):
        transform(bytes(body[FULL:]))


@pytest.mark.parametrize("delta", [-1, 1, 10**9])
def test_a_stored_size_other_than_the_metadata_says_is_refused_before_reading(
    delta: int,
) -> None:
    ct, stored = store("s3")
    answer = [(n, v) for n, v in stored if n.lower() != "content-length"]
    answer.append(("Content-Length", str(len(ct) + delta)))
    with pytest.raises(IntegrityError, match="size does not match"):
        plan_download("s3", 200, answer, SPEC, None, head=False)


@pytest.mark.parametrize("head", [False, True])
def test_an_object_without_envelope_metadata_is_refused(head: bool) -> None:
    stored = [("Content-Length", "5"), ("x-amz-meta-owner", "x"), ("ETag", '"e"')]
    with pytest.raises(IntegrityError, match="not envelope-encrypted"):
        plan_download("s3", 200, stored, SPEC, None, head=head)


def test_metadata_of_another_store_kind_does_not_count() -> None:
    _, stored = store("s3")  # x-amz-meta-casb-*, read as an Azure blob
    with pytest.raises(IntegrityError):
        plan_download("azure_blob", 200, stored, SPEC, None, head=False)


@pytest.mark.parametrize("kind", ["s3", "azure_blob"])
def test_head_reports_the_plaintext_length(kind: str) -> None:
    _, stored = store(kind)
    asked, _ = range_request(kind, [("Range", "bytes=0-9")], SPEC)
    for rng in (None, asked):
        plan = plan_download(kind, 200, stored, SPEC, rng, head=True)
        assert plan.opener is None and plan.length == len(PLAIN)
        out = apply(stored, plan.changes)
        assert values(out, "content-length") == [str(len(PLAIN))]
        assert not [n for n, _ in out if "casb" in n.lower()]
        assert not values(out, "x-amz-checksum-crc32") and not values(out, "content-md5")


def test_a_ranged_head_answered_206_stays_a_consistent_answer() -> None:
    # A HEAD is sent upstream with the ciphertext Range (range_request runs for
    # METADATA too) and S3 answers a ranged HEAD with 206 + Content-Range. The client
    # must then get either 206 with the plaintext Content-Range and length, or 200 with
    # the whole length; never 206 without Content-Range.
    ct, stored = store("s3")
    asked, changes = range_request("s3", [("Range", "bytes=0-9")], SPEC)
    first, last = upstream_slice(ct, changes, "s3")
    answer = [(n, v) for n, v in stored if n.lower() != "content-length"]
    answer += [
        ("Content-Length", str(last - first + 1)),
        ("Content-Range", f"bytes {first}-{last}/{len(ct)}"),
    ]
    plan = plan_download("s3", 206, answer, SPEC, asked, head=True)
    out = apply(answer, plan.changes)
    status = plan.changes.status or 206
    if status == 206:
        assert values(out, "content-range") == [f"bytes 0-9/{len(PLAIN)}"]
        assert values(out, "content-length") == ["10"]
    else:
        assert status == 200 and not values(out, "content-range")
        assert values(out, "content-length") == [str(len(PLAIN))]


def test_metadata_names_in_any_case_are_read() -> None:
    ct, stored = store("s3")
    shouted = [(n.title() if "casb" in n else n, v) for n, v in stored]
    plan = plan_download("s3", 200, shouted, SPEC, None, head=False)
    assert plan.opener is not None
    assert whole_transform(opener_transform(plan.opener), ct) == PLAIN
    assert not [n for n, _ in apply(shouted, plan.changes) if "casb" in n.lower()]


def test_an_object_sealed_under_an_unknown_key_is_refused() -> None:
    _, stored = store("s3")
    other = LocalKeyring("kek-other", {"kek-other": bytes(32)})
    with pytest.raises(IntegrityError):
        plan_download("s3", 200, stored, EnvelopeSpec(other, CHUNK, 0), None, head=False)


# -- envelope_ops -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "operation", "method", "op"),
    [
        ("s3", "PutObject", "PUT", EnvelopeOp.ENCRYPT),
        ("s3", "GetObject", "GET", EnvelopeOp.DECRYPT),
        ("s3", "GetObject", "HEAD", EnvelopeOp.METADATA),
        ("s3", "ListObjectsV2", "GET", EnvelopeOp.PASS),
        ("s3", "ListObjects", "GET", EnvelopeOp.PASS),
        ("s3", "ListBuckets", "GET", EnvelopeOp.PASS),
        ("s3", "DeleteObject", "DELETE", EnvelopeOp.PASS),
        ("s3", "DeleteObjects", "POST", EnvelopeOp.PASS),
        ("s3", "AbortMultipartUpload", "DELETE", EnvelopeOp.PASS),
        ("azure_blob", "PutBlob", "PUT", EnvelopeOp.ENCRYPT),
        ("azure_blob", "GetBlob", "GET", EnvelopeOp.DECRYPT),
        ("azure_blob", "GetBlob", "HEAD", EnvelopeOp.METADATA),
        ("azure_blob", "ListBlobs", "GET", EnvelopeOp.PASS),
        ("azure_blob", "DeleteBlob", "DELETE", EnvelopeOp.PASS),
        ("gcs", "XmlPutObject", "PUT", EnvelopeOp.ENCRYPT),
        ("gcs", "XmlGetObject", "GET", EnvelopeOp.DECRYPT),
        ("gcs", "XmlGetObject", "HEAD", EnvelopeOp.METADATA),
        ("gcs", "XmlListObjects", "GET", EnvelopeOp.PASS),
        ("gcs", "XmlDeleteObject", "DELETE", EnvelopeOp.PASS),
    ],
)
def test_operations_envelope_encryption_serves(
    kind: str, operation: str, method: str, op: EnvelopeOp
) -> None:
    got = envelope_op(kind, operation, method=method, headers=[], copy_in_destination=False)
    assert got is op


@pytest.mark.parametrize(
    ("kind", "operation"),
    [
        ("s3", "CreateMultipartUpload"),
        ("s3", "UploadPart"),
        ("s3", "UploadPartCopy"),
        ("s3", "CompleteMultipartUpload"),
        ("s3", "PostObject"),
        ("azure_blob", "PutBlock"),
        ("azure_blob", "PutBlockList"),
        ("azure_blob", "CopyBlob"),
        ("gcs", "InsertObject:media"),
        ("gcs", "InsertObject:multipart"),
        ("gcs", "InsertObject:resumable"),
        ("gcs", "ResumableUpload"),
        ("gcs", "GetObject"),  # JSON API reads: metadata cannot be translated
        ("gcs", "PutObject"),  # an S3 operation name on another store
        ("dicomweb", "PutObject"),
        ("s3", ""),
    ],
)
def test_operations_envelope_encryption_refuses(kind: str, operation: str) -> None:
    got = envelope_op(kind, operation, method="PUT", headers=[], copy_in_destination=True)
    assert isinstance(got, str) and "cannot be envelope-encrypted" in got
    assert (operation or "this request") in got


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ([], True),
        ([("x-amz-metadata-directive", "COPY")], True),
        ([("X-Amz-Metadata-Directive", " copy ")], True),
        ([("x-amz-metadata-directive", "REPLACE")], False),
        ([("x-amz-metadata-directive", "COPY"), ("x-amz-metadata-directive", "REPLACE")], False),
        ([("x-amz-metadata-directive", "")], False),
    ],
)
def test_copies_keep_the_metadata(headers: Headers, allowed: bool) -> None:
    got = envelope_op("s3", "CopyObject", method="PUT", headers=headers, copy_in_destination=True)
    if allowed:
        assert got is EnvelopeOp.PASS
    else:
        assert isinstance(got, str) and "x-amz-metadata-directive: COPY" in got


def test_copies_only_within_the_destination() -> None:
    got = envelope_op(
        "s3",
        "CopyObject",
        method="PUT",
        headers=[("x-amz-metadata-directive", "COPY")],
        copy_in_destination=False,
    )
    assert isinstance(got, str) and "same bucket" in got


def test_metadata_names_per_store() -> None:
    assert meta_name("s3", "casb-kek") == "x-amz-meta-casb-kek"
    assert meta_name("gcs", "casb-kek") == "x-goog-meta-casb-kek"
    assert meta_name("azure_blob", "casb-kek") == "x-ms-meta-casb_kek"
