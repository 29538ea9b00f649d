"""casb.dlp.object_upload: which object uploads DLP can inspect, what counts as DICOM,
and inspect_object with the hospital policy's real profiles (pydicom's test files:
CT_small.dcm carries private tags, MR_small.dcm none)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import dcmread
from pydicom.filewriter import write_dataset

from casb.config import DlpConfig
from casb.dlp.object_upload import inspect_object, looks_like_dicom, object_upload_refusal
from casb.dlp.plan import DlpInspectors, DlpPlan
from casb.exchange import DlpReport
from casb.policy import load_policy

REPO = Path(__file__).resolve().parents[2]


@cache
def inspectors() -> DlpInspectors:
    policy = load_policy([REPO / "policies" / "hospital.yaml"], {"pacs", "research"})
    return DlpInspectors(policy.dlp, DlpConfig(), b"k" * 32)


def plan(profile: str) -> DlpPlan:
    return DlpPlan("request", profile, inspectors())


def sample_path(name: str) -> Path:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return Path(path)


@cache
def dicom_file(name: str) -> bytes:
    return sample_path(name).read_bytes()


def report(profile: str = "clinical-upload") -> DlpReport:
    return DlpReport(profile=profile, direction="request")


def counts(r: DlpReport) -> tuple[int, int, int, int, int, int]:
    return (r.instances, r.forwarded, r.blocked, r.deidentified, r.failed, r.not_dicom)


def raw_dataset(name: str) -> bytes:
    """The file's data set alone, explicit VR little endian, no preamble or meta group."""
    ds = dcmread(sample_path(name))
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


# -- object_upload_refusal ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "operation"),
    [
        ("s3", "PutObject"),
        ("azure_blob", "PutBlob"),
        ("gcs", "XmlPutObject"),
        ("gcs", "InsertObject:media"),
    ],
)
def test_whole_object_uploads_can_be_inspected(kind: str, operation: str) -> None:
    assert object_upload_refusal(kind, operation) is None


@pytest.mark.parametrize(
    ("kind", "operation"),
    [
        ("s3", "CreateMultipartUpload"),
        ("s3", "UploadPart"),
        ("s3", "UploadPartCopy"),
        ("s3", "CompleteMultipartUpload"),
        ("s3", "PostObject"),
        ("s3", "CopyObject"),
        ("azure_blob", "PutBlock"),
        ("azure_blob", "PutBlockList"),
        ("azure_blob", "CopyBlob"),
        ("gcs", "InsertObject:multipart"),
        ("gcs", "InsertObject:resumable"),
        ("gcs", "ResumableUpload"),
        ("gcs", "PutObject"),  # another store's operation name
        ("s3", "XmlPutObject"),
        ("azure_blob", "PutObject"),
        ("dicomweb", "PutObject"),
    ],
)
def test_uploads_in_several_requests_cannot(kind: str, operation: str) -> None:
    reason = object_upload_refusal(kind, operation)
    assert reason is not None
    assert operation in reason and "single request" in reason


def test_an_unnamed_operation_is_refused_too() -> None:
    reason = object_upload_refusal("s3", "")
    assert reason is not None and "this upload does not carry a whole object" in reason


# -- looks_like_dicom ---------------------------------------------------------------------


PDF = b"%PDF-1.7\n" + b"x" * 200


