"""Shared state: the StateStore interface (store.py) and its backends, chosen by URL.

`open_state(settings.state, state_dir=...)` gives MemoryState for memory:// (one
process; the default) and RedisState otherwise. It reads the password source and checks
the TLS files up front, so a configuration mistake stops start-up with a ConfigError
naming the field; nothing connects until the first call.
"""

from __future__ import annotations

import os
from pathlib import Path

from casb.config import ConfigError, StateSettings
from casb.state.memory import MemoryState
from casb.state.redis_store import RedisState
from casb.state.redis_url import parse_redis_url, pick_password
from casb.state.store import (
    Consumed,
    PolicyBundle,
    PolicyVersion,
    Revocation,
    StateConflict,
    StateStore,
    StateUnavailable,
    StoreHealth,
    StreamEntry,
)

__all__ = [
    "Consumed",
    "MemoryState",
    "PolicyBundle",
    "PolicyVersion",
    "RedisState",
    "Revocation",
    "StateConflict",
    "StateStore",
    "StateUnavailable",
    "StoreHealth",
    "StreamEntry",
    "open_state",
]


def open_state(settings: StateSettings, *, state_dir: Path) -> StateStore:
    """The configured store. `state_dir` is where a backend may keep local files; the
    two backends here keep none (memory state lives and dies with the process)."""
    del state_dir  # part of the signature for backends that persist locally
    if settings.url.lower().startswith("memory://"):
        return MemoryState()
    try:
        target = parse_redis_url(settings.url)
    except ValueError as exc:
        raise ConfigError(f"state.url: {exc}") from None
    try:
        password = pick_password(
            target.password,
            from_file=_password_file(settings.password_file),
            from_env=_password_env(settings.password_env),
        )
    except ValueError as exc:
        raise ConfigError(f"state: {exc}") from None
    tls = settings.tls
    configured = [
        (name, path)
        for name, path in (
            ("ca_bundle", tls.ca_bundle),
            ("client_cert_file", tls.client_cert_file),
            ("client_key_file", tls.client_key_file),
        )
        if path is not None
    ]
    if configured and not target.tls:
        raise ConfigError(
            "state.tls: TLS files are set but state.url is plain redis:// "
            "(use rediss:// or rediss+sentinel://)"
        )
    for name, path in configured:
        if not path.is_file():
            raise ConfigError(f"state.tls.{name}: {path} is not a readable file")
    client_cert = (
        (tls.client_cert_file, tls.client_key_file)
        if tls.client_cert_file is not None and tls.client_key_file is not None
        else None
    )
    return RedisState(
        target.with_password(password),
        prefix=settings.prefix,
        stream=settings.audit_stream.name,
        timeout=settings.timeout_seconds,
        ca_bundle=tls.ca_bundle,
        client_cert=client_cert,
    )


def _password_file(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
        raise ConfigError(f"state.password_file: cannot read {path}: {reason}") from None


def _password_env(name: str | None) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"state.password_env: the environment variable {name} is not set")
    return value
