"""DICOM JSON through the Inspector: mask_json (QIDO-RS / WADO-RS metadata) and
inspect_json (STOW-RS JSON+bulkdata), shape checks."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest

from casb.dlp.deidentify import date_shift_days, hashed_uid, shift_date
from casb.dlp.findings import InstanceError
from casb.dlp.inspector import Inspector
from tests.support.dicom_corpus import (
    INSTANCE_UID,
    PATIENT_ID,
    STUDY_UID,
    UID_KEY,
    add_private,
    ct_dataset,
    reread,
    split_at_pixel_data,
)

from .conftest import InspectorFactory

RETRIEVE = "http://pacs.example/dicom-web/studies/" + STUDY_UID


def study_json(**extra: Any) -> dict[str, Any]:
    """A QIDO-RS study result (what Orthanc answers), with PHI."""
    data: dict[str, Any] = {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 192"]},
        "00080020": {"vr": "DA", "Value": ["20240311"]},
        "00080050": {"vr": "SH", "Value": ["ACC20240311"]},
        "00080061": {"vr": "CS", "Value": ["CT"]},
        "00081030": {"vr": "LO", "Value": ["CT chest for SENTINEL"]},
        "00081190": {"vr": "UR", "Value": [RETRIEVE]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "SENTINEL^PHI"}]},
        "00100020": {"vr": "LO", "Value": [PATIENT_ID]},
        "00100030": {"vr": "DA", "Value": ["19610704"]},
        "0020000D": {"vr": "UI", "Value": [STUDY_UID]},
        "00201208": {"vr": "IS", "Value": [1]},
    }
    data.update(extra)
    return data


def instance_json() -> dict[str, Any]:
    """A WADO-RS metadata / STOW-RS JSON dataset with a bulk data reference."""
    data = study_json()
    data["00080018"] = {"vr": "UI", "Value": [INSTANCE_UID]}
    data["00080016"] = {"vr": "UI", "Value": [ct_dataset().SOPClassUID]}
    data["00081140"] = {
        "vr": "SQ",
        "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}}],
    }
    data["7FE00010"] = {"vr": "OW", "BulkDataURI": RETRIEVE + "/frames/1"}
    data["00282000"] = {"vr": "OB", "InlineBinary": "AAEC"}  # ICC profile, inline
    return data


def test_mask_json_deidentifies_every_dataset(make_inspector: InspectorFactory) -> None:
    inspector = make_inspector(deidentify=[])
    original = [study_json(), study_json()]
    before = copy.deepcopy(original)
    masked, findings = inspector.mask_json(original)
    assert original == before  # the input is not modified
    assert len(masked) == 2
    out = masked[0]
    assert "Value" not in out["00100010"]  # emptied
    assert "Value" not in out["00100020"]
    assert "00081030" not in out  # Study Description: X
    assert out["0020000D"]["Value"] == [hashed_uid(UID_KEY, STUDY_UID)]
    assert "00081190" not in out  # Retrieve URL names the original UID
    assert out["00120062"]["Value"] == ["YES"]
    assert {("annex_e", "PatientName"), ("annex_e", "StudyDescription")} <= {
        (f.rule, f.path) for f in findings
    }
    assert "SENTINEL" not in repr(masked)


def test_json_and_binary_deidentify_alike(make_inspector: InspectorFactory) -> None:
    """QIDO-RS results must match the instances they describe (same UIDs, dates)."""
    inspector = make_inspector(deidentify=["retain_longitudinal_modified_dates"])
    (out,), _ = inspector.mask_json([study_json()])
    header, _ = split_at_pixel_data(ct_dataset())
    binary = reread(inspector.inspect(header, False).header)
    assert out["0020000D"]["Value"] == [binary.StudyInstanceUID]
    assert out["00080020"]["Value"] == [binary.StudyDate]
    assert binary.StudyDate == shift_date("20240311", date_shift_days(UID_KEY, PATIENT_ID))


def test_mask_json_drops_bulk_data_and_blocked_datasets(make_inspector: InspectorFactory) -> None:
    inspector = make_inspector(deidentify=[], block=["private_tag"])
    private = study_json()
    private["00190010"] = {"vr": "LO", "Value": ["VENDOR"]}
    private["00191010"] = {"vr": "LO", "Value": ["anything"]}
    masked, findings = inspector.mask_json([instance_json(), private])
    assert len(masked) == 1
    assert masked[0]["7FE00010"] == {"vr": "OW"}  # no BulkDataURI
    assert masked[0]["00282000"] == {"vr": "OB"}  # no InlineBinary
    assert ("private_tag", "(0019,xx10)") in {(f.rule, f.path) for f in findings}


def test_retain_uids_keeps_retrieve_urls(make_inspector: InspectorFactory) -> None:
    (out,), _ = make_inspector(deidentify=["retain_uids"]).mask_json([study_json()])
    assert out["00081190"]["Value"] == [RETRIEVE]
    assert out["0020000D"]["Value"] == [STUDY_UID]


def test_mask_json_uses_the_basic_profile_when_the_profile_names_none(
    make_inspector: InspectorFactory,
) -> None:
    (out,), _ = make_inspector().mask_json([study_json()])
    assert "Value" not in out["00100010"]


def test_mask_json_without_a_key_fails_closed(make_inspector: InspectorFactory) -> None:
    with pytest.raises(InstanceError, match="UID key"):
        make_inspector(key=b"").mask_json([study_json()])


def test_inspect_json_keeps_the_pixel_data_reference(make_inspector: InspectorFactory) -> None:
    """STOW-RS JSON+bulkdata: the de-identified metadata still points at its bulk part."""
    out, verdict = make_inspector(deidentify=[]).inspect_json(instance_json())
    assert verdict.action == "deidentified"
    assert verdict.header == b""
    assert verdict.sop_instance_uid == INSTANCE_UID
    assert out is not None
    assert out["7FE00010"] == {"vr": "OW", "BulkDataURI": RETRIEVE + "/frames/1"}
    assert out["00081140"]["Value"][0]["00081155"]["Value"] == [hashed_uid(UID_KEY, "1.2.3.4")]


def test_inspect_json_forward_and_block(
    scanner: Inspector, make_inspector: InspectorFactory
) -> None:
    data = instance_json()
    out, verdict = scanner.inspect_json(data)
    assert verdict.action == "forward"
    assert out == instance_json()
    out, verdict = make_inspector(block=["annex_e"]).inspect_json(data)
    assert out is None
    assert verdict.action == "block"
    assert verdict.blocked_by == ("annex_e",)


def deep(levels: int) -> dict[str, Any]:
    data: dict[str, Any] = {"00100020": {"vr": "LO", "Value": ["X"]}}
    for _ in range(levels):
        data = {"00081140": {"vr": "SQ", "Value": [data]}}
    return data


@pytest.mark.parametrize(
    "bad",
    [
        [],
        "text",
        {"PatientName": {"vr": "PN", "Value": ["A"]}},
        {"00100010": ["not an object"]},
        {"00100010": {"Value": ["no vr"]}},
        {"00100010": {"vr": "pn", "Value": ["A"]}},
        {"00100010": {"vr": "PN", "Value": "not a list"}},
        {"00081140": {"vr": "SQ", "Value": ["not a dataset"]}},
        {"00100020": {"vr": "LO", "Value": [{"nested": "object"}]}},
        {"7FE00010": {"vr": "OB", "BulkDataURI": 7}},
        {"7FE00010": {"vr": "OB", "InlineBinary": "AA==", "BulkDataURI": "x"}},
        {"00280010": {"vr": "US", "Value": ["not a number"]}},
        deep(70),
    ],
)
def test_bad_json_shapes_are_instance_errors(make_inspector: InspectorFactory, bad: Any) -> None:
    inspector = make_inspector(deidentify=[])
    with pytest.raises(InstanceError):
        inspector.inspect_json(bad)
    with pytest.raises(InstanceError):
        inspector.mask_json([bad])


def test_mask_json_needs_a_list(deid: Inspector) -> None:
    with pytest.raises(InstanceError, match="list"):
        deid.mask_json(study_json())  # type: ignore[arg-type]


def test_nesting_within_the_bound_is_fine(deid: Inspector) -> None:
    (out,), findings = deid.mask_json([deep(20)])
    path = "ReferencedImageSequence" + "[0].ReferencedImageSequence" * 19 + "[0].PatientID"
    assert ("annex_e", path) in {(f.rule, f.path) for f in findings}
    assert out


def test_invalid_values_are_not_quoted_anywhere(
    deid: Inspector, caplog: pytest.LogCaptureFixture
) -> None:
    data = study_json(**{"00080021": {"vr": "DA", "Value": ["SENTINEL"]}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deid.mask_json([data])
    assert not [w for w in caught if "SENTINEL" in str(w.message)]
    assert not [r for r in caplog.records if "SENTINEL" in r.getMessage()]


def test_private_json_is_scanned(scanner: Inspector) -> None:
    header, _ = split_at_pixel_data(add_private(ct_dataset()))
    binary_rules = {f.rule for f in scanner.inspect(header, False).findings}
    json_data = study_json()
    json_data["00190010"] = {"vr": "LO", "Value": ["CASB TEST 1.0"]}
    json_data["00191010"] = {"vr": "LO", "Value": ["SSN 123-45-6789"]}
    _, verdict = scanner.inspect_json(json_data)
    assert ("free_text.ssn", "(0019,xx10)") in {(f.rule, f.path) for f in verdict.findings}
    assert "private_tag" in binary_rules
