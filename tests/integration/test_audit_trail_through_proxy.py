"""The audit trail leaving the proxy, end to end: the live syslog sink (RFC 5424 over TLS
and TCP, octet-counted, to a real collector on a loopback port) and `casb audit export`,
with a real mitmdump running the casb addon in front of a real Orthanc.

What the collector receives is checked against the audit log on disk, line by line (seq,
hash, request id), and the ATNA payloads are parsed as XML. A collector that is down when
the proxy starts must neither block nor refuse requests (the log is the spool) and gets
everything, once and in order, when it comes up; a restarted proxy resumes after what the
collector confirmed (the cursor file). Sentinel patient data sent in the requests never
appears in any message or export.

The admin API (/readyz, which reports the sink's lag) is not checked here: CasbProxy runs
`mitmdump -s addons/casb.py`, which has no admin API; the forwarder's warning in the
proxy's log stands in for "the sink is down"."""

from __future__ import annotations

import base64
import binascii
import json
import re
import socket
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.integration.conftest import Mint, casb_config
from tests.jwks_server import JwksServer
from tests.support.audit_keys import public_key
from tests.support.orthanc import Orthanc
from tests.support.pki import tls_files
from tests.support.processes import free_port, port_open
from tests.support.proxy import CasbProxy
from tests.support.syslog_collector import SyslogCollector

pytestmark = pytest.mark.integration

CASB = Path(sys.executable).with_name("casb")
DELIVERY_TIMEOUT = 15.0  # generous: the forwarder's backoff after an outage is 0.5, 1, 2, 4 s
BOM = b"\xef\xbb\xbf"
SD_ID = "casb@32473"

# RFC 5424 section 6 ABNF as regexes: SD-NAME is PRINTUSASCII except '=', SP, ']', '"';
# PARAM-VALUE escapes '"', '\' and ']' with a backslash.
_NAME = rb"[!#-<>-\\^-~]{1,32}"
_VALUE = rb'(?:[^"\\\]]|\\.)*'
_ELEMENT = rb"\[" + _NAME + rb"(?: " + _NAME + rb'="' + _VALUE + rb'")*\]'
SYSLOG_MSG = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>1 "
    rb"(?P<timestamp>[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    rb"(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})) "
    rb"(?P<hostname>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    rb"(?P<msgid>[!-~]{1,32}) (?P<sd>(?:" + _ELEMENT + rb")+) (?P<msg>.*)",
    re.DOTALL,
)
SD_ELEMENT = re.compile(
    rb"\[(?P<id>" + _NAME + rb")(?P<params>(?: " + _NAME + rb'="' + _VALUE + rb'")*)\]'
)
SD_PARAM = re.compile(rb" (" + _NAME + rb')="(' + _VALUE + rb')"')
SEQ_IN_SD = re.compile(rb'\[casb@32473 seq="([0-9]+)"')


# -- what the collector receives --------------------------------------------------------
@dataclass(frozen=True)
class Syslog:
    """One RFC 5424 message, parsed."""

    pri: int
    timestamp: str
    hostname: str
    msgid: str
    sd: dict[str, dict[str, str]]
    payload: bytes  # MSG without its BOM

    @property
    def casb(self) -> dict[str, str]:
        return self.sd[SD_ID]

    @property
    def seq(self) -> int:
        return int(self.casb["seq"])


def parse_syslog(raw: bytes) -> Syslog:
    """Parse (and so check) a message against the RFC 5424 grammar; UTF-8 MSG with BOM."""
    assert b"\n" not in raw and b"\r" not in raw, raw[:120]
    m = SYSLOG_MSG.fullmatch(raw)
    assert m is not None, raw[:200]
    assert 0 <= int(m["pri"]) <= 191
    sd: dict[str, dict[str, str]] = {}
    for element in SD_ELEMENT.finditer(m["sd"]):
        sd_id = element["id"].decode()
        assert sd_id not in sd, "an SD-ID appears twice"
        sd[sd_id] = {
            k.decode(): re.sub(rb"\\(.)", rb"\1", v).decode()
            for k, v in SD_PARAM.findall(element["params"])
        }
    assert m["msg"].startswith(BOM), "MSG is UTF-8 and so starts with the BOM (RFC 5424 6.4)"
    return Syslog(
        pri=int(m["pri"]),
        timestamp=m["timestamp"].decode(),
        hostname=m["hostname"].decode(),
        msgid=m["msgid"].decode(),
        sd=sd,
        payload=m["msg"][len(BOM) :],
    )


