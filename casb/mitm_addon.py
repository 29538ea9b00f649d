"""The mitmproxy edge: adapts flows to the pipeline and outcomes to responses. No logic.

Loaded by `addons/casb.py` (`mitmdump -s addons/casb.py --set casb_config=casb.yaml`) and
by `casb proxy` / `casb run`. The only module that imports mitmproxy.

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
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar, cast

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import ReverseMode

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
from casb.exchange import DlpReport, Forward, IncomingRequest, Refusal, Transaction
from casb.pipeline import new_transaction
from casb.policy import PolicyLoadError
from casb.responses import REQUEST_ID_HEADER, error_body, error_headers
from casb.runtime import Runtime

log = logging.getLogger("casb")
_META = "casb"
_UPLOAD = "casb.upload"  # the MultipartDicomStream inspecting a request body
_MASKED = "casb.masked"  # the response body is JSON to be masked in `response`
_ERROR = "casb.error"  # error code of a refusal made after the request was forwarded


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


class CasbAddon:
    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self._prebuilt = runtime is not None  # `casb proxy` builds it; mitmdump -s does not
        self._started = False
        # Upstream responses up to this size are buffered (and audited before any byte
        # goes out); larger or unsized ones stream through with bounded memory.
        self._buffer_limit = 1024 * 1024

    # -- lifecycle -------------------------------------------------------------------
    def load(self, loader: Loader) -> None:
        logging.getLogger("mitmproxy.proxy.server").addFilter(_REDACT)
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
        )
        tx = await self.runtime.pipeline.decide(incoming)
        flow.metadata[_META] = tx
        if not isinstance(tx.outcome, Forward):
            _respond(flow, tx)
            return
        _rewrite(req, tx.outcome)
        plan = tx.outcome.dlp
        if plan is not None:
            # DLP reads whole bodies as sent: ask the upstream for uncompressed, complete
            # answers (a byte range of an instance cannot be de-identified).
            for name in ("accept-encoding", "range", "if-range"):
                req.headers.pop(name, None)
            tx.dlp = DlpReport(profile=plan.profile, direction=plan.direction)
            if plan.direction == "request":
                self._inspect_upload(flow, tx, plan)

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

    @_fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        """The whole request body has been received (and, for uploads, streamed)."""
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
        assert isinstance(tx.outcome, Forward)
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

    def _replace_streamed(self, flow: http.HTTPFlow, tx: Transaction, reason: str) -> None:
        """Answer 502 instead of an upstream response whose body is still to come."""
        tx.reasons = (*tx.reasons, reason)
        refusal = Refusal(502, "response_blocked", reason)
        flow.response = _make_response(refusal, tx.request_id)
        body = flow.response.content or b""
        flow.response.stream = _AuditedStream(self, flow, tx, _Swallow(body))

    @_fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        tx = flow.metadata.get(_META)
        if not isinstance(tx, Transaction) or flow.response is None or tx.finished:
            return
        if tx.allowed and tx.dlp is not None:
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
        if "body_size_limit" in msg:
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
        bytes_in = upload.bytes_in if upload is not None else len(flow.request.raw_content or b"")
        if reason is not None:
            tx.reasons = (*tx.reasons, reason)
        if tx.dlp is not None and upload is not None:
            record_stream(tx.dlp, upload)  # once; e.g. the flow failed before `response`
        try:
            self.runtime.pipeline.finish(
                tx, status=status, bytes_in=bytes_in, bytes_out=bytes_out, error=error
            )
            return True
        except AuditError as exc:
            # No access without an audit record: withhold the response.
            log.error(
                "audit write failed, response withheld (request_id=%s): %s", tx.request_id, exc
            )
            if streamed:
                flow.kill()
            else:
                refusal = Refusal(
                    503, "audit_unavailable", "the audit log cannot be written; request refused"
                )
                flow.response = _make_response(refusal, tx.request_id)
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


def _make_response(refusal: Refusal, request_id: str) -> http.Response:
    headers = http.Headers(
        [(k.encode(), v.encode()) for k, v in error_headers(refusal, request_id)]
    )
    return http.Response.make(refusal.status, error_body(refusal, request_id), headers)


def _respond(flow: http.HTTPFlow, tx: Transaction) -> None:
    assert isinstance(tx.outcome, Refusal)
    flow.response = _make_response(tx.outcome, tx.request_id)


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
    flow.response = _make_response(refusal, tx.request_id)


__all__ = ["CasbAddon"]
