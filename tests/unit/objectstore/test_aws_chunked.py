"""casb.objectstore.aws_chunked: framing, trailers, checksums, hostile inputs, arbitrary
splits, and what boto3 really sends (captured from a real put_object over https)."""

from __future__ import annotations

import base64
import hashlib
import random
import ssl
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from casb.objectstore.aws_chunked import (
    ECDSA_TRAILER,
    MAX_LINE,
    SIGNED,
    SIGNED_TRAILER,
    UNSIGNED_TRAILER,
    AwsChunkedDecoder,
    AwsChunkedError,
)
from tests.support.pki import tls_files

SIG = "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def checksum(name: str, data: bytes) -> str:
    if name == "x-amz-checksum-crc32":
        return b64(zlib.crc32(data).to_bytes(4, "big"))
    if name == "x-amz-checksum-sha1":
        return b64(hashlib.sha1(data).digest())
    if name == "x-amz-checksum-sha256":
        return b64(hashlib.sha256(data).digest())
    return "AAAAAA=="  # crc32c / crc64nvme: not verified by the decoder


def encode(
    data: bytes,
    sizes: list[int],
    *,
    mode: str = UNSIGNED_TRAILER,
    trailers: dict[str, str] | None = None,
    blank_before_trailers: bool = False,
) -> bytes:
    """The aws-chunked encoding of `data` cut into chunks of `sizes` (tests only)."""
    signed = mode != UNSIGNED_TRAILER
    ext = f";chunk-signature={SIG}".encode() if signed else b""
    out = bytearray()
    pos = 0
    for size in sizes:
        piece = data[pos : pos + size]
        pos += size
        out += f"{len(piece):x}".encode() + ext + b"\r\n" + piece + b"\r\n"
    assert pos >= len(data), "sizes must cover the data"
    out += b"0" + ext + b"\r\n"
    if blank_before_trailers:
        out += b"\r\n"
    for name, value in (trailers or {}).items():
        out += f"{name}:{value}\r\n".encode()
    if signed and mode.endswith("-TRAILER"):
        out += f"x-amz-trailer-signature:{SIG}\r\n".encode()
    out += b"\r\n"
    return bytes(out)


def decode(
    body: bytes,
    declared: int,
    pieces: list[int] | None = None,
    *,
    mode: str = UNSIGNED_TRAILER,
    trailer: str | None = None,
) -> tuple[bytes, AwsChunkedDecoder]:
    decoder = AwsChunkedDecoder(declared, mode=mode, trailer=trailer)
    out: list[bytes] = []
    pos = 0
    for size in pieces or [len(body)]:
        out += decoder.feed(body[pos : pos + size])
        pos += size
    out += decoder.feed(body[pos:])
    out += decoder.finish()
    return b"".join(out), decoder


def random_sizes(rng: random.Random, total: int, cap: int) -> list[int]:
    sizes = []
    while total > 0:
        size = rng.randint(1, cap)
        sizes.append(min(size, total))
        total -= size
    return sizes


# -- well-formed bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "trailer", ["x-amz-checksum-crc32", "x-amz-checksum-sha1", "x-amz-checksum-sha256"]
)
def test_unsigned_trailer_checksum_is_verified(trailer: str) -> None:
    data = bytes(range(256)) * 50
    body = encode(data, [8192, 4000, 608], trailers={trailer: checksum(trailer, data)})
    decoded, decoder = decode(body, len(data), trailer=trailer)
    assert decoded == data
    assert decoder.checksum_verified == trailer
    assert decoder.trailers == {trailer: checksum(trailer, data)}
    assert decoder.decoded_length == len(data)
    assert decoder.done


@pytest.mark.parametrize(
    "trailer", ["x-amz-checksum-crc32", "x-amz-checksum-sha1", "x-amz-checksum-sha256"]
)
def test_checksum_mismatch_raises(trailer: str) -> None:
    data = b"what the client meant to send"
    wrong = checksum(trailer, data + b"!")
    body = encode(data, [10, 19], trailers={trailer: wrong})
    with pytest.raises(AwsChunkedError, match="does not match the body") as info:
        decode(body, len(data), trailer=trailer)
    assert wrong not in info.value.reason


