"""The addon's response stream around a DLP transform: once the transform fails, no
byte of the upstream's body reaches the client, even though mitmproxy keeps feeding
the stream after the flow was killed; the audit record says why."""

from __future__ import annotations

import json
from pathlib import Path

from mitmproxy.test import tflow

from casb.exchange import Forward
from casb.mitm_addon import CasbAddon, _AuditedStream, _Transform
from casb.pipeline import new_transaction
from tests.jwks_server import TestKey
from tests.unit.test_pipeline import make_runtime


class _FailsOnSecondChunk(_Transform):
    """Stands in for a DLP transform that breaks part-way through a body."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: bytes) -> list[bytes]:
        self.calls += 1
        if self.calls == 2:
            raise ValueError("broken")
        return [data.upper()] if data else []


def test_after_a_transform_fails_nothing_more_is_released(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, TestKey.generate("ES256"))
    addon = CasbAddon(runtime)
    flow = tflow.tflow(resp=True)
    tx = new_transaction("GET")
    tx.outcome = Forward(scheme="http", host="h", port=80, target="/")
    stream = _AuditedStream(addon, flow, tx, _FailsOnSecondChunk())
    sent = [*stream(b"one"), *stream(b"two"), *stream(b"SECRET-1"), *stream(b"SECRET-2")]
    sent += stream(b"")
    # "ONE" was held back (the latest chunk waits for the audit record) and then dropped.
    assert sent == []
    assert b"SECRET" not in b"".join(sent)
    assert flow.error is not None  # killed
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert (record["status"], record["error"]) == (502, "response_blocked")
    assert any("internal error: ValueError" in r for r in record["reasons"])
