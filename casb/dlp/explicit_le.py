"""The fast path of ``Inspector.inspect``: explicit VR little endian instances, read,
inspected and rewritten on their bytes.

Almost every instance a PACS receives is explicit VR little endian (with or without the
preamble and the file meta group). For those, the general path (casb.dlp.instance reads
with pydicom -> casb.dlp.detect -> casb.dlp.deidentify -> casb.dlp.instance.encode)
spends most of its time building and re-walking pydicom objects. This module walks the
element headers once, with the structure rules of casb.dlp.instance's ``_Walker``, and
applies the same detectors (``Detector``'s tag decisions, free-text scanner and
top-level checks) and the same de-identification (``Deidentifier``'s actions and value
helpers) on the raw values: only text that is scanned is decoded. The rewritten header
is assembled from byte spans of the input, encoding only what changed.

It must give exactly the verdict the general path gives -- action, findings, and the
rewritten header byte for byte -- so it mirrors what that path's pydicom objects do on
output: an element pydicom had to convert (a sequence that was walked, the Specific
Character Set, the code strings the top-level checks read, a private creator looked up)
is written the way pydicom writes a converted element, every other element keeps its
input bytes. The rules it mirrors are commented where they are applied.

Whatever it is not sure to read exactly as pydicom would goes to the general path
(``read`` returns None, ``deidentified`` returns None): other transfer syntaxes,
implicit VR items, UN and unknown VRs, undefined lengths other than sequences, element
values pydicom would have to convert that are not in their plain form, and every
structure problem -- the general path then raises the InstanceError with its reason.
It never guesses; tests/unit/dlp/test_fast_path_differential.py runs both paths over
the test corpus and random mutations and requires identical verdicts.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from pydicom.charset import (
    convert_encodings,
    custom_encoders,
    decode_bytes,
    default_encoding,
    need_tail_escape_sequence_encodings,
)
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, PN_DELIMS, STANDARD_VR, TEXT_VR_DELIMS
from pydicom.values import converters

from casb.dlp.deidentify import (
    CLEANABLE_TEXT_VRS,
    Deidentifier,
    ascii_values,
    cleaned_element,
    dummy_value,
    shifted_value,
)
from casb.dlp.detect import (
    ALWAYS_SCANNED_VRS,
    BURNED_IN_ANNOTATION,
    IDENTITY_RULES,
    MODALITY,
    PATIENT_ID,
    PATIENT_IDENTITY_REMOVED,
    PATIENT_NAME,
    PIXEL_DATA,
    SPECIFIC_CHARACTER_SET,
    TEXT_VRS,
    Detector,
    TagInfo,
    TextScanner,
    is_private_creator,
    private_creator_tag,
    tag_text,
)
from casb.dlp.findings import Finding
from casb.dlp.instance import MAX_DEPTH

_PREAMBLE: Final = 128
_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITER: Final = 0xFFFEE00D
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_META_GROUP_LENGTH: Final = 0x00020000
_TRANSFER_SYNTAX: Final = 0x00020010
_PIXEL_REPRESENTATION: Final = 0x00280103
_SOP_CLASS: Final = 0x00080016
_SOP_INSTANCE: Final = 0x00080018
_MEDIA_SOP_CLASS: Final = 0x00020002
_MEDIA_SOP_INSTANCE: Final = 0x00020003
# The one transfer syntax value this path reads: pydicom's own padding, so that the
# value pydicom converts (and writes back) is the input's bytes.
_EXPLICIT_LE_VALUE: Final = str(ExplicitVRLittleEndian).encode() + b"\x00"

_HEAD = struct.Struct("<HH2sH")
_ITEM_HEAD = struct.Struct("<HHL")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_TAG = struct.Struct("<HH")

_VRS: Final[dict[bytes, str]] = {str(vr).encode(): str(vr) for vr in STANDARD_VR if vr != "UN"}
_LONG_VRS: Final = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_LONG_VR_BYTES: Final = frozenset(vr.encode() for vr in _LONG_VRS)
_CONVERTER_VRS: Final = frozenset(converters)
_PN_DELIMITERS: Final = frozenset(PN_DELIMS)
_TEXT_DELIMITERS: Final = frozenset(TEXT_VR_DELIMS)
_ITEM_DELIMITER_BYTES: Final = b"\xfe\xff\x0d\xe0"
_ITEM_DELIMITATION: Final = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITATION: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_TAG: Final = b"\xfe\xff\x00\xe0"
_ASCII_CREATOR: Final = frozenset(range(0x20, 0x7F)) | {0}
_CACHE_LIMIT: Final = 4096
_CACHED_CHARSET_LENGTH: Final = 64  # a few defined terms
# elements pydicom converts by itself, besides group lengths (see _check_converted)
_CONVERTED: Final = frozenset({SPECIFIC_CHARACTER_SET, _PIXEL_REPRESENTATION})


class _Fallback(Exception):
    """This input is outside what the fast path reads exactly: the general path decides."""


# An element: (tag, VR, start, value start, end, items of a sequence, undefined length).
_Element = tuple[int, str, int, int, int, "list[_Dataset] | None", bool]


class _Dataset:
    """The top-level dataset, the file meta group, or one sequence item."""

    __slots__ = ("_by_tag", "creators", "elements", "undefined")

    def __init__(self, elements: list[_Element], undefined: bool) -> None:
        self.elements = elements
        self.undefined = undefined  # an item of undefined length
        self.creators: set[int] | None = None  # private creators pydicom converted
        self._by_tag: dict[int, _Element] | None = None

    def get(self, tag: int) -> _Element | None:
        by_tag = self._by_tag
        if by_tag is None:
            by_tag = self._by_tag = {e[0]: e for e in self.elements}
        return by_tag.get(tag)


_DELETE: Final = "delete"


@dataclass(frozen=True, slots=True)
class _Replace:
    """A new raw element (Deidentifier's ``new_raw_element``)."""

    vr: str
    value: bytes


@dataclass(frozen=True, slots=True)
class _Walked:
    """A sequence the de-identification walked: the decisions of each of its items."""

    items: list[dict[int, _Decision]]


# What de-identification does to an element (absent: it stays as read).
_Decision = str | _Replace | _Walked | DataElement


@dataclass(slots=True)
class _Run:
    """The state of one inspection."""

    data: bytes
    preamble: bool
    meta: _Dataset
    body: _Dataset
    nested: dict[int, set[int]]  # top-level sequence -> the tags nested in it
    encodings: list[str] = field(default_factory=list)  # the top-level dataset's
    scanner: TextScanner | None = None
    patient_id: str = ""
    out: list[Finding] = field(default_factory=list)
    walked: set[int] = field(default_factory=set)  # top-level sequences detection walked
    converted: set[int] = field(default_factory=set)  # top-level code strings converted
    shift: int | None = None  # days dates move back (Modified Dates Option)


class FastHeader:
    """One instance read by the fast path: its findings, and its de-identification."""

    def __init__(self, path: ExplicitLittleEndian, run: _Run, uids: tuple[str, str]) -> None:
        self._path = path
        self._run = run
        self.findings = tuple(run.out)
        self.sop_class_uid, self.sop_instance_uid = uids

    def deidentified(self) -> bytes | None:
        """The de-identified header, or None: the general path must do it."""
        try:
            return self._path.deidentify(self._run)
        except Exception:  # _Fallback, or anything pydicom raised: the general path decides
            return None


class ExplicitLittleEndian:
    """The fast path for one Detector and its Deidentifier (None: inspection only);
    see the module docstring."""

    def __init__(self, detector: Detector, deid: Deidentifier | None) -> None:
        self._detector = detector
        self._deid = deid
        self._charsets: dict[bytes, list[str]] = {}
        self._actions: dict[int, str] = {}
        self._marks: tuple[tuple[int, bytes], ...] | None = None
        # tags no detector looks at / the de-identification keeps, inside sequences
        self._uninteresting: set[int] = set()
        self._unchanged: set[int] = set()
        # The general path reads these converted; the fast path reads them raw, which is
        # the same as long as no detector looks at their values.
        self.enabled = not any(
            detector.is_removed_by_basic(tag)
            for tag in (
                SPECIFIC_CHARACTER_SET,
                _TRANSFER_SYNTAX,
                _META_GROUP_LENGTH,
                _PIXEL_REPRESENTATION,
            )
        )

    # reading ----------------------------------------------------------------------

    def read(self, data: bytes, complete: bool) -> FastHeader | None:
        """Read and inspect an instance; None when the general path must do it."""
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        if not self.enabled or not isinstance(data, bytes):
            return None
        try:
            run = self._parse(data, complete)
            self._detect_instance(run)
            uids = (
                self._original_uid(run, _SOP_CLASS, _MEDIA_SOP_CLASS),
                self._original_uid(run, _SOP_INSTANCE, _MEDIA_SOP_INSTANCE),
            )
        except Exception:  # _Fallback, or anything pydicom raised: the general path decides
            return None
        return FastHeader(self, run, uids)

    def _parse(self, data: bytes, complete: bool) -> _Run:
        preamble = data[_PREAMBLE : _PREAMBLE + 4] == b"DICM"
        pos = _PREAMBLE + 4 if preamble else 0
        end = len(data)
        meta: list[_Element] = []
        if end - pos >= 4 and _U16.unpack_from(data, pos)[0] == 2:
            meta, pos = self._meta(data, pos, end)
            ts = _value_of(data, meta, _TRANSFER_SYNTAX)
            if (
                meta[0][0] != _META_GROUP_LENGTH  # pydicom converts the first element
                or ts is None
                or ts[1] != "UI"
                or data[ts[3] : ts[4]] != _EXPLICIT_LE_VALUE
            ):
                raise _Fallback
        elif not _guessed_explicit_le(data, pos, end):
            raise _Fallback  # no file meta: pydicom guesses; only this guess is read here
        if end - pos < 6 or not _letters(data, pos + 4):
            raise _Fallback  # the first element looks implicit VR (or there is none)
        parser = _Parser(data)
        elements, _ = parser.dataset(pos, end, 0, top=True, undefined_item=False, collect=None)
        if not elements or (not complete and parser.pixel_data):
            raise _Fallback
        return _Run(data, preamble, _Dataset(meta, False), _Dataset(elements, False), parser.nested)

    def _meta(self, data: bytes, pos: int, end: int) -> tuple[list[_Element], int]:
        """The file meta group: explicit VR little endian elements of group 0002."""
        if end - pos < 6 or not _letters(data, pos + 4):
            raise _Fallback
        elements: list[_Element] = []
        previous = -1
        while pos < end:
            if end - pos >= 4 and _U16.unpack_from(data, pos)[0] != 2:
                break
            if end - pos < 8:
                raise _Fallback
            group, number, vr_bytes, length = _HEAD.unpack_from(data, pos)
            tag = group << 16 | number
            vr = _VRS.get(vr_bytes)
            if tag <= previous or vr is None or vr == "SQ":
                raise _Fallback
            previous = tag
            value = pos + 8
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise _Fallback
                length = _U32.unpack_from(data, pos + 8)[0]
                value = pos + 12
            stop = value + length
            if length == _UNDEFINED or stop > end:
                raise _Fallback
            _check_converted(data, tag, vr, value, stop)
            elements.append((tag, vr, pos, value, stop, None, False))
            pos = stop
        if not elements:
            raise _Fallback
        return elements, pos

    # detection (casb.dlp.detect.Detector.findings, on raw elements) ---------------

    def _detect_instance(self, run: _Run) -> None:
        data, body = run.data, run.body
        run.encodings = self._own_encodings(data, body, [default_encoding])
        name = body.get(PATIENT_NAME)
        patient_id = ""
        pid = body.get(PATIENT_ID)
        if pid is not None:
            patient_id = " ".join(_decoded(data, pid, run.encodings)).strip()
        if name is not None and name[5] is not None:
            raise _Fallback  # a sequence pydicom would hand over converted
        raw_name = None if name is None else data[name[3] : name[4]]
        run.patient_id = patient_id
        run.scanner = self._detector.scanner_from(raw_name, patient_id, run.encodings)
        if run.meta.elements:
            self._detect(run, run.meta, "", 0, [default_encoding], None)
        self._detect(run, body, "", 0, [default_encoding], run.nested)
        self._top_level(run)

    def _detect(
        self,
        run: _Run,
        ds: _Dataset,
        prefix: str,
        depth: int,
        encodings: list[str],
        nested: dict[int, set[int]] | None,
    ) -> None:
        data = run.data
        encodings = self._own_encodings(data, ds, encodings)
        detector = self._detector
        infos = detector.tag_infos
        out = run.out
        top = depth == 0 and nested is not None
        for e in ds.elements:
            tag = e[0]
            info = infos.get(tag)
            if info is None:
                info = detector.tag_info(tag)
            if info.skip:
                continue  # group lengths, private creators, pixel data
            vr = e[1]
            if info.private:
                path = prefix + info.text
                if not self._is_safe_private(run, ds, tag):
                    out.append(Finding("private_tag", "", info.text, path))
                if vr in TEXT_VRS or vr == "PN":
                    self._scan(run, e, info, path, encodings)
                if vr == "SQ" and (depth or self._worth_detecting(nested, tag)):
                    self._converted_sequence(run, ds, e)
                    if top:
                        run.walked.add(tag)
                    self._detect_items(run, e, path, depth, encodings)
                continue
            if info.removed and _has_value(data, e):
                out.append(Finding("annex_e", info.keyword, info.text, prefix + info.name))
            if vr == "SQ":
                if depth or self._worth_detecting(nested, tag):
                    if top:
                        run.walked.add(tag)
                    self._detect_items(run, e, prefix + info.name, depth, encodings)
            elif vr in ALWAYS_SCANNED_VRS or (info.descriptor and vr in TEXT_VRS):
                self._scan(run, e, info, prefix + info.name, encodings)

    def _worth_detecting(self, nested: dict[int, set[int]] | None, tag: int) -> bool:
        """Detector._worth_walking: a top-level sequence only when a nested tag is
        interesting."""
        if nested is None:
            return True
        tags = nested.get(tag)
        if tags is None:
            return True
        return _any_of(tags, self._detector.interesting, self._uninteresting)

    def _detect_items(
        self, run: _Run, e: _Element, path: str, depth: int, encodings: list[str]
    ) -> None:
        for index, item in enumerate(e[5] or ()):
            self._detect(run, item, f"{path}[{index}].", depth + 1, encodings, None)

    def _scan(self, run: _Run, e: _Element, info: TagInfo, path: str, encodings: list[str]) -> None:
        texts = _decoded(run.data, e, encodings)
        if not texts:
            return
        assert run.scanner is not None
        found = run.scanner.rules(texts[0])
        tag = e[0]
        if tag in (PATIENT_NAME, PATIENT_ID):
            found = [r for r in found if r not in IDENTITY_RULES]
        for rule in found:
            run.out.append(Finding(rule, info.keyword, info.text, path))

    def _top_level(self, run: _Run) -> None:
        """Detector._top_level; the values it reads are converted (and so written back
        the way pydicom writes a converted code string)."""
        out = run.out
        burned = self._code_string(run, BURNED_IN_ANNOTATION)
        if burned == "YES":
            out.append(_burned_in_finding("burned_in_annotation.yes"))
        elif (
            not burned  # Modality is read (converted) only then
            and self._code_string(run, MODALITY) in self._detector.burned_in_modalities
        ):
            out.append(_burned_in_finding("burned_in_annotation.unknown"))
        if self._code_string(
            run, PATIENT_IDENTITY_REMOVED
        ) == "YES" and self._detector.contradicts_identity_removed(out):
            out.append(
                Finding(
                    "identity_removed_contradicted",
                    "PatientIdentityRemoved",
                    tag_text(PATIENT_IDENTITY_REMOVED),
                    "PatientIdentityRemoved",
                )
            )

    def _code_string(self, run: _Run, tag: int) -> str:
        e = run.body.get(tag)
        if e is None:
            return ""
        if e[1] != "CS":
            raise _Fallback
        run.converted.add(tag)
        # pydicom's CS value (trailing spaces and NULs dropped, split at "\"), its values
        # joined by spaces: detect._upper
        text = run.data[e[3] : e[4]].decode("latin-1").rstrip(" \x00")
        return text.replace("\\", " ").strip().upper()

    def _original_uid(self, run: _Run, tag: int, meta_tag: int) -> str:
        """inspector._uid: the dataset's UID, else the file meta's."""
        for source, key in ((run.body, tag), (run.meta, meta_tag)):
            e = source.get(key)
            if e is not None:
                text = "\\".join(_decoded(run.data, e, ["ascii"])).strip(" \x00")
                if text:
                    return text
        return ""

    # private creators -------------------------------------------------------------

    def _is_safe_private(self, run: _Run, ds: _Dataset, tag: int) -> bool:
        """Detector.is_safe_private: looks the creator up (pydicom converts it)."""
        safe = self._detector.safe_private
        creator_tag = private_creator_tag(tag)
        if creator_tag is None or not safe:
            return False
        creator = ds.get(creator_tag)
        if creator is None:
            return False
        value = _converted_creator(run.data, ds, creator)
        text = " ".join(p.rstrip("\x00 ") for p in value.decode("ascii").split("\\"))
        return (text.strip(), tag >> 16, tag & 0xFF) in safe

    def _converted_sequence(self, run: _Run, ds: _Dataset, e: _Element) -> None:
        """pydicom converts a private sequence's creator when it converts the sequence
        (Dataset.__setitem__ sets the element's private_creator); one of undefined
        length was read converted, and its creator left as it was."""
        tag = e[0]
        if e[6]:
            return
        block = tag & 0xFFFF0000 | (tag & 0xFFFF) >> 8
        creator = ds.get(block)
        if creator is None or block == tag or not block & 0xFFFF:
            return  # none; or the group length, written back as it was (UL, 4 bytes)
        if not is_private_creator(block):
            raise _Fallback
        _converted_creator(run.data, ds, creator)

    # character sets ---------------------------------------------------------------

    def _own_encodings(self, data: bytes, ds: _Dataset, inherited: list[str]) -> list[str]:
        """detect.dataset_encodings (the parser made sure the raw and the converted
        Specific Character Set give the same codecs)."""
        elements = ds.elements
        e = None
        for candidate in elements:
            if candidate[0] >= SPECIFIC_CHARACTER_SET:
                if candidate[0] == SPECIFIC_CHARACTER_SET:
                    e = candidate
                break
        if e is None:
            return inherited
        raw = data[e[3] : e[4]]
        found = self._charsets.get(raw)
        if found is None:
            found = list(convert_encodings(raw.decode("ascii").strip(" \x00").split("\\")))
            if len(raw) <= _CACHED_CHARSET_LENGTH:  # bounded: hostile input may carry any
                if len(self._charsets) > _CACHE_LIMIT:
                    self._charsets.clear()
                self._charsets[raw] = found
        return found

    # de-identification (casb.dlp.deidentify.Deidentifier.apply, on raw elements) --

    def deidentify(self, run: _Run) -> bytes:
        deid = self._deid
        if deid is None:
            raise _Fallback
        meta = self._deidentify(run, deid, run.meta, 0, ["iso8859"], None)
        body = self._deidentify(run, deid, run.body, 0, run.encodings, run.nested)
        out: list[bytes] = []
        if run.preamble or run.meta.elements:
            out.append(b"\x00" * _PREAMBLE + b"DICM")
        if run.meta.elements:
            out.append(self._meta_bytes(run, meta))
        out.append(self._top_bytes(run, deid, body))
        return b"".join(out)

    def _deidentify(
        self,
        run: _Run,
        deid: Deidentifier,
        ds: _Dataset,
        depth: int,
        encodings: list[str],
        nested: dict[int, set[int]] | None,
    ) -> dict[int, _Decision]:
        """Deidentifier._clean: what happens to each element of one dataset."""
        data = run.data
        encodings = self._own_encodings(data, ds, encodings)
        actions = deid.actions
        decisions: dict[int, _Decision] = {}
        removed_private = False
        cached = self._actions
        for e in ds.elements:
            tag = e[0]
            if tag == PIXEL_DATA:
                continue
            group = tag >> 16
            if not tag & 0xFFFF:
                if group != 2:
                    decisions[tag] = _DELETE  # group lengths (retired outside the meta)
                continue
            vr = e[1]
            if group & 1:
                if is_private_creator(tag):
                    continue
                if actions.private == "C" and self._is_safe_private(run, ds, tag):
                    if vr == "SQ":
                        self._converted_sequence(run, ds, e)
                        decisions[tag] = self._walk_items(run, deid, e, depth, encodings)
                    continue
                decisions[tag] = _DELETE
                removed_private = True
                continue
            action = cached.get(tag)
            if action is None:
                if len(cached) > _CACHE_LIMIT:
                    cached.clear()
                action = cached[tag] = actions.action(tag)
            if action == "K":
                if vr == "SQ" and (
                    depth
                    or nested is None
                    or tag not in nested
                    or _any_of(nested[tag], deid.changes, self._unchanged)
                ):
                    decisions[tag] = self._walk_items(run, deid, e, depth, encodings)
                continue
            self._act(run, deid, e, action, depth, encodings, decisions)
        if removed_private:
            _drop_unused_creators(ds, decisions)
        return decisions

    def _walk_items(
        self, run: _Run, deid: Deidentifier, e: _Element, depth: int, encodings: list[str]
    ) -> _Walked:
        return _Walked(
            [self._deidentify(run, deid, item, depth + 1, encodings, None) for item in e[5] or ()]
        )

    def _act(
        self,
        run: _Run,
        deid: Deidentifier,
        e: _Element,
        action: str,
        depth: int,
        encodings: list[str],
        decisions: dict[int, _Decision],
    ) -> None:
        """Deidentifier._act."""
        tag, vr = e[0], e[1]
        data = run.data
        if action == "C":
            can, cleaned = self._clean_value(run, deid, e, encodings)
            if can:
                if cleaned is not None:
                    decisions[tag] = cleaned
                return
            action = deid.actions.basic(tag)  # cannot really clean: the basic action
            if action == "K":
                return
        if action == "X":
            decisions[tag] = _DELETE
        elif action == "Z":
            decisions[tag] = _Replace(vr, b"")
        elif action in ("U", "D"):
            if action == "U" and vr == "SQ":
                decisions[tag] = self._walk_items(run, deid, e, depth, encodings)
            elif vr == "UI":
                values = ascii_values(data[e[3] : e[4]])
                if values:
                    decisions[tag] = _Replace("UI", deid.uid_value(values))
            else:
                decisions[tag] = _Replace(vr, dummy_value(vr))

    def _clean_value(
        self, run: _Run, deid: Deidentifier, e: _Element, encodings: list[str]
    ) -> tuple[bool, _Decision | None]:
        """Deidentifier._clean_value: (False, None) when the element cannot be cleaned,
        else (True, its decision or None when it stays as it is)."""
        tag, vr = e[0], e[1]
        if tag in deid.date_rows and deid.modified_dates:
            if vr == "TM":
                return True, None  # a whole-day shift leaves times as they are
            if vr not in ("DA", "DT"):
                return False, None
            values = ascii_values(run.data[e[3] : e[4]])
            if not values:
                return True, None
            if run.shift is None:
                run.shift = deid.shift_days(run.patient_id)
            shifted = shifted_value(values, vr, run.shift)
            return (False, None) if shifted is None else (True, _Replace(vr, shifted))
        if vr not in CLEANABLE_TEXT_VRS:
            return False, None
        assert run.scanner is not None
        return True, cleaned_element(tag, vr, _decoded(run.data, e, encodings), run.scanner)

    # writing (casb.dlp.instance.encode, and pydicom's writer for converted elements) --

    def _meta_bytes(self, run: _Run, decisions: dict[int, _Decision]) -> bytes:
        """instance._encode_meta: the group length recomputed, the rest spliced."""
        data = run.data
        parts: list[bytes] = []
        for e in run.meta.elements:
            tag = e[0]
            if tag == _META_GROUP_LENGTH:
                continue
            decision = decisions.get(tag)
            if decision is None:
                parts.append(data[e[2] : e[4]])  # the transfer syntax: as pydicom writes it
            elif decision is _DELETE:
                continue
            elif isinstance(decision, _Replace):
                parts.append(_raw_bytes(tag, decision.vr, decision.value))
            else:
                raise _Fallback
        elements = b"".join(parts)
        return b"\x02\x00\x00\x00UL\x04\x00" + _U32.pack(len(elements)) + elements

    def _top_bytes(self, run: _Run, deid: Deidentifier, decisions: dict[int, _Decision]) -> bytes:
        """instance._splice of the de-identified dataset, with the marking elements:
        runs of elements that stay as read are copied as one span of the input."""
        data = run.data
        marks = self._mark_bytes(deid)
        mark = 0
        next_mark = marks[0][0]
        walked = run.walked
        converted = run.converted
        creators = run.body.creators or ()
        parts: list[bytes] = []
        span = -1  # where the current run of unchanged elements starts
        for e in run.body.elements:
            tag = e[0]
            if tag >= next_mark:
                if span >= 0:
                    parts.append(data[span : e[2]])
                    span = -1
                while tag >= next_mark:
                    parts.append(marks[mark][1])
                    mark += 1
                    next_mark = marks[mark][0] if mark < len(marks) else 0x100000000
                if marks[mark - 1][0] == tag:
                    continue  # replaced by the mark
            decision = decisions.get(tag)
            if decision is None:
                if e[5] is not None:
                    changed = e[6] or tag in walked  # converted (pydicom: undefined length)
                else:
                    changed = tag in converted or tag == SPECIFIC_CHARACTER_SET or tag in creators
                if not changed:
                    if span < 0:
                        span = e[2]
                    continue
            if span >= 0:
                parts.append(data[span : e[2]])
                span = -1
            if decision is _DELETE:
                continue
            if decision is not None:
                parts.append(self._decided_bytes(run, e, decision, tag in walked, run.encodings))
            elif e[5] is not None:
                parts.append(self._sequence_bytes(run, e, None, tag in walked, run.encodings))
            elif tag in creators:
                parts.append(self._creator_bytes(data, e, run.encodings))
            else:
                parts.append(_code_string_bytes(data, e))
        if span >= 0:
            parts.append(data[span : run.body.elements[-1][4]])
        parts.extend(m[1] for m in marks[mark:])
        return b"".join(parts)

    def _decided_bytes(
        self, run: _Run, e: _Element, decision: _Decision, walked: bool, encodings: list[str]
    ) -> bytes:
        if isinstance(decision, _Replace):
            return _raw_bytes(e[0], decision.vr, decision.value)
        if isinstance(decision, _Walked):
            return self._sequence_bytes(run, e, decision, walked, encodings)
        if isinstance(decision, DataElement):
            fp = DicomBytesIO()
            fp.is_implicit_VR, fp.is_little_endian = False, True
            write_data_element(fp, decision, encodings)
            return bytes(fp.getvalue())
        raise _Fallback

    def _sequence_bytes(
        self,
        run: _Run,
        e: _Element,
        walked: _Walked | None,
        detected: bool,
        encodings: list[str],
    ) -> bytes:
        """A converted sequence as pydicom's write_data_element / write_sequence writes
        it: undefined lengths kept, defined lengths recomputed, item by item."""
        parts: list[bytes] = []
        for index, item in enumerate(e[5] or ()):
            decisions = walked.items[index] if walked is not None else {}
            body = self._item_bytes(run, item, decisions, detected, encodings)
            if item.undefined:
                parts += (_ITEM_TAG, b"\xff\xff\xff\xff", body, _ITEM_DELIMITATION)
            else:
                parts += (_ITEM_TAG, _U32.pack(len(body)), body)
        content = b"".join(parts)
        head = _TAG.pack(e[0] >> 16, e[0] & 0xFFFF) + b"SQ\x00\x00"
        if e[6]:
            return head + b"\xff\xff\xff\xff" + content + _SEQUENCE_DELIMITATION
        return head + _U32.pack(len(content)) + content

    def _item_bytes(
        self,
        run: _Run,
        item: _Dataset,
        decisions: dict[int, _Decision],
        detected: bool,
        inherited: list[str],
    ) -> bytes:
        """pydicom's write_dataset of an item: its elements in tag order, group lengths
        above group 6 left out, raw ones written as they are, converted ones encoded."""
        data = run.data
        encodings = self._own_encodings(data, item, inherited)
        parts: list[bytes] = []
        for e in item.elements:
            tag = e[0]
            if not tag & 0xFFFF and tag >> 16 > 6:
                continue
            decision = decisions.get(tag)
            if decision is _DELETE:
                continue
            if decision is None:
                if e[5] is not None and (e[6] or detected):
                    # every sequence in an item detection walked was walked (converted)
                    parts.append(self._sequence_bytes(run, e, None, detected, encodings))
                elif tag == SPECIFIC_CHARACTER_SET:  # write_dataset reads it converted
                    parts.append(_code_string_bytes(data, e))
                elif item.creators and tag in item.creators:
                    parts.append(self._creator_bytes(data, e, encodings))
                else:
                    parts.append(_raw_bytes(tag, e[1], data[e[3] : e[4]]))
            else:
                parts.append(self._decided_bytes(run, e, decision, detected, encodings))
        return b"".join(parts)

    def _creator_bytes(self, data: bytes, e: _Element, encodings: list[str]) -> bytes:
        """A converted private creator as pydicom writes it (write_text): each value
        without trailing spaces and NULs, padded to even length."""
        first = encodings[0] if encodings else default_encoding
        if first in custom_encoders or first in need_tail_escape_sequence_encodings:
            raise _Fallback  # encoders that may add escape sequences even to ASCII
        values = [v.rstrip(b"\x00 ") for v in data[e[3] : e[4]].split(b"\\")]
        value = b"\\".join(values)
        if len(value) % 2:
            value += b" "
        return _raw_bytes(e[0], "LO", value)

    def _mark_bytes(self, deid: Deidentifier) -> tuple[tuple[int, bytes], ...]:
        found = self._marks
        if found is None:
            found = self._marks = tuple(
                (int(m.tag), _raw_bytes(int(m.tag), str(m.VR), m.value or b""))
                for m in deid.marks((False, True))
            )
        return found


# -- parsing ----------------------------------------------------------------------------


class _Parser:
    """The element structure, as casb.dlp.instance._Walker checks it (and as pydicom
    reads it); anything the walker would refuse, or read as implicit VR, falls back."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.nested: dict[int, set[int]] = {}
        self.pixel_data = False  # a top-level Pixel Data element

    def dataset(
        self,
        pos: int,
        end: int,
        depth: int,
        *,
        top: bool,
        undefined_item: bool,
        collect: set[int] | None,
    ) -> tuple[list[_Element], int]:
        data = self.data
        head = _HEAD.unpack_from
        elements: list[_Element] = []
        previous = -1
        while pos < end:
            if end - pos < 8:
                if top and not data[pos:end].strip(b"\x00"):
                    return elements, end  # zero padding, too short to hide an element
                raise _Fallback
            group, number, vr_bytes, length = head(data, pos)
            tag = group << 16 | number
            if group == 0xFFFE:
                if vr_bytes in _LONG_VR_BYTES and end - pos < 12:
                    raise _Fallback  # the walker reads a 12-byte header here
                if tag == _ITEM_DELIMITER and undefined_item:
                    return elements, pos + 8
                raise _Fallback
            if tag <= previous or (top and group in (0, 2)):
                raise _Fallback
            previous = tag
            vr = _VRS.get(vr_bytes)
            if vr is None:
                raise _Fallback  # UN, or not a VR: pydicom may read it another way
            value = pos + 8
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise _Fallback
                length = _U32.unpack_from(data, pos + 8)[0]
                value = pos + 12
            if collect is not None:
                collect.add(tag)
                if vr in ALWAYS_SCANNED_VRS:
                    collect.add(-1)  # as instance.py: nested free text is always walked
            if vr == "SQ":
                _check_converted(data, tag, vr, value, value)
                inner = set() if top else collect
                if length == _UNDEFINED:
                    items, stop = self.sequence(value, None, end, depth + 1, inner)
                else:
                    stop = value + length
                    if stop > end:
                        raise _Fallback
                    items, _ = self.sequence(value, stop, stop, depth + 1, inner)
                if top and inner is not None:
                    self.nested[tag] = inner
                elements.append((tag, vr, pos, value, stop, items, length == _UNDEFINED))
                pos = stop
                continue
            stop = value + length
            if length == _UNDEFINED or stop > end:
                raise _Fallback
            if tag in _CONVERTED or not number:
                _check_converted(data, tag, vr, value, stop)
            elif top and tag == PIXEL_DATA:
                self.pixel_data = True
            elements.append((tag, vr, pos, value, stop, None, False))
            pos = stop
        if undefined_item:
            raise _Fallback  # no item delimiter
        return elements, pos

    def sequence(
        self, pos: int, end: int | None, limit: int, depth: int, collect: set[int] | None
    ) -> tuple[list[_Dataset], int]:
        if depth > MAX_DEPTH:
            raise _Fallback
        data = self.data
        bound = end if end is not None else limit
        items: list[_Dataset] = []
        while True:
            if end is not None and pos == end:
                return items, pos
            if bound - pos < 8:
                raise _Fallback
            group, number, length = _ITEM_HEAD.unpack_from(data, pos)
            tag = group << 16 | number
            if tag == _SEQUENCE_DELIMITER:
                if end is not None:
                    raise _Fallback
                return items, pos + 8
            if tag != _ITEM:
                raise _Fallback
            start = pos + 8
            implicit = bound - start >= 6 and not _letters(data, start + 4)
            if length == _UNDEFINED:
                if implicit:
                    # read as implicit VR: only an empty item reads the same
                    if data[start : start + 4] != _ITEM_DELIMITER_BYTES or bound - start < 8:
                        raise _Fallback
                    items.append(_Dataset([], True))
                    pos = start + 8
                    continue
                elements, pos = self.dataset(
                    start, bound, depth, top=False, undefined_item=True, collect=collect
                )
                items.append(_Dataset(elements, True))
                continue
            if length > bound - start:
                raise _Fallback
            stop = start + length
            if implicit and length:
                raise _Fallback
            elements, after = self.dataset(
                start, stop, depth, top=False, undefined_item=False, collect=collect
            )
            if after != stop:
                raise _Fallback
            items.append(_Dataset(elements, False))
            pos = stop


def _check_converted(data: bytes, tag: int, vr: str, value: int, stop: int) -> None:
    """Elements pydicom converts on its own (when reading, when it converts a sequence
    next to them, when writing an item) must be in the form it writes back as read."""
    if not tag & 0xFFFF:
        if vr != "UL" or stop - value != 4:
            raise _Fallback  # group lengths
    elif tag == SPECIFIC_CHARACTER_SET:
        raw = data[value:stop]
        # raw and converted readings agree: ASCII, no leading padding
        if vr != "CS" or not raw.isascii() or raw[:1] in (b" ", b"\x00"):
            raise _Fallback
    elif tag == _PIXEL_REPRESENTATION and (vr != "US" or stop - value != 2):
        raise _Fallback


def _converted_creator(data: bytes, ds: _Dataset, e: _Element) -> bytes:
    """A private creator pydicom converts (and writes back converted): only plain LO
    ASCII, which every character set decodes and encodes alike, is read here."""
    value = data[e[3] : e[4]]
    if e[1] != "LO" or not _ASCII_CREATOR.issuperset(value):
        raise _Fallback
    if ds.creators is None:
        ds.creators = set()
    ds.creators.add(e[0])
    return value


def _any_of(tags: set[int], test: Callable[[int], bool], known_false: set[int]) -> bool:
    """any(test(t) for t in tags), remembering the tags it is false for."""
    for tag in tags - known_false:
        if test(tag):
            return True
        if len(known_false) > _CACHE_LIMIT:
            known_false.clear()  # bounded: hostile input may carry any tags
        known_false.add(tag)
    return False


def _letters(data: bytes, pos: int) -> bool:
    """pydicom's test for an explicit VR (filereader._is_implicit_vr)."""
    return 0x40 < data[pos] < 0x5B and 0x40 < data[pos + 1] < 0x5B


def _guessed_explicit_le(data: bytes, pos: int, end: int) -> bool:
    """instance._guess_encoding (pydicom's guess without a transfer syntax) says
    explicit VR little endian."""
    if end - pos < 6:
        return False
    vr = data[pos + 4 : pos + 6].decode("latin-1")
    return vr in _CONVERTER_VRS and _U16.unpack_from(data, pos)[0] < 1024


def _value_of(data: bytes, elements: list[_Element], tag: int) -> _Element | None:
    for e in elements:
        if e[0] == tag:
            return e
    return None


def _has_value(data: bytes, e: _Element) -> bool:
    """detect.has_value of a raw element (a sequence: it has items)."""
    items = e[5]
    if items is not None:
        return bool(items)
    return bool(data[e[3] : e[4]].strip(b" \x00"))


def _decoded(data: bytes, e: _Element, encodings: list[str]) -> list[str]:
    """detect.decoded_text of a raw element."""
    if e[5] is not None:
        raise _Fallback  # a sequence where text is expected
    raw = data[e[3] : e[4]]
    if not raw:
        return []
    delimiters = _PN_DELIMITERS if e[1] == "PN" else _TEXT_DELIMITERS
    return [decode_bytes(raw, encodings, set(delimiters))]


def _burned_in_finding(rule: str) -> Finding:
    return Finding(rule, "BurnedInAnnotation", tag_text(BURNED_IN_ANNOTATION), "BurnedInAnnotation")


def _code_string_bytes(data: bytes, e: _Element) -> bytes:
    """A converted CS element as pydicom writes it: the value without trailing spaces
    and NULs (valuerep multi_string), padded with a space to even length."""
    value = data[e[3] : e[4]].rstrip(b" \x00")
    if len(value) % 2:
        value += b" "
    return _raw_bytes(e[0], "CS", value)


def _raw_bytes(tag: int, vr: str, value: bytes) -> bytes:
    """A raw element: instance._raw_element_bytes (top level) / pydicom's
    write_data_element (in items); values too long for a short VR go to the general
    path (an error there at the top level, a change to UN in items)."""
    head = _TAG.pack(tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + _U32.pack(len(value)) + value
    if len(value) > 0xFFFF:
        raise _Fallback
    return head + _U16.pack(len(value)) + value


def _drop_unused_creators(ds: _Dataset, decisions: dict[int, _Decision]) -> None:
    """deidentify._drop_unused_creators on the elements that are left."""
    used = set()
    creators = []
    for e in ds.elements:
        tag = e[0]
        if not (tag >> 16) & 1 or decisions.get(tag) is _DELETE:
            continue
        if is_private_creator(tag):
            creators.append(tag)
            continue
        owner = private_creator_tag(tag)
        if owner is not None:
            used.add(owner)
    for tag in creators:
        if tag not in used:
            decisions[tag] = _DELETE