def received_seqs(collector: SyslogCollector) -> list[int]:
    """The seq of every message received, in arrival order (cheap: for wait conditions)."""
    out = []
    for r in collector.messages:
        m = SEQ_IN_SD.search(r.message)
        assert m is not None, r.message[:200]
        out.append(int(m[1]))
    return out


def holds(collector: SyslogCollector, wanted: set[int]) -> bool:
    return wanted <= set(received_seqs(collector))


def event_codes(xml: ET.Element) -> tuple[str | None, list[str | None]]:
    """(EventID csd-code, the EventTypeCode csd-codes) of an AuditMessage."""
    ev = xml.find("EventIdentification")
    assert ev is not None
    event_id = ev.find("EventID")
    assert event_id is not None
    return event_id.get("csd-code"), [t.get("csd-code") for t in ev.findall("EventTypeCode")]


def xml_strings(xml: ET.Element) -> Iterator[str]:
    """Every text and attribute value, and the base64-decoded values (ParticipantObjectQuery,
    ParticipantObjectDetail/@value): a leak hidden in base64 is a leak too."""
    for el in xml.iter():
        values = [el.text or "", *el.attrib.values()]
        yield from values
        if el.tag in ("ParticipantObjectQuery", "ParticipantObjectDetail"):
            encoded = el.text if el.tag == "ParticipantObjectQuery" else el.get("value")
            try:
                yield base64.b64decode(encoded or "", validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                pytest.fail(f"{el.tag} is not base64 of UTF-8 text")


# -- the audit log ----------------------------------------------------------------------
def log_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def log_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_lines(path)]


def non_checkpoint_seqs(path: Path) -> set[int]:
    return {r["seq"] for r in log_records(path) if r.get("type") != "checkpoint"}


def cursor_seq(audit_path: Path) -> int | None:
    cursor = Path(f"{audit_path}.syslog-cursor")
    return json.loads(cursor.read_bytes())["seq"] if cursor.exists() else None


def casb_cli(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(CASB), *map(str, args)], capture_output=True, timeout=60)


# -- traffic ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sentinel:
    """Patient data that must never leave the request path."""

    family: str
    given: str
    patient_id: str
    birth_date: str

    @classmethod
    def fresh(cls) -> Sentinel:
        tag = uuid.uuid4().hex[:8]
        return cls(f"Zebulon{tag}", f"Quillon{tag}", f"SPID{tag}", "19020304")

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"

    def values(self) -> tuple[str, ...]:
        return (self.family, self.given, self.patient_id, self.birth_date)

    def assert_absent(self, text: str, where: str) -> None:
        lowered = text.lower()
        for value in self.values():
            assert value.lower() not in lowered, f"sentinel {value!r} found in {where}"


def instance(sentinel: Sentinel) -> Dataset:
    """pydicom's CT_small with new UIDs and the sentinel's patient data (no private tags:
    hospital.yaml's clinical-upload profile blocks them)."""
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = sentinel.name
    ds.PatientID = sentinel.patient_id
    ds.PatientBirthDate = sentinel.birth_date
    ds.remove_private_tags()
    return ds


