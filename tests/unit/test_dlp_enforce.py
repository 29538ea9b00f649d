"""The edge's DLP decisions without mitmproxy: which responses can be masked, JSON
masking, and what an upload stream's outcome becomes in the audit report."""

from __future__ import annotations

import json

import pytest

from casb.config import DlpConfig
from casb.dlp.enforce import mask_json_body, record_stream, response_kind
from casb.dlp.findings import InstanceError
from casb.dlp.multipart_stream import MultipartDicomStream
from casb.dlp.plan import DlpInspectors, DlpPlan, DlpUnavailable
from casb.dlp.profile import DlpProfile, DlpSettings
from casb.exchange import DlpReport

SETTINGS = DlpSettings(
    profiles={
        "view": DlpProfile(deidentify=["retain_uids"]),
        "guard": DlpProfile(block=["private_tag"]),
    }
)
NAME = "Sentinel^Masked"


def plan(profile: str = "view", key: bytes | None = b"k" * 32) -> DlpPlan:
    return DlpPlan("response", profile, DlpInspectors(SETTINGS, DlpConfig(), key))


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("application/dicom+json", "json"),
        ("application/json; charset=utf-8", "json"),
        ('multipart/related; type="application/dicom"; boundary=x', "multipart"),
        ("application/dicom", "instance"),
        ("image/jpeg", "unmaskable"),
        ("application/dicom+xml", "unmaskable"),
        ("", "unmaskable"),
    ],
)
def test_response_kinds(content_type: str, kind: str) -> None:
    assert response_kind(content_type) == kind


def qido_result(uid: str) -> dict[str, object]:
    return {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": NAME}]},
        "00100020": {"vr": "LO", "Value": ["PID-1234"]},
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00081190": {"vr": "UR", "Value": [f"http://pacs/studies/{uid}"]},
    }


def test_a_qido_body_is_masked_and_counted() -> None:
    report = DlpReport(profile="view", direction="response")
    body = json.dumps([qido_result("1.2.3"), qido_result("1.2.4")]).encode()
    out = mask_json_body(plan(), body, report)
    assert NAME.encode() not in out and b"PID-1234" not in out
    masked = json.loads(out)
    assert [d["0020000D"]["Value"] for d in masked] == [["1.2.3"], ["1.2.4"]]  # retain_uids
    assert (report.instances, report.deidentified, report.blocked) == (2, 2, 0)
    assert {f.keyword for f in report.findings} >= {"PatientName", "PatientID"}
    assert all(NAME not in repr(f) for f in report.findings)


def test_a_single_dataset_stays_a_single_dataset() -> None:
    report = DlpReport(profile="view", direction="response")
    out = json.loads(mask_json_body(plan(), json.dumps(qido_result("1.2")).encode(), report))
    assert isinstance(out, dict)
    assert not out.get("00100020", {}).get("Value")  # PatientID emptied
    assert NAME not in json.dumps(out)


@pytest.mark.parametrize("body", [b"{not json", b'"a string"', b"[1, 2]", b"\xff\xfe"])
def test_bodies_that_are_not_dicom_json_are_refused(body: bytes) -> None:
    with pytest.raises(InstanceError) as info:
        mask_json_body(plan(), body, DlpReport(profile="view", direction="response"))
    assert "a string" not in info.value.reason  # the reason never quotes the body


def test_a_deidentifying_profile_without_a_key_is_unavailable() -> None:
    inspectors = DlpInspectors(SETTINGS, DlpConfig(), None)
    assert inspectors.missing_key_profiles() == ["view"]
    with pytest.raises(DlpUnavailable, match="no UID key"):
        inspectors.inspector("view")
    inspectors.inspector("guard")  # blocking needs no key


def test_an_upload_outcome_is_recorded_once() -> None:
    stream = MultipartDicomStream(
        'multipart/related; type="application/dicom"; boundary=b',
        plan("guard").inspector(),
        max_header_bytes=1 << 20,
        max_json_bytes=1 << 20,
        mode="request",
    )
    stream(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\x00garbage" * 20)
    stream(b"\r\n--b--\r\n")
    stream(b"")
    report = DlpReport(profile="guard", direction="request")
    record_stream(report, stream)
    record_stream(report, stream)
    assert (report.instances, report.failed, report.forwarded) == (1, 1, 0)
    assert len(report.errors) == 1
