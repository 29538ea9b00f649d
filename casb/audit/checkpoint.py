"""Signed checkpoints: what makes a rewritten audit log detectable, and verifying a log.

The hash chain (chain.py) shows an edit, a deletion or a reordering, unless whoever made
it recomputed every hash after it. A checkpoint is an ordinary chain record that signs
the head of the chain with an Ed25519 key the writer holds and the file's editor does
not:

    {"type": "checkpoint", "time": "2025-01-01T00:00:00.000Z",
     "checkpoint": {"covers_seq": N, "head_hash": <hash of record N>, "key_id": <16 hex>,
                    "alg": "Ed25519", "source_id": "casb", "signature": <base64>},
     "seq": N + 1, "prev_hash": <hash of record N>, "hash": ...}

The signature is over the canonical JSON of {"purpose", "alg", "covers_seq", "head_hash",
"key_id", "source_id", "time"} (see `signed_payload`; "purpose" is the constant
SIGNATURE_PURPOSE, so a signature made for anything else never passes for a checkpoint).
As head_hash chains to every record before it, one valid checkpoint attests all of them.
key_id is the first 16 hex digits of the SHA-256 of the raw 32-byte public key, so a
verifier given several public keys (key rotation) knows which one to use.

Records after the last checkpoint are protected by the chain only: verify_log reports
how many (`unsigned_tail`) and can be told how many to accept (`max_unsigned`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from casb.audit.chain import GENESIS_HASH, canonical_json, read_entry
from casb.audit.log import CHECKPOINT, AuditError

if TYPE_CHECKING:
    from casb.config import Settings

ALG = "Ed25519"
SIGNATURE_PURPOSE = "casb audit checkpoint v1"
DEV_SIGNING_KEY_NAME = "audit-signing.pem"
DEV_PUBLIC_KEY_NAME = "audit-signing.pub.pem"


# -- signing --------------------------------------------------------------------------
def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_payload(
    *, covers_seq: int, head_hash: str, key_id: str, time: str, source_id: str
) -> bytes:
    """The bytes a checkpoint signature is over."""
    return canonical_json(
        {
            "purpose": SIGNATURE_PURPOSE,
            "alg": ALG,
            "covers_seq": covers_seq,
            "head_hash": head_hash,
            "key_id": key_id,
            "source_id": source_id,
            "time": time,
        }
    )


class CheckpointSigner:
    """Signs checkpoints with one Ed25519 key, naming this proxy as `source_id`."""

    def __init__(self, private_key: Ed25519PrivateKey, *, source_id: str = "casb") -> None:
        self._key = private_key
        self.source_id = source_id
        self.key_id = key_id(private_key.public_key())

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, *, covers_seq: int, head_hash: str, time: str) -> dict[str, Any]:
        """The "checkpoint" field of a checkpoint record whose "time" is `time`, attesting
        that record `covers_seq` has hash `head_hash`."""
        payload = signed_payload(
            covers_seq=covers_seq,
            head_hash=head_hash,
            key_id=self.key_id,
            time=time,
            source_id=self.source_id,
        )
        return {
            "covers_seq": covers_seq,
            "head_hash": head_hash,
            "key_id": self.key_id,
            "alg": ALG,
            "source_id": self.source_id,
            "signature": base64.b64encode(self._key.sign(payload)).decode("ascii"),
        }


# -- verifying ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    records: int  # chain entries verified, checkpoints included (all of them when ok)
    checkpoints: int  # checkpoints whose signature verified (0 when not checked)
    signatures_checked: bool
    # Records (not checkpoints) after the last verified checkpoint: protected by the
    # chain only. None when signatures were not checked.
    unsigned_tail: int | None
    first_bad_line: int | None = None  # 1-based line number in the file
    first_bad_seq: int | None = None  # the seq that line should have had
    problem: str = ""
    # A checkpoint that fails: the seqs it attests that no earlier checkpoint did; one
    # of them (or the checkpoint itself) was altered.
    suspect_seqs: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "signatures_checked": self.signatures_checked,
            "unsigned_tail": self.unsigned_tail,
            "first_bad_line": self.first_bad_line,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "suspect_seqs": None if self.suspect_seqs is None else list(self.suspect_seqs),
        }


def checkpoint_problem(
    record: dict[str, Any],
    prev_hash: str,
    public_keys: Mapping[str, Ed25519PublicKey] | None,
) -> tuple[str, bool]:
    """What is wrong with checkpoint `record` (a valid chain entry following `prev_hash`):
    ("", False) if nothing, else (the problem, whether the records it covers are in
    doubt). Without public keys only its structure and its link to the chain are checked.
    """
    cp = record.get("checkpoint")
    time = record.get("time")
    if not isinstance(cp, dict) or not isinstance(time, str):
        return "malformed checkpoint: no checkpoint fields or no time", False
    covers = cp.get("covers_seq")
    names = ("head_hash", "key_id", "alg", "source_id", "signature")
    texts = [v for v in (cp.get(n) for n in names) if isinstance(v, str)]
    if not isinstance(covers, int) or isinstance(covers, bool) or len(texts) != len(names):
        return "malformed checkpoint: a field is missing or has the wrong type", False
    head, kid, alg, source, sig = texts
    if alg != ALG:
        return f"checkpoint algorithm {alg!r} is not {ALG}", False
    if covers != record["seq"] - 1 or head != prev_hash:
        return "checkpoint does not attest the record before it", True
    if public_keys is None:
        return "", False
    public_key = public_keys.get(kid)
    if public_key is None:
        return (
            f"checkpoint signed by an unknown key {kid} (a rotated-out key? give its "
            "public key too)",
            True,
        )
    try:
        signature = base64.b64decode(sig, validate=True)
    except binascii.Error:
        return "malformed checkpoint: the signature is not base64", True
    payload = signed_payload(
        covers_seq=covers, head_hash=head, key_id=kid, time=time, source_id=source
    )
    try:
        public_key.verify(signature, payload)
    except InvalidSignature:
        return "checkpoint signature does not verify", True
    return "", False


def verify_log(
    lines: Iterable[bytes],
    public_keys: Mapping[str, Ed25519PublicKey] | None,
    *,
    max_unsigned: int | None = None,
) -> VerifyReport:
    """Check a JSONL audit log line by line (streaming: a file object works): the hash
    chain, and with `public_keys` (key_id -> key) every checkpoint's signature. Reports
    the first line that is not a valid continuation. With `max_unsigned`, more records
    than that after the last verified checkpoint also fail (someone who rewrites the
    file can drop every checkpoint; the tail a crash leaves is at most what
    audit.checkpoints.every_records / every_seconds allow)."""
    checked = public_keys is not None
    prev_hash, records, verified = GENESIS_HASH, 0, 0
    last_checkpoint = 0  # seq of the last good checkpoint
    tail, tail_line = 0, 0  # records after it, and the line of the first of them

    def failed(line: int, problem: str, suspect: tuple[int, int] | None = None) -> VerifyReport:
        return VerifyReport(
            ok=False,
            records=records,
            checkpoints=verified,
            signatures_checked=checked,
            unsigned_tail=tail if checked else None,
            first_bad_line=line,
            first_bad_seq=records + 1,
            problem=problem,
            suspect_seqs=suspect,
        )

    for lineno, raw in enumerate(lines, start=1):
        seq = records + 1
        record, problem = read_entry(raw, seq, prev_hash)
        if record is None:
            return failed(lineno, problem)
        if record.get("type") == CHECKPOINT:
            problem, covered_in_doubt = checkpoint_problem(record, prev_hash, public_keys)
            if problem:
                first, last = last_checkpoint + 1, seq - 1
                if covered_in_doubt and first <= last:
                    return failed(
                        lineno,
                        f"{problem}; records {first}..{last} (since the previous good "
                        "checkpoint) are not proven intact: one was altered after it was "
                        "signed, or the checkpoint is forged",
                        (first, last),
                    )
                return failed(lineno, f"{problem}: the checkpoint is forged or was edited")
            if checked:
                verified += 1
            last_checkpoint, tail, tail_line = seq, 0, 0
        else:
            tail += 1
            tail_line = tail_line or lineno
        prev_hash, records = record["hash"], seq
    if checked and max_unsigned is not None and tail > max_unsigned:
        return VerifyReport(
            ok=False,
            records=records,
            checkpoints=verified,
            signatures_checked=True,
            unsigned_tail=tail,
            first_bad_line=tail_line,
            first_bad_seq=last_checkpoint + 1,
            problem=f"the last {tail} records are covered by no signed checkpoint (at most "
            f"{max_unsigned} allowed): checkpoints were removed, or the writer stopped "
            "signing",
            suspect_seqs=(last_checkpoint + 1, records),
        )
    return VerifyReport(
        ok=True,
        records=records,
        checkpoints=verified,
        signatures_checked=checked,
        unsigned_tail=tail if checked else None,
    )


# -- key files ------------------------------------------------------------------------
def _check_private_mode(path: Path, st: os.stat_result) -> None:
    """Refuse a key others can read or anyone but the owner can change. Like PostgreSQL's
    ssl_key_file rule, a root-owned file may also be group-readable (0640/0440): that is
    how Kubernetes mounts a Secret for a pod with an fsGroup."""
    mode = stat.S_IMODE(st.st_mode)
    allowed = 0o740 if st.st_uid == 0 else 0o700
    if mode & ~allowed & 0o777:
        raise AuditError(
            f"{path}: the audit signing key has mode {mode:04o}, readable or writable by "
            f"others; run `chmod 600 {path}`"
        )


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key (PKCS#8 PEM, unencrypted) in `path`; AuditError if it is
    missing, readable by others, or not such a key."""
    try:
        with open(path, "rb") as fh:
            _check_private_mode(path, os.fstat(fh.fileno()))
            pem = fh.read()
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit signing key: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditError(
            f"{path}: not an unencrypted PKCS#8 PEM private key (`casb audit keygen` writes one)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path}: not an Ed25519 key (`casb audit keygen` writes one)")
    return key


