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
from casb.exchange import Forward, IncomingRequest, Refusal, Transaction
from casb.pipeline import new_transaction
from casb.policy import PolicyLoadError
from casb.responses import REQUEST_ID_HEADER, error_body, error_headers
from casb.runtime import Runtime

log = logging.getLogger("casb")
_META = "casb"


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


class _AuditedStream:
    """A mitmproxy response stream that counts bytes and holds back the latest chunk, so
    the audit record is written before the client has the whole body. If it cannot be
    written, the last chunk is never released and the flow is cut."""

    __slots__ = ("addon", "count", "flow", "held", "tx")

    def __init__(self, addon: CasbAddon, flow: http.HTTPFlow, tx: Transaction) -> None:
        self.addon, self.flow, self.tx = addon, flow, tx
        self.count = 0
        self.held = b""

    def __call__(self, data: bytes) -> list[bytes]:
        if self.tx.finished:  # mitmproxy sent data after the end: pass it on
            self.count += len(data)
            return [data] if data else []
        if data:
            self.count += len(data)
            out, self.held = self.held, data
            return [out] if out else []
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
        if isinstance(tx.outcome, Forward):
            _rewrite(req, tx.outcome)
        else:
            _respond(flow, tx)

    @_fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        tx = flow.metadata.get(_META)
        if not isinstance(tx, Transaction) or flow.response is None:
            return
        flow.response.headers[REQUEST_ID_HEADER] = tx.request_id
        if not tx.allowed:
            return
        length = flow.response.headers.get("content-length", "")
        if length.isdigit() and int(length) <= self._buffer_limit:
            return  # small: buffered, audited in `response` before a byte is sent
        flow.response.stream = _AuditedStream(self, flow, tx)

    @_fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        tx = flow.metadata.get(_META)
        if not isinstance(tx, Transaction) or flow.response is None or tx.finished:
            return
        # Refusals we made, and small buffered upstream responses (streamed ones are
        # audited by their stream).
        self._finish(
            flow,
            tx,
            status=flow.response.status_code,
            bytes_out=len(flow.response.raw_content or b""),
            streamed=False,
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
    ) -> bool:
        """Write the audit record; False (and the response withheld) if it cannot be."""
        assert self.runtime is not None
        raw_in = flow.request.raw_content
        try:
            self.runtime.pipeline.finish(
                tx, status=status, bytes_in=len(raw_in or b""), bytes_out=bytes_out, error=error
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


__all__ = ["CasbAddon"]
