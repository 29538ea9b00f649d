"""Hash chain over audit records: each record carries the hash of the one before it.

hash = sha256(canonical JSON of the record without its "hash" field), where the record
includes "seq" (1, 2, 3, ...) and "prev_hash" (the previous record's hash; 64 zeros for
the first). Editing a record breaks its hash; deleting or reordering records breaks the
seq/prev_hash links. Pure functions: the sink and `casb audit verify` share them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GENESIS_HASH = "0" * 64


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


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    records: int  # records checked (all of them when ok)
    first_bad_line: int | None = None  # 1-based line number in the file
    problem: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad_line": self.first_bad_line,
            "problem": self.problem,
        }


def verify_lines(lines: Iterable[bytes]) -> ChainReport:
    """Check a JSONL audit log. Reports the first line that is not a valid continuation."""
    prev_hash, expected_seq, count = GENESIS_HASH, 1, 0
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            return ChainReport(False, count, lineno, "empty line")
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return ChainReport(False, count, lineno, "not valid JSON (truncated or edited)")
        if not isinstance(record, dict):
            return ChainReport(False, count, lineno, "not a JSON object")
        if record.get("hash") != record_hash(record):
            return ChainReport(False, count, lineno, "hash mismatch: the record was edited")
        seq = record.get("seq")
        if seq != expected_seq:
            return ChainReport(
                False,
                count,
                lineno,
                f"sequence {seq!r} where {expected_seq} was expected: "
                "records were deleted, inserted or reordered",
            )
        if record.get("prev_hash") != prev_hash:
            return ChainReport(
                False,
                count,
                lineno,
                "prev_hash does not match the previous record: "
                "records were deleted, inserted or reordered",
            )
        prev_hash, expected_seq, count = record["hash"], expected_seq + 1, count + 1
    return ChainReport(True, count)
