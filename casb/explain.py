"""What would the proxy decide? The JSON `casb policy explain` and the admin simulate
endpoint return: the decision part of the very audit record the proxy would write."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from casb.audit.record import build_record
from casb.context import Principal
from casb.exchange import Forward, Refusal
from casb.pipeline import Pipeline, new_transaction, run_checks

# The audit record's fields that describe the decision (not the transfer).
DECISION_FIELDS = (
    "principal",
    "method",
    "action",
    "destination",
    "route",
    "uids",
    "query_keys",
    "decision",
    "rule_id",
    "reasons",
    "obligations",
    "error",
    "status",
    "policy_version",
)


def principal_from_mapping(data: Mapping[str, Any]) -> Principal:
    """A principal described by hand (CLI flags, simulate requests, policy test cases)."""
    unknown = set(data) - {"sub", "roles", "mfa", "claims", "issuer"}
    if unknown:
        raise ValueError(
            f"principal: unknown field(s) {sorted(unknown)}; use sub, roles, mfa, claims, issuer"
        )
    roles = data.get("roles", [])
    if isinstance(roles, str) or not all(isinstance(r, str) for r in roles):
        raise ValueError("principal.roles must be a list of strings")
    claims = data.get("claims", {})
    if not isinstance(claims, Mapping):
        raise ValueError("principal.claims must be a mapping")
    return Principal(
        subject=str(data.get("sub", "simulated")),
        issuer=str(data.get("issuer", "simulated")),
        roles=frozenset(roles),
        mfa=bool(data.get("mfa", False)),
        claims=MappingProxyType(dict(claims)),
    )


def parse_time(value: str | datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"time: not an ISO 8601 date-time: {value!r}") from None
    if when.tzinfo is None:
        raise ValueError("time: needs a UTC offset, e.g. 2026-03-02T10:00:00+01:00")
    return when


async def explain(
    pipeline: Pipeline,
    *,
    method: str,
    url: str,
    principal: Principal | Mapping[str, Any],
    at: str | datetime | None = None,
) -> dict[str, Any]:
    """Decide for a reverse-mode request path such as /pacs/studies?ModalitiesInStudy=CT."""
    if not isinstance(principal, Principal):
        principal = principal_from_mapping(principal)
    tx = new_transaction(method.upper(), at=parse_time(at))
    tx.principal = principal

    async def checks() -> Forward | Refusal:
        target, tx.method = pipeline.parse(method, url, ())
        return pipeline.authorize(tx, target)

    await run_checks(tx, checks())
    status = tx.outcome.status if isinstance(tx.outcome, Refusal) else 200
    record = build_record(
        tx, status=status, bytes_in=0, bytes_out=0, policy_version=pipeline.policy.version
    )
    return {k: record[k] for k in DECISION_FIELDS}
