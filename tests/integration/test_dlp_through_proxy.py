"""DLP end to end: real clients -> real mitmdump with the casb addon -> real Orthanc.

policies/hospital.yaml: technologists' uploads to `pacs` are inspected by the
`clinical-upload` profile (blocks private tags, free-text PHI, data after Pixel Data);
researchers' uploads to `research` are de-identified in flight (`research-deidentify`);
researchers' reads from `research` are masked (`research-view`). Both destinations lead
to the same Orthanc, which the tests also query directly (bypassing the proxy) to see
what was really stored.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.integration.conftest import Mint
from tests.support.orthanc import Orthanc
from tests.support.proxy import CasbProxy

pytestmark = pytest.mark.integration

# Sentinel PHI: must reach Orthanc only where the policy allows it, and never appear in
# the audit log, the proxy's log or an error body.
NAME = "Sentinel^Phiona"
PATIENT_ID = "SENT4711PHI"
BIRTH_DATE = "19370215"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={b}'
NOT_AUTHORIZED = 0x0124  # Failure Reason for instances blocked by DLP policy
CANNOT_UNDERSTAND = 0xC000  # ... for instances DLP cannot read

ERROR_BODIES: list[str] = []  # every error body the proxy sent, for the sentinel check


def make_ct(
    study: str | None = None,
    series: str | None = None,
    number: int = 1,
    *,
    marker: str = "",
    private_phi: bool = False,
) -> Dataset:
    """A small explicit-VR CT instance with the sentinel PHI in the patient module."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = "20240301"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + uuid.uuid4().hex[:8]
    ds.Modality = "CT"
    ds.SeriesDescription = marker or "casb-e2e"
    ds.InstanceNumber = number
    ds.SeriesNumber = 1
    ds.BurnedInAnnotation = "NO"
    if private_phi:
        block = ds.private_block(0x0011, "CASB TEST VENDOR", create=True)
        block.add_new(0x10, "LO", NAME)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * 2  # 16 x 16 x 2 bytes, recognisable
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def stow(
    proxy: CasbProxy, token: str, parts: Sequence[bytes], destination: str = "pacs"
) -> httpx.Response:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
            for part in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    r = httpx.post(
        f"{proxy.url}/{destination}/studies",
        content=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": STOW_TYPE.format(b=boundary),
            "Accept": "application/dicom+json",
        },
        timeout=60,
    )
    if r.status_code >= 400:
        ERROR_BODIES.append(r.text)
    return r


def failed_items(body: dict[str, Any]) -> list[tuple[str | None, int]]:
    items = body.get("00081198", {}).get("Value", [])
    return [
        (
            (item.get("00081155", {}).get("Value") or [None])[0],
            item["00081197"]["Value"][0],
        )
        for item in items
    ]


def stored_uids(body: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in body.get("00081199", {}).get("Value", [])]


def client(proxy: CasbProxy, token: str, destination: str) -> DICOMwebClient:
    return DICOMwebClient(
        url=f"{proxy.url}/{destination}", headers={"Authorization": f"Bearer {token}"}
    )


