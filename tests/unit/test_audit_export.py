"""`casb audit export` (casb/audit/export.py): time window, chain check, output formats."""

from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from casb.audit.chain import GENESIS_HASH, sealed_line
from casb.audit.export import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ExportError,
    add_export_command,
    export_file,
    export_lines,
    parse_bound,
)

T0 = datetime(2025, 3, 1, 0, 0, tzinfo=UTC)
BOM = b"\xef\xbb\xbf"


def iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record(i: int, at: datetime) -> dict[str, Any]:
    return {
        "type": "request",
        "time": iso(at),
        "request_id": f"req{i:06d}",
        "principal": {"sub": f"user{i % 7}", "issuer": "https://idp.test", "roles": ["staff"]},
        "client": {"ip": "10.1.2.3"},
        "method": "GET",
        "action": "retrieve",
        "destination": "pacs",
        "route": "/pacs/studies/{study}",
        "uids": {"study": f"1.2.3.{i}", "series": None, "instance": None},
        "query_keys": [],
        "decision": "allow",
        "reasons": [],
        "error": None,
        "status": 200,
    }


def write_log(path: Path, records: list[dict[str, Any]]) -> list[bytes]:
    lines, prev = [], GENESIS_HASH
    for seq, rec in enumerate(records, start=1):
        line, prev = sealed_line(rec, seq, prev)
        lines.append(line)
    path.write_bytes(b"".join(lines))
    return lines


def hourly(path: Path, n: int = 6) -> list[bytes]:
    """Records at 00:00, 01:00, ... UTC, with a checkpoint after the third."""
    recs: list[dict[str, Any]] = [record(i, T0 + timedelta(hours=i)) for i in range(n)]
    recs.insert(3, {"type": "checkpoint", "time": iso(T0 + timedelta(hours=2, minutes=30))})
    return write_log(path, recs)


def run(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="casb audit")
    add_export_command(parser.add_subparsers(dest="audit_command", required=True))
    ns = parser.parse_args(["export", *args])
    code: int = ns.func(ns)
    return code


def times(out: bytes) -> list[str]:
    return [json.loads(line)["time"] for line in out.splitlines()]


