"""The fast path (casb.dlp.explicit_le) against the pydicom path: identical verdicts.

``Inspector.inspect`` takes the fast path for explicit VR little endian instances and
the pydicom path for everything else (and for whatever the fast path does not handle).
Here both run on the same bytes -- every generator of tests/support/dicom_corpus.py,
pydicom's bundled explicit VR little endian files, and randomized mutations (nested
sequences of defined and undefined length, private blocks, multi-byte character sets,
empty values, odd lengths, padding variants, PHI in free text, corrupted bytes) -- with
inspectors for scanning, blocking and both de-identification profiles, and must give
the same verdict: action, findings (as sets), the rewritten header byte for byte, the
original UIDs and the blocking rules; where the pydicom path refuses an instance the
fast path must not accept it. Each suite also requires that the fast path handled most
of its inputs, so the comparison cannot pass by falling back.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.charset import convert_encodings, encode_string
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from casb.dlp.explicit_le import ExplicitLittleEndian
from casb.dlp.findings import InstanceError, Verdict
from casb.dlp.inspector import Inspector
from casb.dlp.instance import quiet_pydicom
from casb.dlp.profile import DlpProfile, DlpSettings, SafePrivate
from tests.support.dicom_corpus import (
    PATIENT_ID,
    PRIVATE_CREATOR,
    UID_KEY,
    add_nested_phi,
    add_private,
    ct_dataset,
    element,
    encode_instance,
    nested_sequences,
    split_at_pixel_data,
    with_length,
)

PIXEL_DATA = 0x7FE00010
SETTINGS = [
    DlpSettings(),
    DlpSettings(
        safe_private=[
            SafePrivate(creator=PRIVATE_CREATOR, tag="0019,xx10"),
            SafePrivate(creator="GEMS_ACQU_01", tag="0019,xx0C"),
            SafePrivate(creator="CASB SEQ", tag="0021,xx10"),
        ],
        mrn_patterns=[r"\bMRN[:#\s]*\d{5,}\b", r"\bCASE-\d{4}\b"],
    ),
]
PROFILES = [
    DlpProfile(),  # scan: findings only
    DlpProfile(block=["annex_e", "free_text.mrn"]),
    DlpProfile(block=["burned_in_annotation"]),
    DlpProfile(deidentify=[]),
    DlpProfile(deidentify=["retain_longitudinal_modified_dates", "clean_descriptors"]),
    DlpProfile(deidentify=["retain_safe_private", "retain_uids", "clean_descriptors"]),
]

Outcome = tuple[object, ...]


@dataclass
class Tally:
    fast: int = 0
    fallback: int = 0
    refused: int = 0
    failures: list[str] = field(default_factory=list)


def inspectors() -> list[Inspector]:
    return [Inspector(p, s, uid_key=UID_KEY) for s in SETTINGS for p in PROFILES]


def outcome(inspector: Inspector, step: Callable[[], object]) -> Outcome | None:
    """A comparable verdict (findings as a set), ("error", reason), or None."""
    try:
        verdict = inspector._guarded(step)
    except InstanceError as exc:
        return ("error", exc.reason)
    if verdict is None:
        return None
    assert isinstance(verdict, Verdict)
    findings = verdict.findings
    return (
        verdict.action,
        frozenset(findings),
        len(findings),
        verdict.header,
        verdict.sop_class_uid,
        verdict.sop_instance_uid,
        frozenset(verdict.blocked_by),
    )


def compare(name: str, data: bytes, complete: bool, tally: Tally, pool: list[Inspector]) -> None:
    for inspector in pool:
        fast = outcome(inspector, lambda i=inspector: i._inspect_fast(data, complete))
        if fast is None:
            tally.fallback += 1
            continue
        reference = outcome(inspector, lambda i=inspector: i._inspect_with_pydicom(data, complete))
        tally.fast += 1
        if reference is not None and reference[0] == "error":
            tally.refused += 1
        if fast != reference:
            tally.failures.append(f"{name}: {describe(inspector, reference, fast)}")


def describe(inspector: Inspector, reference: Outcome | None, fast: Outcome) -> str:
    """Which part differs (never the values: only rule ids, paths and offsets)."""
    profile = f"block={inspector.profile.block} deidentify={inspector.profile.deidentify}"
    if reference is None or reference[0] != fast[0] or reference[0] == "error":
        return f"{profile}: pydicom {reference and reference[0]}, fast {fast[0]}"
    ref_f, fast_f = reference[1], fast[1]
    assert isinstance(ref_f, frozenset) and isinstance(fast_f, frozenset)
    parts = [profile]
    if ref_f != fast_f:
        only_ref = sorted((f.rule, f.path) for f in ref_f - fast_f)
        only_fast = sorted((f.rule, f.path) for f in fast_f - ref_f)
        parts.append(f"findings only pydicom {only_ref} only fast {only_fast}")
    a, b = reference[3], fast[3]
    assert isinstance(a, bytes) and isinstance(b, bytes)
    if a != b:
        at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        parts.append(f"headers differ at byte {at} (lengths {len(a)}, {len(b)})")
    if reference[4:] != fast[4:]:
        parts.append("uids or blocked_by differ")
    return "; ".join(parts)


def assert_agree(tally: Tally, minimum_fast_share: float) -> None:
    assert not tally.failures, "\n".join(tally.failures[:20])
    total = tally.fast + tally.fallback
    assert total
    assert tally.fast / total >= minimum_fast_share, (tally.fast, tally.fallback)


# -- the corpus generators ----------------------------------------------------------------


def corpus_instances() -> Iterator[tuple[str, bytes, bool]]:
    """Every generator of tests/support/dicom_corpus.py, in explicit VR little endian
    and every framing; headers (complete=False) and whole instances (complete=True)."""
    builders: dict[str, Callable[[], Dataset]] = {
        "ct": ct_dataset,
        "ct+private": lambda: add_private(ct_dataset()),
        "ct+nested": lambda: add_nested_phi(ct_dataset()),
        "ct+all": lambda: add_nested_phi(add_private(ct_dataset())),
        "ct+charset": lambda: ct_dataset(patient_name="Wang^XiaoDong", charset="GB18030"),
        "ct+utf8": lambda: add_private(ct_dataset(patient_name="Gómez^José", charset="ISO_IR 192")),
        "ct+private+creator": lambda: add_private(ct_dataset(), creator="OTHER CREATOR"),
    }
    for name, build in builders.items():
        for framing in ("file", "meta", "bare"):
            header, pixels = split_at_pixel_data(build(), framing=framing)
            yield f"{name}/{framing}", header, False
            yield f"{name}/{framing}/whole", header + pixels, True
    for depth in (1, 5, 63, 64, 65):
        data = encode_instance(nested_sequences(depth), framing="bare")
        yield f"nested/{depth}", data, True


def hostile_instances() -> Iterator[tuple[str, bytes, bool]]:
    """Hand-encoded shapes the engine must refuse (or read) the same way on both paths,
    and a header cut anywhere (an error, or a valid prefix)."""
    modality = element(0x00080060, "CS", b"CT")
    name = element(0x00100010, "PN", b"SENTINEL^PHI")
    open_sequence = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    open_item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    shapes = {
        "repeated": modality + name + element(0x00100010, "PN", b""),
        "out of order": name + modality,
        "stray item delimiter": modality + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + name,
        "non-item in a sequence": element(0x00081140, "SQ", name),
        "short trailing bytes": modality + b"\x10\x00",
        "zero padding": modality + name + b"\x00\x00",
        "nesting bomb": (open_sequence + open_item) * 200,
        "undefined plain element": modality
        + struct.pack("<HH2sHL", 0x10, 0x10, b"UT", 0, 0xFFFFFFFF),
        "UN element": modality + element(0x00100010, "UN", b"SENTINEL^PHI"),
        "unknown VR": modality + element(0x00100010, "XX", b"SENTINEL^PHI"),
        "command group": element(0x00000100, "US", b"\x01\x00") + modality,
        "pixel data": encode_instance(ct_dataset(), framing="bare"),
    }
    for length in (0xFFFFFFF0, 0x7FFFFFFF, 4096, 13):
        utf = element(0x00100010, "UT", b"SENTINEL^PHI")
        shapes[f"length {length}"] = modality + with_length(utf, length, long_vr=True)
    for label, data in shapes.items():
        yield label, data, False
    header = split_at_pixel_data(add_nested_phi(add_private(ct_dataset())))[0]
    for cut in range(0, len(header), 7):
        yield f"truncated at {cut}", header[:cut], False


def test_the_corpus_generators() -> None:
    tally = Tally()
    pool = inspectors()
    for name, data, complete in corpus_instances():
        compare(name, data, complete, tally, pool)
    assert_agree(tally, 0.9)


def test_hostile_and_truncated_instances() -> None:
    """The fast path falls back on each of these unless it reads them exactly (a header
    cut at an element boundary is a valid, shorter header)."""
    tally = Tally()
    pool = inspectors()
    for name, data, complete in hostile_instances():
        compare(name, data, complete, tally, pool)
    assert_agree(tally, 0.0)
    assert tally.fast and tally.refused == 0


# -- pydicom's files ---------------------------------------------------------------------


def explicit_le_files() -> list[Path]:
    """pydicom's bundled files (test data and character sets) that read, explicit VR LE."""
    found = []
    with quiet_pydicom():
        for name in sorted(set(get_testdata_files()) | set(get_charset_files())):
            path = Path(name)
            try:
                ds = dcmread(path, stop_before_pixels=True, force=True)
            except Exception:
                continue
            if ds.file_meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian:
                found.append(path)
    return found


