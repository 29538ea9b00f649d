"""Settings: one pydantic-settings class, read from a YAML file with CASB_* env overrides.

`load_settings(path)` is the only entry point. Precedence, highest first:
``CASB_*`` environment variables (nested with ``__``, e.g. ``CASB_AUDIT__PATH``), then
the YAML file, then the defaults below. Relative paths in the file are resolved against
the file's directory. Without a file, the embedded dev defaults (``casb/defaults/dev.yaml``)
are used: they are what ``make run`` starts with.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from casb.context import Action

DEFAULT_CONFIG_NAME = "casb.yaml"
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


class ConfigError(Exception):
    """A configuration problem, phrased for the operator: names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class ListenerTls(_Model):
    """The certificate the listener presents to clients (reverse mode). PEM files; the
    certificate file may hold the chain after the leaf."""

    cert_file: Path
    key_file: Path


class Listener(_Model):
    """One proxy listener. `reverse`: clients use the proxy as their DICOMweb base URL
    (``https://proxy:8080/<route>/``) or S3/GCS/Azure endpoint. `forward`: clients use it
    as an HTTP(S) proxy and trust its CA (``<state_dir>/mitmproxy``).

    Every listener accepts TLS; reverse listeners present `tls` (else a certificate the
    proxy's CA signs). Uploads (`store`) that arrive over plaintext HTTP are refused
    unless `allow_plaintext` is set, which only a loopback listener may set (dev rigs,
    or a TLS-terminating sidecar on the same host)."""

    mode: Literal["reverse", "forward"] = "reverse"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls: ListenerTls | None = None
    allow_plaintext: bool = False

    @model_validator(mode="after")
    def _check(self) -> Listener:
        if self.allow_plaintext and self.host not in _LOOPBACK_HOSTS:
            raise ValueError(
                "allow_plaintext is only for loopback listeners (127.0.0.1, ::1, "
                f"localhost), not {self.host!r}: uploads must arrive over TLS"
            )
        if self.tls is not None and self.mode == "forward":
            raise ValueError(
                "tls: forward listeners present certificates signed by the proxy's CA "
                "(<state_dir>/mitmproxy); set tls on reverse listeners only"
            )
        return self


class UpstreamAuth(_Model):
    """What credential the proxy presents upstream.

    strip (default): the client's token is removed and nothing is sent.
    passthrough: the client's Authorization header is forwarded unchanged.
    basic / bearer: the client's token is replaced by this credential; secrets come from
    a file or an environment variable, never from the YAML itself.
    """

    type: Literal["strip", "passthrough", "basic", "bearer", "aws_sigv4", "azure_sas"] = "strip"
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    token_file: Path | None = None
    token_env: str | None = None
    # aws_sigv4: every request is signed (AWS Signature Version 4) with these credentials;
    # the client's own signature is dropped. The secret key comes from a file or env.
    access_key_id: str | None = None
    secret_access_key_file: Path | None = None
    secret_access_key_env: str | None = None
    region: str = "us-east-1"
    # azure_sas: this shared access signature (query string) is added to every request.
    sas_file: Path | None = None
    sas_env: str | None = None

    @model_validator(mode="after")
    def _check_secret_source(self) -> UpstreamAuth:
        if self.type == "basic":
            if not self.username:
                raise ValueError("basic upstream auth needs 'username'")
            if (self.password_file is None) == (self.password_env is None):
                raise ValueError(
                    "basic upstream auth needs exactly one of 'password_file' or 'password_env'"
                )
        if self.type == "bearer" and (self.token_file is None) == (self.token_env is None):
            raise ValueError(
                "bearer upstream auth needs exactly one of 'token_file' or 'token_env'"
            )
        if self.type == "aws_sigv4":
            if not self.access_key_id:
                raise ValueError("aws_sigv4 upstream auth needs 'access_key_id'")
            if (self.secret_access_key_file is None) == (self.secret_access_key_env is None):
                raise ValueError(
                    "aws_sigv4 upstream auth needs exactly one of 'secret_access_key_file' "
                    "or 'secret_access_key_env'"
                )
        if self.type == "azure_sas" and (self.sas_file is None) == (self.sas_env is None):
            raise ValueError("azure_sas upstream auth needs exactly one of 'sas_file' or 'sas_env'")
        return self


class UpstreamTls(_Model):
    """How the proxy checks the upstream's certificate (https upstreams; TLS 1.2 or
    newer always). Without `ca_bundle`, the system's trusted CAs (certifi) are used."""

    ca_bundle: Path | None = None  # PEM: the only CAs trusted for this destination
    client_cert_file: Path | None = None  # mTLS: PEM certificate (chain) ...
    client_key_file: Path | None = None  # ... and its private key

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTls:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("set both client_cert_file and client_key_file, or neither")
        return self


