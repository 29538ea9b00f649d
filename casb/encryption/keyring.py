"""Key-encryption keys (KEKs): the keys that wrap each object's data key.

`KeyEncryptionKeys` is the pluggable interface (a cloud KMS adapter implements the same
three members); `LocalKeyring` is the implementation backed by a file the operator keeps
next to the configuration:

    primary: kek-20250101-1a2b3c          # the key new objects are wrapped with
    keys:                                 # every key still needed to read old objects
      kek-20250101-1a2b3c: <base64 of 32 random bytes>
      kek-20240601-9f8e7d: <base64 of 32 random bytes>

YAML (JSON is valid too). The file is checked as a whole when loaded: readable, no
unknown or duplicated field, `primary` one of `keys`, every key exactly 32 bytes after
strict base64 decoding, every id matching ``^[A-Za-z0-9._-]{1,64}$`` (ids are stored in
object metadata, so they stay short and plain). A problem raises `KeyringError` naming
the file and the field, never a key's value.

Wrapping: AES-256-GCM under the KEK with a random 12-byte nonce; the associated data is
``b"casb-envelope-dek/1\\0" + kek_id + b"\\0" + context``, so a wrapped key only unwraps
under its own id and for the object it was made for (the caller's `context`). The blob is
nonce || ciphertext || tag: 12 + 32 + 16 = 60 bytes. An unknown id or a blob that does not
authenticate raises `IntegrityError`.

Operators: `create_keyring_file` writes a new file (mode 0600, one fresh key, refuses to
overwrite); `rotate_keyring_file` adds a fresh key, makes it primary and keeps the old
ones, replacing the file atomically (temporary file in the same directory, fsync,
`os.replace`), mode 0600. Rotation rewrites the file, so comments in it are not kept;
do not run two rotations of the same file at once. Remove an old key only once no stored
object is wrapped under it: such objects can no longer be read.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from casb.encryption.errors import IntegrityError

KEY_BYTES = 32
WRAP_NONCE_BYTES = 12
WRAPPED_KEY_BYTES = WRAP_NONCE_BYTES + KEY_BYTES + 16  # nonce || ciphertext || tag
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_KEYRING_FILE_BYTES = 1024 * 1024
_WRAP_AAD_PREFIX = b"casb-envelope-dek/1\0"
_FILE_MODE = 0o600
_FIELDS = ("primary", "keys")
_HEADER = (
    "# casb envelope keyring: key-encryption keys (base64 of 32 random bytes).\n"
    "# Secret: keep this file mode 0600 and out of version control.\n"
    "# `casb envelope rotate --keyring FILE` adds a key and makes it primary; keep the old\n"
    "# keys as long as objects wrapped under them are stored.\n"
)


class KeyringError(Exception):
    """The keyring file cannot be used; phrased for the operator: names the file and
    the field, never a key's value."""


