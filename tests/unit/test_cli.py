"""The `casb` command in-process: exit codes, messages, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from casb.audit import AuditLog
from casb.cli import main

REPO = Path(__file__).resolve().parents[2]
CASES = REPO / "policies" / "tests" / "hospital_test.yaml"


@pytest.fixture
def dev_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "casb.yaml"
    cfg.write_text(f"""
environment: dev
state_dir: {tmp_path / "state"}
destinations:
  pacs: {{upstream: "http://127.0.0.1:1/dicom-web"}}
  research: {{upstream: "http://127.0.0.1:1/dicom-web"}}
policy: {{paths: ["{REPO / "policies" / "hospital.yaml"}"]}}
audit: {{path: {tmp_path / "audit.jsonl"}}}
""")
    return cfg


def explain(config: Path, *args: str) -> int:
    return main(["policy", "explain", "--config", str(config), *args])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["run", "--help"],
        ["proxy", "--help"],
        ["policy", "--help"],
        ["policy", "validate", "--help"],
        ["policy", "explain", "--help"],
        ["policy", "test", "--help"],
        ["policy", "schema", "--help"],
        ["token", "mint", "--help"],
        ["audit", "verify", "--help"],
    ],
)
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert "usage: casb" in capsys.readouterr().out


def test_policy_test_passes_on_the_hospital_cases(
    dev_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "test", "--config", str(dev_config), str(CASES)]) == 0
    assert capsys.readouterr().out.strip().endswith("22 passed, 0 failed")


def test_policy_test_reports_failures(
    dev_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(f"""
policy: ["{REPO / "policies" / "hospital.yaml"}"]
cases:
  - name: wrongly expects referring physicians to store
    principal: {{roles: [referring_physician]}}
    request: {{method: POST, url: /pacs/studies}}
    expect: {{decision: allow}}
  - name: right
    principal: {{roles: [radiologist]}}
    request: {{url: /pacs/studies}}
    expect: {{decision: allow, rule_id: radiologist-read}}
""")
    assert main(["policy", "test", "--config", str(dev_config), str(cases)]) == 1
    out = capsys.readouterr().out
    assert "FAIL cases.yaml: wrongly expects" in out
    assert "decision: expected allow, got deny" in out
    assert out.strip().endswith("1 passed, 1 failed")


def test_policy_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "validate", str(REPO / "policies" / "hospital.yaml")]) == 0
    assert "OK: 9 rules" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nrules:\n  - {id: x, effect: allow, roles: [nobody], "
        "actions: [search], destinations: ['*']}\n"
    )
    assert main(["policy", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "rules[0]" in err and "nobody" in err


def test_bad_config_exits_2_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "casb.yaml"
    cfg.write_text("environment: dev\ndestinations: {pacs: {upstream: 'gopher://x'}}\n")
    assert main(["policy", "explain", "--config", str(cfg), "--url", "/pacs/studies"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "destinations.pacs.upstream" in err


def test_explain_prints_the_audited_decision(
    dev_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = explain(
        dev_config, "--url", "/pacs/studies?PatientName=Doe", "--role", "radiologist", "--exit-code"
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["decision"] == "allow" and out["rule_id"] == "radiologist-read"
    assert out["query_keys"] == ["PatientName"] and "Doe" not in json.dumps(out)
    code = explain(
        dev_config,
        "--method",
        "POST",
        "--url",
        "/pacs/studies",
        "--role",
        "referring_physician",
        "--exit-code",
    )
    assert code == 1
    assert json.loads(capsys.readouterr().out)["status"] == 403


def test_explain_verifies_a_token(dev_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mint = ["token", "mint", "--config", str(dev_config), "--sub", "zoe", "--role", "technologist"]
    assert main(mint) == 0
    token = capsys.readouterr().out.strip()
    assert explain(dev_config, "--method", "POST", "--url", "/pacs/studies", "--token", token) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["principal"]["sub"] == "zoe" and out["rule_id"] == "technologist-store"
    forged = token[:-4] + "AAAA"
    assert explain(dev_config, "--url", "/pacs/studies", "--token", forged) == 2
    assert "signature" in capsys.readouterr().err


def test_audit_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.append({"request_id": str(i), "status": 200})
    log.close()
    assert main(["audit", "verify", "--no-signatures", str(path)]) == 0
    assert "OK: 3 records" in capsys.readouterr().out
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])
    assert main(["audit", "verify", "--no-signatures", "--json", str(path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["records"], report["first_bad_line"]) == (False, 1, 2)
    assert main(["audit", "verify", "--no-signatures", str(tmp_path / "missing.jsonl")]) == 2
