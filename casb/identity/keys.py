"""Where the signing keys come from: a JWKS URL (the IdP) or a JWKS file (offline sites).

A key source hands out the current JWK set as raw dicts; the verifier chooses a key from
them per token. Both sources:

* keep serving the last good set when a refresh fails (stale-while-error), and expose
  `last_success` / `last_error` for health checks instead of logging;
* count `version` up whenever the set of keys actually changes, so the verifier can drop
  everything it derived from the old set (a removed, compromised key stops working at the
  next refresh, even for tokens it had already verified and cached);
* raise `IdentityUnavailable` (-> HTTP 503) when no set has ever been obtained.

Nothing here logs: key sets are public, but error texts may carry URLs with credentials.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from jwt import PyJWKClient
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError

from casb.tasks import stop_tasks

JWK = dict[str, Any]
_Stamp = tuple[int, int, int]  # (mtime_ns, size, inode): has the file changed?

_USER_AGENT = "casb-jwks/0.1"


class IdentityUnavailable(Exception):
    """No signing key set could be obtained at all: HTTP 503, not 401 (the caller's
    token may be fine; we cannot tell)."""


class KeySource(Protocol):
    """What the verifier needs from a key source."""

    @property
    def version(self) -> int:
        """Counts up each time the set of keys changes (starts at 0: nothing loaded)."""
        ...

    @property
    def ready(self) -> bool:
        """A key set is loaded."""
        ...

    @property
    def last_success(self) -> float | None:
        """Wall-clock time the key set was last obtained (None: never)."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why the latest attempt failed (for health checks, not clients); None after a
        success."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def get_keys(self) -> tuple[JWK, ...]:
        """The current key set; raises IdentityUnavailable if none was ever obtained."""
        ...

    async def refetch(self) -> tuple[JWK, ...]:
        """The key set after an on-demand refresh for an unknown `kid` (rate-limited by
        the source: it may return the current set without fetching)."""
        ...

    async def refresh(self) -> bool:
        """Refresh now, whatever the rate limit; True if the key set changed."""
        ...


def parse_jwk_set(data: Any) -> tuple[JWK, ...]:
    """The JWK objects of a JWK set document; ValueError when it is not one.

    Members that are not JSON objects are dropped; whether a key is usable (kty, use,
    alg) is the verifier's business. An empty set is refused: an IdP that publishes no
    keys is broken, and keeping the previous set is safer than refusing everyone.
    """
    if not isinstance(data, dict):
        raise ValueError("not a JWK set (expected a JSON object)")
    keys = data.get("keys")
    if not isinstance(keys, list):
        raise ValueError("not a JWK set (no 'keys' list)")
    jwks = tuple(dict(k) for k in keys if isinstance(k, dict))
    if not jwks:
        raise ValueError("JWK set has no keys")
    return jwks


def _fingerprint(keys: tuple[JWK, ...]) -> tuple[str, ...]:
    """Order-insensitive identity of a key set, to tell a real change from a re-fetch."""
    return tuple(sorted(json.dumps(k, sort_keys=True, separators=(",", ":")) for k in keys))


class _KeySet:
    """The loaded set and its version; shared bookkeeping of both sources. Used on the
    event loop thread only."""

    def __init__(self) -> None:
        self.keys: tuple[JWK, ...] | None = None
        self.version = 0
        self._fingerprint: tuple[str, ...] | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def accept(self, keys: tuple[JWK, ...]) -> bool:
        """Install a freshly obtained set; True if it differs from the current one."""
        fingerprint = _fingerprint(keys)
        self.last_success = time.time()
        self.last_error = None
        if fingerprint == self._fingerprint:
            return False
        self.keys = keys
        self._fingerprint = fingerprint
        self.version += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return True

    def fail(self, error: str) -> None:
        self.last_error = error

    async def wait_for_version(self, version: int) -> None:
        while self.version < version:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


