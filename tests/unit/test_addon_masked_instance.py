"""The addon's in-flight masking of a single application/dicom response (WADO-URI):
de-identified as it streams; an instance that must not pass makes the flow fail."""

from __future__ import annotations

import io

import pydicom

from casb.dlp.inspector import Inspector
from casb.dlp.instance_stream import InstanceStream
from casb.dlp.profile import DlpProfile, DlpSettings
from casb.exchange import DlpReport
from casb.mitm_addon import _MaskedInstance
from casb.pipeline import new_transaction
from tests.support.dicom_corpus import PATIENT_NAME, ct_dataset, encode_instance

KEY = b"k" * 32


def run(profile: DlpProfile, data: bytes, chunk: int = 777) -> tuple[_MaskedInstance, bytes]:
    tx = new_transaction("GET")
    tx.dlp = DlpReport(profile="p", direction="response")
    inspector = Inspector(profile, DlpSettings(), uid_key=KEY)
    masked = _MaskedInstance(InstanceStream(inspector.inspect, max_header_bytes=1 << 20), tx)
    out = [c for i in range(0, len(data), chunk) for c in masked(data[i : i + chunk])]
    out += masked(b"")
    return masked, b"".join(out)


def test_an_instance_is_deidentified_as_it_streams() -> None:
    original = ct_dataset()
    masked, out = run(DlpProfile(deidentify=[]), encode_instance(original))
    assert masked.failure is None
    got = pydicom.dcmread(io.BytesIO(out))
    assert str(got.get("PatientName", "")) == "" and got.PatientIdentityRemoved == "YES"
    assert got.PixelData == original.PixelData
    assert PATIENT_NAME.encode() not in out
    assert masked.tx.dlp is not None
    assert (masked.tx.dlp.instances, masked.tx.dlp.deidentified) == (1, 1)


def test_a_blocked_instance_sends_nothing_and_fails_the_flow() -> None:
    masked, out = run(DlpProfile(block=["annex_e"], deidentify=[]), encode_instance(ct_dataset()))
    assert out == b"" and masked.failure is not None
    assert masked.tx.dlp is not None and masked.tx.dlp.blocked == 1


def test_garbage_fails_the_flow_with_a_reason_that_quotes_nothing() -> None:
    masked, out = run(DlpProfile(deidentify=[]), b"\x00" * 200 + PATIENT_NAME.encode() * 10)
    assert out == b"" and masked.failure is not None
    assert PATIENT_NAME not in masked.failure
