"""The mitmproxy edge: adapts flows to the pipeline and outcomes to responses. No logic.

Loaded by `addons/casb.py` (`mitmdump -s addons/casb.py --set casb_config=casb.yaml`) and
by `casb proxy` / `casb run`. With `mitm_tls_alerts` (a fix to mitmproxy's TLS layer)
and `serve`, the only module that imports mitmproxy.

Hooks: `requestheaders` decides before any body is forwarded (a refusal is answered by
us; an allowed request is rewritten to the destination's upstream); `responseheaders`
buffers small upstream responses and streams large ones through `_AuditedStream`; the
request's single audit record is written before the response completes — by `response`
for buffered responses and our refusals, by the stream for streamed ones, by `error`
when the transfer failed. Every hook is wrapped by `_fail_closed`.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import logging
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.addons import tlsconfig
from mitmproxy.net import tls as net_tls
from mitmproxy.proxy.mode_specs import ReverseMode
from OpenSSL import SSL, crypto

from casb import mitm_tls_alerts
from casb.audit import AuditError
from casb.config import ConfigError, load_settings
from casb.dlp.enforce import (
    count_instance,
    mask_json_body,
    record_stream,
    response_kind,
    upload_answer,
    verdict_outcome,
)
from casb.dlp.findings import InstanceError
from casb.dlp.plan import DlpPlan, DlpUnavailable
from casb.encryption.envelope import EnvelopeError
from casb.encryption.envelope_ops import EnvelopeOp
from casb.encryption.object_crypto import (
    DownloadPlan,
    EnvelopeRefused,
    HeaderChanges,
    Transform,
    aws_chunked_decoder,
    decoded_body_headers,
    is_aws_chunked,
    opener_transform,
    plan_download,
    plan_upload,
    range_request,
    whole_transform,
)
from casb.exchange import DlpReport, Forward, IncomingRequest, Refusal, Transaction
from casb.objectstore.aws_chunked import AwsChunkedDecoder, AwsChunkedError
from casb.objectstore.errors import render_error
from casb.objectstore.sigv4 import REPLACED_HEADERS, SigningError, sign_s3
from casb.pipeline import new_transaction
from casb.policy import PolicyLoadError
from casb.responses import REQUEST_ID_HEADER, error_body, error_headers
from casb.runtime import Runtime
from casb.telemetry import Telemetry

log = logging.getLogger("casb")
_META = "casb"
_UPLOAD = "casb.upload"  # the MultipartDicomStream inspecting a request body
_MASKED = "casb.masked"  # the response body is JSON to be masked in `response`
_ERROR = "casb.error"  # error code of a refusal made after the request was forwarded
_OBJECT_DLP = "casb.object_dlp"  # an object-store upload read whole for DLP in `request`
_ENVELOPE_READ = "casb.envelope_read"  # (range asked, spec, head) of an envelope read
_DECRYPT_WHOLE = "casb.decrypt_whole"  # a buffered envelope object to decrypt in `response`
_GCS_METADATA = "casb.gcs_metadata"  # a GCS JSON upload whose metadata is checked in `request`
_POST_FORM = "casb.post_form"  # an S3 browser POST upload: its fields checked in `request`
_KILLED = "casb.killed"  # (status, code) when a body transform cut the flow
_REQUEST_TRANSFORM = "casb.request_transform"  # the _RequestTransform of an upload
_UNSIGNED = "UNSIGNED-PAYLOAD"
_CLIENT_PAYLOAD_HASHES = re.compile(
    r"[0-9a-f]{64}|UNSIGNED-PAYLOAD|STREAMING-UNSIGNED-PAYLOAD-TRAILER"
)


_INTERNAL = Refusal(
    500, "internal_error", "the request could not be checked, so it was not forwarded"
)

_Hook = TypeVar("_Hook", bound=Callable[..., Any])


def _fail_closed(hook: _Hook) -> _Hook:
    """mitmproxy logs an exception raised by a hook and then carries on with the flow,
    which would forward an unchecked request. Never let one escape: answer 500 while
    the flow can still be answered, else cut it."""

    def refuse(flow: http.HTTPFlow, exc: BaseException) -> None:
        tx = flow.metadata.get(_META)
        if not isinstance(tx, Transaction):
            tx = flow.metadata[_META] = new_transaction(flow.request.method, _client_ip(flow))
        log.error(
            "casb %s failed (request_id=%s): %s", hook.__name__, tx.request_id, type(exc).__name__
        )
        if flow.live and hook.__name__ in ("http_connect", "requestheaders"):
            tx.outcome, tx.reasons = _INTERNAL, (f"internal error: {type(exc).__name__}",)
            flow.response = _make_response(_INTERNAL, tx.request_id)
        else:
            flow.kill()

    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def guarded_async(self: CasbAddon, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception as exc:
                refuse(flow, exc)

        return cast(_Hook, guarded_async)

    @functools.wraps(hook)
    def guarded(self: CasbAddon, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception as exc:
            refuse(flow, exc)

    return cast(_Hook, guarded)


_BYTES_REPR = re.compile(r"""b(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


class _RedactRawBytes(logging.Filter):
    """mitmproxy's connection log echoes raw protocol bytes it could not parse (e.g.
    "Bad HTTP request line: b'GET /studies?PatientName=...'"): PHI. Redact them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "b'" in message or 'b"' in message:
            record.msg, record.args = _BYTES_REPR.sub("b'<redacted>'", message), None
        return True


_REDACT = _RedactRawBytes()


class _Transform:
    """What `_AuditedStream` runs the body through: chunks in, chunks out (b"" = end);
    `failure` says, at the end, why the body must not be completed."""

    failure: str | None = None

    def __call__(self, data: bytes) -> list[bytes]:
        return [data] if data else []


class _Swallow(_Transform):
    """Discard the upstream body and send ours instead (a refusal decided after the
    upstream answered: its headers are replaced, its body never reaches the client)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self, data: bytes) -> list[bytes]:
        return [] if data else [self.body]


