"""Assemble a running casb from Settings: identity, policy, router, audit log, pipeline,
the shared state store and the policy distributor (hot reload).

Everything that is loaded or compiled once lives here, never on the request path.
The mitmproxy addon, the admin API and the CLI all build their parts through `Runtime`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from casb.audit import AuditError, AuditLog
from casb.audit.checkpoint import signer_from_settings
from casb.audit.forwarder import AuditForwarder, ForwarderError
from casb.audit.stream import AuditStreamShipper
from casb.audit.syslog import rfc5424_message
from casb.config import ConfigError, IdentitySettings, Settings
from casb.dlp.uid_key import load_uid_key
from casb.encryption.keyring import KeyringError, WatchedKeyring
from casb.exchange import EnvelopeSpec
from casb.identity import TokenVerifier, build_verifier
from casb.identity.devkeys import dev_identity_settings, ensure_dev_keys
from casb.identity.revocation import RevocationChecker
from casb.pipeline import Pipeline
from casb.policy import CompiledPolicy, load_policy
from casb.policy.distribution import PolicyDistributor
from casb.ratelimit import RateLimiter
from casb.routing import Router
from casb.state import MemoryState, StateStore, open_state
from casb.state.store import StateUnavailable
from casb.tasks import stop_tasks
from casb.telemetry import Telemetry, TelemetryError, load_pseudonym_key

log = logging.getLogger("casb")


def effective_settings(settings: Settings) -> Settings:
    """Fill in what dev mode generates: identity backed by the dev signing key."""
    if settings.identity is not None:
        return settings
    if settings.environment != "dev":  # config validation already refuses this
        raise ValueError("identity settings are required outside dev")
    identity: IdentitySettings = dev_identity_settings(ensure_dev_keys(settings.state_dir))
    return settings.model_copy(update={"identity": identity})


def load_policy_for(settings: Settings) -> CompiledPolicy:
    return load_policy(settings.policy.paths, known_destinations=set(settings.destinations))


def load_envelopes(settings: Settings) -> dict[str, EnvelopeSpec]:
    """Each envelope-encrypting destination's keyring, loaded (and checked) at start."""
    found: dict[str, EnvelopeSpec] = {}
    for name, dest in settings.destinations.items():
        env = dest.envelope
        if env is None:
            continue
        try:
            keys = WatchedKeyring(env.keyring_file)
        except KeyringError as exc:
            raise ConfigError(f"destinations.{name}.envelope.keyring_file: {exc}") from exc
        found[name] = EnvelopeSpec(keys, env.chunk_bytes, env.verify_whole_bytes)
    return found


def build_telemetry(settings: Settings) -> Telemetry:
    """Exporters from the OTEL_* environment; the principal pseudonym key from settings."""
    t = settings.telemetry
    try:
        key = load_pseudonym_key(
            t.pseudonym_key_file,
            t.pseudonym_key_env,
            dev_state_dir=settings.state_dir if settings.environment == "dev" else None,
        )
        telemetry = Telemetry.from_env(
            pseudonym_key=key,
            route_prefixes={name: settings.route_of(name) for name in settings.destinations},
        )
    except TelemetryError as exc:
        raise ConfigError(str(exc)) from exc
    telemetry.policy_loaded(ok=True)
    return telemetry


def open_audit_log(settings: Settings) -> AuditLog:
    """The proxy's audit log, with the checkpoint signer (production needs its key)."""
    c = settings.audit.checkpoints
    return AuditLog(
        settings.audit.path,
        signer=signer_from_settings(settings),
        every_records=c.every_records,
        every_seconds=c.every_seconds,
        fsync=settings.audit.fsync,
    )


def policy_record(pipeline: Pipeline, settings: Settings, event: str) -> dict[str, Any]:
    """The fields of a policy_change audit record: which policy the proxy enforces now."""
    policy = pipeline.policy
    return {
        "event": event,
        "policy_version": policy.version,
        "rules": policy.rule_count,
        "files": sorted(p.name for p in settings.policy.paths),
    }


def build_stream_shipper(settings: Settings, state: StateStore) -> AuditStreamShipper | None:
    """The audit stream copy of the audit log (state.audit_stream): with a shared store
    only (with memory:// no one else could read it); not started yet."""
    s = settings.state
    if state.backend != "redis" or not s.audit_stream.enabled:
        return None
    replica_id = s.replica_id or socket.gethostname() or "casb"
    return AuditStreamShipper(
        state, settings.audit.path, replica_id, max_len=s.audit_stream.max_len
    )


def _notify_all(hooks: tuple[Callable[[], None], ...]) -> None:
    for hook in hooks:
        hook()


def build_forwarder(settings: Settings) -> AuditForwarder | None:
    """The live syslog copy of the audit log (audit.syslog), not started yet."""
    sink = settings.audit.syslog
    if sink is None:
        return None
    formatter = functools.partial(
        rfc5424_message,
        fmt=sink.format,
        source_id=settings.audit.source_id,
        hostname=socket.gethostname() or "-",
    )
    try:
        return AuditForwarder(sink, settings.audit.path, formatter)
    except ForwarderError as exc:
        raise ConfigError(f"audit.syslog: {exc}") from exc


async def _checkpoint_timer(pipeline: Pipeline) -> None:
    """Sign a checkpoint once `every_seconds` have passed over uncovered records. A
    failure leaves the log unhealthy: requests are refused until a write succeeds."""
    while True:
        await asyncio.sleep(1.0)
        audit = pipeline.audit
        if audit is None:
            return
        try:
            if audit.maybe_checkpoint():
                pipeline.telemetry.audit_record("checkpoint")
                if pipeline.audit_written is not None:
                    pipeline.audit_written()
        except AuditError as exc:
            log.error("audit checkpoint failed: %s", exc)


