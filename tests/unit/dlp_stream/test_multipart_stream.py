"""casb.dlp.multipart_stream: the mitmproxy stream function for multipart/related bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydicom.dataset import Dataset

from casb.dlp.findings import Verdict
from casb.dlp.multipart_stream import MAX_PART_HEADER_BYTES, MultipartDicomStream
from casb.dlp.stow_response import FAILURE_BLOCKED, FAILURE_TOO_LARGE, FAILURE_UNREADABLE

from . import (
    BOUNDARY,
    CHUNKINGS,
    StandInInspector,
    dicom_part,
    inspector_names,
    instance,
    jpeg_instance,
    make_inspector,
    multipart,
    parse_multipart,
    run_stream,
)

DICOM_CT = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'
JSON_CT = f'multipart/related; type="application/dicom+json"; boundary="{BOUNDARY.decode()}"'


@pytest.fixture(params=inspector_names())
def inspector(request: pytest.FixtureRequest) -> Any:
    return make_inspector(request.param)


def new_stream(
    inspector: Any,
    content_type: str = DICOM_CT,
    *,
    mode: str = "request",
    max_header_bytes: int = 1 << 20,
    max_json_bytes: int = 1 << 20,
) -> MultipartDicomStream:
    return MultipartDicomStream(
        content_type,
        inspector,
        max_header_bytes=max_header_bytes,
        max_json_bytes=max_json_bytes,
        mode=mode,  # type: ignore[arg-type]
    )


def stream_all(body: bytes, inspector: Any, **kwargs: Any) -> tuple[bytes, MultipartDicomStream]:
    """Run the body in one chunk, 1-byte chunks and random chunks: identical outputs.

    After a fatal error only the reason must agree: how much went on before it depends on
    the chunking (output of the call that failed is withheld), and ``open_part_forwarded``
    says exactly whether anything did. Returns the random-chunk run.
    """
    runs = []
    for how in CHUNKINGS:
        stream = new_stream(inspector, **kwargs)
        out = run_stream(stream, body, how)
        assert stream.bytes_out == len(out)
        assert stream.bytes_in == len(body)
        runs.append((out, stream))
    fatals = {stream.fatal for _, stream in runs}
    assert len(fatals) == 1, fatals
    if fatals == {None}:
        assert all(out == runs[0][0] for out, _ in runs)
        assert len({len(stream.results) for _, stream in runs}) == 1
    else:
        for out, stream in runs:
            assert stream.open_part_forwarded == (out != b"")
    return runs[-1]


# -- the main cases --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["request", "response"])
def test_three_parts_one_blocked(inspector: Any, mode: str) -> None:
    kept1 = instance(nested=True, pixels=bytes(range(256)) * 4)
    blocked = instance(burned="YES")
    kept2 = jpeg_instance()
    body = multipart(
        [
            ([("Content-Type", "application/dicom"), ("Content-Length", "999")], kept1.data),
            ([("Content-Type", "application/dicom"), ("Content-ID", "<blocked@y>")], blocked.data),
            ([("Content-Type", "application/dicom"), ("Content-ID", "<x@y>")], kept2.data),
        ]
    )
    out, stream = stream_all(body, inspector, mode=mode)
    assert stream.fatal is None and not stream.open_part_forwarded
    parts = parse_multipart(out)
    assert [p.body for p in parts] == [kept1.data, kept2.data]  # byte-identical, pixels too
    assert parts[0].headers == [(b"Content-Type", b"application/dicom")]  # no Content-Length
    assert parts[1].headers == [(b"Content-Type", b"application/dicom"), (b"Content-ID", b"<x@y>")]
    assert b"Content-Length" not in out
    assert b"<blocked@y>" not in out  # a refused part leaves no trace
    assert stream.forwarded_count == 2 and stream.failed_count == 1
    failed = stream.failures[0]
    assert failed.index == 1 and failed.failure_code == FAILURE_BLOCKED
    assert failed.verdict is not None and failed.verdict.action == "block"
    assert failed.sop_instance_uid and failed.sop_class_uid
    assert any(f.rule == "burned_in_annotation.yes" for f in stream.findings)
    assert out.endswith(b"\r\n--" + BOUNDARY + b"--\r\n")


def test_mislabelled_part_is_still_inspected(inspector: Any) -> None:
    blocked = instance(burned="YES")
    kept = instance()
    body = multipart(
        [dicom_part(blocked.data, "image/jpeg"), dicom_part(kept.data, "application/octet-stream")]
    )
    out, stream = stream_all(body, inspector)
    parts = parse_multipart(out)
    assert [p.body for p in parts] == [kept.data]
    assert [r.failure_code for r in stream.results] == [FAILURE_BLOCKED, None]


def test_all_blocked_leaves_only_the_close_delimiter(inspector: Any) -> None:
    body = multipart([dicom_part(instance(burned="YES").data) for _ in range(3)])
    out, stream = stream_all(body, inspector)
    assert out == b"--" + BOUNDARY + b"--\r\n"
    assert parse_multipart(out) == []
    assert stream.failed_count == 3 and stream.forwarded_count == 0
    assert stream.fatal is None


def test_empty_multipart(inspector: Any) -> None:
    out, stream = stream_all(b"--" + BOUNDARY + b"--\r\n", inspector)
    assert out == b"--" + BOUNDARY + b"--\r\n"
    assert stream.results == [] and stream.fatal is None


def test_unparseable_and_oversized_parts_are_dropped_others_continue(inspector: Any) -> None:
    first = instance()
    second = jpeg_instance()
    body = multipart(
        [
            dicom_part(b"not DICOM, Doe^Jane" * 3),
            dicom_part(first.data),
            dicom_part(second.data),
        ]
    )
    out, stream = stream_all(body, inspector, max_header_bytes=200)
    assert parse_multipart(out) == []  # no header fits in 200 bytes
    codes = [r.failure_code for r in stream.results]
    assert codes == [FAILURE_UNREADABLE, FAILURE_TOO_LARGE, FAILURE_TOO_LARGE]
    assert all("Doe" not in (r.error or "") for r in stream.results)

    out, stream = stream_all(body, inspector)
    assert [p.body for p in parse_multipart(out)] == [first.data, second.data]
    assert [r.failure_code for r in stream.results] == [FAILURE_UNREADABLE, None, None]


def test_trailing_data_in_a_part_is_stripped(inspector: Any) -> None:
    def trailer(ds: Dataset) -> None:
        ds.add_new(0x7FE10010, "LO", "SMUGGLER")

    dirty = instance(after=trailer)
    # the trailer element: tag (4) + VR (2) + length (2) + "SMUGGLER" (8). Not measured
    # from a second instance: its generated UIDs may differ in length.
    clean_len = len(dirty.data) - 16
    out, stream = stream_all(multipart([dicom_part(dirty.data)]), inspector)
    parts = parse_multipart(out)
    assert len(parts) == 1 and len(parts[0].body) == clean_len
    assert dirty.data.startswith(parts[0].body)
    assert [f.rule for f in stream.findings if f.rule == "trailing_data"] == ["trailing_data"]
    assert stream.forwarded_count == 1


# -- broken framing ----------------------------------------------------------------------------


def test_no_opening_boundary(inspector: Any) -> None:
    body = b"garbage before anything\r\n" + multipart([dicom_part(instance().data)])
    out, stream = stream_all(body, inspector)
    assert out == b""
    assert stream.fatal == "multipart body does not start with its boundary"
    assert not stream.open_part_forwarded


def test_body_ends_while_a_part_is_forwarded(inspector: Any) -> None:
    built = instance(pixels=bytes(10_000))
    body = multipart([dicom_part(built.data)])
    cut = body[: len(body) - 3000]
    out, stream = stream_all(cut, inspector)
    assert out  # the header and part of the pixels went on
    assert stream.fatal == "body ended before the closing boundary"
    assert stream.open_part_forwarded


def test_body_ends_before_anything_was_forwarded(inspector: Any) -> None:
    body = multipart([dicom_part(instance().data)])
    out, stream = stream_all(body[:60], inspector)
    assert out == b""
    assert stream.fatal == "body ended before the closing boundary"
    assert not stream.open_part_forwarded


def test_part_truncated_inside_pixel_data_is_fatal_once_forwarded(inspector: Any) -> None:
    built = instance(pixels=bytes(10_000))
    body = multipart([dicom_part(built.data[:-500]), dicom_part(instance().data)])
    out, stream = stream_all(body, inspector)
    assert stream.fatal is not None and "part 0" in stream.fatal
    assert "truncated inside the pixel data" in stream.fatal
    assert stream.open_part_forwarded
    assert not out.endswith(b"--" + BOUNDARY + b"--\r\n")
    assert stream.results[0].failure_code == FAILURE_UNREADABLE


def test_garbage_part_headers(inspector: Any) -> None:
    body = (
        b"--"
        + BOUNDARY
        + b"\r\nContent Type\x01: x\r\n\r\n"
        + instance().data
        + b"\r\n--"
        + BOUNDARY
        + b"--\r\n"
    )
    out, stream = stream_all(body, inspector)
    assert out == b"" and stream.fatal == "malformed or oversized headers in part 0"


def test_header_value_with_control_characters(inspector: Any) -> None:
    body = multipart([([("Content-Type", "application/dicom\x00evil")], instance().data)])
    out, stream = stream_all(body, inspector)
    assert out == b"" and stream.fatal == "control characters in a header of part 0"


@pytest.mark.parametrize(
    "headers", [[("X-Big", "a" * 17_000)], [(f"X-H{i}", "b" * 600) for i in range(30)]]
)
def test_header_section_over_16_kib(inspector: Any, headers: list[tuple[str, str]]) -> None:
    body = multipart([(headers, instance().data)])
    out, stream = stream_all(body, inspector)
    assert out == b""
    assert stream.fatal is not None and "part 0" in stream.fatal
    assert MAX_PART_HEADER_BYTES == 16 * 1024


def test_header_section_just_under_the_limit_is_fine(inspector: Any) -> None:
    built = instance()
    headers = [("Content-Type", "application/dicom"), ("X-Pad", "p" * 12_000)]
    out, stream = stream_all(multipart([(headers, built.data)]), inspector)
    assert stream.fatal is None
    assert parse_multipart(out)[0].body == built.data


def test_fatal_stops_all_further_output(inspector: Any) -> None:
    stream = new_stream(inspector)
    assert stream(b"nonsense") == []
    assert stream.fatal is not None
    assert stream(multipart([dicom_part(instance().data)])) == []
    assert stream(b"") == []


# -- robustness ------------------------------------------------------------------------------


def test_inspector_bug_becomes_internal_error_and_never_raises() -> None:
    class Broken:
        def inspect(self, data: bytes, *, complete: bool) -> Verdict:
            raise KeyError("Doe^Jane")

        def inspect_json(self, dataset: dict[str, Any]) -> Any:
            raise KeyError("Doe^Jane")

    stream = new_stream(Broken())
    out = run_stream(stream, multipart([dicom_part(instance().data)]), "one")
    assert out == b""
    assert stream.fatal == "internal error: KeyError"


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("application/dicom", "not a multipart/related"),
        ('multipart/related; type="application/dicom"', "without a boundary"),
        ("multipart/related; boundary=abc; type=image/jpeg", "unsupported"),
        ("multipart/related; boundary=" + "x" * 71, "invalid multipart boundary"),
        ('multipart/related; boundary="a\\"b"', "invalid multipart boundary"),
        ("multipart/form-data; boundary=abc", "not a multipart/related"),
    ],
)
def test_bad_content_type_raises_at_construction(content_type: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        new_stream(StandInInspector(), content_type)


def test_content_type_parameters_are_case_insensitive() -> None:
    stream = new_stream(StandInInspector(), f"Multipart/Related; Boundary={BOUNDARY.decode()}")
    built = instance()
    out = run_stream(stream, multipart([dicom_part(built.data)]), "one")
    assert parse_multipart(out)[0].body == built.data


def test_parser_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    stream = new_stream(StandInInspector())
    with caplog.at_level("DEBUG"):
        stream(b"--" + BOUNDARY + b"\r\nBad Header\x01SECRET: v\r\n\r\n")
    assert stream.fatal is not None
    assert "SECRET" not in caplog.text and "\\x01" not in caplog.text


# -- the JSON + bulk data form -----------------------------------------------------------------


def _json_dataset(burned: str, uid: str, bulk_uri: str | None = None) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
        "00080018": {"vr": "UI", "Value": [uid]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00280301": {"vr": "CS", "Value": [burned]},
    }
    if bulk_uri is not None:
        ds["7FE00010"] = {"vr": "OW", "BulkDataURI": bulk_uri}
    return ds


def _bulk_headers(location: str) -> list[tuple[str, str]]:
    return [("Content-Type", "application/octet-stream"), ("Content-Location", location)]


def test_json_and_bulk_data_form() -> None:
    kept = _json_dataset("NO", "1.2.3.1", "http://x/bulk/1")
    refused = _json_dataset("YES", "1.2.3.2", "http://x/bulk/2")
    dicom_kept = instance()
    sneaky = instance(burned="YES")  # a DICOM file labelled as bulk data
    body = multipart(
        [
            ([("Content-Type", "application/dicom+json")], json.dumps([kept, refused]).encode()),
            (_bulk_headers("http://x/bulk/1"), b"\x01" * 300),
            (_bulk_headers("http://x/bulk/2"), b"\x02" * 300),
            ([("Content-Type", "application/dicom")], dicom_kept.data),
            ([("Content-Type", "application/octet-stream")], sneaky.data),
            ([("Content-Type", "image/jpeg")], b"\xff\xd8tiny\xff\xd9"),
        ]
    )
    out, stream = stream_all(body, StandInInspector(), content_type=JSON_CT)
    assert stream.fatal is None
    parts = parse_multipart(out)
    assert json.loads(parts[0].body) == [kept]
    assert [p.body for p in parts[1:]] == [b"\x01" * 300, dicom_kept.data, b"\xff\xd8tiny\xff\xd9"]
    failures = [(r.index, r.failure_code, r.sop_instance_uid) for r in stream.failures]
    assert failures[0] == (0, FAILURE_BLOCKED, "1.2.3.2")
    assert failures[1][:2] == (4, FAILURE_BLOCKED)
    assert stream.forwarded_count == 2  # one JSON dataset, one DICOM part
    dropped = [r for r in stream.results if r.kind == "bulk" and r.error]
    assert [r.index for r in dropped] == [2]


def test_json_part_errors() -> None:
    body = multipart(
        [
            ([("Content-Type", "application/dicom+json")], b"{not json"),
            ([("Content-Type", "application/dicom+json")], b'{"00080018": {}}'),
            (
                [("Content-Type", "application/dicom+json")],
                json.dumps([_json_dataset("NO", "9.9")] * 50).encode(),
            ),
            ([("Content-Type", "application/dicom+json")], b"[" * 100_000 + b"]" * 100_000),
        ]
    )
    out, stream = stream_all(body, StandInInspector(), content_type=JSON_CT, max_json_bytes=4096)
    assert parse_multipart(out) == []
    codes = [r.failure_code for r in stream.results]
    assert codes == [FAILURE_UNREADABLE, FAILURE_UNREADABLE, FAILURE_TOO_LARGE, FAILURE_TOO_LARGE]
    out, stream = stream_all(body, StandInInspector(), content_type=JSON_CT, max_json_bytes=1 << 20)
    assert [r.failure_code for r in stream.results][-1] == FAILURE_UNREADABLE  # deep nesting


def test_json_dataset_the_inspector_cannot_read() -> None:
    body = multipart(
        [([("Content-Type", "application/dicom+json")], b'[{"00100010": {"vr": "PN"}}]')]
    )
    out, stream = stream_all(body, StandInInspector(), content_type=JSON_CT)
    assert parse_multipart(out) == []
    assert stream.results[0].failure_code == FAILURE_UNREADABLE
    assert stream.results[0].item == 0


def test_bad_fragment_is_fatal_once_forwarding_started(inspector: Any) -> None:
    first = instance(pixels=bytes(8))
    jpeg = jpeg_instance()
    second_item = jpeg.data.rindex(b"\xfe\xff\x00\xe0")
    corrupt = jpeg.data[:second_item] + b"\x10\x00\x10\x00" + jpeg.data[second_item + 4 :]
    body = multipart([dicom_part(first.data), dicom_part(corrupt)])
    cut = body.index(corrupt) + second_item - 4  # the second part's header is complete

    # arriving in two chunks: the header already went on when the corruption shows up
    stream = new_stream(inspector)
    sent = stream(body[:cut])
    assert sent and stream.fatal is None
    assert stream(body[cut:]) == [] and stream(b"") == []
    assert stream.fatal is not None
    assert stream.fatal.startswith("part 1: expected an item tag")
    assert stream.open_part_forwarded
    assert [r.failure_code for r in stream.results] == [None, FAILURE_UNREADABLE]

    # arriving at once: nothing of the part went on, so it is simply dropped
    stream = new_stream(inspector)
    out = run_stream(stream, body, "one")
    assert stream.fatal is None
    assert [p.body for p in parse_multipart(out)] == [first.data]
    assert [r.failure_code for r in stream.results] == [None, FAILURE_UNREADABLE]
