"""What the edge does with DLP plans, without mitmproxy: choose how to handle a response
body, mask a JSON body, turn a finished upload stream into the client's answer and the
audit report. casb/mitm_addon.py calls these; tests call them directly."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from casb.dlp.findings import InstanceError, Verdict
from casb.exchange import DlpReport

if TYPE_CHECKING:
    from casb.dlp.multipart_stream import MultipartDicomStream, PartResult
    from casb.dlp.plan import DlpPlan

ResponseKind = Literal["json", "multipart", "instance", "unmaskable"]

_JSON_TYPES = frozenset({"application/dicom+json", "application/json"})


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def response_kind(content_type: str) -> ResponseKind:
    """How a masked response body is handled, by its media type."""
    mtype = media_type(content_type)
    if mtype in _JSON_TYPES:
        return "json"
    if mtype == "multipart/related":
        return "multipart"
    if mtype == "application/dicom":
        return "instance"
    return "unmaskable"


def mask_json_body(plan: DlpPlan, body: bytes, report: DlpReport) -> bytes:
    """De-identify a QIDO-RS / WADO-RS metadata body (a JSON array of DICOM JSON
    datasets, or one dataset). Raises InstanceError when it is not that."""
    if not body.strip():
        return body
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InstanceError("the response is not valid JSON") from None
    single = isinstance(data, dict)
    datasets = [data] if single else data
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise InstanceError("the response is not a list of DICOM JSON datasets")
    masked, findings = plan.inspector().mask_json(datasets)
    report.instances += len(datasets)
    report.deidentified += len(masked)
    report.blocked += len(datasets) - len(masked)
    report.findings.extend(findings)
    out: object = (masked[0] if masked else {}) if single else masked
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def record_stream(report: DlpReport, stream: MultipartDicomStream) -> None:
    """Copy a finished multipart stream's outcome into the audit report (once)."""
    if report.recorded:
        return
    report.recorded = True
    _record_parts(report, stream.results)
    report.findings.extend(stream.findings)
    if stream.fatal:
        report.errors.append(stream.fatal)


InstanceOutcome = Literal["forwarded", "deidentified", "blocked", "failed"]


def count_instance(report: DlpReport, outcome: InstanceOutcome, error: str | None = None) -> None:
    """Count one inspected instance in the audit report."""
    report.instances += 1
    if outcome == "failed":
        report.failed += 1
        if error is not None:
            report.errors.append(error)
    elif outcome == "blocked":
        report.blocked += 1
    else:
        report.forwarded += 1
        report.deidentified += outcome == "deidentified"


def verdict_outcome(verdict: Verdict | None) -> InstanceOutcome:
    if verdict is None or verdict.action == "block":
        return "blocked"
    return "deidentified" if verdict.action == "deidentified" else "forwarded"


def _record_parts(report: DlpReport, results: Iterable[PartResult]) -> None:
    from casb.dlp.stow_response import FAILURE_BLOCKED

    for part in results:
        if part.kind == "bulk":
            continue
        if part.failure_code == FAILURE_BLOCKED:
            count_instance(report, "blocked")
        elif part.failure_code is not None or part.error is not None:
            count_instance(report, "failed", part.error)
        else:  # a response-side instance the profile blocks is dropped: "blocked"
            count_instance(report, verdict_outcome(part.verdict))


def upload_answer(
    stream: MultipartDicomStream, status: int, body: bytes, content_type: str
) -> tuple[int, bytes] | None:
    """The STOW-RS answer to give instead of the upstream's, or None to pass it on."""
    from casb.dlp.stow_response import merge_stow_response

    return merge_stow_response(status, body, content_type, stream.failures)
