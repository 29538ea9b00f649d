"""DLP for DICOM objects uploaded to object stores (S3 PutObject, Azure Put Blob, GCS
uploads): the same header reader and inspector as STOW-RS, one object per request.

Object stores need the length of what they store up front (S3 refuses a chunked
PutObject), and de-identification changes it, so an object upload under a `dlp`
obligation is read whole (up to `limits.max_body_bytes`) before anything is forwarded.
Uploads that assemble an object from several requests (multipart uploads, blocks,
resumable sessions, browser POST) cannot be inspected as one object and are refused.

What is DICOM: an object labelled `application/dicom`, a key ending `.dcm` / `.dicom`,
or a body that carries the DICM magic at byte 128 or starts like a raw data set (group
0002 or 0008 tag first). Anything labelled or looking like DICOM must be readable and
pass the profile; other objects (reports, archives) are forwarded unchanged and audited
as not DICOM.
"""

from __future__ import annotations

import struct

from casb.dlp.enforce import count_instance, media_type, verdict_outcome
from casb.dlp.instance_stream import InstanceStream
from casb.dlp.plan import DlpPlan
from casb.exchange import DlpReport

# The upload operations that carry one whole object in one request body.
_WHOLE_OBJECT = {
    "s3": frozenset({"PutObject"}),
    "azure_blob": frozenset({"PutBlob"}),
    "gcs": frozenset({"XmlPutObject", "InsertObject:media"}),
}


def object_upload_refusal(kind: str, operation: str) -> str | None:
    """Why an upload under a `dlp` obligation cannot be inspected, or None."""
    if operation in _WHOLE_OBJECT.get(kind, frozenset()):
        return None
    return (
        f"uploads to this destination are inspected for PHI, and {operation or 'this upload'} "
        "does not carry a whole object in one request: send each object in a single "
        "request (S3 PutObject; for boto3 raise TransferConfig's multipart_threshold)"
    )


def looks_like_dicom(body: bytes, content_type: str, key: str | None) -> bool:
    if media_type(content_type) == "application/dicom":
        return True
    if key is not None and key.lower().endswith((".dcm", ".dicom")):
        return True
    if len(body) >= 132 and body[128:132] == b"DICM":
        return True
    if len(body) >= 8:
        group = struct.unpack_from("<H", body, 0)[0]
        return group in (0x0002, 0x0008)
    return False


def inspect_object(
    plan: DlpPlan, body: bytes, content_type: str, key: str | None, report: DlpReport
) -> bytes | str:
    """The object to forward (possibly de-identified), or why it is refused. Counts it in
    the audit report."""
    if not looks_like_dicom(body, content_type, key):
        report.not_dicom += 1
        return body
    stream = InstanceStream(plan.inspector().inspect, max_header_bytes=plan.max_header_bytes)
    out = [*stream.feed(body), *stream.finish()]
    verdict = stream.verdict
    report.findings.extend((*(verdict.findings if verdict else ()), *stream.findings))
    if stream.error is not None:
        count_instance(report, "failed", stream.error)
        return f"the DICOM object could not be inspected: {stream.error}"
    outcome = verdict_outcome(verdict)
    count_instance(report, outcome)
    if outcome == "blocked":
        rules = sorted({f.rule for f in (verdict.findings if verdict else ())})
        return "the DICOM object is blocked by the DLP profile" + (
            f" (findings: {', '.join(rules)})" if rules else ""
        )
    return b"".join(out)