class _MaskedInstances(_Transform):
    """WADO-RS instances de-identified in flight (multipart/related of application/dicom).
    Instances DLP blocks or cannot read are dropped; a broken body cuts the flow."""

    def __init__(self, stream: Any, tx: Transaction) -> None:
        self.stream, self.tx = stream, tx

    def __call__(self, data: bytes) -> list[bytes]:
        out: list[bytes] = self.stream(data)
        if not data:
            assert self.tx.dlp is not None
            record_stream(self.tx.dlp, self.stream)
            self.failure = self.stream.fatal
        return out


class _MaskedInstance(_Transform):
    """One application/dicom instance de-identified in flight. The headers are already
    sent, so an instance that must not pass cuts the flow."""

    def __init__(self, stream: Any, tx: Transaction) -> None:
        self.stream, self.tx = stream, tx

    def __call__(self, data: bytes) -> list[bytes]:
        if data:
            return list(self.stream.feed(data))
        out = list(self.stream.finish())
        report = self.tx.dlp
        assert report is not None
        verdict = self.stream.verdict
        report.findings.extend((*(verdict.findings if verdict else ()), *self.stream.findings))
        outcome = "failed" if self.stream.error is not None else verdict_outcome(verdict)
        count_instance(report, outcome, self.stream.error)
        if outcome == "failed":
            self.failure = self.stream.error
        elif outcome == "blocked":
            self.failure = "the instance is blocked by the DLP profile"
        return out


