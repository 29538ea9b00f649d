"""Find what in a DICOM header may identify the patient: findings, never values.

``Detector.findings(ds)`` walks every element, into sequences (bounded depth), and
reports :class:`~casb.dlp.findings.Finding` s with the rule ids of ``RULE_IDS``:

* ``annex_e``: an attribute the basic profile removes or empties (X/Z, the composites
  that resolve to them, the curve/overlay groups) holds a value;
* ``private_tag``: a private element not on the safe-private list;
* ``free_text.*``: identifiers inside free text -- descriptors (rows carrying the Clean
  Descriptors Option), every LT/ST/UT/UC, and private text -- SSN, phone numbers, e-mail
  addresses, dates of birth, MRN patterns, and the instance's own patient name and ID;
* ``burned_in_annotation.*``, ``identity_removed_contradicted`` (top level).

Speed: elements are read as pydicom ``RawDataElement`` s (``ds.values()``, which does
not convert) and only what must be looked at is decoded: text to scan (with pydicom's
decoder for the dataset's Specific Character Set, without converting the element),
sequences to walk (pydicom parses their items), the few values the top-level checks
need. A top-level sequence whose nested tags (known from instance.read_header's
structure check) hold nothing any detector looks at is not parsed at all.

Known limits: names are matched as whole words, so a name inside unbroken CJK text is
not found; free text is looked for in descriptors, LT/ST/UT/UC and private text only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from collections.abc import Sequence as AbcSequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS, PersonName
from pydicom.values import convert_SQ

from casb.dlp.findings import Finding, InstanceError
from casb.dlp.instance import MAX_DEPTH, layout_of
from casb.dlp.profile import DlpSettings
from casb.dlp.rules import RuleTable

TEXT_VRS: Final = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "AE"})
ALWAYS_SCANNED_VRS: Final = frozenset({"ST", "LT", "UT", "UC"})
REDACTED: Final = "[REMOVED]"
IDENTITY_RULES: Final = ("free_text.patient_name", "free_text.patient_id")

SPECIFIC_CHARACTER_SET: Final = 0x00080005
PATIENT_NAME: Final = 0x00100010
PATIENT_ID: Final = 0x00100020
MODALITY: Final = 0x00080060
BURNED_IN_ANNOTATION: Final = 0x00280301
PATIENT_IDENTITY_REMOVED: Final = 0x00120062
PIXEL_DATA: Final = 0x7FE00010

_ITEM_TAG_LE: Final = b"\xfe\xff\x00\xe0"
_ITEM_TAG_BE: Final = b"\xff\xfe\xe0\x00"
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# -- tags, VRs, names -------------------------------------------------------------------


@lru_cache(maxsize=8192)
def dictionary_vr(tag: int) -> str:
    """The dictionary VR of a public tag ("" when unknown)."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


@lru_cache(maxsize=8192)
def keyword(tag: int) -> str:
    return "" if (tag >> 16) & 1 else str(keyword_for_tag(tag) or "")


@lru_cache(maxsize=8192)
def tag_text(tag: int) -> str:
    """ "(0010,0010)"; private data elements as "(0019,xx10)" (the block is not fixed)."""
    group, elem = tag >> 16, tag & 0xFFFF
    if group & 1 and elem >= 0x1000:
        return f"({group:04X},xx{elem & 0xFF:02X})"
    return f"({group:04X},{elem:04X})"


def element_vr(elem: Any) -> str:
    """The VR of a raw or converted element; implicit VR and UN fall back to the
    dictionary (as pydicom does when it converts)."""
    vr = elem.VR
    if vr and vr != "UN":
        return str(vr)
    if (elem.tag >> 16) & 1:
        return str(vr or "")
    return dictionary_vr(int(elem.tag)) or str(vr or "")


def has_value(elem: Any) -> bool:
    """Whether an element (raw or converted) holds anything but padding."""
    if elem.VR == "SQ" and not elem.is_raw:
        return len(elem.value) > 0  # a sequence with items, even empty ones
    return _has(elem.value)