def dicomweb(proxy: CasbProxy, token: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{proxy.url}/pacs", headers={"Authorization": f"Bearer {token}"})


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class TlsRun:
    """A proxy whose audit log goes to a TLS collector, after a mix of requests."""

    proxy: CasbProxy
    collector: SyslogCollector
    sentinel: Sentinel
    stored: Dataset  # the instance the radiologist stored
    search_id: str  # request ids of the QIDOs, the 401 and the refused STOW
    name_search_id: str
    unauthenticated_id: str
    denied_id: str

    @property
    def audit_path(self) -> Path:
        return self.proxy.audit_path

    def stop_proxy(self) -> None:
        """Stop the proxy (idempotent): it drains the sink and writes its final checkpoint."""
        self.proxy.stop()


@pytest.fixture(scope="module")
def tls_run(
    tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, jwks: JwksServer, mint: Mint
) -> Iterator[TlsRun]:
    workdir = tmp_path_factory.mktemp("audit-tls")
    pki = tls_files(workdir / "pki")
    collector = SyslogCollector(tls=pki.server).start()
    config = casb_config(workdir, jwks.url, orthanc.dicomweb_url)
    config["audit"]["syslog"] = {
        "host": "127.0.0.1",  # the collector certificate's IP SAN
        "port": collector.port,
        "transport": "tls",
        "format": "atna",
        "ca_bundle": str(pki.ca_pem),
    }
    proxy = CasbProxy(workdir, config)
    try:
        proxy.start()
        sentinel = Sentinel.fresh()
        rad = mint("rad-audit", ["radiologist"])
        stored = instance(sentinel)
        # allowed STOW, to the study's URL: audit records carry the UIDs the URL names
        dicomweb(proxy, rad).store_instances(
            datasets=[stored], study_instance_uid=stored.StudyInstanceUID
        )
        with httpx.Client(base_url=proxy.url, timeout=20) as http:
            # allowed QIDO, matching on the sentinel's ID: it finds the stored study, so
            # the sentinel really travelled through the proxy to the PACS and back
            r = http.get(
                "/pacs/studies", params={"PatientID": sentinel.patient_id}, headers=auth(rad)
            )
            assert r.status_code == 200, r.text
            assert [s["0020000D"]["Value"][0] for s in r.json()] == [stored.StudyInstanceUID]
            search_id = r.headers["x-request-id"]
            # and by name (Orthanc's QIDO does not match this PN, so nothing is found)
            r = http.get("/pacs/studies", params={"PatientName": sentinel.name}, headers=auth(rad))
            assert r.status_code == 200, r.text
            name_search_id = r.headers["x-request-id"]
            r = http.get("/pacs/studies", params={"PatientName": sentinel.name})  # 401
            assert r.status_code == 401
            unauthenticated_id = r.headers["x-request-id"]
        ref = dicomweb(proxy, mint("ref-audit", ["referring_physician"]))
        with pytest.raises(requests.HTTPError) as refused:  # a role that may not store
            ref.store_instances(datasets=[instance(sentinel)])
        assert refused.value.response is not None
        assert refused.value.response.status_code == 403
        yield TlsRun(
            proxy,
            collector,
            sentinel,
            stored,
            search_id,
            name_search_id,
            unauthenticated_id,
            refused.value.response.headers["X-Request-Id"],
        )
    finally:
        proxy.stop()
        collector.stop()


# -- 1. live sink over TLS --------------------------------------------------------------
def test_every_record_reaches_the_tls_collector_as_an_atna_message(tls_run: TlsRun) -> None:
    collector = tls_run.collector
    wanted = non_checkpoint_seqs(tls_run.audit_path)
    collector.wait_for(lambda c: holds(c, wanted), timeout=DELIVERY_TIMEOUT)
    assert collector.errors == []

    messages = [parse_syslog(r.message) for r in collector.messages]
    seqs = [m.seq for m in messages]
    # In order, once each: the collector closed every session cleanly, so the forwarder
    # had no reason to send anything again (forwarder.py: only unconfirmed sessions are).
    assert seqs == sorted(set(seqs)), f"out of order or duplicated: {seqs}"
    # every record the log holds now, the checkpoints excepted (they have no ATNA message)
    records = {r["seq"]: r for r in log_records(tls_run.audit_path)}
    assert set(seqs) == {s for s, r in records.items() if r.get("type") != "checkpoint"}

    store = next(
        r for r in records.values() if r.get("action") == "store" and r["decision"] == "allow"
    )
    expected = {  # seq -> (EventID, an EventTypeCode it must carry or None, EventActionCode)
        next(s for s, r in records.items() if r.get("type") == "policy_change"): (
            "110113",
            "110129",
            "E",
        ),
        store["seq"]: ("110104", None, "C"),
    }
    by_request = {r.get("request_id"): s for s, r in records.items()}
    expected[by_request[tls_run.search_id]] = ("110112", None, "E")
    expected[by_request[tls_run.name_search_id]] = ("110112", None, "E")
    expected[by_request[tls_run.denied_id]] = ("110113", "110132", "E")
    expected[by_request[tls_run.unauthenticated_id]] = ("110114", "110122", "E")
    assert len(expected) == 6

    checked = set()
    for m in messages:
        record = records[m.seq]
        assert m.msgid == "IHE+DICOM"
        assert m.hostname == socket.gethostname()
        assert m.casb["hash"] == record["hash"]
        assert m.casb.get("id") == record.get("request_id")
        assert m.timestamp == record["time"]
        xml = ET.fromstring(m.payload)
        assert xml.tag == "AuditMessage"
        event_id, type_codes = event_codes(xml)
        ev = xml.find("EventIdentification")
        assert ev is not None and ev.get("EventDateTime") == record["time"]
        if m.seq in expected:
            want_id, want_type, want_action = expected[m.seq]
            assert event_id == want_id, (m.seq, record.get("type"), record.get("action"))
            assert want_type is None or want_type in type_codes, type_codes
            assert ev.get("EventActionCode") == want_action
            # facility 10; notice for a success, warning for a failure
            failed = record.get("decision") == "deny"
            assert m.pri == (84 if failed else 85)
            checked.add(m.seq)
    assert checked == set(expected)

    # The stored study is the message's "Studies" participant object (by UID, no PHI).
    stored = next(m for m in messages if m.seq == store["seq"])
    objects = ET.fromstring(stored.payload).findall("ParticipantObjectIdentification")
    assert tls_run.stored.StudyInstanceUID in [o.get("ParticipantObjectID") for o in objects]


# -- 2. collector down, then up; proxy restart -------------------------------------------
def test_a_collector_that_is_down_gets_everything_once_and_in_order_when_it_is_back(
    tmp_path: Path, orthanc: Orthanc, jwks: JwksServer, mint: Mint
) -> None:
    port = free_port()
    assert not port_open(port)  # nothing listens there yet
    config = casb_config(tmp_path, jwks.url, orthanc.dicomweb_url)
    config["audit"]["syslog"] = {
        "host": "127.0.0.1",
        "port": port,
        "transport": "tcp",
        "format": "jsonl",  # every record, checkpoints too, as its JSON
    }
    audit_path = Path(config["audit"]["path"])
    collector = SyslogCollector(port=port)
    sentinel = Sentinel.fresh()
    token = mint("rad-spool", ["radiologist"])
    first = CasbProxy(tmp_path, config)
    second = CasbProxy(tmp_path, config)
    try:
        first.start()
        assert first.process is not None
        first.process.wait_until(
            lambda: "syslog delivery failed" in first.log(),
            timeout=10,
            what="the forwarder finding the collector down",
        )
        # The sink being down neither blocks nor refuses requests: the log is the spool.
        with httpx.Client(base_url=first.url, headers=auth(token), timeout=10) as http:
            statuses = [
                http.get("/pacs/studies", params={"PatientName": sentinel.name}).status_code
                for _ in range(5)
            ]
        assert statuses == [200] * 5
        assert cursor_seq(audit_path) in (None, 0)  # nothing confirmed

        collector.start()
        wanted = {r["seq"] for r in log_records(audit_path)}
        collector.wait_for(lambda c: holds(c, wanted), timeout=DELIVERY_TIMEOUT)
        # drains the sink, the final checkpoint included; a shutdown that hangs is
        # killed (-9) and leaves no final checkpoint
        assert first.stop() == 0, "mitmdump did not shut down on SIGTERM"
        lines = log_lines(audit_path)
        last = json.loads(lines[-1])
        assert last["type"] == "checkpoint"
        collector.wait_for(lambda c: holds(c, {last["seq"]}), timeout=DELIVERY_TIMEOUT)
        assert cursor_seq(audit_path) == last["seq"], "the collector confirmed everything"
        connections_before_restart = collector.connections

        # Restart with the same config and log: the chain continues, and the forwarder
        # resumes after the cursor (nothing the collector confirmed is sent again).
        second.start()
        with httpx.Client(base_url=second.url, timeout=10) as http:
            assert http.get("/pacs/studies", headers=auth(token)).status_code == 200
            assert http.get("/pacs/studies").status_code == 401
        wanted = {r["seq"] for r in log_records(audit_path)}
        collector.wait_for(lambda c: holds(c, wanted), timeout=DELIVERY_TIMEOUT)
        assert second.stop() == 0, "mitmdump did not shut down on SIGTERM"
        lines = log_lines(audit_path)
        final = json.loads(lines[-1])
        assert final["type"] == "checkpoint" and final["seq"] > last["seq"]
        collector.wait_for(lambda c: holds(c, {final["seq"]}), timeout=DELIVERY_TIMEOUT)
        assert cursor_seq(audit_path) == final["seq"]
    finally:
        first.stop()
        second.stop()
        collector.stop()

    # Every collector session closed cleanly (it never resets), so every session was
    # confirmed; the forwarder's guarantee then allows no duplicate at all (a record is
    # sent again only after an unconfirmed session), and no gap, and order.
    assert collector.errors == []
    received = collector.messages
    seqs = received_seqs(collector)
    assert Counter(seqs).most_common(1)[0][1] == 1, f"duplicates: {seqs}"
    assert seqs == list(range(1, final["seq"] + 1))
    after_restart = [
        s for r, s in zip(received, seqs, strict=True) if r.connection > connections_before_restart
    ]
    assert after_restart and after_restart[0] == last["seq"] + 1
    records = {r["seq"]: r for r in (json.loads(line) for line in lines)}
    for r in received:
        m = parse_syslog(r.message)
        assert m.msgid == "casb-audit"
        assert json.loads(m.payload) == records[m.seq]  # the record itself
        assert m.casb["hash"] == records[m.seq]["hash"]
        sentinel.assert_absent(r.message.decode("utf-8"), f"syslog message seq {m.seq}")

    # One chain across both runs, each run sealed by its shutdown checkpoint.
    checkpoints = sum(1 for r in records.values() if r["type"] == "checkpoint")
    assert checkpoints == 2
    ok = casb_cli(
        "audit", "verify", "--public-key", public_key(tmp_path), "--max-unsigned", "0", audit_path
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = ok.stdout.decode()
    assert f"OK: {len(records)} records" in out and "2 signed checkpoint(s) verified" in out


# -- 3. compliance export ---------------------------------------------------------------
@dataclass(frozen=True)
class Exports:
    jsonl: bytes
    atna: bytes
    window: tuple[str, str]  # --from, --to


def day(d: date) -> str:
    return d.isoformat()


@pytest.fixture(scope="module")
def exports(tls_run: TlsRun, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    tls_run.stop_proxy()  # the log is complete: the final checkpoint is on it
    times = [datetime.fromisoformat(r["time"]) for r in log_records(tls_run.audit_path)]
    start = min(times).astimezone(UTC).date()  # today (UTC) unless the run crossed midnight
    end = max(times).astimezone(UTC).date() + timedelta(days=1)
    out = tmp_path_factory.mktemp("exports")
    produced = {}
    for fmt in ("jsonl", "atna"):
        target = out / f"audit.{fmt}"
        res = casb_cli(
            "audit",
            "export",
            "--format",
            fmt,
            "--from",
            day(start),
            "--to",
            day(end),
            "--hostname",
            socket.gethostname(),
            "--output",
            target,
            tls_run.audit_path,
        )
        assert res.returncode == 0, res.stderr
        produced[fmt] = target.read_bytes()
    return Exports(produced["jsonl"], produced["atna"], (day(start), day(end)))


def test_export_jsonl_is_the_log_lines_and_atna_one_message_per_record(
    tls_run: TlsRun, exports: Exports, tmp_path: Path
) -> None:
    lines = log_lines(tls_run.audit_path)
    start, end = (datetime.fromisoformat(b + "T00:00:00+00:00") for b in exports.window)
    in_range = [
        line for line in lines if start <= datetime.fromisoformat(json.loads(line)["time"]) < end
    ]
    assert in_range == lines  # the window spans the whole run
    assert exports.jsonl.splitlines(keepends=True) == in_range  # byte for byte

    # A window after the run exports nothing: the window is applied, not ignored.
    later = (end + timedelta(days=1)).date()
    res = casb_cli(
        "audit",
        "export",
        "--format",
        "jsonl",
        "--from",
        day(end.date()),
        "--to",
        day(later),
        tls_run.audit_path,
    )
    assert res.returncode == 0 and res.stdout == b"", res.stderr

    records = [json.loads(line) for line in lines]
    exportable = [r for r in records if r["type"] != "checkpoint"]
    assert len(exportable) < len(records)  # the shutdown checkpoint is left out
    atna = exports.atna.splitlines()
    assert exports.atna.endswith(b"\n") and len(atna) == len(exportable)
    for line, record in zip(atna, exportable, strict=True):
        m = parse_syslog(line)
        assert m.msgid == "IHE+DICOM"
        assert (m.seq, m.casb["hash"]) == (record["seq"], record["hash"])
        assert ET.fromstring(m.payload).tag == "AuditMessage"
    # The export and the live sink format the same record the same way.
    assert atna == [r.message for r in tls_run.collector.messages]


def test_export_refuses_a_tampered_log_and_writes_nothing(
    tls_run: TlsRun, exports: Exports, tmp_path: Path
) -> None:
    lines = log_lines(tls_run.audit_path)
    at = next(i for i, line in enumerate(lines) if json.loads(line).get("status") == 403)
    record = json.loads(lines[at])
    record["decision"] = "allow"  # someone hides a refused upload
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(
        b"".join([*lines[:at], json.dumps(record).encode() + b"\n", *lines[at + 1 :]])
    )
    start, end = exports.window

    target = tmp_path / "out" / "export.atna"
    target.parent.mkdir()
    res = casb_cli(
        "audit",
        "export",
        "--format",
        "atna",
        "--from",
        start,
        "--to",
        end,
        "--output",
        target,
        tampered,
    )
    assert res.returncode == 1, res.stderr
    assert f"line {at + 1}:" in res.stderr.decode(), res.stderr
    assert list(target.parent.iterdir()) == []  # no output, no temporary file left

    res = casb_cli("audit", "export", "--format", "jsonl", tampered)  # to stdout
    assert res.returncode == 1 and f"line {at + 1}:" in res.stderr.decode()
    assert res.stdout == b""


# -- 4. no PHI --------------------------------------------------------------------------
def test_no_sentinel_phi_in_syslog_messages_or_exports(tls_run: TlsRun, exports: Exports) -> None:
    received = tls_run.collector.messages
    assert len(received) >= 6  # policy change, STOW, 2 QIDOs, 401, refused STOW at least
    for r in received:
        tls_run.sentinel.assert_absent(r.message.decode("utf-8"), "a syslog message")
        m = parse_syslog(r.message)
        for text in xml_strings(ET.fromstring(m.payload)):
            tls_run.sentinel.assert_absent(text, f"ATNA message seq {m.seq}")
    tls_run.sentinel.assert_absent(exports.jsonl.decode("utf-8"), "the jsonl export")
    tls_run.sentinel.assert_absent(exports.atna.decode("utf-8"), "the atna export")
    for line in exports.atna.splitlines():
        for text in xml_strings(ET.fromstring(parse_syslog(line).payload)):
            tls_run.sentinel.assert_absent(text, "the atna export (decoded)")