class KeyEncryptionKeys(Protocol):
    """Wraps and unwraps data keys (DEKs). A cloud KMS adapter implements the same."""

    @property
    def primary_id(self) -> str:
        """The id of the key `wrap` uses."""
        ...

    def wrap(self, dek: bytes, context: bytes) -> tuple[str, bytes]:
        """Wrap `dek` under the primary key, bound to `context`: (kek_id, wrapped)."""
        ...

    def unwrap(self, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        """The DEK, or `IntegrityError` if the id is unknown or the blob does not
        authenticate under that key and `context`."""
        ...


def is_key_id(value: str) -> bool:
    """Whether `value` is a well-formed key id (``^[A-Za-z0-9._-]{1,64}$``)."""
    return KEY_ID_PATTERN.fullmatch(value) is not None


log = logging.getLogger("casb")


def _wrap_aad(kek_id: str, context: bytes) -> bytes:
    return _WRAP_AAD_PREFIX + kek_id.encode("ascii") + b"\0" + context


class LocalKeyring:
    """KEKs held in memory, loaded from a keyring file (`from_file`)."""

    def __init__(self, primary_id: str, keys: Mapping[str, bytes]) -> None:
        for kid, key in keys.items():
            if not is_key_id(kid):
                raise ValueError("a key id must match ^[A-Za-z0-9._-]{1,64}$")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {kid}: must be {KEY_BYTES} bytes")
        if primary_id not in keys:
            raise ValueError(f"primary {primary_id!r} is not one of the keys")
        self._primary_id = primary_id
        self._aead = {kid: AESGCM(bytes(key)) for kid, key in keys.items()}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        """Load and check a keyring file; `KeyringError` naming the file and field."""
        primary, keys = _read_keyring(Path(path))
        return cls(primary, keys)

    @property
    def primary_id(self) -> str:
        return self._primary_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._aead))

    def wrap(self, dek: bytes, context: bytes) -> tuple[str, bytes]:
        if len(dek) != KEY_BYTES:
            raise ValueError(f"a data key must be {KEY_BYTES} bytes")
        nonce = os.urandom(WRAP_NONCE_BYTES)
        sealed = self._aead[self._primary_id].encrypt(
            nonce, dek, _wrap_aad(self._primary_id, context)
        )
        return self._primary_id, nonce + sealed

    def unwrap(self, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        aead = self._aead.get(kek_id)
        if aead is None:
            if is_key_id(kek_id):
                raise IntegrityError(f"unknown key-encryption key {kek_id!r}")
            raise IntegrityError("unknown key-encryption key")
        failed = "the data key does not unwrap: wrong key or tampered metadata"
        if len(wrapped) != WRAPPED_KEY_BYTES:
            raise IntegrityError(failed)
        try:
            return aead.decrypt(
                wrapped[:WRAP_NONCE_BYTES], wrapped[WRAP_NONCE_BYTES:], _wrap_aad(kek_id, context)
            )
        except InvalidTag:
            raise IntegrityError(failed) from None

    def __repr__(self) -> str:  # never the keys
        return f"LocalKeyring(primary_id={self._primary_id!r}, key_ids={list(self.key_ids)!r})"


class WatchedKeyring:
    """A `LocalKeyring` that follows its file: at most every `interval` seconds it looks
    at the file's mtime and size and, when they changed, loads it again. So a rotation
    (`casb envelope rotate`, or a new Secret mounted by Kubernetes) takes effect on
    every replica without a restart: new writes use the new primary, old objects keep
    opening with the keys the file still holds. A file that no longer loads keeps the
    last good keyring in use (and says so in the log)."""

    def __init__(self, path: str | os.PathLike[str], *, interval: float = 1.0) -> None:
        self._path = Path(path)
        self._interval = interval
        self._stamp = self._stat()
        self._current = LocalKeyring.from_file(self._path)
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _fresh(self) -> LocalKeyring:
        now = time.monotonic()
        if now - self._checked >= self._interval:
            self._checked = now
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._current = LocalKeyring.from_file(self._path)
                    self._stamp = stamp
                    log.warning(
                        "envelope keyring %s reloaded: primary %s",
                        self._path,
                        self._current.primary_id,
                    )
                except KeyringError as exc:
                    log.error(
                        "envelope keyring %s not reloaded, the last good one stays: %s",
                        self._path,
                        exc,
                    )
        return self._current

    @property
    def primary_id(self) -> str:
        return self._fresh().primary_id

    def wrap(self, dek: bytes, context: bytes) -> tuple[str, bytes]:
        return self._fresh().wrap(dek, context)

    def unwrap(self, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        return self._fresh().unwrap(kek_id, wrapped, context)

    def __repr__(self) -> str:
        return f"WatchedKeyring({str(self._path)!r}, {self._current!r})"


# -- the file ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (YAML keeps the last silently:
    a keyring with two values for one id must not load)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key is not a plain value", key_node.start_mark
            ) from None
        if duplicate:
            shown = f" {key!r}" if isinstance(key, str) and is_key_id(key) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key{shown}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # Only the position and the problem: PyYAML's own message quotes the line, which
    # may hold a key.
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return "not valid YAML"


