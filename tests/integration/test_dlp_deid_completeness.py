"""De-identification through the real proxy is complete, with PS3.15 Table E.1-1 itself
as the oracle.

One explicit-VR-LE CT instance carries a unique sentinel value in every attribute of the
table that has a concrete public tag and a string/text/PN/date/time/UID VR (plus one item
with a sentinel in every sequence row). It is uploaded by a researcher to `research`
(policy `research-deidentify`: basic profile + Retain Longitudinal Temporal Information
Modified Dates + Clean Descriptors), and what Orthanc stored is read back directly
(bypassing the proxy) and checked row by row against the table's action for that
profile, resolved the way casb/dlp/rules.py documents (X/Z->Z, X/D->X, Z/D->Z,
X/Z/D->Z, X/Z/U*->U; an enabled option overrides, K wins over C).

The same sentinels, with different values, sit once more inside an item of Referenced
Image Sequence: the table has no sequence row it keeps, its cleaned (C) sequences are
code sequences, and Referenced Study Sequence is emptied (X/Z); Referenced Image Sequence
is X/Z/U*, so its items stay and every nested attribute must follow its own row.

The oracle is computed here from the JSON, not with casb.dlp.rules, so a mistake in how
casb reads the table shows up as a failing row.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final, cast

import httpx
import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import TM

from tests.integration.conftest import Mint
from tests.support.orthanc import Orthanc
from tests.support.proxy import REPO, CasbProxy

pytestmark = pytest.mark.integration

TABLE_PATH: Final = REPO / "casb" / "dlp" / "data" / "ps3.15-table-e1-1.json"
# research-deidentify in policies/hospital.yaml, as the table names its options
ENABLED_OPTIONS: Final = frozenset({"rtnLongModifDatesOpt", "cleanDescOpt"})
COMPOSITES: Final = {"X/Z": "Z", "X/D": "X", "Z/D": "Z", "X/Z/D": "Z", "X/Z/U*": "U"}
TEXT_VRS: Final = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
STRING_VRS: Final = TEXT_VRS | {"AS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}
UID_ROOT: Final = "1.2.826.0.1.3680043.10.999"
NESTED_OFFSET: Final = 2000  # nested sentinels: index + 2000 (all fixed width)
SSN: Final = "123-45-6789"
REMOVED: Final = "[REMOVED]"
MAX_SHIFT_DAYS: Final = 3650

SOP_INSTANCE_UID: Final = 0x00080018
MEDIA_STORAGE_SOP_INSTANCE_UID: Final = 0x00020003
REFERENCED_SOP_INSTANCE_UID: Final = 0x00081155
REFERENCED_IMAGE_SEQUENCE: Final = 0x00081140  # X/Z/U*: the carrier of nested sentinels
SSN_TAGS: Final = frozenset({0x00081030, 0x00204000})  # StudyDescription, ImageComments
TIMEZONE_OFFSET: Final = 0x00080201  # SH, but a date row: a real offset, not a sentinel


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the table with a concrete public tag, and what the profile must do."""

    index: int
    tag: int
    keyword: str
    vr: str
    basic: str
    expected: str  # X Z D U K C
    date_option: bool  # C comes from the Modified Dates Option

    @property
    def label(self) -> str:
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X}) {self.keyword}"


# What casb can really clean (C): dates and times under the Modified Dates Option
# (DA/DT shifted, TM kept) and text under Clean Descriptors (free-text findings replaced).
# Any other C -- code sequences, code strings, the UTC offset -- falls back to the row's
# basic action: more is removed than the option would keep, never less (README, "DLP").
CASB_CLEANS: Final = frozenset({"DA", "DT", "TM", "SH", "LO", "ST", "LT", "UT", "UC", "AE"})


def expected_action(raw: dict[str, Any], vr: str) -> str:
    basic = str(raw["basicProfile"])
    overrides = {str(raw[key]) for key in ENABLED_OPTIONS if key in raw}
    if "K" in overrides:
        return "K"
    if overrides and (vr in CASB_CLEANS and not (vr == "SH" and "rtnLongModifDatesOpt" in raw)):
        return "C"
    return COMPOSITES.get(basic, basic)


