"""What the edge hands the pipeline (IncomingRequest) and what it gets back (Transaction
with an outcome: Forward or Refusal). No mitmproxy types: tests drive the pipeline with
these directly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from time import monotonic
from typing import TYPE_CHECKING, Literal

from casb.context import Action, Principal, Resource
from casb.dlp.findings import Finding
from casb.dlp.plan import DlpPlan
from casb.encryption.envelope_ops import EnvelopeOp
from casb.policy.decision import Decision
from casb.routing import AwsCredentials

if TYPE_CHECKING:
    from casb.encryption.keyring import KeyEncryptionKeys
    from casb.ratelimit import Admission
    from casb.telemetry import RequestTrace


@dataclass(frozen=True, slots=True)
class EnvelopeSpec:
    """A destination's envelope encryption, ready to use: its keyring and format knobs."""

    keys: KeyEncryptionKeys
    chunk_bytes: int
    verify_whole_bytes: int


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    method: str
    target: str  # origin-form request target as received, e.g. "/pacs/studies?x=1"
    headers: Sequence[tuple[str, str]]
    mode: Literal["reverse", "forward"] = "reverse"
    scheme: str = "http"  # forward mode: where the client aimed
    host: str = ""
    port: int = 0
    client_ip: str = ""
    host_header: str = ""  # the Host the client sent (S3 virtual-hosted buckets)
    client_tls: bool = False  # the client->proxy leg is TLS
    plaintext_ok: bool = False  # the listener takes uploads over plaintext (loopback dev)


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request upstream, rewritten to exactly what was classified."""

    scheme: str
    host: str
    port: int
    target: str  # canonical path + query
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    dlp: DlpPlan | None = None  # DLP work on the body (request) or the response
    kind: str = "dicomweb"  # the destination's kind: dicomweb | s3 | gcs | azure_blob
    operation: str = ""  # object stores: e.g. "PutObject", "GetBlob"
    aws: AwsCredentials | None = None  # sign the forwarded request (S3 SigV4)
    envelope: EnvelopeSpec | None = None  # encrypt the upload / decrypt the object
    envelope_op: EnvelopeOp | None = None  # what the edge does with it (set by the pipeline)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Answer the client ourselves; nothing reaches the upstream."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Transaction:
    """One request's journey, from decision to the audit record written at completion."""

    request_id: str
    time: datetime
    method: str
    client_ip: str
    started: float = field(default_factory=monotonic)
    trace_id: str | None = None
    principal: Principal | None = None
    action: Action | None = None
    resource: Resource | None = None
    decision: Decision | None = None
    outcome: Forward | Refusal | None = None
    reasons: tuple[str, ...] = ()  # why a refusal happened before the policy decided
    finished: bool = False
    dlp: DlpReport | None = None  # what DLP found and did, for the audit record
    # How refusals are written: "json" (casb's format), or what an object-store SDK
    # surfaces: "s3" (XML), "azure" (XML), "gcs" (JSON API errors).
    error_style: str = "json"
    warnings: list[str] = field(default_factory=list)  # audited, e.g. plaintext_upstream
    envelope: str | None = None  # audited: "encrypted" / "decrypted" / why it failed
    trace: RequestTrace | None = None  # its spans (casb.telemetry), when tracing
    policy_version: str = ""  # the policy that decided (a reload may follow before audit)
    # The rate limiter's admission: its byte counters are charged when the request ends.
    admission: Admission | None = None

    @property
    def allowed(self) -> bool:
        return isinstance(self.outcome, Forward)


@dataclass(slots=True)
class DlpReport:
    """DLP's part of the audit record: counts, findings (never values), errors."""

    profile: str
    direction: str
    instances: int = 0
    forwarded: int = 0
    blocked: int = 0
    deidentified: int = 0
    failed: int = 0  # instances DLP could not read (refused)
    not_dicom: int = 0  # object-store uploads that are not DICOM (forwarded unchanged)
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    recorded: bool = False  # a stream's outcome has been copied in