@dataclass
class Runtime:
    settings: Settings
    pipeline: Pipeline
    # The shared state (state.url). Tools that only decide get an empty in-process one:
    # they consult no replica's state and need none of its credentials.
    state: StateStore
    forwarder: AuditForwarder | None = None  # the live syslog copy, when configured
    stream: AuditStreamShipper | None = None  # the audit stream copy (Redis)
    # Follows the store's current policy (or, with memory://, the policy files); the
    # proxy only: tools that only decide start no watchers.
    policy_distributor: PolicyDistributor | None = None
    _checkpoints: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, settings: Settings, *, audit: bool = True) -> Runtime:
        """Load and compile everything. `audit=False` for tools that only decide
        (explain, policy tests): they must not take the proxy's audit log lock, and
        neither connect to the shared state nor watch policies."""
        settings = effective_settings(settings)
        assert settings.identity is not None
        policy = load_policy_for(settings)
        router = Router(settings)
        verifier: TokenVerifier = build_verifier(settings.identity)
        uid_key = load_uid_key(settings)
        # Exporters only for the proxy: tools that only decide send no telemetry.
        telemetry = build_telemetry(settings) if audit else Telemetry()
        telemetry.policy_active(policy.version)
        # The proxy's shared state; tools that only decide get an empty in-process one.
        state: StateStore = (
            open_state(settings.state, state_dir=settings.state_dir) if audit else MemoryState()
        )
        pipeline = Pipeline(
            settings,
            verifier=verifier,
            policy=policy,
            router=router,
            audit=None,
            uid_key=uid_key,
            envelopes=load_envelopes(settings),
            telemetry=telemetry,
        )
        if audit:  # the proxy: refuse to start with DLP profiles it could not run
            missing = pipeline.inspectors().missing_key_profiles()
            if missing:
                raise ConfigError(
                    f"DLP profile(s) {', '.join(missing)} de-identify, which needs a UID key "
                    "shared by every replica: set dlp.uid_key_file or dlp.uid_key_env"
                )
            inspectors = pipeline.inspectors()
            for name in inspectors.settings.profiles:  # built now, not on a first request
                inspectors.inspector(name)
            pipeline.audit = open_audit_log(settings)
            forwarder = build_forwarder(settings)
            stream = build_stream_shipper(settings, state)
            hooks = tuple(h.notify for h in (forwarder, stream) if h is not None)
            if hooks:
                pipeline.audit_written = functools.partial(_notify_all, hooks)
            pipeline.audit_event("policy_change", policy_record(pipeline, settings, "loaded"))
            s = settings.state
            pipeline.revocation = RevocationChecker(
                state,
                degraded_mode=s.degraded_mode,
                timeout_seconds=s.timeout_seconds,
                # half a second: a revocation is enforced everywhere within a second,
                # with room for the store's and the request's own latency
                cache_seconds=0.5,
            )
            if settings.limits.rate:
                pipeline.rate_limiter = RateLimiter(
                    state,
                    settings.limits.rate,
                    degraded_mode=s.degraded_mode,
                    timeout_seconds=s.timeout_seconds,
                )
            distributor = PolicyDistributor(state, pipeline, settings, telemetry, uid_key=uid_key)
            return cls(
                settings=settings,
                pipeline=pipeline,
                state=state,
                forwarder=forwarder,
                stream=stream,
                policy_distributor=distributor,
            )
        return cls(settings=settings, pipeline=pipeline, state=state)

    async def start(self) -> None:
        await self.pipeline.verifier.start()
        if self.policy_distributor is not None and not self.policy_distributor.running:
            # the store's current policy (if any) is adopted before this returns
            await self.policy_distributor.start()
        if self.pipeline.audit is not None and self._checkpoints is None:
            self._checkpoints = asyncio.create_task(
                _checkpoint_timer(self.pipeline), name="casb-audit-checkpoints"
            )
        if self.forwarder is not None and not self.forwarder.running:
            self.forwarder.start()
        if self.stream is not None and not self.stream.running:
            self.stream.start()

    def discard(self) -> None:
        """Release what build() took (the audit log lock) without having started. (The
        state store has connected to nothing before start: aclose() closes it.)"""
        audit, self.pipeline.audit = self.pipeline.audit, None
        try:
            if audit is not None:
                audit.close()  # a final signed checkpoint over what is not yet covered
        except AuditError as exc:  # the file is closed regardless
            log.error("audit log closed without its final checkpoint: %s", exc)
        finally:
            if self.forwarder is not None:
                # what the collector has not confirmed is sent again at the next start
                self.forwarder.stop(timeout=5.0)
            self.pipeline.telemetry.shutdown()  # flushes spans and metrics not yet exported

    async def aclose(self) -> None:
        if self.policy_distributor is not None:
            await self.policy_distributor.aclose()
        checkpoints, self._checkpoints = self._checkpoints, None
        await stop_tasks((checkpoints,), "audit checkpoint timer")
        await self.pipeline.verifier.aclose()
        try:
            self.discard()
        finally:
            if self.stream is not None:  # after discard(): the final checkpoint goes too
                await self.stream.aclose(timeout=5.0)
            try:
                # byte charges of finished requests still on their way to the store
                async with asyncio.timeout(5.0):
                    await self.pipeline.drain_charges()
            except (TimeoutError, StateUnavailable):
                log.warning("rate-limit byte charges not delivered at shutdown")
            await self.state.aclose()


__all__ = ["Runtime", "effective_settings", "load_policy_for"]
