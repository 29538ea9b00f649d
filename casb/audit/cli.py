"""`casb audit`: check an audit log, make checkpoint signing keys.

    casb audit verify FILE     check the hash chain and the signed checkpoints
    casb audit keygen          write a new Ed25519 key pair for signing checkpoints
    casb audit export          (casb/audit/export.py)

verify exits 0 when the log is intact, 1 when it was tampered with (naming the first
bad line and seq), 2 on a usage or configuration problem (no file, no public key).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from casb.audit.checkpoint import (
    VerifyReport,
    configured_signing_key,
    load_public_keys,
    load_signing_key,
    public_keyring,
    verify_log,
    write_keypair,
)
from casb.audit.log import AuditError

EXIT_OK, EXIT_TAMPERED, EXIT_USAGE = 0, 1, 2

_NO_KEY = (
    "no public key to check the checkpoint signatures with: pass --public-key FILE (the "
    "public half `casb audit keygen` wrote; repeat it for rotated keys), set "
    "audit.checkpoints.signing_key_file in the configuration (--config), or pass "
    "--no-signatures to check the hash chain only"
)


class _Usage(Exception):
    pass


def add_audit_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `casb audit verify`, `casb audit keygen` and `casb audit export`."""
    audit = sub.add_parser("audit", help="audit log tools", description="Audit log tools.")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")

    p = asub.add_parser(
        "verify",
        help="check an audit log's hash chain and signed checkpoints",
        description="Verify a JSONL audit log: the hash chain (an edited, deleted, inserted "
        "or reordered record) and the Ed25519 signature of every checkpoint (a log "
        "rewritten with recomputed hashes). Exit 0 if intact, 1 naming the first bad line "
        "and seq, 2 on a usage error. Public keys: --public-key, else the one of the "
        "configured signing key (audit.checkpoints.signing_key_file, or in dev the key "
        "under state_dir).",
    )
    p.add_argument("file", metavar="FILE", help="the audit log (JSONL)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument(
        "--public-key",
        action="append",
        type=Path,
        metavar="PEM",
        help="an Ed25519 public key checkpoints may be signed with (repeat for rotated keys)",
    )
    keys.add_argument(
        "--no-signatures",
        action="store_true",
        help="check the hash chain only (does not detect a consistently rewritten log)",
    )
    p.add_argument(
        "--max-unsigned",
        type=int,
        metavar="N",
        help="fail if more than N records at the end are covered by no signed checkpoint "
        "(e.g. 0 for a log its writer closed; a crash leaves up to "
        "audit.checkpoints.every_records)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--config", "-c", metavar="FILE", help="casb.yaml naming the signing key")
    p.set_defaults(func=cmd_verify)

    p = asub.add_parser(
        "keygen",
        help="write a new checkpoint signing key pair",
        description="Write a new Ed25519 key pair for signing audit checkpoints: the "
        "private key (PKCS#8 PEM, mode 0600; name it in audit.checkpoints.signing_key_file) "
        "and the public key (give it to `casb audit verify --public-key`). Refuses to "
        "overwrite either file. Prints the key id.",
    )
    p.add_argument("--private", required=True, type=Path, metavar="OUT", help="private key file")
    p.add_argument("--public", required=True, type=Path, metavar="OUT", help="public key file")
    p.set_defaults(func=cmd_keygen)

    from casb.audit.export import add_export_command

    add_export_command(asub)


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        if args.max_unsigned is not None and (args.max_unsigned < 0 or args.no_signatures):
            raise _Usage("--max-unsigned needs signatures checked and N >= 0")
        public_keys = None if args.no_signatures else _public_keys(args)
        try:
            with open(args.file, "rb") as fh:
                report = verify_log(fh, public_keys, max_unsigned=args.max_unsigned)
        except OSError as exc:
            raise _Usage(f"{args.file}: {exc.strerror}") from None
    except (_Usage, AuditError) as exc:
        print(f"casb: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report.to_json()) if args.json else render(report))
    return EXIT_OK if report.ok else EXIT_TAMPERED


def _public_keys(args: argparse.Namespace) -> dict[str, Ed25519PublicKey]:
    """--public-key files, else the public half of the configured signing key."""
    if args.public_key:
        return load_public_keys(args.public_key)
    from casb.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        raise _Usage(str(exc)) from None
    path = configured_signing_key(settings, create=False)
    if path is None:
        raise _Usage(_NO_KEY)
    return public_keyring([load_signing_key(path).public_key()])


def render(report: VerifyReport) -> str:
    """The human-readable verdict."""
    if not report.ok:
        return (
            f"TAMPERED: line {report.first_bad_line} (seq {report.first_bad_seq}): "
            f"{report.problem} ({report.records} records before it verified)"
        )
    if not report.signatures_checked:
        return (
            f"OK: {report.records} records, hash chain intact (signatures NOT checked: a "
            "consistently rewritten log passes this check)"
        )
    lines = [
        f"OK: {report.records} records, hash chain intact, "
        f"{report.checkpoints} signed checkpoint(s) verified"
    ]
    if report.unsigned_tail:
        lines.append(
            f"note: the last {report.unsigned_tail} record(s) are not yet covered by a "
            "signed checkpoint (protected by the hash chain only)"
        )
    return "\n".join(lines)


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        kid = write_keypair(args.private, args.public)
    except AuditError as exc:
        print(f"casb: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(kid)
    print(
        f"wrote {args.private} (mode 0600: keep it secret; audit.checkpoints."
        f"signing_key_file) and {args.public} (for `casb audit verify --public-key`)",
        file=sys.stderr,
    )
    return EXIT_OK