def load_rows() -> tuple[list[Row], dict[str, list[str]]]:
    """The checkable rows, and the others by why they are not checked."""
    rows: list[Row] = []
    skipped: dict[str, list[str]] = {}
    raw_rows = json.loads(TABLE_PATH.read_text("utf-8"))
    for index, raw in enumerate(raw_rows):
        text = str(raw["tag"]).strip("()").replace(",", "")
        if "X" in text.upper() or len(text) != 8:
            skipped.setdefault("tag pattern (gggg/eeee with XX)", []).append(raw["tag"])
            continue
        tag = int(text, 16)
        vr = dictionary_VR(tag)
        if tag >> 16 == 0:
            # PS3.10 forbids command elements in a stored instance (pydicom refuses them)
            skipped.setdefault("command group 0000", []).append(raw["tag"])
            continue
        if vr not in STRING_VRS and vr != "SQ":
            skipped.setdefault(f"binary/numeric VR {vr}", []).append(raw["tag"])
            continue
        rows.append(
            Row(
                index=index,
                tag=tag,
                keyword=keyword_for_tag(tag),
                vr=vr,
                basic=str(raw["basicProfile"]),
                expected=expected_action(raw, vr),
                date_option="rtnLongModifDatesOpt" in raw,
            )
        )
    return rows, skipped


ROWS, SKIPPED = load_rows()
BY_TAG: Final = {row.tag: row for row in ROWS}
NESTED_ROWS: Final = [r for r in ROWS if r.vr != "SQ" and r.tag >> 16 != 0x0002]


def input_value(row: Row, *, nested: bool = False) -> str:
    """The unique value an attribute carries in the upload (deterministic per row)."""
    if row.tag == MEDIA_STORAGE_SOP_INSTANCE_UID:
        return input_value(BY_TAG[SOP_INSTANCE_UID])  # the file meta repeats the SOP UID
    n = row.index + (NESTED_OFFSET if nested else 0)
    token = f"{'SNTN' if nested else 'SNTL'}{n:04d}"
    vr = row.vr
    if row.tag == TIMEZONE_OFFSET:
        return "-0245" if nested else "+0130"
    if vr in TEXT_VRS:
        return f"{token} {SSN}" if row.tag in SSN_TAGS and not nested else token
    if vr == "UR":
        return f"http://x.invalid/{token}"
    if vr in ("DA", "DT"):
        # dates the profile shifts live in 2010..2017 (shifted: 2000..2017), the others in
        # 1901..1908, so a shifted date can never equal a sentinel of another row
        base = date(2010, 1, 1) if row.expected == "C" else date(1901, 1, 1)
        day = (base + timedelta(days=n)).strftime("%Y%m%d")
        return day if vr == "DA" else f"{day}101112.{n:06d}"
    if vr == "TM":
        return f"{10 + n // 3600:02d}{n // 60 % 60:02d}{n % 60:02d}.{n:06d}"
    if vr == "AS":
        return f"{n % 899 + 100:03d}W"
    if vr == "DS":
        return f"-8{n:04d}.25"
    if vr == "IS":
        return f"-7{n:05d}"
    if vr == "UI":
        return f"{UID_ROOT}.{1000 + n}"
    if vr == "SQ":
        return f"SNTQ{n:04d}"  # the Code Meaning of the sequence's item
    raise AssertionError(f"no sentinel for VR {vr}")