# -- time window ----------------------------------------------------------------------
def test_jsonl_window_is_inclusive_from_exclusive_to_and_verbatim(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    lines = hourly(log)
    assert run([str(log), "--from", "2025-03-01T01:00:00Z", "--to", "2025-03-01T03:00:00Z"]) == 0
    out = capsysbinary.readouterr().out
    # 01:00 (inclusive), the 02:30 checkpoint, 02:00; not 03:00 (exclusive)
    assert out == lines[1] + lines[2] + lines[3]
    assert times(out) == [
        "2025-03-01T01:00:00.000Z",
        "2025-03-01T02:00:00.000Z",
        "2025-03-01T02:30:00.000Z",
    ]


def test_offsets_are_compared_as_instants(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    lines = hourly(log)
    # 02:00+01:00 is 01:00Z; 04:00+02:00 is 02:00Z
    assert (
        run([str(log), "--from", "2025-03-01T02:00+01:00", "--to", "2025-03-01T04:00+02:00"]) == 0
    )
    assert capsysbinary.readouterr().out == lines[1]


def test_record_times_with_offsets_are_compared_as_instants(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    recs = [record(0, T0), record(1, T0)]
    recs[0]["time"] = "2025-03-01T09:59:59.999+09:00"  # 00:59:59.999Z
    recs[1]["time"] = "2025-03-01T10:00:00.000+09:00"  # 01:00Z
    lines = write_log(log, recs)
    assert run([str(log), "--from", "2025-03-01T01:00:00Z"]) == 0
    assert capsysbinary.readouterr().out == lines[1]


def test_dates_are_utc_days(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    log = tmp_path / "audit.jsonl"
    recs = [record(i, T0 + timedelta(hours=h)) for i, h in enumerate([-1, 0, 23, 24])]
    lines = write_log(log, recs)
    assert run([str(log), "--from", "2025-03-01", "--to", "2025-03-02"]) == 0
    assert capsysbinary.readouterr().out == lines[1] + lines[2]


def test_without_window_everything_is_exported(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    lines = hourly(log)
    assert run([str(log)]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == b"".join(lines)
    assert b"exported 7 of 7 records" in captured.err


@pytest.mark.parametrize("bad", ["2025-03-01T10:00:00", "yesterday", "2025-13-01", ""])
def test_bounds_without_zone_or_unparseable_are_refused(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bound(bad)


def test_bound_forms() -> None:
    assert parse_bound("2025-03-01") == T0
    assert parse_bound("2025-03-01T00:00:00Z") == T0
    assert parse_bound("2025-03-01T01:30:00+01:30") == T0


def test_empty_window_is_a_usage_error(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    hourly(log)
    assert run([str(log), "--from", "2025-03-02", "--to", "2025-03-01"]) == EXIT_USAGE
    assert b"--from must be before --to" in capsysbinary.readouterr().err


def test_missing_file_is_a_usage_error(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert run([str(tmp_path / "nope.jsonl")]) == EXIT_USAGE
    assert b"no such audit log" in capsysbinary.readouterr().err


def test_invalid_hostname_is_a_usage_error(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    hourly(log)
    args = [str(log), "--format", "atna", "--source-id", "s", "--hostname", "two words"]
    assert run(args) == EXIT_USAGE
    captured = capsysbinary.readouterr()
    assert captured.out == b"" and b"HOSTNAME" in captured.err


def test_record_without_time_in_a_window_names_its_line(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    recs = [record(0, T0), {"type": "request", "decision": "allow"}]
    write_log(log, recs)
    with pytest.raises(ExportError) as err:
        export_file(log, _Sink(), fmt="jsonl", start=T0)
    assert err.value.line == 2 and "no time" in err.value.problem


# -- chain ----------------------------------------------------------------------------
def tamper(log: Path, index: int, **changes: Any) -> None:
    lines = log.read_bytes().splitlines(keepends=True)
    rec = json.loads(lines[index])
    rec.update(changes)
    lines[index] = json.dumps(rec).encode() + b"\n"
    log.write_bytes(b"".join(lines))


def test_tampered_file_is_refused_with_no_output(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    hourly(log)
    tamper(log, 4, decision="deny")  # line 5
    # Even a window before the edited record: the file as a whole is not trustworthy.
    assert run([str(log), "--to", "2025-03-01T01:00:00Z"]) == EXIT_FAILED
    captured = capsysbinary.readouterr()
    assert captured.out == b""
    assert b"line 5: hash mismatch: the record was edited" in captured.err
    assert b"nothing exported" in captured.err


def test_deleted_record_is_refused(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    lines = hourly(log)
    log.write_bytes(b"".join(lines[:2] + lines[3:]))
    assert run([str(log), "--format", "atna", "--source-id", "s"]) == EXIT_FAILED
    captured = capsysbinary.readouterr()
    assert captured.out == b""
    assert b"line 3: sequence 4 where 3 was expected" in captured.err


def test_record_from_another_chain_is_refused(tmp_path: Path) -> None:
    """Right seq and a valid hash, but sealed after a different predecessor."""
    log = tmp_path / "audit.jsonl"
    lines = hourly(log)
    spliced, _ = sealed_line(record(9, T0), 3, "f" * 64)
    log.write_bytes(b"".join([*lines[:2], spliced, *lines[3:]]))
    with pytest.raises(ExportError) as err:
        export_file(log, _Sink(), fmt="jsonl")
    assert err.value.line == 3 and "prev_hash does not match" in err.value.problem


def test_truncated_last_line_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = hourly(log)
    log.write_bytes(b"".join(lines)[:-10])
    with pytest.raises(ExportError) as err:
        export_file(log, _Sink(), fmt="jsonl")
    assert err.value.line == len(lines) and not err.value.partial


def test_refused_export_leaves_no_output_file(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log, out = tmp_path / "audit.jsonl", tmp_path / "export.jsonl"
    hourly(log)
    tamper(log, 1, status=500)
    assert run([str(log), "--output", str(out)]) == EXIT_FAILED
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]  # no temporary left
    capsysbinary.readouterr()


def test_no_verify_exports_a_tampered_file(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    hourly(log)
    tamper(log, 4, decision="deny")
    assert run([str(log), "--no-verify"]) == EXIT_OK
    assert len(capsysbinary.readouterr().out.splitlines()) == 7


def test_streaming_check_stops_before_the_bad_line(tmp_path: Path) -> None:
    """export_lines checks as it streams: lines before the bad one are written, the bad
    one is not (export_file verifies the whole file first so this shows only if the
    file changes between its two reads)."""
    log = tmp_path / "audit.jsonl"
    lines = hourly(log)
    bad = [*lines[:4], lines[4].replace(b'"allow"', b'"deny"'), *lines[5:]]
    sink = _Sink()
    with pytest.raises(ExportError) as err:
        export_lines(bad, sink, fmt="jsonl")
    assert err.value.line == 5
    assert sink.data == b"".join(lines[:4])


# -- formats --------------------------------------------------------------------------
def test_atna_is_one_syslog_message_per_line(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = tmp_path / "audit.jsonl"
    hourly(log)
    args = [str(log), "--format", "atna", "--source-id", "casb-x", "--hostname", "px.example"]
    assert run(args) == EXIT_OK
    out = capsysbinary.readouterr().out
    assert out.endswith(b"\n")
    msgs = out.splitlines()
    assert len(msgs) == 6  # the checkpoint has no ATNA message
    for i, msg in enumerate(msgs):
        m = re.fullmatch(
            rb"<85>1 (\S+) px\.example casb - IHE\+DICOM \[casb@32473 seq=\"(\d+)\" "
            rb"id=\"(req\d+)\" hash=\"[0-9a-f]{64}\"\] \xef\xbb\xbf(<\?xml .*)",
            msg,
        )
        assert m is not None, msg[:120]
        assert m[1].decode() == iso(T0 + timedelta(hours=i))
        assert m[3].decode() == f"req{i:06d}"
        root = ET.fromstring(m[4])
        src = root.find("AuditSourceIdentification")
        assert src is not None and src.get("AuditSourceID") == "casb-x"
    # seq numbers skip the checkpoint's (4)
    assert [int(re.search(rb'seq="(\d+)"', m)[1]) for m in msgs] == [1, 2, 3, 5, 6, 7]  # type: ignore[index]


def test_output_file(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    log, out = tmp_path / "audit.jsonl", tmp_path / "export.jsonl"
    lines = hourly(log)
    assert run([str(log), "--output", str(out), "--from", "2025-03-01T04:00:00Z"]) == EXIT_OK
    assert out.read_bytes() == lines[5] + lines[6]
    captured = capsysbinary.readouterr()
    assert captured.out == b"" and b"exported 2 of 7 records" in captured.err


def test_defaults_come_from_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """No FILE, no --source-id: audit.path and audit.source_id of the configuration
    (here the embedded dev defaults: .casb/audit.jsonl, "casb")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CASB_CONFIG", raising=False)
    (tmp_path / ".casb").mkdir()
    hourly(tmp_path / ".casb" / "audit.jsonl", n=2)
    assert run(["--format", "atna", "--hostname", "h"]) == EXIT_OK
    msgs = capsysbinary.readouterr().out.splitlines()
    assert len(msgs) == 2
    assert all(b'<AuditSourceIdentification AuditSourceID="casb">' in m for m in msgs)


def test_atna_record_that_cannot_be_expressed_names_its_line(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    recs = [record(0, T0), dict(record(1, T0), time="2025-03-01 10:00")]
    write_log(log, recs)
    with pytest.raises(ExportError) as err:
        export_file(log, _Sink(), fmt="atna", hostname="h")
    assert err.value.line == 2 and "no ATNA message" in err.value.problem


# -- size -----------------------------------------------------------------------------
class _Sink:
    """A binary output that keeps a bounded tail (and everything, when small)."""

    def __init__(self, keep: int = 1 << 20) -> None:
        self.data = b""
        self.count = 0
        self.lines = 0
        self._keep = keep

    def write(self, chunk: bytes) -> int:
        self.count += len(chunk)
        self.lines += chunk.count(b"\n")
        if len(self.data) < self._keep:
            self.data += chunk
        return len(chunk)

    def flush(self) -> None:
        pass


def test_export_streams_line_by_line(tmp_path: Path) -> None:
    """Each record is written before the next line is read: nothing accumulates."""
    lines = hourly(tmp_path / "audit.jsonl", n=20)
    pulled = 0

    def feed() -> Iterator[bytes]:
        nonlocal pulled
        for line in lines:
            pulled += 1
            yield line

    class Watch(_Sink):
        def write(self, chunk: bytes) -> int:
            assert pulled == self.lines + 1  # written as soon as its line was read
            return super().write(chunk)

    sink = Watch()
    result = export_lines(feed(), sink, fmt="jsonl")
    assert result.exported == len(lines) and sink.data == b"".join(lines)


def test_fifty_thousand_records(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    n = 50_000
    with log.open("wb") as fh:
        prev = GENESIS_HASH
        for i in range(n):
            line, prev = sealed_line(record(i, T0 + timedelta(seconds=i)), i + 1, prev)
            fh.write(line)
    sink = _Sink(keep=0)
    start, end = T0 + timedelta(seconds=10_000), T0 + timedelta(seconds=12_000)
    result = export_file(log, sink, fmt="atna", start=start, end=end, hostname="h")
    assert result.records == n  # the whole chain was checked
    assert result.exported == sink.lines == 2_000
