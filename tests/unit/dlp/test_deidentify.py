"""casb.dlp.deidentify through the Inspector: what the basic profile and its options do
to real and generated instances, checked by re-reading the output with pydicom."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from casb.dlp.deidentify import (
    MAX_SHIFT_DAYS,
    date_shift_days,
    hashed_uid,
    shift_date,
    shift_datetime,
)
from casb.dlp.inspector import Inspector
from casb.dlp.profile import DlpSettings
from tests.support.dicom_corpus import (
    BIRTH_DATE,
    INSTANCE_UID,
    OTHER_UID_KEY,
    PATIENT_ID,
    PRIVATE_CREATOR,
    REFERENCED_UID,
    STUDY_UID,
    UID_KEY,
    add_nested_phi,
    add_private,
    bundled,
    ct_dataset,
    encode_instance,
    reread,
    split_at_pixel_data,
)

from .conftest import InspectorFactory


def full_ct() -> Dataset:
    return add_nested_phi(add_private(ct_dataset()))


def deidentified(inspector: Inspector, ds: Dataset, **kwargs: object) -> tuple[Dataset, bytes]:
    """(the re-read output header + original pixel data, the pixel data bytes)."""
    header, pixels = split_at_pixel_data(ds, **kwargs)
    verdict = inspector.inspect(header, False)
    assert verdict.action == "deidentified"
    return reread(verdict.header + pixels), pixels


def odd_groups(ds: Dataset) -> list[int]:
    return [int(t) for t in ds.keys() if (int(t) >> 16) & 1]  # noqa: SIM118


def test_basic_profile_removes_patient_identity(deid: Inspector) -> None:
    out, _ = deidentified(deid, full_ct())
    assert str(out.PatientName) == ""
    assert out.PatientID == ""
    assert out.PatientBirthDate == ""
    assert "OtherPatientIDsSequence" not in out
    assert "RequestAttributesSequence" not in out
    assert "StudyDescription" not in out  # X
    assert "SeriesDate" not in out  # X/D -> X
    assert out.StudyDate == ""  # Z
    assert out.InstitutionName == ""  # X/Z/D -> Z
    assert len(out.ReferencedStudySequence) == 0  # X/Z on a sequence -> empty
    assert odd_groups(out) == []  # private elements and their creators
    assert out.Modality == "CT"  # kept
    assert out.Rows == 16
    assert out.SOPClassUID == ct_dataset().SOPClassUID


def test_uids_are_replaced_by_the_keyed_hash(deid: Inspector) -> None:
    out, _ = deidentified(deid, full_ct())
    assert out.SOPInstanceUID == hashed_uid(UID_KEY, INSTANCE_UID)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.StudyInstanceUID == hashed_uid(UID_KEY, STUDY_UID)
    ref = out.ReferencedImageSequence[0]  # X/Z/U* -> U: items kept, UIDs replaced
    assert ref.ReferencedSOPInstanceUID == hashed_uid(UID_KEY, REFERENCED_UID)
    assert ref.ReferencedSOPClassUID == ct_dataset().SOPClassUID


def test_hashed_uids_are_valid_and_keyed() -> None:
    uid = hashed_uid(UID_KEY, STUDY_UID)
    assert uid.startswith("2.25.")
    assert len(uid) <= 64
    assert int(uid[5:]) < 2**128
    assert uid == hashed_uid(UID_KEY, STUDY_UID)
    assert uid != hashed_uid(OTHER_UID_KEY, STUDY_UID)
    assert uid != hashed_uid(UID_KEY, STUDY_UID + ".1")


def test_the_same_input_gives_the_same_output(
    deid: Inspector, make_inspector: InspectorFactory
) -> None:
    header, _ = split_at_pixel_data(full_ct())
    first = deid.inspect(header, False).header
    assert make_inspector(deidentify=[]).inspect(header, False).header == first  # a replica
    other = make_inspector(deidentify=[], key=OTHER_UID_KEY).inspect(header, False).header
    assert other != first
    assert reread(other).StudyInstanceUID != reread(first).StudyInstanceUID


def test_instances_of_one_study_stay_one_study(deid: Inspector) -> None:
    one, two = ct_dataset(), ct_dataset()
    two.SOPInstanceUID = INSTANCE_UID + ".2"
    out_one, _ = deidentified(deid, one)
    out_two, _ = deidentified(deid, two)
    assert out_one.StudyInstanceUID == out_two.StudyInstanceUID
    assert out_one.SeriesInstanceUID == out_two.SeriesInstanceUID
    assert out_one.SOPInstanceUID != out_two.SOPInstanceUID


def test_the_result_is_marked(deid: Inspector, make_inspector: InspectorFactory) -> None:
    out, _ = deidentified(deid, ct_dataset())
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod.startswith("casb: PS3.15")
    codes = [
        (c.CodeValue, c.CodingSchemeDesignator) for c in out.DeidentificationMethodCodeSequence
    ]
    assert codes == [("113100", "DCM")]
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    with_options = make_inspector(deidentify=["retain_uids", "clean_descriptors"])
    out, _ = deidentified(with_options, ct_dataset())
    codes = [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113110", "113105"]


def test_pixel_data_is_untouched(deid: Inspector) -> None:
    ds = ct_dataset()
    data = encode_instance(ds)
    verdict = deid.inspect(data, True)
    assert reread(verdict.header).PixelData == ds.PixelData
    assert verdict.header.endswith(data[-len(ds.PixelData) :])
    out, _ = deidentified(deid, ct_dataset())
    assert out.PixelData == ds.PixelData


def test_encapsulated_pixel_data_is_untouched(deid: Inspector) -> None:
    data = bundled("JPEG2000.dcm")
    original = reread(data)
    out = reread(deid.inspect(data, True).header)
    assert out.PixelData == original.PixelData
    assert str(out.PatientName) == ""


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("framing", ["file", "meta", "bare"])
def test_every_encoding_and_framing_is_written_back_alike(
    deid: Inspector, ts: str, framing: str
) -> None:
    out, _ = deidentified(deid, full_ct(), transfer_syntax=ts, framing=framing)
    assert str(out.PatientName) == ""
    assert out.SOPInstanceUID == hashed_uid(UID_KEY, INSTANCE_UID)
    assert out.PixelData == ct_dataset().PixelData
    assert odd_groups(out) == []
    if framing == "bare":
        assert "MediaStorageSOPInstanceUID" not in out.file_meta
    else:
        assert out.file_meta.TransferSyntaxUID == ts
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


def test_deflated_instances(deid: Inspector) -> None:
    data = encode_instance(full_ct(), transfer_syntax=DeflatedExplicitVRLittleEndian)
    out = reread(deid.inspect(data, True).header)
    assert out.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert str(out.PatientName) == ""
    assert out.PixelData == ct_dataset().PixelData


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtstruct.dcm"])
def test_pydicoms_files_come_out_clean(deid: Inspector, scanner: Inspector, name: str) -> None:
    data = bundled(name)
    cleaned = deid.inspect(data, True).header
    out = reread(cleaned)
    assert str(out.get("PatientName", "")) == ""
    assert not odd_groups(out)
    rules = {f.rule for f in scanner.inspect(cleaned, True).findings}
    assert "annex_e" not in rules
    assert "private_tag" not in rules


def test_japanese_instance_is_deidentified(deid: Inspector) -> None:
    out = reread(deid.inspect(bundled("chrH31.dcm"), True).header)
    assert str(out.PatientName) == ""
    assert out.SpecificCharacterSet == bundled_charset("chrH31.dcm")


def bundled_charset(name: str) -> object:
    return reread(bundled(name)).SpecificCharacterSet


def test_retain_uids(make_inspector: InspectorFactory) -> None:
    out, _ = deidentified(make_inspector(deidentify=["retain_uids"]), full_ct())
    assert out.SOPInstanceUID == INSTANCE_UID
    assert out.StudyInstanceUID == STUDY_UID
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == REFERENCED_UID


def test_modified_dates_shift_per_patient(make_inspector: InspectorFactory) -> None:
    inspector = make_inspector(deidentify=["retain_longitudinal_modified_dates"])
    out, _ = deidentified(inspector, ct_dataset())
    days = date_shift_days(UID_KEY, PATIENT_ID)
    assert out.StudyDate == shift_date("20240311", days)
    assert out.SeriesDate == shift_date("20240311", days)  # X/D row, kept shifted
    assert out.StudyTime == "101010"  # a whole-day shift leaves times
    assert out.PatientBirthDate == ""  # not a longitudinal date: still Z
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    again, _ = deidentified(inspector, ct_dataset())
    assert again.StudyDate == out.StudyDate
    other = ct_dataset(patient_id="ANOTHER-PATIENT")
    assert date_shift_days(UID_KEY, "ANOTHER-PATIENT") != days
    assert deidentified(inspector, other)[0].StudyDate != out.StudyDate


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the test's own odd value
def test_dates_that_cannot_be_shifted_fall_back_to_the_basic_action(
    make_inspector: InspectorFactory,
) -> None:
    ds = ct_dataset()
    ds.add_new(0x00080020, "DA", "2024")  # partial date: no whole-day shift possible
    ds.AcquisitionDateTime = "20240311101313.25+0100"
    out, _ = deidentified(make_inspector(deidentify=["retain_longitudinal_modified_dates"]), ds)
    assert out.StudyDate == ""  # Z
    days = date_shift_days(UID_KEY, PATIENT_ID)
    assert out.AcquisitionDateTime == shift_date("20240311", days) + "101313.25+0100"


def test_full_dates_are_kept(make_inspector: InspectorFactory) -> None:
    out, _ = deidentified(
        make_inspector(deidentify=["retain_longitudinal_full_dates"]), ct_dataset()
    )
    assert out.StudyDate == "20240311"
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_shift_helpers() -> None:
    assert shift_date("20240301", 1) == "20240229"
    assert shift_date("20240301", 0) == "20240301"
    assert shift_date("2024", 1) is None
    assert shift_date("20241301", 1) is None
    assert shift_datetime("20240301120000+0100", 1) == "20240229120000+0100"
    for pid in ["", "A", PATIENT_ID, "x" * 64]:
        assert 0 <= date_shift_days(UID_KEY, pid) <= MAX_SHIFT_DAYS


def test_clean_descriptors(make_inspector: InspectorFactory) -> None:
    ds = ct_dataset()
    ds.StudyDescription = "CT chest for SENTINEL, call 555-123-4567"
    ds.SeriesDescription = "AXIAL 1.25MM"
    out, _ = deidentified(make_inspector(deidentify=["clean_descriptors"]), ds)
    assert out.StudyDescription == "CT chest for [REMOVED], call [REMOVED]"
    assert out.SeriesDescription == "AXIAL 1.25MM"
    assert out.ProtocolName == "CHEST ROUTINE"  # X/D + clean descriptors -> C: kept clean


def test_clean_descriptors_keeps_length_limits(make_inspector: InspectorFactory) -> None:
    ds = ct_dataset(patient_name="Bob^Al")
    ds.SeriesDescription = "Bob " * 16  # 64 chars: every "Bob" grows to "[REMOVED]"
    out, _ = deidentified(make_inspector(deidentify=["clean_descriptors"]), ds)
    assert len(out.SeriesDescription) <= 64
    assert "Bob" not in out.SeriesDescription


def test_retain_safe_private(make_inspector: InspectorFactory) -> None:
    settings = DlpSettings(safe_private=[{"creator": PRIVATE_CREATOR, "tag": "0019,xx11"}])
    safe = make_inspector(deidentify=["retain_safe_private"], settings=settings)
    out, _ = deidentified(safe, add_private(ct_dataset()))
    block = out.private_block(0x0019, PRIVATE_CREATOR)
    assert block[0x11].value == "3.5"
    assert 0x10 not in block and 0x12 not in block
    without = make_inspector(deidentify=[], settings=settings)
    assert odd_groups(deidentified(without, add_private(ct_dataset()))[0]) == []


def test_device_institution_and_patient_characteristics(make_inspector: InspectorFactory) -> None:
    options = [
        "retain_device_identity",
        "retain_institution_identity",
        "retain_patient_characteristics",
    ]
    out, _ = deidentified(make_inspector(deidentify=options), ct_dataset())
    assert out.StationName == "CTSCAN01"
    assert out.DeviceSerialNumber == "SN-445566"
    assert out.InstitutionName == "St. Example Hospital"
    assert out.PatientSex == "F"
    assert out.PatientAge == "062Y"
    assert str(out.PatientName) == ""


def test_dummies_and_sequences(deid: Inspector) -> None:
    ds = ct_dataset()
    ds.ClinicalTrialSponsorName = "ACME Trials"  # D
    ds.ClinicalTrialSubjectID = "SUBJ-1"  # D
    item = Dataset()
    item.TextValue = "SENTINEL said so"
    ds.ContentSequence = Sequence([item])  # D on a sequence -> empty sequence
    ds.add_new(0x60000010, "US", 16)  # Overlay Rows: kept
    ds.add_new(0x60003000, "OW", b"\x01" * 32)  # Overlay Data (60XX,3000): X
    out, _ = deidentified(deid, ds)
    assert out.ClinicalTrialSponsorName == "ANONYMOUS"
    assert out.ClinicalTrialSubjectID == "ANONYMOUS"
    assert len(out.ContentSequence) == 0
    assert 0x60003000 not in out
    assert out[0x60000010].value == 16


def test_deidentified_output_scans_clean(deid: Inspector, scanner: Inspector) -> None:
    header, _ = split_at_pixel_data(full_ct())
    cleaned = deid.inspect(header, False).header
    rules = {f.rule for f in scanner.inspect(cleaned, False).findings}
    assert not rules & {"annex_e", "private_tag", "identity_removed_contradicted"}
    assert BIRTH_DATE.encode() not in cleaned
    assert PATIENT_ID.encode() not in cleaned
    assert b"SENTINEL" not in cleaned
