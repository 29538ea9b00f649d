"""The hash chain alone (no signer, signatures not checked): what it catches, how the log
continues across restarts, and what the writer refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from casb.audit import AuditError, AuditLog, verify_log


def write_log(path: Path, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append({"type": "request", "request_id": f"r{i}", "decision": "allow"})
    log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_intact_chain_verifies(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 5)
    report = verify_log(lines(p), None)
    assert report.ok and report.records == 5
    assert not report.signatures_checked and report.unsigned_tail is None
    assert report.checkpoints == 0


def test_chain_continues_across_restarts(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 3)
    write_log(p, 2)
    recs = [json.loads(x) for x in lines(p)]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[3]["prev_hash"] == recs[2]["hash"]
    assert verify_log(lines(p), None).ok


def test_edited_record_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 5)
    ls = lines(p)
    rec = json.loads(ls[2])
    rec["decision"] = "deny"
    ls[2] = (json.dumps(rec) + "\n").encode()
    report = verify_log(ls, None)
    assert not report.ok
    assert (report.first_bad_line, report.first_bad_seq, report.records) == (3, 3, 2)
    assert "edited" in report.problem


def test_deleted_record_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 5)
    ls = lines(p)
    del ls[1]
    report = verify_log(ls, None)
    assert not report.ok and (report.first_bad_line, report.first_bad_seq) == (2, 2)
    assert "deleted" in report.problem


def test_reordered_records_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 5)
    ls = lines(p)
    ls[1], ls[2] = ls[2], ls[1]
    report = verify_log(ls, None)
    assert not report.ok and report.first_bad_line == 2
    assert "sequence 3 where 2 was expected" in report.problem


def test_inserted_record_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 3)
    ls = lines(p)
    ls.insert(1, ls[1])  # a replayed copy of record 2
    report = verify_log(ls, None)
    assert not report.ok and report.first_bad_line == 3
    assert "sequence 2 where 3 was expected" in report.problem


def test_truncated_last_line_detected_and_refused_on_open(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 3)
    p.write_bytes(p.read_bytes()[:-20])
    report = verify_log(lines(p), None)
    assert not report.ok and report.first_bad_line == 3 and "truncated" in report.problem
    with pytest.raises(AuditError, match="incomplete"):
        AuditLog(p)


def test_missing_final_newline_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 3)
    p.write_bytes(p.read_bytes()[:-1])  # the record is whole, its newline is not
    report = verify_log(lines(p), None)
    assert not report.ok and report.first_bad_line == 3 and "no newline" in report.problem
    with pytest.raises(AuditError, match="incomplete"):
        AuditLog(p)


def test_verify_streams_from_a_file(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 4)
    with p.open("rb") as fh:
        assert verify_log(fh, None).records == 4


def test_one_writer_per_file(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    first = AuditLog(p)
    with pytest.raises(AuditError, match="another process"):
        AuditLog(p)
    first.close()
    AuditLog(p).close()


def test_log_file_is_private(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "audit.jsonl"
    write_log(p, 1)
    assert p.stat().st_mode & 0o777 == 0o600


def test_append_event_adds_type_and_time(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    log = AuditLog(p)
    digest = log.append_event("policy_change", {"policy_version": "abc", "rules": 3})
    log.close()
    (rec,) = [json.loads(x) for x in lines(p)]
    assert rec["hash"] == digest
    assert rec["type"] == "policy_change" and rec["policy_version"] == "abc"
    assert rec["time"].endswith("Z") and len(rec["time"]) == len("2025-01-01T00:00:00.000Z")
    assert verify_log(lines(p), None).ok


def test_writer_refuses_records_that_claim_chain_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    try:
        for bad in ({"seq": 9}, {"hash": "x"}, {"prev_hash": "x"}, {"type": "checkpoint"}):
            with pytest.raises(ValueError):
                log.append(bad)
        with pytest.raises(ValueError):
            log.append_event("checkpoint", {})
        with pytest.raises(ValueError):
            log.append_event("policy_change", {"time": "yesterday"})
        assert log.records_written == 0
    finally:
        log.close()


def test_append_after_close_fails(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append({"type": "request"})


def test_record_from_another_log_detected(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_log(a, 3)
    other = AuditLog(b)
    other.append({"type": "request", "request_id": "elsewhere"})
    other.append({"type": "request", "request_id": "r1", "decision": "allow"})
    other.close()
    ls = lines(a)
    ls[1] = lines(b)[1]  # same seq and content, valid hash, but another chain
    report = verify_log(ls, None)
    assert not report.ok and report.first_bad_line == 2
    assert "prev_hash does not match" in report.problem
