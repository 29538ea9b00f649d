"""A real OTLP/HTTP receiver for tests: what an OpenTelemetry collector would see.

`OtlpReceiver` listens on a loopback port (a free one unless told otherwise), takes
POST /v1/traces, /v1/metrics and /v1/logs as the OTLP/HTTP spec has them (protobuf
bodies, optionally gzip- or deflate-compressed), decodes them with `opentelemetry-proto`
and answers 200 with an empty Export*ServiceResponse, as a collector does. It keeps:

* `spans`: every span as a `ReceivedSpan` (ids in hex, kind and status by name,
  attributes as plain Python values, arrays as lists);
* `points`: every metric data point as a `ReceivedPoint` (sum/gauge value, histogram
  count and sum), with the metric's name, unit and temporality;
* `payloads`: every request as received (path, headers, wire bytes and the decompressed
  protobuf), so a test can grep the raw export for strings that must never be there;
* `errors`: requests it refused (bad path, content type, encoding or protobuf) and
  `connections`: how many TCP connections were opened at all (a negative check that
  nothing was sent holds even for exports it could not parse).

Waiting is condition-based (`wait_for_spans`, `wait_for_points`, `wait_until`): they
return as soon as what they wait for has arrived and fail with what did arrive when the
deadline passes. Never a fixed sleep.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import pytest
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PROTOBUF = "application/x-protobuf"
# path -> (request message, empty response message)
_SIGNALS: dict[str, tuple[type[Message], type[Message]]] = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
}
MAX_BODY = 64 * 1024 * 1024  # an export bigger than this is a bug in the sender


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex chars
    span_id: str  # 16 hex chars
    parent_span_id: str  # 16 hex chars, "" for a root span
    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER", "UNSPECIFIED"
    attributes: dict[str, Any]
    status_code: str  # "UNSET", "OK", "ERROR"
    status_message: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any]
    scope: str  # the instrumentation scope's name
    events: tuple[str, ...] = ()  # event names (e.g. "exception")


@dataclass(frozen=True)
class ReceivedPoint:
    metric: str
    kind: str  # "sum", "gauge", "histogram", "exponential_histogram", "summary"
    unit: str
    attributes: dict[str, Any]
    value: int | float | None  # sum and gauge points
    count: int | None  # histogram points
    sum: float | None  # histogram points (when recorded)
    temporality: str  # "CUMULATIVE", "DELTA" or "UNSPECIFIED" (gauges)
    monotonic: bool | None  # sums only
    resource: dict[str, Any]
    time_ns: int


@dataclass(frozen=True)
class RawPayload:
    path: str
    headers: dict[str, str]  # lower-case names
    wire: bytes  # as sent (possibly compressed)
    body: bytes  # decompressed: the serialized protobuf


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[ReceivedPoint] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    payloads: list[RawPayload] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: int = 0


# -- decoding (pure) ---------------------------------------------------------------------


def any_value(v: AnyValue) -> Any:
    """An OTLP AnyValue as the Python value the SDK was given."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, which)


def attributes(kvs: Any) -> dict[str, Any]:
    """Repeated KeyValue -> dict (a later duplicate key wins, as in the SDK)."""
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = any_value(kv.value)
    return out


def decode_spans(req: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out: list[ReceivedSpan] = []
    for rs in req.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                        attributes=attributes(s.attributes),
                        status_code=Status.StatusCode.Name(s.status.code).removeprefix(
                            "STATUS_CODE_"
                        ),
                        status_message=s.status.message,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        resource=resource,
                        scope=ss.scope.name,
                        events=tuple(e.name for e in s.events),
                    )
                )
    return out


def _temporality(value: int) -> str:
    return str(AggregationTemporality.Name(value)).removeprefix("AGGREGATION_TEMPORALITY_")