def _has(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes | bytearray):
        return bool(bytes(value).strip(b" \x00"))
    if isinstance(value, str):
        return bool(value.strip(" \x00"))
    if isinstance(value, AbcSequence):
        return any(_has(v) for v in value)
    return bool(str(value).strip(" \x00^="))  # numbers, PersonName ("^^" is empty)


def text_values(value: Any) -> list[str]:
    """A text element's value(s) as strings (multi-valued LO/SH give several)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes | bytearray):
        return [bytes(value).decode("latin-1")]
    try:
        return [str(v) for v in value if v is not None]
    except TypeError:
        return [str(value)]


def dataset_encodings(ds: Dataset, inherited: list[str]) -> list[str]:
    """The Python codecs for a dataset's text: its own Specific Character Set, else the
    one it inherits (sequence items use their parent's)."""
    elem = ds.get_item(SPECIFIC_CHARACTER_SET) if SPECIFIC_CHARACTER_SET in ds else None
    if elem is None:
        return inherited
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").strip(" \x00").split("\\")
    if not value:
        return [default_encoding]
    return list(convert_encodings(value))


def decoded_text(elem: Any, encodings: list[str]) -> list[str]:
    """A text element's value decoded with pydicom's decoder for the character set
    (without converting the element in the dataset)."""
    if not elem.is_raw:
        return text_values(elem.value)
    raw = elem.value
    if not isinstance(raw, bytes) or not raw:
        return []
    delimiters = PN_DELIMS if elem.VR == "PN" else TEXT_VR_DELIMS
    return [decode_bytes(raw, encodings, set(delimiters))]


def printable_text(raw: bytes) -> str | None:
    """Bytes of unknown VR that look like text (no control bytes), decoded; else None."""
    data = raw.rstrip(b"\x00 ")
    if not data or _CONTROL_BYTES.search(data):
        return None
    return data.decode("latin-1")


def private_creator_tag(tag: int) -> int | None:
    """(gggg,bbee) -> (gggg,00bb) for private data elements; None otherwise."""
    elem = tag & 0xFFFF
    if elem < 0x1000:
        return None
    return (tag & 0xFFFF0000) | (elem >> 8)


def is_private_creator(tag: int) -> bool:
    return bool((tag >> 16) & 1) and 0x0010 <= (tag & 0xFFFF) <= 0x00FF


# -- free text -----------------------------------------------------------------------

_DATE = (
    r"(?:\d{1,2}[/.\-]\d{1,2}[/.\-]\d{2,4}"
    r"|\d{4}[/.\-]\d{1,2}[/.\-]\d{1,2}"
    r"|\d{8}"
    r"|\d{1,2}\s{1,3}[A-Za-z]{3,9}\.?,?\s{1,3}\d{4}"
    r"|[A-Za-z]{3,9}\.?\s{1,3}\d{1,2},?\s{1,3}\d{4})"
)
# Every pattern is anchored with a look-behind at the start of a token and uses bounded
# quantifiers where a run can repeat, so matching stays linear in the text length.
_FIXED_PATTERNS: Final[tuple[tuple[str, str, int], ...]] = (
    ("free_text.ssn", r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])", 0),
    (
        "free_text.phone",
        r"(?<![\w+])(?:\+?1[\s.\-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.\-])\d{3}[\s.\-]\d{4}(?!\w)",
        0,
    ),
    ("free_text.phone", r"(?<![\w+])\+\d{1,3}(?:[\s.\-]?\(?\d{1,4}\)?){2,5}(?!\w)", 8),
    (
        "free_text.email",
        r"(?<![\w.%+\-])[\w.%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63}){0,8}"
        r"\.[A-Za-z]{2,24}(?![\w\-])",
        0,
    ),
    (
        "free_text.date_of_birth",
        r"(?i)(?<![\w.])(?:d\.?\s?o\.?\s?b\.?|born(?:\s{1,3}on)?|date\s{1,3}of\s{1,3}birth)"
        r"\s{0,3}[:#\-]?\s{0,3}" + _DATE,
        0,
    ),
)


