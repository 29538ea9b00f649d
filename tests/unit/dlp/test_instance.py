"""casb.dlp.instance: reading headers of every framing/encoding, writing them back,
and refusing what pydicom would have to guess about."""

from __future__ import annotations

import contextlib
import random
import struct
import warnings
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from casb.dlp.findings import InstanceError
from casb.dlp.instance import (
    MAX_DEPTH,
    encode,
    quiet_pydicom,
    read_header,
    transfer_syntax_of,
)
from tests.support.dicom_corpus import (
    PATIENT_NAME,
    add_nested_phi,
    add_private,
    bundled,
    ct_dataset,
    element,
    encode_instance,
    nested_sequences,
    split_at_pixel_data,
    with_length,
)

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
FRAMINGS = ["file", "meta", "bare"]


def full_ct() -> Dataset:
    return add_nested_phi(add_private(ct_dataset()))


@pytest.mark.parametrize("ts", SYNTAXES)
@pytest.mark.parametrize("framing", FRAMINGS)
def test_reads_every_framing_and_encoding(ts: str, framing: str) -> None:
    header, pixels = split_at_pixel_data(full_ct(), transfer_syntax=ts, framing=framing)
    ds = read_header(header, complete=False)
    assert str(ds.PatientName) == PATIENT_NAME
    assert ds.OtherPatientIDsSequence[0].IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID
    assert "PixelData" not in ds
    assert transfer_syntax_of(ds) == ts
    whole = read_header(header + pixels, complete=True)
    assert whole.PixelData == full_ct().PixelData


@pytest.mark.parametrize("ts", SYNTAXES)
@pytest.mark.parametrize("framing", FRAMINGS)
def test_unchanged_headers_are_written_back_byte_for_byte(ts: str, framing: str) -> None:
    header, pixels = split_at_pixel_data(full_ct(), transfer_syntax=ts, framing=framing)
    ds = read_header(header, complete=False)
    # A meta group without preamble + "DICM" is written back as a PS3.10 file.
    expected = b"\x00" * 128 + b"DICM" + header if framing == "meta" else header
    with quiet_pydicom():
        assert encode(ds, transfer_syntax_of(ds)) == expected
        whole = read_header(header + pixels, complete=True)
        assert encode(whole, transfer_syntax_of(whole)) == expected + pixels


def test_deflated_instances_are_read_whole_and_deflated_again() -> None:
    data = encode_instance(full_ct(), transfer_syntax=DeflatedExplicitVRLittleEndian)
    ds = read_header(data, complete=True)
    assert str(ds.PatientName) == PATIENT_NAME
    with quiet_pydicom():
        out = encode(ds, transfer_syntax_of(ds))
    again = read_header(out, complete=True)
    assert again.PixelData == ds.PixelData
    assert str(again.PatientName) == PATIENT_NAME
    with pytest.raises(InstanceError, match="deflated"):
        read_header(data, complete=False)


def test_a_deflate_bomb_is_refused_before_pydicom_inflates_it() -> None:
    head = encode_instance(ct_dataset(), transfer_syntax=DeflatedExplicitVRLittleEndian)
    meta_end = head.index(b"1.2.840.10008.1.2.1.99") + 22
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    bomb = deflater.compress(b"\x00" * 4_000_000) + deflater.flush()
    with pytest.raises(InstanceError, match="inflates beyond"):
        read_header(head[:meta_end] + bomb, complete=True, max_inflated=1_000_000)


def test_changed_headers_splice_like_pydicom_writes_them() -> None:
    """The copy-unchanged-bytes writer gives what pydicom's own writer gives."""
    for ts in SYNTAXES:
        header, _ = split_at_pixel_data(full_ct(), transfer_syntax=ts, framing="bare")
        ds = read_header(header, complete=False)
        with quiet_pydicom():
            ds.PatientName = "CHANGED^NAME"
            del ds.StudyDescription
            ds.OtherPatientIDsSequence[0].PatientID = "X"
            spliced = encode(ds, transfer_syntax_of(ds))
            fp = DicomBytesIO()
            fp.is_implicit_VR = ts == ImplicitVRLittleEndian
            fp.is_little_endian = ts != ExplicitVRBigEndian
            write_dataset(fp, ds)
        assert spliced == fp.getvalue()


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "rtplan.dcm",
        "JPEG2000.dcm",
        "ExplVR_BigEndNoMeta.dcm",
        "ExplVR_LitEndNoMeta.dcm",
        "no_meta_group_length.dcm",
        "image_dfl.dcm",
        "UN_sequence.dcm",
        "priv_SQ.dcm",
        "nested_priv_SQ.dcm",
        "chrH31.dcm",
        "chrX1.dcm",
    ],
)
def test_reads_pydicoms_files(name: str) -> None:
    ds = read_header(bundled(name), complete=True)
    assert len(ds) > 0


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm", "no_meta.dcm"])
def test_refuses_pydicoms_broken_files(name: str) -> None:
    """pydicom reads these leniently (short values, a stray leading byte); we refuse."""
    with pytest.raises(InstanceError):
        read_header(bundled(name), complete=True)


@pytest.mark.parametrize("ts", SYNTAXES)
def test_truncation_at_any_offset_is_a_clean_error_or_a_valid_prefix(ts: str) -> None:
    data = encode_instance(full_ct(), transfer_syntax=ts)
    outcomes = {"error": 0, "parsed": 0}
    for cut in range(1, len(data), 5):
        try:
            ds = read_header(data[:cut], complete=True)
        except InstanceError as exc:
            assert PATIENT_NAME not in exc.reason
            outcomes["error"] += 1
        else:
            assert len(ds) > 0  # cut at an element boundary: a shorter, valid dataset
            outcomes["parsed"] += 1
    assert outcomes["error"] > outcomes["parsed"]


