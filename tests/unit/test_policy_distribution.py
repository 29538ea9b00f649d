"""Hot policy reload on a real runtime (verifier, pipeline, audit log) and the real
MemoryState: publishing swaps the policy every request is decided by, a missed
notification is caught up by polling, a bad bundle or a bad edit never replaces the
good policy, a store outage keeps the last good one serving and reports degraded.

`FaultyState` is the real MemoryState with two faults a network brings: notifications
that never arrive, and a store that does not answer (StateUnavailable), switched on and
off by the test. Everything else is MemoryState's own behaviour.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from casb.admin import create_app
from casb.config import Settings
from casb.explain import explain
from casb.policy.bundle import make_bundle
from casb.policy.distribution import PolicyDistributor
from casb.runtime import Runtime
from casb.state import MemoryState, StateUnavailable
from casb.state.store import PolicyBundle, PolicyVersion, StoreHealth
from casb.telemetry import Telemetry
from tests.jwks_server import TestKey, jwks_of
from tests.support.audit_keys import audit_settings
from tests.support.processes import free_port

ISS, AUD = "https://idp.test", "casb"
POLL = 0.05  # seconds between polls in these tests
DEADLINE = 5.0

ROLES = "version: 1\nroles:\n  reader: {}\n"


def rules(*actions: str, destination: str = "pacs") -> str:
    return (
        "version: 1\nrules:\n"
        "  - id: reader-rule\n"
        "    effect: allow\n"
        "    roles: [reader]\n"
        f"    actions: [{', '.join(actions)}]\n"
        f"    destinations: [{destination}]\n"
    )


DEIDENTIFYING = (
    "version: 1\ndlp:\n  profiles:\n    research-view:\n      deidentify: [retain_uids]\n"
)


class FaultyState(MemoryState):
    """MemoryState whose policy calls can be made to fail (`down`) and whose
    notifications can be lost (`deaf`)."""

    def __init__(self, *, deaf: bool = False) -> None:
        super().__init__()
        self.down = False
        self.deaf = deaf
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise StateUnavailable("redis current_policy_version: Connection refused")

    async def ping(self) -> StoreHealth:
        if self.down:
            return StoreHealth(ok=False, backend=self.backend, detail="down")
        return await super().ping()

    async def current_policy_version(self) -> str | None:
        self._check()
        return await super().current_policy_version()

    async def current_policy(self) -> tuple[PolicyVersion, PolicyBundle] | None:
        self._check()
        return await super().current_policy()

    def policy_notifications(self) -> Any:
        if self.down:
            raise StateUnavailable("redis subscribe: Connection refused")
        if self.deaf:
            return _never()
        return super().policy_notifications()


async def _never() -> AsyncIterator[str]:
    await asyncio.Event().wait()
    yield ""  # pragma: no cover


@pytest.fixture(scope="module")
def key() -> TestKey:
    return TestKey.generate("ES256")


def write_policy(directory: Path, rules_text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "10-roles.yaml").write_text(ROLES)
    (directory / "20-rules.yaml").write_text(rules_text)


def build(
    tmp_path: Path, key: TestKey, *, state: dict[str, Any] | None = None, audit: bool = True
) -> Runtime:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_of(key)))
    policies = tmp_path / "policies"
    if not policies.exists():
        write_policy(policies, rules("retrieve"))
    settings = Settings(
        environment="production",
        destinations={"pacs": {"upstream": "https://pacs.example.org/dicom-web"}},
        identity={"issuer": ISS, "audience": [AUD], "jwks_file": str(jwks)},
        policy={"paths": [str(policies)]},
        audit=audit_settings(tmp_path / "audit"),
        state={"url": "memory://", "policy_poll_seconds": POLL, **(state or {})},
    )
    return Runtime.build(settings, audit=audit)


def policy_changes(rt: Runtime) -> list[dict[str, Any]]:
    lines = rt.settings.audit.path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "policy_change"]


async def eventually(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll `check` until it holds (a deadline, not a sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def decision(rt: Runtime, url: str = "/pacs/studies/1.2.3") -> str:
    result = await explain(
        rt.pipeline, method="GET", url=url, principal={"sub": "u1", "roles": ["reader"]}
    )
    return str(result["decision"])


class Metrics:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[self.reader]))

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found += [
                            (dict(p.attributes or {}), p.value) for p in metric.data.data_points
                        ]
        return found


def distributor(
    rt: Runtime, store: MemoryState, telemetry: Telemetry | None = None
) -> PolicyDistributor:
    """Following the store (the Redis behaviour), not the files."""
    return PolicyDistributor(store, rt.pipeline, rt.settings, telemetry, watch_files=False)


# -- following the store -------------------------------------------------------------------


async def test_a_published_policy_is_enforced_at_once_on_its_notification(
    tmp_path: Path, key: TestKey
) -> None:
    # Polling once a minute: only the notification can make the swap this quick.
    rt = build(tmp_path, key, state={"policy_poll_seconds": 60})
    store = MemoryState()
    metrics = Metrics()
    dist = distributor(rt, store, metrics.telemetry)
    local = rt.pipeline.policy.version
    await dist.start()
    try:
        assert dist.active_version == local and dist.source == "files"
        assert await decision(rt) == "allow"
        bundle = make_bundle({"roles.yaml": ROLES, "rules.yaml": rules("search")})
        before = dist.last_change
        await store.publish_policy(bundle, author="alice", comment="search only")
        await eventually(lambda: dist.active_version == bundle.version, "the swap")
        assert rt.pipeline.policy.version == bundle.version and dist.source == "store"
        assert dist.last_change >= before and not dist.degraded and dist.last_error is None
        assert await decision(rt) == "deny"  # retrieve is no longer allowed
        assert await decision(rt, "/pacs/studies?PatientID=x") == "allow"
    finally:
        await dist.aclose()
    activated = policy_changes(rt)[-1]
    assert {
        k: activated[k] for k in activated if k not in ("seq", "prev_hash", "hash", "time")
    } == {
        "type": "policy_change",
        "event": "activated",
        "policy_version": bundle.version,
        "previous_version": local,
        "rules": 1,
        "author": "alice",
        "comment": "search only",
        "activated_by": "alice",
        "activation_comment": "search only",
        "source": "store",
    }
    assert metrics.points("casb.policy.active") == [({"casb.policy_version": bundle.version}, 1)]
    assert metrics.points("casb.policy.reloads") == [({"outcome": "ok"}, 1)]


async def test_a_missed_notification_is_caught_up_by_polling(tmp_path: Path, key: TestKey) -> None:
    rt = build(tmp_path, key)
    store = FaultyState(deaf=True)  # no notification ever arrives
    dist = distributor(rt, store)
    await dist.start()
    try:
        bundle = make_bundle({"rules.yaml": ROLES + rules("search")[len("version: 1\n") :]})
        await store.publish_policy(bundle, author="bob")
        await eventually(lambda: dist.active_version == bundle.version, "the catch-up")
    finally:
        await dist.aclose()
    assert policy_changes(rt)[-1]["event"] == "activated"


async def test_start_adopts_the_stores_current_policy_and_an_empty_store_keeps_the_files(
    tmp_path: Path, key: TestKey
) -> None:
    rt = build(tmp_path, key)
    local = rt.pipeline.policy.version
    empty = distributor(rt, MemoryState())
    await empty.start()
    await empty.aclose()
    assert empty.active_version == local and empty.source == "files"
    assert [r["event"] for r in policy_changes(rt)] == ["loaded"]

    store = MemoryState()
    bundle = make_bundle({"roles.yaml": ROLES, "rules.yaml": rules("search")})
    await store.publish_policy(bundle, author="carol")
    dist = distributor(rt, store)
    await dist.start()  # adopted before start returns: no request sees the files' policy
    try:
        assert rt.pipeline.policy.version == bundle.version and dist.source == "store"
    finally:
        await dist.aclose()


async def test_an_invalid_bundle_is_rejected_and_the_last_good_policy_kept(
    tmp_path: Path, key: TestKey
) -> None:
    rt = build(tmp_path, key)
    store = MemoryState()
    metrics = Metrics()
    dist = distributor(rt, store, metrics.telemetry)
    await dist.start()
    try:
        good = make_bundle({"roles.yaml": ROLES, "rules.yaml": rules("search")})
        await store.publish_policy(good, author="alice")
        await eventually(lambda: dist.active_version == good.version, "the good policy")
        # Valid elsewhere, but this replica has no destination "archive".
        bad = make_bundle(
            {"roles.yaml": ROLES, "rules.yaml": rules("search", destination="archive")}
        )
        await store.publish_policy(bad, author="mallory", comment="typo")
        await eventually(lambda: dist.last_error is not None, "the refusal")
        assert dist.active_version == good.version
        assert "unknown destination 'archive' (known: pacs)" in (dist.last_error or "")
        assert not dist.degraded
        assert await decision(rt, "/pacs/studies?PatientID=x") == "allow"
        # A bundle whose files do not hash to its version is refused too.
        forged = PolicyBundle(
            files={"rules.yaml": ROLES + rules("retrieve")[len("version: 1\n") :]},
            version="sha256:" + "0" * 64,
        )
        await store.publish_policy(forged, author="mallory")
        await eventually(lambda: "not to its version" in (dist.last_error or ""), "forgery")
        # A policy that de-identifies needs a UID key this pipeline does not have.
        dlp = make_bundle({"dlp.yaml": DEIDENTIFYING, "rules.yaml": ROLES})
        await store.publish_policy(dlp, author="mallory")
        await eventually(lambda: "needs a UID key" in (dist.last_error or ""), "no UID key")
        assert rt.pipeline.policy.version == good.version
        # The next good one is taken, and clears the error.
        fixed = make_bundle({"roles.yaml": ROLES, "rules.yaml": rules("search", "retrieve")})
        await store.publish_policy(fixed, author="alice")
        await eventually(lambda: dist.active_version == fixed.version, "the fixed policy")
        assert dist.last_error is None
    finally:
        await dist.aclose()
    events = [(r["event"], r.get("policy_version")) for r in policy_changes(rt)[1:]]
    assert events == [
        ("activated", good.version),
        ("rejected", bad.version),
        ("rejected", forged.version),
        ("rejected", dlp.version),
        ("activated", fixed.version),
    ]
    rejected = policy_changes(rt)[2]
    assert rejected["active_version"] == good.version and rejected["source"] == "store"
    assert rejected["author"] == "mallory" and rejected["comment"] == "typo"
    assert rejected["error"].startswith("rules.yaml: rules[0].destinations[0]: unknown")
    outcomes = sorted(
        (attrs["outcome"], value) for attrs, value in metrics.points("casb.policy.reloads")
    )
    assert outcomes == [("ok", 2), ("rejected", 3)]


async def test_rollback_swaps_back_and_is_audited(tmp_path: Path, key: TestKey) -> None:
    rt = build(tmp_path, key)
    store = MemoryState()
    dist = distributor(rt, store)
    await dist.start()
    try:
        v1 = make_bundle({"roles.yaml": ROLES, "rules.yaml": rules("search")})
        v2 = make_bundle({"roles.yaml": ROLES, "rules.yaml": rules("retrieve")})
        await store.publish_policy(v1, author="alice")
        await eventually(lambda: dist.active_version == v1.version, "v1")
        await store.publish_policy(v2, author="alice")
        await eventually(lambda: dist.active_version == v2.version, "v2")
        assert await decision(rt) == "allow"
        await store.set_current_policy(v1.version, author="bob", comment="v2 broke reads")
        await eventually(lambda: dist.active_version == v1.version, "the rollback")
        assert await decision(rt) == "deny"
    finally:
        await dist.aclose()
    last = policy_changes(rt)[-1]
    assert (last["event"], last["policy_version"], last["previous_version"]) == (
        "activated",
        v1.version,
        v2.version,
    )
    # the record names who rolled back, and why, not only who published v1
    assert (last["author"], last["activated_by"], last["activation_comment"]) == (
        "alice",
        "bob",
        "v2 broke reads",
    )


async def test_a_store_outage_keeps_the_last_good_policy_and_reports_degraded(
    tmp_path: Path, key: TestKey, caplog: pytest.LogCaptureFixture
) -> None:
    rt = build(tmp_path, key)
    store = FaultyState()
    good = make_bundle({"roles.yaml": ROLES, "rules.yaml": rules("search")})
    await store.publish_policy(good, author="alice")
    dist = distributor(rt, store)
    rt.state, rt.policy_distributor = store, dist
    client = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(rt)), base_url="http://a")
    await rt.start()  # signing keys ready: only the store can make it degraded
    try:
        assert dist.active_version == good.version
        caplog.set_level(logging.WARNING, logger="casb.policy")
        store.down = True
        calls = store.calls
        await eventually(lambda: store.calls >= calls + 5, "five polls during the outage")
        assert dist.degraded and dist.active_version == good.version
        assert "Connection refused" in (dist.last_error or "")
        assert await decision(rt, "/pacs/studies?PatientID=x") == "allow"
        outage = [r for r in caplog.records if "state store unavailable" in r.getMessage()]
        assert len(outage) == 1  # once per outage, not per poll
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "degraded" and body["policy_version"] == good.version
        assert body["policy_source"] == "store"
        assert body["state"] == {"backend": "memory", "ok": False, "degraded": True}

        # Published while this replica could not hear it: caught up when the store answers.
        newer = make_bundle({"roles.yaml": ROLES, "rules.yaml": rules("search", "retrieve")})
        store.down = False
        await store.publish_policy(newer, author="alice")
        store.down = True
        calls = store.calls
        await eventually(lambda: store.calls >= calls + 2, "polls while down again")
        assert dist.active_version == good.version
        store.down = False
        await eventually(lambda: dist.active_version == newer.version, "the catch-up")
        assert not dist.degraded and dist.last_error is None
        assert [r for r in caplog.records if "answers again" in r.getMessage()]
        body = (await client.get("/readyz")).json()
        assert body["status"] == "ready" and body["policy_version"] == newer.version
        assert body["state"] == {"backend": "memory", "ok": True, "degraded": False}
    finally:
        await client.aclose()
        await rt.aclose()
    assert not dist.running


# -- watching the files (memory backend) ---------------------------------------------------


async def test_with_memory_state_the_runtime_reloads_edited_policy_files(
    tmp_path: Path, key: TestKey
) -> None:
    rt = build(tmp_path, key)
    policies = tmp_path / "policies"
    first = rt.pipeline.policy.version
    dist = rt.policy_distributor
    assert dist is not None and dist.watching_files and not dist.running
    client = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(rt)), base_url="http://a")
    await rt.start()
    try:
        assert dist.running and dist.active_version == first
        assert await decision(rt) == "allow"
        (policies / "20-rules.yaml").write_text(rules("search"))
        await eventually(lambda: dist.active_version != first, "the reload")
        second = dist.active_version
        assert dist.source == "files" and await decision(rt) == "deny"
        body = (await client.get("/readyz")).json()
        assert (body["policy_version"], body["policy_source"]) == (second, "files")
        assert body["state"] == {"backend": "memory", "ok": True, "degraded": False}

        # A broken edit is refused once; the last good policy keeps serving.
        (policies / "20-rules.yaml").write_text("version: 1\nrules: [\n")
        await eventually(lambda: dist.last_error is not None, "the refusal")
        assert "20-rules.yaml: line" in (dist.last_error or "")
        assert dist.active_version == second and await decision(rt) == "deny"
        # Emptying the directory is refused too.
        for path in policies.iterdir():
            path.rename(tmp_path / path.name)
        await eventually(lambda: "no *.yaml" in (dist.last_error or ""), "an empty directory")
        write_policy(policies, rules("search", "retrieve"))
        await eventually(lambda: dist.last_error is None, "the fix")
        assert dist.active_version not in (first, second) and await decision(rt) == "allow"
    finally:
        await client.aclose()
        await rt.aclose()
    assert not dist.running
    events = [(r["event"], r.get("source")) for r in policy_changes(rt)]
    assert events == [
        ("loaded", None),
        ("activated", "files"),
        ("rejected", "files"),
        ("rejected", "files"),
        ("activated", "files"),
    ]
    assert policy_changes(rt)[1]["files"] == ["policies"]


async def test_tools_that_only_decide_watch_nothing_and_share_no_state(
    tmp_path: Path, key: TestKey
) -> None:
    rt = build(tmp_path, key, state={"url": "redis://127.0.0.1:1/0"}, audit=False)
    assert rt.policy_distributor is None and rt.state.backend == "memory"
    await rt.start()
    await rt.aclose()


async def test_the_proxy_follows_the_configured_store_and_serves_when_it_is_down(
    tmp_path: Path, key: TestKey, caplog: pytest.LogCaptureFixture
) -> None:
    # A real Redis client and a port nobody listens on: the store is down from the start.
    url = f"redis://127.0.0.1:{free_port()}/0"
    rt = build(tmp_path, key, state={"url": url, "timeout_seconds": 0.2})
    dist = rt.policy_distributor
    assert rt.state.backend == "redis" and dist is not None and not dist.watching_files
    caplog.set_level(logging.WARNING, logger="casb.policy")
    local = rt.pipeline.policy.version
    await dist.start()
    try:
        assert dist.degraded and dist.active_version == local and dist.source == "files"
        assert "redis" in (dist.last_error or "")
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
        assert await decision(rt) == "allow"
    finally:
        await dist.aclose()
        rt.discard()
        await rt.state.aclose()


class ObservedState(MemoryState):
    """MemoryState that tells when the distributor has just asked for the version."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()

    async def current_policy_version(self) -> str | None:
        self.asked.set()
        return await super().current_policy_version()


async def test_closing_stops_the_background_loops_even_mid_call(
    tmp_path: Path, key: TestKey
) -> None:
    """aclose() lands while the poll loop waits for a store call that has just answered.
    (On Python 3.11 `asyncio.wait_for` then returns the answer and drops the
    cancellation: the loop went on polling and shutdown hung before the audit log's
    final checkpoint.)"""
    rt = build(tmp_path, key)
    store = ObservedState()
    dist = distributor(rt, store)
    try:
        await dist.start()
        for _ in range(3):  # the poll loop's own calls, not start()'s
            store.asked.clear()
            await store.asked.wait()
        await dist.aclose()  # bounded: it does not wait forever for a loop
        assert not dist.running
        alive = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("casb-")]
        assert alive == [], "a loop ignored its cancellation"
    finally:
        rt.discard()
