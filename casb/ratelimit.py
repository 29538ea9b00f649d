"""Rate limits and quotas per principal (`limits.rate`), counted across replicas.

Two parts:

* pure: which limits apply to a request (the principal's roles, the action, the
  destination) and the counters they charge (`select_counters`); config.py has checked
  that limits name known actions and destinations, and distinct names;
* enforcement (`RateLimiter`): charges the counters in the shared state store, in fixed
  windows aligned to epoch multiples of `window_seconds` (the store does it atomically,
  so N replicas share one budget).

Counter keys: f"{limit.name}:{sha256(issuer NUL subject)[:32]}:{requests|bytes}" — the
subject is an identifier, so only its hash appears in keys.

Requests are charged before the request is forwarded (one per request). Bytes (request
body in + response body out) are known only afterwards: `admit` refuses when a byte
budget is already spent, and `charge_bytes` adds a finished request's bytes. So one
request can overshoot a byte budget; the next ones are refused until the window ends.
When a request matches several limits, they are charged in turn and the first one that
is spent refuses it; one charged before it keeps that charge (errs toward refusing).

When the store cannot answer (StateUnavailable, or no answer within `timeout_seconds`):

* `fail_closed` (default): `admit` raises StateUnavailable (503 state_unavailable).
  A byte charge that fails is kept (bounded) and sent once the store answers again,
  unless its window has ended by then (the counter it was for no longer matters).
* `cached`: this replica's own counters stand in, seeded with the last counts the store
  reported to it, and the admission says `degraded` (audit warning "degraded_state").
  Each replica then counts only its own traffic, so across N replicas up to N times a
  budget can be spent during the outage. Byte charges are counted locally and queued
  as above; a charge lost when the queue overflows or the window ends is the documented
  cost of degraded mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from casb.config import RateLimit
from casb.context import Action, Principal
from casb.state.store import Consumed, StateStore, StateUnavailable

log = logging.getLogger("casb")

DegradedMode = Literal["fail_closed", "cached"]
CounterKind = Literal["requests", "bytes"]
# Bounds on what a replica keeps in memory.
MAX_LOCAL_COUNTERS = 100_000
MAX_PENDING_CHARGES = 10_000


# -- pure: which counters a request charges -------------------------------------------
@dataclass(frozen=True, slots=True)
class Counter:
    """One counter a request charges: `amount` against `limit` per `window_seconds`.
    Byte counters are checked with amount 0 (is the budget already spent?) and charged
    after the fact."""

    name: str  # the limit's name (audited)
    kind: CounterKind
    key: str
    amount: int
    limit: int
    window_seconds: int


def principal_key(principal: Principal) -> str:
    """The principal's part of a counter key: a hash, never the subject itself."""
    raw = f"{principal.issuer}\0{principal.subject}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def counter_key(limit_name: str, principal: Principal, kind: CounterKind) -> str:
    return f"{limit_name}:{principal_key(principal)}:{kind}"


def applies(limit: RateLimit, roles: Iterable[str], action: Action | str, destination: str) -> bool:
    """Does `limit` apply? Each of actions / destinations / roles matches all when empty;
    roles match a principal holding any of them."""
    if limit.actions and str(action) not in limit.actions:
        return False
    if limit.destinations and destination not in limit.destinations:
        return False
    return not limit.roles or not set(limit.roles).isdisjoint(roles)


def select_counters(
    limits: Sequence[RateLimit], principal: Principal, action: Action | str, destination: str
) -> list[Counter]:
    """The counters a request charges, byte counters first (checking them charges
    nothing, so a request they refuse is not counted against a request limit)."""
    found: list[Counter] = []
    for limit in limits:
        if not applies(limit, principal.roles, action, destination):
            continue
        if limit.bytes is not None:
            key = counter_key(limit.name, principal, "bytes")
            found.append(Counter(limit.name, "bytes", key, 0, limit.bytes, limit.window_seconds))
    for limit in limits:
        if not applies(limit, principal.roles, action, destination):
            continue
        if limit.requests is not None:
            key = counter_key(limit.name, principal, "requests")
            found.append(
                Counter(limit.name, "requests", key, 1, limit.requests, limit.window_seconds)
            )
    return found


def window_start(now: float, window_seconds: int) -> float:
    """Fixed windows aligned to epoch multiples of window_seconds (as the store does)."""
    return math.floor(now / window_seconds) * window_seconds


