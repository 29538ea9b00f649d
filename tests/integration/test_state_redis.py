"""RedisState against real redis-server processes: the whole StateStore contract
(tests/support/state_contract.py, as MemoryState passes it), then what only a shared,
remote store has: two clients sharing state, atomic counters under concurrency, the
documented key layout, outages and hung servers bounded by timeout_seconds, TLS
(server verification, client certificates), ACL users, Sentinel, and pub/sub that
re-subscribes after a restart.

The contract and sharing tests use REDIS_URL when set (each test under its own key
prefix); tests that stop, pause or reconfigure a server start their own."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from casb.config import ConfigError, StateSettings, StateTls
from casb.state import RedisState, StateUnavailable, open_state
from tests.support.pki import TlsFiles, tls_files
from tests.support.redis_server import (
    RedisSentinel,
    RedisServer,
    RedisTls,
    redis_server_fixture,  # noqa: F401  (fixture)
    redis_url_fixture,  # noqa: F401  (fixture)
)
from tests.support.state_contract import (
    CHECKS,
    Check,
    Harness,
    StreamView,
    bundle,
    check_id,
    collecting,
    entry,
    until,
)

pytestmark = pytest.mark.integration

PASSWORD = "Tr0ub4dor-and-3"


def settings(url: str, prefix: str | None = None, **kw: Any) -> StateSettings:
    return StateSettings(url=url, prefix=prefix or f"t{uuid.uuid4().hex[:16]}", **kw)


def redis_store(url: str, tmp_path: Path, prefix: str | None = None, **kw: Any) -> RedisState:
    store = open_state(settings(url, prefix, **kw), state_dir=tmp_path)
    assert isinstance(store, RedisState)
    return store


@pytest.fixture
async def harness(redis_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    prefix = f"t{uuid.uuid4().hex[:16]}"
    store = redis_store(redis_url, tmp_path, prefix, timeout_seconds=2)
    raw = aioredis.Redis.from_url(redis_url)

    async def read() -> StreamView:
        rows: Any = await raw.xrange(f"{prefix}:audit:audit")
        return [
            (f[b"replica"].decode(), int(f[b"seq"]), f[b"hash"].decode(), f[b"record"])
            for _, f in rows
        ]

    yield Harness(store=store, read_stream=read)
    await store.aclose()
    await raw.aclose()


@pytest.mark.parametrize("check", CHECKS, ids=check_id)
async def test_contract(harness: Harness, check: Check) -> None:
    await check(harness)


# -- shared between clients -------------------------------------------------------------
async def test_two_clients_see_each_others_writes(redis_url: str, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:16]}"
    one, two = (redis_store(redis_url, tmp_path, prefix) for _ in range(2))
    try:
        b = bundle("shared: true\n")
        await one.publish_policy(b, author="alice")
        assert await two.current_policy_version() == b.version
        await two.revoke_token("jti-x", expires_at=time.time() + 60)
        assert (await one.revocation("jti-x", "alice")).jti_revoked
        assert (await one.consume("shared", 1, 2, 3600)).used == 1
        assert (await two.consume("shared", 1, 2, 3600)).used == 2
        assert not (await one.consume("shared", 1, 2, 3600)).allowed
        await one.append_audit("r/1", [entry(1), entry(2)], 1000)
        assert await two.append_audit("r/1", [entry(1), entry(2), entry(3)], 1000) == 3
        assert await one.audit_cursor("r/1") == 3
    finally:
        await one.aclose()
        await two.aclose()


async def test_consume_is_atomic_across_clients(redis_url: str, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:16]}"
    stores = [redis_store(redis_url, tmp_path, prefix, timeout_seconds=5) for _ in range(2)]
    try:
        results = await asyncio.gather(
            *(s.consume("hammer", 1, 50, 3600) for s in stores for _ in range(80))
        )
        allowed = [r for r in results if r.allowed]
        assert len(allowed) == 50
        assert sorted(r.used for r in allowed) == list(range(1, 51))
        assert all(r.used == 50 and r.retry_after > 0 for r in results if not r.allowed)
    finally:
        for s in stores:
            await s.aclose()


async def test_key_layout(redis_url: str, tmp_path: Path) -> None:
    """The names DESIGN.md documents, TTLs set, and no subject in any key."""
    prefix = f"t{uuid.uuid4().hex[:16]}"
    store = redis_store(redis_url, tmp_path, prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        b = bundle("layout: 1\n")
        await store.publish_policy(b, author="alice", comment="c")
        now = time.time()
        await store.revoke_token("jti-1", expires_at=now + 100)
        await store.revoke_subject("alice@hospital.test", before=now, expires_at=now + 200)
        await store.consume("lim:abc:requests", 1, 5, 60)
        await store.append_audit("r/1", [entry(1)], 1000)
        sub = hashlib.sha256(b"alice@hospital.test").hexdigest()
        keys = set(raw.scan_iter(f"{prefix}:*"))
        window = int(raw.time()[0]) // 60 * 60
        assert keys >= {
            f"{prefix}:policy:bundle:{b.version}",
            f"{prefix}:policy:meta:{b.version}",
            f"{prefix}:policy:versions",
            f"{prefix}:policy:current",
            f"{prefix}:revoked:jti:jti-1",
            f"{prefix}:revoked:sub:{sub}",
            f"{prefix}:audit:audit",
            f"{prefix}:audit:cursor:r/1",
        }
        counters = {k for k in keys if k.startswith(f"{prefix}:rl:")}
        assert counters <= {
            f"{prefix}:rl:lim:abc:requests:{window}",
            f"{prefix}:rl:lim:abc:requests:{window - 60}",  # the minute turned meanwhile
        }
        assert len(counters) == 1
        assert not any("alice" in k for k in keys)
        assert raw.hgetall(f"{prefix}:policy:bundle:{b.version}") == dict(b.files)
        assert raw.get(f"{prefix}:policy:current") == b.version
        assert 95_000 < raw.pttl(f"{prefix}:revoked:jti:jti-1") <= 100_000
        assert 195_000 < raw.pttl(f"{prefix}:revoked:sub:{sub}") <= 200_000
        assert 0 < raw.ttl(counters.pop()) <= 60 + 5
        # The later expiry is kept when a shorter revocation follows a longer one.
        await store.revoke_subject("alice@hospital.test", before=now - 5, expires_at=now + 10)
        assert raw.pttl(f"{prefix}:revoked:sub:{sub}") > 150_000
        assert float(raw.get(f"{prefix}:revoked:sub:{sub}") or 0) == now
    finally:
        raw.close()
        await store.aclose()


# -- outages ---------------------------------------------------------------------------
@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def _fails_fast(store: RedisState, limit: float) -> list[str]:
    """Each request-path call raises StateUnavailable within `limit` seconds."""
    reasons = []
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.revocation("j", "alice"),
        lambda: store.consume("k", 1, 5, 60),
        lambda: store.charge("k", 1, 60),
        lambda: store.current_policy_version(),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as err:
            await call()
        assert time.monotonic() - started < limit
        reasons.append(str(err.value))
    return reasons


async def test_stopped_server_is_unavailable_then_recovers(
    own_server: RedisServer, tmp_path: Path
) -> None:
    store = redis_store(own_server.url, tmp_path, timeout_seconds=0.3)
    try:
        await store.revoke_token("j", expires_at=time.time() + 60)
        assert (await store.revocation("j", "alice")).jti_revoked
        own_server.stop()
        reasons = await _fails_fast(store, 0.3 + 0.2)
        assert all(r.startswith("redis ") for r in reasons), reasons
        health = await store.ping()
        assert not health.ok and health.backend == "redis" and "ping" in health.detail
        own_server.start()  # same port, empty (no persistence)

        async def back() -> bool:
            try:
                return not (await store.revocation("j", "alice")).jti_revoked
            except StateUnavailable:
                return False

        await until(back, "the store to answer again after the restart", timeout=5)
        assert (await store.ping()).ok
    finally:
        await store.aclose()


async def test_hung_server_times_out(own_server: RedisServer, tmp_path: Path) -> None:
    store = redis_store(own_server.url, tmp_path, timeout_seconds=0.2)
    try:
        assert (await store.ping()).ok
        own_server.pause()
        try:
            reasons = await _fails_fast(store, 0.2 + 0.3)
        finally:
            own_server.resume()
        assert all("no answer within 0.2s" in r or "timed out" in r for r in reasons), reasons

        async def back() -> bool:
            return (await store.ping()).ok

        await until(back, "the resumed server to answer")
        # The calls cut short left no replies behind to be read by the next ones.
        await store.revoke_token("revoked", expires_at=time.time() + 60)
        for _ in range(3):
            assert await store.current_policy_version() is None
            assert (await store.revocation("revoked", "alice")).jti_revoked
            assert not (await store.revocation("other", "alice")).jti_revoked
        assert [(await store.consume("fresh", 1, 5, 60)).used for _ in range(3)] == [1, 2, 3]
    finally:
        await store.aclose()


async def test_notifications_resubscribe_after_a_restart(
    own_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"t{uuid.uuid4().hex[:16]}"
    listener = redis_store(own_server.url, tmp_path, prefix)
    publisher = redis_store(own_server.url, tmp_path, prefix)
    raw = own_server.client()
    channel = f"{prefix}:policy:changed"
    try:
        async with collecting(listener.policy_notifications()) as got:

            async def subscribed() -> bool:
                return dict(raw.pubsub_numsub(channel)).get(channel.encode(), 0) == 1

            await until(subscribed, "the subscription")
            caplog.set_level(logging.WARNING, logger="casb.state")
            await asyncio.to_thread(own_server.kill)

            async def noticed() -> bool:
                return "subscription lost" in caplog.text

            await until(noticed, "the listener to notice the outage")
            await asyncio.to_thread(own_server.start)
            b = bundle("after the restart\n")

            async def seen() -> bool:
                await publisher.publish_policy(b, author="alice")
                await asyncio.sleep(0.05)  # poll interval while the listener reconnects
                return b.version in got

            await until(seen, "a notification after the restart", timeout=10)
    finally:
        raw.close()
        await listener.aclose()
        await publisher.aclose()


# -- TLS -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return tls_files(tmp_path_factory.mktemp("pki"))


async def test_tls_verifies_the_server(pki: TlsFiles, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", tls=RedisTls(pki)) as server:
        good = redis_store(server.url, tmp_path, tls=StateTls(ca_bundle=pki.ca_pem))
        rogue = redis_store(server.url, tmp_path, tls=StateTls(ca_bundle=pki.rogue_ca_pem))
        plain = redis_store(server.url.replace("rediss://", "redis://"), tmp_path)
        try:
            health = await good.ping()
            assert health.ok and health.detail.startswith("redis 7"), health
            assert (await good.consume("k", 1, 5, 60)).used == 1
            with pytest.raises(StateUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await rogue.revocation("j", "alice")
            with pytest.raises(StateUnavailable):
                await plain.revocation("j", "alice")
        finally:
            for s in (good, rogue, plain):
                await s.aclose()


async def test_tls_client_certificate(pki: TlsFiles, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", tls=RedisTls(pki, require_client_cert=True)) as server:
        with_cert = redis_store(
            server.url,
            tmp_path,
            tls=StateTls(
                ca_bundle=pki.ca_pem,
                client_cert_file=pki.client_cert,
                client_key_file=pki.client_key,
            ),
        )
        without = redis_store(server.url, tmp_path, tls=StateTls(ca_bundle=pki.ca_pem))
        try:
            assert (await with_cert.ping()).ok
            await with_cert.revoke_token("j", expires_at=time.time() + 60)
            assert (await with_cert.revocation("j", "alice")).jti_revoked
            with pytest.raises(StateUnavailable):
                await without.revocation("j", "alice")
        finally:
            await with_cert.aclose()
            await without.aclose()


# -- ACL users and passwords -------------------------------------------------------------
async def test_acl_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with RedisServer(tmp_path / "redis", password="admin-pw", users={"casb": PASSWORD}) as server:
        host = f"127.0.0.1:{server.port}"
        ok = redis_store(f"redis://casb:{PASSWORD}@{host}/0", tmp_path)
        pw_file = tmp_path / "redis-password"
        pw_file.write_text(PASSWORD + "\n")
        from_file = redis_store(f"redis://casb@{host}/0", tmp_path, password_file=pw_file)
        monkeypatch.setenv("CASB_TEST_REDIS_PASSWORD", PASSWORD)
        from_env = redis_store(
            f"redis://casb@{host}/0", tmp_path, password_env="CASB_TEST_REDIS_PASSWORD"
        )
        wrong = redis_store(f"redis://casb:not-{PASSWORD}@{host}/0", tmp_path)
        none = redis_store(f"redis://{host}/0", tmp_path)
        try:
            for store in (ok, from_file, from_env):
                assert (await store.consume("k", 1, 5, 60)).allowed
                assert (await store.ping()).ok
            clients = server.client().client_list()
            assert {c["user"] for c in clients if c["name"] == "casb"} == {"casb"}
            for bad in (wrong, none):
                with pytest.raises(StateUnavailable, match="authentication failed") as err:
                    await bad.revocation("j", "alice")
                assert PASSWORD not in str(err.value)
                health = await bad.ping()
                assert not health.ok and PASSWORD not in repr(health)
            with pytest.raises(ConfigError, match="given twice"):
                redis_store(f"redis://casb:{PASSWORD}@{host}/0", tmp_path, password_file=pw_file)
        finally:
            for s in (ok, from_file, from_env, wrong, none):
                await s.aclose()


# -- Sentinel -------------------------------------------------------------------------------
async def test_sentinel_resolves_the_master(tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "master", password=PASSWORD) as master,
        RedisSentinel(tmp_path / "sentinel", master, password=PASSWORD) as sentinel,
    ):
        prefix = f"t{uuid.uuid4().hex[:16]}"
        store = redis_store(sentinel.url(f":{PASSWORD}@"), tmp_path, prefix)
        wrong = redis_store(sentinel.url(":wrong-password@"), tmp_path, prefix)
        try:
            b = bundle("via sentinel\n")
            await store.publish_policy(b, author="alice")
            assert master.client().get(f"{prefix}:policy:current") == b.version.encode()
            health = await store.ping()
            assert health.ok, health
            assert health.extra["url"] == (
                f"redis+sentinel://127.0.0.1:{sentinel.port}/casbmaster/0"
            )
            with pytest.raises(StateUnavailable) as err:
                await wrong.current_policy_version()
            assert PASSWORD not in str(err.value) and "wrong-password" not in str(err.value)
        finally:
            await store.aclose()
            await wrong.aclose()


async def test_sentinel_over_tls(pki: TlsFiles, tmp_path: Path) -> None:
    with (
        RedisServer(tmp_path / "master", tls=RedisTls(pki)) as master,
        RedisSentinel(tmp_path / "sentinel", master) as sentinel,
    ):
        prefix = f"t{uuid.uuid4().hex[:16]}"
        url = sentinel.url()
        assert url.startswith("rediss+sentinel://")
        store = redis_store(url, tmp_path, prefix, tls=StateTls(ca_bundle=pki.ca_pem))
        rogue = redis_store(url, tmp_path, prefix, tls=StateTls(ca_bundle=pki.rogue_ca_pem))
        try:
            await store.revoke_token("j", expires_at=time.time() + 60)
            assert master.client().exists(f"{prefix}:revoked:jti:j")
            assert (await store.revocation("j", "alice")).jti_revoked
            with pytest.raises(StateUnavailable):
                await rogue.revocation("j", "alice")
        finally:
            await store.aclose()
            await rogue.aclose()
