"""The request pipeline: the only place that knows the order of the deciders.

    normalise URL -> identity (JWT) -> route to destination -> classify -> policy
    -> Forward (rewritten to what was classified) or Refusal; then one audit record.

Fail closed: every refusal, and any exception raised by a check, ends in a Refusal with
a clear code and an audit record. Nothing here imports mitmproxy: the edge adapts flows
to IncomingRequest and outcomes to responses.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime

from casb.audit import AuditError, AuditLog
from casb.audit.record import build_record
from casb.classify import (
    Classification,
    MalformedTarget,
    Target,
    classify_dicomweb,
    effective_method,
    encode_target,
    normalize_target,
)
from casb.config import Settings
from casb.context import Action, Principal, RequestFacts
from casb.dlp.plan import DlpInspectors, DlpPlan
from casb.exchange import Forward, IncomingRequest, Refusal, Transaction
from casb.identity import (
    AuthenticationError,
    IdentityUnavailable,
    TokenVerifier,
    extract_token,
    strip_query_token,
)
from casb.policy import CompiledPolicy
from casb.policy.decision import Decision
from casb.policy.loader import DLP_OBLIGATIONS
from casb.routing import Route, Router

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
# Obligations the enforcement side can carry out. A decision that carries any other
# obligation is refused (fail closed). DLP adds "deidentify" and "mask_attributes".
ENFORCEABLE_OBLIGATIONS: frozenset[str] = frozenset(DLP_OBLIGATIONS)
# Response masking de-identifies DICOM; these retrievals return pixels or raw bulk data,
# which it cannot clean: with a `mask` obligation they are refused.
_UNMASKABLE_ROUTE_PARTS = ("/rendered", "/thumbnail", "/frames/", "/bulk/", "/bulkdata/")
_MASKED_ACTIONS = frozenset(
    {Action.SEARCH, Action.RETRIEVE, Action.RETRIEVE_METADATA, Action.WORKLIST}
)
_STOW_TYPES = ("multipart/related",)


class _Refused(Exception):
    def __init__(self, refusal: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.refusal = refusal
        self.reason = reason


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        verifier: TokenVerifier,
        policy: CompiledPolicy,
        router: Router,
        audit: AuditLog | None,
        uid_key: bytes | None = None,
    ) -> None:
        self.verifier = verifier
        self.policy = policy  # replaced atomically on reload
        self.router = router
        self.audit = audit
        self._max_url = settings.limits.max_url_bytes
        assert settings.identity is not None, "runtime fills in dev identity settings"
        self._allow_query_token = settings.identity.allow_query_token
        self._max_token = settings.identity.max_token_bytes
        self._dlp_config = settings.dlp
        self._uid_key = uid_key
        self._dlp: tuple[CompiledPolicy, DlpInspectors] | None = None

    def inspectors(self) -> DlpInspectors:
        """The DLP inspectors of the current policy (rebuilt when the policy changes)."""
        policy, cached = self.policy, self._dlp
        if cached is None or cached[0] is not policy:
            cached = self._dlp = (
                policy,
                DlpInspectors(policy.dlp, self._dlp_config, self._uid_key),
            )
        return cached[1]

    async def decide(self, req: IncomingRequest) -> Transaction:
        tx = new_transaction(req.method, req.client_ip)
        tx.trace_id = _trace_id(req.headers)
        await run_checks(tx, self._decide(req, tx))
        return tx

    async def _decide(self, req: IncomingRequest, tx: Transaction) -> Forward | Refusal:
        if self.audit is not None and not self.audit.healthy:
            # The last record could not be written: forward nothing until one can be.
            reason = "the audit log cannot be written; request refused"
            raise _Refused(Refusal(503, "audit_unavailable", reason), reason)
        target, tx.method = self.parse(req.method, req.target, req.headers)
        tx.principal = await self._authenticate(req, target.query)
        outcome = self.authorize(
            tx, target, mode=req.mode, scheme=req.scheme, host=req.host, port=req.port
        )
        if isinstance(outcome, Forward) and outcome.dlp is not None:
            _check_inspectable(outcome.dlp, req.headers)
        return outcome

    def parse(
        self, method: str, raw_target: str, headers: Sequence[tuple[str, str]]
    ) -> tuple[Target, str]:
        """The canonical target and the effective method, or a 400 refusal."""
        try:
            target = normalize_target(raw_target, max_bytes=self._max_url)
            return target, effective_method(method, headers, target.query)
        except MalformedTarget as exc:
            raise _Refused(Refusal(400, "bad_request", exc.reason), exc.reason) from None

    def authorize(
        self,
        tx: Transaction,
        target: Target,
        *,
        mode: str = "reverse",
        scheme: str = "",
        host: str = "",
        port: int = 0,
    ) -> Forward | Refusal:
        """Route, classify and decide for tx.principal. Pure apart from reading config."""
        assert tx.principal is not None
        found = (
            self.router.reverse(target.segments)
            if mode == "reverse"
            else self.router.forward(scheme, host, port, target.segments)
        )
        if found is None:
            reason = "no destination is configured for this URL"
            raise _Refused(Refusal(403, "unknown_destination", reason), reason)
        route, rest = found

        classification = self._classify(route, tx.method, rest, target.query)
        tx.action, tx.resource = classification.action, classification.resource
        facts = RequestFacts(time=tx.time, method=tx.method, client_ip=tx.client_ip)
        decision = self.policy.decide(
            tx.principal, classification.action, classification.resource, facts
        )
        tx.decision = decision
        if not decision.allow:
            return _denial(decision.step_up, decision.reasons)
        missing = sorted(set(decision.obligations) - ENFORCEABLE_OBLIGATIONS)
        if missing:
            # The policy allows only on a condition this proxy cannot meet: refuse rather
            # than forward the request unprotected.
            reason = (
                f"the policy requires obligation(s) {', '.join(missing)}, which this "
                "proxy cannot enforce; refused rather than forwarded unprotected"
            )
            raise _Refused(Refusal(403, "unenforceable_obligation", reason), reason)
        return self._forward(route, rest, target.query, self._dlp_plan(classification, decision))

    def _dlp_plan(self, classification: Classification, decision: Decision) -> DlpPlan | None:
        """`dlp` inspects uploads; `mask` de-identifies what reads return."""
        action = classification.action
        upload = decision.obligations.get("dlp")
        if upload is not None and action == Action.STORE:
            return DlpPlan("request", str(upload), self.inspectors())
        mask = decision.obligations.get("mask")
        if mask is None or action not in _MASKED_ACTIONS:
            return None
        route = classification.resource.route
        if any(part in route for part in _UNMASKABLE_ROUTE_PARTS):
            reason = (
                f"the policy requires masking (profile '{mask}'), and rendered images, "
                "thumbnails, frames and bulk data cannot be de-identified; refused"
            )
            raise _Refused(Refusal(403, "unenforceable_obligation", reason), reason)
        inspectors = self.inspectors()
        refusal = inspectors.mask_refusal(str(mask), action, classification.resource)
        if refusal is not None:
            raise _Refused(Refusal(403, "forbidden", refusal), refusal)
        return DlpPlan("response", str(mask), inspectors)

    async def _authenticate(
        self, req: IncomingRequest, query: Sequence[tuple[str, str]]
    ) -> Principal:
        try:
            token, _source = extract_token(
                req.headers, query, allow_query=self._allow_query_token, max_bytes=self._max_token
            )
            return await self.verifier.verify(token)
        except AuthenticationError as exc:
            reason = exc.description or "a bearer token is required"
            raise _Refused(
                Refusal(
                    401, "unauthenticated", reason, (("WWW-Authenticate", exc.www_authenticate()),)
                ),
                reason,
            ) from None
        except IdentityUnavailable:
            reason = "signing keys are unavailable; cannot verify tokens"
            raise _Refused(Refusal(503, "identity_unavailable", reason), reason) from None

    @staticmethod
    def _classify(
        route: Route, method: str, rest: tuple[str, ...], query: tuple[tuple[str, str], ...]
    ) -> Classification:
        # Only DICOMweb destinations exist so far; object stores add their classifier here.
        return classify_dicomweb(method, rest, query, route.name)

    def _forward(
        self,
        route: Route,
        rest: tuple[str, ...],
        query: tuple[tuple[str, str], ...],
        dlp: DlpPlan | None = None,
    ) -> Forward:
        return Forward(
            scheme=route.scheme,
            host=route.host,
            port=route.port,
            target=encode_target((*route.base, *rest), strip_query_token(query)),
            set_headers=route.set_headers,
            remove_headers=route.remove_headers,
            dlp=dlp,
        )

    def refuse_connect(self, method: str, client_ip: str) -> Transaction:
        """Forward mode: a CONNECT to a host that no destination names."""
        tx = new_transaction(method, client_ip)
        reason = "no destination is configured for this host"
        tx.outcome, tx.reasons = Refusal(403, "unknown_destination", reason), (reason,)
        return tx

    def finish(
        self,
        tx: Transaction,
        *,
        status: int,
        bytes_in: int = 0,
        bytes_out: int = 0,
        error: str | None = None,
    ) -> None:
        """Write the request's audit record (once). Raises AuditError if it cannot."""
        if tx.finished:
            return
        if self.audit is None:
            raise AuditError("this pipeline was built without an audit log")
        tx.finished = True
        self.audit.append(
            build_record(
                tx,
                status=status,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                error=error,
                policy_version=self.policy.version,
            )
        )


