"""Build the audit record (DESIGN.md, "Audit record") from a finished Transaction.

Never copies request values that can carry PHI: no raw URL, no query values, no headers.
UIDs are recorded (an access trail must say what was accessed); query KEYS are recorded
so a reviewer sees what was searched by, not for what.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from casb.context import Resource
from casb.exchange import DlpReport, Refusal, Transaction

# At most this many distinct findings per record (an upload of 2,000 instances with
# private tags would otherwise write a megabyte); the counts stay exact.
MAX_AUDITED_FINDINGS = 200


def build_record(
    tx: Transaction,
    *,
    status: int,
    bytes_in: int,
    bytes_out: int,
    policy_version: str,
    error: str | None = None,
) -> dict[str, Any]:
    p, r, d = tx.principal, tx.resource, tx.decision
    refusal = tx.outcome if isinstance(tx.outcome, Refusal) else None
    # The decision recorded is the outcome (was the request forwarded?); the policy's
    # rule and reasons come first, then any reason enforcement refused for.
    decision = "allow" if tx.allowed else "deny"
    if d is not None:
        rule_id, obligations = d.rule_id, dict(d.obligations)
        reasons = [*d.reasons, *tx.reasons]
    else:
        rule_id, reasons, obligations = None, list(tx.reasons), {}
    return {
        "type": "request",
        "time": tx.time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": tx.request_id,
        "trace_id": tx.trace_id,
        "principal": None
        if p is None
        else {"sub": p.subject, "issuer": p.issuer, "roles": sorted(p.roles), "mfa": p.mfa},
        "client": {"ip": tx.client_ip},
        "method": tx.method,
        "action": None if tx.action is None else str(tx.action),
        "destination": None if r is None else r.destination,
        "route": None if r is None else r.route,
        "uids": None
        if r is None
        else {"study": r.study_uid, "series": r.series_uid, "instance": r.instance_uid},
        "query_keys": [] if r is None else sorted(r.query),
        "decision": decision,
        "rule_id": rule_id,
        "reasons": reasons,
        "obligations": obligations,
        "error": refusal.code if refusal is not None else error,
        "object": None if r is None or r.bucket is None else object_summary(r),
        "dlp": None if tx.dlp is None else dlp_summary(tx.dlp),
        "envelope": tx.envelope,
        "warnings": list(tx.warnings),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "status": status,
        "duration_ms": round((time.monotonic() - tx.started) * 1000, 3),
        "policy_version": policy_version,
    }


def object_summary(r: Resource) -> dict[str, Any]:
    """Object stores: bucket, operation and the key's SHA-256 (keys are file names, which
    can name patients: the key itself is never recorded; hash a known key to find it)."""
    return {
        "bucket": r.bucket,
        "operation": r.operation,
        "key_sha256": None if r.key is None else hashlib.sha256(r.key.encode()).hexdigest(),
    }


def dlp_summary(report: DlpReport) -> dict[str, Any]:
    """Counts, errors and distinct findings (rule, attribute, path, how many instances):
    never a value."""
    counted: dict[tuple[str, str, str, str], int] = {}
    for f in report.findings:
        key = (f.rule, f.keyword, f.tag, f.path)
        counted[key] = counted.get(key, 0) + 1
    findings = [
        {"rule": rule, "keyword": kw, "tag": tag, "path": path, "count": n}
        for (rule, kw, tag, path), n in sorted(counted.items())[:MAX_AUDITED_FINDINGS]
    ]
    return {
        "profile": report.profile,
        "direction": report.direction,
        "instances": report.instances,
        "forwarded": report.forwarded,
        "blocked": report.blocked,
        "deidentified": report.deidentified,
        "failed": report.failed,
        "not_dicom": report.not_dicom,
        "rules": sorted({f.rule for f in report.findings}),
        "findings": findings,
        "findings_truncated": len(counted) > MAX_AUDITED_FINDINGS,
        "errors": report.errors[:20],
    }
