"""casb.dlp.detect through the Inspector (detect only): rules, paths, never values."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from casb.dlp.detect import Detector, TextScanner
from casb.dlp.findings import Finding, InstanceError
from casb.dlp.inspector import Inspector
from casb.dlp.instance import quiet_pydicom, read_header
from casb.dlp.profile import DlpSettings
from casb.dlp.rules import load_table
from tests.support.dicom_corpus import (
    PATIENT_ID,
    PATIENT_NAME,
    PRIVATE_CREATOR,
    add_nested_phi,
    add_private,
    bundled,
    ct_dataset,
    encode_instance,
    nested_sequences,
    split_at_pixel_data,
)

from .conftest import InspectorFactory


def pairs(findings: tuple[Finding, ...] | list[Finding]) -> set[tuple[str, str]]:
    return {(f.rule, f.path) for f in findings}


def scan(scanner: Inspector, ds: Dataset, **kwargs: object) -> tuple[Finding, ...]:
    header, _ = split_at_pixel_data(ds, **kwargs)
    return scanner.inspect(header, False).findings


def test_findings_cover_nested_and_private_phi(scanner: Inspector) -> None:
    found = pairs(scan(scanner, add_nested_phi(add_private(ct_dataset()))))
    assert {
        ("annex_e", "PatientName"),
        ("annex_e", "PatientID"),
        ("annex_e", "PatientBirthDate"),
        ("annex_e", "StudyDate"),
        ("annex_e", "InstitutionName"),
        ("annex_e", "OtherPatientIDsSequence"),
        ("annex_e", "OtherPatientIDsSequence[0].PatientID"),
        ("annex_e", "RequestAttributesSequence[0].ReferencedPatientSequence[0].PatientName"),
        (
            "free_text.mrn",
            "OtherPatientIDsSequence[0].IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID",
        ),
        ("private_tag", "(0019,xx10)"),
        ("private_tag", "(0019,xx11)"),
        ("private_tag", "(0019,xx12)"),
        ("annex_e", "(0019,xx12)[0].PatientID"),
        ("free_text.patient_name", "(0019,xx10)"),
    } <= found
    # kept attributes (K, U, D) are not findings
    assert not {p for r, p in found if p in ("SOPInstanceUID", "StudyInstanceUID", "Modality")}
    assert ("private_tag", "(0019,0010)") not in found  # the creator itself


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_the_same_findings_in_every_encoding(scanner: Inspector, ts: str) -> None:
    ds = add_nested_phi(add_private(ct_dataset()))
    explicit = pairs(scan(scanner, ds))
    assert pairs(scan(scanner, add_nested_phi(add_private(ct_dataset())), transfer_syntax=ts)) == (
        explicit
    )


def test_findings_carry_no_values(scanner: Inspector) -> None:
    ds = add_nested_phi(add_private(ct_dataset()))
    ds.StudyDescription = f"for {PATIENT_NAME} id {PATIENT_ID} SSN 123-45-6789"
    for finding in scan(scanner, ds):
        text = repr(finding) + str(finding.to_json())
        assert "SENTINEL" not in text
        assert PATIENT_ID not in text
        assert "123-45-6789" not in text
        assert set(finding.to_json()) == {"rule", "keyword", "tag", "path"}


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("SSN 123-45-6789 on file", "free_text.ssn"),
        ("call (555) 123-4567", "free_text.phone"),
        ("call 555-123-4567", "free_text.phone"),
        ("call +1 555 123 4567", "free_text.phone"),
        ("ring +44 20 7946 0958", "free_text.phone"),
        ("ring +49-30-1234567", "free_text.phone"),
        ("mail jane.doe@example.org", "free_text.email"),
        ("DOB: 07/04/1961", "free_text.date_of_birth"),
        ("D.O.B. 1961-07-04", "free_text.date_of_birth"),
        ("born 4 July 1961", "free_text.date_of_birth"),
        ("date of birth 19610704", "free_text.date_of_birth"),
        ("MRN: 1234567", "free_text.mrn"),
        ("follow-up for sentinel", "free_text.patient_name"),  # case-insensitive
        ("requested by PHI clinic", "free_text.patient_name"),
        ("ref PID-884422", "free_text.patient_id"),
    ],
)
def test_free_text_detectors(scanner: Inspector, text: str, rule: str) -> None:
    ds = ct_dataset()
    ds.StudyDescription = text
    assert (rule, "StudyDescription") in pairs(scan(scanner, ds))


@pytest.mark.parametrize(
    "text",
    [
        "CT CHEST W/O CONTRAST 2024",
        "series 1.2.840.10008.5.1.4.1.1.2",
        "slice 123 4567",
        "born in the ED",
        "MRN pending",
        "sentinels and phials",  # name parts only as whole words
        "PID-8844221",
    ],
)
def test_free_text_detectors_stay_quiet_on_ordinary_text(scanner: Inspector, text: str) -> None:
    ds = ct_dataset()
    ds.StudyDescription = text
    rules = {r for r, p in pairs(scan(scanner, ds)) if p == "StudyDescription"}
    assert rules == {"annex_e"}


def test_which_elements_are_free_text(scanner: Inspector) -> None:
    ds = ct_dataset()
    ds.Manufacturer = "SSN 123-45-6789"  # LO, not a descriptor: not scanned
    ds.ImageComments = "SSN 123-45-6789"  # LT: always scanned
    ds.TextValue = "SSN 123-45-6789"  # UT, not in the table: always scanned
    found = pairs(scan(scanner, ds))
    assert ("free_text.ssn", "ImageComments") in found
    assert ("free_text.ssn", "TextValue") in found
    assert not {p for r, p in found if p == "Manufacturer"}


def test_own_name_and_id_in_their_own_elements_are_not_free_text(scanner: Inspector) -> None:
    found = pairs(scan(scanner, ct_dataset()))
    assert not {r for r, p in found if r.startswith("free_text.")}


def test_mrn_patterns_come_from_settings(make_inspector: InspectorFactory) -> None:
    ds = ct_dataset()
    ds.StudyDescription = "chart A-99812"
    default = make_inspector(key=b"")
    assert ("free_text.mrn", "StudyDescription") not in pairs(scan(default, ds))
    custom = make_inspector(key=b"", settings=DlpSettings(mrn_patterns=[r"\bA-\d{5}\b"]))
    found = pairs(scan(custom, ct_dataset_with("chart A-99812")))
    assert ("free_text.mrn", "StudyDescription") in found


def ct_dataset_with(description: str) -> Dataset:
    ds = ct_dataset()
    ds.StudyDescription = description
    return ds


def test_safe_private_elements_are_not_findings(make_inspector: InspectorFactory) -> None:
    settings = DlpSettings(safe_private=[{"creator": PRIVATE_CREATOR, "tag": "0019,xx11"}])
    found = pairs(scan(make_inspector(key=b"", settings=settings), add_private(ct_dataset())))
    assert ("private_tag", "(0019,xx11)") not in found
    assert ("private_tag", "(0019,xx10)") in found
    other_creator = pairs(
        scan(make_inspector(key=b"", settings=settings), add_private(ct_dataset(), creator="X"))
    )
    assert ("private_tag", "(0019,xx11)") in other_creator


def test_private_text_of_unknown_vr_is_scanned(scanner: Inspector) -> None:
    """Implicit VR: pydicom does not know the private VR; printable bytes are scanned."""
    ds = add_private(ct_dataset())
    ds.private_block(0x0019, PRIVATE_CREATOR)[0x10].value = "SSN 123-45-6789"
    found = pairs(scan(scanner, ds, transfer_syntax=ImplicitVRLittleEndian))
    assert ("free_text.ssn", "(0019,xx10)") in found
    assert ("annex_e", "(0019,xx12)[0].PatientID") in found  # private sequence, items read


@pytest.mark.parametrize(
    ("modality", "burned", "expected"),
    [
        ("US", "YES", "burned_in_annotation.yes"),
        ("CT", "YES", "burned_in_annotation.yes"),
        ("US", None, "burned_in_annotation.unknown"),
        ("US", "NO", None),
        ("CT", None, None),
    ],
)
def test_burned_in_annotation(
    scanner: Inspector, modality: str, burned: str | None, expected: str | None
) -> None:
    ds = ct_dataset()
    ds.Modality = modality
    if burned is None:
        del ds.BurnedInAnnotation
    else:
        ds.BurnedInAnnotation = burned
    rules = {r for r, p in pairs(scan(scanner, ds)) if r.startswith("burned_in")}
    assert rules == ({expected} if expected else set())


def test_identity_removed_but_phi_present(scanner: Inspector, deid: Inspector) -> None:
    ds = ct_dataset()
    ds.PatientIdentityRemoved = "YES"
    assert ("identity_removed_contradicted", "PatientIdentityRemoved") in pairs(scan(scanner, ds))
    header, _ = split_at_pixel_data(ct_dataset())
    cleaned = deid.inspect(header, False).header
    rules = {f.rule for f in scanner.inspect(cleaned, False).findings}
    assert "identity_removed_contradicted" not in rules


def utf8_and_latin1(charset: str) -> Dataset:
    ds = ct_dataset(patient_name="Müller^Jürgen", charset=charset)
    ds.StudyDescription = "Kontrolle Jürgen"
    return ds


@pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100"])
def test_text_is_decoded_with_the_character_set(scanner: Inspector, charset: str) -> None:
    """Decoded wrongly, "Jürgen" in the description would not match the name."""
    found = pairs(scan(scanner, utf8_and_latin1(charset)))
    assert ("free_text.patient_name", "StudyDescription") in found


def test_gb18030_names_are_decoded(scanner: Inspector) -> None:
    ds = ct_dataset(patient_name="Zhuge^Kongming=诸葛^孔明先生", charset="GB18030")
    ds.StudyDescription = "复查 孔明先生 胸部"
    assert ("free_text.patient_name", "StudyDescription") in pairs(scan(scanner, ds))


def test_japanese_iso2022_names_are_decoded(scanner: Inspector) -> None:
    """pydicom's chrH31.dcm: Yamada^Tarou=山田^太郎=やまだ^たろう in ISO 2022 IR 87."""
    data = bundled("chrH31.dcm")
    assert scanner.inspect(data, True).findings  # reads and scans
    with quiet_pydicom():
        ds = read_header(data, complete=True)
    detector = Detector(DlpSettings(), load_table())
    text_scanner = detector.scanner_for(ds)
    assert "free_text.patient_name" in text_scanner.rules("外来 やまだ 検査")
    assert "free_text.patient_name" in text_scanner.rules("visit of TAROU")


