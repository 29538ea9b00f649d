"""The Redis state store: every replica sees the same policy, revocations, counters and
audit stream (redis-py's asyncio client; redis://, rediss://, Sentinel).

Key layout (`p` is state.prefix; DESIGN.md, "Shared state"):

    p:policy:bundle:<version>   hash  file name -> YAML text (immutable)
    p:policy:meta:<version>     hash  author, published_at, comment (first publication)
    p:policy:versions           zset  version scored by published_at
    p:policy:current            string the current version
    p:policy:changed            pub/sub channel: the version, each time current moves
    p:revoked:jti:<jti>         string "1", expires when the token would
    p:revoked:sub:<sha256(sub)> string `before` (epoch seconds), expires likewise
    p:rl:<key>:<window start>   counter, expires a little after its window ends
    p:audit:<stream>            stream of {replica, seq, hash, record}
    p:audit:cursor:<replica>    the last seq appended for that replica

Atomicity: publishing is one MULTI/EXEC (the pointer never names a missing bundle);
rollback, revocation, counters and the audit append are Lua scripts. Counter windows
use the Redis server's clock (TIME), so replicas with skewed clocks share windows; the
scripts therefore build those keys themselves, which standalone Redis and Sentinel
allow (Redis Cluster is not supported).

Every call is bounded by state.timeout_seconds (socket timeouts and an asyncio
timeout; admin calls such as publishing get ADMIN_TIMEOUT_SECONDS at least) and every
failure becomes StateUnavailable with a short reason that never holds the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from casb.state.redis_url import RedisTarget
from casb.state.store import (
    Consumed,
    PolicyBundle,
    PolicyVersion,
    Revocation,
    StateConflict,
    StateUnavailable,
    StoreHealth,
    StreamEntry,
    check_append,
    check_bundle,
    check_consume,
    check_times,
    check_version,
    subject_key,
)

log = logging.getLogger("casb.state")

T = TypeVar("T")

ADMIN_TIMEOUT_SECONDS = 5.0  # publish, versions, audit appends: off the request path
COUNTER_MARGIN_SECONDS = 5  # a counter outlives its window by this much
RESUBSCRIBE_MAX_DELAY = 2.0
_REASON_MAX = 240

# Move the current pointer to a stored version (or refuse), and tell every replica.
_SET_CURRENT = """
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('EXISTS', KEYS[3]) == 0 then
  return false
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[4], 'version', ARGV[1], 'by', ARGV[3], 'at', ARGV[4], 'comment', ARGV[5])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return redis.call('HGETALL', KEYS[2])
"""

# Revocation entry: keep the larger value (`before`, or "1" for a jti) and the later
# expiry (ARGV[2], epoch ms). Nothing is stored once both are in the past.
_REVOKE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local value = ARGV[1]
local expire_ms = tonumber(ARGV[2])
local old = redis.call('GET', KEYS[1])
if old then
  if tonumber(old) ~= nil and tonumber(old) > tonumber(value) then value = old end
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > 0 and now_ms + pttl > expire_ms then expire_ms = now_ms + pttl end
end
if expire_ms <= now_ms then return 0 end
redis.call('SET', KEYS[1], value)
redis.call('PEXPIREAT', KEYS[1], expire_ms)
return 1
"""

# Rate-limit counter in the fixed window (by the server's clock) holding now:
# charge ARGV[1] unless that passes the limit ARGV[2] (ARGV[2] = -1: no limit).
# Returns {allowed, used, ms until the window ends}.
_CONSUME = """
local t = redis.call('TIME')
local secs = tonumber(t[1])
local now_ms = secs * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
local start = secs - (secs % window)
local key = KEYS[1] .. ':' .. string.format('%d', start)
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local used = tonumber(redis.call('GET', key) or '0')
local left_ms = (start + window) * 1000 - now_ms
if limit >= 0 and used + amount > limit then
  return {0, used, left_ms}
end
used = redis.call('INCRBY', key, amount)
redis.call('EXPIREAT', key, start + window + tonumber(ARGV[4]))
return {1, used, left_ms}
"""

# Append the entries (triples seq, hash, record from ARGV[3]) whose seq is above the
# replica's cursor, then advance the cursor: a batch sent twice is appended once.
_APPEND_AUDIT = """
local cursor = tonumber(redis.call('GET', KEYS[2]) or '0')
local last = nil
for i = 3, #ARGV, 3 do
  if tonumber(ARGV[i]) > cursor then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
               'replica', ARGV[1], 'seq', ARGV[i], 'hash', ARGV[i + 1], 'record', ARGV[i + 2])
    cursor = tonumber(ARGV[i])
    last = ARGV[i]
  end
end
if last then redis.call('SET', KEYS[2], last) end
return cursor
"""


