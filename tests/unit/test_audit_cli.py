"""`casb audit verify` and `casb audit keygen`: exit codes, messages, where the public keys
come from. Through argparse with add_audit_commands, and through the real `casb` entry
point (`python -m casb.cli`) in a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from casb.audit import AuditLog, CheckpointSigner, ensure_dev_signing_key, load_signing_key
from casb.audit.chain import GENESIS_HASH, sealed_line
from casb.audit.cli import add_audit_commands

REPO = Path(__file__).resolve().parents[2]


def casb_audit(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="casb")
    sub = parser.add_subparsers(dest="command", required=True)
    add_audit_commands(sub)
    args = parser.parse_args(["audit", *argv])
    code: int = args.func(args)
    return code


def write_log(path: Path, key_file: Path, n: int, *, unsigned: int = 0) -> None:
    """n requests with a checkpoint after every 3 and at close, then `unsigned` more
    from a writer without a key (the tail a running or crashed proxy leaves)."""
    log = AuditLog(path, signer=CheckpointSigner(load_signing_key(key_file)), every_records=3)
    for i in range(n):
        log.append({"type": "request", "request_id": f"r{i}", "status": 200})
    log.close()
    log = AuditLog(path)
    for i in range(unsigned):
        log.append({"type": "request", "request_id": f"u{i}", "status": 200})
    log.close()


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = tmp_path / "audit.pem", tmp_path / "audit.pub.pem"
    assert casb_audit("keygen", "--private", str(priv), "--public", str(pub)) == 0
    return priv, pub


def rewrite_consistently(path: Path) -> None:
    """Edit the first record and recompute every hash (checkpoints re-pointed too)."""
    out, prev = [], GENESIS_HASH
    for seq, raw in enumerate(path.read_bytes().splitlines(), start=1):
        rec = {k: v for k, v in json.loads(raw).items() if k not in ("seq", "prev_hash", "hash")}
        if seq == 1:
            rec["status"] = 404
        if rec["type"] == "checkpoint":
            rec["checkpoint"] = dict(rec["checkpoint"], covers_seq=seq - 1, head_hash=prev)
        line, prev = sealed_line(rec, seq, prev)
        out.append(line)
    path.write_bytes(b"".join(out))


def test_verify_ok_with_public_key(
    tmp_path: Path, keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, keypair[0], 6)
    capsys.readouterr()
    assert casb_audit("verify", str(log), "--public-key", str(keypair[1])) == 0
    out = capsys.readouterr().out
    assert "OK: 8 records" in out and "2 signed checkpoint(s) verified" in out
    assert "note" not in out
    assert casb_audit("verify", "--json", str(log), "--public-key", str(keypair[1])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checkpoints"] == 2 and report["unsigned_tail"] == 0


def test_verify_notes_the_unsigned_tail(
    tmp_path: Path, keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, keypair[0], 3, unsigned=2)  # r r r C r r
    capsys.readouterr()
    assert casb_audit("verify", str(log), "--public-key", str(keypair[1])) == 0
    assert "note: the last 2 record(s) are not yet covered" in capsys.readouterr().out
    assert (
        casb_audit("verify", str(log), "--public-key", str(keypair[1]), "--max-unsigned", "1") == 1
    )
    assert "TAMPERED: line 5 (seq 5)" in capsys.readouterr().out


def test_verify_names_the_first_bad_line(
    tmp_path: Path, keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, keypair[0], 6)
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:1] + lines[2:]))  # record 2 deleted
    capsys.readouterr()
    assert casb_audit("verify", str(log), "--public-key", str(keypair[1])) == 1
    out = capsys.readouterr().out
    assert out.startswith("TAMPERED: line 2 (seq 2): sequence 3 where 2 was expected")


def test_consistent_rewrite_needs_the_signatures(
    tmp_path: Path, keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, keypair[0], 6)
    rewrite_consistently(log)
    capsys.readouterr()
    assert casb_audit("verify", str(log), "--no-signatures") == 0
    assert "signatures NOT checked" in capsys.readouterr().out
    assert casb_audit("verify", str(log), "--public-key", str(keypair[1]), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_bad_line"] == 4 and report["suspect_seqs"] == [1, 3]
    assert "signature does not verify" in report["problem"]


def test_verify_with_rotated_keys(
    tmp_path: Path, keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log, keypair[0], 2)
    new_priv, new_pub = tmp_path / "new.pem", tmp_path / "new.pub.pem"
    assert casb_audit("keygen", "--private", str(new_priv), "--public", str(new_pub)) == 0
    write_log(log, new_priv, 2)
    capsys.readouterr()
    assert casb_audit("verify", str(log), "--public-key", str(new_pub)) == 1
    assert "unknown key" in capsys.readouterr().out
    both = ["--public-key", str(keypair[1]), "--public-key", str(new_pub)]
    assert casb_audit("verify", str(log), *both) == 0


def dev_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "casb.yaml"
    cfg.write_text(
        "environment: dev\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "destinations: {pacs: {upstream: 'http://127.0.0.1:1/dicom-web'}}\n"
    )
    return cfg


def test_verify_takes_the_key_from_the_config(
    tmp_path: Path, keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    cfg = dev_config(tmp_path)
    assert casb_audit("verify", str(log), "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "no public key" in err and "--no-signatures" in err
    dev_key = ensure_dev_signing_key(tmp_path / "state")
    write_log(log, dev_key, 4)
    assert casb_audit("verify", str(log), "--config", str(cfg)) == 0
    # A configured key file wins over the dev key.
    cfg.write_text(
        cfg.read_text() + f"audit: {{checkpoints: {{signing_key_file: {keypair[0]}}}}}\n"
    )
    assert casb_audit("verify", str(log), "--config", str(cfg)) == 1
    assert "unknown key" in capsys.readouterr().out


def test_usage_errors(
    tmp_path: Path, keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    pub = str(keypair[1])
    assert casb_audit("verify", str(tmp_path / "missing.jsonl"), "--public-key", pub) == 2
    assert "No such file" in capsys.readouterr().err
    log = tmp_path / "audit.jsonl"
    write_log(log, keypair[0], 1)
    assert casb_audit("verify", str(log), "--public-key", str(keypair[0])) == 2
    assert "holds a private key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        casb_audit("verify", str(log), "--public-key", pub, "--no-signatures")
    assert exc.value.code == 2
    assert casb_audit("verify", str(log), "--no-signatures", "--max-unsigned", "0") == 2
    keypair[0].chmod(0o644)
    assert casb_audit("verify", str(log), "--config", str(_prod_config(tmp_path, keypair))) == 2
    assert "chmod 600" in capsys.readouterr().err


def _prod_config(tmp_path: Path, keypair: tuple[Path, Path]) -> Path:
    cfg = tmp_path / "prod.yaml"
    cfg.write_text(
        "destinations: {pacs: {upstream: 'https://pacs.example/dicom-web'}}\n"
        "identity: {issuer: https://idp.example, audience: casb, "
        "jwks_url: https://idp.example/jwks}\n"
        f"audit: {{checkpoints: {{signing_key_file: {keypair[0].name}}}}}\n"
    )
    return cfg


def test_keygen_refuses_to_overwrite(
    tmp_path: Path, keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    priv = keypair[0]
    before = priv.read_bytes()
    capsys.readouterr()
    assert casb_audit("keygen", "--private", str(priv), "--public", str(tmp_path / "x")) == 2
    assert "already exists" in capsys.readouterr().err
    assert priv.read_bytes() == before and not (tmp_path / "x").exists()
    assert priv.stat().st_mode & 0o777 == 0o600


# -- the real entry point (needs casb/cli.py to register add_audit_commands) ----------
def casb(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CASB_CONFIG"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "casb.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_casb_command_keygen_and_verify(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    done = casb("audit", "keygen", "--private", str(priv), "--public", str(pub), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    kid = done.stdout.strip()
    assert len(kid) == 16 and CheckpointSigner(load_signing_key(priv)).key_id == kid
    log = tmp_path / "audit.jsonl"
    write_log(log, priv, 4)
    done = casb("audit", "verify", str(log), "--public-key", str(pub), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "OK: 6 records" in done.stdout
    rewrite_consistently(log)
    done = casb("audit", "verify", str(log), "--public-key", str(pub), cwd=tmp_path)
    assert done.returncode == 1 and "TAMPERED: line 4 (seq 4)" in done.stdout
    # No key given, none configured (embedded dev defaults, no key under ./.casb): usage.
    done = casb("audit", "verify", str(log), cwd=tmp_path)
    assert done.returncode == 2 and "no public key" in done.stderr
