"""The test OTLP/HTTP receiver (tests/support/otlp.py) against the real OpenTelemetry
SDK and its OTLP/HTTP exporters: what the SDK sends is what the receiver reports."""

from __future__ import annotations

import gzip

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.support import otlp
from tests.support.otlp import OtlpReceiver

otlp_receiver = otlp.otlp_receiver  # the fixture, for this module

RESOURCE = Resource.create({"service.name": "casb-test", "deployment.environment": "unit"})


def tracer_provider(receiver: OtlpReceiver) -> TracerProvider:
    provider = TracerProvider(resource=RESOURCE)
    exporter = OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def test_a_span_with_attributes_and_a_child_round_trips(otlp_receiver: OtlpReceiver) -> None:
    provider = tracer_provider(otlp_receiver)
    tracer = provider.get_tracer("casb.test-scope")
    with tracer.start_as_current_span(
        "GET /pacs/studies",
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "GET",
            "http.response.status_code": 503,
            "casb.ratio": 0.25,
            "casb.allowed": False,
            "casb.dlp.rules": ["private_tag", "free_text.ssn"],
            "casb.counts": [1, 2, 3],
        },
    ) as server:
        with tracer.start_as_current_span("casb.identity") as child:
            child.add_event("checked")
        server.set_status(Status(StatusCode.ERROR, "upstream down"))
    provider.shutdown()

    (got,) = otlp_receiver.wait_for_spans(lambda s: s.name == "GET /pacs/studies")
    ctx = server.get_span_context()
    assert got.trace_id == f"{ctx.trace_id:032x}" and got.span_id == f"{ctx.span_id:016x}"
    assert got.parent_span_id == "" and got.kind == "SERVER"
    assert got.attributes == {
        "http.request.method": "GET",
        "http.response.status_code": 503,
        "casb.ratio": 0.25,
        "casb.allowed": False,
        "casb.dlp.rules": ["private_tag", "free_text.ssn"],
        "casb.counts": [1, 2, 3],
    }
    assert (got.status_code, got.status_message) == ("ERROR", "upstream down")
    assert got.resource["service.name"] == "casb-test"
    assert got.resource["deployment.environment"] == "unit"
    assert got.scope == "casb.test-scope"
    assert 0 < got.start_ns <= got.end_ns

    (kid,) = otlp_receiver.children(got)
    assert kid.name == "casb.identity" and kid.kind == "INTERNAL"
    assert kid.parent_span_id == got.span_id and kid.trace_id == got.trace_id
    assert kid.events == ("checked",) and kid.status_code == "UNSET"
    assert [s.name for s in otlp_receiver.trace(got.trace_id)] == [got.name, kid.name]
    assert otlp_receiver.errors == []
    # Every export is kept raw, and its protobuf holds the strings the spans carried.
    assert {p.path for p in otlp_receiver.payloads} == {"/v1/traces"}
    assert any(b"free_text.ssn" in p.body for p in otlp_receiver.payloads)