def referencing_item(sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def nested_item() -> Dataset:
    item = Dataset()
    for row in NESTED_ROWS:
        item.add(DataElement(row.tag, row.vr, input_value(row, nested=True)))
    return item


def build_instance() -> Dataset:
    ds = Dataset()
    sop_uid = input_value(BY_TAG[SOP_INSTANCE_UID])
    for row in ROWS:
        if row.tag >> 16 == 0x0002:
            continue  # MediaStorageSOPInstanceUID: the file meta, below
        if row.vr != "SQ":
            ds.add(DataElement(row.tag, row.vr, input_value(row)))
        elif row.expected == "U":
            items = [referencing_item(sop_uid)]
            if row.tag == REFERENCED_IMAGE_SEQUENCE:
                items.insert(0, nested_item())
            ds.add(DataElement(row.tag, "SQ", items))
        else:
            item = Dataset()
            item.CodeMeaning = input_value(row)
            ds.add(DataElement(row.tag, "SQ", [item]))
    base = Dataset()  # what a CT image needs besides the table's rows
    base.SOPClassUID = CTImageStorage
    base.Modality = "CT"
    base.BurnedInAnnotation = "NO"
    base.SeriesNumber = 1
    base.InstanceNumber = 1
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = base.Columns = 16
    base.BitsAllocated = base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 0
    base.PixelData = bytes(range(256)) * 2
    for elem in base:
        assert int(elem.tag) not in BY_TAG, "a base attribute would hide a table row"
        ds.add(elem)
    block = ds.private_block(0x0011, "CASB COMPLETENESS", create=True)
    block.add_new(0x10, "LO", "SNTP0001")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def stow(proxy: CasbProxy, token: str, part: bytes) -> httpx.Response:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return httpx.post(
        f"{proxy.url}/research/studies",
        content=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=30,
    )


@dataclass(frozen=True, slots=True)
class Upload:
    original: Dataset
    raw: bytes  # the file exactly as Orthanc stored it
    stored: Dataset


@pytest.fixture(scope="module")
def upload(proxy: CasbProxy, orthanc: Orthanc, mint: Mint) -> Upload:
    original = build_instance()
    before = set(cast(list[str], orthanc.get_json("/instances")))
    r = stow(proxy, mint("res-complete", ["researcher"]), encode(original))
    assert r.status_code == 200, r.text
    new = set(cast(list[str], orthanc.get_json("/instances"))) - before
    assert len(new) == 1
    with orthanc.open(f"/instances/{new.pop()}/file") as resp:
        raw = resp.read()
    record = [rec for rec in proxy.audit_records() if rec["action"] == "store"][-1]
    assert record["dlp"]["profile"] == "research-deidentify"
    assert (record["dlp"]["deidentified"], record["dlp"]["blocked"]) == (1, 0)
    return Upload(original=original, raw=raw, stored=dcmread(io.BytesIO(raw)))


# -- the oracle ---------------------------------------------------------------------------


def text_of(elem: DataElement) -> str:
    value = elem.value
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def days_back(original: str, stored: str) -> int:
    def parse(text: str) -> date:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    return (parse(original) - parse(stored)).days


def container_of(row: Row, stored: Dataset, *, nested: bool) -> Dataset:
    if nested:
        return cast(Dataset, stored[REFERENCED_IMAGE_SEQUENCE].value[0])
    return stored.file_meta if row.tag >> 16 == 0x0002 else stored


def check_sequence(row: Row, elem: DataElement | None, stored: Dataset) -> None:
    sentinel = input_value(row)
    items = [] if elem is None else list(elem.value)
    if row.expected == "X":
        assert elem is None, f"{row.label}: X, but present"
    elif row.expected == "Z":
        assert elem is None or not items, f"{row.label}: Z, but has items"
    elif row.expected == "D":
        assert all(item.get("CodeMeaning") != sentinel for item in items), f"{row.label}: D"
    elif row.expected == "U":
        assert elem is not None and items, f"{row.label}: U, but its items are gone"
        ref = items[-1].ReferencedSOPInstanceUID
        assert ref != input_value(BY_TAG[SOP_INSTANCE_UID]), f"{row.label}: UID not replaced"
        assert ref == stored.SOPInstanceUID, f"{row.label}: inconsistent UID"
    else:  # C (Clean Descriptors: keep what is not identifying) or K
        assert elem is not None and items, f"{row.label}: {row.expected}, but removed/emptied"
        assert items[0].get("CodeMeaning") == sentinel, f"{row.label}: item changed"


def check_clean(row: Row, elem: DataElement | None, original: str) -> None:
    assert elem is not None and not elem.is_empty, f"{row.label}: C, but removed/emptied"
    got = text_of(elem)
    if not row.date_option:  # Clean Descriptors: only PHI patterns go
        assert got == original.replace(SSN, REMOVED), f"{row.label}: not cleaned as expected"
    elif row.vr == "DA":
        assert 1 <= days_back(original, got) <= MAX_SHIFT_DAYS, f"{row.label}: not shifted"
    elif row.vr == "DT":
        assert 1 <= days_back(original, got) <= MAX_SHIFT_DAYS, f"{row.label}: not shifted"
        assert got[8:] == original[8:], f"{row.label}: time of day changed by a day shift"
    elif row.vr == "TM":
        assert TM(got) is not None, f"{row.label}: not a time"
    else:
        assert got == original, f"{row.label}: changed"


def check(row: Row, stored: Dataset, *, nested: bool) -> None:
    elem = container_of(row, stored, nested=nested).get(row.tag)
    if row.vr == "SQ":
        check_sequence(row, elem, stored)
        return
    original = input_value(row, nested=nested)
    action = row.expected
    if action == "X":
        assert elem is None, f"{row.label}: X, but present"
    elif action == "Z":
        assert elem is None or elem.is_empty, f"{row.label}: Z, but has a value"
    elif action == "D":
        assert elem is not None and not elem.is_empty, f"{row.label}: D, but removed/emptied"
        assert text_of(elem) != original, f"{row.label}: D, but unchanged"
    elif action == "U":
        assert elem is not None and not elem.is_empty, f"{row.label}: U, but removed/emptied"
        got = text_of(elem)
        assert got != original and UID(got).is_valid, f"{row.label}: UID not replaced"
    elif action == "K":
        assert elem is not None and text_of(elem) == original, f"{row.label}: K, but changed"
    else:
        check_clean(row, elem, original)


def params(rows: list[Row], *, nested: bool) -> list[Any]:
    out = []
    for row in rows:
        out.append(pytest.param(row, id=row.keyword))
    return out


# -- per row ------------------------------------------------------------------------------


@pytest.mark.parametrize("row", params(ROWS, nested=False))
def test_top_level_attribute_follows_the_table(upload: Upload, row: Row) -> None:
    check(row, upload.stored, nested=False)


@pytest.mark.parametrize("row", params(NESTED_ROWS, nested=True))
def test_nested_attribute_follows_the_table(upload: Upload, row: Row) -> None:
    check(row, upload.stored, nested=True)


# -- the whole instance -------------------------------------------------------------------


def test_the_table_is_covered() -> None:
    """Every row of the table is either checked or skipped for a stated reason."""
    total = len(json.loads(TABLE_PATH.read_text("utf-8")))
    assert total == 621
    assert len(ROWS) + sum(len(tags) for tags in SKIPPED.values()) == total
    assert len(ROWS) >= 560 and len(NESTED_ROWS) >= 490
    assert {r.expected for r in ROWS} >= {"X", "Z", "D", "U", "C"}


def removed_sentinels() -> dict[str, bytes]:
    """Label -> sentinel of every value the profile must remove, empty or replace."""
    out: dict[str, bytes] = {}
    for row in ROWS:
        if row.tag == MEDIA_STORAGE_SOP_INSTANCE_UID or (row.vr, row.expected) == ("SQ", "U"):
            continue  # the SOP Instance UID's own row; U sequences keep their item's text
        if row.expected in ("X", "Z", "D", "U"):
            out[row.label] = input_value(row).encode()
    for row in NESTED_ROWS:
        if row.expected in ("X", "Z", "D", "U"):
            out["nested " + row.label] = input_value(row, nested=True).encode()
    out["private (0011,1010)"] = b"SNTP0001"
    out["SSN"] = SSN.encode()
    return out


def test_no_removed_value_is_anywhere_in_the_stored_file(upload: Upload) -> None:
    sentinels = removed_sentinels()
    assert len(sentinels) > 400
    pixels = upload.original.PixelData
    assert not [label for label, s in sentinels.items() if s in pixels]  # the check is sound
    assert all(s in encode(upload.original) for s in sentinels.values())
    leaked = [label for label, s in sentinels.items() if s in upload.raw]
    assert leaked == []


def test_descriptors_with_an_ssn_are_cleaned_not_removed(upload: Upload) -> None:
    for tag in SSN_TAGS:
        row = BY_TAG[tag]
        assert text_of(upload.stored[tag]) == input_value(row).replace(SSN, REMOVED)
        assert REMOVED in text_of(upload.stored[tag])


def test_uids_are_replaced_consistently(upload: Upload) -> None:
    stored = upload.stored
    new_sop = stored.SOPInstanceUID
    assert new_sop != upload.original.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPInstanceUID == new_sop
    for seq in ("ReferencedImageSequence", "SourceImageSequence"):
        assert stored[seq].value[-1].ReferencedSOPInstanceUID == new_sop
    # distinct inputs, distinct outputs (top level and nested)
    outputs: dict[str, str] = {}
    for row in [r for r in ROWS if r.vr == "UI" and r.expected == "U"]:
        if row.tag == MEDIA_STORAGE_SOP_INSTANCE_UID:
            continue
        outputs[input_value(row)] = text_of(stored[row.tag])
    nested = stored.ReferencedImageSequence[0]
    for row in [r for r in NESTED_ROWS if r.vr == "UI" and r.expected == "U"]:
        outputs[input_value(row, nested=True)] = text_of(nested[row.tag])
    assert len(outputs) > 100
    assert len(set(outputs.values())) == len(outputs)


def test_dates_move_back_by_one_per_patient_shift(upload: Upload) -> None:
    shifts = set()
    for nested, rows in ((False, ROWS), (True, NESTED_ROWS)):
        container = upload.stored.ReferencedImageSequence[0] if nested else upload.stored
        for row in rows:
            if row.expected == "C" and row.date_option and row.vr in ("DA", "DT"):
                got = text_of(container[row.tag])
                shifts.add(days_back(input_value(row, nested=nested), got))
    assert len(shifts) == 1 and 1 <= shifts.pop() <= MAX_SHIFT_DAYS


def test_no_private_tags_identity_removed_and_pixels_identical(upload: Upload) -> None:
    stored = upload.stored
    assert [e.tag for e in stored.iterall() if e.tag.is_private] == []
    assert stored.PatientIdentityRemoved == "YES"
    codes = {item.CodeValue for item in stored.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107", "113105"}
    assert stored.LongitudinalTemporalInformationModified == "MODIFIED"
    assert stored.PixelData == upload.original.PixelData
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