def test_checksum_that_is_not_base64_raises() -> None:
    body = encode(b"abc", [3], trailers={"x-amz-checksum-crc32": "not*base64"})
    with pytest.raises(AwsChunkedError, match="not base64"):
        decode(body, 3, trailer="x-amz-checksum-crc32")


@pytest.mark.parametrize("trailer", ["x-amz-checksum-crc32c", "x-amz-checksum-crc64nvme"])
def test_checksums_without_an_implementation_are_accepted_unverified(trailer: str) -> None:
    body = encode(b"abc", [3], trailers={trailer: "AAAAAA=="})
    decoded, decoder = decode(body, 3, trailer=trailer)
    assert decoded == b"abc"
    assert decoder.checksum_verified is None
    assert decoder.trailers == {trailer: "AAAAAA=="}


@pytest.mark.parametrize("blank", [False, True])
def test_signed_trailer_forms(blank: bool) -> None:
    # AWS's signed-trailer example puts a blank line between "0;chunk-signature" and the
    # trailers; HTTP-style encoders do not. Both decode the same.
    data = b"a" * 66560
    trailer = "x-amz-checksum-crc32"
    body = encode(
        data,
        [65536, 1024],
        mode=SIGNED_TRAILER,
        trailers={trailer: checksum(trailer, data)},
        blank_before_trailers=blank,
    )
    decoded, decoder = decode(body, len(data), mode=SIGNED_TRAILER, trailer=trailer)
    assert decoded == data
    assert decoder.trailers == {trailer: checksum(trailer, data)}  # signature not included


def test_signed_without_trailer() -> None:
    body = encode(b"hello world", [5, 6], mode=SIGNED)
    assert body.endswith(f"0;chunk-signature={SIG}\r\n\r\n".encode())
    decoded, decoder = decode(body, 11, mode=SIGNED)
    assert decoded == b"hello world"
    assert decoder.trailers == {}


def test_ecdsa_signature_shape_is_accepted() -> None:
    ecdsa = "3045022100" + "ab" * 32 + "*" * 20
    data = b"xyz"
    body = (
        f"3;chunk-signature={ecdsa}\r\nxyz\r\n0;chunk-signature={ecdsa}\r\n"
        f"x-amz-checksum-sha256:{checksum('x-amz-checksum-sha256', data)}\r\n"
        f"x-amz-trailer-signature:{ecdsa}\r\n\r\n"
    ).encode()
    decoded, _ = decode(body, 3, mode=ECDSA_TRAILER, trailer="x-amz-checksum-sha256")
    assert decoded == data


def test_empty_body_and_upper_case_hex() -> None:
    decoded, _ = decode(b"0\r\n\r\n", 0)
    assert decoded == b""
    decoded, _ = decode(b"A\r\n0123456789\r\n0\r\n\r\n", 10)
    assert decoded == b"0123456789"


def test_random_splits_decode_identically() -> None:
    rng = random.Random(5)
    for _ in range(60):
        data = rng.randbytes(rng.randint(0, 3000))
        mode = rng.choice([UNSIGNED_TRAILER, SIGNED_TRAILER, SIGNED])
        trailer = "x-amz-checksum-sha256" if mode != SIGNED else None
        trailers = {trailer: checksum(trailer, data)} if trailer else None
        body = encode(
            data,
            random_sizes(rng, len(data), 700),
            mode=mode,
            trailers=trailers,
            blank_before_trailers=mode == SIGNED_TRAILER and rng.random() < 0.5,
        )
        whole, reference = decode(body, len(data), mode=mode, trailer=trailer)
        assert whole == data
        split, decoder = decode(
            body, len(data), random_sizes(rng, len(body), 40), mode=mode, trailer=trailer
        )
        assert split == data
        assert decoder.trailers == reference.trailers


