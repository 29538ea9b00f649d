"""A minimal OTLP/HTTP receiver for benchmarks: it takes what casb exports and counts it.

Run: ``.venv/bin/python bench/support/otlp_sink.py [--port 4318]`` (``bench/proxy_overhead.py``
starts it itself for its ``casb+otlp`` variant). It runs in its own process, so decoding
the exports shares no GIL with the proxy or the load generator it is measured against.

* ``POST /v1/traces`` and ``POST /v1/metrics`` (``application/x-protobuf``, optionally
  gzip- or deflate-compressed): decoded with ``opentelemetry-proto``, counted, answered
  ``200`` with an empty Export*ServiceResponse, as a collector does.
* ``GET /stats``: the counts so far, as JSON (`Tally.as_dict`): export requests per
  signal, spans by kind and by name, metric data points by metric, the latest
  cumulative value of every monotonic sum (e.g. ``casb.requests``) and the requests it
  refused. A benchmark compares them with the requests it sent: a variant that
  silently exports nothing must not pass for a cheap one.

Nothing received is stored beyond these counts (span names are route templates and
casb's own step names: bounded, and no PHI). `SinkProcess` is the handle a benchmark
uses to start it, read its stats and stop it.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span

PROTOBUF = "application/x-protobuf"
MAX_BODY = 64 * 1024 * 1024  # an export bigger than this is a bug in the sender
MAX_ERRORS_KEPT = 20
TRACES_RESPONSE = ExportTraceServiceResponse().SerializeToString()
METRICS_RESPONSE = ExportMetricsServiceResponse().SerializeToString()
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


# -- counting (pure) ---------------------------------------------------------------------


@dataclass
class Tally:
    """What the sink has received so far."""

    requests: Counter[str] = field(default_factory=Counter)  # "traces" / "metrics"
    body_bytes: int = 0
    spans_by_kind: Counter[str] = field(default_factory=Counter)
    spans_by_name: Counter[str] = field(default_factory=Counter)
    points_by_metric: Counter[str] = field(default_factory=Counter)
    # metric name -> attribute set -> latest cumulative value (monotonic sums only)
    latest_sums: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)
    refused: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT

    def add_traces(self, req: ExportTraceServiceRequest) -> None:
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans_by_kind[Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_")] += 1
                    self.spans_by_name[s.name] += 1

    def add_metrics(self, req: ExportMetricsServiceRequest) -> None:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    which = m.WhichOneof("data")
                    if which is None:
                        continue
                    data = getattr(m, which)
                    self.points_by_metric[m.name] += len(data.data_points)
                    if (
                        which == "sum"
                        and data.is_monotonic
                        and data.aggregation_temporality
                        == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
                    ):
                        latest = self.latest_sums.setdefault(m.name, {})
                        for p in data.data_points:
                            key = tuple(sorted((kv.key, str(kv.value)) for kv in p.attributes))
                            value = p.as_int if p.HasField("as_int") else p.as_double
                            latest[key] = value

    def refuse(self, error: str) -> None:
        self.refused += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(error)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "body_bytes": self.body_bytes,
            "spans": sum(self.spans_by_kind.values()),
            "spans_by_kind": dict(self.spans_by_kind),
            "spans_by_name": dict(self.spans_by_name),
            "metric_points": sum(self.points_by_metric.values()),
            "points_by_metric": dict(self.points_by_metric),
            "cumulative_sums": {name: sum(v.values()) for name, v in self.latest_sums.items()},
            "refused": self.refused,
            "errors": list(self.errors),
        }


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
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/traces", "/v1/metrics"):
            self._refuse(404, f"POST {path}: unknown path")
            return
        length = int(self.headers.get("Content-Length") or -1)
        if not 0 <= length <= MAX_BODY:
            self._refuse(411, f"POST {path}: Content-Length {length}", close=True)
            return
        wire = self.rfile.read(length)
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != PROTOBUF:
            self._refuse(415, f"POST {path}: content type {content_type!r}")
            return
        tally, lock = self.server.tally, self.server.lock
        try:
            body = decompress(self.headers.get("Content-Encoding", ""), wire)
            if path == "/v1/traces":
                traces = ExportTraceServiceRequest.FromString(body)
                with lock:
                    tally.add_traces(traces)
                response = TRACES_RESPONSE
            else:
                metrics = ExportMetricsServiceRequest.FromString(body)
                with lock:
                    tally.add_metrics(metrics)
                response = METRICS_RESPONSE
        except (ValueError, OSError, EOFError, zlib.error, DecodeError) as exc:
            self._refuse(400, f"POST {path}: {type(exc).__name__}: {exc}")
            return
        with lock:
            tally.requests[path.removeprefix("/v1/")] += 1
            tally.body_bytes += len(body)
        self._answer(200, response, PROTOBUF)

    def do_GET(self) -> None:
        if self.path != "/stats":
            self._refuse(404, f"GET {self.path}: unknown path")
            return
        with self.server.lock:
            stats = self.server.tally.as_dict()
        self._answer(200, json.dumps(stats).encode(), "application/json")

    def _refuse(self, status: int, error: str, close: bool = False) -> None:
        with self.server.lock:
            self.server.tally.refuse(error)
        self._answer(status, b"", "text/plain", close=close)

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
        pass  # quiet: refusals are counted in the stats


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        self.tally = Tally()
        self.lock = threading.Lock()
        super().__init__(address, _Handler)


def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = _Server((host, port))

    def stop(signum: int, _frame: object) -> None:
        # shutdown() waits for serve_forever to return: not from its own thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound = server.server_address[1]
    print(f"otlp_sink: listening on http://{host}:{bound}", file=sys.stderr, flush=True)
    with server:
        server.serve_forever(poll_interval=0.2)


# -- the handle for a parent process ----------------------------------------------------


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class SinkProcess:
    """The sink as a child process on a given loopback port."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The base URL for OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> SinkProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"otlp_sink exited during start-up: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"otlp_sink not listening after {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        return self

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}/stats", timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=4318, help="port (default 4318; 0: any)")
    args = parser.parse_args(argv)
    serve(args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