def public_keyring(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """key_id -> key, what verify_log takes."""
    return {key_id(k): k for k in keys}


def load_public_keys(paths: Sequence[Path]) -> dict[str, Ed25519PublicKey]:
    """key_id -> key for Ed25519 public keys (SubjectPublicKeyInfo PEM files)."""
    keys: list[Ed25519PublicKey] = []
    for path in paths:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise AuditError(f"{path}: cannot read the public key: {exc.strerror}") from exc
        if b"PRIVATE KEY" in pem:
            raise AuditError(
                f"{path}: holds a private key; give the public key (`casb audit keygen` "
                "writes both)"
            )
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise AuditError(f"{path}: not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise AuditError(f"{path}: not an Ed25519 public key")
        keys.append(key)
    return public_keyring(keys)


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair: the private key (PKCS#8 PEM, mode 0600) and its public
    key (PEM, 0644). Refuses to overwrite either file. Returns the key id."""
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise AuditError("the private and public key files must differ")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise AuditError(f"{path}: already exists; refusing to overwrite it")
    key = Ed25519PrivateKey.generate()
    try:
        _create_exclusive(private_path, _private_pem(key), 0o600)
    except OSError as exc:
        raise AuditError(f"{private_path}: cannot create: {exc.strerror}") from exc
    try:
        _create_exclusive(public_path, _public_pem(key.public_key()), 0o644)
    except OSError as exc:
        private_path.unlink()
        raise AuditError(f"{public_path}: cannot create: {exc.strerror}") from exc
    return key_id(key.public_key())


def ensure_dev_signing_key(state_dir: Path) -> Path:
    """The dev signing key under `state_dir` (generated on first use, mode 0600, with its
    public key beside it); returns the private key's path. Dev only: production names
    its key in audit.checkpoints.signing_key_file."""
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = state_dir / DEV_SIGNING_KEY_NAME
    if not private_path.exists():
        # Written under a temporary name (mode 0600), then linked into place: a second
        # process that races us keeps whichever key got there first.
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".audit-signing-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_private_pem(Ed25519PrivateKey.generate()))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, private_path)
        finally:
            os.unlink(tmp)
    public_pem = _public_pem(load_signing_key(private_path).public_key())
    public_path = state_dir / DEV_PUBLIC_KEY_NAME
    with contextlib.suppress(OSError):
        if public_path.read_bytes() == public_pem:
            return private_path
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".audit-signing-pub-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(public_pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, public_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return private_path


def configured_signing_key(settings: Settings, *, create: bool) -> Path | None:
    """The signing key file `settings` name: audit.checkpoints.signing_key_file, else in
    dev the one under state_dir (generated when `create`, else only if it exists);
    None when there is none."""
    configured = settings.audit.checkpoints.signing_key_file
    if configured is not None:
        return configured
    if settings.environment != "dev":
        return None
    if create:
        return ensure_dev_signing_key(settings.state_dir)
    dev_key = settings.state_dir / DEV_SIGNING_KEY_NAME
    return dev_key if dev_key.exists() else None


def signer_from_settings(settings: Settings) -> CheckpointSigner:
    """The checkpoint signer the proxy uses. Production without a signing key file is
    refused: an audit log without signed checkpoints can be rewritten unnoticed."""
    path = configured_signing_key(settings, create=True)
    if path is None:
        raise AuditError(
            "audit.checkpoints.signing_key_file: required in production (`casb audit "
            "keygen --private FILE --public FILE` writes a key pair)"
        )
    return CheckpointSigner(load_signing_key(path), source_id=settings.audit.source_id)
