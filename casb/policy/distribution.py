"""Hot policy reload: follow the shared store's current policy bundle (every replica
the same), or, with the memory backend, the local policy files.

A replica builds its policy from the local files (Runtime.build). Then:

* **store**: it listens to the store's notifications and also polls the current pointer
  every ``state.policy_poll_seconds`` (a notification can be missed, e.g. across a
  reconnect). When the pointer moves it fetches the bundle, compiles it against this
  replica's destinations and swaps ``pipeline.policy`` in one assignment, so every
  request is decided by one policy or the other, never a mix. An empty store leaves the
  local files' policy in force.
* **files** (the memory backend, one process): it hashes the policy files every
  ``policy_poll_seconds`` and reloads them when their content changes.

A policy that fails to compile (or whose bundle does not hash to its version) is
refused: the last good one keeps serving, and the refusal is logged, counted
(casb.policy.reloads outcome=rejected) and audited (policy_change event "rejected").
Each activation is audited (event "activated", with the previous version). When the
store cannot answer, the last good policy keeps serving and the distributor reports
``degraded`` until the store answers again (logged once per outage, not per poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from casb.dlp.plan import DlpInspectors
from casb.policy.bundle import compile_bundle
from casb.policy.engine import CompiledPolicy
from casb.policy.loader import PolicyLoadError, load_policy, policy_files, policy_version
from casb.state.store import StateStore, StateUnavailable
from casb.tasks import stop_tasks

if TYPE_CHECKING:
    from casb.config import Settings
    from casb.pipeline import Pipeline
    from casb.telemetry import Telemetry

__all__ = ["PolicyDistributor", "PolicySource"]

log = logging.getLogger("casb.policy")

PolicySource = Literal["files", "store"]
_T = TypeVar("_T")
_MAX_REASON = 2000  # characters of a refusal's reasons kept in the audit record


def _reason(exc: BaseException) -> str:
    """A refusal's reasons, for logs and the audit record (bounded: a broken bundle can
    have hundreds of problems; the first ones say what is wrong)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


