"""Signed checkpoints: when the writer appends them, and what verify_log catches with
them that the hash chain alone cannot (a log rewritten with every hash recomputed)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from casb.audit import (
    AuditError,
    AuditLog,
    CheckpointSigner,
    ensure_dev_signing_key,
    load_public_keys,
    load_signing_key,
    signer_from_settings,
    verify_log,
    write_keypair,
)
from casb.audit.chain import GENESIS_HASH, sealed_line
from casb.audit.checkpoint import public_keyring
from casb.config import Settings, load_settings

Records = list[dict[str, Any]]


def new_signer(source_id: str = "casb") -> CheckpointSigner:
    return CheckpointSigner(Ed25519PrivateKey.generate(), source_id=source_id)


def keys_of(*signers: CheckpointSigner) -> dict[str, Any]:
    return public_keyring(s.public_key() for s in signers)


def request(i: int) -> dict[str, Any]:
    return {"type": "request", "request_id": f"r{i}", "decision": "allow", "status": 200}


def read(path: Path) -> Records:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rechain(records: Records) -> list[bytes]:
    """What a careful attacker writes: every seq, prev_hash and hash recomputed, and each
    checkpoint's covers_seq / head_hash made to match (its signature cannot be redone)."""
    out, prev = [], GENESIS_HASH
    for seq, rec in enumerate(records, start=1):
        body = {k: v for k, v in rec.items() if k not in ("seq", "prev_hash", "hash")}
        if body.get("type") == "checkpoint":
            body["checkpoint"] = dict(body["checkpoint"], covers_seq=seq - 1, head_hash=prev)
        line, prev = sealed_line(body, seq, prev)
        out.append(line)
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def signer() -> CheckpointSigner:
    return new_signer()


