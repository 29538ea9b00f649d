"""De-identify a pydicom Dataset in place: PS3.15 Basic Application Level
Confidentiality Profile plus the enabled options (actions from casb.dlp.rules).

* X remove; Z empty value; D dummy value by VR (PN/strings "ANONYMOUS", DA 19000101,
  TM 000000, DT 19000101000000, AS 000Y, numbers 0, binary zeros, SQ an empty sequence);
  K keep (sequences are walked: their items get the same treatment).
* U: a UID becomes "2.25." + the first 128 bits of HMAC-SHA256(uid_key, UID) as an
  integer, so the same input UID maps to the same output UID across requests and
  replicas that share the key (including MediaStorageSOPInstanceUID in the file meta
  and UIDs inside sequences); a U sequence keeps its items, with their UIDs replaced.
* C clean: dates (DA/DT) shift back by a per-patient number of whole days (0..3650,
  from HMAC(uid_key, PatientID)) with the Retain Longitudinal Temporal Information
  Modified Dates Option -- times stay, a whole-day shift does not change them; text
  (descriptors, and the other text rows an option marks C) gets every free-text detector
  hit replaced by "[REMOVED]". What cannot really be cleaned -- structured content,
  graphics, overlays, curves, dates that are not plain dates -- falls back to the basic
  action of its row (privacy first).
* Private elements are removed, unless the Retain Safe Private Option is on and the
  element is on the safe list; private creators left without elements go too.
* Marks the result: Patient Identity Removed YES, De-identification Method, its code
  sequence (113100 plus one code per option, CID 7050) and Longitudinal Temporal
  Information Modified (UNMODIFIED / MODIFIED / REMOVED).

Pixel Data is never touched. Replacement values are written as pydicom
RawDataElements holding the encoded bytes (all ASCII: empty values, dummies, UIDs,
shifted dates), which pydicom's writer copies as they are -- creating a validated
DataElement per value costs more than the rest of the work; cleaned text, which may
need the dataset's character set, goes through pydicom's DataElement.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final

from pydicom.config import IGNORE
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import MAX_VALUE_LEN

from casb.dlp.detect import (
    PIXEL_DATA,
    Detector,
    TextScanner,
    dataset_encodings,
    decoded_text,
    element_vr,
    is_private_creator,
    private_creator_tag,
    text_values,
)
from casb.dlp.findings import InstanceError
from casb.dlp.instance import MAX_DEPTH, layout_of
from casb.dlp.profile import BASIC_PROFILE_CODE, DEID_OPTIONS
from casb.dlp.rules import Action, ActionTable, RuleTable

DEIDENTIFICATION_METHOD: Final = "casb: PS3.15 basic profile"
MAX_SHIFT_DAYS: Final = 3650

_PATIENT_ID: Final = 0x00100020
_PATIENT_IDENTITY_REMOVED: Final = 0x00120062
_DEIDENTIFICATION_METHOD: Final = 0x00120063
_DEIDENTIFICATION_METHOD_CODES: Final = 0x00120064
_LONGITUDINAL_MODIFIED: Final = 0x00280303
_META_GROUP: Final = 0x0002

_STRING_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
CLEANABLE_TEXT_VRS: Final = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "AE"})
_NUMBER_SIZES: Final = {
    "US": 2,
    "SS": 2,
    "UL": 4,
    "SL": 4,
    "FL": 4,
    "FD": 8,
    "SV": 8,
    "UV": 8,
    "AT": 4,
    "OB": 2,
    "OW": 2,
    "UN": 2,
    "OF": 4,
    "OL": 4,
    "OD": 8,
    "OV": 8,
}
_DUMMY_TEXT: Final = {
    "PN": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
}
_WORTH_CACHE: Final = 20_000


def hashed_uid(key: bytes, uid: str) -> str:
    """The replacement of a UID: "2.25." + int(HMAC-SHA256(key, uid)[:16])."""
    digest = hmac.new(key, uid.encode("ascii", "replace"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def date_shift_days(key: bytes, patient_id: str) -> int:
    """Whole days (0..3650) every date of this patient moves back; the same for every
    instance of the patient (PatientID), different per patient and per key."""
    message = b"casb-date-shift\x00" + patient_id.encode("utf-8", "replace")
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SHIFT_DAYS + 1)


def shift_date(value: str, days: int) -> str | None:
    """YYYYMMDD minus days; None when the value is not a plain full date."""
    text = value.strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        shifted = date(int(text[:4]), int(text[4:6]), int(text[6:])) - timedelta(days=days)
    except ValueError:
        return None
    return f"{shifted.year:04d}{shifted.month:02d}{shifted.day:02d}" if shifted.year > 0 else None


def shift_datetime(value: str, days: int) -> str | None:
    """A DT value with its date part shifted (time and offset kept)."""
    text = value.strip()
    shifted = shift_date(text[:8], days)
    return None if shifted is None else shifted + text[8:]


def _pad(text: str, vr: str) -> bytes:
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


@dataclass(slots=True)
class _Context:
    scanner: TextScanner
    shift_days: int
    encoding: tuple[bool, bool]  # (implicit VR, little endian) for new raw elements


class Deidentifier:
    """The basic profile plus options, resolved once (per profile)."""

    def __init__(
        self,
        options: Sequence[str],
        table: RuleTable,
        detector: Detector,
        *,
        uid_key: bytes,
    ) -> None:
        if not uid_key:
            raise ValueError("de-identification needs a non-empty UID key")
        names = [name for name in DEID_OPTIONS if name in set(options)]
        self.options = tuple(names)
        self.actions = ActionTable(table, names)
        self.detector = detector
        self._key = uid_key
        keys = self.actions.option_keys
        self._full_dates = "rtnLongFullDatesOpt" in keys
        # read by casb.dlp.explicit_le too (it applies the same actions on raw bytes)
        self.modified_dates = "rtnLongModifDatesOpt" in keys and not self._full_dates
        self.date_rows = frozenset(
            tag for tag, row in table.rows.items() if "rtnLongModifDatesOpt" in row.options
        )
        self._worth: dict[int, bool] = {}
        self._marks: dict[tuple[bool, bool], tuple[RawDataElement, ...]] = {}

    # public -----------------------------------------------------------------------

    def apply(self, ds: Dataset, scanner: TextScanner) -> None:
        """De-identify ``ds`` (and its file meta) in place."""
        encodings = dataset_encodings(ds, ["iso8859"])
        patient_id = ""
        if _PATIENT_ID in ds:
            patient_id = " ".join(decoded_text(ds.get_item(_PATIENT_ID), encodings))
        layout = layout_of(ds)
        encoding = layout.encoding if layout is not None else (False, True)
        ctx = _Context(
            scanner=scanner,
            shift_days=self.shift_days(patient_id),
            encoding=encoding,
        )
        nested = layout.nested if layout is not None else None
        meta = getattr(ds, "file_meta", None)
        if meta is not None and len(meta):
            self._clean(meta, ctx, 0, ["iso8859"], None)
        self._clean(ds, ctx, 0, encodings, nested)
        self._mark(ds, ctx)

    def uid(self, value: str) -> str:
        return hashed_uid(self._key, value)

    def shift_days(self, patient_id: str) -> int:
        """Days this patient's dates move back (Modified Dates Option)."""
        return date_shift_days(self._key, patient_id.strip())

    def changes(self, tag: int) -> bool:
        """Whether the walk may change this tag (sequences with none are not walked)."""
        found = self._worth.get(tag)
        if found is None:
            if len(self._worth) > _WORTH_CACHE:
                self._worth.clear()
            found = tag < 0 or bool((tag >> 16) & 1) or self.actions.action(tag) != "K"
            if not found:
                found = tag & 0xFFFF == 0  # group lengths are dropped
            self._worth[tag] = found
        return found

    def marks(self, encoding: tuple[bool, bool]) -> tuple[RawDataElement, ...]:
        """The marking elements (Patient Identity Removed...), as raw elements."""
        marks = self._marks.get(encoding)
        if marks is None:
            marks = self._marks[encoding] = self._encoded_marks(encoding)
        return marks

    # walking ----------------------------------------------------------------------

    def _clean(
        self,
        ds: Dataset,
        ctx: _Context,
        depth: int,
        encodings: list[str],
        nested: dict[int, frozenset[int]] | None,
    ) -> None:
        if depth > MAX_DEPTH:
            raise InstanceError(f"sequences nested deeper than {MAX_DEPTH} levels")
        encodings = dataset_encodings(ds, encodings)
        removed_private = False
        for elem in list(ds.values()):
            tag = int(elem.tag)
            if tag == PIXEL_DATA:
                continue
            group = tag >> 16
            if tag & 0xFFFF == 0:
                if group != _META_GROUP:
                    del ds[tag]  # group lengths (retired outside the file meta)
                continue
            if group & 1:
                if is_private_creator(tag):
                    continue
                if self.actions.private == "C" and self.detector.is_safe_private(ds, tag):
                    if elem.VR == "SQ":
                        self._items(ds, tag, ctx, depth, encodings)
                    continue
                del ds[tag]
                removed_private = True
                continue
            action = self.actions.action(tag)
            vr = element_vr(elem)
            if action == "K":
                if vr == "SQ" and self._worth_walking(tag, depth, nested):
                    self._items(ds, tag, ctx, depth, encodings)
                continue
            self._act(ds, elem, tag, vr, action, ctx, depth, encodings)
        if removed_private:
            _drop_unused_creators(ds)

    def _items(
        self, ds: Dataset, tag: int, ctx: _Context, depth: int, encodings: list[str]
    ) -> None:
        converted = ds[tag]
        if converted.VR != "SQ":
            return
        for item in converted.value:
            self._clean(item, ctx, depth + 1, encodings, None)

    def _worth_walking(
        self, tag: int, depth: int, nested: dict[int, frozenset[int]] | None
    ) -> bool:
        """False for a top-level sequence whose nested tags all keep (no private ones)."""
        if depth or nested is None or tag not in nested:
            return True
        return any(self.changes(t) for t in nested[tag])

    def _act(
        self,
        ds: Dataset,
        elem: Any,
        tag: int,
        vr: str,
        action: Action,
        ctx: _Context,
        depth: int,
        encodings: list[str],
    ) -> None:
        if action == "C":
            if self._clean_value(ds, elem, tag, vr, ctx, encodings):
                return
            action = self.actions.basic(tag)  # cannot really clean: the basic action
            if action == "K":
                return
        if action == "X":
            del ds[tag]
        elif action == "Z":
            ds[tag] = self._raw(tag, vr, b"", ctx)
        elif action == "U":
            if vr == "SQ":
                self._items(ds, tag, ctx, depth, encodings)
            elif vr == "UI":
                self._replace_uids(ds, elem, tag, ctx)
            else:
                ds[tag] = self._dummy(tag, vr, ctx)
        elif action == "D":
            if vr == "UI":
                self._replace_uids(ds, elem, tag, ctx)
            else:
                ds[tag] = self._dummy(tag, vr, ctx)

    def _clean_value(
        self, ds: Dataset, elem: Any, tag: int, vr: str, ctx: _Context, encodings: list[str]
    ) -> bool:
        """Clean in place; False when this element cannot be cleaned."""
        if tag in self.date_rows and self.modified_dates:
            if vr == "TM":
                return True  # a whole-day shift leaves times as they are
            if vr in ("DA", "DT"):
                return self._shift(ds, elem, tag, vr, ctx)
            return False
        if vr not in CLEANABLE_TEXT_VRS:
            return False
        new = cleaned_element(tag, vr, decoded_text(elem, encodings), ctx.scanner)
        if new is not None:
            ds[tag] = new
        return True

    def _shift(self, ds: Dataset, elem: Any, tag: int, vr: str, ctx: _Context) -> bool:
        values = ascii_values(elem.value)
        if not values:
            return True  # nothing to shift
        shifted = shifted_value(values, vr, ctx.shift_days)
        if shifted is None:
            return False
        ds[tag] = self._raw(tag, vr, shifted, ctx)
        return True

    def _replace_uids(self, ds: Dataset, elem: Any, tag: int, ctx: _Context) -> None:
        values = ascii_values(elem.value)
        if values:
            ds[tag] = self._raw(tag, "UI", self.uid_value(values), ctx)

    def uid_value(self, values: list[str]) -> bytes:
        """The encoded replacement of a UI element's values."""
        return _pad("\\".join(self.uid(v) for v in values), "UI")

    def _dummy(self, tag: int, vr: str, ctx: _Context) -> RawDataElement:
        return self._raw(tag, vr, dummy_value(vr), ctx)

    @staticmethod
    def _raw(tag: int, vr: str, value: bytes, ctx: _Context) -> RawDataElement:
        return new_raw_element(tag, vr, value, ctx.encoding)

    # marking ----------------------------------------------------------------------

    def _mark(self, ds: Dataset, ctx: _Context) -> None:
        for mark in self.marks(ctx.encoding):
            ds[mark.tag] = mark

    def _encoded_marks(self, encoding: tuple[bool, bool]) -> tuple[RawDataElement, ...]:
        """The marking elements, encoded once per (implicit VR, little endian)."""
        method = DEIDENTIFICATION_METHOD + (" + options" if self.options else "")
        if self._full_dates:
            state = "UNMODIFIED"
        elif self.modified_dates:
            state = "MODIFIED"
        else:
            state = "REMOVED"
        codes = [BASIC_PROFILE_CODE] + [DEID_OPTIONS[n][1:] for n in self.options]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = encoding
        write_sequence(fp, DataElement(_DEIDENTIFICATION_METHOD_CODES, "SQ", items), ["iso8859"])
        codes_value = bytes(fp.getvalue())
        return (
            new_raw_element(_PATIENT_IDENTITY_REMOVED, "CS", _pad("YES", "CS"), encoding),
            new_raw_element(_DEIDENTIFICATION_METHOD, "LO", _pad(method, "LO"), encoding),
            new_raw_element(_DEIDENTIFICATION_METHOD_CODES, "SQ", codes_value, encoding),
            new_raw_element(_LONGITUDINAL_MODIFIED, "CS", _pad(state, "CS"), encoding),
        )