def test_cjk_inside_unbroken_cjk_text_is_a_known_gap() -> None:
    """Names are matched as whole words; CJK text without separators has no word
    boundaries, so a name inside it is not matched (documented gap)."""
    text_scanner = TextScanner(())
    assert text_scanner.rules("anything") == []
    detector = Detector(DlpSettings(), load_table())
    ds = Dataset()
    ds.PatientName = "Zhuge^Kongming=诸葛^孔明先生"
    assert detector.scanner_for(ds).rules("复查孔明先生胸部") == []


def test_pydicoms_named_files_have_findings(scanner: Inspector) -> None:
    for name in ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"]:
        found = pairs(scanner.inspect(bundled(name), True).findings)
        assert ("annex_e", "PatientName") in found, name


def test_nesting_is_bounded_for_in_memory_datasets() -> None:
    detector = Detector(DlpSettings(), load_table())
    with pytest.raises(InstanceError, match="nested deeper"):
        detector.findings(nested_sequences(70))
    path = "ReferencedImageSequence" + "[0].ReferencedImageSequence" * 9 + "[0].PatientID"
    assert ("annex_e", path) in pairs(detector.findings(nested_sequences(10)))


def test_sequences_without_interesting_tags_are_not_walked() -> None:
    """The speed-up: a top-level sequence whose nested tags no detector looks at stays
    raw bytes (pydicom never parses its items) -- one with an interesting tag is walked."""
    ds = ct_dataset()
    ds.AnatomicRegionSequence[0].PatientID = "hidden"  # Z: interesting
    header, _ = split_at_pixel_data(ds)
    with quiet_pydicom():
        parsed = read_header(header, complete=False)
        found = pairs(Detector(DlpSettings(), load_table()).findings(parsed))
    assert ("annex_e", "AnatomicRegionSequence[0].PatientID") in found
    assert not parsed.get_item(0x00082218).is_raw  # walked: converted
    assert parsed.get_item(0x00081032).is_raw  # ProcedureCodeSequence: codes only