@pytest.fixture
def signed_log(tmp_path: Path, signer: CheckpointSigner) -> Path:
    """10 requests with a checkpoint after every 3: r r r C r r r C r r r C r (13 lines),
    closed, so a final checkpoint covers the last request (14 lines)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signer=signer, every_records=3)
    for i in range(10):
        log.append(request(i))
    log.close()
    return path


# -- when checkpoints are written -----------------------------------------------------
def test_count_based_checkpoints_sign_the_head(signed_log: Path, signer: CheckpointSigner) -> None:
    recs = read(signed_log)
    kinds = "".join("C" if r["type"] == "checkpoint" else "r" for r in recs)
    assert kinds == "rrrCrrrCrrrCrC"
    cp = recs[3]
    assert cp["checkpoint"]["covers_seq"] == 3
    assert cp["checkpoint"]["head_hash"] == recs[2]["hash"] == cp["prev_hash"]
    assert cp["checkpoint"]["key_id"] == signer.key_id and len(signer.key_id) == 16
    assert cp["checkpoint"]["alg"] == "Ed25519" and cp["checkpoint"]["source_id"] == "casb"
    report = verify_log(lines(signed_log), keys_of(signer))
    assert report.ok and report.records == 14 and report.checkpoints == 4
    assert report.signatures_checked and report.unsigned_tail == 0


def test_time_based_checkpoint(tmp_path: Path, signer: CheckpointSigner) -> None:
    clock = FakeClock()
    log = AuditLog(tmp_path / "a.jsonl", signer=signer, every_seconds=10, clock=clock)
    assert not log.maybe_checkpoint()  # nothing to cover
    log.append(request(1))
    clock.now += 5
    log.append(request(2))
    assert not log.maybe_checkpoint()
    clock.now += 5  # 10 s after the first uncovered record
    assert log.maybe_checkpoint()
    assert not log.maybe_checkpoint() and log.uncovered_records == 0
    clock.now += 1
    log.append(request(3))
    clock.now += 9.5
    assert not log.maybe_checkpoint()  # the clock restarts at the first uncovered record
    clock.now += 0.5
    assert log.maybe_checkpoint()
    log.close()
    recs = read(tmp_path / "a.jsonl")
    assert [r["type"] for r in recs] == [
        "request",
        "request",
        "checkpoint",
        "request",
        "checkpoint",
    ]
    assert verify_log(lines(tmp_path / "a.jsonl"), keys_of(signer)).checkpoints == 2


def test_close_writes_a_final_checkpoint_only_when_needed(
    tmp_path: Path, signer: CheckpointSigner
) -> None:
    p = tmp_path / "a.jsonl"
    log = AuditLog(p, signer=signer, every_records=2)
    log.append(request(1))
    log.append(request(2))  # a checkpoint follows at once
    log.close()
    assert [r["type"] for r in read(p)] == ["request", "request", "checkpoint"]

    log = AuditLog(p, signer=signer)
    assert not log.checkpoint()  # the tail is covered
    log.append(request(3))
    log.close()
    assert read(p)[-1]["checkpoint"]["covers_seq"] == 4

    log = AuditLog(p)  # no signer: no checkpoints, even at close
    log.append(request(4))
    assert not log.checkpoint() and not log.maybe_checkpoint()
    log.close()
    assert read(p)[-1]["type"] == "request"
    report = verify_log(lines(p), keys_of(signer))
    assert report.ok and report.checkpoints == 2 and report.unsigned_tail == 1


def test_restart_covers_the_tail_a_crash_left(tmp_path: Path, signer: CheckpointSigner) -> None:
    p = tmp_path / "a.jsonl"
    log = AuditLog(p, signer=signer)
    log.append(request(1))
    log.checkpoint()
    log.close()
    # What a crash leaves: records after the last checkpoint (here written by a log
    # without a signer, which is the same file).
    unsigned = AuditLog(p)
    unsigned.append(request(2))
    unsigned.close()
    clock = FakeClock()
    log = AuditLog(p, signer=signer, every_seconds=30, clock=clock)
    assert log.uncovered_records == 1 and log.records_written == 3
    assert not log.maybe_checkpoint()
    clock.now += 30
    assert log.maybe_checkpoint()
    log.append(request(3))
    log.close()
    recs = read(p)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[3]["checkpoint"]["covers_seq"] == 3
    report = verify_log(lines(p), keys_of(signer))
    assert report.ok and report.checkpoints == 3 and report.unsigned_tail == 0


def test_key_rotation_needs_both_public_keys(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    old, new = new_signer(), new_signer()
    for signer, first in ((old, 0), (new, 3)):
        log = AuditLog(p, signer=signer)
        for i in range(first, first + 3):
            log.append(request(i))
        log.close()
    report = verify_log(lines(p), keys_of(old, new))
    assert report.ok and report.checkpoints == 2 and report.records == 8
    report = verify_log(lines(p), keys_of(new))
    assert not report.ok and report.first_bad_line == 4
    assert f"unknown key {old.key_id}" in report.problem and report.suspect_seqs == (1, 3)


def test_fsync_syncs_every_write(
    tmp_path: Path, signer: CheckpointSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    log = AuditLog(tmp_path / "a.jsonl", signer=signer, every_records=2, fsync=True)
    log.append(request(1))
    log.append(request(2))
    log.close()
    assert len(synced) == 3  # two records and the checkpoint
    unsynced = AuditLog(tmp_path / "b.jsonl")
    unsynced.append(request(1))
    unsynced.close()
    assert len(synced) == 3


def test_fsync_failure_fails_closed_and_stays_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    p = tmp_path / "a.jsonl"
    log = AuditLog(p, fsync=True)
    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(AuditError, match="fdatasync failed"):
        log.append(request(1))
    assert not log.healthy
    monkeypatch.undo()  # the disk seems fine again: still refused, durability unknown
    with pytest.raises(AuditError, match="fdatasync failed"):
        log.append(request(2))
    assert not log.healthy
    log.close()
    assert [r["seq"] for r in read(p)] == [1]  # the line went in; the chain stays whole
    reopened = AuditLog(p, fsync=True)
    reopened.append(request(3))
    reopened.close()
    assert verify_log(lines(p), None).records == 2


# -- what the signatures catch --------------------------------------------------------
def test_recomputed_chain_after_an_edit_is_caught_only_by_the_signature(
    signed_log: Path, signer: CheckpointSigner
) -> None:
    recs = read(signed_log)
    recs[5]["decision"] = "deny"  # seq 6, in the window signed by the checkpoint at seq 8
    forged = rechain(recs)
    assert verify_log(forged, None).ok  # the chain alone is fooled
    report = verify_log(forged, keys_of(signer))
    assert not report.ok
    assert (report.first_bad_line, report.first_bad_seq) == (8, 8)
    assert report.suspect_seqs == (5, 7)  # after the good checkpoint at seq 4
    assert "signature does not verify" in report.problem and "5..7" in report.problem
    assert report.checkpoints == 1 and report.records == 7


def test_recomputed_chain_with_untouched_checkpoints_is_caught_without_keys(
    signed_log: Path,
) -> None:
    recs = read(signed_log)
    recs[0]["decision"] = "deny"
    out, prev = [], GENESIS_HASH  # recompute hashes but leave the checkpoints as they were
    for seq, rec in enumerate(recs, start=1):
        body = {k: v for k, v in rec.items() if k not in ("seq", "prev_hash", "hash")}
        line, prev = sealed_line(body, seq, prev)
        out.append(line)
    report = verify_log(out, None)
    assert not report.ok and report.first_bad_line == 4 and report.suspect_seqs == (1, 3)
    assert "does not attest the record before it" in report.problem


def test_edited_deleted_reordered_and_truncated_with_signatures(
    signed_log: Path, signer: CheckpointSigner
) -> None:
    keys = keys_of(signer)
    original = lines(signed_log)

    edited = list(original)
    rec = json.loads(edited[4])
    rec["status"] = 500
    edited[4] = json.dumps(rec).encode() + b"\n"
    deleted = original[:5] + original[6:]
    reordered = [*original[:4], original[5], original[4], *original[6:]]
    truncated = [*original[:-1], original[-1][:-15]]
    no_checkpoint = original[:3] + original[4:]  # a checkpoint removed

    cases = [
        (edited, 5, "edited"),
        (deleted, 6, "deleted"),
        (reordered, 5, "reordered"),
        (truncated, 14, "truncated"),
        (no_checkpoint, 4, "deleted"),
    ]
    for variant, bad_line, word in cases:
        report = verify_log(variant, keys)
        assert not report.ok, word
        assert report.first_bad_line == bad_line == report.first_bad_seq, word
        assert word in report.problem


def test_checkpoint_signed_by_an_unknown_key(signed_log: Path, signer: CheckpointSigner) -> None:
    recs = read(signed_log)
    recs[1]["decision"] = "deny"
    attacker = new_signer()
    # The attacker re-signs the first checkpoint with their own key.
    forged_cp = recs[3]
    body = rechain(recs[:3])
    head = json.loads(body[-1])["hash"]
    forged_cp["checkpoint"] = attacker.sign(covers_seq=3, head_hash=head, time=forged_cp["time"])
    report = verify_log(rechain(recs), keys_of(signer))
    assert not report.ok and report.first_bad_line == 4 and report.suspect_seqs == (1, 3)
    assert f"unknown key {attacker.key_id}" in report.problem
    # With the attacker's key trusted as well, the same file verifies up to the next one.
    assert verify_log(rechain(recs), keys_of(signer, attacker)).first_bad_line == 8


def test_forged_checkpoint_naming_our_key(signed_log: Path, signer: CheckpointSigner) -> None:
    recs = read(signed_log)
    attacker = new_signer()
    # Inserted after seq 5, claiming our key id, signed with another key.
    cp = attacker.sign(covers_seq=5, head_hash=recs[4]["hash"], time="2030-01-01T00:00:00.000Z")
    cp["key_id"] = signer.key_id
    recs.insert(5, {"type": "checkpoint", "time": "2030-01-01T00:00:00.000Z", "checkpoint": cp})
    report = verify_log(rechain(recs), keys_of(signer))
    assert not report.ok and report.first_bad_line == 6 and report.suspect_seqs == (5, 5)
    assert "signature does not verify" in report.problem


def test_a_checkpoint_edited_in_place_is_caught(signed_log: Path, signer: CheckpointSigner) -> None:
    recs = read(signed_log)
    recs[3]["time"] = "2001-01-01T00:00:00.000Z"  # the signed time, recomputed chain
    report = verify_log(rechain(recs), keys_of(signer))
    assert not report.ok and report.first_bad_line == 4
    recs = read(signed_log)
    recs[3]["checkpoint"]["alg"] = "none"
    report = verify_log(rechain(recs), keys_of(signer))
    assert not report.ok and "algorithm" in report.problem


def test_stripped_checkpoints_fail_only_with_max_unsigned(
    signed_log: Path, signer: CheckpointSigner
) -> None:
    recs = [r for r in read(signed_log) if r["type"] != "checkpoint"]
    stripped = rechain(recs)
    report = verify_log(stripped, keys_of(signer))
    assert report.ok and report.checkpoints == 0 and report.unsigned_tail == 10
    report = verify_log(stripped, keys_of(signer), max_unsigned=3)
    assert not report.ok and report.first_bad_line == 1 and report.suspect_seqs == (1, 10)
    assert "covered by no signed checkpoint" in report.problem
    # An intact log closed by its writer passes max_unsigned 0.
    assert verify_log(lines(signed_log), keys_of(signer), max_unsigned=0).ok


def test_verify_streams(signed_log: Path, signer: CheckpointSigner) -> None:
    def one_at_a_time() -> Iterator[bytes]:
        with signed_log.open("rb") as fh:
            yield from fh

    assert verify_log(one_at_a_time(), keys_of(signer)).checkpoints == 4


# -- key files ------------------------------------------------------------------------
def test_write_keypair_and_load_it_back(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    kid = write_keypair(priv, pub)
    assert priv.stat().st_mode & 0o777 == 0o600 and pub.stat().st_mode & 0o777 == 0o644
    signer = CheckpointSigner(load_signing_key(priv))
    assert signer.key_id == kid
    assert list(load_public_keys([pub])) == [kid]
    with pytest.raises(AuditError, match="already exists"):
        write_keypair(priv, tmp_path / "other.pub.pem")
    with pytest.raises(AuditError, match="already exists"):
        write_keypair(tmp_path / "other.pem", pub)
    assert not (tmp_path / "other.pem").exists() and not (tmp_path / "other.pub.pem").exists()
    with pytest.raises(AuditError, match="private key"):
        load_public_keys([priv])


def test_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    priv = tmp_path / "k.pem"
    write_keypair(priv, tmp_path / "k.pub.pem")
    priv.chmod(0o644)
    with pytest.raises(AuditError, match="chmod 600"):
        load_signing_key(priv)
    priv.chmod(0o640)
    if os.geteuid() == 0:
        # Root-owned and group-readable is how Kubernetes mounts a Secret with an
        # fsGroup: accepted, as PostgreSQL does for its key; anyone else's is not.
        load_signing_key(priv)
        os.chown(priv, 54321, -1)
    with pytest.raises(AuditError, match="chmod 600"):
        load_signing_key(priv)
    priv.chmod(0o600)
    load_signing_key(priv)


def test_signing_key_must_be_ed25519(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)
    with pytest.raises(AuditError, match="PKCS#8"):
        load_signing_key(bad)
    with pytest.raises(AuditError, match="cannot read"):
        load_signing_key(tmp_path / "missing.pem")


def test_dev_signing_key_is_made_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ensure_dev_signing_key(state)
    assert first == state / "audit-signing.pem"
    assert first.stat().st_mode & 0o777 == 0o600
    pub = state / "audit-signing.pub.pem"
    kid = CheckpointSigner(load_signing_key(first)).key_id
    assert list(load_public_keys([pub])) == [kid]
    pub.unlink()
    assert ensure_dev_signing_key(state) == first  # same key, public half rewritten
    assert list(load_public_keys([pub])) == [kid]


def write_config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "casb.yaml"
    cfg.write_text(
        "destinations: {pacs: {upstream: 'http://127.0.0.1:1/dicom-web'}}\n"
        "identity: {issuer: https://idp.example, audience: casb, "
        "jwks_url: https://idp.example/jwks}\n" + body
    )
    return cfg


def test_signer_from_settings(tmp_path: Path) -> None:
    def make(body: str) -> Settings:
        return load_settings(write_config(tmp_path, body))

    with pytest.raises(AuditError, match="signing_key_file: required in production"):
        signer_from_settings(make("environment: production\n"))
    dev = signer_from_settings(make(f"environment: dev\nstate_dir: {tmp_path / 'st'}\n"))
    assert (tmp_path / "st" / "audit-signing.pem").exists()
    write_keypair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    prod = signer_from_settings(
        make(
            "environment: production\n"
            "audit: {source_id: casb-eu-1, checkpoints: {signing_key_file: k.pem}}\n"
        )
    )
    assert prod.source_id == "casb-eu-1" and prod.key_id != dev.key_id
    assert list(load_public_keys([tmp_path / "k.pub.pem"])) == [prod.key_id]