# -- the actions on values, shared with casb.dlp.explicit_le --------------------------


def new_raw_element(tag: int, vr: str, value: bytes, encoding: tuple[bool, bool]) -> RawDataElement:
    """A new element holding already encoded bytes (written by pydicom as they are).
    An ambiguous dictionary VR ("US or SS") takes its first choice; unknown: UN."""
    write_vr = vr.split(" ", 1)[0] if vr else "UN"
    return RawDataElement(BaseTag(tag), write_vr, len(value), value, 0, *encoding)


def dummy_value(vr: str) -> bytes:
    """The encoded dummy value (action D) of a VR."""
    if vr == "SQ":
        return b""
    if vr in _DUMMY_TEXT:
        return _pad(_DUMMY_TEXT[vr], vr)
    if vr in _STRING_VRS:
        return _pad("ANONYMOUS", vr)
    return b"\x00" * _NUMBER_SIZES.get(vr, 2)


def shifted_value(values: list[str], vr: str, days: int) -> bytes | None:
    """DA/DT values moved back by whole days, encoded; None when one is not a date."""
    shift = shift_date if vr == "DA" else shift_datetime
    shifted = [shift(v, days) for v in values]
    if any(s is None for s in shifted):
        return None
    return _pad("\\".join(s or "" for s in shifted), vr)