def _metric_points(m: Metric, resource: dict[str, Any]) -> Iterator[ReceivedPoint]:
    kind = m.WhichOneof("data") or ""
    common: dict[str, Any] = {"metric": m.name, "kind": kind, "unit": m.unit, "resource": resource}
    if kind in ("sum", "gauge"):
        data = m.sum if kind == "sum" else m.gauge
        temporality = _temporality(m.sum.aggregation_temporality) if kind == "sum" else ""
        for p in data.data_points:
            which = p.WhichOneof("value")
            yield ReceivedPoint(
                **common,
                attributes=attributes(p.attributes),
                value=None if which is None else getattr(p, which),
                count=None,
                sum=None,
                temporality=temporality or "UNSPECIFIED",
                monotonic=m.sum.is_monotonic if kind == "sum" else None,
                time_ns=p.time_unix_nano,
            )
    elif kind in ("histogram", "exponential_histogram"):
        hist = m.histogram if kind == "histogram" else m.exponential_histogram
        for hp in hist.data_points:
            yield ReceivedPoint(
                **common,
                attributes=attributes(hp.attributes),
                value=None,
                count=hp.count,
                sum=hp.sum if hp.HasField("sum") else None,
                temporality=_temporality(hist.aggregation_temporality),
                monotonic=None,
                time_ns=hp.time_unix_nano,
            )
    elif kind == "summary":
        for sp in m.summary.data_points:
            yield ReceivedPoint(
                **common,
                attributes=attributes(sp.attributes),
                value=None,
                count=sp.count,
                sum=sp.sum,
                temporality="UNSPECIFIED",
                monotonic=None,
                time_ns=sp.time_unix_nano,
            )


def decode_points(req: ExportMetricsServiceRequest) -> list[ReceivedPoint]:
    out: list[ReceivedPoint] = []
    for rm in req.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.extend(_metric_points(m, resource))
    return out


def decode_logs(req: ExportLogsServiceRequest) -> list[dict[str, Any]]:
    return [
        {
            "body": any_value(rec.body),
            "severity": rec.severity_text,
            "attributes": attributes(rec.attributes),
            "trace_id": rec.trace_id.hex(),
        }
        for rl in req.resource_logs
        for sl in rl.scope_logs
        for rec in sl.log_records
    ]


