"""The shared-state interface every backend implements (DESIGN.md, "Shared state").

Two backends: memory (one process; the default, `make run` needs nothing else) and Redis
(redis://, rediss://, redis+sentinel://; every replica sees the same state). All calls
are async, and a backend that cannot answer raises StateUnavailable: callers decide
what that means (fail closed, or `state.degraded_mode: cached`), never the backend.

What is shared:
* policy bundles: immutable versions (content hash), each with author, time and comment,
  and a current pointer; publishing or rolling back moves the pointer and notifies every
  replica (a replica that missed the notification catches up by polling current_policy);
* revocations: of one token (jti) or of all of a subject's tokens issued before a time,
  each expiring when the tokens it revokes would have;
* rate-limit counters: fixed windows, incremented atomically across replicas;
* the audit stream: records appended once per (replica, seq), in order, bounded length.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

_VERSION = re.compile(r"^sha256:[0-9a-f]{64}$")


class StateUnavailable(Exception):
    """The state store cannot be reached or did not answer in time."""


class StateConflict(Exception):
    """A request the store refuses on its merits (e.g. rollback to an unknown version)."""


@dataclass(frozen=True, slots=True)
class PolicyBundle:
    """A set of policy files, as published: file name -> YAML text. Its version is the
    content hash (casb.policy: "sha256:..."), the same the proxy audits."""

    files: Mapping[str, str]
    version: str


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    version: str  # "sha256:<hex>"
    author: str
    published_at: float  # epoch seconds
    comment: str = ""
    current: bool = False
    # Who last made this version current (a publish, or a rollback to it), when, and why:
    # filled in by current_policy() / publish_policy() / set_current_policy().
    activated_by: str = ""
    activated_at: float = 0.0
    activation_comment: str = ""


@dataclass(frozen=True, slots=True)
class Revocation:
    """What the store knows about one token: is its jti revoked, and are the subject's
    tokens issued before some time revoked (`subject_before`, epoch seconds)."""

    jti_revoked: bool = False
    subject_before: float | None = None

    def revokes(self, issued_at: float | None) -> bool:
        """Does this revoke a token issued at `issued_at`? A token without `iat` is
        revoked by any subject revocation (it cannot show it is newer)."""
        if self.jti_revoked:
            return True
        if self.subject_before is None:
            return False
        return issued_at is None or issued_at < self.subject_before


@dataclass(frozen=True, slots=True)
class Consumed:
    """The outcome of charging a rate-limit counter."""

    allowed: bool
    used: int  # in the current window, after this charge (if allowed)
    retry_after: float = 0.0  # seconds until the window resets, when refused


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One audit record for the stream: its seq in this replica's log, its hash, and
    the record's JSON line."""

    seq: int
    hash: str
    line: bytes


@dataclass(frozen=True, slots=True)
class StoreHealth:
    ok: bool
    backend: str  # "memory" | "redis"
    detail: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)


class StateStore(Protocol):
    backend: str  # "memory" | "redis"

    async def ping(self) -> StoreHealth: ...

    async def aclose(self) -> None: ...

    # -- policy bundles -------------------------------------------------------------
    async def publish_policy(
        self, bundle: PolicyBundle, *, author: str, comment: str = ""
    ) -> PolicyVersion:
        """Store the bundle (a version already stored is not duplicated), make it
        current, and notify every replica. The caller has validated it."""
        ...

    async def set_current_policy(
        self, version: str, *, author: str, comment: str = ""
    ) -> PolicyVersion:
        """Rollback (or forward) to a stored version; StateConflict if unknown."""
        ...

    async def current_policy(self) -> tuple[PolicyVersion, PolicyBundle] | None: ...

    async def current_policy_version(self) -> str | None:
        """Cheap: just the current pointer (polled every policy_poll_seconds)."""
        ...

    async def policy_versions(self, limit: int = 50) -> Sequence[PolicyVersion]:
        """Newest first; the current one marked."""
        ...

    def policy_notifications(self) -> AsyncIterator[str]:
        """Yields a version each time the current pointer moves (best effort: a
        notification can be missed, e.g. across a reconnect; poll as well)."""
        ...

    # -- revocation -----------------------------------------------------------------
    async def revoke_token(self, jti: str, *, expires_at: float) -> None: ...

    async def revoke_subject(self, subject: str, *, before: float, expires_at: float) -> None:
        """Revoke every token of `subject` issued before `before`. A later call with an
        earlier `before` does not shrink an existing revocation."""
        ...

    async def revocation(self, jti: str | None, subject: str) -> Revocation:
        """One round trip: both checks."""
        ...

    # -- rate limits ----------------------------------------------------------------
    async def consume(self, key: str, amount: int, limit: int, window_seconds: int) -> Consumed:
        """Charge `amount` to `key`'s counter in the current fixed window (aligned to
        epoch multiples of window_seconds) unless that would exceed `limit`; atomic."""
        ...

    async def charge(self, key: str, amount: int, window_seconds: int) -> None:
        """Add `amount` after the fact (bytes of a finished request), without a limit."""
        ...

    # -- audit stream ---------------------------------------------------------------
    async def append_audit(self, replica: str, entries: Sequence[StreamEntry], max_len: int) -> int:
        """Append the entries whose seq is above this replica's stream cursor, in order,
        and advance the cursor, atomically: a batch sent twice is appended once.
        Returns the cursor (the last seq appended for this replica)."""
        ...

    async def audit_cursor(self, replica: str) -> int: ...


# -- argument rules every backend applies (ValueError: a caller's bug, not the store's) --
def check_version(version: str) -> None:
    if not _VERSION.match(version):
        raise ValueError("a policy version is 'sha256:' and 64 lower-case hex digits")


def check_bundle(bundle: PolicyBundle) -> None:
    check_version(bundle.version)
    if not bundle.files:
        raise ValueError("a policy bundle needs at least one file")
    if any(not isinstance(n, str) or not n for n in bundle.files):
        raise ValueError("policy bundle file names must be non-empty strings")
    if any(not isinstance(t, str) for t in bundle.files.values()):
        raise ValueError("policy bundle files must be text")


def check_consume(amount: int, window_seconds: int, limit: int = 0) -> None:
    if amount < 0 or limit < 0:
        raise ValueError("rate-limit amounts and limits cannot be negative")
    if window_seconds < 1:
        raise ValueError("a rate-limit window is at least one second")


def check_times(*epoch_seconds: float) -> None:
    if not all(math.isfinite(t) for t in epoch_seconds):
        raise ValueError("revocation times must be finite epoch seconds")


def check_append(replica: str, entries: Sequence[StreamEntry], max_len: int) -> None:
    if not replica:
        raise ValueError("the audit stream needs a replica name")
    if max_len < 1:
        raise ValueError("the audit stream max_len must be positive")
    seqs = [e.seq for e in entries]
    if any(s < 1 for s in seqs) or any(b <= a for a, b in itertools.pairwise(seqs)):
        raise ValueError("audit stream entries must have positive, strictly increasing seq")


def subject_key(subject: str) -> str:
    """Subjects are identifiers: stores key them by hash (the Redis backend does too)."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()
