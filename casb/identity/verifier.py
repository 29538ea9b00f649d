"""Token verification: a compact JWS in, a `Principal` out (or an AuthenticationError).

Steps: unverified header -> algorithm allow-list -> key by `kid` (refetching the key set
once, rate-limited, for an unknown kid) -> `jwt.decode` (signature, iss, aud, required
claims) -> time claims against our clock -> Principal. Verified tokens are cached until
their `exp`; the cache is dropped whenever the key set changes.

Error descriptions go back to the client: they name claims, never their values.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from enum import Enum
from types import MappingProxyType
from typing import Any

import jwt
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidJTIError,
    InvalidSignatureError,
    InvalidSubjectError,
    MissingRequiredClaimError,
    PyJWTError,
)
from jwt.types import Options

from casb.config import ASYMMETRIC_ALGORITHMS, IdentitySettings
from casb.context import Principal
from casb.identity.keys import JWK, JwksFileSource, JwksUrlSource, KeySource
from casb.identity.tokens import AuthenticationError

# Which key type (and curve) can verify which algorithm (RFC 7518 §3, RFC 8037).
_EC_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")

_LIST_SEPARATORS = re.compile(r"[\s,]+")
# Longest file-source poll interval: a replaced file is noticed within this.
_MAX_FILE_POLL_SECONDS = 5.0


class _Miss(Enum):
    UNKNOWN = "unknown signing key"
    MISMATCH = "signing key does not fit the token algorithm"
    AMBIGUOUS = "token has no 'kid' and several keys fit"


def _invalid(description: str) -> AuthenticationError:
    return AuthenticationError("invalid_token", description)


def key_fits(jwk: Mapping[str, Any], alg: str) -> bool:
    """Can this JWK verify a signature made with `alg`?

    A JWK naming an `alg` must name exactly this one. Without `alg`, the key type (and
    curve) must fit. Keys not for signatures (`use`, `key_ops`) and keys that carry
    private material (a leaked private key proves nothing) are never used.
    """
    use = jwk.get("use")
    if use is not None and use != "sig":
        return False
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return False
    jwk_alg = jwk.get("alg")
    if jwk_alg is not None and jwk_alg != alg:
        return False
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        return False
    kty = jwk.get("kty")
    if alg in _RSA_ALGS:
        return kty == "RSA"
    if alg in _EC_CURVE:
        return kty == "EC" and jwk.get("crv") == _EC_CURVE[alg]
    if alg == "EdDSA":
        return kty == "OKP" and jwk.get("crv") in _OKP_CURVES
    return False


def _build_key(jwk: JWK, alg: str) -> jwt.PyJWK | None:
    """The PyJWK bound to `alg` (pyjwt verifies with the algorithm bound at construction;
    an RSA JWK without `alg` would otherwise only ever verify RS256), or None if the JWK
    is unusable: malformed, or an RSA key below pyjwt's minimum size."""
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
        if key.Algorithm.check_key_length(key.key) is not None:
            return None
    except (PyJWTError, ValueError, TypeError):
        return None
    return key


def _numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"claim '{name}' must be a number")
    return float(value)


def _claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a dotted path (`realm_access.roles`). A top-level claim whose name
    itself contains dots (namespaced claims such as `https://example.org/roles`) wins."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _string_set(value: Any) -> frozenset[str]:
    """A list of strings (non-strings ignored) or a space/comma-separated string."""
    if isinstance(value, str):
        return frozenset(item for item in _LIST_SEPARATORS.split(value) if item)
    if isinstance(value, list | tuple):
        return frozenset(item for item in value if isinstance(item, str) and item)
    return frozenset()