class _Keys:
    """The key names (module docstring) under one prefix."""

    def __init__(self, prefix: str, stream: str) -> None:
        self.prefix = prefix
        self.versions = f"{prefix}:policy:versions"
        self.current = f"{prefix}:policy:current"
        self.activation = f"{prefix}:policy:activation"  # who made `current` current
        self.channel = f"{prefix}:policy:changed"
        self.stream = f"{prefix}:audit:{stream}"

    def bundle(self, version: str) -> str:
        return f"{self.prefix}:policy:bundle:{version}"

    def meta(self, version: str) -> str:
        return f"{self.prefix}:policy:meta:{version}"

    def jti(self, jti: str) -> str:
        return f"{self.prefix}:revoked:jti:{jti}"

    def subject(self, subject: str) -> str:
        return f"{self.prefix}:revoked:sub:{subject_key(subject)}"

    def counter(self, key: str) -> str:
        """The counter's base name; the window start is appended (by the script)."""
        return f"{self.prefix}:rl:{key}"

    def cursor(self, replica: str) -> str:
        return f"{self.prefix}:audit:cursor:{replica}"


class RedisState:
    """StateStore on Redis. Build with `open_state` (casb.state) or from a RedisTarget;
    nothing connects until the first call."""

    backend = "redis"

    def __init__(
        self,
        target: RedisTarget,
        *,
        prefix: str = "casb",
        stream: str = "audit",
        timeout: float = 0.5,
        ca_bundle: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        if not target.tls and (ca_bundle is not None or client_cert is not None):
            raise ValueError("TLS files are set but the URL is not rediss://")
        self._target = target
        self._timeout = timeout
        self._admin_timeout = max(timeout, ADMIN_TIMEOUT_SECONDS)
        self._secret = target.password
        self._keys = _Keys(prefix, stream)
        self._sentinel: Sentinel | None = None
        self._client = self._connect(ca_bundle, client_cert)
        self._set_current = self._client.register_script(_SET_CURRENT)
        self._revoke = self._client.register_script(_REVOKE)
        self._consume = self._client.register_script(_CONSUME)
        self._append = self._client.register_script(_APPEND_AUDIT)

    @property
    def description(self) -> str:
        """The URL without its password."""
        return self._target.describe()

    def _connect(self, ca_bundle: Path | None, client_cert: tuple[Path, Path] | None) -> Redis:
        t = self._target
        common: dict[str, Any] = {
            "username": t.username,
            "password": t.password,
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            # One quick retry: a pooled connection that died with a restarted server
            # is replaced at once instead of failing the request that found it.
            "retry": Retry(NoBackoff(), 1),
            "client_name": "casb",
        }
        if t.tls:
            common |= {
                "ssl": True,
                "ssl_cert_reqs": "required",
                "ssl_check_hostname": True,
                "ssl_min_version": ssl.TLSVersion.TLSv1_2,
                "ssl_ca_certs": str(ca_bundle) if ca_bundle else None,
                "ssl_certfile": str(client_cert[0]) if client_cert else None,
                "ssl_keyfile": str(client_cert[1]) if client_cert else None,
            }
        if t.service_name is None:
            host, port = t.hosts[0]
            return Redis(host=host, port=port, db=t.db, **common)
        # Sentinels get the same credentials and TLS settings as the master.
        sentinel_kwargs = dict(common) | {"retry": Retry(NoBackoff(), 1)}
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(t.hosts), sentinel_kwargs=sentinel_kwargs, **common
        )
        master: Redis = self._sentinel.master_for(t.service_name, db=t.db)
        return master

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
            if self._sentinel is not None:
                await self._sentinel.aclose()
        except (rexc.RedisError, OSError) as exc:
            log.debug("closing the redis state store: %s", self._reason(exc))

    # -- calls, bounded and with errors mapped ----------------------------------------
    async def _run(self, what: str, op: Callable[[], Awaitable[T]], *, admin: bool = False) -> T:
        limit = self._admin_timeout if admin else self._timeout
        try:
            async with asyncio.timeout(limit):
                return await op()
        except TimeoutError:
            raise StateUnavailable(f"redis {what}: no answer within {limit:g}s") from None
        except (rexc.RedisError, OSError) as exc:
            raise StateUnavailable(f"redis {what}: {self._reason(exc)}") from None

    def _reason(self, exc: BaseException) -> str:
        """A short, secret-free reason for an error from redis-py."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, rexc.AuthenticationError) or text.startswith(("WRONGPASS", "NOAUTH")):
            text = (
                "authentication failed (wrong user name or password, no password given, "
                "or the user is disabled)"
            )
        elif isinstance(exc, rexc.TimeoutError):
            text = f"timed out ({text})"
        elif text.startswith("NOPERM"):
            text = f"the Redis user lacks a permission: {text}"
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:_REASON_MAX]

    # -- health -----------------------------------------------------------------------
    async def ping(self) -> StoreHealth:
        started = time.monotonic()
        extra: dict[str, object] = {"url": self.description}
        try:
            info: Mapping[str, Any] = await self._run("ping", lambda: self._client.info("server"))
        except StateUnavailable as exc:
            return StoreHealth(ok=False, backend=self.backend, detail=str(exc), extra=extra)
        extra["latency_ms"] = round((time.monotonic() - started) * 1000, 2)
        return StoreHealth(
            ok=True,
            backend=self.backend,
            detail=f"redis {info.get('redis_version', '?')}",
            extra=extra,
        )

    # -- policy bundles ---------------------------------------------------------------
    async def publish_policy(
        self, bundle: PolicyBundle, *, author: str, comment: str = ""
    ) -> PolicyVersion:
        check_bundle(bundle)
        k, v, now = self._keys, bundle.version, time.time()

        async def op() -> dict[bytes, bytes]:
            async with self._client.pipeline(transaction=True) as pipe:
                files: dict[Any, Any] = dict(bundle.files)
                pipe.hset(k.bundle(v), mapping=files)
                pipe.hsetnx(k.meta(v), "author", author)
                pipe.hsetnx(k.meta(v), "published_at", repr(now))
                pipe.hsetnx(k.meta(v), "comment", comment)
                pipe.zadd(k.versions, {v: now}, nx=True)
                pipe.set(k.current, v)
                activation = {"version": v, "by": author, "at": repr(now), "comment": comment}
                pipe.hset(k.activation, mapping=activation)  # type: ignore[arg-type]
                pipe.publish(k.channel, v)
                pipe.hgetall(k.meta(v))
                results = await pipe.execute()
            meta: dict[bytes, bytes] = results[-1]
            return meta

        meta = await self._run("publish_policy", op, admin=True)
        return _activated(_policy_version(v, meta, current=True), author, now, comment)

    async def set_current_policy(
        self, version: str, *, author: str, comment: str = ""
    ) -> PolicyVersion:
        check_version(version)
        k, now = self._keys, time.time()
        found = await self._run(
            "set_current_policy",
            lambda: self._set_current(
                keys=[k.current, k.meta(version), k.bundle(version), k.activation],
                args=[version, k.channel, author, repr(now), comment],
            ),
            admin=True,
        )
        if not found:
            raise StateConflict("no such policy version in the store")
        return _activated(
            _policy_version(version, _pairs(found), current=True), author, now, comment
        )

    async def current_policy(self) -> tuple[PolicyVersion, PolicyBundle] | None:
        k = self._keys

        async def op() -> (
            tuple[str, dict[bytes, bytes], dict[bytes, bytes], dict[bytes, bytes]] | None
        ):
            raw = await self._client.get(k.current)
            if raw is None:
                return None
            version = _text(raw)
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(k.meta(version))
                pipe.hgetall(k.bundle(version))
                pipe.hgetall(k.activation)
                meta, files, activation = await pipe.execute()
            return version, meta, files, activation

        found = await self._run("current_policy", op, admin=True)
        if found is None:
            return None
        version, meta, files, activation = found
        if not meta or not files:
            raise StateUnavailable("redis current_policy: the current version has no bundle")
        bundle = PolicyBundle(
            files={name.decode(): text.decode() for name, text in files.items()},
            version=version,
        )
        current = _policy_version(version, meta, current=True)
        if activation.get(b"version", b"").decode() == version:
            current = _activated(
                current,
                activation.get(b"by", b"").decode(),
                float(activation.get(b"at", b"0")),
                activation.get(b"comment", b"").decode(),
            )
        return current, bundle

    async def current_policy_version(self) -> str | None:
        raw = await self._run(
            "current_policy_version", lambda: self._client.get(self._keys.current)
        )
        return _text(raw) if raw is not None else None

    async def policy_versions(self, limit: int = 50) -> Sequence[PolicyVersion]:
        if limit <= 0:
            return []
        k = self._keys

        async def op() -> tuple[list[Any], list[dict[bytes, bytes]], bytes | None]:
            names: list[Any] = await self._client.zrevrange(k.versions, 0, limit - 1)
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(k.meta(_text(name)))
                pipe.get(k.current)
                *metas, current = await pipe.execute()
            return names, metas, current

        names, metas, current = await self._run("policy_versions", op, admin=True)
        return [
            _policy_version(_text(n), meta, current=n == current)
            for n, meta in zip(names, metas, strict=True)
        ]

    async def policy_notifications(self) -> AsyncIterator[str]:
        """Versions from the pub/sub channel. Best effort: messages published while the
        subscription is down are lost; after re-subscribing it yields the current
        version once, and callers poll current_policy_version as well."""
        delay = 0.1
        resubscribed = False
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.channel)
                if resubscribed:
                    current = await self.current_policy_version()
                    if current is not None:
                        yield current
                delay = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        yield msg["data"].decode()
            except (rexc.RedisError, OSError, StateUnavailable, TimeoutError) as exc:
                reason = exc if isinstance(exc, StateUnavailable) else self._reason(exc)
                log.warning("policy notifications: subscription lost (%s); retrying", reason)
            finally:
                with contextlib.suppress(rexc.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            resubscribed = True
            await asyncio.sleep(delay)  # back-off before re-subscribing, not a sync point
            delay = min(delay * 2, RESUBSCRIBE_MAX_DELAY)

    # -- revocation -------------------------------------------------------------------
    async def revoke_token(self, jti: str, *, expires_at: float) -> None:
        check_times(expires_at)
        key = self._keys.jti(jti)
        await self._run(
            "revoke_token",
            lambda: self._revoke(keys=[key], args=["1", _ms(expires_at)]),
            admin=True,
        )

    async def revoke_subject(self, subject: str, *, before: float, expires_at: float) -> None:
        check_times(before, expires_at)
        key = self._keys.subject(subject)
        await self._run(
            "revoke_subject",
            lambda: self._revoke(keys=[key], args=[repr(float(before)), _ms(expires_at)]),
            admin=True,
        )

    async def revocation(self, jti: str | None, subject: str) -> Revocation:
        keys = [self._keys.subject(subject)]
        if jti is not None:
            keys.insert(0, self._keys.jti(jti))
        values: list[Any] = await self._run("revocation", lambda: self._client.mget(keys))
        before: float | None = None
        if values[-1] is not None:
            try:
                before = float(values[-1])
            except ValueError:
                raise StateUnavailable("redis revocation: a malformed entry") from None
        return Revocation(
            jti_revoked=jti is not None and values[0] is not None, subject_before=before
        )

    # -- rate limits ------------------------------------------------------------------
    async def consume(self, key: str, amount: int, limit: int, window_seconds: int) -> Consumed:
        check_consume(amount, window_seconds, limit)
        return await self._count("consume", key, amount, limit, window_seconds)

    async def charge(self, key: str, amount: int, window_seconds: int) -> None:
        check_consume(amount, window_seconds)
        await self._count("charge", key, amount, -1, window_seconds)

    async def _count(
        self, what: str, key: str, amount: int, limit: int, window_seconds: int
    ) -> Consumed:
        base = self._keys.counter(key)
        allowed, used, left_ms = await self._run(
            what,
            lambda: self._consume(
                keys=[base], args=[amount, limit, window_seconds, COUNTER_MARGIN_SECONDS]
            ),
        )
        if allowed:
            return Consumed(allowed=True, used=int(used))
        return Consumed(allowed=False, used=int(used), retry_after=max(int(left_ms), 0) / 1000)

    # -- audit stream -----------------------------------------------------------------
    async def append_audit(self, replica: str, entries: Sequence[StreamEntry], max_len: int) -> int:
        check_append(replica, entries, max_len)
        if not entries:
            return await self.audit_cursor(replica)
        args: list[str | bytes | int] = [replica, max_len]
        for e in entries:
            args += [e.seq, e.hash, bytes(e.line)]
        cursor = await self._run(
            "append_audit",
            lambda: self._append(keys=[self._keys.stream, self._keys.cursor(replica)], args=args),
            admin=True,
        )
        return int(cursor)

    async def audit_cursor(self, replica: str) -> int:
        raw = await self._run(
            "audit_cursor", lambda: self._client.get(self._keys.cursor(replica)), admin=True
        )
        return int(raw) if raw is not None else 0


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _ms(epoch_seconds: float) -> int:
    return math.floor(epoch_seconds * 1000)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """HGETALL's reply from a script (a flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _activated(meta: PolicyVersion, by: str, at: float, comment: str) -> PolicyVersion:
    return dataclasses.replace(meta, activated_by=by, activated_at=at, activation_comment=comment)


def _policy_version(version: str, meta: Mapping[bytes, bytes], *, current: bool) -> PolicyVersion:
    return PolicyVersion(
        version=version,
        author=meta.get(b"author", b"").decode(),
        published_at=float(meta.get(b"published_at", b"0")),
        comment=meta.get(b"comment", b"").decode(),
        current=current,
    )