def pixel_data_offset(data: bytes) -> int | None:
    with quiet_pydicom():
        ds = dcmread(BytesIO(data), defer_size=64, force=True)
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    if not isinstance(raw, RawDataElement) or raw.value_tell is None:
        return None
    offset = int(raw.value_tell) - 12
    return offset if data[offset : offset + 4] == b"\xe0\x7f\x10\x00" else None


def test_pydicoms_explicit_vr_little_endian_files() -> None:
    files = explicit_le_files()
    assert len(files) > 80  # pydicom 3.0 ships well over a hundred
    tally = Tally()
    pool = inspectors()
    for path in files:
        data = path.read_bytes()
        offset = pixel_data_offset(data)
        if offset is not None:
            compare(f"{path.name}/header", data[:offset], False, tally, pool)
        if len(data) < 300_000:
            compare(path.name, data, True, tally, pool)
    assert_agree(tally, 0.5)


# -- randomized mutations ---------------------------------------------------------------
# A small model of an explicit VR little endian dataset (tag, VR, value bytes or items),
# read from pydicom's encoding of a corpus dataset, changed at random and written back
# by hand -- so that odd lengths, padding, undefined lengths and reserved bytes can be
# anything, which pydicom's writer would not produce.


@dataclass
class Element:
    tag: int
    vr: str
    value: bytes | list[Item]
    undefined: bool = False
    reserved: bytes = b"\x00\x00"


