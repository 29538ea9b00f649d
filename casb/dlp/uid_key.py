"""The secret behind de-identified UIDs (and shifted dates): from a file or an
environment variable, or generated under state_dir in dev. Never logged."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from casb.config import ConfigError, Settings

_DEV_KEY_NAME = "dlp-uid.key"
_MIN_BYTES = 16


def load_uid_key(settings: Settings) -> bytes | None:
    """The configured key; the dev key (created on first use) in dev; else None."""
    cfg = settings.dlp
    if cfg.uid_key_file is not None:
        try:
            key = cfg.uid_key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"dlp.uid_key_file {cfg.uid_key_file}: cannot read: {exc.strerror}"
            ) from exc
        return _checked(key, f"dlp.uid_key_file {cfg.uid_key_file}")
    if cfg.uid_key_env is not None:
        value = os.environ.get(cfg.uid_key_env)
        if not value:
            raise ConfigError(f"dlp.uid_key_env: ${cfg.uid_key_env} is not set")
        return _checked(value.encode(), f"${cfg.uid_key_env}")
    if settings.environment == "dev":
        return _dev_key(settings.state_dir)
    return None


def _checked(key: bytes, where: str) -> bytes:
    if len(key) < _MIN_BYTES:
        raise ConfigError(f"{where}: the UID key needs at least {_MIN_BYTES} bytes")
    return key


def _dev_key(state_dir: Path) -> bytes:
    path = state_dir / _DEV_KEY_NAME
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    return key
