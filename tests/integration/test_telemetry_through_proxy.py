"""OpenTelemetry end to end: real clients -> real mitmdump with the casb addon -> a
recording HTTP hop -> real Orthanc, the proxy exporting OTLP/HTTP to a real receiver
(tests/support/otlp.py) that decodes what arrives with opentelemetry-proto.

Checks the contract of issue 6 (casb/telemetry.py): one trace per request with a SERVER
span, its INTERNAL children in pipeline order (identity, classify, policy, encryption,
one casb.dlp per inspected instance) and a CLIENT span for the upstream call whose
context the upstream receives in `traceparent`; the client's traceparent is continued;
attributes follow the semantic conventions plus casb.*, with the principal as a keyed
pseudonym; the audit record names the same trace; metrics arrive with their attributes;
and without OTEL_* settings nothing is exported at all.

The hop between proxy and Orthanc (`RecordingHop`) is a real HTTP server that records the
headers of every request it relays: that is how the test sees the upstream's view.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import secrets
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.integration.conftest import Mint, casb_config
from tests.jwks_server import JwksServer
from tests.support.orthanc import Orthanc
from tests.support.otlp import OtlpReceiver, ReceivedPoint, ReceivedSpan, port_is_free
from tests.support.proxy import CasbProxy

pytestmark = pytest.mark.integration

PSEUDONYM = re.compile(r"^p-[0-9a-f]{16}$")
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
PIPELINE = ["casb.identity", "casb.revocation", "casb.classify", "casb.policy", "casb.encryption"]
# Never on a span (contract): raw URLs, queries, client addresses, headers, bodies.
FORBIDDEN_ATTRIBUTES = ("url.full", "url.query", "url.path", "client.address")
FAIL_HEADER = "X-Test-Upstream-Status"  # makes the hop answer this status itself
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={b}'
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


# -- the recording hop -------------------------------------------------------------------


@dataclass(frozen=True)
class Relayed:
    method: str
    path: str
    headers: dict[str, list[str]]  # lower-case name -> every value


class _HopHandler(BaseHTTPRequestHandler):
    server: _HopServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._relay()

    def do_HEAD(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def do_DELETE(self) -> None:
        self._relay()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _relay(self) -> None:
        body = self._read_body()
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        self.server.hop.record(Relayed(self.command, self.path, headers))
        forced = self.headers.get(FAIL_HEADER)
        if forced:
            self._send(int(forced), [("Content-Type", "text/plain")], b"forced by the test")
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.hop.target_port, timeout=30)
        try:
            out = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            out["Host"] = f"127.0.0.1:{self.server.hop.target_port}"
            conn.request(self.command, self.path, body=body or None, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            pairs = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            self._send(resp.status, pairs, data)
        finally:
            conn.close()

    def _send(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HopServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hop: RecordingHop) -> None:
        self.hop = hop
        super().__init__(("127.0.0.1", 0), _HopHandler)


class RecordingHop:
    """A real HTTP server between the proxy and Orthanc: records, then relays."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._lock = threading.Lock()
        self._seen: list[Relayed] = []
        self._server = _HopServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, r: Relayed) -> None:
        with self._lock:
            self._seen.append(r)

    def with_trace(self, trace_id: str) -> list[Relayed]:
        with self._lock:
            return [
                r
                for r in self._seen
                if any(v.split("-")[1:2] == [trace_id] for v in r.headers.get("traceparent", []))
            ]

    def __enter__(self) -> RecordingHop:
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def hop(orthanc: Orthanc) -> Iterator[RecordingHop]:
    with RecordingHop(orthanc.port) as h:
        yield h


def telemetry_config(workdir: Path, jwks_url: str, upstream: str) -> dict[str, Any]:
    config = casb_config(workdir, jwks_url, upstream)
    key = workdir / "pseudonym.key"
    key.write_text(secrets.token_hex(32))
    config["telemetry"] = {"pseudonym_key_file": str(key)}
    return config


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory,
    jwks: JwksServer,
    hop: RecordingHop,
    receiver: OtlpReceiver,
) -> Iterator[CasbProxy]:
    workdir = tmp_path_factory.mktemp("casb-otel")
    config = telemetry_config(workdir, jwks.url, f"{hop.url}/dicom-web")
    env = {**receiver.env(), "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=casb-it"}
    with CasbProxy(workdir, config, env=env) as px:
        yield px


