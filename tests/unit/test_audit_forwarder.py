"""The live syslog sink against a real collector on a loopback port (TCP and TLS): order,
replay from the cursor after a collector outage or a dropped connection, resume across
restarts, TLS verification that refuses, partial lines, prompt stop."""

from __future__ import annotations

import functools
import json
import logging
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from casb.audit.chain import GENESIS_HASH, canonical_json, sealed_line
from casb.audit.forwarder import AuditForwarder, Cursor, ForwarderError
from casb.audit.syslog import rfc5424_message
from casb.config import SyslogSink
from tests.support.pki import make_ca, tls_files, write_pem
from tests.support.syslog_collector import SyslogCollector

PREFIX = b"<85>1 - - casb - - - "


def fmt(record: dict[str, Any]) -> bytes:
    return PREFIX + canonical_json(record)


class Chain:
    """Appends hash-chained records to a JSONL file, as AuditLog does."""

    def __init__(self, path: Path, tag: str = "a") -> None:
        self.path, self.tag = path, tag
        self.seq, self.prev = 0, GENESIS_HASH
        self.hashes: dict[int, str] = {}

    def line(self, pad: int = 0) -> bytes:
        record = {"request_id": f"{self.tag}{self.seq + 1}", "status": 200, "pad": "x" * pad}
        line, self.prev = sealed_line(record, self.seq + 1, self.prev)
        self.seq += 1
        self.hashes[self.seq] = self.prev
        return line

    def append(self, n: int = 1, *, pad: int = 0, forwarder: AuditForwarder | None = None) -> None:
        for _ in range(n):
            with self.path.open("ab") as fh:
                fh.write(self.line(pad))
            if forwarder is not None:
                forwarder.notify()


def records(c: SyslogCollector) -> list[dict[str, Any]]:
    out = []
    for m in c.messages:
        assert m.message.startswith(PREFIX)
        out.append(json.loads(m.message[len(PREFIX) :]))
    return out


def seqs(c: SyslogCollector) -> list[int]:
    return [r["seq"] for r in records(c)]


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def tcp_sink(port: int) -> SyslogSink:
    return SyslogSink(host="127.0.0.1", port=port, transport="tcp")