def test_encoded_file_findings_match_header_findings(scanner: Inspector) -> None:
    ds = add_nested_phi(add_private(ct_dataset()))
    whole = scanner.inspect(encode_instance(ds), True).findings
    assert pairs(whole) == pairs(scan(scanner, add_nested_phi(add_private(ct_dataset()))))


@pytest.mark.parametrize("ts", [None, ImplicitVRLittleEndian])
def test_nested_free_text_under_a_non_text_tag_is_scanned(
    scanner: Inspector, ts: str | None
) -> None:
    """An element written with a text VR although its dictionary VR is not text (Rows,
    US, as LT here), alone in a sequence: the detectors still read it (explicit VR), on
    the fast path and the pydicom path alike."""
    ds = ct_dataset()
    item = Dataset()
    item.add_new(0x00280010, "LT", "call 555-867-5309, SSN 123-45-6789")
    ds.AnatomicRegionSequence = [item]
    kwargs = {} if ts is None else {"transfer_syntax": ts}
    found = pairs(scan(scanner, ds, **kwargs))
    if ts is None:  # explicit VR: the file says LT
        assert ("free_text.ssn", "AnatomicRegionSequence[0].Rows") in found
    else:  # implicit VR has no VR in the file: pydicom (and casb) read it as Rows, US
        assert not any(rule.startswith("free_text") for rule, _ in found)


def test_attributes_an_option_keeps_do_not_contradict_identity_removed(
    scanner: Inspector, make_inspector: InspectorFactory
) -> None:
    """Output of casb's own de-identification with options that keep descriptors and
    dates is not flagged (those attributes may be kept); a remaining PatientName is."""
    ds = ct_dataset()
    ds.StudyDescription = "CT chest"
    header, _ = split_at_pixel_data(ds)
    keep = make_inspector(deidentify=["clean_descriptors", "retain_longitudinal_full_dates"])
    cleaned = keep.inspect(header, False).header
    found = scanner.inspect(cleaned, False).findings
    assert ("annex_e", "StudyDescription") in pairs(found)  # kept, and still reported
    assert "identity_removed_contradicted" not in {f.rule for f in found}

    claims = ct_dataset()
    claims.PatientIdentityRemoved = "YES"
    claims.StudyDescription = "CT chest"
    del claims.PatientID, claims.PatientBirthDate  # PatientName stays
    still_named = pairs(scan(scanner, claims))
    assert ("identity_removed_contradicted", "PatientIdentityRemoved") in still_named
