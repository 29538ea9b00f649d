"""Audit: one tamper-evident JSON record per request (DESIGN.md, "Audit record")."""

from casb.audit.chain import ChainReport, verify_lines
from casb.audit.log import AuditError, AuditLog

__all__ = ["AuditError", "AuditLog", "ChainReport", "verify_lines"]