@dataclass(frozen=True, slots=True)
class Matcher:
    """One detector: a rule id, its pattern, and a minimum digit count (phone numbers)."""

    rule: str
    pattern: re.Pattern[str]
    min_digits: int = 0

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        for match in self.pattern.finditer(text):
            if self.min_digits and sum(c.isdigit() for c in match.group()) < self.min_digits:
                continue
            yield match.span()

    def found(self, text: str) -> bool:
        """Whether the pattern matches somewhere (the first of ``spans``, cheaper)."""
        if not self.min_digits:
            return self.pattern.search(text) is not None
        return next(self.spans(text), None) is not None


class TextScanner:
    """The free-text detectors of one instance (fixed ones + its own name and ID)."""

    def __init__(self, matchers: tuple[Matcher, ...]) -> None:
        self.matchers = matchers
        # texts of this instance no detector matched (``clean`` leaves them as they are)
        self._nothing_found: set[str] = set()

    def rules(self, text: str) -> list[str]:
        """The rule ids that match somewhere in the text (each once, detector order)."""
        found: list[str] = []
        for m in self.matchers:
            if m.rule not in found and m.found(text):
                found.append(m.rule)
        if not found:
            self._nothing_found.add(text)
        return found

    def clean(self, text: str) -> str:
        """The text with every detector hit replaced by "[REMOVED]"."""
        if text in self._nothing_found:
            return text
        for m in self.matchers:
            if not m.found(text):
                continue
            spans = list(m.spans(text))
            for start, end in reversed(spans):
                text = text[:start] + REDACTED + text[end:]
        return text


def _identity_matchers(name_parts: list[str], patient_id: str) -> list[Matcher]:
    out: list[Matcher] = []
    parts = sorted({p for p in name_parts if len(p) >= 3}, key=len, reverse=True)
    if parts:
        body = "|".join(re.escape(p) for p in parts)
        out.append(Matcher("free_text.patient_name", re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.I)))
    if len(patient_id) >= 3:
        out.append(
            Matcher(
                "free_text.patient_id",
                re.compile(rf"(?<!\w){re.escape(patient_id)}(?!\w)", re.I),
            )
        )
    return out


def person_name_parts(value: Any) -> list[str]:
    """Name components (family, given, ...) of every component group of a PN value."""
    values = (
        list(value) if isinstance(value, AbcSequence) and not isinstance(value, str) else [value]
    )
    parts: list[str] = []
    for single in values:
        groups = getattr(single, "components", None)
        texts = [str(g) for g in groups] if groups else str(single).split("=")
        for group in texts:
            parts.extend(p.strip() for p in group.split("^"))
    return [p for p in parts if p]


# -- the detector -------------------------------------------------------------------


_TAG_INFO_CACHE: Final = 20_000


@dataclass(frozen=True, slots=True)
class TagInfo:
    """What the walk needs to know about a tag, computed once per tag."""

    skip: bool
    private: bool
    removed: bool  # the basic profile removes or empties it (X/Z)
    descriptor: bool
    dictionary_vr: str
    keyword: str
    text: str  # "(0010,0010)"

    @property
    def name(self) -> str:
        """How a path names it: the keyword, else the tag."""
        return self.keyword or self.text


@dataclass(frozen=True, slots=True)
class _Converted:
    """A converted (not raw) element value, for ``Detector.scanner_from``."""

    value: Any


@dataclass(slots=True)
class _Walk:
    scanner: TextScanner
    out: list[Finding]
    # from instance.read_header: the tags nested in each top-level sequence, so that
    # sequences with nothing a detector looks at are not converted (the costly part)
    nested: dict[int, frozenset[int]] | None = None