class PolicyDistributor:
    """Keeps `pipeline.policy` at the store's current version (or the policy files'
    content, with `watch_files`). `start()` syncs once, then follows changes until
    `aclose()`."""

    def __init__(
        self,
        store: StateStore,
        pipeline: Pipeline,
        settings: Settings,
        telemetry: Telemetry | None = None,
        *,
        uid_key: bytes | None = None,
        watch_files: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`uid_key`: the DLP UID key the pipeline was built with (a policy whose DLP
        profiles de-identify is refused without one, as at start-up). `watch_files`:
        reload the policy files when they change; default: with the memory backend,
        whose store no other process can publish to."""
        self._store = store
        self._pipeline = pipeline
        self._settings = settings
        self._telemetry = telemetry if telemetry is not None else pipeline.telemetry
        self._uid_key = uid_key
        self._watch_files = store.backend == "memory" if watch_files is None else watch_files
        self._clock = clock
        self._known = frozenset(settings.destinations)
        self._poll = settings.state.policy_poll_seconds
        # A store call the distributor makes off the request path may take longer than
        # one on it, but never hangs a sync.
        self._call_timeout = max(4 * settings.state.timeout_seconds, 2.0)
        self._source: PolicySource = "files"
        self._last_change = clock()
        self._store_seen: str | None = None  # the last store pointer acted on
        self._files_seen: str | None = None  # the last files content acted on
        self._rejected: str | None = None  # why the last candidate was refused
        self._outage: str | None = None  # why the store cannot answer, during an outage
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- what /readyz and the tests read ------------------------------------------------
    @property
    def active_version(self) -> str:
        return self._pipeline.policy.version

    @property
    def source(self) -> PolicySource:
        """Where the active policy came from: "files" (loaded at start or watched) or
        "store" (a published bundle)."""
        return self._source

    @property
    def last_change(self) -> float:
        """When the active policy became active (epoch seconds)."""
        return self._last_change

    @property
    def degraded(self) -> bool:
        """The store does not answer: the last good policy serves, changes wait."""
        return self._outage is not None

    @property
    def last_error(self) -> str | None:
        """The store error of the current outage, else why the last policy published
        (or the last edit of the files) was refused; None when neither."""
        return self._outage or self._rejected

    @property
    def watching_files(self) -> bool:
        return self._watch_files

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Adopt the store's current policy (or the files' latest content) now, then
        follow changes in the background."""
        if self._tasks:
            return
        # Subscribed before the first sync: a change right after it is heard.
        notifications = self._subscribe()
        await self.sync()
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name="casb-policy-poll"),
            asyncio.create_task(self._listen_loop(notifications), name="casb-policy-notifications"),
        ]

    async def aclose(self) -> None:
        """Stop following changes. Bounded: shutdown goes on (to the audit log's final
        checkpoint) even if a loop failed to stop."""
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks, "policy distribution")

    async def sync(self) -> None:
        """One check of the store (and of the files when watched); swaps the policy when
        it changed. Never raises for a store outage or a bad policy."""
        async with self._lock:
            await self._sync_store()
            if self._watch_files:
                self._sync_files()

    # -- background -------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # cancellation that stops this loop (and shutdown then waits forever)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync()
            except Exception:  # a bug must not stop the reloads; the policy stays
                log.exception("policy sync failed; the active policy stays in force")

    def _subscribe(self) -> AsyncIterator[str] | None:
        try:
            return self._store.policy_notifications()
        except StateUnavailable as exc:
            log.debug("policy notifications unavailable: %s", exc)
            return None

    async def _listen_loop(self, notifications: AsyncIterator[str] | None) -> None:
        """Wake the poller at each notification. When the subscription breaks, subscribe
        again after a poll interval (polling covers the gap)."""
        while True:
            if notifications is not None:
                try:
                    async for _version in notifications:
                        self._wake.set()
                except StateUnavailable as exc:
                    log.debug("policy notifications interrupted: %s", exc)
                except Exception:
                    log.exception("policy notifications failed; polling continues")
                finally:  # e.g. a Redis pub/sub connection (also when cancelled)
                    close = getattr(notifications, "aclose", None)
                    if close is not None:
                        with contextlib.suppress(Exception):
                            await close()
            await asyncio.sleep(self._poll)  # a pause before subscribing again
            notifications = self._subscribe()

    # -- the store --------------------------------------------------------------------
    async def _call(self, call: Coroutine[Any, Any, _T]) -> _T:
        try:
            async with asyncio.timeout(self._call_timeout):
                return await call
        except TimeoutError:
            raise StateUnavailable(f"no answer within {self._call_timeout:g} s") from None

    async def _sync_store(self) -> None:
        try:
            current = await self._call(self._store.current_policy_version())
            if current is None or current == self._store_seen:
                self._store_up()
                return
            found = await self._call(self._store.current_policy())
        except StateUnavailable as exc:
            self._store_down(str(exc) or "unavailable")
            return
        except Exception as exc:  # a backend bug is an outage too: keep the policy
            if self._outage is None:
                log.exception("policy store call failed")
            self._store_down(type(exc).__name__)
            return
        self._store_up()
        if found is None:
            return
        meta, bundle = found
        self._store_seen = meta.version
        about: dict[str, Any] = {
            "author": meta.author,  # who published the version
            "comment": meta.comment,
            "activated_by": meta.activated_by,  # who made it current (publish or rollback)
            "activation_comment": meta.activation_comment,
        }
        if bundle.version == self.active_version:  # e.g. a rollback to what serves
            self._source, self._rejected = "store", None
            return
        try:
            if bundle.version != meta.version:
                raise PolicyLoadError(
                    [f"the store's bundle is {bundle.version}, not the current {meta.version}"]
                )
            policy = compile_bundle(bundle, self._known)
            self._check_runnable(policy)
        except PolicyLoadError as exc:
            self._reject(meta.version, exc, "store", about)
            return
        self._activate(policy, "store", about)

    def _store_down(self, reason: str) -> None:
        if self._outage is None:
            log.warning(
                "state store unavailable (%s): policy %s keeps serving; changes are "
                "applied when the store answers again",
                reason,
                self.active_version,
            )
        self._outage = reason

    def _store_up(self) -> None:
        if self._outage is not None:
            log.warning("state store answers again (the outage was: %s)", self._outage)
            self._outage = None

    # -- the files ----------------------------------------------------------------------
    def _sync_files(self) -> None:
        paths = self._settings.policy.paths
        try:
            seen = policy_version(path.read_bytes() for path in policy_files(paths))
        except PolicyLoadError as exc:  # e.g. a directory left with no policy file
            seen = f"error: {exc}"
        except OSError as exc:
            seen = f"error: cannot read the policy files: {exc.strerror or exc}"
        if seen == self._files_seen:
            return
        self._files_seen = seen
        about: dict[str, Any] = {"files": _names(paths)}
        if seen.startswith("error: "):
            self._reject(None, PolicyLoadError([seen.removeprefix("error: ")]), "files", about)
            return
        if seen == self.active_version:
            return
        try:
            policy = load_policy(paths, self._known)
            self._check_runnable(policy)
        except PolicyLoadError as exc:
            self._reject(seen, exc, "files", about)
            return
        self._files_seen = policy.version  # the files may have changed again meanwhile
        if policy.version != self.active_version:
            self._activate(policy, "files", about)

    # -- swapping -----------------------------------------------------------------------
    def _check_runnable(self, policy: CompiledPolicy) -> None:
        """What Runtime.build refuses at start-up is refused at reload too."""
        missing = DlpInspectors(policy.dlp, self._settings.dlp, self._uid_key)
        names = missing.missing_key_profiles()
        if names:
            raise PolicyLoadError(
                [
                    f"DLP profile(s) {', '.join(names)} de-identify, which needs a UID key "
                    "shared by every replica: set dlp.uid_key_file or dlp.uid_key_env"
                ]
            )

    def _activate(
        self, policy: CompiledPolicy, source: PolicySource, about: dict[str, Any]
    ) -> None:
        previous = self._pipeline.policy
        self._pipeline.policy = policy  # one assignment: the swap is atomic
        self._source = source
        self._last_change = self._clock()
        self._rejected = None
        self._telemetry.policy_loaded(ok=True)
        self._telemetry.policy_active(policy.version)
        log.warning(
            "policy %s activated from %s (%d rules; was %s)",
            policy.version,
            source,
            policy.rule_count,
            previous.version,
        )
        self._pipeline.audit_event(
            "policy_change",
            {
                "event": "activated",
                "policy_version": policy.version,
                "previous_version": previous.version,
                "rules": policy.rule_count,
                "source": source,
                **about,
            },
        )
        try:  # built now, not on the first request that needs them
            inspectors = self._pipeline.inspectors()
            for name in inspectors.settings.profiles:
                inspectors.inspector(name)
        except Exception:  # the requests that need one are refused (dlp_unavailable)
            log.exception("DLP inspectors of policy %s could not be built", policy.version)

    def _reject(
        self,
        version: str | None,
        exc: PolicyLoadError,
        source: PolicySource,
        about: dict[str, Any],
    ) -> None:
        reason = _reason(exc)
        self._rejected = reason
        self._telemetry.policy_loaded(ok=False)
        log.error(
            "policy %s from %s refused; policy %s stays in force: %s",
            version or "(unreadable)",
            source,
            self.active_version,
            reason,
        )
        fields: dict[str, Any] = {"event": "rejected"}
        if version is not None:
            fields["policy_version"] = version
        fields |= {
            "active_version": self.active_version,
            "error": reason,
            "source": source,
            **about,
        }
        self._pipeline.audit_event("policy_change", fields)


def _names(paths: Sequence[Any]) -> list[str]:
    return sorted(p.name for p in paths)
