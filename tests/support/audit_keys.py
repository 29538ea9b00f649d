"""Audit settings for production test configs: an Ed25519 checkpoint signing key pair
(written once per directory) and the log path. Production refuses to start without
the key (casb.audit.checkpoint.signer_from_settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from casb.audit.checkpoint import write_keypair

PRIVATE = "audit-signing.pem"
PUBLIC = "audit-signing.pub.pem"


def audit_settings(workdir: Path, **more: Any) -> dict[str, Any]:
    """{"path": workdir/audit.jsonl, "checkpoints": {"signing_key_file": ...}, **more}."""
    workdir.mkdir(parents=True, exist_ok=True)
    private = workdir / PRIVATE
    if not private.exists():
        write_keypair(private, workdir / PUBLIC)
    return {
        "path": str(workdir / "audit.jsonl"),
        "checkpoints": {"signing_key_file": str(private)},
        **more,
    }


def public_key(workdir: Path) -> Path:
    """The public half of audit_settings(workdir)'s key, for `casb audit verify`."""
    return workdir / PUBLIC