def test_decoded_length_counts_what_was_handed_out() -> None:
    decoder = AwsChunkedDecoder(5)
    assert decoder.feed(b"5\r\nab") == [b"ab"]
    assert decoder.decoded_length == 2
    assert decoder.feed(b"") == []  # not the end
    assert decoder.feed(b"cde\r\n0\r\n\r\n") == [b"cde"]
    assert decoder.decoded_length == 5 and decoder.done


def test_signed_trailer_ending_without_its_trailers_fails_at_finish() -> None:
    decoder = AwsChunkedDecoder(0, mode=SIGNED_TRAILER, trailer="x-amz-checksum-crc32")
    assert decoder.feed(f"0;chunk-signature={SIG}\r\n\r\n".encode()) == []
    with pytest.raises(AwsChunkedError, match="declared trailer missing"):
        decoder.finish()
    with pytest.raises(AwsChunkedError, match="already failed"):
        decoder.finish()


def test_byte_by_byte() -> None:
    data = b"byte by byte"
    body = encode(
        data, [4, 4, 4], trailers={"x-amz-checksum-crc32": checksum("x-amz-checksum-crc32", data)}
    )
    decoded, decoder = decode(body, len(data), [1] * len(body), trailer="x-amz-checksum-crc32")
    assert decoded == data
    assert decoder.checksum_verified == "x-amz-checksum-crc32"


# -- malformed bodies -------------------------------------------------------------------


def test_every_truncation_raises() -> None:
    data = b"0123456789abcdef"
    trailer = "x-amz-checksum-crc32"
    for mode in (UNSIGNED_TRAILER, SIGNED_TRAILER):
        body = encode(data, [7, 9], mode=mode, trailers={trailer: checksum(trailer, data)})
        for cut in range(len(body)):
            decoder = AwsChunkedDecoder(len(data), mode=mode, trailer=trailer)
            with pytest.raises(AwsChunkedError):
                decoder.feed(body[:cut])
                decoder.finish()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"0x3\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
        (b" 3\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
        (b"+3\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
        (b"-3\r\nabc\r\n0\r\n\r\n", "invalid chunk size"),
        (b"1_1\r\n", "invalid chunk size"),
        (b"g\r\n", "invalid chunk size"),
        (b"\r\n", "invalid chunk size"),
        (b"3 \r\nabc\r\n", "invalid chunk size"),
        (b"11111111111111111\r\n", "invalid chunk size"),
        (b"3\nabc\r\n0\r\n\r\n", "does not end with CRLF"),
        (b"3\r\nabcX\r\n", "not followed by CRLF"),
        (b"3\r\nabc\rX", "not followed by CRLF"),
        (b"3\r\nabc\r\n0\r\n\r\nmore", "data after the end"),
        (b"3;foo=bar\r\nabc\r\n", "unexpected chunk extension"),
        (b"4\r\nabcd\r\n", "longer than x-amz-decoded-content-length"),
        (b"ffffffffffffffff\r\n", "longer than x-amz-decoded-content-length"),
        (b"2\r\nab\r\n0\r\n\r\n", "shorter than x-amz-decoded-content-length"),
        (b"3\r\nabc\r\n0\r\nx-amz-meta-evil:1\r\n\r\n", "not declared"),
        (b"3\r\nabc\r\n0\r\nno colon\r\n\r\n", "malformed aws-chunked trailer"),
    ],
)
def test_malformed_unsigned_bodies_raise(body: bytes, reason: str) -> None:
    decoder = AwsChunkedDecoder(3)
    with pytest.raises(AwsChunkedError, match=reason) as info:
        decoder.feed(body)
        decoder.finish()
    assert b"evil" not in info.value.reason.encode()
    # The failure is sticky.
    with pytest.raises(AwsChunkedError, match="already failed"):
        decoder.feed(b"0\r\n\r\n")


