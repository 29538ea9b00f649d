"""Audit: one tamper-evident JSON record per request (DESIGN.md, "Audit record"), hash
chained, with signed checkpoints; `casb audit verify` checks both."""

from casb.audit.checkpoint import (
    CheckpointSigner,
    VerifyReport,
    ensure_dev_signing_key,
    load_public_keys,
    load_signing_key,
    signer_from_settings,
    verify_log,
    write_keypair,
)
from casb.audit.log import AuditError, AuditLog

__all__ = [
    "AuditError",
    "AuditLog",
    "CheckpointSigner",
    "VerifyReport",
    "ensure_dev_signing_key",
    "load_public_keys",
    "load_signing_key",
    "signer_from_settings",
    "verify_log",
    "write_keypair",
]
