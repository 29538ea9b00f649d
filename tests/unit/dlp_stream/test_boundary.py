"""casb.dlp.boundary: where the header ends, whatever the chunking, and hostile framing."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from casb.dlp.boundary import MAX_DEPTH, PixelDataBoundary
from casb.dlp.findings import InstanceError

from . import CHUNKINGS, base_dataset, chunks, encode, instance, jpeg_instance


@dataclass(frozen=True)
class Walk:
    split: int | None
    pixel_end: int | None
    trailing_at: int | None
    trailing_tags: tuple[int | None, ...]
    whole: bool
    position: int


def walk(data: bytes, how: str = "one") -> Walk:
    w = PixelDataBoundary()
    for chunk in chunks(data, how):
        w.feed(chunk)
    w.finish()
    return Walk(w.split, w.pixel_end, w.trailing_at, tuple(w.trailing_tags), w.whole, w.position)


def walk_all(data: bytes) -> Walk:
    """The same result for one chunk, 1-byte chunks and random chunk sizes."""
    results = {how: walk(data, how) for how in CHUNKINGS}
    assert len(set(results.values())) == 1, results
    return results["one"]


def walk_error(data: bytes) -> str:
    reasons = set()
    for how in CHUNKINGS:
        with pytest.raises(InstanceError) as info:
            walk(data, how)
        reasons.add(info.value.reason)
    assert len(reasons) == 1, reasons
    return reasons.pop()


def assert_split(data: bytes, split: int | None) -> None:
    result = walk_all(data)
    assert result.split == split
    assert result.trailing_at is None
    assert result.pixel_end == len(data)
    assert data[split : split + 4] in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
    header = pydicom.dcmread(io.BytesIO(data[:split]), force=True)
    assert "PixelData" not in header
    assert header.PatientID == "PID-0001"


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize(("preamble", "meta"), [(True, True), (False, True), (False, False)])
def test_split_native_syntaxes(syntax: str, preamble: bool, meta: bool) -> None:
    built = instance(syntax, preamble=preamble, meta=meta, nested=True)
    assert_split(built.data, built.split)


def test_split_encapsulated_generated() -> None:
    built = jpeg_instance(nested=True)
    assert_split(built.data, built.split)


@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "SC_rgb_rle_2frame.dcm"]
)
def test_split_pydicom_encapsulated_files(name: str) -> None:
    data = open(get_testdata_file(name), "rb").read()  # noqa: SIM115
    ds = pydicom.dcmread(io.BytesIO(data))
    result = walk_all(data)
    assert result.split is not None
    assert ds["PixelData"].is_undefined_length
    assert result.pixel_end == len(data)
    # what follows the split is exactly pydicom's pixel data element
    sequence_delimiter = b"\xfe\xff\xdd\xe0" + bytes(4)
    assert data[result.split + 12 : result.pixel_end] == ds.PixelData + sequence_delimiter


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "rtdose.dcm"]
)
def test_split_pydicom_native_files(name: str) -> None:
    data = open(get_testdata_file(name), "rb").read()  # noqa: SIM115
    result = walk_all(data)
    assert result.split is not None
    header = pydicom.dcmread(io.BytesIO(data[: result.split]), force=True)
    full = pydicom.dcmread(io.BytesIO(data), force=True)
    assert "PixelData" not in header
    assert len(header) == len(full) - 1 - sum(1 for e in full if e.tag > 0x7FE00010)


def test_trailing_padding_is_not_trailing_data() -> None:
    # CT_small.dcm ends with Data Set Trailing Padding (FFFC,FFFC) after its pixel data
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()  # noqa: SIM115
    result = walk_all(data)
    assert result.pixel_end is not None and result.pixel_end < len(data)
    assert data[result.pixel_end : result.pixel_end + 4] == b"\xfc\xff\xfc\xff"
    assert result.trailing_at is None


def test_un_with_undefined_length_is_walked_as_implicit_sequence() -> None:
    built = instance(ExplicitVRLittleEndian)
    data = built.data
    split = built.split
    assert split is not None
    # (0011,0010) creator + (0011,1010) UN, undefined length, implicit VR LE items inside
    name = b"Doe^John"
    inner = struct.pack("<HHL", 0x0010, 0x0010, len(name)) + name
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
    item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    un = struct.pack("<HH", 0x0011, 0x0010) + b"LO" + struct.pack("<H", 4) + b"ACME"
    un += struct.pack("<HH", 0x0011, 0x1010) + b"UN\0\0" + struct.pack("<L", 0xFFFFFFFF)
    un += item + item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    # inserted right before Pixel Data (out of tag order: pydicom does not mind)
    patched = data[:split] + un + data[split:]
    result = walk_all(patched)
    assert result.split == split + len(un)
    assert result.trailing_at is None
    header = pydicom.dcmread(io.BytesIO(patched[: result.split]), force=True)
    assert header[0x00111010].VR in ("SQ", "UN")


def test_deflated_is_whole_instance() -> None:
    built = instance(DeflatedExplicitVRLittleEndian)
    result = walk_all(built.data)
    assert result.whole
    assert result.split is None
    assert result.position == len(built.data)
    assert walk_all(open(get_testdata_file("image_dfl.dcm"), "rb").read()).whole  # noqa: SIM115


def test_unknown_transfer_syntax_is_whole_instance() -> None:
    built = instance(ExplicitVRLittleEndian)
    data = built.data.replace(b"1.2.840.10008.1.2.1\0", b"1.2.3.4.5.6.7.8.9.0\0", 1)
    assert data != built.data
    result = walk_all(data)
    assert result.whole and result.split is None


def test_no_pixel_data() -> None:
    data = encode(base_dataset())
    result = walk_all(data)
    assert result.split is None and not result.whole
    assert result.position == len(data)


def test_trailing_private_element_after_pixel_data() -> None:
    def add_trailer(ds: Dataset) -> None:
        ds.add_new(0x7FE10010, "LO", "SMUGGLER")
        ds.add_new(0x7FE11001, "OB", b"hidden-phi-bytes")
        ds.add_new(0xFFFCFFFC, "OB", bytes(8))

    built = instance(after=add_trailer)
    result = walk_all(built.data)
    assert result.split == built.split
    assert result.pixel_end is not None
    assert result.trailing_at == result.pixel_end
    # the padding after the private elements is walked too, but is not "trailing"
    assert result.trailing_tags == (0x7FE10010, 0x7FE11001)


def test_padding_then_trailing_element() -> None:
    def add(ds: Dataset) -> None:
        ds.add_new(0xFFFCFFFC, "OB", bytes(8))

    built = instance(after=add)
    extra = struct.pack("<HH", 0x0010, 0x0010) + b"PN" + struct.pack("<H", 4) + b"Doe^"
    data = built.data + extra
    result = walk_all(data)
    assert result.trailing_at == len(built.data)
    assert result.trailing_tags == (0x00100010,)


def test_short_garbage_after_pixel_data_is_trailing() -> None:
    built = instance()
    result = walk_all(built.data + b"xyz")
    assert result.trailing_at == len(built.data)
    assert result.trailing_tags == (None,)


def test_unparseable_trailing_data_is_trailing_not_an_error() -> None:
    built = instance()
    garbage = struct.pack("<HH", 0x7FE1, 0x0010) + b"\x01\x02" + bytes(30)
    result = walk_all(built.data + garbage)
    assert result.trailing_at == len(built.data)
    assert result.position == len(built.data) + len(garbage)


# -- hostile framing --------------------------------------------------------------------------


def _explicit(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return head + b"\0\0" + struct.pack("<L", size) + value
    return head + struct.pack("<H", size) + value


def _raw(*elements: bytes) -> bytes:
    """A raw explicit VR little endian dataset (no preamble, no meta)."""
    return b"".join(elements)


SOP = _explicit(0x00080018, b"UI", b"1.2.3.4\0")


def test_undefined_length_on_ordinary_element() -> None:
    data = _raw(SOP, _explicit(0x00100010, b"UT", b"", length=0xFFFFFFFF))
    reason = walk_error(data)
    assert "undefined length" in reason and "(0010,0010)" in reason


def test_element_length_past_the_end() -> None:
    data = _raw(SOP, _explicit(0x00104000, b"LT", b"Doe^Jane", length=1000))
    reason = walk_error(data)
    assert "truncated inside the header" in reason
    assert "Doe" not in reason


def test_pixel_length_past_the_end() -> None:
    built = instance()
    reason = walk_error(built.data[:-10])
    assert "truncated inside the pixel data" in reason


def test_encapsulated_without_sequence_delimiter() -> None:
    built = jpeg_instance()
    reason = walk_error(built.data[:-8])
    assert "encapsulated pixel data" in reason


def test_fragment_of_undefined_length() -> None:
    pixel = _explicit(0x7FE00010, b"OB", b"", length=0xFFFFFFFF)
    pixel += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + bytes(8)
    reason = walk_error(_raw(SOP, pixel))
    assert "undefined length" in reason


def test_non_item_inside_encapsulated_pixel_data() -> None:
    pixel = _explicit(0x7FE00010, b"OB", b"", length=0xFFFFFFFF)
    pixel += struct.pack("<HHL", 0x0010, 0x0010, 4) + b"Doe^"
    reason = walk_error(_raw(SOP, pixel))
    assert "expected an item tag" in reason


def test_item_delimiter_at_top_level() -> None:
    # pydicom would silently stop reading here; the walker refuses the instance
    data = _raw(SOP, struct.pack("<HHL", 0xFFFE, 0xE00D, 0), _explicit(0x00100010, b"PN", b"Doe^"))
    assert "unexpected item tag" in walk_error(data)


def test_odd_item_length_in_sequence() -> None:
    seq = _explicit(0x00081140, b"SQ", b"", length=0xFFFFFFFF)
    seq += struct.pack("<HHL", 0xFFFE, 0xE000, 3) + b"abc"
    assert "odd item length" in walk_error(_raw(SOP, seq))


def test_delimiter_with_nonzero_length() -> None:
    seq = _explicit(0x00081140, b"SQ", b"", length=0xFFFFFFFF)
    seq += struct.pack("<HHL", 0xFFFE, 0xE0DD, 4)
    assert "non-zero length" in walk_error(_raw(SOP, seq))


def test_invalid_vr() -> None:
    data = _raw(SOP, struct.pack("<HH", 0x0010, 0x0010) + b"Q?" + struct.pack("<H", 4) + b"Doe^")
    assert "invalid VR" in walk_error(data)


def test_transfer_syntax_length_is_bounded() -> None:
    built = instance()
    ts_at = built.data.index(b"\x02\x00\x10\x00UI")
    hostile = built.data[: ts_at + 6] + struct.pack("<H", 0xFFF0) + built.data[ts_at + 8 :]
    assert "transfer syntax" in walk_error(hostile)


def test_empty_input() -> None:
    w = PixelDataBoundary()
    with pytest.raises(InstanceError, match="empty instance"):
        w.finish()


def _nested(levels: int) -> bytes:
    """``levels`` undefined-length sequences, each inside an undefined-length item."""
    open_ = _explicit(0x00081140, b"SQ", b"", length=0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    close = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return _raw(SOP, open_ * levels, close * levels, _explicit(0x7FE00010, b"OB", bytes(4)))


def test_nesting_within_the_limit() -> None:
    data = _nested(MAX_DEPTH // 2)  # each level is a sequence plus an item: 2 frames
    result = walk_all(data)
    assert result.split == len(data) - 16


def test_nesting_depth_bomb() -> None:
    reason = walk_error(_nested(MAX_DEPTH))
    assert f"deeper than {MAX_DEPTH}" in reason


def test_deep_bomb_is_refused_early_and_cheaply() -> None:
    # a 100 000-level bomb stops at the limit, without recursion
    w = PixelDataBoundary()
    with pytest.raises(InstanceError, match="deeper than"):
        w.feed(_nested(100_000))


def test_errors_never_quote_values() -> None:
    secret = b"SMITH^JOHN^SECRET"
    cases = [
        _raw(SOP, _explicit(0x00100010, b"UT", secret, length=0xFFFFFFFF)),
        _raw(SOP, _explicit(0x00100010, b"PN", secret, length=2000)),
        _raw(SOP, struct.pack("<HH", 0x0010, 0x0010) + secret),
    ]
    for data in cases:
        reason = walk_error(data)
        assert "SMITH" not in reason and "SECRET" not in reason


def test_data_after_finish_is_refused() -> None:
    w = PixelDataBoundary()
    w.feed(instance().data)
    w.finish()
    with pytest.raises(InstanceError):
        w.feed(b"more")


def test_safe_end_holds_back_partial_headers_and_trailing_data() -> None:
    def add_trailer(ds: Dataset) -> None:
        ds.add_new(0x7FE10010, "LO", "SMUGGLER")

    built = instance(after=add_trailer)
    w = PixelDataBoundary()
    pixel_end = None
    for i in range(len(built.data)):
        w.feed(built.data[i : i + 1])
        if w.split is not None:
            assert w.safe_end <= w.position
            if w.pixel_end is not None:
                pixel_end = w.pixel_end
                # never past the end of the pixel data while the next header is partial
                assert w.safe_end <= max(pixel_end, w.split)
    w.finish()
    assert w.trailing_at == pixel_end
    assert w.safe_end == pixel_end


# -- pydicom's encoding guesses, followed so both agree on element boundaries -----------------


def _implicit(tag: int, value: bytes, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, size) + value


def test_implicit_item_inside_explicit_sequence() -> None:
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item += _implicit(0x00081150, b"1.2.3\0") + _implicit(0x00081155, b"1.2.3.4\0")
    item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq = _explicit(0x00081140, b"SQ", b"", length=0xFFFFFFFF) + item
    seq += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    data = _raw(SOP, seq, _explicit(0x7FE00010, b"OB", bytes(4)))
    result = walk_all(data)
    assert result.split == len(data) - 16
    header = pydicom.dcmread(io.BytesIO(data[: result.split]), force=True)
    assert header.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4"


def test_meta_says_explicit_but_dataset_is_implicit() -> None:
    built = instance(ImplicitVRLittleEndian)
    assert built.split is not None
    # relabel the meta group: 1.2.840.10008.1.2 (implicit) -> 1.2.840.10008.1.2.1 (explicit)
    ts_at = built.data.index(b"1.2.840.10008.1.2\0")
    meta_len_at = built.data.index(b"\x02\x00\x00\x00UL\x04\x00") + 8
    (meta_len,) = struct.unpack_from("<L", built.data, meta_len_at)
    data = bytearray(built.data)
    data[ts_at : ts_at + 18] = b"1.2.840.10008.1.2.1\0"
    data[ts_at - 2 : ts_at] = struct.pack("<H", 20)
    data[meta_len_at : meta_len_at + 4] = struct.pack("<L", meta_len + 2)
    shift = 2
    result = walk_all(bytes(data))
    assert result.split == built.split + shift  # pydicom switches to implicit; so do we
    with pytest.warns(UserWarning):
        header = pydicom.dcmread(io.BytesIO(bytes(data[: result.split])), force=True)
    assert header.PatientID == "PID-0001"


def test_nested_encapsulated_icon_pixel_data() -> None:
    icon_pixels = _explicit(0x7FE00010, b"OB", b"", length=0xFFFFFFFF)
    icon_pixels += struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    icon_pixels += struct.pack("<HHL", 0xFFFE, 0xE000, 6) + b"\xff\xd8ab\xff\xd9"
    icon_pixels += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + icon_pixels
    item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    icon = _explicit(0x00880200, b"SQ", b"", length=0xFFFFFFFF) + item
    icon += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    pixels = _explicit(0x7FE00010, b"OB", b"", length=0xFFFFFFFF)
    pixels += struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    pixels += struct.pack("<HHL", 0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9"
    pixels += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    data = _raw(SOP, icon, pixels)
    result = walk_all(data)
    assert result.split == len(data) - len(pixels)
    assert result.pixel_end == len(data)