@dataclass
class Item:
    elements: list[Element]
    undefined: bool = False


LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def parse(data: bytes, pos: int, end: int) -> tuple[list[Element], int]:
    """The elements pydicom wrote (well formed, explicit VR LE) from pos to end or to
    an item delimiter."""
    elements: list[Element] = []
    while pos < end:
        group, number, vr_bytes, length = struct.unpack_from("<HH2sH", data, pos)
        tag = group << 16 | number
        if tag == 0xFFFEE00D:
            return elements, pos + 8
        vr = vr_bytes.decode()
        head = 8
        if vr in LONG_VRS:
            length = struct.unpack_from("<L", data, pos + 8)[0]
            head = 12
        value = pos + head
        if vr == "SQ":
            items, stop = parse_items(data, value, None if length == 0xFFFFFFFF else length)
            elements.append(Element(tag, vr, items, length == 0xFFFFFFFF))
            pos = stop
            continue
        elements.append(Element(tag, vr, data[value : value + length]))
        pos = value + length
    return elements, pos


def parse_items(data: bytes, pos: int, length: int | None) -> tuple[list[Item], int]:
    items: list[Item] = []
    end = pos + length if length is not None else len(data)
    while pos < end:
        tag_group, tag_number, item_length = struct.unpack_from("<HHL", data, pos)
        tag = tag_group << 16 | tag_number
        if tag == 0xFFFEE0DD:
            return items, pos + 8
        if item_length == 0xFFFFFFFF:
            elements, pos = parse(data, pos + 8, len(data))
            items.append(Item(elements, True))
        else:
            elements, _ = parse(data, pos + 8, pos + 8 + item_length)
            items.append(Item(elements))
            pos += 8 + item_length
    return items, pos


