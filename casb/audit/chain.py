"""Hash chain over audit records: each record carries the hash of the one before it.

hash = sha256(canonical JSON of the record without its "hash" field), where the record
includes "seq" (1, 2, 3, ...) and "prev_hash" (the previous record's hash; 64 zeros for
the first). Editing a record breaks its hash; deleting or reordering records breaks the
seq/prev_hash links. Pure functions: the writer (log.py) and the verifier
(checkpoint.verify_log) share them.

The chain alone does not stop someone who rewrites the whole file and recomputes every
hash; signed checkpoints (checkpoint.py) do.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS_HASH = "0" * 64
# Fields the chain owns: a caller's record must not carry them.
CHAIN_FIELDS = frozenset({"seq", "prev_hash", "hash"})


def canonical_json(record: dict[str, Any]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def sealed_line(record: dict[str, Any], seq: int, prev_hash: str) -> tuple[bytes, str]:
    """The JSONL line for `record` as chain entry `seq`, and its hash. Serialises once:
    the line is the canonical JSON that was hashed, with "hash" appended (verification
    re-canonicalises, so the line's key order does not matter)."""
    body = canonical_json(dict(record, seq=seq, prev_hash=prev_hash))
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


def read_entry(raw: bytes, seq: int, prev_hash: str) -> tuple[dict[str, Any] | None, str]:
    """Parse one JSONL line as chain entry `seq` following `prev_hash`.

    Returns (record, "") when the line is that entry, else (None, the problem). Says
    nothing about what the record means: checkpoints are checked by the caller.
    """
    if not raw.endswith(b"\n"):
        return None, "truncated: no newline at the end of the line (a write was cut short)"
    if not raw.strip():
        return None, "empty line"
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "not valid JSON (truncated or edited)"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    try:
        digest = record_hash(record)
    except ValueError:  # NaN or infinity: canonical JSON refuses them, the writer never wrote one
        return None, "not canonical JSON (edited)"
    if record.get("hash") != digest:
        return None, "hash mismatch: the record was edited"
    if record.get("seq") != seq:
        return None, (
            f"sequence {record.get('seq')!r} where {seq} was expected: "
            "records were deleted, inserted or reordered"
        )
    if record.get("prev_hash") != prev_hash:
        return None, (
            "prev_hash does not match the previous record: "
            "records were deleted, inserted or reordered"
        )
    return record, ""
