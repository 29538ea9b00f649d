"""JwksUrlSource against a real JWKS HTTP server on loopback: rotation, the unknown-kid
refetch rate limit, shared fetches, stale-while-error, outages, broken answers."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from jwt.exceptions import PyJWKClientError

from casb.config import IdentitySettings
from casb.identity import (
    AuthenticationError,
    IdentityUnavailable,
    JwksUrlSource,
    TokenVerifier,
    build_verifier,
)
from tests.jwks_server import JwksServer, TestKey

NOW = 1_700_000_000.0
ISSUER = "https://idp.example.org"
AUDIENCE = "casb"


class Monotonic:
    """The source's rate-limit clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(NOW),
        "exp": int(NOW) + 600,
        "roles": ["radiologist"],
    }
    base.update(overrides)
    return base


@pytest.fixture(scope="module")
def k1() -> TestKey:
    return TestKey.generate("RS256", kid="k1")


@pytest.fixture(scope="module")
def k2() -> TestKey:
    return TestKey.generate("ES256", kid="k2")


@pytest.fixture
def server(k1: TestKey) -> Iterator[JwksServer]:
    with JwksServer() as srv:
        srv.set_keys(k1)
        yield srv


class Env:
    def __init__(self, server: JwksServer) -> None:
        self.server = server
        self.monotonic = Monotonic()
        self._closing: list[JwksUrlSource | TokenVerifier] = []

    def source(
        self,
        url: str | None = None,
        *,
        refresh_seconds: float = 300,
        min_refetch_seconds: float = 10,
        timeout_seconds: float = 2,
    ) -> JwksUrlSource:
        src = JwksUrlSource(
            url or self.server.url,
            refresh_seconds=refresh_seconds,
            min_refetch_seconds=min_refetch_seconds,
            timeout_seconds=timeout_seconds,
            monotonic=self.monotonic,
        )
        self._closing.append(src)
        return src

    async def verifier(
        self, source: JwksUrlSource | None = None, *, start: bool = True, **settings: Any
    ) -> TokenVerifier:
        source = source or self.source()
        data: dict[str, Any] = {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_url": self.server.url,
            "algorithms": ["RS256", "ES256", "EdDSA"],
        }
        data.update(settings)
        verifier = TokenVerifier(IdentitySettings.model_validate(data), source, clock=lambda: NOW)
        self._closing.append(verifier)
        if start:
            await verifier.start()
        return verifier

    async def close(self) -> None:
        for item in self._closing:
            await item.aclose()


@pytest.fixture
async def env(server: JwksServer) -> AsyncIterator[Env]:
    e = Env(server)
    yield e
    await e.close()


async def wait_for_requests(server: JwksServer, count: int, timeout: float = 10) -> bool:
    return await asyncio.to_thread(server.wait_for_requests, count, timeout)


# -- basics ----------------------------------------------------------------------------


async def test_fetch_and_verify(env: Env, server: JwksServer, k1: TestKey) -> None:
    verifier = await env.verifier()
    source = verifier.source
    assert isinstance(source, JwksUrlSource)
    assert verifier.ready and source.version == 1
    assert source.last_error is None
    assert source.last_success is not None and abs(source.last_success - time.time()) < 60
    principal = await verifier.verify(k1.sign(claims()))
    assert principal.subject == "alice"
    assert server.request_count == 1