S3Sse = Literal["aws:kms", "aws:kms:dsse", "AES256"]


class AtRest(_Model):
    """Object stores: what an upload must carry so that the store encrypts the object at
    rest. Checked on every request that creates object data (PutObject, CopyObject,
    CreateMultipartUpload, UploadPart with SSE-C, browser POST; GCS uploads; Azure Put
    Blob / Put Block / Put Block List). Satisfied by envelope encryption, by
    `default_encryption_verified`, or by the headers below."""

    required: bool = True
    # S3 x-amz-server-side-encryption values accepted.
    s3_sse: list[S3Sse] = ["aws:kms", "aws:kms:dsse", "AES256"]
    # S3 SSE-KMS key ids / GCS kmsKeyName values accepted; empty: any key (for S3 also
    # none, i.e. the account's AWS managed key).
    kms_keys: list[str] = []
    # Customer-provided keys: S3 SSE-C, GCS CSEK, Azure CPK headers.
    customer_keys: bool = True
    # Azure x-ms-encryption-scope values accepted; empty: any.
    encryption_scopes: list[str] = []
    # The operator has verified that the bucket encrypts by default (e.g. S3 default
    # encryption with a bucket policy denying other writes): no headers are required.
    default_encryption_verified: bool = False


class Envelope(_Model):
    """Proxy-side envelope encryption (AES-256-GCM, fresh data key per object, wrapped by
    the keyring's primary key-encryption key). Objects are stored as ciphertext and
    decrypted for authorized readers."""

    keyring_file: Path  # see casb.encryption.keyring: {primary: ID, keys: {ID: base64}}
    chunk_bytes: int = Field(1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    # Objects up to this size are decrypted whole before a byte is sent, so a tampered
    # object yields a clean error; larger ones stream chunk by chunk (only authenticated
    # plaintext is released; a bad chunk cuts the connection).
    verify_whole_bytes: int = Field(64 * 1024 * 1024, ge=0)


class Destination(_Model):
    """A named upstream the proxy may forward to. Nothing else is reachable through it."""

    kind: Literal["dicomweb", "s3", "gcs", "azure_blob"] = "dicomweb"
    upstream: str  # base URL, e.g. https://pacs.example.org/dicom-web
    route: str | None = None  # reverse-mode path prefix on the proxy; default "/<name>"
    upstream_auth: UpstreamAuth = UpstreamAuth()
    description: str = ""
    # S3 virtual-hosted style: requests to <bucket>.<virtual_host> (reverse mode: the
    # Host header clients send) name the bucket in the host instead of the path.
    virtual_host: str | None = None
    tls: UpstreamTls = UpstreamTls()
    # An http:// upstream refuses uploads unless this is set (loopback test rigs); every
    # upload it lets through is audited with a warning.
    allow_plaintext: bool = False
    at_rest: AtRest = AtRest()
    envelope: Envelope | None = None

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry a query, fragment or credentials")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _check_kind(self) -> Destination:
        store = self.kind != "dicomweb"
        if self.envelope is not None and not store:
            raise ValueError("envelope: only object-store destinations (s3, gcs, azure_blob)")
        if self.virtual_host is not None and self.kind != "s3":
            raise ValueError("virtual_host: only for s3 destinations")
        auth = self.upstream_auth.type
        if auth == "aws_sigv4" and self.kind != "s3":
            raise ValueError("upstream_auth aws_sigv4: only for s3 destinations")
        if auth == "azure_sas" and self.kind != "azure_blob":
            raise ValueError("upstream_auth azure_sas: only for azure_blob destinations")
        return self

    @field_validator("virtual_host")
    @classmethod
    def _check_virtual_host(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.lower().rstrip(".")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", v) or ".." in v:
            raise ValueError("must be a host name such as s3.eu-west-1.amazonaws.com")
        return v

    @field_validator("route")
    @classmethod
    def _check_route(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = "/" + v.strip("/")
        if v == "/" or "//" in v or any(seg in (".", "..") for seg in v.split("/")):
            raise ValueError("must be a non-root path prefix such as /pacs")
        return v


class MfaSettings(_Model):
    """A principal has MFA when its token's `amr` holds any of `amr_values`, or its
    `acr` is one of `acr_values`."""

    amr_values: list[str] = ["mfa", "otp", "hwk", "swk", "sc", "fpt", "face", "pin"]
    acr_values: list[str] = []


class IdentitySettings(_Model):
    issuer: str
    audience: list[str] = Field(min_length=1)
    jwks_url: str | None = None
    jwks_file: Path | None = None
    algorithms: list[str] = ["RS256", "PS256", "ES256", "EdDSA"]
    leeway_seconds: int = Field(30, ge=0, le=600)
    required_claims: list[str] = ["exp", "iat", "sub"]
    roles_claim: str = "roles"  # dotted path: "realm_access.roles" for Keycloak, "groups"
    mfa: MfaSettings = MfaSettings()
    jwks_refresh_seconds: float = Field(300, gt=0)
    jwks_min_refetch_seconds: float = Field(10, ge=0)  # rate limit for unknown-kid refetch
    jwks_timeout_seconds: float = Field(5, gt=0)
    allow_query_token: bool = False  # `access_token` query parameter (OHIF frames)
    max_token_bytes: int = Field(8192, ge=256)
    token_cache_size: int = Field(10000, ge=0)
    # Tokens living longer than this (exp - iat) are refused, and so are tokens without
    # exp: a revocation (`casb token revoke`) lasts this long, so it outlives every token
    # it covers. None accepts any lifetime (then give revocations --expires).
    max_token_lifetime_seconds: int | None = Field(86400, ge=60)

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(
                f"only asymmetric algorithms are allowed "
                f"({', '.join(ASYMMETRIC_ALGORITHMS)}); refused: {', '.join(bad)}"
            )
        if not v:
            raise ValueError("at least one algorithm is needed")
        return v

    @field_validator("jwks_url")
    @classmethod
    def _check_jwks_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> IdentitySettings:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of 'jwks_url' or 'jwks_file'")
        return self


class PolicySettings(_Model):
    paths: list[Path] = [Path("policies/hospital.yaml")]


class CheckpointSettings(_Model):
    # Ed25519 private key (PKCS#8 PEM) that signs audit checkpoints. Production needs one
    # (`casb audit keygen` writes a pair); dev generates one under state_dir.
    signing_key_file: Path | None = None
    # A signed checkpoint is appended after this many records, or this many seconds
    # after the first record it does not cover yet, whichever comes first; and at shutdown.
    every_records: int = Field(1000, ge=1, le=1_000_000)
    every_seconds: float = Field(60.0, gt=0, le=86400)


class SyslogSink(_Model):
    """A live copy of the audit trail to a syslog collector (RFC 5424 over TCP or TLS,
    octet-counted framing per RFC 6587). The local audit log is the spool: what the
    collector has not taken is sent again, in order, when it is back."""

    host: str
    port: int = Field(6514, ge=1, le=65535)
    transport: Literal["tls", "tcp"] = "tls"
    format: Literal["atna", "jsonl"] = "atna"
    ca_bundle: Path | None = None  # TLS: the CAs the collector's certificate must chain to
    client_cert_file: Path | None = None  # TLS: mutual authentication
    client_key_file: Path | None = None
    # Where delivery progress is kept (default: the audit log's path + ".syslog-cursor").
    cursor_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> SyslogSink:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("set both client_cert_file and client_key_file, or neither")
        if self.transport == "tcp" and (
            self.ca_bundle is not None or self.client_cert_file is not None
        ):
            raise ValueError("ca_bundle and client certificates need transport: tls")
        return self


class AuditSettings(_Model):
    path: Path = Path(".casb/audit.jsonl")
    # fdatasync(2) after every record: survives a power cut, costs a disk flush per
    # request. Without it a record is in the kernel (survives a proxy crash) before the
    # response completes.
    fsync: bool = False
    # Names this proxy in exported and syslog audit messages (ATNA AuditSourceID).
    source_id: str = Field("casb", pattern=r"^[\x21-\x7e]{1,64}$")
    checkpoints: CheckpointSettings = CheckpointSettings()
    syslog: SyslogSink | None = None


class TelemetrySettings(_Model):
    # Spans carry the principal as a keyed pseudonym (HMAC-SHA256 of the subject), never
    # the subject. Without a key (production) the attribute is left out; dev generates one.
    pseudonym_key_file: Path | None = None
    pseudonym_key_env: str | None = None


class AdminSettings(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    roles: list[str] = ["admin"]  # token roles allowed to use the admin API (not /healthz)


class StateTls(_Model):
    """rediss:// (and TLS to Sentinels): the CAs the server certificate must chain to,
    and a client certificate when the server asks for one."""

    ca_bundle: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> StateTls:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("set both client_cert_file and client_key_file, or neither")
        return self


class AuditStreamSettings(_Model):
    enabled: bool = True  # with a Redis state store: audit records also go to a stream
    name: str = Field("audit", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    max_len: int = Field(1_000_000, ge=1000)  # approximate (XADD MAXLEN ~)


class StateSettings(_Model):
    """Shared state across replicas: policy versions, revocations, rate-limit counters,
    the audit stream. memory:// (default) is this process only; redis://, rediss:// or
    redis+sentinel:// share it."""

    url: str = "memory://"
    # The password, when it is not in the URL (never write it in the YAML).
    password_file: Path | None = None
    password_env: str | None = None
    tls: StateTls = StateTls()
    prefix: str = Field("casb", pattern=r"^[A-Za-z0-9_.-]{1,32}$")  # key namespace
    # Names this replica (audit stream cursor, health); default: the host name (the pod).
    replica_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    # What revocation and rate-limit checks do when the store cannot answer:
    # fail_closed (refuse: 503 state_unavailable) or cached (use the last answers this
    # replica saw, and say so in the audit record: warning degraded_state).
    degraded_mode: Literal["fail_closed", "cached"] = "fail_closed"
    # A replica that missed a policy notification catches up by polling this often.
    # 0.5 s: a replica that missed a notification still follows within a second
    policy_poll_seconds: float = Field(0.5, gt=0, le=300)
    timeout_seconds: float = Field(0.5, gt=0, le=30)  # per store call on the request path
    audit_stream: AuditStreamSettings = AuditStreamSettings()

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = v.split("://", 1)[0].lower() if "://" in v else ""
        if scheme not in ("memory", "redis", "rediss", "redis+sentinel", "rediss+sentinel"):
            raise ValueError(
                "must be memory://, redis://, rediss://, redis+sentinel:// or rediss+sentinel://"
            )
        return v


class RateLimit(_Model):
    """At most `requests` requests and/or `bytes` body bytes (in + out) per principal per
    `window_seconds`, for the listed actions (all when empty) of the listed destinations
    (all when empty). Counted across replicas; 429 with Retry-After when spent."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    actions: list[str] = []
    destinations: list[str] = []
    roles: list[str] = []  # applies to principals holding any of these (all when empty)
    requests: int | None = Field(None, ge=1)
    bytes: int | None = Field(None, ge=1)
    window_seconds: int = Field(60, ge=1, le=86400 * 31)

    @model_validator(mode="after")
    def _check(self) -> RateLimit:
        if self.requests is None and self.bytes is None:
            raise ValueError("set requests, bytes or both")
        known = {a.value for a in Action}
        unknown = sorted(set(self.actions) - known)
        if unknown:
            raise ValueError(
                f"unknown action(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return self


class LimitSettings(_Model):
    max_url_bytes: int = Field(8192, ge=256)
    # Largest request body the proxy holds in memory (mitmproxy's body_size_limit).
    max_body_bytes: int = Field(2 * 1024**3, ge=1024)
    rate: list[RateLimit] = []  # per principal and action, across replicas


class DlpConfig(_Model):
    # Secret for the keyed hash that replaces UIDs when de-identifying: every replica must
    # share it, so a series stays a series across requests and replicas. Production needs
    # one of the two when a policy de-identifies; dev generates one under state_dir.
    uid_key_file: Path | None = None
    uid_key_env: str | None = None
    # Largest DICOM header (everything before Pixel Data) buffered per instance.
    max_header_bytes: int = Field(16 * 1024**2, ge=4096)
    # Largest QIDO-RS / WADO-RS metadata (JSON) response held in memory to be masked.
    max_json_bytes: int = Field(64 * 1024**2, ge=4096)
    # Largest object-store upload held in memory to be inspected whole (object stores
    # need the length of what they store up front, and de-identification changes it).
    max_object_bytes: int = Field(512 * 1024**2, ge=4096)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CASB_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    environment: Literal["dev", "production"] = "production"
    state_dir: Path = Path(".casb")
    listeners: list[Listener] = [Listener()]
    admin: AdminSettings = AdminSettings()
    destinations: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")], Destination
    ] = Field(min_length=1)
    identity: IdentitySettings | None = None  # dev: generated keys under state_dir
    policy: PolicySettings = PolicySettings()
    audit: AuditSettings = AuditSettings()
    state: StateSettings = StateSettings()
    limits: LimitSettings = LimitSettings()
    dlp: DlpConfig = DlpConfig()
    telemetry: TelemetrySettings = TelemetrySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed in as init kwargs).
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.environment == "production" and self.identity is None:
            raise ValueError(
                "identity: required when environment is production "
                "(dev keys are generated only in dev)"
            )
        routes: dict[str, str] = {}
        for name, dest in self.destinations.items():
            route = dest.route or f"/{name}"
            for other, other_route in routes.items():
                if _prefix_overlap(route, other_route):
                    raise ValueError(
                        f"destinations.{name}.route {route!r} overlaps "
                        f"destinations.{other}.route {other_route!r}"
                    )
            routes[name] = route
        upstream_tls: dict[tuple[str, int], tuple[str, UpstreamTls]] = {}
        for name, dest in self.destinations.items():
            parts = urlsplit(dest.upstream)
            addr = (
                (parts.hostname or "").lower(),
                parts.port or (443 if parts.scheme == "https" else 80),
            )
            seen = upstream_tls.setdefault(addr, (name, dest.tls))
            if seen[1] != dest.tls:
                raise ValueError(
                    f"destinations.{name}.tls differs from destinations.{seen[0]}.tls, "
                    "but both reach the same upstream host and port: TLS settings are per "
                    "host and port"
                )
        for limit in self.limits.rate:
            missing = sorted(set(limit.destinations) - set(self.destinations))
            if missing:
                raise ValueError(
                    f"limits.rate {limit.name!r}: unknown destination(s) {', '.join(missing)}"
                )
        names = [limit.name for limit in self.limits.rate]
        if len(names) != len(set(names)):
            raise ValueError("limits.rate: two limits share a name")
        ports = [(lst.host, lst.port) for lst in self.listeners if lst.port]
        if len(ports) != len(set(ports)):
            raise ValueError("listeners: two listeners share a host and port")
        return self

    def route_of(self, name: str) -> str:
        return self.destinations[name].route or f"/{name}"


def _prefix_overlap(a: str, b: str) -> bool:
    a_segs, b_segs = a.strip("/").split("/"), b.strip("/").split("/")
    n = min(len(a_segs), len(b_segs))
    return a_segs[:n] == b_segs[:n]


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative paths in the file relative to the file, not to the cwd."""

    def fix(section: dict[str, Any] | None, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            p = Path(section[key])
            section[key] = str(p if p.is_absolute() else base / p)

    fix(data, "state_dir")
    fix(data.get("identity"), "jwks_file")
    audit = data.get("audit")
    fix(audit, "path")
    if isinstance(audit, dict):
        fix(audit.get("checkpoints"), "signing_key_file")
        for key in ("ca_bundle", "client_cert_file", "client_key_file", "cursor_file"):
            fix(audit.get("syslog"), key)
    fix(data.get("telemetry"), "pseudonym_key_file")
    state = data.get("state")
    fix(state, "password_file")
    if isinstance(state, dict):
        for key in ("ca_bundle", "client_cert_file", "client_key_file"):
            fix(state.get("tls"), key)
    fix(data.get("dlp"), "uid_key_file")
    for lst in data.get("listeners") or []:
        if isinstance(lst, dict):
            for key in ("cert_file", "key_file"):
                fix(lst.get("tls"), key)
    pol = data.get("policy")
    if isinstance(pol, dict) and isinstance(pol.get("paths"), list):
        pol["paths"] = [
            str(p if Path(p).is_absolute() else base / p) if isinstance(p, str) else p
            for p in pol["paths"]
        ]
    for dest in (data.get("destinations") or {}).values():
        if isinstance(dest, dict):
            for key in ("password_file", "token_file", "secret_access_key_file", "sas_file"):
                fix(dest.get("upstream_auth"), key)
            for key in ("ca_bundle", "client_cert_file", "client_key_file"):
                fix(dest.get("tls"), key)
            fix(dest.get("envelope"), "keyring_file")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def describe_validation_error(
    source: str, exc: ValidationError, what: str = "configuration"
) -> str:
    lines = [f"{source}: invalid {what}"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def default_config_path() -> Path | None:
    """The config file to use when none is named: $CASB_CONFIG, else ./casb.yaml."""
    env = os.environ.get("CASB_CONFIG")
    if env:
        return Path(env)
    local = Path(DEFAULT_CONFIG_NAME)
    return local if local.exists() else None


def load_settings(path: Path | str | None = None) -> Settings:
    """Load settings from `path`, $CASB_CONFIG, ./casb.yaml, or the embedded dev defaults."""
    if path is None:
        path = default_config_path()
    if path is None:
        source = "embedded dev defaults (casb/defaults/dev.yaml)"
        text = resources.files("casb").joinpath("defaults/dev.yaml").read_text("utf-8")
        data = yaml.safe_load(text)
        _resolve_paths(data, Path.cwd())
    else:
        path = Path(path)
        source = str(path)
        data = _read_yaml(path)
        _resolve_paths(data, path.resolve().parent)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(source, exc)) from exc
