"""The in-memory state store: one process, nothing to run (`make run` needs no Redis).

Same semantics as the Redis backend (casb/state/store.py), held in dicts:

* policy versions are kept for the life of the process; the current pointer moves on
  publish and rollback, and every open `policy_notifications()` iterator is told;
* revocations and rate-limit counters expire by the injected clock (epoch seconds), and
  expired entries are swept as new ones arrive, so memory stays bounded by what is live;
* the audit "stream" is a list trimmed to `max_len`, readable with `audit_entries()` (the
  Redis stream's stand-in, for tests and `casb` running alone).

A threading.Lock guards the state, so the store can also be used from a worker thread;
notifications reach each iterator on its own event loop.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from casb.state.store import (
    Consumed,
    PolicyBundle,
    PolicyVersion,
    Revocation,
    StateConflict,
    StoreHealth,
    StreamEntry,
    check_append,
    check_bundle,
    check_consume,
    check_times,
    check_version,
    subject_key,
)

Clock = Callable[[], float]

# Notifications an iterator holds while its reader is busy; older ones are dropped
# (only the newest matters: the reader swaps to the current version and polls anyway).
NOTIFY_BACKLOG = 64
SWEEP_EVERY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class AuditStreamRecord:
    """One entry of the in-memory audit stream (the fields a Redis stream entry has)."""

    replica: str
    seq: int
    hash: str
    line: bytes


class PolicyNotifications:
    """An async iterator of policy versions, registered when created (so nothing
    published after `policy_notifications()` returns is missed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[str] = deque(maxlen=NOTIFY_BACKLOG)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def deliver(self, version: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending.append(version)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _wake(waiter)

    def __aiter__(self) -> PolicyNotifications:
        return self

    async def __anext__(self) -> str:
        while True:
            with self._lock:
                if self._pending:
                    return self._pending.popleft()
                if self._closed:
                    raise StopAsyncIteration
                waiter = asyncio.get_running_loop().create_future()
                self._waiter = waiter
            await waiter

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _wake(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    """Resolve `waiter` from any thread, on its own loop."""

    def _set() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop = waiter.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _set()
    elif not loop.is_closed():
        loop.call_soon_threadsafe(_set)


@dataclass(slots=True)
class _Stored:
    bundle: PolicyBundle
    meta: PolicyVersion  # current=False here; marked on the way out
    order: int  # publication order, to sort versions published in the same second


class MemoryState:
    """StateStore for one process. `clock` (epoch seconds) drives expiry and windows."""

    backend = "memory"

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._policies: dict[str, _Stored] = {}
        self._current: str | None = None
        self._activation: tuple[str, float, str] = ("", 0.0, "")  # who made it current
        self._subscribers: weakref.WeakSet[PolicyNotifications] = weakref.WeakSet()
        self._revoked_jti: dict[str, float] = {}  # jti -> expires_at
        self._revoked_sub: dict[str, tuple[float, float]] = {}  # hash -> (before, expires)
        self._counters: dict[tuple[str, int], tuple[int, float]] = {}  # -> (used, expires)
        self._audit: list[AuditStreamRecord] = []
        self._cursors: dict[str, int] = {}
        self._next_sweep = 0.0
        self._closed = False

    async def ping(self) -> StoreHealth:
        return StoreHealth(ok=True, backend=self.backend, detail="in-process (this replica only)")

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
        for sub in subscribers:
            await sub.aclose()

    # -- policy bundles ---------------------------------------------------------------
    async def publish_policy(
        self, bundle: PolicyBundle, *, author: str, comment: str = ""
    ) -> PolicyVersion:
        check_bundle(bundle)
        with self._lock:
            stored = self._policies.get(bundle.version)
            if stored is None:
                meta = PolicyVersion(
                    version=bundle.version,
                    author=author,
                    published_at=self._clock(),
                    comment=comment,
                )
                stored = _Stored(
                    PolicyBundle(dict(bundle.files), bundle.version), meta, len(self._policies)
                )
                self._policies[bundle.version] = stored
            self._current = bundle.version
            self._activation = (author, self._clock(), comment)
        self._notify(bundle.version)
        return self._as_current(stored.meta)

    async def set_current_policy(
        self, version: str, *, author: str, comment: str = ""
    ) -> PolicyVersion:
        check_version(version)
        with self._lock:
            stored = self._policies.get(version)
            if stored is None:
                raise StateConflict("no such policy version in the store")
            self._current = version
            self._activation = (author, self._clock(), comment)
        self._notify(version)
        return self._as_current(stored.meta)

    async def current_policy(self) -> tuple[PolicyVersion, PolicyBundle] | None:
        with self._lock:
            if self._current is None:
                return None
            stored = self._policies[self._current]
            return self._as_current(stored.meta), stored.bundle

    def _as_current(self, meta: PolicyVersion) -> PolicyVersion:
        by, at, comment = self._activation
        return replace(
            meta, current=True, activated_by=by, activated_at=at, activation_comment=comment
        )

    async def current_policy_version(self) -> str | None:
        return self._current

    async def policy_versions(self, limit: int = 50) -> Sequence[PolicyVersion]:
        with self._lock:
            newest = sorted(
                self._policies.values(),
                key=lambda s: (s.meta.published_at, s.order),
                reverse=True,
            )[: max(limit, 0)]
            current = self._current
        return [replace(s.meta, current=s.meta.version == current) for s in newest]

    def policy_notifications(self) -> PolicyNotifications:
        sub = PolicyNotifications()
        with self._lock:
            if self._closed:
                sub._closed = True
            else:
                self._subscribers.add(sub)
        return sub

    def _notify(self, version: str) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.deliver(version)

    # -- revocation -------------------------------------------------------------------
    async def revoke_token(self, jti: str, *, expires_at: float) -> None:
        check_times(expires_at)
        with self._lock:
            now = self._sweep()
            expires_at = max(expires_at, self._revoked_jti.get(jti, -math.inf))
            if expires_at > now:
                self._revoked_jti[jti] = expires_at

    async def revoke_subject(self, subject: str, *, before: float, expires_at: float) -> None:
        check_times(before, expires_at)
        key = subject_key(subject)
        with self._lock:
            now = self._sweep()
            old = self._revoked_sub.get(key)
            if old is not None:
                before, expires_at = max(before, old[0]), max(expires_at, old[1])
            if expires_at > now:
                self._revoked_sub[key] = (before, expires_at)

    async def revocation(self, jti: str | None, subject: str) -> Revocation:
        key = subject_key(subject)
        with self._lock:
            now = self._clock()
            jti_expires = self._revoked_jti.get(jti) if jti is not None else None
            sub = self._revoked_sub.get(key)
        return Revocation(
            jti_revoked=jti_expires is not None and jti_expires > now,
            subject_before=sub[0] if sub is not None and sub[1] > now else None,
        )

    # -- rate limits ------------------------------------------------------------------
    async def consume(self, key: str, amount: int, limit: int, window_seconds: int) -> Consumed:
        check_consume(amount, window_seconds, limit)
        with self._lock:
            now = self._sweep()
            start = _window_start(now, window_seconds)
            end = start + window_seconds
            used, _ = self._live_counter((key, start), now)
            if used + amount > limit:
                return Consumed(allowed=False, used=used, retry_after=max(end - now, 0.0))
            self._counters[(key, start)] = (used + amount, float(end))
            return Consumed(allowed=True, used=used + amount)

    async def charge(self, key: str, amount: int, window_seconds: int) -> None:
        check_consume(amount, window_seconds)
        with self._lock:
            now = self._sweep()
            start = _window_start(now, window_seconds)
            used, _ = self._live_counter((key, start), now)
            self._counters[(key, start)] = (used + amount, float(start + window_seconds))

    def _live_counter(self, ident: tuple[str, int], now: float) -> tuple[int, float]:
        used, expires = self._counters.get(ident, (0, math.inf))
        return (used, expires) if expires > now else (0, math.inf)

    # -- audit stream -----------------------------------------------------------------
    async def append_audit(self, replica: str, entries: Sequence[StreamEntry], max_len: int) -> int:
        check_append(replica, entries, max_len)
        with self._lock:
            cursor = self._cursors.get(replica, 0)
            for entry in entries:
                if entry.seq > cursor:
                    self._audit.append(
                        AuditStreamRecord(replica, entry.seq, entry.hash, bytes(entry.line))
                    )
                    cursor = entry.seq
            if len(self._audit) > max_len:
                del self._audit[: len(self._audit) - max_len]
            if cursor:
                self._cursors[replica] = cursor
            return cursor

    async def audit_cursor(self, replica: str) -> int:
        with self._lock:
            return self._cursors.get(replica, 0)

    def audit_entries(self) -> list[AuditStreamRecord]:
        """The stream as it stands, oldest first (not part of StateStore)."""
        with self._lock:
            return list(self._audit)

    # -- housekeeping -----------------------------------------------------------------
    def _sweep(self) -> float:
        """Drop expired revocations and counters, at most once a second; returns now.
        Called with the lock held."""
        now = self._clock()
        if now < self._next_sweep:
            return now
        self._next_sweep = now + SWEEP_EVERY_SECONDS
        self._revoked_jti = {k: e for k, e in self._revoked_jti.items() if e > now}
        self._revoked_sub = {k: v for k, v in self._revoked_sub.items() if v[1] > now}
        self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        return now


def _window_start(now: float, window_seconds: int) -> int:
    """The fixed window holding `now`: aligned to epoch multiples of its length."""
    return int(now // window_seconds) * window_seconds