class _AuditedStream:
    """A mitmproxy response stream that counts bytes and holds back the latest chunk, so
    the audit record is written before the client has the whole body. If it cannot be
    written, the last chunk is never released and the flow is cut. An inner transform
    (DLP) rewrites the body on the way; if it fails, the flow is cut as well."""

    __slots__ = ("addon", "count", "cut", "flow", "held", "inner", "tx")

    def __init__(
        self,
        addon: CasbAddon,
        flow: http.HTTPFlow,
        tx: Transaction,
        inner: _Transform | None = None,
    ) -> None:
        self.addon, self.flow, self.tx = addon, flow, tx
        self.inner = inner
        self.count = 0
        self.held = b""
        self.cut = False

    def __call__(self, data: bytes) -> list[bytes]:
        if self.cut:
            # mitmproxy keeps delivering the upstream's body after a kill (it checks only
            # when the body ends): none of it may reach the client.
            return []
        if self.tx.finished:  # mitmproxy sent data after the end: pass it on
            if self.inner is not None:
                return []  # never unchecked bytes around a transform
            self.count += len(data)
            return [data] if data else []
        if self.inner is not None:
            try:
                chunks = self.inner(data)
            except Exception as exc:  # never let a transform forward what it did not check
                log.error(
                    "casb response transform failed (request_id=%s): %s",
                    self.tx.request_id,
                    type(exc).__name__,
                )
                self.inner.failure = f"internal error: {type(exc).__name__}"
                chunks = []
                data = b""
            if self.inner.failure is not None:  # failed now, or (at the end) overall
                self._cut(self.inner.failure)
                return []
            if data:
                return self._hold(chunks)
            self._hold(chunks)  # flushed at the end
            return self._end()
        if data:
            return self._hold([data])
        return self._end()

    def _hold(self, chunks: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for chunk in chunks:
            if not chunk:
                continue
            self.count += len(chunk)
            if self.held:
                out.append(self.held)
            self.held = chunk
        return out

    def _cut(self, reason: str) -> None:
        """The body must not be completed: audit why and cut the connection."""
        assert self.flow.response is not None
        self.held = b""
        self.cut = True
        self.addon._finish(
            self.flow,
            self.tx,
            status=502,
            bytes_out=self.count,
            streamed=True,
            error="response_blocked",
            reason=reason,
        )
        self.flow.kill()

    def _end(self) -> list[bytes]:
        # End of the body: audit, then release the last chunk.
        assert self.flow.response is not None
        if not self.addon._finish(
            self.flow,
            self.tx,
            status=self.flow.response.status_code,
            bytes_out=self.count,
            streamed=True,
        ):
            return []
        out, self.held = self.held, b""
        return [out] if out else []


class _Decrypting(_Transform):
    """An envelope object decrypted as it streams: only authenticated plaintext goes
    out; a chunk that does not authenticate cuts the flow."""

    def __init__(self, transform: Transform, tx: Transaction) -> None:
        self.transform, self.tx = transform, tx

    def __call__(self, data: bytes) -> list[bytes]:
        try:
            return self.transform(data)
        except EnvelopeError as exc:
            self.tx.envelope = f"integrity_error: {exc}"
            self.failure = str(exc)
            return []


class _RequestTransform:
    """A request body rewritten as it streams (envelope sealing, aws-chunked decoding).
    If it fails, nothing more goes upstream and the flow is cut, so the store never
    gets a complete object; the audit record says why."""

    def __init__(self, flow: http.HTTPFlow, tx: Transaction, transform: Transform) -> None:
        self.flow, self.tx, self.transform = flow, tx, transform
        self.started = False
        self.failed = False
        self.bytes_in = 0
        flow.metadata[_REQUEST_TRANSFORM] = self

    def __call__(self, data: bytes) -> list[bytes]:
        self.started = True
        self.bytes_in += len(data)
        if self.failed:
            return []
        try:
            return self.transform(data)
        except (EnvelopeError, AwsChunkedError) as exc:
            self.failed = True
            reason = f"the upload could not be encrypted or decoded: {exc}"
            self.tx.reasons = (*self.tx.reasons, reason)
            self.flow.metadata[_KILLED] = (400, "bad_request")
            self.flow.kill()
            return []


def _check_object_size(headers: list[tuple[str, str]], cap: int) -> None:
    """An upload casb reads whole (DLP, a browser POST form, GCS upload metadata) must say
    how large it is, and not exceed the cap (dlp.max_object_bytes)."""
    names = ("x-amz-decoded-content-length",) if is_aws_chunked(headers) else ("content-length",)
    values = [v.strip() for n, v in headers if n.lower() in names]
    if len(values) != 1 or not (values[0].isascii() and values[0].isdigit()):
        raise EnvelopeRefused(
            411,
            "length_required",
            "this upload is read whole before it is forwarded: declare its length",
        )
    if int(values[0]) > cap:
        raise EnvelopeRefused(
            413,
            "body_too_large",
            f"this upload is read whole before it is forwarded, up to {cap} bytes "
            "(dlp.max_object_bytes)",
        )


def _passthrough(data: bytes) -> list[bytes]:
    return [data] if data else []


def _has_body(req: http.Request) -> bool:
    length = req.headers.get("content-length", "")
    return "transfer-encoding" in req.headers or (length.isdigit() and int(length) > 0)


def _decoder_transform(decoder: AwsChunkedDecoder) -> Transform:
    def transform(data: bytes) -> list[bytes]:
        return decoder.feed(data) if data else decoder.finish()

    return transform


def _apply_changes(headers: http.Headers, changes: HeaderChanges) -> None:
    for name in changes.remove:
        headers.pop(name, None)
    for name, value in changes.set:
        headers[name] = value


def _is_body_digest(name: str) -> bool:
    lname = name.lower()
    return lname in ("content-md5", "x-amz-sdk-checksum-algorithm") or lname.startswith(
        "x-amz-checksum-"
    )


def _sign(flow: http.HTTPFlow, fwd: Forward, transformed: bool) -> None:
    """S3: sign what goes upstream with the proxy's credentials (SigV4)."""
    if fwd.aws is None:
        return
    req = flow.request
    client_hash = req.headers.get("x-amz-content-sha256", "")
    if transformed or not _CLIENT_PAYLOAD_HASHES.fullmatch(client_hash):
        payload_hash = _UNSIGNED
    else:
        payload_hash = client_hash  # the body goes upstream as the client hashed it
    for name in REPLACED_HEADERS:
        req.headers.pop(name, None)
    path, _, raw_query = req.path.partition("?")
    try:
        signed = sign_s3(
            req.method,
            req.host_header or req.host,
            path,
            parse_qsl(raw_query, keep_blank_values=True),
            list(req.headers.items(multi=True)),
            access_key_id=fwd.aws.access_key_id,
            secret_access_key=fwd.aws.secret_access_key,
            region=fwd.aws.region,
            payload_hash=payload_hash,
            now=datetime.now(UTC),
        )
    except SigningError as exc:
        raise _SignRefused(str(exc)) from None
    for name, value in signed:
        req.headers[name] = value


class _SignRefused(Exception):
    """The request cannot be signed (e.g. a non-ASCII header value)."""


def _local_port(flow: http.HTTPFlow) -> int:
    sock = flow.client_conn.sockname
    return int(sock[1]) if sock else 0


class CasbAddon:
    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self._prebuilt = runtime is not None  # `casb proxy` builds it; mitmdump -s does not
        self._started = False
        # Upstream responses up to this size are buffered (and audited before any byte
        # goes out); larger or unsized ones stream through with bounded memory.
        self._buffer_limit = 1024 * 1024
        self._certs: dict[int, tuple[Any, tuple[Any, ...], Any]] | None = None
        self._client_pems: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------
    def load(self, loader: Loader) -> None:
        logging.getLogger("mitmproxy.proxy.server").addFilter(_REDACT)
        # an upstream's fatal TLS alert must end the request (502), not hang it
        mitm_tls_alerts.install()
        loader.add_option(
            "casb_config",
            str,
            "",
            "Path to casb.yaml. Empty: $CASB_CONFIG, ./casb.yaml, else the embedded dev defaults.",
        )

    def configure(self, updated: set[str]) -> None:
        if "flow_detail" in updated and getattr(ctx.options, "flow_detail", 0) != 0:
            # mitmdump's flow log prints URLs, and QIDO URLs can carry patient names.
            log.warning("casb sets flow_detail=0: flow logs could carry patient data")
            ctx.options.update(flow_detail=0)
        if "casb_config" not in updated or self._prebuilt:
            return
        if self._started:
            raise exceptions.OptionsError("casb_config cannot change while the proxy runs")
        if self.runtime is not None:
            self.runtime.discard()
            self.runtime = None
        try:
            self.runtime = Runtime.build(load_settings(ctx.options.casb_config or None))
        except (ConfigError, PolicyLoadError, AuditError) as exc:
            raise exceptions.OptionsError(str(exc)) from exc

    async def running(self) -> None:
        if self.runtime is not None and not self._started:
            await self.runtime.start()
            self._started = True

    async def done(self) -> None:
        if self.runtime is not None and self._started:
            await self.runtime.aclose()
            self._started = False

    # -- hooks -----------------------------------------------------------------------
    @_fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Forward mode: refuse tunnels to hosts that are no destination, right away."""
        assert self.runtime is not None
        pipeline = self.runtime.pipeline
        if pipeline.router.knows_host(flow.request.host, flow.request.port):
            return
        tx = pipeline.refuse_connect(flow.request.method, _client_ip(flow))
        flow.metadata[_META] = tx
        _respond(flow, tx)

    # -- TLS --------------------------------------------------------------------------
    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        """Reverse listeners with `tls` present the operator's certificate instead of one
        the proxy's CA made up (mitmproxy's TlsConfig has built the connection first)."""
        # Hook order differs between `mitmdump -s` (scripts run before TlsConfig) and
        # `casb proxy` (after it): build the connection either way; TlsConfig leaves
        # one that is already set alone.
        if self.runtime is None or tls_start.is_dtls:
            return
        sock = tls_start.context.client.sockname
        cert = self._listener_certs().get(int(sock[1])) if sock else None
        if cert is None:
            return
        leaf, chain, key = cert
        ctx_ = net_tls.create_client_proxy_context(
            method=net_tls.Method.TLS_SERVER_METHOD,
            min_version=net_tls.Version[ctx.options.tls_version_client_min],
            max_version=net_tls.Version[ctx.options.tls_version_client_max],
            cipher_list=None,
            ecdh_curve=None,
            chain_file=None,
            alpn_select_callback=tlsconfig.alpn_select_callback,
            request_client_cert=False,
            extra_chain_certs=chain,
            dhparams=None,
        )
        conn = SSL.Connection(ctx_)
        conn.use_certificate(leaf.to_pyopenssl())
        conn.use_privatekey(crypto.PKey.from_cryptography_key(key))
        if tls_start.ssl_conn is not None:
            conn.set_app_data(tls_start.ssl_conn.get_app_data())
        else:
            conn.set_app_data(
                tlsconfig.AppData(
                    client_alpn=tls_start.context.client.alpn,
                    server_alpn=tls_start.context.server.alpn,
                    http2=ctx.options.http2,
                )
            )
        conn.set_accept_state()
        tls_start.ssl_conn = conn

    def _listener_certs(self) -> dict[int, tuple[Any, tuple[Any, ...], Any]]:
        if self._certs is None:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key
            from mitmproxy import certs

            assert self.runtime is not None
            found: dict[int, tuple[Any, tuple[Any, ...], Any]] = {}
            for lst in self.runtime.settings.listeners:
                if lst.tls is None:
                    continue
                pems = lst.tls.cert_file.read_bytes()
                chain = [
                    certs.Cert.from_pem(b"-----BEGIN CERTIFICATE-----" + part)
                    for part in pems.split(b"-----BEGIN CERTIFICATE-----")[1:]
                ]
                key = load_pem_private_key(lst.tls.key_file.read_bytes(), password=None)
                found[lst.port] = (chain[0], tuple(chain[1:]), key)
            self._certs = found
        return self._certs

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        """A destination with its own CA bundle or client certificate gets a TLS context
        of its own (TLS 1.2+, peer and host name verified), never the shared one."""
        if self.runtime is None or tls_start.is_dtls:
            return
        server: Any = tls_start.conn
        if not server.address:
            return
        route = self.runtime.pipeline.router.by_address(*server.address[:2])
        if route is None:
            return
        tls_cfg = route.destination.tls
        if tls_cfg.ca_bundle is None and tls_cfg.client_cert_file is None:
            return
        client_cert = self._client_cert_file(route.name)
        ssl_ctx = net_tls.create_proxy_server_context(
            method=net_tls.Method.TLS_CLIENT_METHOD,
            min_version=net_tls.Version[ctx.options.tls_version_server_min],
            max_version=net_tls.Version[ctx.options.tls_version_server_max],
            cipher_list=None,
            ecdh_curve=None,
            verify=net_tls.Verify.VERIFY_PEER,
            ca_path=None,
            ca_pemfile=str(tls_cfg.ca_bundle) if tls_cfg.ca_bundle else None,
            client_cert=client_cert,
            legacy_server_connect=False,
        )
        conn = SSL.Connection(ssl_ctx)
        sni = server.sni or server.address[0]
        # host name verification, as mitmproxy's TlsConfig does it
        lib: Any = getattr(SSL, "_lib")  # noqa: B009
        param = lib.SSL_get0_param(conn._ssl)
        lib.X509_VERIFY_PARAM_set_hostflags(param, tlsconfig.DEFAULT_HOSTFLAGS)
        try:
            ip = ipaddress.ip_address(sni).packed
        except ValueError:
            host_name = sni.encode("idna")
            conn.set_tlsext_host_name(host_name)
            ok = lib.X509_VERIFY_PARAM_set1_host(param, host_name, len(host_name))
        else:
            ok = lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))
        if ok != 1:
            raise RuntimeError("cannot set up host name verification")
        if server.alpn_offers:
            conn.set_alpn_protos(list(server.alpn_offers))
        conn.set_connect_state()
        tls_start.ssl_conn = conn

    def _client_cert_file(self, name: str) -> str | None:
        """mitmproxy wants the client key and certificate in one PEM file: written once
        under state_dir (0600)."""
        assert self.runtime is not None
        tls_cfg = self.runtime.settings.destinations[name].tls
        if tls_cfg.client_cert_file is None or tls_cfg.client_key_file is None:
            return None
        path = self.runtime.settings.state_dir / "tls" / f"{name}-client.pem"
        if name not in self._client_pems:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(tls_cfg.client_key_file.read_bytes().rstrip(b"\n") + b"\n")
                f.write(tls_cfg.client_cert_file.read_bytes())
            self._client_pems.add(name)
        return str(path)

    @_fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        assert self.runtime is not None
        req = flow.request
        incoming = IncomingRequest(
            method=req.method,
            target=req.path,
            headers=list(req.headers.items(multi=True)),
            mode="reverse" if isinstance(flow.client_conn.proxy_mode, ReverseMode) else "forward",
            scheme=req.scheme,
            host=req.host,
            port=req.port,
            client_ip=_client_ip(flow),
            host_header=req.host_header or "",
            client_tls=bool(flow.client_conn.tls_established),
            plaintext_ok=self.runtime.pipeline.listener_plaintext_ok(_local_port(flow)),
        )
        tx = await self.runtime.pipeline.decide(incoming)
        flow.metadata[_META] = tx
        if not isinstance(tx.outcome, Forward):
            _respond(flow, tx)
            return
        _rewrite(req, tx.outcome)
        fwd = tx.outcome
        traceparent = self.runtime.pipeline.telemetry.upstream_started(
            tx, fwd.host, fwd.port, fwd.scheme
        )
        if traceparent is not None:
            # the upstream call continues our trace (before any request signing)
            req.headers["traceparent"] = traceparent
            req.headers.pop("tracestate", None)
        if tx.outcome.kind != "dicomweb":
            self._object_request(flow, tx, tx.outcome)
        else:
            plan = tx.outcome.dlp
            if plan is not None:
                # DLP reads whole bodies as sent: ask the upstream for uncompressed,
                # complete answers (a byte range of an instance cannot be de-identified).
                for name in ("accept-encoding", "range", "if-range"):
                    req.headers.pop(name, None)
                tx.dlp = DlpReport(profile=plan.profile, direction=plan.direction)
                if plan.direction == "request":
                    self._inspect_upload(flow, tx, plan)
        if (
            flow.response is None
            and not req.stream
            and not any(k in flow.metadata for k in (_OBJECT_DLP, _POST_FORM, _GCS_METADATA))
            and _has_body(req)
        ):
            # Nothing rewrites this body: stream it through (memory stays bounded
            # whatever its size), counting its bytes for the audit record.
            req.stream = _RequestTransform(flow, tx, _passthrough)

    def _inspect_upload(self, flow: http.HTTPFlow, tx: Transaction, plan: DlpPlan) -> None:
        """Stream the upload through DLP: each instance's header is inspected before it
        is forwarded; blocked instances never reach the upstream."""
        from casb.dlp.multipart_stream import MultipartDicomStream

        req = flow.request
        try:
            stream = MultipartDicomStream(
                req.headers.get("content-type", ""),
                plan.inspector(),
                max_header_bytes=plan.max_header_bytes,
                max_json_bytes=plan.max_json_bytes,
                mode="request",
            )
        except ValueError as exc:
            _refuse(flow, tx, Refusal(400, "bad_request", str(exc)))
            return
        except DlpUnavailable as exc:
            _refuse(flow, tx, Refusal(503, "dlp_unavailable", str(exc)))
            return
        flow.metadata[_UPLOAD] = stream
        # The body changes (instances dropped or rewritten): forward it chunked.
        req.headers.pop("content-length", None)
        req.headers["transfer-encoding"] = "chunked"
        req.stream = stream

    # -- object stores ------------------------------------------------------------------
    def _object_request(self, flow: http.HTTPFlow, tx: Transaction, fwd: Forward) -> None:
        """S3 / GCS / Azure: DLP on whole-object uploads, envelope encryption, and the
        proxy's own signature. Refusals here happen before a byte goes upstream."""
        req = flow.request
        headers = list(req.headers.items(multi=True))
        for name in ("accept-encoding",):  # the stored bytes, as stored
            req.headers.pop(name, None)
        try:
            op = fwd.envelope_op  # decided by the pipeline (None: no envelope work)
            if fwd.envelope is not None and op is None:  # never forward it unsealed
                raise EnvelopeRefused(501, "envelope_unsupported", "no envelope decision")
            if fwd.operation == "PostObject":
                if fwd.aws is not None:
                    raise EnvelopeRefused(
                        501,
                        "unsupported_upload",
                        "browser POST uploads carry a policy signed with the client's "
                        "credentials, and this destination signs with the proxy's: use "
                        "PutObject",
                    )
                assert self.runtime is not None
                _check_object_size(headers, self.runtime.settings.dlp.max_object_bytes)
                flow.metadata[_POST_FORM] = True
                return  # read whole; the form's fields are checked in `request`
            if fwd.kind == "gcs" and fwd.operation in (
                "InsertObject:multipart",
                "InsertObject:resumable",
            ):
                assert self.runtime is not None
                _check_object_size(headers, self.runtime.settings.dlp.max_object_bytes)
                flow.metadata[_GCS_METADATA] = True  # read whole: its metadata is checked
            if fwd.dlp is not None and fwd.dlp.direction == "request":
                tx.dlp = DlpReport(profile=fwd.dlp.profile, direction="request")
                _check_object_size(headers, fwd.dlp.max_object_bytes)
                flow.metadata[_OBJECT_DLP] = op
                return  # read whole; inspected, encrypted and signed in `request`
            transformed = False
            if op is EnvelopeOp.ENCRYPT:
                assert fwd.envelope is not None
                upload = plan_upload(fwd.kind, headers, fwd.envelope)
                _apply_changes(req.headers, upload.changes)
                req.stream = _RequestTransform(flow, tx, upload.transform)
                tx.envelope = "encrypted"
                transformed = True
            elif op is EnvelopeOp.DECRYPT:
                assert fwd.envelope is not None
                asked, changes = range_request(fwd.kind, headers, fwd.envelope)
                _apply_changes(req.headers, changes)
                flow.metadata[_ENVELOPE_READ] = (asked, fwd.envelope, False)
            elif op is EnvelopeOp.METADATA:  # HEAD: the whole object's plaintext length
                assert fwd.envelope is not None
                for name in ("range", "x-ms-range", "if-range"):
                    req.headers.pop(name, None)
                flow.metadata[_ENVELOPE_READ] = (None, fwd.envelope, True)
            elif is_aws_chunked(headers) and (
                req.headers.get("x-amz-content-sha256", "") != "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
            ):
                # chunk signatures chain from the client's key: only a decoded body can be
                # signed again
                decoder = aws_chunked_decoder(headers)
                _apply_changes(req.headers, decoded_body_headers(headers))
                req.headers["content-length"] = str(decoder.declared_length)
                req.headers.pop("transfer-encoding", None)
                req.stream = _RequestTransform(flow, tx, _decoder_transform(decoder))
                transformed = True
        except EnvelopeRefused as exc:
            _refuse(flow, tx, Refusal(exc.status, exc.code, exc.reason))
            return
        except EnvelopeError as exc:
            _refuse(flow, tx, Refusal(500, "envelope_unavailable", str(exc)))
            return
        try:
            _sign(flow, fwd, transformed)
        except _SignRefused as exc:
            _refuse(flow, tx, Refusal(400, "bad_request", str(exc)))

    def _object_upload_whole(self, flow: http.HTTPFlow, tx: Transaction) -> None:
        """An object upload under DLP, read whole: decode, inspect, encrypt, sign."""
        from casb.dlp.object_upload import inspect_object

        req = flow.request
        fwd = tx.outcome
        assert isinstance(fwd, Forward) and fwd.dlp is not None and tx.dlp is not None
        headers = list(req.headers.items(multi=True))
        body = req.raw_content or b""
        try:
            if is_aws_chunked(headers):
                body = whole_transform(_decoder_transform(aws_chunked_decoder(headers)), body)
                _apply_changes(req.headers, decoded_body_headers(headers))
            key = tx.resource.key if tx.resource is not None else None
            result = inspect_object(fwd.dlp, body, req.headers.get("content-type", ""), key, tx.dlp)
            if isinstance(result, str):
                _refuse(flow, tx, Refusal(403, "dlp_blocked", result))
                return
            if result != body:  # de-identified (or trailing data cut): new digests
                for name in [n for n in req.headers if _is_body_digest(n)]:
                    del req.headers[name]
            body = result
            if flow.metadata.get(_OBJECT_DLP) is EnvelopeOp.ENCRYPT:
                assert fwd.envelope is not None
                plain = [
                    (n, v)
                    for n, v in req.headers.items(multi=True)
                    if n.lower() != "content-length"
                ]
                upload = plan_upload(
                    fwd.kind, [*plain, ("Content-Length", str(len(body)))], fwd.envelope
                )
                _apply_changes(req.headers, upload.changes)
                body = whole_transform(upload.transform, body)
                tx.envelope = "encrypted"
        except EnvelopeRefused as exc:
            _refuse(flow, tx, Refusal(exc.status, exc.code, exc.reason))
            return
        except (EnvelopeError, AwsChunkedError) as exc:
            _refuse(flow, tx, Refusal(400, "bad_request", str(exc)))
            return
        req.headers.pop("transfer-encoding", None)
        req.raw_content = body
        req.headers["content-length"] = str(len(body))
        try:
            _sign(flow, fwd, transformed=True)
        except _SignRefused as exc:
            _refuse(flow, tx, Refusal(400, "bad_request", str(exc)))

    def _envelope_response(self, flow: http.HTTPFlow, tx: Transaction) -> bool:
        """An envelope read: decrypt what the store returns. True when handled."""
        read = flow.metadata.get(_ENVELOPE_READ)
        resp = flow.response
        if read is None or resp is None or not 200 <= resp.status_code < 300:
            return False
        asked, spec, head = read
        fwd = tx.outcome
        assert isinstance(fwd, Forward)
        try:
            plan = plan_download(
                fwd.kind,
                resp.status_code,
                list(resp.headers.items(multi=True)),
                spec,
                asked,
                head=head or flow.request.method == "HEAD",
            )
        except EnvelopeRefused as exc:
            self._replace_streamed(flow, tx, exc.reason, status=exc.status, code=exc.code)
            return True
        except EnvelopeError as exc:  # IntegrityError included
            tx.envelope = f"integrity_error: {exc}"
            self._replace_streamed(flow, tx, str(exc), status=502, code="integrity_error")
            return True
        sized = "content-length" in resp.headers  # checked against the metadata
        _apply_changes(resp.headers, plan.changes)
        if plan.changes.status is not None:
            resp.status_code = plan.changes.status
        tx.envelope = "decrypted"
        if plan.opener is None:
            return False  # HEAD: no body; audited like any small response
        if plan.length <= spec.verify_whole_bytes and sized:
            # buffered (its size known and checked against the metadata): decrypted in
            # `response`, nothing sent before that
            flow.metadata[_DECRYPT_WHOLE] = plan
            return True
        resp.stream = _AuditedStream(self, flow, tx, _Decrypting(opener_transform(plan.opener), tx))
        return True

    def _decrypt_whole(self, flow: http.HTTPFlow, tx: Transaction, plan: DownloadPlan) -> None:
        resp = flow.response
        assert resp is not None and plan.opener is not None
        try:
            body = whole_transform(opener_transform(plan.opener), resp.raw_content or b"")
        except EnvelopeError as exc:
            tx.envelope = f"integrity_error: {exc}"
            _refuse(flow, tx, Refusal(502, "integrity_error", str(exc)), forwarded=True)
            return
        resp.raw_content = body
        resp.headers["content-length"] = str(len(body))

    def _check_post_form(self, flow: http.HTTPFlow, tx: Transaction) -> None:
        """S3 browser POST: the at-rest rule applies to the form's fields (S3 reads
        x-amz-server-side-encryption from the form, not from a header)."""
        from casb.encryption.at_rest import check_at_rest
        from casb.objectstore.acl import public_access_refusal
        from casb.objectstore.form_upload import FormUploadError, PostObjectFields

        assert self.runtime is not None and tx.resource is not None
        rule = self.runtime.settings.destinations[tx.resource.destination].at_rest

        def check(fields: dict[str, str]) -> None:
            acl = [("x-amz-acl", v) for k, v in fields.items() if k == "acl"]
            grants = [(k, v) for k, v in fields.items() if k.startswith("x-amz-grant-")]
            exposed = public_access_refusal("s3", [*acl, *grants])
            if exposed is not None:
                raise FormUploadError(exposed)
            problem = check_at_rest("s3", "PutObject", list(fields.items()), (), rule)
            if problem is not None:
                raise FormUploadError(problem.replace("header", "form field"))

        try:
            form = PostObjectFields(flow.request.headers.get("content-type", ""), check)
            form.feed(flow.request.raw_content or b"")
            form.feed(b"")
        except FormUploadError as exc:
            status, code = (
                (403, "encryption_required")
                if "encrypt" in exc.reason
                else (403, "forbidden")
                if "may not" in exc.reason
                else (400, "bad_request")
            )
            _refuse(flow, tx, Refusal(status, code, exc.reason))

    @_fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        """The whole request body has been received (and, for uploads, streamed)."""
        tx = flow.metadata.get(_META)
        if _POST_FORM in flow.metadata and isinstance(tx, Transaction) and flow.response is None:
            self._check_post_form(flow, tx)
            return
        if _GCS_METADATA in flow.metadata and isinstance(tx, Transaction) and flow.response is None:
            from casb.objectstore.gcs_metadata import metadata_refusal

            assert isinstance(tx.outcome, Forward)
            problem = metadata_refusal(
                tx.outcome.operation,
                flow.request.headers.get("content-type", ""),
                flow.request.raw_content or b"",
            )
            if problem is not None:
                _refuse(flow, tx, Refusal(403, "forbidden", problem))
            return
        if _OBJECT_DLP in flow.metadata and isinstance(tx, Transaction) and flow.response is None:
            self._object_upload_whole(flow, tx)
            return
        transform = flow.metadata.get(_REQUEST_TRANSFORM)
        if transform is not None and flow.response is None and not transform.started:
            # an empty or already-buffered body: mitmproxy did not stream it
            body = whole_transform(transform, flow.request.raw_content or b"")
            flow.request.raw_content = body
            flow.request.headers.pop("transfer-encoding", None)
            flow.request.headers["content-length"] = str(len(body))
            return
        stream = flow.metadata.get(_UPLOAD)
        if stream is None or flow.response is not None:
            return
        if not stream.ended and flow.request.raw_content is not None:
            # mitmproxy streams only bodies that arrive after the headers; an empty or
            # buffered body goes through the same inspection here.
            body = b"".join([*stream(flow.request.raw_content or b""), *stream(b"")])
            del flow.request.headers["transfer-encoding"]
            flow.request.headers["content-length"] = str(len(body))
            flow.request.raw_content = body
        # A body that broke after bytes went upstream ends there, without the multipart
        # close delimiter: the upstream sees an unterminated multipart (Orthanc stores
        # none of it) and the client gets a 400 with the reason (`_apply_dlp`).

    @_fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        tx = flow.metadata.get(_META)
        if not isinstance(tx, Transaction) or flow.response is None:
            return
        flow.response.headers[REQUEST_ID_HEADER] = tx.request_id
        if not tx.allowed:
            return
        assert self.runtime is not None
        self.runtime.pipeline.telemetry.upstream_finished(tx, flow.response.status_code)
        assert isinstance(tx.outcome, Forward)
        if self._envelope_response(flow, tx):
            return
        plan = tx.outcome.dlp
        length = flow.response.headers.get("content-length", "")
        if plan is not None and plan.direction == "request":
            return  # the STOW-RS answer: buffered, merged with DLP's failures in `response`
        if (
            plan is not None
            and 200 <= flow.response.status_code < 300
            and flow.response.status_code != 204
            and flow.request.method != "HEAD"  # no body to mask
        ):
            self._mask_response(flow, tx, plan, length)
            return
        if length.isdigit() and int(length) <= self._buffer_limit:
            return  # small: buffered, audited in `response` before a byte is sent
        flow.response.stream = _AuditedStream(self, flow, tx)

    def _mask_response(
        self, flow: http.HTTPFlow, tx: Transaction, plan: DlpPlan, length: str
    ) -> None:
        """De-identify what the upstream returns before the client sees it."""
        resp = flow.response
        assert resp is not None
        ctype = resp.headers.get("content-type", "")
        kind = response_kind(ctype)
        encoding = resp.headers.get("content-encoding", "").strip().lower()
        if kind == "json":
            if length.isdigit() and int(length) > plan.max_json_bytes:
                self._replace_streamed(flow, tx, "the response is too large to de-identify")
            else:
                flow.metadata[_MASKED] = plan  # buffered; masked in `response`
            return
        if encoding not in ("", "identity") or kind == "unmaskable":
            what = f"{encoding}-encoded" if kind != "unmaskable" else repr(ctype.split(";")[0])
            self._replace_streamed(flow, tx, f"a {what} response cannot be de-identified")
            return
        from casb.dlp.instance_stream import InstanceStream
        from casb.dlp.multipart_stream import MultipartDicomStream

        inspector = plan.inspector()
        inner: _Transform
        if kind == "multipart":
            try:
                stream = MultipartDicomStream(
                    ctype,
                    inspector,
                    max_header_bytes=plan.max_header_bytes,
                    max_json_bytes=plan.max_json_bytes,
                    mode="response",
                )
            except ValueError as exc:
                self._replace_streamed(flow, tx, f"the response cannot be read: {exc}")
                return
            inner = _MaskedInstances(stream, tx)
        else:
            inner = _MaskedInstance(
                InstanceStream(inspector.inspect, max_header_bytes=plan.max_header_bytes), tx
            )
        resp.headers.pop("content-length", None)
        resp.headers["transfer-encoding"] = "chunked"
        resp.stream = _AuditedStream(self, flow, tx, inner)

    def _replace_streamed(
        self,
        flow: http.HTTPFlow,
        tx: Transaction,
        reason: str,
        *,
        status: int = 502,
        code: str = "response_blocked",
    ) -> None:
        """Answer 502 instead of an upstream response whose body is still to come."""
        tx.reasons = (*tx.reasons, reason)
        refusal = Refusal(status, code, reason)
        flow.metadata[_ERROR] = code
        flow.response = _make_response(refusal, tx.request_id, tx.error_style)
        body = flow.response.content or b""
        flow.response.stream = _AuditedStream(self, flow, tx, _Swallow(body))

    @_fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        tx = flow.metadata.get(_META)
        if not isinstance(tx, Transaction) or flow.response is None or tx.finished:
            return
        whole = flow.metadata.pop(_DECRYPT_WHOLE, None)
        if whole is not None and tx.allowed:
            self._decrypt_whole(flow, tx, whole)
        if tx.allowed and tx.dlp is not None and _OBJECT_DLP not in flow.metadata:
            self._apply_dlp(flow, tx)
        # Refusals we made, and small buffered upstream responses (streamed ones are
        # audited by their stream).
        self._finish(
            flow,
            tx,
            status=flow.response.status_code,
            bytes_out=len(flow.response.raw_content or b""),
            streamed=False,
            error=flow.metadata.get(_ERROR),
        )

    @_fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        tx = flow.metadata.get(_META)
        if not isinstance(tx, Transaction) or tx.finished:
            return
        msg = flow.error.msg if flow.error else ""
        killed = flow.metadata.get(_KILLED)
        if killed is not None:
            status, code = killed
        elif "body_size_limit" in msg:
            status, code = (
                (413, "body_too_large")
                if msg.startswith("Request")
                else (502, "upstream_body_too_large")
            )
        elif flow.request.timestamp_end is None:
            # The request never arrived whole: the client went away (or sent a broken
            # body), not the upstream. 499 as nginx logs it: "client closed request".
            status, code = 499, "client_disconnected"
        elif flow.response is not None:
            status, code = flow.response.status_code, "transfer_failed"
        else:
            status, code = 502, "upstream_unreachable" if tx.allowed else "transfer_failed"
        stream = flow.response.stream if flow.response is not None else None
        self._finish(
            flow,
            tx,
            status=status,
            bytes_out=stream.count if isinstance(stream, _AuditedStream) else 0,
            streamed=True,
            error=code,
        )

    def _apply_dlp(self, flow: http.HTTPFlow, tx: Transaction) -> None:
        """Buffered responses: the STOW-RS answer after an inspected upload, or JSON to
        mask. Whatever cannot be done is refused, never passed on unchecked."""
        resp = flow.response
        assert resp is not None and tx.dlp is not None
        stream = flow.metadata.get(_UPLOAD)
        if stream is not None:
            record_stream(tx.dlp, stream)
            if stream.fatal is not None:
                reason = f"the upload could not be inspected: {stream.fatal}"
                if stream.open_part_forwarded:
                    reason += (
                        "; the upstream received it unterminated (no multipart close "
                        "delimiter), so it must not store any of it"
                    )
                _refuse(flow, tx, Refusal(400, "bad_request", reason), forwarded=True)
                return
            answer = upload_answer(
                stream, resp.status_code, resp.content or b"", resp.headers.get("content-type", "")
            )
            if answer is not None:
                status, body = answer
                resp.status_code = status
                resp.headers.pop("content-encoding", None)
                resp.headers["content-type"] = "application/dicom+json"
                resp.content = body
            return
        plan = flow.metadata.get(_MASKED)
        if plan is None:
            return
        body = resp.content or b""
        try:
            if len(body) > plan.max_json_bytes:
                raise InstanceError("the response is too large to de-identify")
            masked = mask_json_body(plan, body, tx.dlp)
        except InstanceError as exc:
            tx.dlp.errors.append(exc.reason)
            _refuse(flow, tx, Refusal(502, "response_blocked", exc.reason), forwarded=True)
            return
        resp.headers.pop("content-encoding", None)
        resp.content = masked

    # -- helpers ---------------------------------------------------------------------
    def _finish(
        self,
        flow: http.HTTPFlow,
        tx: Transaction,
        *,
        status: int,
        bytes_out: int,
        streamed: bool,
        error: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Write the audit record; False (and the response withheld) if it cannot be."""
        assert self.runtime is not None
        upload = flow.metadata.get(_UPLOAD)
        transform = flow.metadata.get(_REQUEST_TRANSFORM)
        if upload is not None:
            bytes_in = upload.bytes_in
        elif transform is not None and transform.started:
            bytes_in = transform.bytes_in
        else:
            bytes_in = len(flow.request.raw_content or b"")
        if reason is not None:
            tx.reasons = (*tx.reasons, reason)
        if tx.dlp is not None and upload is not None:
            record_stream(tx.dlp, upload)  # once; e.g. the flow failed before `response`
        audit = self.runtime.pipeline.audit
        was_healthy = audit is not None and audit.healthy
        try:
            self.runtime.pipeline.finish(
                tx, status=status, bytes_in=bytes_in, bytes_out=bytes_out, error=error
            )
            return True
        except AuditError as exc:
            # No access without an audit record: withhold the response. The first failure
            # is an error; while the outage lasts each refused request is a warning (an
            # error logged while mitmdump starts would also make it exit, at random).
            log.log(
                logging.ERROR if was_healthy else logging.WARNING,
                "audit write failed, response withheld (request_id=%s): %s",
                tx.request_id,
                exc,
            )
            if streamed:
                flow.kill()
            else:
                refusal = Refusal(
                    503, "audit_unavailable", "the audit log cannot be written; request refused"
                )
                flow.response = _make_response(refusal, tx.request_id, tx.error_style)
            return False


def _client_ip(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else ""


def _rewrite(req: http.Request, fwd: Forward) -> None:
    if (req.scheme, req.host, req.port) != (fwd.scheme, fwd.host, fwd.port):
        req.scheme, req.host, req.port = fwd.scheme, fwd.host, fwd.port
    req.path = fwd.target
    headers = req.headers
    for name in fwd.remove_headers:
        if name in headers:
            del headers[name]
    for name, value in fwd.set_headers:
        if name == "Host":
            if req.host_header != value:
                req.host_header = value
        else:
            headers[name] = value


def _make_response(refusal: Refusal, request_id: str, style: str = "json") -> http.Response:
    if style == "json":
        body, pairs = error_body(refusal, request_id), error_headers(refusal, request_id)
    else:
        body, pairs = render_error(style, refusal.status, refusal.code, refusal.message, request_id)  # type: ignore[arg-type]
        pairs = [*pairs, (REQUEST_ID_HEADER, request_id), *refusal.headers]
    headers = http.Headers([(k.encode(), v.encode()) for k, v in pairs])
    return http.Response.make(refusal.status, body, headers)


def _respond(flow: http.HTTPFlow, tx: Transaction) -> None:
    assert isinstance(tx.outcome, Refusal)
    flow.response = _make_response(tx.outcome, tx.request_id, tx.error_style)


def _refuse(
    flow: http.HTTPFlow, tx: Transaction, refusal: Refusal, *, forwarded: bool = False
) -> None:
    """Answer with a refusal decided by enforcement after the policy allowed. With
    `forwarded`, the request did reach the upstream (the audit says so: the outcome
    stays a Forward, the refusal is the error code and reason)."""
    tx.reasons = (*tx.reasons, refusal.message)
    if forwarded:
        flow.metadata[_ERROR] = refusal.code
    else:
        tx.outcome = refusal
        Telemetry.upstream_cancelled(tx)
    flow.response = _make_response(refusal, tx.request_id, tx.error_style)


__all__ = ["CasbAddon"]
