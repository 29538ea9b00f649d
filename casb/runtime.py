"""Assemble a running casb from Settings: identity, policy, router, audit log, pipeline.

Everything that is loaded or compiled once lives here, never on the request path.
The mitmproxy addon, the admin API and the CLI all build their parts through `Runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass

from casb.audit import AuditLog
from casb.config import ConfigError, IdentitySettings, Settings
from casb.dlp.uid_key import load_uid_key
from casb.encryption.keyring import KeyringError, WatchedKeyring
from casb.exchange import EnvelopeSpec
from casb.identity import TokenVerifier, build_verifier
from casb.identity.devkeys import dev_identity_settings, ensure_dev_keys
from casb.pipeline import Pipeline
from casb.policy import CompiledPolicy, load_policy
from casb.routing import Router


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


@dataclass
class Runtime:
    settings: Settings
    pipeline: Pipeline

    @classmethod
    def build(cls, settings: Settings, *, audit: bool = True) -> Runtime:
        """Load and compile everything. `audit=False` for tools that only decide
        (explain, policy tests): they must not take the proxy's audit log lock."""
        settings = effective_settings(settings)
        assert settings.identity is not None
        policy = load_policy_for(settings)
        router = Router(settings)
        verifier: TokenVerifier = build_verifier(settings.identity)
        uid_key = load_uid_key(settings)
        pipeline = Pipeline(
            settings,
            verifier=verifier,
            policy=policy,
            router=router,
            audit=None,
            uid_key=uid_key,
            envelopes=load_envelopes(settings),
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
            pipeline.audit = AuditLog(settings.audit.path)
        return cls(settings=settings, pipeline=pipeline)

    async def start(self) -> None:
        await self.pipeline.verifier.start()

    def discard(self) -> None:
        """Release what build() took (the audit log lock) without having started."""
        if self.pipeline.audit is not None:
            self.pipeline.audit.close()

    async def aclose(self) -> None:
        await self.pipeline.verifier.aclose()
        self.discard()


__all__ = ["Runtime", "effective_settings", "load_policy_for"]