def test_huge_size_lines_raise_without_buffering() -> None:
    for line in (b"f" * (MAX_LINE + 1), b"1;chunk-signature=" + b"a" * MAX_LINE):
        decoder = AwsChunkedDecoder(10, mode=SIGNED)
        with pytest.raises(AwsChunkedError, match="longer than 4 KiB"):
            for i in range(0, len(line), 100):  # arriving in pieces, no CRLF yet
                decoder.feed(line[i : i + 100])
    decoder = AwsChunkedDecoder(10)
    with pytest.raises(AwsChunkedError, match="longer than 4 KiB"):
        decoder.feed(b"1" * 10_000_000)


@pytest.mark.parametrize(
    "line",
    [
        b"3\r\n",  # signature missing
        b"3;chunk-signature=abc\r\n",  # too short
        b"3;chunk-signature=" + b"A" * 64 + b"\r\n",  # upper case hex
        b"3;chunk-signature=" + b"a" * 64 + b";x=y\r\n",  # extra extension
        b"3;chunk-signature=" + b"a" * 65 + b"\r\n",
    ],
)
def test_signed_chunks_need_a_well_formed_signature(line: bytes) -> None:
    with pytest.raises(AwsChunkedError, match="chunk signature"):
        AwsChunkedDecoder(3, mode=SIGNED).feed(line)


def test_signed_trailer_needs_its_signature_once() -> None:
    trailer = "x-amz-checksum-crc32"
    value = checksum(trailer, b"abc")
    head = f"3;chunk-signature={SIG}\r\nabc\r\n0;chunk-signature={SIG}\r\n".encode()
    missing = head + f"{trailer}:{value}\r\n\r\n".encode()
    with pytest.raises(AwsChunkedError, match="trailer signature missing"):
        decode(missing, 3, mode=SIGNED_TRAILER, trailer=trailer)
    twice = (
        head
        + (
            f"{trailer}:{value}\r\nx-amz-trailer-signature:{SIG}\r\n"
            f"x-amz-trailer-signature:{SIG}\r\n\r\n"
        ).encode()
    )
    with pytest.raises(AwsChunkedError, match="invalid trailer signature"):
        decode(twice, 3, mode=SIGNED_TRAILER, trailer=trailer)


def test_trailer_rules() -> None:
    trailer = "x-amz-checksum-crc32"
    value = checksum(trailer, b"abc")
    # Sent twice.
    body = f"3\r\nabc\r\n0\r\n{trailer}:{value}\r\n{trailer}:{value}\r\n\r\n".encode()
    with pytest.raises(AwsChunkedError, match="sent twice"):
        decode(body, 3, trailer=trailer)
    # Declared but never sent (also with the blank-line form).
    for body in (b"3\r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n\r\n"):
        with pytest.raises(AwsChunkedError, match="declared trailer missing"):
            decode(body, 3, trailer=trailer)
    # Case-insensitive names; whitespace around the value tolerated.
    body = f"3\r\nabc\r\n0\r\nX-Amz-Checksum-CRC32: {value} \r\n\r\n".encode()
    _, decoder = decode(body, 3, trailer="X-Amz-Checksum-Crc32")
    assert decoder.trailers == {trailer: value}
    assert decoder.checksum_verified == trailer
    # The trailer signature is only a trailer in the signed forms.
    body = f"3\r\nabc\r\n0\r\nx-amz-trailer-signature:{SIG}\r\n\r\n".encode()
    with pytest.raises(AwsChunkedError, match="not declared"):
        decode(body, 3)
    # A trailer in a form that has none.
    text = f"3;chunk-signature={SIG}\r\nabc\r\n0;chunk-signature={SIG}\r\n{trailer}:{value}\r\n"
    with pytest.raises(AwsChunkedError, match="data after the end"):
        decode(text.encode(), 3, mode=SIGNED)