def write(elements: list[Element]) -> bytes:
    out = []
    for e in elements:
        head = struct.pack("<HH", e.tag >> 16, e.tag & 0xFFFF) + e.vr.encode()
        if isinstance(e.value, list):
            body = b"".join(write_item(i) for i in e.value)
            if e.undefined:
                out.append(head + e.reserved + b"\xff\xff\xff\xff" + body + SEQ_DELIMITER)
            else:
                out.append(head + e.reserved + struct.pack("<L", len(body)) + body)
        elif e.vr in LONG_VRS:
            out.append(head + e.reserved + struct.pack("<L", len(e.value)) + e.value)
        else:
            out.append(head + struct.pack("<H", len(e.value)) + e.value)
    return b"".join(out)


SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


def write_item(item: Item) -> bytes:
    body = write(item.elements)
    if item.undefined:
        return b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + ITEM_DELIMITER
    return b"\xfe\xff\x00\xe0" + struct.pack("<L", len(body)) + body


def model_of(ds: Dataset) -> tuple[list[Element], list[Element]]:
    """(file meta elements, dataset elements) of a corpus dataset."""
    data = encode_instance(ds)
    meta_length = struct.unpack_from("<L", data, 140)[0]
    meta, _ = parse(data, 132, 144 + meta_length)
    body, _ = parse(data, 144 + meta_length, len(data))
    return meta, body


