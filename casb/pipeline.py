"""The request pipeline: the only place that knows the order of the deciders.

    normalise URL -> identity (JWT) -> revocation -> route to destination -> classify
    -> policy -> encryption / DLP checks -> rate limits
    -> Forward (rewritten to what was classified) or Refusal; then one audit record.

Revocation and rate limits ask the shared state store (casb.state): when it cannot
answer, the request is refused (503 state_unavailable) unless `state.degraded_mode` is
`cached`, where this replica's last answers are used and the audit record carries the
warning "degraded_state".

Fail closed: every refusal, and any exception raised by a check, ends in a Refusal with
a clear code and an audit record. Nothing here imports mitmproxy: the edge adapts flows
to IncomingRequest and outcomes to responses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

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
from casb.classify.objectstore import SAS_KEYS, classify_azure, classify_gcs, classify_s3
from casb.config import Settings
from casb.context import Action, Principal, RequestFacts, Resource
from casb.dlp.object_upload import object_upload_refusal
from casb.dlp.plan import DlpInspectors, DlpPlan
from casb.encryption.at_rest import check_at_rest
from casb.encryption.envelope_ops import envelope_op
from casb.encryption.transport import check_transport
from casb.exchange import EnvelopeSpec, Forward, IncomingRequest, Refusal, Transaction
from casb.identity import (
    AuthenticationError,
    IdentityUnavailable,
    TokenVerifier,
    extract_token,
    strip_query_token,
)
from casb.identity.revocation import REVOKED_CHALLENGE, RevocationChecker
from casb.objectstore.acl import public_access_refusal
from casb.objectstore.sigv4 import canonical_query, uri_encode
from casb.policy import CompiledPolicy
from casb.policy.decision import Decision
from casb.policy.loader import DLP_OBLIGATIONS
from casb.ratelimit import Admission, RateLimiter
from casb.routing import Route, Router
from casb.state.store import StateUnavailable
from casb.telemetry import Telemetry, client_trace_id

if TYPE_CHECKING:
    from casb.dlp.inspector import Inspector

log = logging.getLogger("casb")
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
# Audit warning: a revocation or rate-limit answer came from this replica's cache because
# the state store could not answer (state.degraded_mode: cached).
DEGRADED_STATE = "degraded_state"
_ERROR_STYLES = {"s3": "s3", "azure_blob": "azure", "gcs": "gcs"}


_URL_CREDENTIALS = frozenset({"awsaccesskeyid", "signature", "expires", "googleaccessid"})


def _is_url_credential(name: str) -> bool:
    lname = name.lower()
    return lname.startswith(("x-amz-", "x-goog-")) or lname in _URL_CREDENTIALS


def _s3_token_headers(headers: Sequence[tuple[str, str]]) -> Sequence[tuple[str, str]]:
    """S3 SDKs sign with AWS SigV4 in Authorization; casb's token rides in the session
    token (X-Amz-Security-Token), which every SDK sets from its credentials without code.
    Read it as the bearer token then. The SigV4 signature is not a casb credential and
    is never forwarded (the proxy signs with its own key)."""
    auth = [v for n, v in headers if n.lower() == "authorization"]
    if not (len(auth) == 1 and auth[0].startswith("AWS4-HMAC-SHA256 ")):
        return headers
    tokens = [v for n, v in headers if n.lower() == "x-amz-security-token"]
    rest = [
        (n, v) for n, v in headers if n.lower() not in ("authorization", "x-amz-security-token")
    ]
    return [*rest, *(("Authorization", f"Bearer {t}") for t in tokens)]


def _object_target(segments: Sequence[str], query: Sequence[tuple[str, str]]) -> str:
    """Object stores: every byte but the unreserved ones percent-encoded (the form S3
    signs; a "/" inside one segment, a GCS JSON object name, becomes %2F)."""
    path = "/" + "/".join(uri_encode(seg) for seg in segments)
    return f"{path}?{canonical_query(query)}" if query else path


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
        envelopes: dict[str, EnvelopeSpec] | None = None,
        telemetry: Telemetry | None = None,
        revocation: RevocationChecker | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.verifier = verifier
        # Store-backed checks (casb.state); None: not checked (tools that only decide).
        self.revocation = revocation
        self.rate_limiter = rate_limiter
        self._charges: set[asyncio.Task[None]] = set()  # byte charges in flight
        self.telemetry = telemetry or Telemetry()  # no exporters: every call a no-op
        self._pending_events: list[tuple[str, dict[str, Any]]] = []  # audit_event()
        # Called after each audit record is written (the syslog forwarder's notify).
        self.audit_written: Callable[[], None] | None = None
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
        self._envelopes = envelopes or {}  # destination name -> its keyring and format
        self._plaintext_ports = frozenset(
            lst.port for lst in settings.listeners if lst.allow_plaintext
        )

    def listener_plaintext_ok(self, port: int) -> bool:
        """Does the listener on this local port take uploads over plaintext?"""
        return port in self._plaintext_ports

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
        # tracing: our trace id (the client's, continued); the scheme of the client's leg
        self.telemetry.begin(tx, req.headers, "https" if req.client_tls else "http")
        if tx.trace_id is None:  # not tracing: the audit record keeps the client's
            tx.trace_id = client_trace_id(req.headers)
        await run_checks(tx, self._decide(req, tx))
        outcome = tx.outcome
        if isinstance(outcome, Forward) and outcome.dlp is not None and tx.trace is not None:
            name = "casb.dlp" if outcome.dlp.direction == "request" else "casb.dlp.response"
            telemetry = self.telemetry

            def wrap(inspector: Inspector) -> Inspector:
                return telemetry.traced_inspector(tx, inspector, name)

            tx.outcome = dataclasses.replace(
                outcome, dlp=dataclasses.replace(outcome.dlp, wrap=wrap)
            )
        return tx

    async def _decide(self, req: IncomingRequest, tx: Transaction) -> Forward | Refusal:
        if self.audit is not None and not self.audit.healthy:
            # The last record could not be written: forward nothing until one can be.
            reason = "the audit log cannot be written; request refused"
            raise _Refused(Refusal(503, "audit_unavailable", reason), reason)
        try:
            target, tx.method = self.parse(req.method, req.target, req.headers)
        except _Refused:
            tx.error_style = self._error_style(req, ())
            raise
        tx.error_style = self._error_style(req, target.segments)
        with self.telemetry.step(tx, "casb.identity"):
            tx.principal = await self._authenticate(req, target.query)
        if self.revocation is not None:
            with self.telemetry.step(tx, "casb.revocation"):
                await self._check_revocation(tx, self.revocation)
        outcome = self.authorize(
            tx,
            target,
            mode=req.mode,
            scheme=req.scheme,
            host=req.host,
            port=req.port,
            headers=req.headers,
            host_header=req.host_header,
        )
        if not isinstance(outcome, Forward):
            return outcome
        with self.telemetry.step(tx, "casb.encryption"):
            outcome = self._check_encryption(tx, outcome, req, target.query)
        if outcome.dlp is not None and outcome.kind == "dicomweb":
            _check_inspectable(outcome.dlp, req.headers)
        if self.rate_limiter is not None:
            # last: only requests that would be forwarded are counted
            with self.telemetry.step(tx, "casb.ratelimit"):
                await self._check_rate(tx, self.rate_limiter)
        return outcome

    async def _check_revocation(self, tx: Transaction, checker: RevocationChecker) -> None:
        """401 token_revoked for a revoked token; 503 when the store cannot say."""
        assert tx.principal is not None
        try:
            check = await checker.check(tx.principal)
        except StateUnavailable:
            _state_unavailable("token revocations")
        if check.degraded:
            _warn(tx, DEGRADED_STATE)
        if check.revoked:
            refusal = Refusal(
                401,
                "token_revoked",
                "the token was revoked",
                (("WWW-Authenticate", REVOKED_CHALLENGE),),
            )
            raise _Refused(refusal, check.reason)

    async def _check_rate(self, tx: Transaction, limiter: RateLimiter) -> None:
        """429 rate_limited (with Retry-After) when a limit is spent; 503 when the store
        cannot count."""
        assert tx.principal is not None and tx.action is not None and tx.resource is not None
        try:
            admission = await limiter.admit(tx.principal, tx.action, tx.resource.destination)
        except StateUnavailable:
            _state_unavailable("rate limits")
        if admission.degraded:
            _warn(tx, DEGRADED_STATE)
        if not admission.allowed:
            refusal = Refusal(
                429,
                "rate_limited",
                admission.reason,
                (("Retry-After", str(admission.retry_after)),),
            )
            raise _Refused(refusal, admission.reason)
        tx.admission = admission

    def _error_style(self, req: IncomingRequest, segments: tuple[str, ...]) -> str:
        """Object-store SDKs surface errors only in their own format: find the
        destination (without deciding anything) to answer in it."""
        found = (
            self.router.reverse(segments)
            if req.mode == "reverse"
            else self.router.forward(req.scheme, req.host, req.port, segments)
        )
        if found is None:
            return "json"
        route, rest = found
        if route.kind == "gcs" and rest[:1] not in (("storage",), ("upload",), ("download",)):
            return "s3"  # the GCS XML API answers errors as S3 does
        return _ERROR_STYLES.get(route.kind, "json")

    def _check_encryption(
        self,
        tx: Transaction,
        fwd: Forward,
        req: IncomingRequest,
        query: Sequence[tuple[str, str]],
    ) -> Forward:
        """Encryption in transit (every kind) and at rest (object stores). The Forward
        comes back with the envelope work the edge does, if any."""
        assert tx.resource is not None and tx.action is not None
        found = self.router.by_name(tx.resource.destination)
        dest = found.destination
        verdict = check_transport(
            store=tx.action == Action.STORE,
            client_tls=req.client_tls,
            listener_plaintext_ok=req.plaintext_ok,
            upstream_scheme=fwd.scheme,
            destination=tx.resource.destination,
            destination_plaintext_ok=dest.allow_plaintext,
        )
        if verdict.refusal is not None:
            raise _Refused(Refusal(403, "insecure_transport", verdict.refusal), verdict.refusal)
        if verdict.warning is not None:
            tx.warnings.append(verdict.warning)
        if fwd.kind == "dicomweb":
            return fwd
        if tx.action == Action.STORE:
            exposed = public_access_refusal(fwd.kind, req.headers)
            if exposed is not None:
                raise _Refused(Refusal(403, "forbidden", exposed), exposed)
        if fwd.envelope is not None:
            resource = tx.resource
            op = envelope_op(
                fwd.kind,
                fwd.operation,
                method=req.method.upper(),
                headers=req.headers,
                copy_in_destination=resource.copy_source is not None
                and (resource.copy_source[0] == resource.bucket),
            )
            if isinstance(op, str):
                raise _Refused(Refusal(501, "envelope_unsupported", op), op)
            # the proxy encrypts: the store holds only ciphertext
            return dataclasses.replace(fwd, envelope_op=op)
        if tx.action == Action.STORE:
            problem = check_at_rest(fwd.kind, fwd.operation, req.headers, query, dest.at_rest)
            if problem is not None:
                raise _Refused(Refusal(403, "encryption_required", problem), problem)
        return fwd

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
        headers: Sequence[tuple[str, str]] = (),
        host_header: str = "",
    ) -> Forward | Refusal:
        """Route, classify and decide for tx.principal. Pure apart from reading config."""
        assert tx.principal is not None
        with self.telemetry.step(tx, "casb.classify"):
            found = (
                self.router.reverse(target.segments)
                if mode == "reverse"
                else self.router.forward(scheme, host, port, target.segments)
            )
            if found is None:
                reason = "no destination is configured for this URL"
                raise _Refused(Refusal(403, "unknown_destination", reason), reason)
            route, rest = found

            host_bucket = route.host_bucket(host_header if mode == "reverse" else host)
            classification = self._classify(
                route, tx.method, rest, target.query, headers, host_bucket
            )
            tx.action, tx.resource = classification.action, classification.resource
        policy = self.policy  # once: a hot reload between two decisions cannot mix them
        tx.policy_version = policy.version  # the version audited is the one that decided
        with self.telemetry.step(tx, "casb.policy"):
            facts = RequestFacts(time=tx.time, method=tx.method, client_ip=tx.client_ip)
            decision = policy.decide(
                tx.principal, classification.action, classification.resource, facts
            )
            tx.decision = decision
            if not decision.allow:
                return _denial(decision.step_up, decision.reasons)
            source = classification.resource.copy_source
            if source is not None:
                # A copy reads its source with the proxy's credentials: the caller must be
                # allowed to retrieve it, or a copy would launder a read.
                src = Resource(
                    destination=route.name,
                    route="/{bucket}/{key}",
                    bucket=source[0],
                    key=source[1],
                    operation="CopySource",
                )
                src_decision = policy.decide(tx.principal, Action.RETRIEVE, src, facts)
                if not src_decision.allow:
                    reasons = [f"copy source: {r}" for r in src_decision.reasons]
                    return _denial(src_decision.step_up, reasons or ["copy source: denied"])
        missing = sorted(set(decision.obligations) - ENFORCEABLE_OBLIGATIONS)
        if missing:
            # The policy allows only on a condition this proxy cannot meet: refuse rather
            # than forward the request unprotected.
            reason = (
                f"the policy requires obligation(s) {', '.join(missing)}, which this "
                "proxy cannot enforce; refused rather than forwarded unprotected"
            )
            raise _Refused(Refusal(403, "unenforceable_obligation", reason), reason)
        return self._forward(
            route,
            classification.forward_path or rest,
            target.query,
            self._dlp_plan(route.kind, classification, decision),
            classification,
        )

    def _dlp_plan(
        self, kind: str, classification: Classification, decision: Decision
    ) -> DlpPlan | None:
        """`dlp` inspects uploads; `mask` de-identifies what reads return."""
        action = classification.action
        upload = decision.obligations.get("dlp")
        if upload is not None and action == Action.STORE:
            if kind != "dicomweb":
                refusal = object_upload_refusal(kind, classification.resource.operation)
                if refusal is not None:
                    raise _Refused(Refusal(415, "unsupported_media_type", refusal), refusal)
            return DlpPlan("request", str(upload), self.inspectors())
        mask = decision.obligations.get("mask")
        if mask is None or action not in _MASKED_ACTIONS:
            return None
        if kind != "dicomweb":
            reason = (
                f"the policy requires masking (profile '{mask}'), which applies to DICOMweb "
                "responses; object-store reads cannot be de-identified: refused"
            )
            raise _Refused(Refusal(403, "unenforceable_obligation", reason), reason)
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
                _s3_token_headers(req.headers),
                query,
                allow_query=self._allow_query_token,
                max_bytes=self._max_token,
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
        route: Route,
        method: str,
        rest: tuple[str, ...],
        query: tuple[tuple[str, str], ...],
        headers: Sequence[tuple[str, str]] = (),
        host_bucket: str | None = None,
    ) -> Classification:
        kind = route.kind
        if kind == "s3":
            return classify_s3(method, rest, query, headers, route.name, host_bucket)
        if kind == "gcs":
            return classify_gcs(method, rest, query, headers, route.name)
        if kind == "azure_blob":
            # a Copy Blob source must lie under the same storage account
            return classify_azure(
                method, rest, query, headers, route.name, account_urls=(route.destination.upstream,)
            )
        return classify_dicomweb(method, rest, query, route.name)

    def _forward(
        self,
        route: Route,
        rest: tuple[str, ...],
        query: tuple[tuple[str, str], ...],
        dlp: DlpPlan | None = None,
        classification: Classification | None = None,
    ) -> Forward:
        query = strip_query_token(query)
        if route.kind in ("s3", "gcs"):
            # a client's presigned / signed-URL credentials never reach the store: the
            # proxy authenticates with its own
            query = tuple((n, v) for n, v in query if not _is_url_credential(n))
        elif route.kind == "azure_blob":
            # the client's SAS, if any, is replaced by the proxy's
            query = (*((n, v) for n, v in query if n.lower() not in SAS_KEYS), *route.sas)
        segments = (*route.base, *rest)
        target = (
            encode_target(segments, query)
            if route.kind == "dicomweb"
            else _object_target(segments, query)
        )
        return Forward(
            scheme=route.scheme,
            host=route.host,
            port=route.port,
            target=target,
            set_headers=route.set_headers,
            remove_headers=route.remove_headers,
            dlp=dlp,
            kind=route.kind,
            operation=classification.resource.operation if classification else "",
            aws=route.aws,
            envelope=self._envelopes.get(route.name),
        )

    def refuse_connect(self, method: str, client_ip: str) -> Transaction:
        """Forward mode: a CONNECT to a host that no destination names."""
        tx = new_transaction(method, client_ip)
        self.telemetry.begin(tx, (), "http")  # a CONNECT request itself is plaintext
        reason = "no destination is configured for this host"
        tx.outcome, tx.reasons = Refusal(403, "unknown_destination", reason), (reason,)
        return tx

    def audit_event(self, kind: str, fields: dict[str, Any]) -> None:
        """An audit record that is not a request (e.g. a policy change). If it cannot be
        written now it is kept and written before the next request's record: the log is
        unhealthy meanwhile, so requests are refused, and nothing is lost."""
        self._pending_events.append((kind, fields))
        try:
            self._write_pending_events()
        except AuditError as exc:
            # a warning: an error at start-up would make mitmdump exit; requests are
            # refused (503 audit_unavailable) and /readyz fails until a write succeeds
            log.warning("audit record %s not written yet: %s", kind, exc)

    def _write_pending_events(self) -> None:
        if self.audit is None:
            raise AuditError("this pipeline was built without an audit log")
        while self._pending_events:
            kind, fields = self._pending_events[0]
            self.audit.append_event(kind, fields)
            self._pending_events.pop(0)
            self.telemetry.audit_record(kind)
            if self.audit_written is not None:
                self.audit_written()

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
        self._charge_bytes(tx.admission, bytes_in + bytes_out)
        record = build_record(
            tx,
            status=status,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            error=error,
            policy_version=tx.policy_version or self.policy.version,
        )
        try:
            self._write_pending_events()
            self.audit.append(record)
        except AuditError:
            self.telemetry.finished(tx, record, audited=False)
            raise
        self.telemetry.finished(tx, record, audited=True)
        if self.audit_written is not None:
            self.audit_written()

    def _charge_bytes(self, admission: Admission | None, nbytes: int) -> None:
        """Charge a finished request's bytes to its byte limits, in the background:
        finish() is synchronous and must neither wait for the store nor fail over it
        (RateLimiter.charge_bytes queues what the store does not take)."""
        limiter = self.rate_limiter
        if limiter is None or admission is None or not admission.byte_counters or nbytes <= 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous tool): nothing to charge with
            log.warning("rate-limit byte charge skipped: no running event loop")
            return
        task = loop.create_task(limiter.charge_bytes(admission, nbytes))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def drain_charges(self) -> None:
        """Wait for the byte charges in flight (shutdown, tests)."""
        while self._charges:
            await asyncio.gather(*list(self._charges), return_exceptions=True)


def _warn(tx: Transaction, warning: str) -> None:
    if warning not in tx.warnings:
        tx.warnings.append(warning)


def _state_unavailable(what: str) -> NoReturn:
    reason = f"the shared state store cannot be reached to check {what}; request refused"
    refusal = Refusal(503, "state_unavailable", reason, (("Retry-After", "1"),))
    raise _Refused(refusal, reason) from None


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
