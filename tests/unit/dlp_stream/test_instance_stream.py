"""casb.dlp.instance_stream: one instance through DLP, chunk by chunk."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from casb.dlp.findings import Finding, InstanceError, Verdict
from casb.dlp.instance_stream import InstanceStream, cap_text

from . import CHUNKINGS, StandInInspector, base_dataset, chunks, encode, instance, jpeg_instance


@dataclass
class Outcome:
    out: bytes
    verdict: Verdict | None
    error: str | None
    error_kind: str | None
    findings: list[Finding]
    bytes_in: int
    bytes_out: int


def run(data: bytes, how: str = "one", *, inspector: object = None, cap: int = 1 << 20) -> Outcome:
    insp = inspector if inspector is not None else StandInInspector()
    stream = InstanceStream(
        lambda header, complete: insp.inspect(header, complete=complete),  # type: ignore[attr-defined]
        max_header_bytes=cap,
    )
    out: list[bytes] = []
    for chunk in chunks(data, how):
        sent = stream.feed(chunk)
        assert stream.buffered <= cap
        out.extend(sent)
    out.extend(stream.finish())
    assert all(isinstance(b, bytes) and b for b in out)
    joined = b"".join(out)
    assert stream.bytes_out == len(joined)
    return Outcome(
        joined,
        stream.verdict,
        stream.error,
        stream.error_kind,
        stream.findings,
        stream.bytes_in,
        stream.bytes_out,
    )


def run_all(data: bytes, **kwargs: object) -> Outcome:
    results = [run(data, how, **kwargs) for how in CHUNKINGS]  # type: ignore[arg-type]
    first = results[0]
    for other in results[1:]:
        assert other == first
    return first


@pytest.mark.parametrize(
    "built",
    [
        instance(nested=True),
        instance(ImplicitVRLittleEndian, preamble=False),
        instance(ExplicitVRBigEndian, meta=False, preamble=False),
        jpeg_instance(nested=True),
    ],
    ids=["explicit-le", "implicit-no-preamble", "big-endian-raw", "jpeg"],
)
def test_forward_passes_instance_through_unchanged(built: object) -> None:
    data = built.data  # type: ignore[attr-defined]
    split = built.split  # type: ignore[attr-defined]
    inspector = StandInInspector()
    result = run(data, inspector=inspector)
    assert result.out == data
    assert result.verdict is not None and result.verdict.action == "forward"
    assert result.error is None and result.findings == []
    assert result.bytes_in == result.bytes_out == len(data)
    assert inspector.calls == [(split, False)]  # the header only, once
    assert run_all(data).out == data


def test_inspector_sees_only_the_header_once_in_any_chunking() -> None:
    built = instance(pixels=bytes(5000))
    for how in CHUNKINGS:
        inspector = StandInInspector()
        run(built.data, how, inspector=inspector)
        assert inspector.calls == [(built.split, False)]


def test_blocked_emits_nothing() -> None:
    built = instance(burned="YES")
    result = run_all(built.data)
    assert result.out == b""
    assert result.verdict is not None and result.verdict.action == "block"
    assert result.bytes_in == len(built.data) and result.bytes_out == 0


def test_deidentified_header_is_followed_by_the_original_pixels() -> None:
    built = instance(pixels=bytes(range(256)) * 8)
    assert built.split is not None

    class Rewriter:
        def inspect(self, data: bytes, *, complete: bool) -> Verdict:
            return Verdict("deidentified", (), b"NEW-HEADER", "1.2", "3.4")

    result = run_all(built.data, inspector=Rewriter())
    assert result.out == b"NEW-HEADER" + built.data[built.split :]


def test_whole_instance_when_deflated() -> None:
    built = instance(DeflatedExplicitVRLittleEndian)
    inspector = StandInInspector()
    result = run(built.data, inspector=inspector)
    assert inspector.calls == [(len(built.data), True)]
    assert result.out == built.data
    assert run_all(built.data).out == built.data


def test_whole_instance_when_no_pixel_data() -> None:
    data = open(get_testdata_file("rtplan.dcm"), "rb").read()  # noqa: SIM115
    inspector = StandInInspector()
    result = run(data, inspector=inspector)
    assert inspector.calls == [(len(data), True)]
    assert result.out == data


def _with_trailer(ds: Dataset) -> None:
    ds.add_new(0x7FE10010, "LO", "SMUGGLER")
    ds.add_new(0x7FE11001, "OB", b"Doe^Jane hidden here")


def test_trailing_data_is_stripped_and_reported_even_in_alert_mode() -> None:
    built = instance(after=_with_trailer)
    result = run_all(built.data)
    assert result.verdict is not None and result.verdict.action == "forward"
    assert result.error is None
    assert b"SMUGGLER" not in result.out and b"hidden" not in result.out
    # everything up to the first trailing element (7FE1,0010), nothing from it on
    assert result.out == built.data[: built.data.rindex(b"\xe1\x7f\x10\x00")]
    assert [f.rule for f in result.findings] == ["trailing_data", "trailing_data"]
    assert result.findings[0].tag == "(7FE1,0010)"
    assert result.findings[0].keyword == ""
    assert all("SMUGGLER" not in str(f.to_json()) for f in result.findings)


def test_trailing_public_element_gets_its_keyword() -> None:
    built = instance()
    extra = b"\x10\x00\x10\x00PN\x04\x00Doe^"
    result = run_all(built.data + extra)
    assert result.out == built.data
    assert result.findings == [
        Finding(rule="trailing_data", keyword="PatientName", tag="(0010,0010)", path="PatientName")
    ]


def test_trailing_padding_is_forwarded_without_finding() -> None:
    def pad(ds: Dataset) -> None:
        ds.add_new(0xFFFCFFFC, "OB", bytes(16))

    built = instance(after=pad)
    result = run_all(built.data)
    assert result.out == built.data
    assert result.findings == []


def test_trailing_data_after_encapsulated_pixels() -> None:
    built = jpeg_instance(after=_with_trailer)
    result = run_all(built.data)
    assert b"SMUGGLER" not in result.out
    assert result.out.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    assert len(result.findings) == 2


def test_header_over_the_cap_fails_without_buffering_more() -> None:
    ds = base_dataset()
    ds.add_new(0x00090010, "LO", "BIGCO")
    ds.add_new(0x00091010, "OB", bytes(300_000))
    ds.PixelData = bytes(64)
    data = encode(ds)
    cap = 64 * 1024
    result = run_all(data, cap=cap)  # run() asserts the buffer never exceeds the cap
    assert result.out == b""
    assert result.error == f"DICOM header exceeds the {cap_text(cap)} cap"
    assert result.error_kind == "too_large"
    assert result.bytes_in == len(data)
    assert run_all(data, cap=len(data)).out == data


def test_header_cap_message_in_mib() -> None:
    assert cap_text(16 * 1024 * 1024) == "16 MiB"
    assert cap_text(5000) == "5000 bytes"


def test_cap_is_checked_for_whole_instances_too() -> None:
    built = instance(DeflatedExplicitVRLittleEndian, pixels=bytes(range(256)) * 64)
    result = run_all(built.data, cap=len(built.data) - 1)
    assert result.error_kind == "too_large"
    assert run_all(built.data, cap=len(built.data)).out == built.data


def test_truncated_in_header() -> None:
    built = instance()
    assert built.split is not None
    result = run_all(built.data[: built.split - 5])
    assert result.out == b""
    assert result.error is not None and "truncated inside the header" in result.error
    assert result.error_kind == "unreadable"


def test_truncated_in_pixel_data_is_an_error_after_forwarding_started() -> None:
    built = instance(pixels=bytes(4096))
    result = run(built.data[:-100])
    assert result.out  # the header and most pixels already went on
    assert result.error is not None and "truncated inside the pixel data" in result.error


def test_garbage_is_unreadable_and_never_quoted() -> None:
    data = b"\x10\x00\x10\x00Z!" + b"SMITH^JOHN" * 20
    result = run_all(data)
    assert result.out == b""
    assert result.error is not None and "SMITH" not in result.error
    assert result.error_kind == "unreadable"


def test_inspector_instance_error_is_recorded() -> None:
    class Refuses:
        def inspect(self, data: bytes, *, complete: bool) -> Verdict:
            raise InstanceError("cannot parse the header")

    result = run_all(instance().data, inspector=Refuses())
    assert result.out == b"" and result.error == "cannot parse the header"


def test_inspector_bug_propagates() -> None:
    class Broken:
        def inspect(self, data: bytes, *, complete: bool) -> Verdict:
            raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        run(instance().data, inspector=Broken())


def test_split_tag_across_chunks_keeps_header_exact() -> None:
    built = instance(pixels=bytes(range(200)))
    assert built.split is not None
    for cut in range(built.split - 12, built.split + 14):
        inspector = StandInInspector()
        stream = InstanceStream(
            lambda h, c, i=inspector: i.inspect(h, complete=c), max_header_bytes=1 << 20
        )
        out = stream.feed(built.data[:cut]) + stream.feed(built.data[cut:]) + stream.finish()
        assert b"".join(out) == built.data, cut
        assert inspector.calls == [(built.split, False)]


def test_pixel_chunks_are_passed_without_copy_when_whole() -> None:
    built = instance(pixels=bytes(1000))
    stream = InstanceStream(
        lambda h, c: StandInInspector().inspect(h, complete=c), max_header_bytes=1 << 20
    )
    assert built.split is not None
    stream.feed(built.data[: built.split + 12])
    chunk = built.data[built.split + 12 : built.split + 500]
    assert stream.feed(chunk)[0] is chunk
