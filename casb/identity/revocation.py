"""Is this token revoked? Asked of the shared state store on every request.

`casb token revoke` writes revocations of one token (its `jti`) or of every token of a
subject issued before a time; every replica must enforce them within a second. So the
answers this replica gets are kept for at most `cache_seconds` (1 s by default) per
(jti, subject) before the store is asked again — with one exception: an answer that
says "revoked" is kept for as long as it is remembered at all, because a revocation
never shrinks (a token revoked stays revoked until it expires; the store has no
"unrevoke", and a later subject revocation with an earlier time does not shrink one).

When the store cannot answer (StateUnavailable, or no answer within `timeout_seconds`):

* `fail_closed` (default): StateUnavailable is raised; the pipeline refuses the request
  (503 state_unavailable).
* `cached`: the last answer this replica saw for that (jti, subject), however old, is
  used, and the result says `degraded` (the audit record gets warning "degraded_state").
  A token this replica has no answer for is still refused (StateUnavailable): nothing
  says it was not revoked, so there is nothing to decide with. Degraded mode keeps the
  sessions that were already running; it does not admit new tokens blind.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from casb.context import Principal
from casb.state.store import Revocation, StateStore, StateUnavailable

DegradedMode = Literal["fail_closed", "cached"]
# The 401 challenge for a revoked token (RFC 6750 invalid_token).
REVOKED_CHALLENGE = (
    'Bearer realm="casb", error="invalid_token", error_description="the token was revoked"'
)
# At most this many (jti, subject) answers are remembered (least recently used dropped).
DEFAULT_MAX_ENTRIES = 100_000


class RevocationCheck(NamedTuple):
    """The outcome of one check: is the token revoked, and was the answer a stale one
    used because the store could not be asked (degraded mode `cached`)? `by` says which
    revocation applies: "jti" (this token) or "subject" (the subject's tokens issued
    before a time)."""

    revoked: bool
    degraded: bool = False
    by: Literal["jti", "subject"] | None = None

    @property
    def reason(self) -> str:
        """The audited reason (names no subject and no token id)."""
        if self.by == "jti":
            return "the token was revoked (by its id)"
        if self.by == "subject":
            return "the token was revoked (all of its subject's tokens issued before a time)"
        return "the token is not revoked"


def _verdict(revocation: Revocation, principal: Principal, *, degraded: bool) -> RevocationCheck:
    if revocation.jti_revoked:
        return RevocationCheck(True, degraded, "jti")
    if revocation.revokes(principal.issued_at):
        return RevocationCheck(True, degraded, "subject")
    return RevocationCheck(False, degraded)


@dataclass(slots=True)
class _Seen:
    revocation: Revocation
    at: float  # monotonic time of the store's answer


class RevocationChecker:
    """Checks principals against the store's revocations, with a short per-token cache."""

    def __init__(
        self,
        store: StateStore,
        *,
        degraded_mode: DegradedMode = "fail_closed",
        timeout_seconds: float = 0.5,
        cache_seconds: float = 1.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_seconds < 0 or cache_seconds > 1.0:
            # every replica must enforce a revocation within a second
            raise ValueError("cache_seconds must be between 0 and 1")
        self.store = store
        self.degraded_mode = degraded_mode
        self._timeout = timeout_seconds
        self._cache_seconds = cache_seconds
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[tuple[str | None, str], _Seen] = OrderedDict()

    async def check(self, principal: Principal) -> RevocationCheck:
        """Is `principal`'s token revoked? Raises StateUnavailable when the store cannot
        answer and no usable cached answer exists (see the module docstring)."""
        key = (principal.token_id, principal.subject)
        seen = self._seen.get(key)
        now = self._clock()
        if seen is not None:
            self._seen.move_to_end(key)
            if seen.revocation.revokes(principal.issued_at):
                return _verdict(seen.revocation, principal, degraded=False)  # never shrinks
            if now - seen.at < self._cache_seconds:
                return RevocationCheck(revoked=False)
        try:
            async with asyncio.timeout(self._timeout):  # no extra task, unlike wait_for
                revocation = await self.store.revocation(principal.token_id, principal.subject)
        except (StateUnavailable, TimeoutError) as exc:
            if self.degraded_mode == "cached" and seen is not None:
                return _verdict(seen.revocation, principal, degraded=True)
            if isinstance(exc, StateUnavailable):
                raise
            raise StateUnavailable("the state store did not answer in time") from None
        self._remember(key, revocation, self._clock())
        return _verdict(revocation, principal, degraded=False)

    def _remember(self, key: tuple[str | None, str], revocation: Revocation, at: float) -> None:
        self._seen[key] = _Seen(revocation, at)
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)
