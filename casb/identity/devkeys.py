"""Dev signing key: what `make run` verifies against and `casb token mint` signs with.

An EC P-256 key (ES256) generated on first use under the state directory, with a JWKS
file holding its public half. Never use it outside dev: anyone with the state directory
can mint tokens.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from casb.config import IdentitySettings

DEV_ISSUER = "casb-dev"
DEV_AUDIENCE = "casb"
DEV_ALGORITHM = "ES256"
PRIVATE_KEY_NAME = "dev-signing-key.pem"
JWKS_NAME = "dev-jwks.json"


@dataclass(frozen=True, slots=True)
class DevKeys:
    private_key_path: Path
    jwks_path: Path
    kid: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK of a P-256 key, with kid = its RFC 7638 thumbprint."""
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError("dev keys are P-256")
    numbers = public_key.public_numbers()
    members = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }
    # RFC 7638 §3: the required members, lexicographic order, no whitespace.
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode("ascii")
    kid = _b64url(hashlib.sha256(canonical).digest())
    return {**members, "kid": kid, "alg": DEV_ALGORITHM, "use": "sig"}


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a usable dev signing key ({type(exc).__name__}); "
            f"delete it to generate a new one"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path}: not an EC P-256 key; delete it to generate a new one")
    return key


def _write_new_private_key(path: Path) -> None:
    """Create the key file atomically: written under a temporary name with mode 0600, then
    hard-linked into place, which fails if another process got there first (we then use
    theirs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dev-key-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _write_jwks(path: Path, jwks: dict[str, Any]) -> None:
    text = json.dumps(jwks, indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dev-jwks-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # public keys
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def ensure_dev_keys(state_dir: Path) -> DevKeys:
    """The dev key pair under `state_dir`, generated on first use, reused afterwards.

    A state directory created here gets mode 0700; an existing one is left as it is.
    The JWKS file is (re)written from the private key whenever it is missing or differs.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_key_path = state_dir / PRIVATE_KEY_NAME
    jwks_path = state_dir / JWKS_NAME
    if not private_key_path.exists():
        _write_new_private_key(private_key_path)
    jwk = public_jwk(_load_private_key(private_key_path).public_key())
    _write_jwks(jwks_path, {"keys": [jwk]})
    return DevKeys(private_key_path=private_key_path, jwks_path=jwks_path, kid=jwk["kid"])


def dev_identity_settings(keys: DevKeys) -> IdentitySettings:
    """Identity settings that accept tokens minted with `keys`."""
    # model_validate rather than keyword arguments: mypy without the pydantic plugin does
    # not see Field(default, ...) defaults.
    return IdentitySettings.model_validate(
        {"issuer": DEV_ISSUER, "audience": [DEV_AUDIENCE], "jwks_file": keys.jwks_path}
    )


def mint_token(
    keys: DevKeys,
    *,
    subject: str,
    roles: Sequence[str],
    mfa: bool = False,
    claims: Mapping[str, Any] | None = None,
    ttl_seconds: int = 3600,
    now: float | None = None,
    issuer: str = DEV_ISSUER,
    audience: str = DEV_AUDIENCE,
) -> str:
    """A signed dev token. `claims` are added last and may override the standard ones."""
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "roles": list(roles),
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
        "jti": str(uuid.uuid4()),
        "amr": ["pwd", "mfa"] if mfa else ["pwd"],
    }
    if claims:
        payload.update(claims)
    private_key = _load_private_key(keys.private_key_path)
    return jwt.encode(
        payload, private_key, algorithm=DEV_ALGORITHM, headers={"kid": keys.kid, "typ": "JWT"}
    )