@pytest.fixture
def audit(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def collector() -> Iterator[SyslogCollector]:
    with SyslogCollector() as c:
        yield c


@pytest.fixture
def make(audit: Path) -> Iterator[Callable[..., AuditForwarder]]:
    started: list[AuditForwarder] = []

    def make(sink: SyslogSink, **kw: Any) -> AuditForwarder:
        opts: dict[str, Any] = {"retry_initial": 0.02, "retry_max": 0.2, "linger": 0.05}
        opts.update(kw)
        fwd = AuditForwarder(sink, audit, fmt, **opts)
        fwd.start()
        started.append(fwd)
        return fwd

    yield make
    for fwd in started:
        fwd.stop(timeout=2)


def assert_no_gaps(c: SyslogCollector) -> None:
    """Per connection the seqs run consecutively from at most one past the highest seq
    received before it: a replay may repeat records, never skip one."""
    highest = 0
    by_conn: dict[int, list[int]] = {}
    for m, r in zip(c.messages, records(c), strict=True):
        by_conn.setdefault(m.connection, []).append(r["seq"])
    for conn in sorted(by_conn):
        run = by_conn[conn]
        assert run[0] <= highest + 1, (conn, run[0], highest)
        assert run == list(range(run[0], run[0] + len(run))), conn
        highest = max(highest, run[-1])


def test_cursor_round_trip_and_rejects_garbage() -> None:
    c = Cursor(7, "ab" * 32, 100, 180)
    assert Cursor.from_json(c.to_json()) == c
    for bad in (b"[]", b'{"seq": -1, "hash": "x", "start": 0, "end": 0}', b"{", b"{}"):
        with pytest.raises(ValueError):
            Cursor.from_json(bad)


def test_delivers_every_record_in_order(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    chain = Chain(audit)
    chain.append(60, pad=6000)  # 60 x 6 kB before start, then appends while running
    fwd = make(tcp_sink(collector.port))
    chain.append(240, pad=6000, forwarder=fwd)  # 1.8 MB in all: several 1 MiB batches
    wait_until(lambda: fwd.delivered_seq == 300, "delivery of 300 records")
    got = records(collector)
    assert [r["seq"] for r in got] == list(range(1, 301))
    assert [r["hash"] for r in got] == [chain.hashes[i] for i in range(1, 301)]
    assert fwd.lag == 0
    assert fwd.last_error is None
    assert collector.errors == []
    saved = json.loads((audit.parent / "audit.jsonl.syslog-cursor").read_bytes())
    assert (saved["seq"], saved["hash"]) == (300, chain.hashes[300])


def test_collector_down_at_start_gets_everything_once_when_up(
    audit: Path, make: Callable[..., AuditForwarder]
) -> None:
    c = SyslogCollector().start()
    c.stop()  # its port is known and nothing listens on it
    chain = Chain(audit)
    chain.append(30)
    fwd = make(tcp_sink(c.port))
    wait_until(lambda: fwd.last_error is not None, "a failed connection")
    assert "refused" in (fwd.last_error or "").lower()
    assert (fwd.delivered_seq, fwd.lag, fwd.connected) == (0, 30, False)
    chain.append(5, forwarder=fwd)
    c.start()
    try:
        wait_until(lambda: fwd.delivered_seq == 35, "delivery after the collector is up")
        assert seqs(c) == list(range(1, 36))  # once each, in order
        assert fwd.last_error is None
    finally:
        c.stop()


def test_collector_outage_mid_stream(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    chain = Chain(audit)
    fwd = make(tcp_sink(collector.port))
    chain.append(20, forwarder=fwd)
    wait_until(lambda: fwd.delivered_seq == 20, "first delivery")
    collector.stop()
    chain.append(20, forwarder=fwd)
    wait_until(lambda: fwd.last_error is not None, "the outage noticed")
    assert fwd.delivered_seq == 20
    collector.start()
    wait_until(lambda: fwd.delivered_seq == 40, "delivery after the outage")
    assert seqs(collector) == list(range(1, 41))


def test_dropped_connection_replays_from_cursor(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    chain = Chain(audit)
    chain.append(100)
    fwd = make(tcp_sink(collector.port), session_records=60)
    wait_until(lambda: fwd.delivered_seq == 100, "first delivery")
    cursor_before_drop = fwd.delivered_seq
    collector.drop_after(25)  # resets the connection carrying the 25th next message
    chain.append(150, forwarder=fwd)
    wait_until(lambda: fwd.delivered_seq == 250, "delivery after the drop")
    got = seqs(collector)
    assert sorted(set(got)) == list(range(1, 251))  # every record arrived
    dupes = sorted(s for s, n in Counter(got).items() if n > 1)
    assert dupes, "the drop forced no replay: the test did not test it"
    assert min(dupes) > cursor_before_drop  # only records after the persisted cursor
    assert_no_gaps(collector)
    assert collector.errors == []


def test_repeated_drops_still_deliver_everything(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    chain = Chain(audit)
    chain.append(300, pad=500)
    collector.drop_after(10, 70, 5, 50)
    fwd = make(tcp_sink(collector.port), session_records=50)
    wait_until(lambda: fwd.delivered_seq == 300, "delivery despite drops")
    assert collector.drops_pending == 0
    assert sorted(set(seqs(collector))) == list(range(1, 301))
    assert_no_gaps(collector)


def test_restart_resumes_after_cursor(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    chain = Chain(audit)
    chain.append(50)
    first = make(tcp_sink(collector.port))
    wait_until(lambda: first.delivered_seq == 50, "first delivery")
    first.stop()
    assert not first.running
    chain.append(30)
    second = make(tcp_sink(collector.port))
    wait_until(lambda: second.delivered_seq == 80, "delivery after restart")
    assert seqs(collector) == list(range(1, 81))  # nothing delivered was sent again


def test_stop_drains_and_confirms(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    chain = Chain(audit)
    fwd = make(tcp_sink(collector.port), linger=60, session_seconds=60)
    chain.append(10, forwarder=fwd)
    wait_until(lambda: fwd.sent_seq == 10 and fwd.connected, "records sent")
    assert fwd.delivered_seq == 0  # the session is still open: nothing confirmed yet
    chain.append(5)  # appended, never notified: stop() still drains it
    began = time.monotonic()
    fwd.stop(timeout=5)
    assert time.monotonic() - began < 2
    assert fwd.delivered_seq == 15 and not fwd.running
    assert seqs(collector) == list(range(1, 16))


def test_stop_is_prompt_while_backing_off(audit: Path, make: Callable[..., AuditForwarder]) -> None:
    c = SyslogCollector().start()
    c.stop()
    Chain(audit).append(3)
    fwd = make(tcp_sink(c.port), retry_initial=30, retry_max=30)
    wait_until(lambda: fwd.last_error is not None, "a failed connection")
    began = time.monotonic()
    fwd.stop(timeout=5)
    assert time.monotonic() - began < 1
    assert not fwd.running


def test_stop_is_prompt_when_collector_never_reads(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    blackhole = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody reads
    try:
        chain = Chain(audit)
        chain.append(10)
        sink = tcp_sink(blackhole.getsockname()[1])
        fwd = make(sink)
        wait_until(lambda: fwd.sent_seq == 10, "records sent")
        began = time.monotonic()
        fwd.stop(timeout=0.3)
        assert time.monotonic() - began < 2
        assert not fwd.running
        assert (fwd.delivered_seq, fwd.lag) == (0, 10)  # never confirmed
    finally:
        blackhole.close()
    # Unconfirmed records are sent again by the next forwarder (at-least-once).
    again = make(tcp_sink(collector.port))
    wait_until(lambda: again.delivered_seq == 10, "redelivery")
    assert seqs(collector) == list(range(1, 11))


def test_partial_last_line_waits_for_its_newline(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    chain = Chain(audit)
    chain.append(3)
    tail = chain.line()
    with audit.open("ab") as fh:
        fh.write(tail[:40])
    fwd = make(tcp_sink(collector.port))
    wait_until(lambda: fwd.delivered_seq == 3, "the whole lines")
    assert seqs(collector) == [1, 2, 3]
    with audit.open("ab") as fh:
        fh.write(tail[40:])
    fwd.notify()
    wait_until(lambda: fwd.delivered_seq == 4, "the completed line")
    assert records(collector)[-1] == json.loads(tail)


def test_skipped_records_advance_without_sending(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    Chain(audit).append(10)

    def odd_only(record: dict[str, Any]) -> bytes | None:
        return fmt(record) if record["seq"] % 2 else None

    fwd = AuditForwarder(tcp_sink(collector.port), audit, odd_only, linger=0.05)
    fwd.start()
    try:
        wait_until(lambda: fwd.delivered_seq == 10, "delivery")
    finally:
        fwd.stop()
    assert seqs(collector) == [1, 3, 5, 7, 9]


def test_bad_line_halts_after_what_precedes_it(
    audit: Path,
    collector: SyslogCollector,
    make: Callable[..., AuditForwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    chain = Chain(audit)
    chain.append(5)
    with audit.open("ab") as fh:
        fh.write(b'{"patient": "DOE^JANE"\n')  # not a record (and never echoed)
    chain.append(3)
    with caplog.at_level(logging.DEBUG, logger="casb.audit.forwarder"):
        fwd = make(tcp_sink(collector.port))
        wait_until(lambda: fwd.delivered_seq == 5 and fwd.last_error is not None, "the halt")
        fwd.notify()
        fwd.stop()
    assert "halted at byte" in (fwd.last_error or "")
    assert fwd.lag == 3
    assert seqs(collector) == [1, 2, 3, 4, 5]
    assert "DOE" not in caplog.text and "halted" in caplog.text


def test_replaced_log_is_replayed_from_its_start(
    audit: Path,
    collector: SyslogCollector,
    make: Callable[..., AuditForwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = Chain(audit, "old")
    old.append(10)
    first = make(tcp_sink(collector.port))
    wait_until(lambda: first.delivered_seq == 10, "first delivery")
    first.stop()
    audit.unlink()
    new = Chain(audit, "new")  # a new chain: seq 1.. again, other hashes
    new.append(4)
    with caplog.at_level(logging.WARNING, logger="casb.audit.forwarder"):
        second = make(tcp_sink(collector.port))
        wait_until(lambda: second.delivered_seq == 4, "delivery of the new log")
    assert "replaying it from the start" in caplog.text
    got = records(collector)
    assert [r["hash"] for r in got[10:]] == [new.hashes[i] for i in range(1, 5)]
    assert "DOE" not in caplog.text


def test_log_replaced_while_running(
    audit: Path, collector: SyslogCollector, make: Callable[..., AuditForwarder]
) -> None:
    old = Chain(audit, "old")
    old.append(5)
    fwd = make(tcp_sink(collector.port))
    wait_until(lambda: fwd.delivered_seq == 5, "the old log")
    audit.rename(audit.with_name("audit.jsonl.1"))
    new = Chain(audit, "new")
    new.append(3, forwarder=fwd)
    wait_until(lambda: len(collector.messages) == 8 and fwd.delivered_seq == 3, "the new log")
    got = records(collector)
    assert [r["request_id"] for r in got] == [f"old{i}" for i in range(1, 6)] + [
        f"new{i}" for i in range(1, 4)
    ]


# -- TLS ---------------------------------------------------------------------------------


def tls_sink(port: int, ca: Path, **kw: Any) -> SyslogSink:
    return SyslogSink(host="127.0.0.1", port=port, transport="tls", ca_bundle=ca, **kw)


def test_tls_delivers_with_the_right_ca_and_client_certificate(
    audit: Path, tmp_path: Path, make: Callable[..., AuditForwarder]
) -> None:
    files = tls_files(tmp_path / "pki")
    chain = Chain(audit)
    chain.append(20)
    with SyslogCollector(tls=files.server, client_ca=files.client_ca_pem) as c:
        sink = tls_sink(
            c.port,
            files.ca_pem,
            client_cert_file=files.client_cert,
            client_key_file=files.client_key,
        )
        fwd = make(sink)
        wait_until(lambda: fwd.delivered_seq == 20, "TLS delivery")
        assert seqs(c) == list(range(1, 21))
        assert c.errors == []


@pytest.mark.parametrize("problem", ["wrong CA", "wrong name", "no client certificate"])
def test_tls_refuses_and_never_sends_plaintext(
    problem: str, audit: Path, tmp_path: Path, make: Callable[..., AuditForwarder]
) -> None:
    files = tls_files(tmp_path / "pki")
    server, ca, client_ca = files.server, files.ca_pem, None
    if problem == "wrong CA":
        ca = files.rogue_ca_pem
    elif problem == "wrong name":
        test_ca = make_ca("casb name-test-ca")
        cert, key = test_ca.issue_server(["collector.example"], [])
        server = (write_pem(tmp_path, "s.pem", cert), write_pem(tmp_path, "s-key.pem", key))
        ca = write_pem(tmp_path, "name-ca.pem", test_ca.cert_pem)
    else:
        client_ca = files.client_ca_pem
    Chain(audit).append(5)
    with SyslogCollector(tls=server, client_ca=client_ca) as c:
        fwd = make(tls_sink(c.port, ca))
        wait_until(lambda: len(c.errors) >= 2 and fwd.last_error is not None, "refusals")
        assert c.messages == []
        assert (fwd.delivered_seq, fwd.lag) == (0, 5)
        error = fwd.last_error or ""
        if problem == "no client certificate":
            # TLS 1.3: our handshake completes before the collector checks for a client
            # certificate, so our side sees a reset or an EOF; the records it may have
            # sent were never accepted, and nothing is confirmed.
            assert all("PEER_DID_NOT_RETURN_A_CERTIFICATE" in e for e in c.errors), c.errors
        else:
            assert "CERTIFICATE_VERIFY_FAILED" in error, error
            # Our side aborted each handshake with an alert: no plaintext ever reached
            # the collector (it would show as a garbage handshake, not an alert).
            assert all("ALERT" in e for e in c.errors), c.errors


def test_unusable_tls_files_fail_at_construction(audit: Path, tmp_path: Path) -> None:
    with pytest.raises(ForwarderError, match="TLS setup failed"):
        AuditForwarder(tls_sink(1, tmp_path / "missing-ca.pem"), audit, fmt)


def test_with_the_rfc5424_formatter(audit: Path, collector: SyslogCollector) -> None:
    Chain(audit).append(5)
    fmt_jsonl = functools.partial(rfc5424_message, fmt="jsonl", source_id="casb", hostname="h")
    fwd = AuditForwarder(tcp_sink(collector.port), audit, fmt_jsonl, linger=0.05)
    fwd.start()
    try:
        wait_until(lambda: fwd.delivered_seq == 5, "delivery")
    finally:
        fwd.stop()
    got = [m.message for m in collector.messages]
    assert [re.findall(rb'seq="(\d+)"', m) for m in got] == [[b"%d" % i] for i in range(1, 6)]
    assert all(m.startswith(b"<85>1 ") for m in got)
