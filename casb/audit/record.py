"""Build the audit record (DESIGN.md, "Audit record") from a finished Transaction.

Never copies request values that can carry PHI: no raw URL, no query values, no headers.
UIDs are recorded (an access trail must say what was accessed); query KEYS are recorded
so a reviewer sees what was searched by, not for what.
"""

from __future__ import annotations

import time
from typing import Any

from casb.exchange import Refusal, Transaction


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
        "dlp": [],
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "status": status,
        "duration_ms": round((time.monotonic() - tx.started) * 1000, 3),
        "policy_version": policy_version,
    }