def _freeze(value: Any) -> Any:
    """A read-only deep copy: principals are cached and shared between requests."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _describe(exc: Exception, required: frozenset[str]) -> str:
    """A short description of a pyjwt failure that is safe to show the client."""
    if isinstance(exc, ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, InvalidAudienceError):
        return "audience not accepted"
    if isinstance(exc, InvalidIssuerError):
        return "issuer not accepted"
    if isinstance(exc, MissingRequiredClaimError):
        # pyjwt only names claims we asked for; check anyway so nothing else leaks.
        claim = exc.claim
        return f"missing required claim '{claim}'" if claim in required else "invalid token"
    if isinstance(exc, InvalidSignatureError):
        return "signature verification failed"
    if isinstance(exc, InvalidAlgorithmError):
        return "algorithm not accepted"
    if isinstance(exc, InvalidSubjectError):
        return "claim 'sub' must be a non-empty string"
    if isinstance(exc, InvalidJTIError):
        return "claim 'jti' must be a string"
    if isinstance(exc, InvalidIssuedAtError):
        return "claim 'iat' must be a number"
    if isinstance(exc, DecodeError):
        return "malformed token"
    return "invalid token"


class TokenVerifier:
    """Verifies bearer JWTs against one issuer's key set and builds Principals."""

    def __init__(
        self, settings: IdentitySettings, keys: KeySource, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.source = keys
        self._clock = clock
        # config already refuses symmetric algorithms; intersect again so that `none`
        # and HS* can never get through whatever the settings object says.
        self._algorithms = frozenset(settings.algorithms) & frozenset(ASYMMETRIC_ALGORITHMS)
        self._required = frozenset((*settings.required_claims, "iss", "aud"))
        self._options: Options = {
            "require": sorted(self._required),
            # Time claims are checked below against self._clock (injectable, and the same
            # clock the cache uses); pyjwt would read the wall clock itself.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_iss": True,
            "verify_aud": True,
            "verify_sub": True,
            "verify_jti": True,
        }
        self._audience = list(settings.audience)
        self._mfa_amr = frozenset(settings.mfa.amr_values)
        self._mfa_acr = frozenset(settings.mfa.acr_values)
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()  # token -> (exp, p)
        self._cache_size = settings.token_cache_size
        self._keys_by_id: dict[tuple[str | None, str], jwt.PyJWK] = {}
        self._version = keys.version

    async def start(self) -> None:
        await self.source.start()

    async def aclose(self) -> None:
        await self.source.aclose()

    @property
    def ready(self) -> bool:
        """A key set is loaded (readiness probe)."""
        return self.source.ready

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens are cached (for metrics)."""
        return len(self._cache)

    def _sync_version(self) -> None:
        version = self.source.version
        if version != self._version:
            self._version = version
            self._cache.clear()
            self._keys_by_id.clear()

    async def verify(self, token: str) -> Principal:
        """The Principal of a valid token; AuthenticationError (401) if the token is not
        acceptable, IdentityUnavailable (503) if no key set can be had."""
        if len(token) > self.settings.max_token_bytes:
            raise _invalid("token too large")
        self._sync_version()
        cached = self._cache.get(token)
        if cached is not None:
            if self._clock() < cached[0]:  # valid until exp, no leeway
                self._cache.move_to_end(token)
                return cached[1]
            del self._cache[token]

        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise _invalid("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid("algorithm not accepted")
        kid: str | None = header.get("kid")  # pyjwt has checked it is a string if present

        key = await self._key_for(kid, alg)
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_seconds,
                options=self._options,
            )
        except (PyJWTError, ValueError, TypeError) as exc:
            raise _invalid(_describe(exc, self._required)) from None

        expires_at, issued_at = self._check_times(payload)
        principal = self._principal(payload, expires_at, issued_at)
        self._remember(token, principal)
        return principal

    async def _key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        key = self._keys_by_id.get((kid, alg))
        if key is not None:
            return key
        result = self._select(await self.source.get_keys(), kid, alg)
        if result is _Miss.UNKNOWN:
            # Perhaps the IdP rotated: look again once (the source rate-limits this).
            result = self._select(await self.source.refetch(), kid, alg)
        if isinstance(result, _Miss):
            raise _invalid(result.value)
        return result

    def _select(self, keys: tuple[JWK, ...], kid: str | None, alg: str) -> jwt.PyJWK | _Miss:
        # The set may have changed while we awaited it: drop what came from the old one.
        self._sync_version()
        if kid is not None:
            named = [k for k in keys if k.get("kid") == kid]
            if not named:
                return _Miss.UNKNOWN
            candidates = [k for k in named if key_fits(k, alg)]
            miss = _Miss.MISMATCH
        else:
            candidates = [k for k in keys if key_fits(k, alg)]
            if len(candidates) > 1:
                return _Miss.AMBIGUOUS
            miss = _Miss.UNKNOWN
        for jwk in candidates:
            key = _build_key(jwk, alg)
            if key is not None:
                self._keys_by_id[(kid, alg)] = key
                return key
        return miss

    def _check_times(self, payload: Mapping[str, Any]) -> tuple[float | None, float | None]:
        """The token's (exp, iat), once they are checked against our clock."""
        now = self._clock()
        leeway = self.settings.leeway_seconds
        exp = _numeric_date(payload, "exp")
        nbf = _numeric_date(payload, "nbf")
        iat = _numeric_date(payload, "iat")
        if exp is not None and exp <= now - leeway:
            raise _invalid("token expired")
        if (nbf is not None and nbf > now + leeway) or (iat is not None and iat > now + leeway):
            raise _invalid("token not yet valid")
        longest = self.settings.max_token_lifetime_seconds
        if longest is not None:
            # Revocations last `longest`: a token that could outlive one is refused.
            if exp is None:
                raise _invalid("token has no expiry (exp)")
            if exp - (now if iat is None else iat) > longest + leeway:
                raise _invalid("token lifetime exceeds the maximum this proxy accepts")
        return exp, iat

    def _principal(
        self, payload: dict[str, Any], expires_at: float | None, issued_at: float | None
    ) -> Principal:
        subject = payload.get("sub")
        if subject is None:
            raise _invalid("missing required claim 'sub'")
        if not isinstance(subject, str) or not subject:
            raise _invalid("claim 'sub' must be a non-empty string")
        roles = _string_set(_claim_at(payload, self.settings.roles_claim))
        amr = _string_set(payload.get("amr"))
        acr = payload.get("acr")
        mfa = bool(amr & self._mfa_amr) or (isinstance(acr, str) and acr in self._mfa_acr)
        jti = payload.get("jti")
        try:
            claims = _freeze(payload)
        except RecursionError:
            raise _invalid("invalid token") from None
        return Principal(
            subject=subject,
            issuer=payload["iss"],  # jwt.decode checked it equals settings.issuer
            roles=roles,
            mfa=mfa,
            claims=claims,
            expires_at=expires_at,
            token_id=jti if isinstance(jti, str) else None,
            issued_at=issued_at,
        )

    def _remember(self, token: str, principal: Principal) -> None:
        # Tokens without exp are accepted when settings allow it, but never cached; nor
        # are tokens accepted only thanks to the leeway.
        expires_at = principal.expires_at
        if self._cache_size <= 0 or expires_at is None or self._clock() >= expires_at:
            return
        self._cache[token] = (expires_at, principal)
        self._cache.move_to_end(token)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def build_verifier(settings: IdentitySettings) -> TokenVerifier:
    """A verifier for `settings`, with a JWKS URL or JWKS file key source."""
    source: KeySource
    if settings.jwks_url is not None:
        source = JwksUrlSource(
            settings.jwks_url,
            refresh_seconds=settings.jwks_refresh_seconds,
            min_refetch_seconds=settings.jwks_min_refetch_seconds,
            timeout_seconds=settings.jwks_timeout_seconds,
        )
    elif settings.jwks_file is not None:
        source = JwksFileSource(
            settings.jwks_file,
            poll_seconds=min(settings.jwks_refresh_seconds, _MAX_FILE_POLL_SECONDS),
        )
    else:  # config validation makes this unreachable
        raise ValueError("identity settings name neither jwks_url nor jwks_file")
    return TokenVerifier(settings, source)