async def test_build_verifier_with_url(server: JwksServer, k1: TestKey) -> None:
    settings = IdentitySettings.model_validate(
        {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": server.url}
    )
    verifier = build_verifier(settings)
    await verifier.start()
    try:
        now = int(time.time())
        token = k1.sign(claims(iat=now, exp=now + 60))
        assert (await verifier.verify(token)).subject == "alice"
    finally:
        await verifier.aclose()


def test_only_http_urls() -> None:
    for url in ("file:///etc/passwd", "ftp://idp/jwks", "data:,{}"):
        with pytest.raises(PyJWKClientError):
            JwksUrlSource(url, refresh_seconds=60, min_refetch_seconds=1, timeout_seconds=1)


async def test_redirects_are_not_followed(env: Env, server: JwksServer) -> None:
    with JwksServer() as target:
        target.set_jwks({"keys": [TestKey.generate("ES256").public_jwk]})
        server.redirect(target.url)
        source = env.source()
        await source.start()
        assert not source.ready
        assert source.last_error is not None and "302" in source.last_error
        assert target.request_count == 0


# -- rotation and the unknown-kid refetch ----------------------------------------------


async def test_unknown_kid_rotation_accepted_after_one_refetch(
    env: Env, server: JwksServer, k1: TestKey, k2: TestKey
) -> None:
    verifier = await env.verifier()
    assert server.request_count == 1
    server.set_keys(k1, k2)  # the IdP rotates in a new key
    assert (await verifier.verify(k2.sign(claims()))).subject == "alice"
    assert server.request_count == 2
    assert verifier.source.version == 2
    # The new key is known now: no more fetches for it, and the old key still works.
    await verifier.verify(k2.sign(claims(jti="again")))
    await verifier.verify(k1.sign(claims()))
    assert server.request_count == 2


async def test_flood_of_unknown_kids_causes_at_most_one_refetch(
    env: Env, server: JwksServer, k1: TestKey
) -> None:
    verifier = await env.verifier(env.source(min_refetch_seconds=30))
    assert server.request_count == 1
    server.delay = 0.05  # make the concurrent verifications overlap the fetch
    tokens = [k1.sign(claims(), kid=uuid.uuid4().hex) for _ in range(50)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, AuthenticationError) for r in results)
    assert {r.description for r in results if isinstance(r, AuthenticationError)} == {
        "unknown signing key"
    }
    assert server.request_count == 2

    # Later ones within the window: still no fetch.
    for token in tokens:
        with pytest.raises(AuthenticationError, match="unknown signing key"):
            await verifier.verify(token)
    env.monotonic.now += 29.9
    with pytest.raises(AuthenticationError):
        await verifier.verify(k1.sign(claims(), kid="forged"))
    assert server.request_count == 2

    # After the window, one more is allowed.
    env.monotonic.now += 0.1
    with pytest.raises(AuthenticationError):
        await verifier.verify(k1.sign(claims(), kid="forged-2"))
    assert server.request_count == 3


async def test_concurrent_waiters_share_one_fetch_and_its_result(
    env: Env, server: JwksServer, k1: TestKey, k2: TestKey
) -> None:
    verifier = await env.verifier()
    server.set_keys(k1, k2)
    server.delay = 0.1
    tokens = [k2.sign(claims(jti=str(i))) for i in range(20)]
    principals = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert [p.token_id for p in principals] == [str(i) for i in range(20)]
    assert server.request_count == 2


async def test_rate_limited_requests_do_not_wait(env: Env, server: JwksServer, k1: TestKey) -> None:
    verifier = await env.verifier(env.source(min_refetch_seconds=60))
    with pytest.raises(AuthenticationError):
        await verifier.verify(k1.sign(claims(), kid="forged-1"))
    assert server.request_count == 2
    server.hang()
    try:
        # Within the window nothing is fetched, so nothing can hang either.
        for i in range(10):
            with pytest.raises(AuthenticationError, match="unknown signing key"):
                await asyncio.wait_for(verifier.verify(k1.sign(claims(), kid=f"f{i}")), 2)
        assert server.request_count == 2
    finally:
        server.recover()


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(
    env: Env, server: JwksServer, k1: TestKey, k2: TestKey
) -> None:
    source = env.source()
    await source.start()
    server.set_keys(k1, k2)
    server.hang()
    first = asyncio.create_task(source.refresh())
    assert await wait_for_requests(server, 2)  # the fetch is in flight
    second = asyncio.create_task(source.refetch())
    await asyncio.sleep(0)  # let `second` join the fetch
    first.cancel()
    server.recover()
    keys = await asyncio.wait_for(second, 10)
    assert {k["kid"] for k in keys} == {"k1", "k2"}
    assert server.request_count == 2
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_key_removed_rejects_previously_cached_token(
    env: Env, server: JwksServer, k1: TestKey, k2: TestKey
) -> None:
    server.set_keys(k1, k2)
    verifier = await env.verifier()
    token = k1.sign(claims())
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first  # cached
    server.set_keys(k2)  # k1 is withdrawn (compromised)
    assert await verifier.source.refresh() is True
    with pytest.raises(AuthenticationError, match="unknown signing key"):
        await verifier.verify(token)
    await verifier.verify(k2.sign(claims()))