# -- enforcement ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of `admit`: allowed or refused by which limit (and when to retry),
    whether stand-in counters were used (degraded), and the byte counters to charge
    when the request has finished."""

    allowed: bool
    degraded: bool = False
    refused_by: Counter | None = None
    retry_after: int = 0  # whole seconds, >= 1 when refused
    byte_counters: tuple[Counter, ...] = ()

    @property
    def reason(self) -> str:
        """The audited reason: names the limit, never the principal."""
        c = self.refused_by
        if c is None:
            return "within rate limits"
        return (
            f"rate limit '{c.name}': {c.limit} {c.kind} per {c.window_seconds} s spent; "
            f"retry after {self.retry_after} s"
        )


@dataclass(slots=True)
class _Window:
    start: float
    used: int


class LocalCounters:
    """This replica's own fixed-window counters: the stand-in for the store in degraded
    mode. They mirror what the store last said (`observe`) and what this replica charged."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_entries: int = MAX_LOCAL_COUNTERS
    ) -> None:
        self._clock = clock
        self._max = max_entries
        self._windows: dict[str, _Window] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def _window(self, key: str, window_seconds: int) -> _Window:
        start = window_start(self._clock(), window_seconds)
        found = self._windows.get(key)
        if found is None or found.start != start:
            found = self._windows[key] = _Window(start, 0)
            if len(self._windows) > self._max:
                self._evict()
        return found

    def _evict(self) -> None:
        # Oldest windows first: they are the ones most likely over (dicts keep order of
        # insertion, and a key that starts a new window is reinserted).
        excess = len(self._windows) - self._max
        for key in list(self._windows)[:excess]:
            del self._windows[key]

    def observe(
        self, key: str, window_seconds: int, consumed: Consumed, amount: int, limit: int
    ) -> None:
        """Remember the store's answer for this window."""
        w = self._window(key, window_seconds)
        if consumed.allowed:
            w.used = consumed.used
        else:  # keep refusing the same charge here until the window ends
            w.used = max(w.used, consumed.used, limit - amount + 1)

    def consume(self, key: str, amount: int, limit: int, window_seconds: int) -> Consumed:
        w = self._window(key, window_seconds)
        if w.used + amount > limit:
            retry = w.start + window_seconds - self._clock()
            return Consumed(allowed=False, used=w.used, retry_after=max(retry, 0.0))
        w.used += amount
        return Consumed(allowed=True, used=w.used)

    def charge(self, key: str, amount: int, window_seconds: int) -> None:
        self._window(key, window_seconds).used += amount


@dataclass(frozen=True, slots=True)
class _Pending:
    key: str
    amount: int
    window_seconds: int
    window_start: float


class RateLimiter:
    """Admits requests against `limits.rate` with counters in the shared store."""

    def __init__(
        self,
        store: StateStore,
        limits: Sequence[RateLimit],
        *,
        degraded_mode: DegradedMode = "fail_closed",
        timeout_seconds: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = tuple(limits)
        self.degraded_mode = degraded_mode
        self._timeout = timeout_seconds
        self._clock = clock
        self.local = LocalCounters(clock=clock)
        self._pending: deque[_Pending] = deque()
        self._flushing = asyncio.Lock()  # one flush at a time: a charge is sent once
        self.dropped_charges = 0  # byte charges lost to a full queue

    @property
    def pending_charges(self) -> int:
        """Byte charges waiting for the store to answer again."""
        return len(self._pending)

    def counters(
        self, principal: Principal, action: Action | str, destination: str
    ) -> list[Counter]:
        return select_counters(self.limits, principal, action, destination)

    async def admit(
        self, principal: Principal, action: Action | str, destination: str
    ) -> Admission:
        """Charge the request counters; refuse when one is spent or a byte budget is.
        Raises StateUnavailable when the store cannot answer and mode is fail_closed."""
        counters = self.counters(principal, action, destination)
        if not counters:
            return Admission(allowed=True)
        degraded = False
        for c in counters:
            # bytes: is the budget already spent (used >= limit)? charges nothing
            amount, limit = (0, c.limit - 1) if c.kind == "bytes" else (c.amount, c.limit)
            consumed: Consumed | None = None
            if not degraded:  # once the store failed, do not wait for it again
                try:
                    # asyncio.timeout: no extra task per call, unlike wait_for
                    async with asyncio.timeout(self._timeout):
                        consumed = await self.store.consume(c.key, amount, limit, c.window_seconds)
                except (StateUnavailable, TimeoutError) as exc:
                    if self.degraded_mode != "cached":
                        if isinstance(exc, StateUnavailable):
                            raise
                        raise StateUnavailable("the state store did not answer in time") from None
                    degraded = True
                else:
                    self.local.observe(c.key, c.window_seconds, consumed, amount, limit)
            if consumed is None:
                consumed = self.local.consume(c.key, amount, limit, c.window_seconds)
            if not consumed.allowed:
                retry = max(1, math.ceil(consumed.retry_after))
                return Admission(False, degraded, refused_by=c, retry_after=retry)
        byte_counters = tuple(c for c in counters if c.kind == "bytes")
        return Admission(True, degraded, byte_counters=byte_counters)

    async def charge_bytes(self, admission: Admission, nbytes: int) -> None:
        """Add a finished request's bytes to its byte counters. Never raises: a charge
        the store does not take is queued (see the module docstring)."""
        if nbytes <= 0 or not admission.byte_counters:
            return
        now = self._clock()
        for c in admission.byte_counters:
            self.local.charge(c.key, nbytes, c.window_seconds)
            if len(self._pending) >= MAX_PENDING_CHARGES:
                self._pending.popleft()
                self.dropped_charges += 1
                log.warning("rate-limit byte charges queued too long: the oldest was dropped")
            self._pending.append(
                _Pending(c.key, nbytes, c.window_seconds, window_start(now, c.window_seconds))
            )
        await self.flush()

    async def flush(self) -> None:
        """Send the queued byte charges, oldest first; stop at the first failure (they
        stay queued). Charges whose window has ended are dropped."""
        async with self._flushing:
            items = self._pending
            while items:
                p = items[0]
                if window_start(self._clock(), p.window_seconds) != p.window_start:
                    items.popleft()  # its window is over: nothing left to charge
                    continue
                try:
                    async with asyncio.timeout(self._timeout):
                        await self.store.charge(p.key, p.amount, p.window_seconds)
                except (StateUnavailable, TimeoutError):
                    return
                except Exception as exc:  # never fail the request over accounting
                    log.warning("rate-limit byte charge failed: %s", type(exc).__name__)
                    return
                # a full queue may have dropped it while we awaited
                if items and items[0] is p:
                    items.popleft()