class Detector:
    """Runs every detector over a dataset. Built once per profile (compiled patterns)."""

    def __init__(self, settings: DlpSettings, table: RuleTable) -> None:
        self.table = table
        self._fixed = tuple(
            Matcher(rule, re.compile(pattern), digits) for rule, pattern, digits in _FIXED_PATTERNS
        ) + tuple(Matcher("free_text.mrn", re.compile(p)) for p in settings.mrn_patterns)
        self._removed = frozenset(
            tag for tag, row in table.rows.items() if row.action in ("X", "Z")
        )
        self._removed_patterns = tuple(
            (p.mask, p.value) for p in table.patterns if p.row.action in ("X", "Z")
        )
        # the top bytes of the pattern rows ((50XX,XXXX) -> 0x50), when all fix them
        self._pattern_prefixes: frozenset[int] | None = (
            frozenset(value >> 24 for _, value in self._removed_patterns)
            if all(mask >> 24 == 0xFF for mask, _ in self._removed_patterns)
            else None
        )
        self._descriptors = frozenset(tag for tag, row in table.rows.items() if row.descriptor)
        # Attributes the basic profile removes or empties and no profile option keeps:
        # one of them with a value contradicts Patient Identity Removed = YES. (Others,
        # such as descriptors or dates, may be kept by an option the instance declares.)
        self._never_retained = frozenset(
            tag_text(tag)
            for tag, row in table.rows.items()
            if row.action in ("X", "Z") and not row.options
        )
        self._interesting_cache: dict[int, bool] = {}
        self.tag_infos: dict[int, TagInfo] = {}  # read by casb.dlp.explicit_le too
        self.safe_private = frozenset(
            (s.creator.strip(), int(s.tag[:4], 16), int(s.tag[-2:], 16))
            for s in settings.safe_private
        )
        self.burned_in_modalities = frozenset(
            m.strip().upper() for m in settings.burned_in_modalities
        )

    # public -----------------------------------------------------------------------

    def scanner_for(self, ds: Dataset) -> TextScanner:
        """The free-text detectors for this instance (its own patient name and ID)."""
        name: Any = None
        patient_id = ""
        encodings = dataset_encodings(ds, [default_encoding])
        if PATIENT_NAME in ds:
            elem = ds.get_item(PATIENT_NAME)
            name = elem.value
            if not (elem.is_raw and isinstance(name, bytes)):
                name = _Converted(name)
        if PATIENT_ID in ds:
            patient_id = " ".join(decoded_text(ds.get_item(PATIENT_ID), encodings)).strip()
        return self.scanner_from(name, patient_id, encodings)

    def scanner_from(self, name: Any, patient_id: str, encodings: list[str]) -> TextScanner:
        """The free-text detectors for a patient name (the raw bytes of the element, or
        its converted value wrapped in ``_Converted``, or None) and a decoded ID."""
        name_parts: list[str] = []
        if isinstance(name, bytes):  # decode only this value
            name_parts = person_name_parts([PersonName(v, encodings) for v in name.split(b"\\")])
        elif isinstance(name, _Converted):
            name_parts = person_name_parts(name.value)
        return TextScanner(self._fixed + tuple(_identity_matchers(name_parts, patient_id)))

    def findings(self, ds: Dataset, scanner: TextScanner | None = None) -> list[Finding]:
        layout = layout_of(ds)
        nested = layout.nested if layout is not None else None
        walk = _Walk(scanner or self.scanner_for(ds), [], nested)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and len(meta):
            self._walk(meta, "", 0, [default_encoding], walk)
        self._walk(ds, "", 0, [default_encoding], walk)
        self._top_level(ds, walk.out)
        return walk.out

    def is_removed_by_basic(self, tag: int) -> bool:
        """The basic profile removes or empties this public tag (X or Z)."""
        if tag in self._removed:
            return True
        if self._pattern_prefixes is not None and (tag >> 24) not in self._pattern_prefixes:
            return False  # a quick no for the tags outside the curve/overlay groups
        return any(tag & mask == value for mask, value in self._removed_patterns)

    def contradicts_identity_removed(self, findings: list[Finding]) -> bool:
        """Free-text PHI, or an attribute no de-identification option may keep."""
        return any(
            f.rule.startswith("free_text.")
            or (f.rule == "annex_e" and f.tag in self._never_retained)
            for f in findings
        )

    def is_descriptor(self, tag: int) -> bool:
        return tag in self._descriptors

    def is_safe_private(self, ds: Dataset, tag: int) -> bool:
        creator_tag = private_creator_tag(tag)
        if creator_tag is None or not self.safe_private or creator_tag not in ds:
            return False
        creator = " ".join(text_values(ds[creator_tag].value)).strip()
        return (creator, tag >> 16, tag & 0xFF) in self.safe_private

    def text_to_scan(self, elem: Any, encodings: list[str]) -> list[str] | None:
        """The decoded text of an element the free-text detectors look at, else None."""
        tag = int(elem.tag)
        if (tag >> 16) & 1:
            vr = elem.VR
            if vr in TEXT_VRS or vr == "PN":
                return decoded_text(elem, encodings)
            if (not vr or vr == "UN") and elem.is_raw and isinstance(elem.value, bytes):
                found = printable_text(elem.value)
                return [found] if found is not None else None
            return None
        vr = element_vr(elem)
        if vr in ALWAYS_SCANNED_VRS or (vr in TEXT_VRS and tag in self._descriptors):
            return decoded_text(elem, encodings)
        return None

    # walking ----------------------------------------------------------------------

    def _walk(
        self, ds: Dataset, prefix: str, depth: int, encodings: list[str], walk: _Walk
    ) -> None:
        if depth > MAX_DEPTH:
            raise InstanceError(f"sequences nested deeper than {MAX_DEPTH} levels")
        encodings = dataset_encodings(ds, encodings)
        out = walk.out
        infos = self.tag_infos
        for elem in list(ds.values()):
            tag = int(elem.tag)
            info = infos.get(tag)
            if info is None:
                info = self.tag_info(tag)
            if info.skip:
                continue  # group lengths, private creators, pixel data
            if info.private:
                path = prefix + info.text
                if not self.is_safe_private(ds, tag):
                    out.append(Finding("private_tag", "", info.text, path))
                self._scan(elem, path, encodings, walk)
                if self._private_is_sequence(elem) and self._worth_walking(tag, depth, walk):
                    self._walk_items(ds, tag, path, depth, encodings, walk)
                continue
            vr = elem.VR
            if not vr or vr == "UN":
                vr = info.dictionary_vr or vr
            if info.removed and has_value(elem):
                out.append(Finding("annex_e", info.keyword, info.text, prefix + info.name))
            if vr == "SQ":
                if self._worth_walking(tag, depth, walk):
                    self._walk_items(ds, tag, prefix + info.name, depth, encodings, walk)
            elif vr in ALWAYS_SCANNED_VRS or (info.descriptor and vr in TEXT_VRS):
                self._scan(elem, prefix + info.name, encodings, walk)

    def tag_info(self, tag: int) -> TagInfo:
        """What the walk needs to know about a tag (cached)."""
        if len(self.tag_infos) > _TAG_INFO_CACHE:
            self.tag_infos.clear()  # bounded: hostile input may carry any tags
        private = bool((tag >> 16) & 1)
        info = TagInfo(
            skip=tag & 0xFFFF == 0 or tag == PIXEL_DATA or is_private_creator(tag),
            private=private,
            removed=not private and self.is_removed_by_basic(tag),
            descriptor=tag in self._descriptors,
            dictionary_vr="" if private else dictionary_vr(tag),
            keyword=keyword(tag),
            text=tag_text(tag),
        )
        self.tag_infos[tag] = info
        return info

    def _worth_walking(self, tag: int, depth: int, walk: _Walk) -> bool:
        """False for a top-level sequence whose nested tags no detector looks at."""
        if depth or walk.nested is None:
            return True
        nested = walk.nested.get(tag)
        if nested is None:
            return True
        return any(self.interesting(t) for t in nested)

    def interesting(self, tag: int) -> bool:
        """Whether any detector looks at this tag inside a sequence."""
        found = self._interesting_cache.get(tag)
        if found is None:
            if len(self._interesting_cache) > _TAG_INFO_CACHE:
                self._interesting_cache.clear()  # bounded, as tag_infos
            found = (
                tag < 0
                or bool((tag >> 16) & 1)
                or self.is_removed_by_basic(tag)
                or tag in self._descriptors
                or dictionary_vr(tag) in ALWAYS_SCANNED_VRS
                or dictionary_vr(tag) in ("", "UN")
            )
            self._interesting_cache[tag] = found
        return found

    @staticmethod
    def _private_is_sequence(elem: Any) -> bool:
        if elem.VR == "SQ":
            return True
        if elem.VR in (None, "UN") and elem.is_raw and isinstance(elem.value, bytes):
            return elem.value[:4] in (_ITEM_TAG_LE, _ITEM_TAG_BE)
        return False

    def _walk_items(
        self,
        ds: Dataset,
        tag: int,
        path: str,
        depth: int,
        encodings: list[str],
        walk: _Walk,
    ) -> None:
        raw = ds.get_item(tag)
        converted = ds[tag]
        if converted.VR == "SQ":
            items = list(converted.value)
        elif raw.is_raw and isinstance(raw.value, bytes) and raw.value[:4] == _ITEM_TAG_LE:
            # A private sequence pydicom's dictionary does not know (implicit VR, or UN):
            # its items are implicit VR little endian (PS3.5 6.2.2); read them anyway.
            items = list(convert_SQ(raw.value, True, True, encodings))
        else:
            return
        for index, item in enumerate(items):
            self._walk(item, f"{path}[{index}].", depth + 1, encodings, walk)

    def _scan(self, elem: Any, path: str, encodings: list[str], walk: _Walk) -> None:
        texts = self.text_to_scan(elem, encodings)
        if not texts:
            return
        tag = int(elem.tag)
        found: list[str] = []
        for text in texts:
            for rule in walk.scanner.rules(text):
                if rule not in found:
                    found.append(rule)
        if tag in (PATIENT_NAME, PATIENT_ID):  # its own name/ID is not "inside other text"
            found = [r for r in found if r not in IDENTITY_RULES]
        for rule in found:
            walk.out.append(Finding(rule, keyword(tag), tag_text(tag), path))

    def _top_level(self, ds: Dataset, out: list[Finding]) -> None:
        burned = _upper(ds, BURNED_IN_ANNOTATION)
        if burned == "YES":
            out.append(
                Finding(
                    "burned_in_annotation.yes",
                    "BurnedInAnnotation",
                    tag_text(BURNED_IN_ANNOTATION),
                    "BurnedInAnnotation",
                )
            )
        elif not burned and _upper(ds, MODALITY) in self.burned_in_modalities:
            out.append(
                Finding(
                    "burned_in_annotation.unknown",
                    "BurnedInAnnotation",
                    tag_text(BURNED_IN_ANNOTATION),
                    "BurnedInAnnotation",
                )
            )
        if _upper(ds, PATIENT_IDENTITY_REMOVED) == "YES" and self.contradicts_identity_removed(out):
            out.append(
                Finding(
                    "identity_removed_contradicted",
                    "PatientIdentityRemoved",
                    tag_text(PATIENT_IDENTITY_REMOVED),
                    "PatientIdentityRemoved",
                )
            )


def _upper(ds: Dataset, tag: int) -> str:
    if tag not in ds:
        return ""
    return " ".join(text_values(ds[tag].value)).strip().upper()