def cleaned_element(
    tag: int, vr: str, texts: list[str], scanner: TextScanner
) -> DataElement | None:
    """The element with every detector hit in its text replaced by "[REMOVED]"; None
    when nothing needs cleaning."""
    cleaned = [scanner.clean(t) for t in texts]
    if cleaned == texts:
        return None
    limit = MAX_VALUE_LEN.get(vr)
    values = [v[:limit] if limit else v for c in cleaned for v in _split(c, vr)]
    return DataElement(tag, vr, values if len(values) != 1 else values[0], validation_mode=IGNORE)


def _split(text: str, vr: str) -> list[str]:
    return text.split("\\") if vr in ("SH", "LO", "AE", "UC") else [text]


def ascii_values(value: Any) -> list[str]:
    """The values of a UI/DA/DT element (raw or converted) as stripped strings."""
    if value is None:
        return []
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("ascii", "replace").strip(" \x00")
        return [v.strip(" \x00") for v in text.split("\\")] if text else []
    return [v.strip(" \x00") for v in text_values(value) if v.strip(" \x00")]


def _drop_unused_creators(ds: Dataset) -> None:
    """Remove private creator elements whose block has no element left."""
    used = set()
    creators = []
    for base in ds.keys():  # noqa: SIM118 -- iterating a Dataset converts every element
        tag = int(base)
        if not (tag >> 16) & 1:
            continue
        if is_private_creator(tag):
            creators.append(tag)
            continue
        owner = private_creator_tag(tag)
        if owner is not None:
            used.add(owner)
    for tag in creators:
        if tag not in used:
            del ds[tag]
