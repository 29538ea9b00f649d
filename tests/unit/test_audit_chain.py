import json
from pathlib import Path

import pytest

from casb.audit import AuditError, AuditLog, verify_lines


def write_log(path: Path, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append({"request_id": f"r{i}", "decision": "allow", "status": 200})
    log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_intact_chain_verifies(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 5)
    report = verify_lines(lines(p))
    assert report.ok and report.records == 5


def test_chain_continues_across_restarts(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 3)
    write_log(p, 2)
    recs = [json.loads(x) for x in lines(p)]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert verify_lines(lines(p)).ok


def test_edited_record_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 5)
    ls = lines(p)
    rec = json.loads(ls[2])
    rec["decision"] = "deny"
    ls[2] = (json.dumps(rec) + "\n").encode()
    report = verify_lines(ls)
    assert not report.ok
    assert report.first_bad_line == 3
    assert "edited" in report.problem


def test_deleted_record_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 5)
    ls = lines(p)
    del ls[1]
    report = verify_lines(ls)
    assert not report.ok and report.first_bad_line == 2
    assert "deleted" in report.problem


def test_reordered_records_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 5)
    ls = lines(p)
    ls[1], ls[2] = ls[2], ls[1]
    report = verify_lines(ls)
    assert not report.ok and report.first_bad_line == 2


def test_truncated_last_line_detected_and_refused_on_open(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write_log(p, 3)
    p.write_bytes(p.read_bytes()[:-20])
    assert not verify_lines(lines(p)).ok
    with pytest.raises(AuditError, match="incomplete"):
        AuditLog(p)


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