def test_random_bytes_never_parse() -> None:
    rng = random.Random(20240311)
    for size in [1, 7, 8, 132, 200, 1000, 4096]:
        for _ in range(15):
            noise = bytes(rng.getrandbits(8) for _ in range(size))
            with pytest.raises(InstanceError):
                read_header(noise, complete=True)
            with pytest.raises(InstanceError):
                read_header(b"\x00" * 128 + b"DICM" + noise, complete=True)


def test_random_corruption_of_a_header_never_escapes_as_another_error() -> None:
    header, _ = split_at_pixel_data(full_ct())
    rng = random.Random(7)
    for _ in range(300):
        data = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        with contextlib.suppress(InstanceError):
            read_header(bytes(data), complete=False)


def test_empty_and_meta_only_inputs_are_refused() -> None:
    with pytest.raises(InstanceError, match="empty"):
        read_header(b"", complete=False)
    header, _ = split_at_pixel_data(ct_dataset())
    meta_end = header.index(b"\x08\x00\x05\x00CS")
    with pytest.raises(InstanceError, match="no data elements"):
        read_header(header[:meta_end], complete=False)


def name_element(value: bytes = b"SENTINEL^PHI") -> bytes:
    return element(0x00100010, "PN", value)


def test_a_repeated_element_is_refused() -> None:
    """pydicom keeps the last of two Patient's Name elements: an attacker's empty second
    copy would hide the first from inspection while a PACS keeps it."""
    data = element(0x00080060, "CS", b"CT") + name_element() + element(0x00100010, "PN", b"")
    with pytest.raises(InstanceError, match="out of order or repeated"):
        read_header(data, complete=False)


def test_elements_out_of_order_are_refused() -> None:
    data = name_element() + element(0x00080060, "CS", b"CT")
    with pytest.raises(InstanceError, match="out of order"):
        read_header(data, complete=False)


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0x7FFFFFFF, 4096])
def test_a_length_past_the_end_is_refused(length: int) -> None:
    data = element(0x00080060, "CS", b"CT") + with_length(
        element(0x00100010, "UT", b"SENTINEL^PHI"), length, long_vr=True
    )
    with pytest.raises(InstanceError, match="past the end") as caught:
        read_header(data, complete=False)
    assert "SENTINEL" not in caught.value.reason


def test_undefined_length_on_a_plain_element_is_refused() -> None:
    data = (
        element(0x00080060, "CS", b"CT", implicit=True)
        + struct.pack("<HHL", 0x0010, 0x0010, 0xFFFFFFFF)
        + b"SENTINEL^PHI"
    )
    with pytest.raises(InstanceError):
        read_header(data, complete=False)


def test_a_stray_item_delimiter_at_the_top_level_is_refused() -> None:
    """pydicom stops reading at it: whatever follows would go uninspected."""
    data = (
        element(0x00080060, "CS", b"CT") + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + name_element()
    )
    with pytest.raises(InstanceError, match="item delimiter"):
        read_header(data, complete=False)


def test_a_non_item_inside_a_sequence_is_refused() -> None:
    inner = name_element()  # an element where an item tag should be
    data = element(0x00081140, "SQ", inner)
    with pytest.raises(InstanceError, match="expected a sequence item"):
        read_header(data, complete=False)


def test_trailing_bytes_shorter_than_an_element_are_refused() -> None:
    data = element(0x00080060, "CS", b"CT") + b"\x10\x00"
    with pytest.raises(InstanceError, match="truncated element header"):
        read_header(data, complete=False)


def test_sequence_nesting_is_bounded() -> None:
    deep = encode_instance(nested_sequences(MAX_DEPTH + 6), framing="bare")
    with pytest.raises(InstanceError, match="nested deeper than 64"):
        read_header(deep, complete=False)
    fine = encode_instance(nested_sequences(MAX_DEPTH - 1), framing="bare")
    assert read_header(fine, complete=False).SOPInstanceUID


def test_undefined_length_nesting_bomb_is_bounded() -> None:
    open_seq = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    open_item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    data = (open_seq + open_item) * 5000
    with pytest.raises(InstanceError, match="nested deeper"):
        read_header(data, complete=False)


def test_pixel_data_inside_the_header_bytes_is_refused() -> None:
    data = encode_instance(ct_dataset(), framing="bare")
    with pytest.raises(InstanceError, match="Pixel Data"):
        read_header(data, complete=False)
    assert read_header(data, complete=True).PixelData


def test_pydicom_stays_quiet_about_values(caplog: pytest.LogCaptureFixture) -> None:
    """pydicom quotes a value it finds invalid in its warning and log record; inside
    quiet_pydicom() (where the engine runs) neither escapes."""
    invalid = {"00080020": {"vr": "DA", "Value": ["SENTINEL"]}}
    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        Dataset.from_json(invalid)
    assert any("SENTINEL" in str(w.message) for w in loud)  # the control: it is quoted
    assert [r for r in caplog.records if "SENTINEL" in r.getMessage()]
    caplog.clear()
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        with quiet_pydicom():
            Dataset.from_json(invalid)
    assert not quiet
    assert not [r for r in caplog.records if "SENTINEL" in r.getMessage()]


def test_zero_padding_after_the_last_element_is_tolerated() -> None:
    """Too short to be an element, so nothing can hide there; pydicom ignores it too."""
    data = encode_instance(ct_dataset())
    assert read_header(data + b"\x00\x00", complete=True).PixelData
    with pytest.raises(InstanceError):  # eight bytes are an element header: (0000,0000)
        read_header(data + b"\x00" * 8, complete=True)
