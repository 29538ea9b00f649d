"""OpenTelemetry traces and metrics for proxied requests (DESIGN.md, "Telemetry").

Configured only by the standard ``OTEL_*`` environment variables: OTLP export (HTTP or
gRPC) when an endpoint is set, the console exporter when ``OTEL_TRACES_EXPORTER`` /
``OTEL_METRICS_EXPORTER`` say ``console``, and nothing at all otherwise (every method
here is then a cheap no-op).

One trace per request: a SERVER span from the decision to the audit record, INTERNAL
children for each check (``casb.identity``, ``casb.classify``, ``casb.policy``,
``casb.encryption``, ``casb.dlp`` per inspected instance, ``casb.dlp.response``) and a
CLIENT span for the upstream call, whose context goes upstream in ``traceparent``.

No PHI: attributes hold route templates, action names, destination names, rule ids,
counts and a keyed pseudonym of the principal. Never a URL, a query value, a UID, a
header, a body, an exception message or a subject.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from casb.dlp.findings import Verdict
    from casb.dlp.inspector import Inspector
    from casb.exchange import Transaction

log = logging.getLogger("casb.telemetry")

_PROPAGATOR = TraceContextTextMapPropagator()
# Seconds: the SDK's default buckets are sized for milliseconds.
_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("http/protobuf", "grpc")
PSEUDONYM_KEY_FILE = "telemetry-pseudonym.key"
DEFAULT_SPAN_BATCH = 64  # spans per OTLP export, unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE


class TelemetryError(Exception):
    """The OTEL_* settings are unusable (named in the message)."""


# -- settings from the environment -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportChoice:
    """What one signal (traces or metrics) is exported to."""

    exporter: str  # otlp | console | none
    protocol: str = "http/protobuf"


def export_choice(signal: str, environ: Mapping[str, str]) -> ExportChoice:
    """The exporter for `signal` ("traces" or "metrics") from OTEL_* variables: OTLP when
    an endpoint is set, unless OTEL_<SIGNAL>_EXPORTER says otherwise; none when unset."""
    upper = signal.upper()
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ExportChoice("none")
    named = environ.get(f"OTEL_{upper}_EXPORTER", "").strip().lower()
    endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not named:
        named = "otlp" if endpoint else "none"
    if "," in named:
        raise TelemetryError(f"OTEL_{upper}_EXPORTER={named!r}: casb takes one exporter")
    if named not in _EXPORTERS:
        raise TelemetryError(
            f"OTEL_{upper}_EXPORTER={named!r}: expected one of {', '.join(_EXPORTERS)}"
        )
    protocol = (
        environ.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if named == "otlp" and protocol not in _PROTOCOLS:
        raise TelemetryError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected one of {', '.join(_PROTOCOLS)}"
        )
    return ExportChoice(named, protocol)


def _resource(environ: Mapping[str, str]) -> Resource:
    from casb import __version__

    name = environ.get("OTEL_SERVICE_NAME", "").strip() or "casb"
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES from the environment.
    return Resource.create({"service.name": name, "service.version": __version__})


def _tracer_provider(
    choice: ExportChoice, resource: Resource, environ: Mapping[str, str]
) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
        SpanExporter,
    )

    provider = TracerProvider(resource=resource)
    if choice.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        return provider
    exporter: SpanExporter
    if choice.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        exporter = HttpSpanExporter()
    # Batched in a thread of the SDK: export never runs on the request path. But that
    # thread encodes a whole batch while holding the GIL, which stalls the proxy's event
    # loop: with 512 spans (the SDK's default) OTLP export added 62-70 ms to the p99
    # under load, with 64 it added 5-9 ms, for the same CPU per request (paired runs of
    # bench/proxy_overhead.py). OTEL_BSP_MAX_EXPORT_BATCH_SIZE still overrides it.
    batch = None if environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") else DEFAULT_SPAN_BATCH
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=batch))
    return provider


def _meter_provider(choice: ExportChoice, resource: Resource) -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        PeriodicExportingMetricReader,
    )

    exporter: MetricExporter
    if choice.exporter == "console":
        exporter = ConsoleMetricExporter()
    elif choice.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        exporter = HttpMetricExporter()
    # OTEL_METRIC_EXPORT_INTERVAL (ms) is read by the reader.
    return MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(exporter)]
    )


# -- the principal's pseudonym -----------------------------------------------------------


def load_pseudonym_key(
    key_file: Path | None, key_env: str | None, *, dev_state_dir: Path | None
) -> bytes | None:
    """The HMAC key for principal pseudonyms: from a file or an environment variable;
    generated under the state dir in dev; None (no pseudonym attribute) otherwise."""
    if key_env:
        value = os.environ.get(key_env, "")
        if len(value) < 16:
            raise TelemetryError(
                f"telemetry.pseudonym_key_env: ${key_env} must hold at least 16 characters"
            )
        return value.encode()
    if key_file is not None:
        try:
            data = key_file.read_bytes().strip()
        except OSError as exc:
            raise TelemetryError(
                f"telemetry.pseudonym_key_file: {key_file}: {exc.strerror}"
            ) from exc
        if len(data) < 16:
            raise TelemetryError(f"telemetry.pseudonym_key_file: {key_file}: key too short")
        return data
    if dev_state_dir is None:
        return None
    path = dev_state_dir / PSEUDONYM_KEY_FILE
    if not path.exists():
        dev_state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return path.read_bytes().strip()


def pseudonym(key: bytes, issuer: str, subject: str) -> str:
    """A stable, keyed pseudonym of a principal: the same person gets the same value in
    every span (correlate without identifying); without the key it cannot be reversed
    or recomputed from a guessed name."""
    mac = hmac.new(key, f"{issuer}\x00{subject}".encode(), hashlib.sha256).hexdigest()
    return "p-" + mac[:16]


# -- instruments -------------------------------------------------------------------------


@dataclass(slots=True)
class _Instruments:
    requests: Counter
    duration: Histogram
    upstream: Histogram
    findings: Counter
    bytes_in: Counter
    bytes_out: Counter
    reloads: Counter
    audit_records: Counter


def _instruments(provider: MeterProvider) -> _Instruments:
    meter = provider.get_meter("casb")
    buckets = list(_DURATION_BUCKETS)
    return _Instruments(
        requests=meter.create_counter("casb.requests", "{request}", "Requests, by outcome"),
        duration=meter.create_histogram(
            "http.server.request.duration",
            "s",
            "Time from a request's headers to its audit record",
            explicit_bucket_boundaries_advisory=buckets,
        ),
        upstream=meter.create_histogram(
            "http.client.request.duration",
            "s",
            "Time from forwarding a request to the upstream's response headers",
            explicit_bucket_boundaries_advisory=buckets,
        ),
        findings=meter.create_counter(
            "casb.dlp.findings", "{finding}", "DLP findings, by rule and direction"
        ),
        bytes_in=meter.create_counter("casb.bytes_in", "By", "Request body bytes received"),
        bytes_out=meter.create_counter("casb.bytes_out", "By", "Response body bytes sent"),
        reloads=meter.create_counter(
            "casb.policy.reloads", "{reload}", "Policy loads and reloads, by outcome"
        ),
        audit_records=meter.create_counter(
            "casb.audit.records", "{record}", "Audit records written, by type"
        ),
    )


# -- per-request state -------------------------------------------------------------------


@dataclass(slots=True)
class RequestTrace:
    """The spans of one request, kept on its Transaction."""

    server: Any  # opentelemetry Span
    context: Context  # the server span as a parent
    upstream: Any = None  # the CLIENT span while the upstream call is open
    upstream_started: float = 0.0


_NOOP: AbstractContextManager[None] = nullcontext()


class Telemetry:
    """Traces and metrics of proxied requests. Built once (Runtime); all no-ops when
    no exporter is configured."""

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        pseudonym_key: bytes | None = None,
        route_prefixes: Mapping[str, str] | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._tracer = tracer_provider.get_tracer("casb") if tracer_provider else None
        self._metrics = _instruments(meter_provider) if meter_provider else None
        self._active_policy: str | None = None
        if meter_provider is not None:
            meter_provider.get_meter("casb").create_observable_gauge(
                "casb.policy.active",
                callbacks=[self._observe_policy],
                unit="{policy}",
                description="The policy version this replica enforces: 1, with the "
                "version in casb.policy_version",
            )
        self._key = pseudonym_key
        self._prefixes = dict(route_prefixes or {})
        self.tracing = self._tracer is not None

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        pseudonym_key: bytes | None = None,
        route_prefixes: Mapping[str, str] | None = None,
    ) -> Telemetry:
        env = os.environ if environ is None else environ
        traces, metrics = export_choice("traces", env), export_choice("metrics", env)
        if traces.exporter == "none" and metrics.exporter == "none":
            return cls(route_prefixes=route_prefixes)
        resource = _resource(env)
        return cls(
            tracer_provider=None
            if traces.exporter == "none"
            else _tracer_provider(traces, resource, env),
            meter_provider=None
            if metrics.exporter == "none"
            else _meter_provider(metrics, resource),
            pseudonym_key=pseudonym_key,
            route_prefixes=route_prefixes,
        )

    def describe(self) -> str:
        """For the start-up log line (no endpoints: they can hold credentials)."""
        parts = [
            "traces on" if self._tracer_provider else "traces off",
            "metrics on" if self._meter_provider else "metrics off",
        ]
        return ", ".join(parts)

    def shutdown(self) -> None:
        """Flush and stop the exporters (at proxy shutdown)."""
        providers = (self._tracer_provider, self._meter_provider)
        self._tracer_provider = self._meter_provider = None  # once
        for provider in providers:
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception as exc:  # an exporter failing must not block shutdown
                    log.warning("telemetry shutdown: %s", type(exc).__name__)

    # -- spans -----------------------------------------------------------------------
    def begin(self, tx: Transaction, headers: Sequence[tuple[str, str]], scheme: str = "") -> None:
        """Open the request's SERVER span, continuing the client's W3C trace context."""
        if self._tracer is None:
            return
        parent = _PROPAGATOR.extract(_trace_headers(headers))
        span = self._tracer.start_span(
            tx.method or "HTTP",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": _method(tx.method),
                "url.scheme": scheme or "https",
                "casb.request_id": tx.request_id,
            },
        )
        tx.trace = RequestTrace(span, trace.set_span_in_context(span))
        tx.trace_id = format(span.get_span_context().trace_id, "032x")

    def step(self, tx: Transaction, name: str) -> AbstractContextManager[Any]:
        """A child span around one check (a no-op when not tracing)."""
        rt = tx.trace
        if rt is None or self._tracer is None:
            return _NOOP
        return self._child(rt, name)

    @contextmanager
    def _child(self, rt: RequestTrace, name: str) -> Iterator[Any]:
        assert self._tracer is not None
        span = self._tracer.start_span(name, context=rt.context, kind=SpanKind.INTERNAL)
        try:
            yield span
        except BaseException as exc:
            # The type only: an exception's message can quote request data.
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", type(exc).__name__)
            raise
        finally:
            span.end()

    def traced_inspector(self, tx: Transaction, inspector: Inspector, name: str) -> Inspector:
        """The inspector, with one span per inspected instance (when tracing)."""
        rt = tx.trace
        if rt is None or self._tracer is None:
            return inspector
        return _TracedInspector(inspector, self, rt, name)  # type: ignore[return-value]

    def upstream_started(self, tx: Transaction, host: str, port: int, scheme: str) -> str | None:
        """Open the CLIENT span of the upstream call; the `traceparent` to send upstream
        (None when not tracing: the client's own header is then left alone)."""
        now = time.monotonic()
        rt = tx.trace
        if rt is None:
            if self._metrics is None:
                return None
            rt = tx.trace = RequestTrace(None, Context())  # metrics only: just the timing
        rt.upstream_started = now
        if rt.server is None or self._tracer is None:
            return None
        span = self._tracer.start_span(
            _method(tx.method),
            context=rt.context,
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": _method(tx.method),
                "server.address": host,
                "server.port": port,
                "url.scheme": scheme,
                "casb.destination": tx.resource.destination if tx.resource else "",
            },
        )
        rt.upstream = span
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent")

    def upstream_finished(self, tx: Transaction, status: int | None) -> None:
        """The upstream's response headers arrived (status), or the call failed (None)."""
        rt = tx.trace
        if rt is None or not rt.upstream_started:
            return
        elapsed = time.monotonic() - rt.upstream_started
        rt.upstream_started = 0.0
        destination = tx.resource.destination if tx.resource else ""
        if self._metrics is not None:
            attrs: dict[str, Any] = {"casb.destination": destination}
            if status is not None:
                attrs["http.response.status_code"] = status
            else:
                attrs["error.type"] = "upstream_unreachable"
            self._metrics.upstream.record(elapsed, attrs)
        span, rt.upstream = rt.upstream, None
        if span is None:
            return
        if status is None:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", "upstream_unreachable")
        else:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("error.type", str(status))
        span.end()

    @staticmethod
    def upstream_cancelled(tx: Transaction) -> None:
        """The request was refused after upstream_started but before it was sent: its
        CLIENT span is dropped unended (so never exported) and nothing is timed."""
        rt = tx.trace
        if rt is not None:
            rt.upstream, rt.upstream_started = None, 0.0

    # -- the end of a request --------------------------------------------------------
    def finished(self, tx: Transaction, record: Mapping[str, Any], audited: bool) -> None:
        """The request's audit record was built (and written, if `audited`): close its
        spans and count it. Attributes come from the record, which holds no PHI.

        Never raises: it runs after the record is written, and a telemetry failure must
        not change the response the record describes."""
        try:
            self._finished(tx, record, audited)
        except Exception as exc:
            log.warning("telemetry for a finished request failed: %s", type(exc).__name__)

    def _finished(self, tx: Transaction, record: Mapping[str, Any], audited: bool) -> None:
        if tx.trace is not None and tx.trace.upstream_started:
            self.upstream_finished(tx, None)
        status = int(record.get("status") or 0)
        action = record.get("action") or "unknown"
        decision = record.get("decision") or "deny"
        destination = record.get("destination") or ""
        rt = tx.trace
        if rt is not None and rt.server is not None:
            self._end_server(rt.server, tx, record, status, audited)
        m = self._metrics
        if m is None:
            return
        common = {
            "casb.action": action,
            "casb.decision": decision,
            "casb.destination": destination,
            "http.response.status_code": status,
        }
        m.requests.add(1, common)
        m.duration.record(
            time.monotonic() - tx.started, {**common, "http.request.method": _method(tx.method)}
        )
        flow = {"casb.destination": destination, "casb.action": action}
        if record.get("bytes_in"):
            m.bytes_in.add(int(record["bytes_in"]), flow)
        if record.get("bytes_out"):
            m.bytes_out.add(int(record["bytes_out"]), flow)
        if tx.dlp is not None:
            # one add per rule, not per finding (an upload can carry thousands)
            by_rule = collections.Counter(f.rule for f in tx.dlp.findings)
            for rule, n in by_rule.items():
                m.findings.add(n, {"casb.dlp.rule": rule, "casb.dlp.direction": tx.dlp.direction})
        if audited:
            m.audit_records.add(1, {"type": "request"})

    def _end_server(
        self,
        span: Any,
        tx: Transaction,
        record: Mapping[str, Any],
        status: int,
        audited: bool,
    ) -> None:
        route = record.get("route")
        destination = record.get("destination")
        if route is not None and destination is not None:
            prefix = self._prefixes.get(destination, "")
            http_route = (prefix.rstrip("/") + route) if route != "/" else (prefix or "/")
            span.update_name(f"{_method(tx.method)} {http_route}")
            span.set_attribute("http.route", http_route)
            span.set_attribute("casb.destination", destination)
        attrs: dict[str, Any] = {
            "http.response.status_code": status,
            "casb.decision": record.get("decision") or "deny",
            "casb.policy_version": record.get("policy_version") or "",
        }
        if record.get("action"):
            attrs["casb.action"] = record["action"]
        if record.get("rule_id"):
            attrs["casb.rule_id"] = record["rule_id"]
        if record.get("error"):
            attrs["casb.error"] = record["error"]
        if tx.dlp is not None:
            attrs["casb.dlp.findings"] = len(tx.dlp.findings)
            attrs["casb.dlp.rules"] = sorted({f.rule for f in tx.dlp.findings})
        p = tx.principal
        if p is not None and self._key is not None:
            attrs["casb.principal"] = pseudonym(self._key, p.issuer, p.subject)
        if not audited:
            attrs["casb.audit"] = "failed"
        span.set_attributes(attrs)
        if status >= 500 or not audited:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", record.get("error") or str(status))
        span.end()

    # -- events outside requests -----------------------------------------------------
    def policy_loaded(self, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.reloads.add(1, {"outcome": "ok" if ok else "rejected"})

    def policy_active(self, version: str) -> None:
        """The policy this replica enforces now (reported by the casb.policy.active gauge:
        one series, for the active version only, so replicas can be compared)."""
        self._active_policy = version

    def _observe_policy(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        version = self._active_policy
        return [] if version is None else [Observation(1, {"casb.policy_version": version})]

    def audit_record(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.audit_records.add(1, {"type": kind})


class _TracedInspector:
    """An Inspector whose inspections each get a span (verdict, finding count, rules)."""

    def __init__(self, inner: Inspector, owner: Telemetry, rt: RequestTrace, name: str) -> None:
        self._inner, self._owner, self._rt, self._name = inner, owner, rt, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)

    def inspect(self, data: bytes, complete: bool) -> Verdict:
        with self._owner._child(self._rt, self._name) as span:
            verdict = self._inner.inspect(data, complete)
            _verdict_attributes(span, verdict.action, verdict.findings)
            return verdict

    def inspect_json(self, dataset: dict[str, Any]) -> Any:
        with self._owner._child(self._rt, self._name) as span:
            out, verdict = self._inner.inspect_json(dataset)
            _verdict_attributes(span, verdict.action, verdict.findings)
            return out, verdict

    def mask_json(self, datasets: list[dict[str, Any]]) -> Any:
        with self._owner._child(self._rt, self._name) as span:
            masked, findings = self._inner.mask_json(datasets)
            span.set_attribute("casb.dlp.instances", len(datasets))
            _verdict_attributes(span, "deidentified", findings)
            return masked, findings


def _verdict_attributes(span: Any, action: str, findings: Sequence[Any]) -> None:
    span.set_attribute("casb.dlp.verdict", action)
    span.set_attribute("casb.dlp.findings", len(findings))
    span.set_attribute("casb.dlp.rules", sorted({f.rule for f in findings}))


def _method(method: str) -> str:
    """Semantic conventions: a known method, else _OTHER (methods are client input)."""
    upper = method.upper()
    return upper if upper in _KNOWN_METHODS else "_OTHER"


_KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)


def client_trace_id(headers: Sequence[tuple[str, str]]) -> str | None:
    """The trace id of the client's W3C `traceparent` (hex), or None when it has none
    that is valid: for the audit record when tracing is off (begin() sets it when on)."""
    carrier = _trace_headers(headers)
    if not carrier:
        return None
    ctx = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _trace_headers(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """traceparent / tracestate for the propagator; a repeated traceparent is invalid
    (W3C Trace Context §3.2: more than one means none)."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        lname = name.lower()
        if lname in ("traceparent", "tracestate"):
            found.setdefault(lname, []).append(value)
    carrier: dict[str, str] = {}
    if len(found.get("traceparent", [])) == 1:
        carrier["traceparent"] = found["traceparent"][0]
        if "tracestate" in found:
            carrier["tracestate"] = ",".join(found["tracestate"])
    return carrier


__all__ = [
    "ExportChoice",
    "RequestTrace",
    "Telemetry",
    "TelemetryError",
    "client_trace_id",
    "export_choice",
    "load_pseudonym_key",
    "pseudonym",
]