class JwksUrlSource:
    """The IdP's JWKS endpoint, fetched with pyjwt's `PyJWKClient.fetch_data` (http/https
    only, no redirects) in a worker thread, never on the event loop.

    We keep the set ourselves instead of using PyJWKClient's cache: its cache drops the
    set when the lifespan ends even if the IdP is down at that moment, which would turn an
    IdP outage into a proxy outage. Here a failed refresh keeps the last good set.

    Refresh happens in the background every `refresh_seconds` (task started by `start()`)
    and on demand for a token with an unknown `kid` (`refetch()`): at most one such
    refetch per `min_refetch_seconds`, so tokens with forged kids cannot make us hammer
    the IdP (the complaint of envoyproxy/envoy#39643, which asked for refetch-on-unknown-
    kid). Requests arriving while a fetch is in flight share it; requests arriving within
    the rate-limit window do not wait, they get the current set at once.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_seconds: float,
        min_refetch_seconds: float,
        timeout_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_seconds <= 0 or not math.isfinite(refresh_seconds):
            raise ValueError("refresh_seconds must be a positive number")
        if min_refetch_seconds < 0:
            raise ValueError("min_refetch_seconds must not be negative")
        self.url = url
        self.refresh_seconds = refresh_seconds
        self.min_refetch_seconds = min_refetch_seconds
        # cache_jwk_set=False: pyjwt only fetches; caching is ours (see class docstring).
        self._client = PyJWKClient(
            url, cache_jwk_set=False, timeout=timeout_seconds, headers={"User-Agent": _USER_AGENT}
        )
        self._monotonic = monotonic
        self._set = _KeySet()
        self._inflight: asyncio.Task[bool] | None = None
        self._last_refetch: float | None = None  # monotonic time of the last unknown-kid refetch
        self._background: asyncio.Task[None] | None = None
        self.fetch_count = 0  # fetches attempted, for health/metrics

    @property
    def version(self) -> int:
        return self._set.version

    @property
    def ready(self) -> bool:
        return self._set.keys is not None

    @property
    def last_success(self) -> float | None:
        """Wall-clock time of the last successful fetch (None: never)."""
        return self._set.last_success

    @property
    def last_error(self) -> str | None:
        """Why the most recent fetch failed; None once a fetch succeeds again."""
        return self._set.last_error

    async def wait_for_version(self, version: int) -> None:
        """Return once the key set has reached `version` (for tests and health checks)."""
        await self._set.wait_for_version(version)

    async def start(self) -> None:
        """Fetch once (an IdP outage at start is not fatal: requests get 503 until a set
        arrives) and start the background refresh."""
        if self._background is not None:
            return
        await self.refresh()
        self._background = asyncio.create_task(
            self._refresh_loop(),
            name="casb-jwks-refresh",  # no URL: it may carry credentials
        )

    async def aclose(self) -> None:
        tasks = (self._background, self._inflight)
        self._background = None
        await stop_tasks(tasks, "JWKS refresh")

    async def get_keys(self) -> tuple[JWK, ...]:
        keys = self._set.keys
        if keys is None:
            keys = await self.refetch()
        return keys

    async def refetch(self) -> tuple[JWK, ...]:
        if self._inflight is None:
            now = self._monotonic()
            if self._last_refetch is None or now - self._last_refetch >= self.min_refetch_seconds:
                self._last_refetch = now
                await self._fetch_shared()
        else:
            await self._fetch_shared()  # join the fetch in flight, whatever started it
        return self._current()

    async def refresh(self) -> bool:
        return await self._fetch_shared()

    def _current(self) -> tuple[JWK, ...]:
        keys = self._set.keys
        if keys is None:
            raise IdentityUnavailable("no signing keys available from the identity provider")
        return keys

    async def _fetch_shared(self) -> bool:
        """Fetch, or join the fetch already in flight; every waiter sees its result."""
        task = self._inflight
        if task is None:
            task = asyncio.create_task(self._fetch_once(), name="casb-jwks-fetch")
            self._inflight = task
        # shield: a waiter that is cancelled (client went away) must not cancel the fetch
        # the other waiters share.
        return await asyncio.shield(task)

    async def _fetch_once(self) -> bool:
        self.fetch_count += 1
        try:
            data = await asyncio.to_thread(self._client.fetch_data)
            keys = parse_jwk_set(data)
        except PyJWKClientConnectionError as exc:
            self._set.fail(f"JWKS fetch failed: {_cause(exc)}")
            return False
        except (PyJWKClientError, ValueError, RecursionError) as exc:
            self._set.fail(f"JWKS response refused: {str(exc)[:200]}")
            return False
        except Exception as exc:  # e.g. a connection reset mid-body; never kill the loop
            self._set.fail(f"JWKS fetch failed: {type(exc).__name__}")
            return False
        finally:
            self._inflight = None
        return self._set.accept(keys)

    async def _refresh_loop(self) -> None:
        retry = max(1.0, self.min_refetch_seconds)
        delay = self.refresh_seconds
        while True:
            await asyncio.sleep(delay)
            await self.refresh()
            if self._set.last_error is None:
                delay = self.refresh_seconds
                retry = max(1.0, self.min_refetch_seconds)
            else:
                # The IdP is failing: retry sooner than a full period, backing off.
                delay = min(self.refresh_seconds, retry)
                retry = min(self.refresh_seconds, retry * 2)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__
    if cause is None:
        return type(exc).__name__
    reason = getattr(cause, "reason", None)  # URLError wraps the socket error here
    text = str(reason if reason is not None and not isinstance(reason, str) else cause)
    return f"{type(cause).__name__}: {text}"[:200]


class JwksFileSource:
    """A JWK set from a local file, for offline sites and for dev keys.

    Re-read when the file changes (mtime, size or inode), so an offline site rotates keys
    by replacing the file. A broken new file keeps the previous good set. `start()` raises
    IdentityUnavailable when the file is missing or broken at start: that is a
    configuration error, not an outage. The file is checked every `poll_seconds` in the
    background and on every unknown `kid` (a stat call, cheap, so not rate-limited).
    """

    def __init__(self, path: Path | str, *, poll_seconds: float = 5.0) -> None:
        if poll_seconds <= 0 or not math.isfinite(poll_seconds):
            raise ValueError("poll_seconds must be a positive number")
        self.path = Path(path)
        self.poll_seconds = poll_seconds
        self._set = _KeySet()
        self._stamp: _Stamp | None = None  # of the file last read
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    @property
    def version(self) -> int:
        return self._set.version

    @property
    def ready(self) -> bool:
        return self._set.keys is not None

    @property
    def last_success(self) -> float | None:
        return self._set.last_success

    @property
    def last_error(self) -> str | None:
        return self._set.last_error

    async def wait_for_version(self, version: int) -> None:
        """Return once the key set has reached `version` (for tests and health checks)."""
        await self._set.wait_for_version(version)

    async def start(self) -> None:
        if self._background is not None:
            return
        await self.refresh()
        if self._set.keys is None:
            raise IdentityUnavailable(f"JWKS file {self.path}: {self._set.last_error}")
        self._background = asyncio.create_task(self._poll_loop(), name="casb-jwks-file")

    async def aclose(self) -> None:
        task, self._background = self._background, None
        await stop_tasks((task,), "JWKS file watch")

    async def get_keys(self) -> tuple[JWK, ...]:
        keys = self._set.keys
        if keys is None:
            await self.refresh()
            keys = self._current()
        return keys

    async def refetch(self) -> tuple[JWK, ...]:
        await self.refresh()
        return self._current()

    async def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; True if the set changed."""
        async with self._lock:
            stamp, result = await asyncio.to_thread(self._read, self._stamp)
            if stamp is None:  # unchanged since the last read
                return False
            self._stamp = stamp
            if isinstance(result, str):
                self._set.fail(result)
                return False
            return self._set.accept(result)

    def _current(self) -> tuple[JWK, ...]:
        keys = self._set.keys
        if keys is None:
            raise IdentityUnavailable("no signing keys available (JWKS file unreadable)")
        return keys

    def _read(self, previous: _Stamp | None) -> tuple[_Stamp | None, tuple[JWK, ...] | str]:
        """Runs in a worker thread: (new stamp or None if unchanged, keys or an error)."""
        try:
            st = self.path.stat()
        except OSError as exc:
            return (0, 0, 0), f"cannot read: {exc.strerror}"
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == previous:
            return None, ""
        try:
            with self.path.open("rb") as fh:
                data = json.load(fh)
            return stamp, parse_jwk_set(data)
        except OSError as exc:
            return stamp, f"cannot read: {exc.strerror}"
        except (ValueError, RecursionError) as exc:
            # json.JSONDecodeError is a ValueError; its message names a position only.
            return stamp, f"not a valid JWK set: {exc}"

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.refresh()