def test_constructor_refusals() -> None:
    with pytest.raises(AwsChunkedError, match="unsupported x-amz-content-sha256"):
        AwsChunkedDecoder(1, mode="UNSIGNED-PAYLOAD")
    with pytest.raises(AwsChunkedError, match="decoded-content-length"):
        AwsChunkedDecoder(-1)
    with pytest.raises(AwsChunkedError, match="unsupported trailer"):
        AwsChunkedDecoder(1, trailer="x-amz-meta-evil")
    with pytest.raises(AwsChunkedError, match="twice"):
        AwsChunkedDecoder(1, trailer="x-amz-checksum-crc32, X-Amz-Checksum-CRC32")
    with pytest.raises(AwsChunkedError, match="without trailers"):
        AwsChunkedDecoder(1, mode=SIGNED, trailer="x-amz-checksum-crc32")


def test_memory_stays_bounded_on_a_large_body() -> None:
    data = random.Random(1).randbytes(4 * 1024 * 1024)
    body = encode(
        data,
        [1024 * 1024] * 4,
        trailers={"x-amz-checksum-crc32": checksum("x-amz-checksum-crc32", data)},
    )
    decoder = AwsChunkedDecoder(len(data), trailer="x-amz-checksum-crc32")
    total = 0
    digest = hashlib.sha256()
    for i in range(0, len(body), 65536):
        for piece in decoder.feed(body[i : i + 65536]):
            assert len(piece) <= 65536  # never more than what arrived
            total += len(piece)
            digest.update(piece)
        assert len(decoder._line) <= MAX_LINE
    decoder.finish()
    assert total == len(data) and digest.digest() == hashlib.sha256(data).digest()


# -- what boto3 really sends ------------------------------------------------------------


class _Capture(BaseHTTPRequestHandler):
    captured: list[tuple[dict[str, str], bytes]] = []  # noqa: RUF012 (per-test reset)
    protocol_version = "HTTP/1.1"  # answers boto3's "Expect: 100-continue"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _read_http_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                return bytes(body)
            body += self.rfile.read(size)
            assert self.rfile.read(2) == b"\r\n"

    def do_PUT(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = self._read_http_chunked()
        else:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.captured.append(({k.lower(): v for k, v in self.headers.items()}, raw))
        self.send_response(200)
        self.send_header("ETag", '"0"')
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def tls_capture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    files = tls_files(tmp_path_factory.mktemp("pki"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(files.server_cert), str(files.server_key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", files.ca_pem
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("algorithm", [None, "SHA256", "SHA1", "CRC32"])
def test_decodes_what_boto3_put_object_sends(
    tls_capture: tuple[str, Path], algorithm: str | None
) -> None:
    url, ca = tls_capture
    client = boto3.client(
        "s3",
        endpoint_url=url,
        verify=str(ca),
        region_name="eu-west-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=5,
            read_timeout=5,
        ),
    )
    data = random.Random(7).randbytes(1024 * 1024 + 12345)  # more than one 1 MiB chunk
    _Capture.captured = []
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    client.put_object(Bucket="bucket", Key="dir/scan.dcm", Body=data, **extra)
    ((headers, raw),) = _Capture.captured
    assert headers["content-encoding"] == "aws-chunked"
    mode = headers["x-amz-content-sha256"]
    assert mode == UNSIGNED_TRAILER
    expected = f"x-amz-checksum-{(algorithm or 'CRC32').lower()}"
    assert headers["x-amz-trailer"] == expected
    decoder = AwsChunkedDecoder(
        int(headers["x-amz-decoded-content-length"]), mode=mode, trailer=headers["x-amz-trailer"]
    )
    rng = random.Random(3)
    out: list[bytes] = []
    for size in random_sizes(rng, len(raw), 70000):
        out += decoder.feed(raw[:size])
        raw = raw[size:]
    out += decoder.finish()
    assert b"".join(out) == data
    assert decoder.checksum_verified == expected
    assert decoder.trailers[expected] == checksum(expected, data)