def _read_keyring(path: Path) -> tuple[str, dict[str, bytes]]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_KEYRING_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyringError(f"{path}: cannot read the keyring: {exc.strerror}") from None
    if len(raw) > MAX_KEYRING_FILE_BYTES:
        raise KeyringError(f"{path}: not a keyring: larger than {MAX_KEYRING_FILE_BYTES} bytes")
    try:
        doc = yaml.load(raw.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 (safe loader)
    except UnicodeDecodeError:
        raise KeyringError(f"{path}: not a keyring: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise KeyringError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if doc is None:
        raise KeyringError(f"{path}: the keyring is empty (expected 'primary' and 'keys')")
    if not isinstance(doc, dict):
        raise KeyringError(f"{path}: the keyring must be a mapping with 'primary' and 'keys'")
    unknown = sorted(str(k) for k in doc if k not in _FIELDS)
    if unknown:
        raise KeyringError(f"{path}: unknown field {unknown[0]!r} (expected 'primary', 'keys')")
    for field in _FIELDS:
        if field not in doc:
            raise KeyringError(f"{path}: '{field}' is missing")
    entries = doc["keys"]
    if not isinstance(entries, dict) or not entries:
        raise KeyringError(f"{path}: 'keys' must be a non-empty mapping of key id to base64")
    keys: dict[str, bytes] = {}
    for n, (kid, value) in enumerate(entries.items(), start=1):
        # An invalid id is not echoed: it could be a key pasted in the wrong place.
        if not isinstance(kid, str):
            raise KeyringError(f"{path}: keys: entry {n}: the key id must be a string (quote it)")
        if not is_key_id(kid):
            raise KeyringError(
                f"{path}: keys: entry {n}: the key id must match ^[A-Za-z0-9._-]{{1,64}}$"
            )
        keys[kid] = _decode_key(path, kid, value)
    primary = doc["primary"]
    if not isinstance(primary, str) or not is_key_id(primary):
        raise KeyringError(f"{path}: 'primary' must be a key id, ^[A-Za-z0-9._-]{{1,64}}$")
    if primary not in keys:
        raise KeyringError(f"{path}: primary: {primary!r} is not one of 'keys'")
    return primary, keys


def _decode_key(path: Path, kid: str, value: object) -> bytes:
    where = f"{path}: keys.{kid}"
    if not isinstance(value, str):
        raise KeyringError(f"{where}: must be the base64 of {KEY_BYTES} random bytes")
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where}: not valid base64") from None
    if len(key) != KEY_BYTES:
        raise KeyringError(f"{where}: must decode to {KEY_BYTES} bytes, not {len(key)}")
    return key


def new_key_id(taken: set[str] | frozenset[str] = frozenset()) -> str:
    """A fresh id ``kek-<yyyymmdd>-<6 hex>`` (UTC date), not one of `taken`."""
    while True:
        kid = f"kek-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
        if kid not in taken:
            return kid


def _render(primary: str, keys: Mapping[str, bytes]) -> bytes:
    # Ids and keys are written as JSON strings (valid YAML double-quoted scalars), so an
    # id such as "1.5" or "true" stays a string when read back.
    lines = [_HEADER, f"primary: {json.dumps(primary)}\n", "keys:\n"]
    lines += [
        f"  {json.dumps(kid)}: {json.dumps(base64.b64encode(key).decode('ascii'))}\n"
        for kid, key in keys.items()
    ]
    return "".join(lines).encode("utf-8")


def create_keyring_file(path: str | os.PathLike[str]) -> str:
    """Write a new keyring (mode 0600) holding one fresh key, its primary; the new id.
    Refuses to overwrite an existing file (or follow a symlink)."""
    target = Path(path)
    kid = new_key_id()
    data = _render(kid, {kid: secrets.token_bytes(KEY_BYTES)})
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
        raise KeyringError(f"{target}: already exists; refusing to overwrite a keyring") from None
    except OSError as exc:
        raise KeyringError(f"{target}: cannot create the keyring: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _FILE_MODE)  # whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            target.unlink()
        raise KeyringError(f"{target}: cannot write the keyring: {exc.strerror}") from None
    return kid


def rotate_keyring_file(path: str | os.PathLike[str]) -> str:
    """Add a fresh key to the keyring file and make it primary, keeping the old keys;
    the file is replaced atomically, mode 0600. Returns the new primary id."""
    target = Path(os.path.realpath(path))  # a symlinked keyring: replace its target
    _, keys = _read_keyring(Path(path))
    kid = new_key_id(set(keys))
    keys[kid] = secrets.token_bytes(KEY_BYTES)
    data = _render(kid, keys)
    try:
        owner = target.stat()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise KeyringError(f"{path}: cannot rotate the keyring: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _FILE_MODE)
            with contextlib.suppress(PermissionError):  # keep the owner where we may
                os.fchown(fh.fileno(), owner.st_uid, owner.st_gid)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise KeyringError(f"{path}: cannot rotate the keyring: {exc.strerror}") from None
    _fsync_dir(target.parent)
    return kid


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