def decompress(encoding: str, wire: bytes) -> bytes:
    """The body per Content-Encoding; ValueError for one we do not speak."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return wire
    if encoding == "gzip":
        return gzip.decompress(wire)
    if encoding == "deflate":
        return zlib.decompress(wire)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


# -- the server --------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporters' sessions expect

    def do_POST(self) -> None:
        receiver = self.server.receiver
        path = self.path.split("?", 1)[0]
        signal = _SIGNALS.get(path)
        try:
            wire = self._read_body()
        except ValueError as exc:
            receiver._refused(f"POST {path}: {exc}")
            self._answer(400, b"", "text/plain", close=True)
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        if signal is None:
            receiver._refused(f"POST {path}: unknown path")
            self._answer(404, b"", "text/plain")
            return
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != PROTOBUF:
            receiver._refused(f"POST {path}: content type {content_type!r} (JSON not supported)")
            self._answer(415, b"", "text/plain")
            return
        try:
            body = decompress(headers.get("content-encoding", ""), wire)
            request = signal[0]()
            request.ParseFromString(body)
        except (ValueError, OSError, EOFError, zlib.error, DecodeError) as exc:
            receiver._refused(f"POST {path}: {type(exc).__name__}: {exc}")
            self._answer(400, b"", "text/plain")
            return
        receiver._accept(RawPayload(path, headers, wire, body), request)
        self._answer(200, signal[1]().SerializeToString(), PROTOBUF)

    def do_GET(self) -> None:
        self.server.receiver._refused(f"GET {self.path}")
        self._answer(405, b"", "text/plain")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"x", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def _answer(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: failures are in receiver.errors


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], receiver: OtlpReceiver) -> None:
        self.receiver = receiver
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.receiver._connected()
        return True


class OtlpReceiver:
    """An OTLP/HTTP receiver on loopback (port 0: a free one). Use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._address = (host, port)
        self._cond = threading.Condition()
        self._store = _Store()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> OtlpReceiver:
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"otlp-receiver-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the receiver first"
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The base URL for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter adds /v1/...)."""
        return f"http://{self._address[0]}:{self.port}"

    def env(self, *, schedule_delay_ms: int = 100, export_interval_ms: int = 500) -> dict[str, str]:
        """The OTEL_* environment that points a process's SDK at this receiver, with
        short batch and metric intervals (so a test sees exports within a second)."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms),
            "OTEL_METRIC_EXPORT_INTERVAL": str(export_interval_ms),
        }

    # what arrived (snapshots: safe to iterate while exports keep coming)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._store.spans)

    @property
    def points(self) -> list[ReceivedPoint]:
        with self._cond:
            return list(self._store.points)

    @property
    def logs(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._store.logs)

    @property
    def payloads(self) -> list[RawPayload]:
        with self._cond:
            return list(self._store.payloads)

    @property
    def errors(self) -> list[str]:
        with self._cond:
            return list(self._store.errors)

    @property
    def connections(self) -> int:
        with self._cond:
            return self._store.connections

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace, in start order."""
        return sorted((s for s in self.spans if s.trace_id == trace_id), key=lambda s: s.start_ns)

    def children(self, parent: ReceivedSpan) -> list[ReceivedSpan]:
        """The direct children of a span, in start order."""
        return sorted(
            (
                s
                for s in self.spans
                if s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id
            ),
            key=lambda s: s.start_ns,
        )

    def latest_points(self, metric: str) -> list[ReceivedPoint]:
        """The most recent point of `metric` per attribute set (cumulative: the totals)."""
        latest: dict[tuple[tuple[str, str], ...], ReceivedPoint] = {}
        for p in self.points:
            if p.metric == metric:
                key = tuple(sorted((k, repr(v)) for k, v in p.attributes.items()))
                if key not in latest or p.time_ns >= latest[key].time_ns:
                    latest[key] = p
        return list(latest.values())

    def clear(self) -> None:
        with self._cond:
            self._store = _Store(connections=self._store.connections)

    # waiting

    def wait_until(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Block until condition() holds (re-checked whenever an export arrives, and at
        least every 50 ms); AssertionError naming `what` and a summary at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; {self}")
                self._cond.wait(min(left, 0.05))

    def wait_for_spans(
        self, predicate: Callable[[ReceivedSpan], bool], *, count: int = 1, timeout: float = 10
    ) -> list[ReceivedSpan]:
        """The spans matching `predicate` (in start order), once at least `count` have."""
        found: list[ReceivedSpan] = []

        def enough() -> bool:
            nonlocal found
            found = sorted((s for s in self._store.spans if predicate(s)), key=lambda s: s.start_ns)
            return len(found) >= count

        self.wait_until(enough, timeout=timeout, what=f"{count} matching span(s)")
        return found

    def wait_for_points(
        self, predicate: Callable[[ReceivedPoint], bool], *, count: int = 1, timeout: float = 10
    ) -> list[ReceivedPoint]:
        """The metric points matching `predicate`, once at least `count` have arrived."""
        found: list[ReceivedPoint] = []

        def enough() -> bool:
            nonlocal found
            found = [p for p in self._store.points if predicate(p)]
            return len(found) >= count

        self.wait_until(enough, timeout=timeout, what=f"{count} matching metric point(s)")
        return found

    def __repr__(self) -> str:
        s = self._store
        names = sorted({sp.name for sp in s.spans})
        metrics = sorted({p.metric for p in s.points})
        return (
            f"OtlpReceiver({self._address[0]}:{self._server and self.port}: "
            f"{s.connections} connections, {len(s.payloads)} payloads, "
            f"{len(s.spans)} spans {names}, {len(s.points)} points {metrics}, "
            f"errors {s.errors})"
        )

    # called by the handler threads

    def _connected(self) -> None:
        with self._cond:
            self._store.connections += 1
            self._cond.notify_all()

    def _refused(self, error: str) -> None:
        with self._cond:
            self._store.errors.append(error)
            self._cond.notify_all()

    def _accept(self, payload: RawPayload, request: Message) -> None:
        with self._cond:
            self._store.payloads.append(payload)
            if isinstance(request, ExportTraceServiceRequest):
                self._store.spans.extend(decode_spans(request))
            elif isinstance(request, ExportMetricsServiceRequest):
                self._store.points.extend(decode_points(request))
            elif isinstance(request, ExportLogsServiceRequest):
                self._store.logs.extend(decode_logs(request))
            self._cond.notify_all()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Can this process bind `port` (e.g. the OTLP default 4318) right now?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A started receiver on a free loopback port, stopped after the test."""
    with OtlpReceiver() as receiver:
        yield receiver
