"""casb.objectstore.form_upload: PostObject fields are known before any byte moves, and the
bytes that move are exactly the bytes received."""

from __future__ import annotations

import random

import pytest
import requests

from casb.objectstore.form_upload import (
    MAX_FIELD_BYTES,
    FormUploadError,
    PostObjectFields,
    parse_boundary,
)

BOUNDARY = "----casbFormBoundary7MA4YWxkTrZu0gW"
CT = f"multipart/form-data; boundary={BOUNDARY}"
FILE = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 40


def part(disposition: str, value: bytes, extra: str = "") -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode()
        + value
        + b"\r\n"
    )


def field(name: str, value: str) -> bytes:
    return part(f'form-data; name="{name}"', value.encode())


def file_part(content: bytes = FILE, filename: str | None = "scan.dcm") -> bytes:
    disposition = 'form-data; name="file"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return part(disposition, content, "Content-Type: application/dicom\r\n")


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


FIELDS = [
    ("key", "uploads/study-1/scan.dcm"),
    ("Content-Type", "application/dicom"),
    ("x-amz-server-side-encryption", "aws:kms"),
    ("X-Amz-Meta-Modality", "CT"),
    ("policy", "eyJleHBpcmF0aW9uIjoiMjAzMC0wMS0wMVQwMDowMDowMFoifQ=="),
    ("x-amz-signature", "0" * 64),
]
BODY = form(*(field(n, v) for n, v in FIELDS), file_part())


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[object] = []
        self.fail = fail

    def __call__(self, fields: dict[str, str]) -> None:
        self.events.append(("fields", dict(fields)))
        if self.fail:
            raise PermissionError("policy says no")


def run(
    body: bytes, sizes: list[int] | None = None, content_type: str = CT
) -> tuple[bytes, PostObjectFields, Recorder]:
    recorder = Recorder()
    stream = PostObjectFields(content_type, recorder)
    out = bytearray()
    pos = 0
    for size in [*(sizes or []), len(body)]:
        for piece in stream.feed(body[pos : pos + size]):
            recorder.events.append(("bytes", len(piece)))
            out += piece
        pos += size
    stream.feed(b"")
    return bytes(out), stream, recorder


EXPECTED_FIELDS = {name.lower(): value for name, value in FIELDS}


def test_fields_in_one_chunk() -> None:
    out, stream, recorder = run(BODY)
    assert out == BODY
    assert stream.fields == EXPECTED_FIELDS
    assert stream.key == "uploads/study-1/scan.dcm"
    assert stream.filename == "scan.dcm"
    assert recorder.events == [("fields", EXPECTED_FIELDS), ("bytes", len(BODY))]


def test_split_byte_by_byte() -> None:
    out, stream, recorder = run(BODY, [1] * len(BODY))
    assert out == BODY
    assert stream.fields == EXPECTED_FIELDS
    # The callback ran once, before the first byte was handed out.
    assert recorder.events[0] == ("fields", EXPECTED_FIELDS)
    assert [e for e in recorder.events if e[0] == "fields"] == [recorder.events[0]]  # type: ignore[index]


def test_random_splits_forward_exactly_what_was_received() -> None:
    rng = random.Random(11)
    tail = field("ignored-after-file", "S3 ignores this")  # parts after the file pass through
    body = form(*(field(n, v) for n, v in FIELDS), file_part(rng.randbytes(200_000)), tail)
    for _ in range(30):
        sizes = []
        remaining = len(body)
        while remaining > 0:
            size = min(rng.choice([1, 7, 100, 4096, 70_000]), remaining)
            sizes.append(size)
            remaining -= size
        out, stream, _ = run(body, sizes)
        assert out == body
        assert "ignored-after-file" not in stream.fields


def test_nothing_is_released_before_the_file_headers() -> None:
    stream = PostObjectFields(CT, Recorder())
    head = BODY[: BODY.index(b'name="file"')]
    assert stream.feed(head) == []
    assert not stream.released and stream.fields == {} and stream.key is None


