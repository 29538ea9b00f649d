"""Read a DICOM instance's header into a pydicom Dataset, and write it back.

``read_header(data, complete=...)`` accepts the bytes of one instance up to (not
including) its top-level Pixel Data element, or the whole instance, with or without
the 128-byte preamble + "DICM" and the file meta group; explicit / implicit VR,
little / big endian, deflated (whole instances only). pydicom does the parsing.

pydicom is deliberately lenient (it silently shortens a value that runs past the end of
the data, keeps the *last* of two elements with the same tag, stops reading at a stray
item delimiter, reads a non-item tag inside a sequence as if it were an item). For an
inspection gate that leniency is a bypass: PHI the inspector did not see (a first,
non-empty copy of Patient's Name; bytes after a stray delimiter) would still reach a
PACS that parses differently. So before pydicom reads anything, ``_Walker`` checks the
structure of the bytes -- element headers only (tag, VR, length), the same decisions
pydicom's reader makes about the encoding -- and rejects anything pydicom would have
had to guess about: elements out of order or repeated, lengths past the end,
malformed items, sequences nested deeper than 64 levels, trailing bytes (other than
a few zero bytes of padding, too short to be an element). Values are never interpreted
here; pydicom does that. The top-level tag lists of both readings must then agree. A
deflated dataset is inflated here first, with a size bound (pydicom would inflate a
"zip bomb" without one). The walk also records where each top-level element lies and
which tags each top-level sequence holds (``Layout``, kept as ``ds.casb_layout``).

``encode(ds, original_ts)`` writes the dataset back in the same encoding and framing
(preamble + meta, meta only, bare dataset) so the original pixel data bytes can follow
it. Elements that were not changed are still the pydicom ``RawDataElement`` s that were
read, and their bytes are copied from the input (pydicom's ``write_data_element`` also
writes a raw element's value as it is -- see filewriter.py -- but costs more per element);
everything else is encoded by pydicom.

Every failure is an ``InstanceError`` whose reason names the problem and an offset,
never the data.
"""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from typing import Any, Final

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR
from pydicom.values import converters

from casb.dlp.findings import InstanceError

MAX_DEPTH: Final = 64  # sequence nesting levels
# VRs whose values the free-text detectors always scan (detect.ALWAYS_SCANNED_VRS).
_FREE_TEXT_VRS: Final = frozenset({b"ST", b"LT", b"UT", b"UC"})
DEFAULT_MAX_INFLATED: Final = 64 * 1024 * 1024  # a deflated instance, inflated

_PREAMBLE: Final = 128
_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITER: Final = 0xFFFEE00D
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_PIXEL_DATA: Final = 0x7FE00010
_META_GROUP_LENGTH: Final = 0x00020000

_KNOWN_VRS: Final = frozenset(vr.encode() for vr in STANDARD_VR)
_LONG_VRS: Final = frozenset(str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32)
_CONVERTER_VRS: Final = frozenset(converters)

_LE_TAG = struct.Struct("<HH")
_BE_TAG = struct.Struct(">HH")
_LE_U32 = struct.Struct("<L")
_BE_U32 = struct.Struct(">L")
_LE_U16 = struct.Struct("<H")
_LE_EXPLICIT = struct.Struct("<HH2sH")
_BE_EXPLICIT = struct.Struct(">HH2sH")
_LE_IMPLICIT = struct.Struct("<HHL")
_BE_IMPLICIT = struct.Struct(">HHL")


# -- keeping pydicom quiet --------------------------------------------------------------
# pydicom reports odd values through warnings and its "pydicom" logger, and some of
# those messages quote the value ("Invalid value for VR PN: '...'"). While DLP code runs
# they are dropped, so no value of an instance reaches a log or stderr.

_QUIET: ContextVar[bool] = ContextVar("casb_dlp_quiet", default=False)


class _DropWhileQuiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET.get()


logging.getLogger("pydicom").addFilter(_DropWhileQuiet())


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Drop pydicom's warnings and log records (they may quote values) in this block."""
    token = _QUIET.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _QUIET.reset(token)


# -- structure check ------------------------------------------------------------------


def _vr_is_letters(vr: bytes) -> bool:
    """pydicom's test for "this looks like an explicit VR" (filereader._is_implicit_vr)."""
    return len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