async def test_version_counts_real_changes_only(
    env: Env, server: JwksServer, k1: TestKey, k2: TestKey
) -> None:
    source = env.source()
    await source.start()
    assert source.version == 1
    assert await source.refresh() is False
    assert source.version == 1
    server.set_keys(k1, k2)
    assert await source.refresh() is True
    assert source.version == 2
    server.set_keys(k2, k1)  # same keys, other order
    assert await source.refresh() is False
    assert source.version == 2
    assert source.fetch_count == 4


# -- outages ---------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["error", "hang", "drop"])
async def test_outage_after_success_keeps_the_cached_set(
    env: Env, server: JwksServer, k1: TestKey, outage: str
) -> None:
    source = env.source(timeout_seconds=0.3, min_refetch_seconds=0)
    verifier = await env.verifier(source, token_cache_size=0)
    good_since = source.last_success
    if outage == "error":
        server.fail(500)
    elif outage == "hang":
        server.hang()
    else:
        server.drop()
    try:
        assert await source.refresh() is False
        assert source.last_error is not None
        assert source.last_success == good_since
        assert source.ready and source.version == 1
        # Verification goes on with the last good set, also after a failed refetch.
        assert (await verifier.verify(k1.sign(claims()))).subject == "alice"
        with pytest.raises(AuthenticationError, match="unknown signing key"):
            await verifier.verify(k1.sign(claims(), kid="new-but-idp-down"))
        assert (await verifier.verify(k1.sign(claims(jti="x")))).subject == "alice"
    finally:
        server.recover()
    assert await source.refresh() is False  # back, same keys
    assert source.last_error is None


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b"[1, 2]",
        b'{"keys": []}',
        b'{"keys": 7}',
        b'{"nokeys": []}',
        b'{"keys": ["x", 1]}',
        b"\xff\xfe",
    ],
)
async def test_broken_answers_keep_the_cached_set(
    env: Env, server: JwksServer, k1: TestKey, answer: bytes
) -> None:
    verifier = await env.verifier()
    server.set_body(answer)
    assert await verifier.source.refresh() is False
    assert verifier.source.last_error is not None
    assert verifier.source.version == 1
    await verifier.verify(k1.sign(claims()))


async def test_no_key_set_ever_obtained(env: Env, server: JwksServer, k1: TestKey) -> None:
    server.fail(503)
    source = env.source(min_refetch_seconds=30)
    verifier = await env.verifier(source)  # start() does not raise: the IdP may come back
    assert not verifier.ready
    assert server.request_count == 1
    with pytest.raises(IdentityUnavailable):
        await verifier.verify(k1.sign(claims()))
    assert server.request_count == 2  # one on-demand attempt...
    for _ in range(20):
        with pytest.raises(IdentityUnavailable):
            await verifier.verify(k1.sign(claims()))
    assert server.request_count == 2  # ...then rate-limited
    server.recover()
    env.monotonic.now += 30
    assert (await verifier.verify(k1.sign(claims()))).subject == "alice"
    assert verifier.ready


async def test_unreachable_idp(env: Env, k1: TestKey) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = env.source(f"http://127.0.0.1:{port}/jwks")  # nothing listens there
    verifier = await env.verifier(source)
    with pytest.raises(IdentityUnavailable):
        await verifier.verify(k1.sign(claims()))
    assert source.last_error is not None and "fetch failed" in source.last_error


# -- background refresh ----------------------------------------------------------------


async def test_background_refresh(env: Env, server: JwksServer, k1: TestKey, k2: TestKey) -> None:
    source = env.source(refresh_seconds=0.02)
    await source.start()
    await source.start()  # idempotent
    server.set_keys(k2)
    await asyncio.wait_for(source.wait_for_version(2), 10)
    assert [k["kid"] for k in await source.get_keys()] == ["k2"]
    await source.aclose()
    await source.aclose()  # idempotent
    count = server.request_count
    assert not await wait_for_requests(server, count + 1, timeout=0.2)


async def test_background_refresh_survives_failures(
    env: Env, server: JwksServer, k2: TestKey
) -> None:
    source = env.source(refresh_seconds=0.02, min_refetch_seconds=0)
    await source.start()
    server.fail(500)
    assert await wait_for_requests(server, 3)
    server.set_keys(k2)
    server.recover()
    await asyncio.wait_for(source.wait_for_version(2), 10)
    assert source.last_error is None
