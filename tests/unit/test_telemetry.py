"""Telemetry through the real pipeline (no mitmproxy): spans captured by the SDK's own
in-memory exporter, metrics by its in-memory reader. The OTLP wire is tested end to end
in tests/integration/test_telemetry_through_proxy.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from casb.exchange import Forward, Refusal
from casb.runtime import Runtime
from casb.telemetry import (
    Telemetry,
    TelemetryError,
    export_choice,
    pseudonym,
)
from tests.jwks_server import TestKey
from tests.unit.test_pipeline import make_runtime, request, token

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
KEY = b"k" * 32


@pytest.fixture(scope="module")
def key() -> TestKey:
    return TestKey.generate("ES256")


class Captured:
    def __init__(self, rt: Runtime) -> None:
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.telemetry = Telemetry(
            tracer_provider=tracer_provider,
            meter_provider=MeterProvider(metric_readers=[self.reader]),
            pseudonym_key=KEY,
            route_prefixes={"pacs": "/pacs", "research": "/research"},
        )
        rt.pipeline.telemetry = self.telemetry

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        for p in metric.data.data_points:
                            found.append((dict(p.attributes or {}), p))
        return found


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_an_allowed_request_is_one_trace_with_a_span_per_check(
    tmp_path: Path, key: TestKey
) -> None:
    rt = make_runtime(tmp_path, key)
    cap = Captured(rt)
    tx = await rt.pipeline.decide(
        request(
            "/pacs/studies/1.2.3/series",
            token(key, ["radiologist"], sub="dr-house"),
            traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        )
    )
    assert isinstance(tx.outcome, Forward)
    traceparent = cap.telemetry.upstream_started(tx, "pacs.example.org", 8443, "https")
    cap.telemetry.upstream_finished(tx, 200)
    rt.pipeline.finish(tx, status=200, bytes_out=10)

    spans = cap.finished()
    server = by_name(spans, "GET /pacs/studies/{study}/series")
    assert len(server) == 1, [s.name for s in spans]
    root = server[0]
    assert root.kind is SpanKind.SERVER
    # the client's trace is continued
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_SPAN
    assert tx.trace_id == CLIENT_TRACE
    children = [
        s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id
    ]
    names = [s.name for s in sorted(children, key=lambda s: s.start_time or 0)]
    assert names == [
        "casb.identity",
        "casb.revocation",
        "casb.classify",
        "casb.policy",
        "casb.encryption",
        "GET",
    ]
    client = by_name(spans, "GET")[0]
    assert client.kind is SpanKind.CLIENT
    assert client.attributes is not None
    assert client.attributes["server.address"] == "pacs.example.org"
    assert client.attributes["http.response.status_code"] == 200
    # what the upstream receives continues OUR trace, with the client span as parent
    assert traceparent == f"00-{CLIENT_TRACE}-{format(client.context.span_id, '016x')}-01"
    attrs = dict(root.attributes or {})
    assert attrs["casb.action"] == "search"
    assert attrs["casb.decision"] == "allow"
    assert attrs["casb.destination"] == "pacs"
    assert attrs["casb.rule_id"] == "radiologist-read"
    assert attrs["http.route"] == "/pacs/studies/{study}/series"
    assert attrs["http.response.status_code"] == 200
    assert attrs["casb.principal"] == pseudonym(KEY, "https://idp.test", "dr-house")
    assert str(attrs["casb.principal"]).startswith("p-")
    dumped = json.dumps([dict(s.attributes or {}) for s in spans])
    assert "dr-house" not in dumped and "1.2.3" not in dumped  # no subject, no UID
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert record["trace_id"] == CLIENT_TRACE


async def test_a_refusal_ends_its_span_with_the_error_and_no_upstream_call(
    tmp_path: Path, key: TestKey
) -> None:
    rt = make_runtime(tmp_path, key)
    cap = Captured(rt)
    tx = await rt.pipeline.decide(request("/pacs/studies", "not.a.token"))
    assert isinstance(tx.outcome, Refusal)
    rt.pipeline.finish(tx, status=401)
    spans = cap.finished()
    root = next(s for s in spans if s.kind is SpanKind.SERVER)
    attrs = dict(root.attributes or {})
    assert attrs["casb.decision"] == "deny"
    assert attrs["casb.error"] == "unauthenticated"
    assert "casb.principal" not in attrs
    # a fresh trace (no traceparent), and the identity step failed
    assert root.parent is None
    assert [s.name for s in spans if s.kind is SpanKind.CLIENT] == []
    assert by_name(spans, "casb.identity")


async def test_a_dlp_upload_gets_a_span_per_inspected_instance(
    tmp_path: Path, key: TestKey
) -> None:
    from tests.support.dicom_corpus import ct_dataset, encode_instance

    rt = make_runtime(
        tmp_path,
        key,
        destinations={
            "pacs": {"upstream": "https://pacs.example.org/dw"},
            "research": {"upstream": "https://research.example.org/dw"},
        },
    )
    cap = Captured(rt)
    tx = await rt.pipeline.decide(
        request(
            "/research/studies",
            token(key, ["researcher"]),
            method="POST",
            **{"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
    )
    assert isinstance(tx.outcome, Forward) and tx.outcome.dlp is not None, tx.reasons
    inspector = tx.outcome.dlp.inspector()
    for _ in range(2):
        verdict = inspector.inspect(encode_instance(ct_dataset()), True)
        assert verdict.action in ("forward", "deidentified", "block")
    rt.pipeline.finish(tx, status=200)
    dlp = by_name(cap.finished(), "casb.dlp")
    assert len(dlp) == 2
    for span in dlp:
        attrs = dict(span.attributes or {})
        assert attrs["casb.dlp.verdict"] in ("forward", "deidentified", "block")
        assert isinstance(attrs["casb.dlp.findings"], int)


async def test_metrics_count_requests_by_outcome(tmp_path: Path, key: TestKey) -> None:
    rt = make_runtime(tmp_path, key)
    cap = Captured(rt)
    for tok in (token(key, ["radiologist"]), "garbage"):
        tx = await rt.pipeline.decide(request("/pacs/studies", tok))
        rt.pipeline.finish(tx, status=200 if tx.allowed else 401, bytes_out=5 if tx.allowed else 40)
    counted = {
        (a["casb.decision"], a["http.response.status_code"]): p.value
        for a, p in cap.points("casb.requests")
    }
    assert counted == {("allow", 200): 1, ("deny", 401): 1}
    durations = cap.points("http.server.request.duration")
    assert sum(p.count for _, p in durations) == 2
    assert sum(p.value for _, p in cap.points("casb.bytes_out")) == 45
    audited = {a["type"]: p.value for a, p in cap.points("casb.audit.records")}
    assert audited == {"request": 2}


def test_exporter_choice_follows_the_otel_variables() -> None:
    assert export_choice("traces", {}).exporter == "none"
    otlp = export_choice("traces", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert (otlp.exporter, otlp.protocol) == ("otlp", "http/protobuf")
    grpc = export_choice(
        "metrics",
        {
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        },
    )
    assert (grpc.exporter, grpc.protocol) == ("otlp", "grpc")
    assert export_choice("traces", {"OTEL_TRACES_EXPORTER": "console"}).exporter == "console"
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}
    assert export_choice("traces", off).exporter == "none"
    assert (
        export_choice(
            "traces", {"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_TRACES_EXPORTER": "none"}
        ).exporter
        == "none"
    )
    with pytest.raises(TelemetryError, match="OTEL_TRACES_EXPORTER"):
        export_choice("traces", {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TelemetryError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        export_choice(
            "traces", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "udp"}
        )


def test_without_exporters_every_call_is_a_no_op(tmp_path: Path) -> None:
    t = Telemetry.from_env({})
    assert not t.tracing
    t.shutdown()


def test_pseudonyms_are_keyed_and_stable() -> None:
    a = pseudonym(KEY, "iss", "alice")
    assert a == pseudonym(KEY, "iss", "alice")
    assert a != pseudonym(b"other-key-0123456789", "iss", "alice")
    assert a != pseudonym(KEY, "other-iss", "alice")
    assert len(a) == 18 and "alice" not in a


def test_the_clients_trace_id_follows_w3c_trace_context() -> None:
    from casb.telemetry import client_trace_id

    good = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert client_trace_id([("TraceParent", good)]) == CLIENT_TRACE
    for headers in (
        [],
        [("traceparent", "garbage")],
        [("traceparent", f"00-{'0' * 32}-{CLIENT_SPAN}-01")],  # all-zero trace id
        [("traceparent", f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01")],  # forbidden version
        [("traceparent", good), ("traceparent", good)],  # repeated: none (W3C 3.2)
    ):
        assert client_trace_id(headers) is None, headers


async def test_a_telemetry_failure_never_reaches_the_request(tmp_path: Path, key: TestKey) -> None:
    """finish() runs after the audit record is written: an exporter or instrument that
    raises must not turn into an error for a request the record says was answered."""
    rt = make_runtime(tmp_path, key)
    cap = Captured(rt)

    class Broken:
        def add(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("instrument broke")

    assert cap.telemetry._metrics is not None
    cap.telemetry._metrics.requests = Broken()  # type: ignore[assignment]
    tx = await rt.pipeline.decide(request("/pacs/studies", token(key, ["radiologist"])))
    rt.pipeline.finish(tx, status=200)  # does not raise
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert record["request_id"] == tx.request_id and record["status"] == 200