class _Walker:
    """Checks the element structure of an encoded dataset (see the module docstring).

    It follows pydicom's reader in every decision that changes how bytes are grouped
    into elements: explicit VR with the "implicit switch" for non-letter VR bytes,
    32-bit lengths for the long VRs, items read as implicit VR when their first element
    looks implicit, undefined-length UN read as a sequence, and for implicit VR the
    dictionary (or a look at the next tag) to tell a sequence from other data.
    """

    def __init__(self, buf: bytes, little: bool) -> None:
        self.buf = buf
        self.tag = _LE_TAG if little else _BE_TAG
        self.u32 = _LE_U32 if little else _BE_U32
        self.explicit = _LE_EXPLICIT if little else _BE_EXPLICIT
        self.implicit = _LE_IMPLICIT if little else _BE_IMPLICIT
        # top-level sequence tag -> every tag nested in it, at any depth (-1: content the
        # walker does not see into, e.g. an explicit UN value pydicom may parse later)
        self.nested: dict[int, frozenset[int]] = {}
        self._collect: set[int] | None = None

    def _read_tag(self, pos: int) -> int:
        group, elem = self.tag.unpack_from(self.buf, pos)
        return int(group) << 16 | int(elem)

    def element_header(self, pos: int, end: int, implicit: bool) -> tuple[int, bytes, int, int]:
        """(tag, VR bytes or b"", value length, header size) of the element at pos."""
        if end - pos < 8:
            raise InstanceError(f"truncated element header at offset {pos}")
        if implicit:
            group, elem, length = self.implicit.unpack_from(self.buf, pos)
            return group << 16 | elem, b"", length, 8
        group, elem, vr, length = self.explicit.unpack_from(self.buf, pos)
        if vr in _KNOWN_VRS:
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise InstanceError(f"truncated element header at offset {pos}")
                return group << 16 | elem, vr, self.u32.unpack_from(self.buf, pos + 8)[0], 12
            return group << 16 | elem, vr, length, 8
        if not (b"AA" <= vr <= b"ZZ"):
            # pydicom: "invalid VR, must be 2 cap chrs, assume implicit and continue"
            return group << 16 | elem, b"", self.u32.unpack_from(self.buf, pos + 4)[0], 8
        return group << 16 | elem, vr, length, 8

    def dataset(
        self,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        *,
        in_item: bool = False,
        undefined_item: bool = False,
        meta: bool = False,
        spans: dict[int, tuple[int, int]] | None = None,
        values: dict[int, bytes] | None = None,
    ) -> int:
        """Walk the elements of one dataset from pos; return where it ends."""
        previous = -1
        top = not in_item and not meta
        while pos < end:
            if meta and end - pos >= 4 and self._read_tag(pos) >> 16 != 2:
                return pos
            if top and end - pos < 8 and not self.buf[pos:end].strip(b"\x00"):
                return end  # zero padding after the last element: too short to hide one
            tag, vr, length, header = self.element_header(pos, end, implicit)
            if tag == _ITEM_DELIMITER:
                if not undefined_item:
                    raise InstanceError(f"unexpected item delimiter at offset {pos}")
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise InstanceError(f"unexpected item tag in a dataset at offset {pos}")
            if not in_item and not meta and tag >> 16 in (0, 2):
                raise InstanceError(f"command or file meta element in the dataset at offset {pos}")
            if tag <= previous:
                raise InstanceError(f"elements out of order or repeated at offset {pos}")
            previous = tag
            start = pos
            collect = self._collect
            if collect is not None and in_item:
                collect.add(tag)
                if vr == b"UN" and length != _UNDEFINED:
                    collect.add(-1)
                elif vr in _FREE_TEXT_VRS:
                    # free text, whatever the dictionary says the tag holds: the
                    # detectors must see it (-1 makes the sequence worth walking)
                    collect.add(-1)
            value = pos + header
            if length == _UNDEFINED:
                if top:
                    self._collect = set()
                pos = self._undefined(tag, vr, value, end, implicit, depth)
                if top:
                    if tag != _PIXEL_DATA:
                        self.nested[tag] = frozenset(self._collect or ())
                    self._collect = None
                if spans is not None:
                    spans[tag] = (start, pos)
                continue
            if length > end - value:
                raise InstanceError(f"element length runs past the end of the data at offset {pos}")
            if values is not None:
                values[tag] = self.buf[value : value + length]
            if vr == b"SQ" or (not vr and self._is_sq_implicit(tag)):
                if top:
                    self._collect = set()
                self.sequence(value, value + length, implicit, depth + 1)
                if top:
                    self.nested[tag] = frozenset(self._collect or ())
                    self._collect = None
            pos = value + length
            if spans is not None:
                spans[tag] = (start, pos)
        if undefined_item:
            raise InstanceError("truncated: a sequence item has no item delimiter")
        return pos

    @staticmethod
    def _is_sq_implicit(tag: int) -> bool:
        return (tag >> 16) & 1 == 0 and _dictionary_vr(tag) == "SQ"

    def _undefined(
        self, tag: int, vr: bytes, pos: int, end: int, implicit: bool, depth: int
    ) -> int:
        """An element of undefined length starting its value at pos; return its end."""
        if vr in (b"SQ", b"UN"):
            is_sq = True
        elif vr:
            is_sq = False
        else:  # implicit VR (or pydicom's implicit switch): ask the dictionary, else peek
            dict_vr = _dictionary_vr(tag) if (tag >> 16) & 1 == 0 else None
            if dict_vr is not None:
                is_sq = dict_vr == "SQ"
            else:
                is_sq = end - pos >= 4 and self._read_tag(pos) == _ITEM
        if is_sq:
            return self.sequence(pos, None, implicit, depth + 1, limit=end)
        if tag != _PIXEL_DATA:
            raise InstanceError(f"undefined length on a non-sequence element at offset {pos}")
        return self.fragments(pos, end)

    def sequence(
        self, pos: int, end: int | None, implicit: bool, depth: int, *, limit: int = 0
    ) -> int:
        """Walk the items of a sequence (end=None: undefined length, up to the delimiter)."""
        if depth > MAX_DEPTH:
            raise InstanceError(f"sequences nested deeper than {MAX_DEPTH} levels")
        bound = end if end is not None else limit
        while True:
            if end is not None and pos == end:
                return pos
            if bound - pos < 8:
                raise InstanceError(f"truncated sequence at offset {pos}")
            tag = self._read_tag(pos)
            length = int(self.u32.unpack_from(self.buf, pos + 4)[0])
            if tag == _SEQUENCE_DELIMITER:
                if end is not None:
                    raise InstanceError(f"sequence delimiter in a defined-length sequence at {pos}")
                return pos + 8
            if tag != _ITEM:
                raise InstanceError(f"expected a sequence item at offset {pos}")
            start = pos + 8
            item_implicit = implicit or (
                bound - start >= 6 and not _vr_is_letters(self.buf[start + 4 : start + 6])
            )
            if length == _UNDEFINED:
                pos = self.dataset(
                    start, bound, item_implicit, depth, in_item=True, undefined_item=True
                )
                continue
            if length > bound - start:
                raise InstanceError(f"item length runs past the end of the data at offset {pos}")
            item_end = start + length
            if self.dataset(start, item_end, item_implicit, depth, in_item=True) != item_end:
                raise InstanceError(f"item content does not fill the item at offset {pos}")
            pos = item_end

    def fragments(self, pos: int, end: int) -> int:
        """Encapsulated pixel data: items of defined length up to the sequence delimiter."""
        while True:
            if end - pos < 8:
                raise InstanceError(f"truncated encapsulated pixel data at offset {pos}")
            tag = self._read_tag(pos)
            length = int(self.u32.unpack_from(self.buf, pos + 4)[0])
            if tag == _SEQUENCE_DELIMITER:
                return pos + 8
            if tag != _ITEM or length == _UNDEFINED or length > end - pos - 8:
                raise InstanceError(f"malformed pixel data fragment at offset {pos}")
            pos += 8 + length