def test_requests_encoded_form() -> None:
    prepared = requests.Request(
        "POST",
        "http://bucket.s3.localhost/",
        data=dict(FIELDS),
        files={"file": ("scan.dcm", FILE, "application/dicom")},
    ).prepare()
    body = prepared.body
    assert isinstance(body, bytes)
    out, stream, _ = run(body, [333] * (len(body) // 333), str(prepared.headers["Content-Type"]))
    assert out == body
    assert stream.fields == EXPECTED_FIELDS


def test_filename_variable_in_key() -> None:
    body = form(field("key", "uploads/${filename}"), file_part(filename="ct 1.dcm"))
    _, stream, _ = run(body)
    assert stream.key == "uploads/ct 1.dcm"
    assert stream.fields["key"] == "uploads/${filename}"
    for filename in (None, "../../etc/x.dcm"):
        body = form(field("key", "uploads/${filename}"), file_part(filename=filename))
        with pytest.raises(FormUploadError, match=r"\$\{filename\}"):
            run(body)
    # Backslashes in quoted parameters are refused whatever the key: parsers disagree on
    # whether they escape.
    body = form(field("key", "k"), file_part(filename="C:\\x.dcm"))
    with pytest.raises(FormUploadError, match="malformed Content-Disposition"):
        run(body)


def test_on_fields_refusal_releases_nothing() -> None:
    recorder = Recorder(fail=True)
    stream = PostObjectFields(CT, recorder)
    with pytest.raises(PermissionError):
        stream.feed(BODY)
    assert recorder.events == [("fields", EXPECTED_FIELDS)]
    with pytest.raises(FormUploadError, match="already failed"):
        stream.feed(b"more")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (form(file_part(), field("key", "k")), "no key field before the file"),
        (form(field("key", "k"), field("acl", "private")), "without a file field"),
        (form(field("key", "a"), field("key", "b"), file_part()), "sent twice"),
        (form(field("key", "a"), field("KEY", "b"), file_part()), "sent twice"),
        (form(field("key", "a"), field("File", "x"), file_part()), "another case"),
        (form(part('form-data; name="key"; name="file"', b"k"), file_part()), "repeated"),
        (form(part("form-data; name*=UTF-8''key", b"k"), file_part()), "malformed"),
        (form(part('form-data; name="ke\\"y"', b"k"), file_part()), "malformed"),
        (form(part('attachment; name="key"', b"k"), file_part()), "not form-data"),
        (form(part("form-data", b"k"), file_part()), "without a name"),
        (
            form(f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nk\r\n".encode(), file_part()),
            "exactly one Content-Disposition",
        ),
        (
            form(
                part('form-data; name="key"', b"k", 'Content-Disposition: form-data; name="x"\r\n'),
                file_part(),
            ),
            "exactly one Content-Disposition",
        ),
        (form(part('form-data; name="key"', b"\xff\xfe"), file_part()), "not UTF-8"),
        (b"garbage before any boundary", "malformed multipart form"),
    ],
)
def test_refused_forms(body: bytes, reason: str) -> None:
    with pytest.raises(FormUploadError, match=reason) as info:
        run(body)
    assert "uploads" not in info.value.reason


def test_truncated_before_the_file_part() -> None:
    stream = PostObjectFields(CT, Recorder())
    assert stream.feed(field("key", "k")) == []
    with pytest.raises(FormUploadError, match="without a file field"):
        stream.feed(b"")


def test_field_cap() -> None:
    big = form(field("key", "k"), field("x-amz-meta-big", "v" * MAX_FIELD_BYTES), file_part())
    with pytest.raises(FormUploadError, match="64 KiB"):
        run(big)
    many = form(*(field(f"x-amz-meta-f{i}", "v" * 100) for i in range(700)), file_part())
    with pytest.raises(FormUploadError, match="64 KiB"):
        run(many, [1000] * (len(many) // 1000))
    # Framing counts too: many empty fields with a lower cap.
    empty = form(*(field(f"f{i}", "") for i in range(40)), file_part())
    with pytest.raises(FormUploadError, match="1 KiB"):
        PostObjectFields(CT, Recorder(), max_field_bytes=1024).feed(empty)


def test_the_file_part_itself_is_not_capped() -> None:
    body = form(field("key", "k"), file_part(b"\x01" * (5 * MAX_FIELD_BYTES)))
    out, stream, _ = run(body, [MAX_FIELD_BYTES] * 5)
    assert out == body and stream.key == "k"


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        ("multipart/related; boundary=abc", "not a multipart/form-data"),
        ("application/x-www-form-urlencoded", "not a multipart/form-data"),
        ("multipart/form-data", "without a boundary"),
        ("multipart/form-data; boundary=", "malformed"),
        ("multipart/form-data; boundary=a; boundary=b", "repeated"),
        ("multipart/form-data; BOUNDARY=a; boundary=b", "repeated"),
        ("multipart/form-data; boundary=" + "a" * 71, "invalid multipart boundary"),
        ('multipart/form-data; boundary="a\\"b"', "malformed"),
        ('multipart/form-data; boundary="ab\x01"', "invalid multipart boundary"),
        ("multipart/form-data; boundary=ab\u20ac", "invalid multipart boundary"),
    ],
)
def test_content_type_checks(content_type: str, reason: str) -> None:
    with pytest.raises(FormUploadError, match=reason):
        PostObjectFields(content_type, Recorder())


def test_boundary_forms() -> None:
    assert parse_boundary(CT) == BOUNDARY.encode()
    assert parse_boundary('Multipart/Form-Data ; boundary="a b:c"') == b"a b:c"
    assert parse_boundary("multipart/form-data; charset=utf-8; boundary=xyz;") == b"xyz"