@pytest.mark.parametrize(
    ("body", "content_type", "key", "expected"),
    [
        (PDF, "application/dicom", "report.pdf", True),
        (PDF, "Application/DICOM; transfer-syntax=1.2.840.10008.1.2.1", None, True),
        (PDF, "application/octet-stream", "studies/ct/IM0001.dcm", True),
        (PDF, "", "IM0001.DCM", True),
        (PDF, "", "scan.dicom", True),
        (PDF, "", "scan.Dicom", True),
        (b"", "", "empty.dcm", True),
        (b"\0" * 128 + b"DICM" + b"\2\0\0\0", "application/octet-stream", "blob", True),
        (b"x" * 128 + b"DICM", "", None, True),  # the preamble may hold anything
        (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", "", "noext", True),
        (b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00", "", None, True),
        (PDF, "application/pdf", "report.pdf", False),
        (PDF, "", None, False),
        (b"PK\x03\x04" + b"\0" * 200, "application/zip", "study.zip", False),
        (b"\x10\x00\x10\x00PN\x04\x00Doe^", "", "x.bin", False),  # group 0010 first
        (b"\x08\x00\x05", "", None, False),  # too short to tell
        (b"\0" * 128 + b"DICX", "", None, False),
        (b"", "text/plain", "notes.txt", False),
        (PDF, "application/dicom+json", "x.json", False),
        (PDF, "", "dcm", False),
        (PDF, "", "x.dcm.pdf", False),
    ],
)
def test_what_counts_as_dicom(
    body: bytes, content_type: str, key: str | None, expected: bool
) -> None:
    assert looks_like_dicom(body, content_type, key) is expected


def test_the_test_files_and_raw_data_sets_look_like_dicom() -> None:
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert looks_like_dicom(dicom_file(name), "", None)
        assert looks_like_dicom(raw_dataset(name), "application/octet-stream", "blob.bin")


# -- inspect_object -----------------------------------------------------------------------


def test_private_tags_block_ct_small_under_clinical_upload() -> None:
    r = report()
    out = inspect_object(plan("clinical-upload"), dicom_file("CT_small.dcm"), "", "ct.dcm", r)
    assert isinstance(out, str)
    assert "blocked by the DLP profile" in out and "private_tag" in out
    assert "CompressedSamples" not in out  # the patient's name never shows
    assert counts(r) == (1, 0, 1, 0, 0, 0)
    assert "private_tag" in {f.rule for f in r.findings}
    assert all("CompressedSamples" not in repr(f) for f in r.findings)


def test_mr_small_is_clean_for_clinical_upload() -> None:
    body = dicom_file("MR_small.dcm")
    r = report()
    out = inspect_object(plan("clinical-upload"), body, "application/dicom", "mr/1.dcm", r)
    assert out == body  # forwarded byte for byte
    assert counts(r) == (1, 1, 0, 0, 0, 0)
    rules = {f.rule for f in r.findings}
    assert "private_tag" not in rules and "free_text" not in rules


def test_a_raw_data_set_is_inspected_like_a_file() -> None:
    r = report()
    out = inspect_object(plan("clinical-upload"), raw_dataset("CT_small.dcm"), "", None, r)
    assert isinstance(out, str) and "private_tag" in out
    assert counts(r) == (1, 0, 1, 0, 0, 0)


def test_a_dicom_object_under_any_name_is_inspected() -> None:
    # labelled octet-stream, no .dcm: the DICM magic still makes it DICOM
    r = report()
    body = dicom_file("CT_small.dcm")
    out = inspect_object(plan("clinical-upload"), body, "application/octet-stream", "x.bin", r)
    assert isinstance(out, str) and counts(r)[2] == 1


def test_deidentifying_profile_rewrites_the_object() -> None:
    body = dicom_file("CT_small.dcm")
    r = report("research-deidentify")
    out = inspect_object(plan("research-deidentify"), body, "application/dicom", "a.dcm", r)
    assert isinstance(out, bytes) and out != body
    assert b"CompressedSamples^CT1" in body and b"CompressedSamples^CT1" not in out
    assert counts(r) == (1, 1, 0, 1, 0, 0)
    ds = dcmread(DicomBytesIO(out))
    assert isinstance(ds, Dataset)
    assert str(ds.get("PatientName", "")) != "CompressedSamples^CT1"
    assert not [e for e in ds if e.tag.is_private]  # private tags removed by default
    assert ds.PixelData == dcmread(DicomBytesIO(body)).PixelData  # pixels untouched


@pytest.mark.parametrize(
    ("body", "content_type", "key"),
    [
        (PDF, "application/pdf", "reports/2024/report.pdf"),
        (b"", "", None),
        (b"PK\x03\x04" + b"\0" * 64, "application/zip", "bundle.zip"),
    ],
)
def test_objects_that_are_not_dicom_pass_unchanged(
    body: bytes, content_type: str, key: str | None
) -> None:
    r = report()
    assert inspect_object(plan("clinical-upload"), body, content_type, key, r) == body
    assert counts(r) == (0, 0, 0, 0, 0, 1)
    assert r.findings == [] and r.errors == []


@pytest.mark.parametrize("cut", [200, 700, 1000, 1500, -100, -1])
def test_a_truncated_dicom_object_is_refused_as_failed(cut: int) -> None:
    body = dicom_file("MR_small.dcm")[:cut]
    r = report()
    out = inspect_object(plan("clinical-upload"), body, "application/dicom", "mr.dcm", r)
    assert isinstance(out, str) and out.startswith("the DICOM object could not be inspected")
    assert counts(r) == (1, 0, 0, 0, 1, 0)
    assert len(r.errors) == 1 and r.errors[0] in out
    assert "CompressedSamples" not in out


@pytest.mark.parametrize(
    ("body", "content_type", "key"),
    [
        (b"", "application/dicom", None),
        (b"", "", "empty.dcm"),
        (PDF, "application/dicom", "labelled.dcm"),  # labelled DICOM, is not: refused
        (b"\0" * 128 + b"DICM" + b"\xff" * 40, "", None),
    ],
)
def test_labelled_dicom_that_cannot_be_read_fails_closed(
    body: bytes, content_type: str, key: str | None
) -> None:
    r = report()
    out = inspect_object(plan("clinical-upload"), body, content_type, key, r)
    assert isinstance(out, str)
    assert counts(r) == (1, 0, 0, 0, 1, 0)


def test_counts_add_up_in_one_report() -> None:
    r = report()
    p = plan("clinical-upload")
    inspect_object(p, dicom_file("CT_small.dcm"), "", "a.dcm", r)
    inspect_object(p, dicom_file("MR_small.dcm"), "", "b.dcm", r)
    inspect_object(p, PDF, "application/pdf", "c.pdf", r)
    inspect_object(p, dicom_file("MR_small.dcm")[:500], "", "d.dcm", r)
    assert counts(r) == (3, 1, 1, 0, 1, 1)