CHARSETS: list[tuple[bytes, str]] = [
    # (Specific Character Set value, a patient name written in it)
    (b"ISO_IR 100", "Müller^Jürgen"),
    (b"ISO_IR 192", "Gómez^José"),
    (b"GB18030", "Wang^XiaoDong=王^小东"),
    (b"ISO_IR 144", "Иванов^Иван"),
    (b"\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎"),
    (b"ISO 2022 IR 6\\ISO 2022 IR 149", "Hong^Gildong=홍^길동"),
    (b"ISO_IR 13\\ISO 2022 IR 87", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎"),
    (b"ISO_IR 100 ", "Ana^Lia"),  # odd length, space padded
    (b"ISO_IR 100\x00\x00", "Ana^Lia"),  # NUL padded
    (b" ISO_IR 100", "Ana^Lia"),  # leading space: the fast path leaves it
    (b"", "Plain^Name"),
    (b"ISO_IR 6", "Plain^Name"),
]
PHI_TEXTS = [
    "call 555-123-4567 after 5",
    "SSN 123-45-6789",
    "mail jane.doe@example.org",
    "DOB: 04/07/1961",
    "MRN 1234567",
    "CASE-0042 follow up",
    "reviewed, nothing to report",
    "",
    " ",
    "A",
    "PID-884422 in comment",
    "two\\values 555-987-6543",
]
PUBLIC_TEXT_TAGS = [
    (0x00081030, "LO"),  # StudyDescription (descriptor)
    (0x0008103E, "LO"),  # SeriesDescription (descriptor)
    (0x00204000, "LT"),  # ImageComments
    (0x001021B0, "LT"),  # AdditionalPatientHistory
    (0x00324000, "LT"),  # StudyComments
    (0x00400254, "LO"),  # PerformedProcedureStepDescription
    (0x00081080, "LO"),  # AdmittingDiagnosesDescription
    (0x00180015, "CS"),  # BodyPartExamined
    (0x00081040, "LO"),  # InstitutionalDepartmentName
]
CODE_STRINGS = [b"YES", b"yes ", b"NO", b"", b"  ", b"YES\\NO", b"Y\x00", b"UNKNOWN "]
DATES = [b"20240311", b"1961070", b"19610704\\20240101", b"2024", b"20240230", b"", b"19000101 "]
UIDS = [b"1.2.3.4.5\x00", b"1.2.3", b"", b"1.2.3\\4.5.6 ", b"\x00\x00", b"2.25.1\\\\2.25.2"]
NESTED_TEXT_TAGS = [
    (0x00100020, "LO"),  # PatientID (Z)
    (0x00080100, "SH"),  # CodeValue (K)
    (0x0040A160, "UT"),  # TextValue: scanned, kept (K) by the basic profile
    (0x00209999, "LT"),  # not in the dictionary: scanned, kept
]
SEQUENCE_TAGS = [
    0x00081140,  # ReferencedImageSequence (U)
    0x00081110,  # ReferencedStudySequence (X)
    0x00400275,  # RequestAttributesSequence (X)
    0x00082218,  # AnatomicRegionSequence (K)
    0x00081032,  # ProcedureCodeSequence (X)
    0x00101002,  # OtherPatientIDsSequence (X)
    0x0040A730,  # ContentSequence (X)
    0x00089215,  # DerivationCodeSequence (K)
]


def text_bytes(rng: random.Random, text: str, charset: bytes) -> bytes:
    with quiet_pydicom():
        encodings = convert_encodings(charset.decode().strip(" \x00").split("\\"))
        value = encode_string(text, encodings)
    choice = rng.random()
    if choice < 0.4 and len(value) % 2:
        value += b" "
    elif choice < 0.5:
        value += b"\x00"
    return value


def sorted_insert(elements: list[Element], new: Element) -> None:
    elements[:] = [e for e in elements if e.tag != new.tag] + [new]
    elements.sort(key=lambda e: e.tag)


class Mutator:
    """Random changes to a dataset model (each one a shape the engine must handle or
    refuse the same way on both paths)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def walk(self, elements: list[Element]) -> Iterator[list[Element]]:
        yield elements
        for e in elements:
            if isinstance(e.value, list):
                for item in e.value:
                    yield from self.walk(item.elements)

    def some_dataset(self, body: list[Element]) -> list[Element]:
        return self.rng.choice(list(self.walk(body)))

    def apply(self, meta: list[Element], body: list[Element]) -> None:
        rng = self.rng
        charset, name = rng.choice(CHARSETS)
        steps = [self.texts, self.nest, self.private, self.codes, self.dates, self.uids]
        steps += [self.empty, self.odd, self.lengths, self.group_lengths, self.charset_in_item]
        steps += [self.kept]
        if rng.random() < 0.8:
            sorted_insert(body, Element(0x00080005, "CS", charset))
            sorted_insert(body, Element(0x00100010, "PN", text_bytes(rng, name, charset)))
        for step in rng.sample(steps, rng.randint(2, 7)):
            step(body, charset)
        if rng.random() < 0.2:
            self.meta(meta)

    def texts(self, body: list[Element], charset: bytes) -> None:
        for _ in range(self.rng.randint(1, 4)):
            tag, vr = self.rng.choice(PUBLIC_TEXT_TAGS)
            text = self.rng.choice([*PHI_TEXTS, CHARSETS[0][1]])
            target = self.some_dataset(body)
            sorted_insert(target, Element(tag, vr, text_bytes(self.rng, text, charset)))

    def nest(self, body: list[Element], charset: bytes) -> None:
        rng = self.rng
        target = self.some_dataset(body)
        inner: list[Element] = []
        for _ in range(rng.randint(0, 3)):
            tag, vr = rng.choice(PUBLIC_TEXT_TAGS + NESTED_TEXT_TAGS)
            sorted_insert(inner, Element(tag, vr, text_bytes(rng, rng.choice(PHI_TEXTS), charset)))
        if rng.random() < 0.3:
            sorted_insert(inner, Element(0x00081155, "UI", rng.choice(UIDS)))
        items = [Item(list(inner), rng.random() < 0.4) for _ in range(rng.randint(0, 3))]
        sorted_insert(target, Element(rng.choice(SEQUENCE_TAGS), "SQ", items, rng.random() < 0.4))
        for e in target:  # toggle lengths of existing sequences and items
            if isinstance(e.value, list) and rng.random() < 0.3:
                e.undefined = not e.undefined
                for item in e.value:
                    item.undefined = rng.random() < 0.5

    def kept(self, body: list[Element], charset: bytes) -> None:
        """A sequence the detectors walk (free text inside) but the basic profile keeps
        as it is: pydicom still writes it back converted."""
        rng = self.rng
        code = [Element(0x00080100, "SH", b"T-D3000 ")]
        if rng.random() < 0.5:
            code.insert(
                0, Element(0x00080005, "CS", rng.choice([b"ISO_IR 100\x00\x00", b"GB18030"]))
            )
        junk = b"AB" if rng.random() < 0.5 else b"\x00\x00"
        modifier = Element(0x00082220, "SQ", [Item(code, rng.random() < 0.5)], reserved=junk)
        text = text_bytes(rng, rng.choice(PHI_TEXTS), charset)
        outer = [modifier, Element(0x0040A160, "UT", text, reserved=junk)]
        sequence = Element(0x00082218, "SQ", [Item(outer, rng.random() < 0.5)], rng.random() < 0.3)
        sorted_insert(self.some_dataset(body), sequence)

    def private(self, body: list[Element], charset: bytes) -> None:
        rng = self.rng
        target = self.some_dataset(body)
        group = rng.choice([0x0019, 0x0021, 0x0029, 0x0009])
        creator = rng.choice(
            [PRIVATE_CREATOR.encode() + b" ", b"GEMS_ACQU_01", b"CASB SEQ", b"CASB SEQ\x00", b"X"]
        )
        block = rng.choice([0x10, 0x11])
        if rng.random() < 0.9:
            sorted_insert(target, Element(group << 16 | block, "LO", creator))
        element = (group << 16) | (block << 8) | rng.choice([0x10, 0x0C, 0x20])
        kind = rng.random()
        if kind < 0.4:
            text = rng.choice(PHI_TEXTS)
            sorted_insert(target, Element(element, "LO", text_bytes(rng, text, charset)))
        elif kind < 0.7:
            inner = [Element(0x00100020, "LO", b"PRIV-ID ")]
            if rng.random() < 0.5:
                inner.append(Element(0x00204000, "LT", b"555-123-4567"))
            items = [Item(inner, rng.random() < 0.5)]
            sorted_insert(target, Element(element, "SQ", items, rng.random() < 0.5))
        elif kind < 0.85:
            sorted_insert(target, Element(element, "DS", b"3.5 "))
        else:
            sorted_insert(target, Element(group << 16 | 0x0005, "LO", b"NO CREATOR"))

    def codes(self, body: list[Element], charset: bytes) -> None:
        rng = self.rng
        for tag in (0x00280301, 0x00080060, 0x00120062):
            choice = rng.random()
            if choice < 0.3:
                body[:] = [e for e in body if e.tag != tag]
            elif choice < 0.8:
                value = rng.choice([*CODE_STRINGS, b"US", b"CT", b"SC\\OT"])
                sorted_insert(body, Element(tag, "CS", value))

    def dates(self, body: list[Element], charset: bytes) -> None:
        for tag, vr in [(0x00080020, "DA"), (0x00080022, "DA"), (0x0008002A, "DT")]:
            if self.rng.random() < 0.6:
                value = self.rng.choice(DATES)
                if vr == "DT" and value:
                    value = value.rstrip() + b"101010.5"
                sorted_insert(self.some_dataset(body), Element(tag, vr, value))
        if self.rng.random() < 0.3:
            sorted_insert(body, Element(0x00080030, "TM", b"1010"))

    def uids(self, body: list[Element], charset: bytes) -> None:
        for tag in (0x00080018, 0x0020000D, 0x00081155):
            if self.rng.random() < 0.5:
                sorted_insert(self.some_dataset(body), Element(tag, "UI", self.rng.choice(UIDS)))

    def empty(self, body: list[Element], charset: bytes) -> None:
        for elements in self.walk(body):
            for e in elements:
                if not isinstance(e.value, list) and self.rng.random() < 0.1:
                    e.value = b""

    def odd(self, body: list[Element], charset: bytes) -> None:
        for elements in self.walk(body):
            for e in elements:
                if isinstance(e.value, bytes) and e.value and self.rng.random() < 0.15:
                    e.value = e.value.rstrip(b" \x00") or e.value[:1]

    def lengths(self, body: list[Element], charset: bytes) -> None:
        for elements in self.walk(body):
            for e in elements:
                if e.vr in LONG_VRS and self.rng.random() < 0.1:
                    e.reserved = b"AB"  # junk in the reserved bytes

    def group_lengths(self, body: list[Element], charset: bytes) -> None:
        target = self.some_dataset(body)
        group = self.rng.choice([0x0008, 0x0010, 0x0019])
        value = struct.pack("<L", 1234) if self.rng.random() < 0.8 else b"\x01\x02"
        sorted_insert(target, Element(group << 16, "UL", value))

    def charset_in_item(self, body: list[Element], charset: bytes) -> None:
        datasets = list(self.walk(body))[1:]
        if datasets:
            other, name = self.rng.choice(CHARSETS)
            target = self.rng.choice(datasets)
            sorted_insert(target, Element(0x00080005, "CS", other))
            value = text_bytes(self.rng, name + " 555-222-3333", other)
            sorted_insert(target, Element(0x00081030, "LO", value))

    def meta(self, meta: list[Element]) -> None:
        choice = self.rng.random()
        if choice < 0.3:
            meta[:] = [e for e in meta if e.tag != 0x00020000]
        elif choice < 0.6:
            for e in meta:
                if e.tag == 0x00020010:
                    e.value = self.rng.choice([b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.1 "])
        else:
            sorted_insert(meta, Element(0x00020003, "UI", self.rng.choice(UIDS)))


def frame(meta: list[Element], body: bytes, framing: str) -> bytes:
    if framing == "bare":
        return body
    elements = write([e for e in meta if e.tag != 0x00020000])
    group_length = [e for e in meta if e.tag == 0x00020000]
    head = write([Element(0x00020000, "UL", struct.pack("<L", len(elements)))])
    meta_bytes = (head if group_length else b"") + elements
    return (b"\x00" * 128 + b"DICM" if framing == "file" else b"") + meta_bytes + body


def mutations(count: int, seed: int) -> Iterator[tuple[str, bytes, bool]]:
    rng = random.Random(seed)
    bases = [
        add_nested_phi(add_private(ct_dataset())),
        add_private(ct_dataset(patient_name="Gómez^José", charset="ISO_IR 192")),
        add_nested_phi(ct_dataset(patient_id="CASE-0042")),
    ]
    models = [model_of(ds) for ds in bases]
    for index in range(count):
        meta, body = rng.choice(models)
        meta = [Element(e.tag, e.vr, e.value) for e in meta]
        body = parse(write(body), 0, len(write(body)))[0]  # a deep copy
        Mutator(rng).apply(meta, body)
        pixels = [e for e in body if e.tag == PIXEL_DATA]
        header = [e for e in body if e.tag != PIXEL_DATA]
        framing = rng.choice(["file", "file", "meta", "bare"])
        complete = rng.random() < 0.25
        if complete and rng.random() < 0.3:  # an element after the pixel data
            pixels.append(Element(0xFFFCFFFC, "OB", b"\x00" * rng.choice([0, 2, 4])))
        data = frame(meta, write(header + pixels if complete else header), framing)
        if rng.random() < 0.15:
            data += b"\x00" * rng.randint(1, 7)  # padding after the last element
        if rng.random() < 0.2:  # corrupted bytes
            mutable = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                mutable[rng.randrange(len(mutable))] = rng.getrandbits(8)
            data = bytes(mutable)
        yield f"mutation {index} ({framing})", data, complete


def test_randomized_mutations() -> None:
    tally = Tally()
    pool = inspectors()
    for name, data, complete in mutations(400, seed=20240311):
        compare(name, data, complete, tally, pool)
    assert_agree(tally, 0.5)
    assert tally.refused == 0  # what the pydicom path refuses never takes the fast path


def test_the_fast_path_is_what_inspect_uses() -> None:
    """inspect() answers with the fast path's verdict for explicit VR LE, and with the
    pydicom path's for everything else."""
    inspector = Inspector(DlpProfile(deidentify=[]), DlpSettings(), uid_key=UID_KEY)
    header, _ = split_at_pixel_data(add_nested_phi(add_private(ct_dataset())))
    fast = inspector._inspect_fast(header, False)
    assert fast is not None and inspector.inspect(header, False) == fast
    implicit, _ = split_at_pixel_data(ct_dataset(), transfer_syntax=ImplicitVRLittleEndian)
    assert inspector._inspect_fast(implicit, False) is None
    assert inspector.inspect(implicit, False).action == "deidentified"
    assert PATIENT_ID.encode() not in fast.header


def test_the_comparison_catches_a_wrong_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suites above can fail: a fast path that forgets a rule disagrees."""
    original = ExplicitLittleEndian._top_level

    def without_top_level_checks(self: ExplicitLittleEndian, run: object) -> None:
        return None

    monkeypatch.setattr(ExplicitLittleEndian, "_top_level", without_top_level_checks)
    tally = Tally()
    ds = add_private(ct_dataset())
    ds.Modality = "US"
    del ds.BurnedInAnnotation
    compare("no burned-in check", split_at_pixel_data(ds)[0], False, tally, inspectors())
    assert tally.failures
    monkeypatch.setattr(ExplicitLittleEndian, "_top_level", original)
    tally = Tally()
    compare("restored", split_at_pixel_data(ds)[0], False, tally, inspectors())
    assert not tally.failures and tally.fast