def new_transaction(method: str, client_ip: str = "", at: datetime | None = None) -> Transaction:
    return Transaction(
        request_id=uuid.uuid4().hex,
        time=at or datetime.now(UTC),
        method=method,
        client_ip=client_ip,
    )


async def run_checks(tx: Transaction, checks: Awaitable[Forward | Refusal]) -> None:
    """Await the checks and set tx.outcome; a refusal or ANY exception denies."""
    try:
        tx.outcome = await checks
    except _Refused as refused:
        tx.outcome, tx.reasons = refused.refusal, (refused.reason,)
    except Exception as exc:  # a check that raised: deny, never forward
        tx.outcome = Refusal(
            500, "internal_error", "the request could not be checked, so it was not forwarded"
        )
        tx.reasons = (f"internal error: {type(exc).__name__}",)


def _check_inspectable(plan: DlpPlan, headers: Sequence[tuple[str, str]]) -> None:
    """An upload DLP must inspect has to be a body it can read: refuse (415) otherwise,
    before anything is forwarded."""
    if plan.direction != "request":
        return
    ctypes: list[str] = []
    encoding = ""
    for name, value in headers:
        lname = name.lower()
        if lname == "content-type":
            ctypes.append(value)
        elif lname == "content-encoding":
            # every coding listed, in any header: all must be identity
            codings = [c.strip().lower() for c in value.split(",")]
            encoding = next((c for c in codings if c not in ("", "identity")), encoding)
    if len(ctypes) > 1:
        # The upstream might frame the body by another one than the one inspected.
        reason = "more than one Content-Type header: the upload's framing is ambiguous"
        raise _Refused(Refusal(400, "bad_request", reason), reason)
    ctype = ctypes[0] if ctypes else ""
    if encoding not in ("", "identity"):
        reason = (
            f"uploads are inspected for PHI and a {encoding!r}-encoded body cannot be; "
            "send it without Content-Encoding"
        )
        raise _Refused(Refusal(415, "unsupported_media_type", reason), reason)
    if ctype.split(";", 1)[0].strip().lower() not in _STOW_TYPES:
        reason = (
            "uploads to this destination are inspected for PHI: send STOW-RS as "
            'multipart/related; type="application/dicom" (or application/dicom+json)'
        )
        raise _Refused(Refusal(415, "unsupported_media_type", reason), reason)


def _denial(step_up: bool, reasons: Sequence[str]) -> Refusal:
    message = "; ".join(reasons) or "denied by policy"
    if step_up:
        challenge = (
            'Bearer realm="casb", error="insufficient_user_authentication", '
            'error_description="multi-factor authentication required"'
        )
        return Refusal(401, "mfa_required", message, (("WWW-Authenticate", challenge),))
    return Refusal(403, "forbidden", message)


def _trace_id(headers: Sequence[tuple[str, str]]) -> str | None:
    for name, value in headers:
        if name.lower() == "traceparent":
            m = _TRACEPARENT.match(value.strip())
            if m and m.group(1) != "0" * 32:
                return m.group(1)
    return None