def in_orthanc(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    return DICOMwebClient(orthanc.dicomweb_url).search_for_instances(study_instance_uid=study_uid)


def last_record(proxy: CasbProxy, action: str) -> dict[str, Any]:
    return [r for r in proxy.audit_records() if r["action"] == action][-1]


# -- uploads ----------------------------------------------------------------------------


def test_research_upload_is_deidentified_in_flight(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint
) -> None:
    study, series = generate_uid(), generate_uid()
    marker = "casb-deid-" + uuid.uuid4().hex[:8]
    first = [make_ct(study, series, n, marker=marker) for n in (1, 2)]
    later = make_ct(study, series, 3, marker=marker)
    researcher = client(proxy, mint("res1", ["researcher"]), "research")
    researcher.store_instances(datasets=first)
    researcher.store_instances(datasets=[later])  # a second request, same series

    # Nothing under the original UIDs ...
    assert in_orthanc(orthanc, study) == []
    direct = DICOMwebClient(orthanc.dicomweb_url)
    found = direct.search_for_series(search_filters={"SeriesDescription": marker})
    # ... one series holding all three: UIDs were replaced consistently across requests.
    assert len(found) == 1
    new_study = found[0]["0020000D"]["Value"][0]
    new_series = found[0]["0020000E"]["Value"][0]
    assert new_study != study and new_series != series
    instances = direct.retrieve_series(new_study, new_series)
    assert len(instances) == 3
    originals = {ds.InstanceNumber: ds for ds in [*first, later]}
    for stored in instances:
        original = originals[stored.InstanceNumber]
        assert stored.SOPInstanceUID != original.SOPInstanceUID
        assert str(stored.get("PatientName", "")) == ""
        assert stored.get("PatientID", "") == ""
        assert stored.get("PatientBirthDate", "") == ""
        assert stored.PatientIdentityRemoved == "YES"
        assert stored.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert stored.PixelData == original.PixelData  # byte for byte
    record = last_record(proxy, "store")
    assert record["dlp"]["profile"] == "research-deidentify"
    assert (record["dlp"]["deidentified"], record["dlp"]["blocked"]) == (1, 0)
    assert record["status"] == 200 and record["decision"] == "allow"


def test_clinical_upload_with_phi_in_a_private_tag_is_blocked(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint
) -> None:
    ds = make_ct(private_phi=True)
    r = stow(proxy, mint("tech1", ["technologist"]), [encode(ds)])
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    assert failed_items(r.json()) == [(ds.SOPInstanceUID, NOT_AUTHORIZED)]
    assert in_orthanc(orthanc, ds.StudyInstanceUID) == []  # Orthanc holds nothing
    record = last_record(proxy, "store")
    assert record["request_id"] == r.headers["x-request-id"]
    assert record["dlp"]["blocked"] == 1 and "private_tag" in record["dlp"]["rules"]
    assert any(f["tag"].startswith("(0011,") for f in record["dlp"]["findings"])


def test_mixed_upload_stores_the_clean_instances_and_answers_202(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint
) -> None:
    study = generate_uid()
    clean = [make_ct(study, number=n) for n in (1, 2)]
    dirty = make_ct(study, number=3, private_phi=True)
    r = stow(
        proxy, mint("tech2", ["technologist"]), [encode(clean[0]), encode(dirty), encode(clean[1])]
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert failed_items(body) == [(dirty.SOPInstanceUID, NOT_AUTHORIZED)]
    assert sorted(stored_uids(body)) == sorted(ds.SOPInstanceUID for ds in clean)
    held = {i["00080018"]["Value"][0] for i in in_orthanc(orthanc, study)}
    assert held == {ds.SOPInstanceUID for ds in clean}
    # The clinical PACS keeps identified data: what was stored is unchanged.
    stored = DICOMwebClient(orthanc.dicomweb_url).retrieve_instance(
        study, clean[0].SeriesInstanceUID, clean[0].SOPInstanceUID
    )
    assert str(stored.PatientName) == NAME and stored.PixelData == clean[0].PixelData


def test_unreadable_instances_are_refused_and_smuggled_data_stripped(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint
) -> None:
    # Garbage, a truncated instance, and PHI hidden after Pixel Data in a private group.
    truncated = encode(make_ct())[:300]
    smuggler = make_ct()
    hidden = b"\xe1\x7f\x10\x00LO\x10\x00" + b"HiddenPHI^Smugglr"[:16]
    r = stow(
        proxy,
        mint("tech3", ["technologist"]),
        [b"\x00garbage" * 40, truncated, encode(smuggler) + hidden],
    )
    assert r.status_code == 202, r.text  # one stored, two refused
    assert [code for _uid, code in failed_items(r.json())] == [CANNOT_UNDERSTAND] * 2
    assert stored_uids(r.json()) == [smuggler.SOPInstanceUID]
    stored = httpx.get(
        f"{orthanc.dicomweb_url}/studies/{smuggler.StudyInstanceUID}/series/"
        f"{smuggler.SeriesInstanceUID}/instances/{smuggler.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    ).content
    assert b"HiddenPHI" not in stored and b"\xe1\x7f\x10\x00" not in stored
    record = last_record(proxy, "store")
    assert record["dlp"]["failed"] == 2 and "trailing_data" in record["dlp"]["rules"]


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/dicom", b"DICM", 415),  # STOW-RS is multipart; raw bodies are refused
        (STOW_TYPE.format(b="abc"), b"not a multipart body at all", 400),
        ('multipart/related; type="application/dicom"', b"--x\r\n\r\n", 400),  # no boundary
    ],
)
def test_bodies_dlp_cannot_read_get_a_clear_error_and_an_audit_record(
    proxy: CasbProxy, mint: Mint, content_type: str, body: bytes, status: int
) -> None:
    r = httpx.post(
        f"{proxy.url}/pacs/studies",
        content=body,
        headers={
            "Authorization": f"Bearer {mint('tech4', ['technologist'])}",
            "Content-Type": content_type,
        },
    )
    ERROR_BODIES.append(r.text)
    assert r.status_code == status, r.text
    assert r.json()["message"]
    record = last_record(proxy, "store")
    assert record["request_id"] == r.headers["x-request-id"]
    assert record["status"] == status
    # and the proxy keeps serving
    ok = httpx.get(
        f"{proxy.url}/pacs/studies",
        headers={"Authorization": f"Bearer {mint('tech4', ['technologist'])}"},
    )
    assert ok.status_code == 200


# -- reads ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def identified_study(orthanc: Orthanc) -> Iterator[Dataset]:
    """An identified instance put straight into Orthanc (as if it got there some other
    way): a researcher reading through the proxy must not see its PHI."""
    ds = make_ct()
    DICOMwebClient(orthanc.dicomweb_url).store_instances(datasets=[ds])
    yield ds


def test_researcher_searches_are_masked(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, identified_study: Dataset
) -> None:
    uid = identified_study.StudyInstanceUID
    direct = in_orthanc(orthanc, uid)
    assert NAME in json.dumps(direct)  # Orthanc does hold the name
    researcher = client(proxy, mint("res2", ["researcher"]), "research")
    masked = researcher.search_for_instances(
        study_instance_uid=uid, fields=["PatientName", "PatientID", "PatientBirthDate"]
    )
    assert len(masked) == 1
    text = json.dumps(masked)
    assert NAME not in text and PATIENT_ID not in text and BIRTH_DATE not in text
    # research-view retains UIDs, so the viewer can follow up
    assert masked[0]["00080018"]["Value"] == [identified_study.SOPInstanceUID]
    record = last_record(proxy, "search")
    assert record["dlp"]["direction"] == "response" and record["dlp"]["instances"] == 1


def test_researcher_metadata_and_instances_are_deidentified(
    proxy: CasbProxy, mint: Mint, identified_study: Dataset
) -> None:
    ds = identified_study
    researcher = client(proxy, mint("res3", ["researcher"]), "research")
    metadata = researcher.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert NAME not in json.dumps(metadata) and PATIENT_ID not in json.dumps(metadata)
    got = researcher.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert str(got.get("PatientName", "")) == "" and got.get("PatientID", "") == ""
    assert got.PatientIdentityRemoved == "YES"
    assert got.PixelData == ds.PixelData
    record = last_record(proxy, "retrieve")
    assert record["dlp"]["deidentified"] == 1 and record["status"] == 200


def test_masked_reads_ignore_ranges_and_heads_have_no_body(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, identified_study: Dataset
) -> None:
    ds = identified_study
    url = (
        f"{proxy.url}/research/studies/{ds.StudyInstanceUID}/series/"
        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    )
    headers = {
        "Authorization": f"Bearer {mint('res5', ['researcher'])}",
        "Accept": 'multipart/related; type="application/dicom"',
    }
    # A byte range of an instance cannot be de-identified: the whole, masked instance.
    r = httpx.get(url, headers={**headers, "Range": "bytes=0-99"})
    assert r.status_code == 200
    assert NAME.encode() not in r.content and ds.PixelData in r.content
    # HEAD has no body to mask: answered as the upstream answers it, not cut.
    direct = httpx.head(url.replace(f"{proxy.url}/research", orthanc.dicomweb_url))
    r = httpx.head(url, headers=headers)
    assert r.status_code == direct.status_code and r.content == b""
    assert r.headers["x-request-id"]


def test_researcher_rendered_images_are_refused(
    proxy: CasbProxy, mint: Mint, identified_study: Dataset
) -> None:
    ds = identified_study
    r = httpx.get(
        f"{proxy.url}/research/studies/{ds.StudyInstanceUID}/series/"
        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/rendered",
        headers={"Authorization": f"Bearer {mint('res4', ['researcher'])}"},
    )
    ERROR_BODIES.append(r.text)
    assert r.status_code == 403
    assert r.json()["error"] == "unenforceable_obligation"


def test_no_phi_in_audit_log_proxy_log_or_error_bodies(proxy: CasbProxy) -> None:
    """Runs last in this module: every path above carried the sentinel PHI."""
    assert len(ERROR_BODIES) >= 5
    outputs = {
        "audit log": proxy.audit_path.read_text(),
        "proxy log": proxy.log(),
        "error bodies": "\n".join(ERROR_BODIES),
    }
    for where, text in outputs.items():
        for sentinel in (NAME, "Sentinel", PATIENT_ID, BIRTH_DATE, "HiddenPHI"):
            assert sentinel not in text, f"{sentinel!r} found in the {where}"