# -- framing --------------------------------------------------------------------------


def _guess_encoding(buf: bytes) -> tuple[bool, bool]:
    """pydicom's guess for a dataset without a transfer syntax (filereader.read_partial)."""
    if len(buf) < 6:
        return True, True
    group = _LE_U16.unpack_from(buf, 0)[0]
    vr = buf[4:6].decode("latin-1")
    if vr in _CONVERTER_VRS:
        return False, group < 1024
    return True, True


def _encoding_for(ts: str | None, dataset: bytes) -> tuple[bool, bool]:
    """(implicit VR, little endian) as pydicom would assume from the transfer syntax."""
    if ts is None:
        return _guess_encoding(dataset)
    if ts == ImplicitVRLittleEndian:
        return True, True
    if ts == ExplicitVRBigEndian:
        return False, False
    return False, True  # explicit VR LE, deflated (after inflating), every compressed syntax


def _inflate(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise InstanceError("the deflated dataset cannot be inflated") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise InstanceError(f"the deflated dataset inflates beyond {limit} bytes")
    return out


@dataclass(frozen=True, slots=True)
class Layout:
    """How an instance was framed and encoded, kept with its Dataset (``ds.casb_layout``)
    so that ``encode`` can write it back the same way, copying the bytes of every element
    that was not changed."""

    transfer_syntax: str
    implicit_vr: bool
    little_endian: bool
    source: bytes  # the dataset's bytes (after the file meta; inflated if deflated)
    spans: dict[int, tuple[int, int]]  # top-level tag -> (start, end) in source
    originals: dict[int, Any]  # top-level tag -> the element as pydicom read it
    meta_source: bytes
    meta_spans: dict[int, tuple[int, int]]
    meta_originals: dict[int, Any]
    nested: dict[int, frozenset[int]]  # top-level sequence -> every tag nested in it

    @property
    def encoding(self) -> tuple[bool, bool]:
        return self.implicit_vr, self.little_endian


def read_header(
    data: bytes, *, complete: bool, max_inflated: int = DEFAULT_MAX_INFLATED
) -> Dataset:
    """Parse an instance's header (complete=False: the bytes before Pixel Data) or a
    whole instance (complete=True) into a pydicom Dataset; InstanceError otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InstanceError("the instance is not bytes")
    data = bytes(data)
    if not data:
        raise InstanceError("the instance is empty")
    meta_start = _PREAMBLE + 4 if data[_PREAMBLE : _PREAMBLE + 4] == b"DICM" else 0
    meta_implicit = not _vr_is_letters(data[meta_start + 4 : meta_start + 6])
    meta_spans: dict[int, tuple[int, int]] = {}
    meta_values: dict[int, bytes] = {}
    meta_end = _Walker(data, little=True).dataset(
        meta_start, len(data), meta_implicit, 0, meta=True, spans=meta_spans, values=meta_values
    )
    raw_ts = meta_values.get(0x00020010)
    ts = None if raw_ts is None else raw_ts.rstrip(b"\x00 ").decode("ascii", "replace")
    body = data[meta_end:]
    if ts == DeflatedExplicitVRLittleEndian:
        if not complete:
            raise InstanceError("a deflated instance can only be inspected whole")
        body = _inflate(body, max_inflated)
    implicit, little = _encoding_for(ts, body)
    if len(body) >= 6:  # pydicom switches to what the first element looks like
        implicit = not _vr_is_letters(body[4:6])
    spans: dict[int, tuple[int, int]] = {}
    walker = _Walker(body, little)
    walker.dataset(0, len(body), implicit, 0, spans=spans)
    if not spans:
        raise InstanceError("the instance has no data elements")
    if not complete and _PIXEL_DATA in spans:
        raise InstanceError("the header bytes include the Pixel Data element")
    try:
        with quiet_pydicom():
            ds = dcmread(BytesIO(data), force=True)
            originals = {int(e.tag): e for e in ds.values()}
            meta_originals = {int(e.tag): e for e in ds.file_meta.values()}
    except Exception as exc:  # pydicom raises many types; none may escape (fail closed)
        raise InstanceError(f"pydicom cannot read the instance ({type(exc).__name__})") from None
    if list(originals) != list(spans) or list(meta_originals) != list(meta_spans):
        raise InstanceError("the instance's structure is ambiguous (readers disagree)")
    ds.casb_layout = Layout(
        transfer_syntax=ts or _encoding_name(implicit, little),
        implicit_vr=implicit,
        little_endian=little,
        source=body,
        spans=spans,
        originals=originals,
        meta_source=data,
        meta_spans=meta_spans,
        meta_originals=meta_originals,
        nested=walker.nested,
    )
    return ds


def layout_of(ds: Dataset) -> Layout | None:
    found = getattr(ds, "casb_layout", None)
    return found if isinstance(found, Layout) else None


def _encoding_name(implicit: bool, little: bool) -> str:
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def transfer_syntax_of(ds: Dataset) -> str:
    """The transfer syntax the instance was read with (from its meta, else the guess)."""
    layout = layout_of(ds)
    if layout is not None:
        return layout.transfer_syntax
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return str(meta.TransferSyntaxUID)
    return str(ExplicitVRLittleEndian)


def encode(ds: Dataset, original_ts: str) -> bytes:
    """Write ``ds`` back in the encoding and framing it was read with.

    A preamble is written as 128 zero bytes (the original is application-defined and may
    hold anything); the file meta group is written when the input had one, with its group
    length recomputed; a deflated dataset is deflated again. Elements that are still the
    ones pydicom read are copied from the input bytes; the others are encoded by pydicom.
    """
    layout = layout_of(ds)
    if layout is None:
        implicit, little = _encoding_for(original_ts, b"")
    else:
        implicit, little = layout.encoding
    out = BytesIO()
    meta: FileMetaDataset | None = getattr(ds, "file_meta", None)
    if getattr(ds, "preamble", None) is not None or (meta is not None and len(meta)):
        # A file meta group without the preamble and "DICM" is not a PS3.10 file (some
        # clients send that, and strict readers then refuse what the PACS stored): the
        # rewritten header always has them.
        out.write(b"\x00" * _PREAMBLE + b"DICM")
    if meta is not None and len(meta):
        out.write(_encode_meta(meta, layout))
    if layout is None:
        body = DicomBytesIO()
        body.is_implicit_VR, body.is_little_endian = implicit, little
        write_dataset(body, ds)
        encoded = body.getvalue()
    else:
        encoded = _splice(ds, layout.source, layout.spans, layout.originals, implicit, little)
    if original_ts == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        encoded = deflater.compress(encoded) + deflater.flush()
        if len(encoded) % 2:
            encoded += b"\x00"
    out.write(encoded)
    return out.getvalue()


def _encode_meta(meta: FileMetaDataset, layout: Layout | None) -> bytes:
    if layout is None:
        if "FileMetaInformationGroupLength" not in meta:
            meta.FileMetaInformationGroupLength = 0  # write_file_meta_info sets the value
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, meta, enforce_standard=False)
        return bytes(fp.getvalue())
    # The group length counts the bytes of the elements after it (PS3.10 7.1); it is
    # written here instead of by write_file_meta_info so unchanged elements are copied.
    elements = _splice(
        meta,
        layout.meta_source,
        layout.meta_spans,
        layout.meta_originals,
        False,
        True,
        skip=_META_GROUP_LENGTH,
    )
    return b"\x02\x00\x00\x00UL\x04\x00" + _LE_U32.pack(len(elements)) + elements


def _splice(
    ds: Dataset,
    source: bytes,
    spans: dict[int, tuple[int, int]],
    originals: dict[int, Any],
    implicit: bool,
    little: bool,
    *,
    skip: int | None = None,
) -> bytes:
    """The dataset's elements in tag order: the bytes of the input for every element
    pydicom still holds as read (a RawDataElement is immutable, so "as read" is "the
    same object"), pydicom's encoding for the others (new, replaced, converted)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    elements = {int(e.tag): e for e in ds.values()}
    charset = ds.get("SpecificCharacterSet")
    encodings = convert_encodings(charset) if charset else [default_encoding]
    for tag in sorted(elements):
        if tag == skip or (tag & 0xFFFF == 0 and tag >> 16 > 6):
            continue  # group lengths: retired outside the file meta (pydicom skips them)
        elem = elements[tag]
        if not elem.is_raw:
            write_data_element(fp, elem, encodings)
        elif originals.get(tag) is elem:
            start, end = spans[tag]
            fp.write(source[start:end])
        else:
            fp.write(_raw_element_bytes(elem, implicit, little))
    return bytes(fp.getvalue())


def _raw_element_bytes(elem: Any, implicit: bool, little: bool) -> bytes:
    """A RawDataElement (its value is already encoded) as element bytes: what pydicom's
    write_data_element does for raw elements, without its per-element set-up cost."""
    value: bytes = elem.value or b""
    length = len(value)
    tag = int(elem.tag)
    order = "<" if little else ">"
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    vr = str(elem.VR or "UN")
    if implicit:
        return head + struct.pack(order + "L", length) + value
    if vr.encode() in _LONG_VRS:
        return head + vr.encode() + b"\x00\x00" + struct.pack(order + "L", length) + value
    if length > 0xFFFF:
        raise InstanceError("a replacement value is too long for its VR")
    return head + vr.encode() + struct.pack(order + "H", length) + value