# -- helpers -----------------------------------------------------------------------------


def traceparent() -> tuple[str, str, str]:
    """A client's own W3C trace context: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def server_span(receiver: OtlpReceiver, request_id: str) -> ReceivedSpan:
    (span,) = receiver.wait_for_spans(
        lambda s: s.kind == "SERVER" and s.attributes.get("casb.request_id") == request_id,
        timeout=10,
    )
    return span


def children(
    receiver: OtlpReceiver, parent: ReceivedSpan, internal: list[str], clients: int
) -> tuple[list[ReceivedSpan], list[ReceivedSpan]]:
    """(INTERNAL children in start order, CLIENT children) of `parent`, once they are
    exactly the expected ones (spans of one request may come in separate exports)."""
    got: tuple[list[ReceivedSpan], list[ReceivedSpan]] = ([], [])

    def complete() -> bool:
        nonlocal got
        kids = receiver.children(parent)
        got = (
            [s for s in kids if s.kind == "INTERNAL"],
            [s for s in kids if s.kind == "CLIENT"],
        )
        return [s.name for s in got[0]] == internal and len(got[1]) == clients

    receiver.wait_until(
        complete, timeout=10, what=f"children {internal} + {clients} CLIENT of {parent.name}"
    )
    return got


def whole_trace_is(receiver: OtlpReceiver, server: ReceivedSpan) -> None:
    """The trace holds this SERVER span and its direct children, nothing else."""
    others = [
        s
        for s in receiver.trace(server.trace_id)
        if s.span_id != server.span_id and s.parent_span_id != server.span_id
    ]
    assert others == [], others


def no_raw_request_data(span: ReceivedSpan, *values: str) -> None:
    for name in FORBIDDEN_ATTRIBUTES:
        assert name not in span.attributes, (span.name, name)
    for name in span.attributes:
        assert not name.startswith(("http.request.header.", "http.response.header.")), name
    text = repr(span.attributes) + span.name + span.status_message
    for value in values:
        assert value not in text, (span.name, value)


def record_of(proxy: CasbProxy, request_id: str) -> dict[str, Any]:
    (record,) = [r for r in proxy.audit_records() if r["request_id"] == request_id]
    return record


def auth(mint: Mint, sub: str, *roles: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(sub, list(roles))}"}


def ct(study: str, number: int, marker: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName = "Tracer^Tessa"
    ds.PatientID = "TRC" + uuid.uuid4().hex[:8]
    ds.PatientBirthDate = "19500101"
    ds.StudyDate = "20240301"
    ds.Modality = "CT"
    ds.SeriesDescription = marker
    ds.InstanceNumber = number
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(128)
    return ds


def stow_body(datasets: Sequence[Dataset]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        parts.append(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + buf.getvalue()
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), STOW_TYPE.format(b=boundary)


# -- traces ------------------------------------------------------------------------------


def test_a_search_is_one_trace_continuing_the_clients_and_carried_upstream(
    traced: CasbProxy, receiver: OtlpReceiver, hop: RecordingHop, mint: Mint
) -> None:
    study = generate_uid()
    header, client_trace, client_span = traceparent()
    r = httpx.get(
        f"{traced.url}/pacs/studies",
        params={"StudyInstanceUID": study},
        headers={**auth(mint, "rad-otel-1", "radiologist"), "traceparent": header},
    )
    assert r.status_code == 200, r.text
    request_id = r.headers["x-request-id"]

    server = server_span(receiver, request_id)
    # The client's trace is continued: same trace id, our span the child of theirs.
    assert server.trace_id == client_trace
    assert server.parent_span_id == client_span
    assert server.name == "GET /pacs/studies"
    a = server.attributes
    assert a["http.request.method"] == "GET"
    assert a["http.route"] == "/pacs/studies"
    assert a["url.scheme"] == "http"
    assert a["http.response.status_code"] == 200
    assert (a["casb.action"], a["casb.destination"], a["casb.decision"]) == (
        "search",
        "pacs",
        "allow",
    )
    assert a["casb.rule_id"] == "radiologist-read"
    assert "casb.error" not in a and "casb.dlp.findings" not in a
    assert PSEUDONYM.match(a["casb.principal"]), a["casb.principal"]
    assert a["casb.principal"] != "p-" + hashlib.sha256(b"rad-otel-1").hexdigest()[:16]
    assert server.status_code != "ERROR"
    assert server.resource["service.name"] == "casb"
    assert server.resource["deployment.environment"] == "casb-it"
    no_raw_request_data(server, study, "rad-otel-1", "StudyInstanceUID")

    internal, (upstream,) = children(receiver, server, PIPELINE, clients=1)
    for span in internal:
        assert span.trace_id == client_trace
        assert server.start_ns <= span.start_ns <= span.end_ns <= server.end_ns
        no_raw_request_data(span, study, "rad-otel-1")
    assert internal[-1].end_ns <= upstream.start_ns  # decided before forwarding
    assert upstream.name == "GET"
    u = upstream.attributes
    hop_port = int(hop.url.rsplit(":", 1)[1])
    assert (u["http.request.method"], u["url.scheme"]) == ("GET", "http")
    assert (u["server.address"], u["server.port"]) == ("127.0.0.1", hop_port)
    assert (u["casb.destination"], u["http.response.status_code"]) == ("pacs", 200)
    no_raw_request_data(upstream, study)
    whole_trace_is(receiver, server)

    # The upstream got OUR context: same trace, parent = the CLIENT span (the client's
    # own traceparent was replaced, not passed along).
    (relayed,) = hop.with_trace(client_trace)
    (sent,) = relayed.headers["traceparent"]
    m = TRACEPARENT.match(sent)
    assert m is not None, sent
    assert (m.group(1), m.group(2)) == (client_trace, upstream.span_id)
    assert client_span not in sent

    # The audit record names the same trace.
    assert record_of(traced, request_id)["trace_id"] == server.trace_id


def test_a_deidentified_upload_has_a_dlp_span_per_instance(
    traced: CasbProxy, receiver: OtlpReceiver, hop: RecordingHop, mint: Mint
) -> None:
    study = generate_uid()
    instances = [ct(study, n, "otel-" + uuid.uuid4().hex[:8]) for n in (1, 2)]
    body, content_type = stow_body(instances)
    r = httpx.post(
        f"{traced.url}/research/studies",
        content=body,
        headers={
            **auth(mint, "res-otel-1", "researcher"),
            "Content-Type": content_type,
            "Accept": "application/dicom+json",
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    request_id = r.headers["x-request-id"]
    record = record_of(traced, request_id)
    assert record["dlp"]["deidentified"] == 2

    server = server_span(receiver, request_id)  # no client traceparent: a new trace
    assert server.parent_span_id == "" and server.trace_id == record["trace_id"]
    assert server.name == "POST /research/studies"
    a = server.attributes
    assert (a["casb.action"], a["casb.destination"], a["casb.decision"]) == (
        "store",
        "research",
        "allow",
    )
    assert a["casb.rule_id"] == "researcher-store"
    assert a["http.response.status_code"] == 200
    assert a["casb.policy_version"] == record["policy_version"]
    findings_in_record = sum(f["count"] for f in record["dlp"]["findings"])
    assert a["casb.dlp.findings"] == findings_in_record
    assert sorted(a["casb.dlp.rules"]) == record["dlp"]["rules"]

    internal, (upstream,) = children(
        receiver, server, [*PIPELINE, "casb.dlp", "casb.dlp"], clients=1
    )
    dlp = internal[-2:]
    assert [s.attributes["casb.dlp.verdict"] for s in dlp] == ["deidentified"] * 2
    assert sum(s.attributes["casb.dlp.findings"] for s in dlp) == findings_in_record
    assert {r for s in dlp for r in s.attributes["casb.dlp.rules"]} == set(record["dlp"]["rules"])
    assert (upstream.name, upstream.attributes["casb.destination"]) == ("POST", "research")
    whole_trace_is(receiver, server)
    for span in [server, *internal, upstream]:
        no_raw_request_data(
            span,
            study,
            "Tracer",
            *(ds.PatientID for ds in instances),
            *(ds.SOPInstanceUID for ds in instances),
        )
    (relayed,) = hop.with_trace(server.trace_id)
    assert relayed.method == "POST"
    m = TRACEPARENT.match(relayed.headers["traceparent"][0])
    assert m is not None and m.group(2) == upstream.span_id


def test_a_denied_request_has_a_server_span_with_the_refusal_and_no_upstream_call(
    traced: CasbProxy, receiver: OtlpReceiver, hop: RecordingHop, mint: Mint
) -> None:
    header, client_trace, client_span = traceparent()
    r = httpx.get(
        f"{traced.url}/pacs/studies",
        headers={**auth(mint, "res-otel-2", "researcher"), "traceparent": header},
    )
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    server = server_span(receiver, r.headers["x-request-id"])
    assert (server.trace_id, server.parent_span_id) == (client_trace, client_span)
    a = server.attributes
    assert (a["casb.decision"], a["casb.error"], a["http.response.status_code"]) == (
        "deny",
        "forbidden",
        403,
    )
    assert (a["casb.action"], a["casb.destination"]) == ("search", "pacs")
    assert "casb.rule_id" not in a  # denied by default: no rule matched
    assert PSEUDONYM.match(a["casb.principal"])
    assert server.status_code != "ERROR"  # a refusal is not a server error
    # It stopped at the policy: no encryption check, no upstream call.
    children(
        receiver,
        server,
        ["casb.identity", "casb.revocation", "casb.classify", "casb.policy"],
        clients=0,
    )
    assert hop.with_trace(client_trace) == []
    assert record_of(traced, r.headers["x-request-id"])["trace_id"] == client_trace


def test_refusals_before_a_principal_or_a_route_is_known(
    traced: CasbProxy, receiver: OtlpReceiver, mint: Mint
) -> None:
    # No token: no principal, so no pseudonym.
    r = httpx.get(f"{traced.url}/pacs/studies", headers={"traceparent": "00-" + "0" * 32 + "-"})
    assert r.status_code == 401
    unauth = server_span(receiver, r.headers["x-request-id"])
    assert unauth.parent_span_id == ""  # an invalid traceparent starts a new trace
    assert unauth.attributes["casb.error"] == "unauthenticated"
    assert unauth.attributes["casb.decision"] == "deny"
    assert "casb.principal" not in unauth.attributes
    # An unknown destination: no route template, so the span is named by the method only
    # (the raw path, which a client chose, must not become the name).
    secret_path = "/elsewhere-" + uuid.uuid4().hex + "/studies"
    r = httpx.get(traced.url + secret_path, headers=auth(mint, "adm-otel", "admin"))
    assert r.status_code == 403 and r.json()["error"] == "unknown_destination"
    unknown = server_span(receiver, r.headers["x-request-id"])
    assert unknown.name == "GET"
    assert "http.route" not in unknown.attributes
    assert unknown.attributes["casb.error"] == "unknown_destination"
    no_raw_request_data(unknown, secret_path.split("/")[1])
    # Same subject, same pseudonym; another subject, another one.
    a = httpx.get(f"{traced.url}/research/studies", headers=auth(mint, "res-otel-3", "researcher"))
    b = httpx.get(f"{traced.url}/research/studies", headers=auth(mint, "res-otel-3", "researcher"))
    c = httpx.get(f"{traced.url}/research/studies", headers=auth(mint, "res-otel-4", "researcher"))
    pa, pb, pc = (
        server_span(receiver, x.headers["x-request-id"]).attributes["casb.principal"]
        for x in (a, b, c)
    )
    assert pa == pb != pc


def test_an_upstream_5xx_makes_the_server_span_an_error(
    traced: CasbProxy, receiver: OtlpReceiver, mint: Mint
) -> None:
    r = httpx.get(
        f"{traced.url}/pacs/studies",
        headers={**auth(mint, "rad-otel-2", "radiologist"), FAIL_HEADER: "503"},
    )
    assert r.status_code == 503
    server = server_span(receiver, r.headers["x-request-id"])
    assert server.status_code == "ERROR"
    assert server.attributes["http.response.status_code"] == 503
    assert server.attributes["error.type"]
    assert server.attributes["casb.decision"] == "allow"  # it was forwarded
    _, (upstream,) = children(receiver, server, PIPELINE, clients=1)
    assert upstream.attributes["http.response.status_code"] == 503


# -- metrics -----------------------------------------------------------------------------


def test_request_metrics_arrive_with_their_attributes(
    traced: CasbProxy, receiver: OtlpReceiver, mint: Mint
) -> None:
    study = generate_uid()
    headers = auth(mint, "rad-otel-3", "radiologist")
    for _ in range(3):
        r = httpx.get(
            f"{traced.url}/pacs/studies", params={"StudyInstanceUID": study}, headers=headers
        )
        assert r.status_code == 200
    denied = httpx.delete(f"{traced.url}/pacs/studies/{study}", headers=headers)
    assert denied.status_code == 403
    body, content_type = stow_body([ct(generate_uid(), 1, "otel-metrics")])
    stored = httpx.post(
        f"{traced.url}/research/studies",
        content=body,
        headers={**auth(mint, "res-otel-6", "researcher"), "Content-Type": content_type},
        timeout=60,
    )
    assert stored.status_code == 200, stored.text

    search_ok = {
        "casb.action": "search",
        "casb.decision": "allow",
        "casb.destination": "pacs",
        "http.response.status_code": 200,
    }

    def totals(metric: str, **attrs: Any) -> list[ReceivedPoint]:
        return [
            p
            for p in receiver.latest_points(metric)
            if all(p.attributes.get(k) == v for k, v in attrs.items())
        ]

    # Cumulative: at least the three searches above (other tests in this module add more).
    receiver.wait_until(
        lambda: any((p.value or 0) >= 3 for p in totals("casb.requests", **search_ok)),
        timeout=10,
        what="casb.requests for the searches",
    )
    (requests_point,) = totals("casb.requests", **search_ok)
    assert requests_point.kind == "sum" and requests_point.monotonic is True
    assert requests_point.temporality == "CUMULATIVE"
    assert set(requests_point.attributes) == set(search_ok)

    receiver.wait_until(
        lambda: bool(totals("casb.requests", **{"casb.action": "delete", "casb.decision": "deny"})),
        timeout=10,
        what="casb.requests for the denied delete",
    )
    (duration,) = totals(
        "http.server.request.duration", **search_ok, **{"http.request.method": "GET"}
    )
    assert (duration.kind, duration.unit) == ("histogram", "s")
    assert duration.count is not None and duration.count >= 3
    assert duration.temporality == "CUMULATIVE"
    upstream = totals("http.client.request.duration", **{"casb.destination": "pacs"})
    assert upstream and all(p.kind == "histogram" and p.unit == "s" for p in upstream)
    bytes_out = totals("casb.bytes_out", **{"casb.destination": "pacs", "casb.action": "search"})
    assert bytes_out and bytes_out[0].unit == "By" and (bytes_out[0].value or 0) > 0
    receiver.wait_until(
        lambda: any(
            (p.value or 0) >= len(body)
            for p in totals(
                "casb.bytes_in", **{"casb.destination": "research", "casb.action": "store"}
            )
        ),
        timeout=10,
        what="casb.bytes_in of the upload",
    )
    audited = totals("casb.audit.records", type="request")
    assert audited and (audited[0].value or 0) >= 5

    # No attribute of any metric carries a UID, a subject or a raw path.
    for p in receiver.points:
        text = repr(p.attributes)
        assert study not in text and "rad-otel" not in text and "/studies/" not in text, p


def test_dlp_findings_are_counted_by_rule_and_direction(
    traced: CasbProxy, receiver: OtlpReceiver, mint: Mint
) -> None:
    ds = ct(generate_uid(), 1, "otel-findings")
    body, content_type = stow_body([ds])
    r = httpx.post(
        f"{traced.url}/research/studies",
        content=body,
        headers={**auth(mint, "res-otel-5", "researcher"), "Content-Type": content_type},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    rules = record_of(traced, r.headers["x-request-id"])["dlp"]["rules"]
    assert rules  # the sentinel-ish patient module yields findings
    receiver.wait_until(
        lambda: (
            {
                p.attributes.get("casb.dlp.rule")
                for p in receiver.latest_points("casb.dlp.findings")
                if p.attributes.get("casb.dlp.direction") == "request"
            }
            >= set(rules)
        ),
        timeout=10,
        what=f"casb.dlp.findings for rules {rules}",
    )


# -- export on and off -------------------------------------------------------------------


def test_spans_are_flushed_when_the_proxy_stops(
    tmp_path: Path, jwks: JwksServer, orthanc: Orthanc, mint: Mint
) -> None:
    """Batch and metric intervals far longer than the test: what arrives, arrives
    because the proxy flushed at shutdown."""
    with OtlpReceiver() as rx:
        config = telemetry_config(tmp_path, jwks.url, orthanc.dicomweb_url)
        env = rx.env(schedule_delay_ms=600_000, export_interval_ms=600_000)
        px = CasbProxy(tmp_path, config, env=env).start()
        try:
            r = httpx.get(f"{px.url}/pacs/studies", headers=auth(mint, "rad-otel-4", "radiologist"))
            assert r.status_code == 200
        finally:
            px.stop()
        # The process has exited: whatever it exported has been received already.
        request_id = r.headers["x-request-id"]
        servers = [s for s in rx.spans if s.attributes.get("casb.request_id") == request_id]
        assert len(servers) == 1, rx
        assert {s.name for s in rx.children(servers[0])} >= {*PIPELINE, "GET"}
        assert any(p.metric == "casb.requests" for p in rx.points), rx
        assert rx.errors == []


def test_without_otel_settings_nothing_is_exported(
    tmp_path: Path,
    jwks: JwksServer,
    orthanc: Orthanc,
    mint: Mint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No OTEL_* variables: no exporter. Receivers listen on the OTLP default ports
    (4318 HTTP, 4317 gRPC), where a wrongly defaulted exporter would send."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)  # the proxy inherits the test's environment
    defaults = {4318: port_is_free(4318), 4317: port_is_free(4317)}
    if not all(defaults.values()):
        warnings.warn(
            f"OTLP default ports busy {defaults}: checking for exports on free ports only",
            stacklevel=1,
        )
    with (
        OtlpReceiver(port=4318 if defaults[4318] else 0) as http_rx,
        OtlpReceiver(port=4317 if defaults[4317] else 0) as grpc_rx,
    ):
        config = telemetry_config(tmp_path, jwks.url, orthanc.dicomweb_url)
        with CasbProxy(tmp_path, config) as px:
            headers = auth(mint, "rad-otel-5", "radiologist")
            assert httpx.get(f"{px.url}/pacs/studies", headers=headers).status_code == 200
            assert httpx.get(f"{px.url}/research/studies", headers=headers).status_code == 403
        # Stopped: a configured SDK would have flushed spans and metrics by now.
        assert (http_rx.connections, grpc_rx.connections) == (0, 0), (http_rx, grpc_rx)
        # Nor the console exporter: no span or metric JSON in the proxy's output.
        log = px.log()
        assert '"trace_id"' not in log and '"span_id"' not in log and "resource_metrics" not in log