def test_gzip_compressed_exports_are_decoded(otlp_receiver: OtlpReceiver) -> None:
    provider = TracerProvider(resource=RESOURCE)
    exporter = OTLPSpanExporter(
        endpoint=f"{otlp_receiver.endpoint}/v1/traces", compression=Compression.Gzip
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("gz")
    for n in range(5):
        with tracer.start_as_current_span(f"span-{n}", attributes={"n": n}):
            pass
    provider.shutdown()  # flushes the batch

    spans = otlp_receiver.wait_for_spans(lambda s: s.name.startswith("span-"), count=5)
    assert sorted(s.attributes["n"] for s in spans) == [0, 1, 2, 3, 4]
    payload = otlp_receiver.payloads[0]
    assert payload.headers["content-encoding"] == "gzip"
    assert payload.headers["content-type"] == "application/x-protobuf"
    assert payload.wire != payload.body and gzip.decompress(payload.wire) == payload.body
    assert b"span-0" in payload.body  # the sentinel scan greps the decompressed body


def test_metrics_arrive_as_cumulative_points(otlp_receiver: OtlpReceiver) -> None:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{otlp_receiver.endpoint}/v1/metrics"),
        export_interval_millis=60_000,  # exported by force_flush below, not by the timer
    )
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    meter = provider.get_meter("casb")
    requests = meter.create_counter("casb.requests")
    duration = meter.create_histogram("http.server.request.duration", unit="s")
    allow = {"casb.action": "search", "casb.decision": "allow"}
    requests.add(2, allow)
    requests.add(1, allow)
    requests.add(1, {"casb.action": "store", "casb.decision": "deny"})
    duration.record(0.5, allow)
    duration.record(1.5, allow)
    provider.force_flush()

    otlp_receiver.wait_for_points(lambda p: p.metric == "http.server.request.duration")
    counts = {
        p.attributes["casb.action"]: p.value for p in otlp_receiver.latest_points("casb.requests")
    }
    assert counts == {"search": 3, "store": 1}
    (req,) = [p for p in otlp_receiver.points if p.attributes == allow and p.kind == "sum"]
    assert req.temporality == "CUMULATIVE" and req.monotonic is True
    (hist,) = otlp_receiver.latest_points("http.server.request.duration")
    assert (hist.kind, hist.unit, hist.count, hist.sum) == ("histogram", "s", 2, 2.0)
    assert hist.attributes == allow and hist.resource["service.name"] == "casb-test"

    # A second export of cumulative counters: latest_points gives the new totals.
    requests.add(4, allow)
    provider.force_flush()
    otlp_receiver.wait_until(
        lambda: any(p.value == 7 for p in otlp_receiver.latest_points("casb.requests")),
        timeout=10,
        what="the second cumulative export",
    )
    provider.shutdown()


def test_the_sdk_finds_the_receiver_from_its_env(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """receiver.env() is what a child process gets: the exporter reads it and appends
    the signal path itself."""
    for name, value in otlp_receiver.env().items():
        monkeypatch.setenv(name, value)
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
    with provider.get_tracer("env").start_as_current_span("from-env"):
        pass
    provider.shutdown()
    otlp_receiver.wait_for_spans(lambda s: s.name == "from-env")


def test_what_a_collector_would_refuse_is_refused_and_recorded(
    otlp_receiver: OtlpReceiver,
) -> None:
    url = otlp_receiver.endpoint
    with httpx.Client() as http:
        ok = http.post(
            f"{url}/v1/traces",
            content=b"",
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert ok.status_code == 200  # an empty export request is valid protobuf
        assert ok.headers["content-type"] == "application/x-protobuf"
        assert ok.content == ExportTraceServiceResponse().SerializeToString()
        r = http.post(f"{url}/v1/traces", json={"resourceSpans": []})
        assert r.status_code == 415
        r = http.post(
            f"{url}/v1/traces",
            content=b"\xff\xff\xff not protobuf",
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert r.status_code == 400
        r = http.post(
            f"{url}/v1/metrics",
            content=b"not gzip",
            headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
        )
        assert r.status_code == 400
        r = http.post(f"{url}/v2/traces", content=b"")
        assert r.status_code == 404
    errors = otlp_receiver.errors
    assert len(errors) == 4 and "JSON" in errors[0] and "unknown path" in errors[3]
    assert len(otlp_receiver.payloads) == 1 and otlp_receiver.spans == []
    assert otlp_receiver.connections >= 1


def test_waiting_fails_at_the_deadline_with_what_did_arrive(otlp_receiver: OtlpReceiver) -> None:
    provider = tracer_provider(otlp_receiver)
    with provider.get_tracer("t").start_as_current_span("the-only-span"):
        pass
    provider.shutdown()
    otlp_receiver.wait_for_spans(lambda s: s.name == "the-only-span")
    with pytest.raises(AssertionError, match="the-only-span"):
        otlp_receiver.wait_for_spans(lambda s: s.name == "never-sent", timeout=0.3)
