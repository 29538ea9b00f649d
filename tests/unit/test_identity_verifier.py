"""TokenVerifier: the JWT matrix, key selection, principal building, the cache, dev keys.

Real keys, real signatures, a real JWKS file; time comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
import pytest
from jwt.api_jws import PyJWS

from casb.config import IdentitySettings
from casb.context import Principal
from casb.identity import (
    AuthenticationError,
    IdentityUnavailable,
    JwksFileSource,
    JwksUrlSource,
    TokenVerifier,
    build_verifier,
    dev_identity_settings,
    ensure_dev_keys,
    mint_token,
)
from casb.identity.devkeys import public_jwk
from tests.jwks_server import TestKey, b64url, hmac_token, jwks_of, unsigned_token

NOW = 1_700_000_000.0
ISSUER = "https://idp.example.org/realms/hospital"
AUDIENCE = "casb"
ALL_ALGS = [
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keyring() -> dict[str, TestKey]:
    return {
        "RS256": TestKey.generate("RS256", kid="rs256"),
        "PS256": TestKey.generate("PS256", kid="ps256"),
        "ES256": TestKey.generate("ES256", kid="es256"),
        "ES384": TestKey.generate("ES384", kid="es384"),
        "ES512": TestKey.generate("ES512", kid="es512"),
        "EdDSA": TestKey.generate("EdDSA", kid="ed25519"),
        "Ed448": TestKey.generate("EdDSA", kid="ed448", curve="Ed448"),
    }


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "exp": int(NOW) + 300,
        "roles": ["radiologist"],
        "jti": "token-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


DROP: Any = object()


def write_jwks(path: Path, jwks: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jwks))
    os.replace(tmp, path)  # like an operator rotating keys: a new file, atomically


class Env:
    """Verifiers over a JWKS file in tmp_path; closes them at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.jwks_path = tmp_path / "jwks.json"
        self.clock = Clock()
        self._verifiers: list[TokenVerifier] = []

    def settings(self, **overrides: Any) -> IdentitySettings:
        data: dict[str, Any] = {
            "issuer": ISSUER,
            "audience": [AUDIENCE],
            "jwks_file": str(self.jwks_path),
            "algorithms": ALL_ALGS,
        }
        data.update(overrides)
        return IdentitySettings.model_validate(data)

    async def verifier(self, *keys: TestKey, jwks: Any = None, **overrides: Any) -> TokenVerifier:
        write_jwks(self.jwks_path, jwks if jwks is not None else jwks_of(*keys))
        settings = self.settings(**overrides)
        verifier = TokenVerifier(settings, JwksFileSource(self.jwks_path), clock=self.clock)
        await verifier.start()
        self._verifiers.append(verifier)
        return verifier

    async def close(self) -> None:
        for verifier in self._verifiers:
            await verifier.aclose()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    yield e
    await e.close()


async def rejected(verifier: TokenVerifier, token: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(token)
    assert info.value.code == "invalid_token"
    return info.value


# -- accepted --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA", "Ed448"])
async def test_valid_tokens_accepted(env: Env, keyring: dict[str, TestKey], name: str) -> None:
    key = keyring[name]
    verifier = await env.verifier(*keyring.values())
    principal = await verifier.verify(key.sign(claims()))
    assert isinstance(principal, Principal)
    assert principal.subject == "alice"
    assert principal.issuer == ISSUER
    assert principal.roles == frozenset({"radiologist"})
    assert principal.expires_at == NOW + 300
    assert principal.token_id == "token-1"
    assert principal.mfa is False


async def test_default_algorithms(env: Env, keyring: dict[str, TestKey]) -> None:
    # The config default: RS256, PS256, ES256, EdDSA.
    settings = IdentitySettings.model_validate(
        {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(env.jwks_path)}
    )
    write_jwks(env.jwks_path, jwks_of(*keyring.values()))
    verifier = TokenVerifier(settings, JwksFileSource(env.jwks_path), clock=env.clock)
    await verifier.start()
    try:
        for name in ("RS256", "PS256", "ES256", "EdDSA"):
            await verifier.verify(keyring[name].sign(claims()))
        err = await rejected(verifier, keyring["ES384"].sign(claims()))
        assert err.description == "algorithm not accepted"
    finally:
        await verifier.aclose()


@pytest.mark.parametrize("alg", ["RS256", "RS512", "PS256", "PS384"])
async def test_rsa_jwk_without_alg_verifies_any_rsa_algorithm(env: Env, alg: str) -> None:
    # pyjwt binds a PyJWK to one algorithm (RS256 by default for RSA); we bind it to the
    # token's algorithm when the JWK does not name one.
    key = TestKey.generate("RS256", kid="rsa-no-alg", jwk_alg=False)
    verifier = await env.verifier(key)
    assert (await verifier.verify(key.sign(claims(), alg=alg))).subject == "alice"


async def test_ec_and_okp_jwk_without_alg(env: Env) -> None:
    ec_key = TestKey.generate("ES384", kid="ec", jwk_alg=False)
    ed_key = TestKey.generate("EdDSA", kid="ed", jwk_alg=False)
    verifier = await env.verifier(ec_key, ed_key)
    await verifier.verify(ec_key.sign(claims()))
    await verifier.verify(ed_key.sign(claims()))
    # The curve decides: a P-384 key cannot verify ES256 or ES512.
    err = await rejected(verifier, TestKey.generate("ES256").sign(claims(), kid="ec"))
    assert err.description == "signing key does not fit the token algorithm"


async def test_jwk_alg_must_equal_token_alg(env: Env) -> None:
    key = TestKey.generate("RS256", kid="rs-only")
    verifier = await env.verifier(key)
    # Same RSA key, valid PS256 signature, but the JWK says RS256 only.
    err = await rejected(verifier, key.sign(claims(), alg="PS256"))
    assert err.description == "signing key does not fit the token algorithm"


async def test_audience_list_and_several_accepted_audiences(
    env: Env, keyring: dict[str, TestKey]
) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, audience=["other", AUDIENCE])
    await verifier.verify(key.sign(claims(aud=["pacs", AUDIENCE])))
    await verifier.verify(key.sign(claims(aud="other")))


# -- time ------------------------------------------------------------------------------


async def test_expired(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, leeway_seconds=30)
    err = await rejected(verifier, key.sign(claims(exp=int(NOW) - 31)))
    assert err.description == "token expired"
    assert err.www_authenticate() == (
        'Bearer realm="casb", error="invalid_token", error_description="token expired"'
    )


async def test_leeway_honoured(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, leeway_seconds=30)
    await verifier.verify(key.sign(claims(exp=int(NOW) - 29)))
    await verifier.verify(key.sign(claims(nbf=int(NOW) + 29)))
    await verifier.verify(key.sign(claims(iat=int(NOW) + 29)))
    strict = await env.verifier(key, leeway_seconds=0)
    assert (await rejected(strict, key.sign(claims(exp=int(NOW))))).description == "token expired"
    assert (await rejected(strict, key.sign(claims(nbf=int(NOW) + 1)))).description == (
        "token not yet valid"
    )


async def test_not_yet_valid(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, leeway_seconds=30)
    err = await rejected(verifier, key.sign(claims(nbf=int(NOW) + 31)))
    assert err.description == "token not yet valid"
    err = await rejected(verifier, key.sign(claims(iat=int(NOW) + 31, nbf=DROP)))
    assert err.description == "token not yet valid"


async def test_clock_moves(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, leeway_seconds=0, token_cache_size=0)
    token = key.sign(claims(nbf=int(NOW) + 100, iat=int(NOW), exp=int(NOW) + 200))
    assert (await rejected(verifier, token)).description == "token not yet valid"
    env.clock.now = NOW + 150
    await verifier.verify(token)
    env.clock.now = NOW + 200
    assert (await rejected(verifier, token)).description == "token expired"


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1700000000", True, [1], {"a": 1}])
async def test_time_claims_must_be_numbers(
    env: Env, keyring: dict[str, TestKey], name: str, value: Any
) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key)
    err = await rejected(verifier, key.sign(claims(**{name: value})))
    assert err.description == f"claim '{name}' must be a number"


async def test_infinite_exp_refused(env: Env, keyring: dict[str, TestKey]) -> None:
    # json accepts the non-standard literal Infinity; a token must not live forever.
    key = keyring["ES256"]
    verifier = await env.verifier(key)
    token = key.sign(claims(exp=float("inf")))
    assert (await rejected(verifier, token)).description == "claim 'exp' must be a number"


# -- issuer, audience, required claims -------------------------------------------------

SENTINEL_SUB = "SENTINEL-SUBJECT-7f3a"
SENTINEL_ISS = "https://SENTINEL-ISSUER-9c1d.example"


async def test_wrong_issuer(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["RS256"]
    verifier = await env.verifier(key)
    err = await rejected(verifier, key.sign(claims(iss=SENTINEL_ISS, sub=SENTINEL_SUB)))
    assert err.description == "issuer not accepted"


async def test_wrong_audience(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["RS256"]
    verifier = await env.verifier(key)
    for aud in ("SENTINEL-AUD", ["a", "b"], 42, [42]):
        err = await rejected(verifier, key.sign(claims(aud=aud)))
        assert err.description == "audience not accepted"


@pytest.mark.parametrize("name", ["exp", "sub", "iat", "iss", "aud"])
async def test_missing_required_claim(env: Env, keyring: dict[str, TestKey], name: str) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key)
    err = await rejected(verifier, key.sign(claims(**{name: DROP})))
    assert err.description == f"missing required claim '{name}'"


async def test_required_claims_configurable(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, required_claims=["exp", "sub", "jti"])
    await verifier.verify(key.sign(claims(iat=DROP)))
    err = await rejected(verifier, key.sign(claims(jti=DROP)))
    assert err.description == "missing required claim 'jti'"


async def test_sub_always_needed_for_a_principal(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, required_claims=["exp"])
    err = await rejected(verifier, key.sign(claims(sub=DROP)))
    assert err.description == "missing required claim 'sub'"
    for bad in ("", 123, ["alice"]):
        err = await rejected(verifier, key.sign(claims(sub=bad)))
        assert err.description == "claim 'sub' must be a non-empty string"


async def test_token_without_exp_accepted_when_allowed_but_not_cached(
    env: Env, keyring: dict[str, TestKey]
) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, required_claims=["sub"], max_token_lifetime_seconds=None)
    token = key.sign(claims(exp=DROP))
    first = await verifier.verify(token)
    assert first.expires_at is None
    assert verifier.cached_tokens == 0


# -- attacks and garbage ---------------------------------------------------------------


async def test_alg_none_rejected(env: Env, keyring: dict[str, TestKey]) -> None:
    verifier = await env.verifier(*keyring.values())
    for token in (unsigned_token(claims()), unsigned_token(claims(), kid="rs256")):
        assert (await rejected(verifier, token)).description == "algorithm not accepted"
    # Variants of the name.
    for alg in ("None", "NONE", "nOnE", ""):
        header = b64url(json.dumps({"alg": alg, "kid": "rs256"}).encode())
        body = b64url(json.dumps(claims()).encode())
        err = await rejected(verifier, f"{header}.{body}.")
        assert err.description == "algorithm not accepted"


async def test_hs256_with_rsa_public_key_as_secret_rejected(
    env: Env, keyring: dict[str, TestKey]
) -> None:
    """The classic algorithm confusion: HMAC keyed with the (public) RSA key PEM."""
    rsa_key = keyring["RS256"]
    verifier = await env.verifier(rsa_key)
    for alg in ("HS256", "HS384", "HS512"):
        token = hmac_token(claims(), rsa_key.public_pem(), alg=alg, kid=rsa_key.kid)
        assert (await rejected(verifier, token)).description == "algorithm not accepted"
    # Also with the JWK's JSON as the secret, and without a kid.
    token = hmac_token(claims(), json.dumps(rsa_key.public_jwk).encode())
    assert (await rejected(verifier, token)).description == "algorithm not accepted"


async def test_symmetric_algorithms_refused_even_if_settings_are_bypassed(
    env: Env, keyring: dict[str, TestKey]
) -> None:
    rsa_key = keyring["RS256"]
    write_jwks(env.jwks_path, jwks_of(rsa_key))
    # model_copy(update=...) skips validation, as a buggy caller might.
    settings = env.settings().model_copy(update={"algorithms": ["HS256", "none", "RS256"]})
    verifier = TokenVerifier(settings, JwksFileSource(env.jwks_path), clock=env.clock)
    await verifier.start()
    try:
        token = hmac_token(claims(), rsa_key.public_pem(), kid=rsa_key.kid)
        assert (await rejected(verifier, token)).description == "algorithm not accepted"
        assert (await rejected(verifier, unsigned_token(claims()))).description == (
            "algorithm not accepted"
        )
        await verifier.verify(rsa_key.sign(claims()))
    finally:
        await verifier.aclose()


async def test_tampered_payload(env: Env, keyring: dict[str, TestKey]) -> None:
    for name in ("RS256", "ES256", "EdDSA"):
        key = keyring[name]
        verifier = await env.verifier(key)
        header, _, signature = key.sign(claims()).split(".")
        forged = b64url(json.dumps(claims(roles=["admin"])).encode())
        err = await rejected(verifier, f"{header}.{forged}.{signature}")
        assert err.description == "signature verification failed"


async def test_tampered_signature_and_header(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["RS256"]
    verifier = await env.verifier(key)
    header, payload, signature = key.sign(claims()).split(".")
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    err = await rejected(verifier, f"{header}.{payload}.{flipped}")
    assert err.description == "signature verification failed"
    err = await rejected(verifier, f"{header}.{payload}.")
    assert err.description == "signature verification failed"
    # A header edited to add a claim the signature does not cover.
    new_header = b64url(json.dumps({"alg": "RS256", "kid": key.kid, "typ": "x"}).encode())
    err = await rejected(verifier, f"{new_header}.{payload}.{signature}")
    assert err.description == "signature verification failed"


async def test_signed_by_a_key_not_in_the_set(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["RS256"]
    verifier = await env.verifier(key)
    impostor = TestKey.generate("RS256", kid=key.kid)
    err = await rejected(verifier, impostor.sign(claims()))
    assert err.description == "signature verification failed"


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "!!!.###.$$$",
        "eyJhbGciOiJSUzI1NiJ9",
        "...",
        b64url(b"not json") + ".e30.c2ln",
        b64url(b"[1,2]") + ".e30.c2ln",
        b64url(b'{"alg":"RS256","kid":7}') + ".e30.c2ln",
        b64url(b'{"alg":"RS256","crit":["exp"]}') + ".e30.c2ln",
        b64url(b'{"alg":"RS256","b64":false,"crit":["b64"]}') + ".e30.c2ln",
        "x" * 5000,
    ],
)
async def test_garbage(env: Env, keyring: dict[str, TestKey], token: str) -> None:
    verifier = await env.verifier(*keyring.values())
    assert (await rejected(verifier, token)).description == "malformed token"


async def test_signed_garbage_payload(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key)
    for payload in (b"not json", b"[1,2,3]", b'"a string"'):
        token = PyJWS().encode(
            payload, key.private_key, algorithm="ES256", headers={"kid": key.kid}
        )
        assert (await rejected(verifier, token)).description == "malformed token"


async def test_token_too_large(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, max_token_bytes=512)
    token = key.sign(claims(padding="x" * 600))
    assert (await rejected(verifier, token)).description == "token too large"


async def test_error_descriptions_never_contain_claim_values(
    env: Env, keyring: dict[str, TestKey]
) -> None:
    key = keyring["RS256"]
    verifier = await env.verifier(key, leeway_seconds=0)
    base = {"sub": SENTINEL_SUB, "jti": SENTINEL_SUB, "roles": [SENTINEL_SUB]}
    tokens = [
        key.sign(claims(**base, iss=SENTINEL_ISS)),
        key.sign(claims(**base, aud=SENTINEL_ISS)),
        key.sign(claims(**base, exp=int(NOW) - 5)),
        key.sign(claims(**base, nbf=int(NOW) + 500)),
        key.sign(claims(**base, iat=DROP)),
        key.sign(claims(**base, exp=SENTINEL_SUB)),
        key.sign(claims(**{**base, "sub": [SENTINEL_SUB]})),
        key.sign(claims(**base), kid=SENTINEL_SUB),
        key.sign(claims(**base), headers={"alg": "PS256"}),
        TestKey.generate("RS256", kid=key.kid).sign(claims(**base, iss=SENTINEL_ISS)),
        hmac_token(claims(**base, iss=SENTINEL_ISS), key.public_pem(), kid=SENTINEL_SUB),
    ]
    for token in tokens:
        err = await rejected(verifier, token)
        for text in (err.description, err.www_authenticate(), str(err), repr(err)):
            assert SENTINEL_SUB not in text
            assert SENTINEL_ISS not in text
            assert "SENTINEL" not in text


# -- key selection ---------------------------------------------------------------------


async def test_token_without_kid_single_key(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, keyring["RS256"])  # only one key fits ES256
    assert (await verifier.verify(key.sign(claims(), kid=False))).subject == "alice"


async def test_token_without_kid_several_keys(env: Env) -> None:
    one, two = TestKey.generate("ES256", kid="one"), TestKey.generate("ES256", kid="two")
    verifier = await env.verifier(one, two)
    err = await rejected(verifier, one.sign(claims(), kid=False))
    assert err.description == "token has no 'kid' and several keys fit"


async def test_unknown_kid(env: Env, keyring: dict[str, TestKey]) -> None:
    verifier = await env.verifier(keyring["RS256"])
    token = keyring["RS256"].sign(claims(), kid="no-such-key")
    assert (await rejected(verifier, token)).description == "unknown signing key"


async def test_duplicate_kid_picks_the_key_that_fits(env: Env) -> None:
    rsa_key = TestKey.generate("RS256", kid="shared")
    ec_key = TestKey.generate("ES256", kid="shared")
    verifier = await env.verifier(rsa_key, ec_key)
    await verifier.verify(rsa_key.sign(claims()))
    await verifier.verify(ec_key.sign(claims()))


@pytest.mark.parametrize(
    "change",
    [
        {"use": "enc"},
        {"key_ops": ["encrypt"]},
        {"key_ops": "verify"},
        {"alg": "RS512"},
        {"kty": "oct"},
    ],
)
async def test_unusable_jwk_is_skipped(env: Env, change: dict[str, Any]) -> None:
    key = TestKey.generate("RS256", kid="k")
    verifier = await env.verifier(jwks={"keys": [{**key.public_jwk, **change}]})
    err = await rejected(verifier, key.sign(claims()))
    assert err.description == "signing key does not fit the token algorithm"


async def test_use_sig_and_key_ops_verify_accepted(env: Env) -> None:
    key = TestKey.generate("RS256", kid="k")
    verifier = await env.verifier(jwks={"keys": [{**key.public_jwk, "key_ops": ["verify"]}]})
    await verifier.verify(key.sign(claims()))


async def test_published_private_key_is_not_used(env: Env) -> None:
    key = TestKey.generate("ES256", kid="leaked")
    private_jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.private_key, as_dict=True)
    verifier = await env.verifier(jwks={"keys": [{**private_jwk, "kid": "leaked"}]})
    err = await rejected(verifier, key.sign(claims()))
    assert err.description == "signing key does not fit the token algorithm"


async def test_weak_rsa_key_is_not_used(env: Env) -> None:
    key = TestKey.generate("RS256", kid="weak", rsa_bits=1024)
    verifier = await env.verifier(key)
    with pytest.warns(jwt.InsecureKeyLengthWarning):
        token = key.sign(claims())
    err = await rejected(verifier, token)
    assert err.description == "signing key does not fit the token algorithm"


async def test_malformed_jwk_is_skipped(env: Env) -> None:
    good = TestKey.generate("ES256", kid="k")
    broken = {**good.public_jwk, "x": "AAAA"}
    verifier = await env.verifier(jwks={"keys": [broken, "junk", 7]})
    err = await rejected(verifier, good.sign(claims()))
    assert err.description == "signing key does not fit the token algorithm"


# -- principal -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles_claim", "extra", "expected"),
    [
        ("roles", {"roles": ["a", "b"]}, {"a", "b"}),
        ("roles", {"roles": "a b  c"}, {"a", "b", "c"}),
        ("roles", {"roles": "a,b, c"}, {"a", "b", "c"}),
        ("roles", {"roles": ["a", 1, None, {"x": "y"}, ["b"], ""]}, {"a"}),
        ("roles", {"roles": DROP}, set()),
        ("roles", {"roles": 42}, set()),
        ("roles", {"roles": {"a": True}}, set()),
        (
            "realm_access.roles",
            {"roles": DROP, "realm_access": {"roles": ["radiologist", "x"]}},
            {"radiologist", "x"},
        ),
        ("realm_access.roles", {"realm_access": ["radiologist"]}, set()),
        ("realm_access.roles", {"realm_access": {}}, set()),
        ("resource_access.casb.roles", {"resource_access": {"casb": {"roles": ["r"]}}}, {"r"}),
        (
            "groups",
            {"groups": ["/hospital/radiology", "physicians"]},
            {"/hospital/radiology", "physicians"},
        ),
        ("groups", {"groups": "physicians"}, {"physicians"}),
        ("https://example.org/roles", {"https://example.org/roles": ["ns"]}, {"ns"}),
    ],
)
async def test_roles(
    env: Env,
    keyring: dict[str, TestKey],
    roles_claim: str,
    extra: dict[str, Any],
    expected: set[str],
) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, roles_claim=roles_claim)
    principal = await verifier.verify(key.sign(claims(**extra)))
    assert principal.roles == frozenset(expected)


@pytest.mark.parametrize(
    ("extra", "mfa"),
    [
        ({"amr": ["pwd", "mfa"]}, True),
        ({"amr": ["pwd", "otp"]}, True),
        ({"amr": ["hwk"]}, True),
        ({"amr": ["pwd"]}, False),
        ({"amr": "otp"}, True),
        ({"amr": "pwd"}, False),
        ({"amr": [1, None]}, False),
        ({}, False),
        ({"acr": "urn:hospital:loa:3"}, True),
        ({"acr": "urn:hospital:loa:1"}, False),
        ({"acr": ["urn:hospital:loa:3"]}, False),
        ({"amr": ["pwd"], "acr": "urn:hospital:loa:3"}, True),
    ],
)
async def test_mfa(env: Env, keyring: dict[str, TestKey], extra: dict[str, Any], mfa: bool) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, mfa={"acr_values": ["urn:hospital:loa:3"]})
    assert (await verifier.verify(key.sign(claims(**extra)))).mfa is mfa


async def test_mfa_values_configurable(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, mfa={"amr_values": ["hwk"]})
    assert (await verifier.verify(key.sign(claims(amr=["otp"])))).mfa is False
    assert (await verifier.verify(key.sign(claims(amr=["hwk"])))).mfa is True


async def test_claims_are_a_read_only_copy(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key)
    principal = await verifier.verify(
        key.sign(
            claims(department="radiology", realm_access={"roles": ["a"]}, sites=["x", {"y": 1}])
        )
    )
    assert isinstance(principal.claims, MappingProxyType)
    assert principal.claims["department"] == "radiology"
    assert principal.claims["sub"] == "alice"
    with pytest.raises(TypeError):
        principal.claims["sub"] = "mallory"  # type: ignore[index]
    with pytest.raises(TypeError):
        principal.claims["realm_access"]["roles"] = ["admin"]
    assert principal.claims["sites"] == ("x", MappingProxyType({"y": 1}))
    assert principal.token_id == "token-1"


async def test_non_string_jti(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key)
    err = await rejected(verifier, key.sign(claims(jti=12)))
    assert err.description == "claim 'jti' must be a string"
    assert (await verifier.verify(key.sign(claims(jti=DROP)))).token_id is None


# -- cache -----------------------------------------------------------------------------


async def test_cache_hit_returns_the_same_principal(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["RS256"]
    verifier = await env.verifier(key)
    token = key.sign(claims())
    first = await verifier.verify(token)
    assert verifier.cached_tokens == 1
    assert await verifier.verify(token) is first


async def test_cache_hit_is_cheap(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["RS256"]
    verifier = await env.verifier(key)
    token = key.sign(claims())
    await verifier.verify(token)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        await verifier.verify(token)
    per_hit = (time.perf_counter() - start) / n
    # ~1 µs on a laptop; the bound is loose for slow CI machines, and still far below one
    # RSA verification (tens of µs) so it proves no pyjwt call happens.
    assert per_hit < 20e-6, f"{per_hit * 1e6:.2f} µs per cache hit"


async def test_cache_hit_expires_without_leeway(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, leeway_seconds=30)
    token = key.sign(claims(exp=int(NOW) + 60))
    first = await verifier.verify(token)
    env.clock.now = NOW + 59.9
    assert await verifier.verify(token) is first
    env.clock.now = NOW + 60
    # Past exp: not from the cache; a full verification still accepts it within leeway,
    # and does not cache it.
    second = await verifier.verify(token)
    assert second is not first
    assert verifier.cached_tokens == 0
    env.clock.now = NOW + 90
    assert (await rejected(verifier, token)).description == "token expired"


async def test_failures_are_not_cached(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key)
    token = key.sign(claims(nbf=int(NOW) + 100))
    await rejected(verifier, token)
    assert verifier.cached_tokens == 0
    env.clock.now = NOW + 100
    await verifier.verify(token)
    assert verifier.cached_tokens == 1


async def test_cache_is_an_lru_of_bounded_size(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, token_cache_size=2)
    t1, t2, t3 = (key.sign(claims(jti=f"t{i}")) for i in range(3))
    p1 = await verifier.verify(t1)
    p2 = await verifier.verify(t2)
    assert await verifier.verify(t1) is p1  # t1 is now the most recently used
    await verifier.verify(t3)  # evicts t2
    assert verifier.cached_tokens == 2
    assert await verifier.verify(t1) is p1
    assert await verifier.verify(t2) is not p2


async def test_cache_disabled(env: Env, keyring: dict[str, TestKey]) -> None:
    key = keyring["ES256"]
    verifier = await env.verifier(key, token_cache_size=0)
    token = key.sign(claims())
    assert await verifier.verify(token) is not await verifier.verify(token)
    assert verifier.cached_tokens == 0


# -- file source -----------------------------------------------------------------------


async def test_file_source_rotation_and_removal(env: Env) -> None:
    old, new = TestKey.generate("ES256", kid="old"), TestKey.generate("ES256", kid="new")
    verifier = await env.verifier(old)
    source = verifier.source
    old_token = old.sign(claims())
    first = await verifier.verify(old_token)
    assert source.version == 1

    # Rotation: the unknown kid makes the file source look at the file again.
    write_jwks(env.jwks_path, jwks_of(old, new))
    assert (await verifier.verify(new.sign(claims()))).subject == "alice"
    assert source.version == 2
    assert verifier.cached_tokens == 1  # the cache was dropped at the version change
    assert await verifier.verify(old_token) is not first

    # Removal of a (compromised) key: effective at the next refresh, even for a token
    # that was verified and cached before.
    write_jwks(env.jwks_path, jwks_of(new))
    assert await source.refresh() is True
    assert (await rejected(verifier, old_token)).description == "unknown signing key"


async def test_file_source_broken_file_keeps_the_good_set(env: Env) -> None:
    key = TestKey.generate("ES256", kid="k")
    verifier = await env.verifier(key)
    source = verifier.source
    assert isinstance(source, JwksFileSource)
    for broken in ("{not json", "[]", '{"keys": []}', '{"keys": "x"}', ""):
        env.jwks_path.write_text(broken)
        assert await source.refresh() is False
        assert source.last_error is not None
        assert source.version == 1
        await verifier.verify(key.sign(claims()))
    env.jwks_path.unlink()
    assert await source.refresh() is False
    assert source.last_error is not None
    await verifier.verify(key.sign(claims()))
    write_jwks(env.jwks_path, jwks_of(key))
    await source.refresh()
    assert source.last_error is None
    assert source.last_success is not None


async def test_file_source_unchanged_file_is_not_a_new_version(env: Env) -> None:
    key = TestKey.generate("ES256", kid="k")
    other = TestKey.generate("ES256", kid="other")
    verifier = await env.verifier(key, other)
    write_jwks(env.jwks_path, {"keys": [other.public_jwk, key.public_jwk]})  # order only
    assert await verifier.source.refresh() is False
    assert verifier.source.version == 1


@pytest.mark.parametrize("content", [None, "{broken", '{"keys": []}'])
async def test_file_source_missing_or_broken_at_start(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    source = JwksFileSource(path)
    with pytest.raises(IdentityUnavailable):
        await source.start()
    assert not source.ready
    with pytest.raises(IdentityUnavailable):
        await source.get_keys()


async def test_verify_without_any_key_set(tmp_path: Path) -> None:
    settings = IdentitySettings.model_validate(
        {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(tmp_path / "missing.json")}
    )
    verifier = build_verifier(settings)
    assert not verifier.ready
    token = TestKey.generate("ES256").sign(claims())
    with pytest.raises(IdentityUnavailable):
        await verifier.verify(token)


async def test_file_source_background_poll(env: Env) -> None:
    old, new = TestKey.generate("ES256", kid="old"), TestKey.generate("ES256", kid="new")
    write_jwks(env.jwks_path, jwks_of(old))
    source = JwksFileSource(env.jwks_path, poll_seconds=0.01)
    await source.start()
    try:
        assert source.ready and source.version == 1
        write_jwks(env.jwks_path, jwks_of(new))
        # The poll task reloads the file on its own.
        await asyncio.wait_for(source.wait_for_version(2), timeout=10)
        assert [k["kid"] for k in await source.get_keys()] == ["new"]
    finally:
        await source.aclose()


def test_build_verifier_picks_the_source(tmp_path: Path) -> None:
    file_settings = IdentitySettings.model_validate(
        {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_file": str(tmp_path / "j.json"),
            "jwks_refresh_seconds": 60,
        }
    )
    verifier = build_verifier(file_settings)
    assert isinstance(verifier.source, JwksFileSource)
    assert verifier.source.poll_seconds == 5.0
    url_settings = IdentitySettings.model_validate(
        {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_url": "https://idp.example/jwks",
            "jwks_refresh_seconds": 120,
            "jwks_min_refetch_seconds": 7,
        }
    )
    verifier = build_verifier(url_settings)
    assert isinstance(verifier.source, JwksUrlSource)
    assert verifier.source.refresh_seconds == 120
    assert verifier.source.min_refetch_seconds == 7


# -- dev keys --------------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state" / ".casb"


def test_ensure_dev_keys_creates_and_reuses(state_dir: Path) -> None:
    keys = ensure_dev_keys(state_dir)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(keys.private_key_path.stat().st_mode) == 0o600
    assert keys.private_key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    jwks = json.loads(keys.jwks_path.read_text())
    (jwk,) = jwks["keys"]
    assert jwk["kid"] == keys.kid
    assert jwk == {**jwk, "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig"}
    assert "d" not in jwk
    pem = keys.private_key_path.read_bytes()

    again = ensure_dev_keys(state_dir)
    assert again == keys
    assert keys.private_key_path.read_bytes() == pem
    assert [p.name for p in state_dir.iterdir() if p.name.startswith(".")] == []

    keys.jwks_path.unlink()  # a lost JWKS file is rebuilt from the key
    assert ensure_dev_keys(state_dir) == keys
    assert json.loads(keys.jwks_path.read_text()) == jwks


def test_dev_kid_is_the_rfc7638_thumbprint(state_dir: Path) -> None:
    import base64
    import hashlib

    keys = ensure_dev_keys(state_dir)
    jwk = json.loads(keys.jwks_path.read_text())["keys"][0]
    members = {"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]}
    required = json.dumps(members, separators=(",", ":"))  # already in lexicographic order
    digest = hashlib.sha256(required.encode()).digest()
    assert keys.kid == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_broken_dev_key_is_not_overwritten(state_dir: Path) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / "dev-signing-key.pem").write_text("not a key")
    with pytest.raises(ValueError, match="delete it"):
        ensure_dev_keys(state_dir)
    assert (state_dir / "dev-signing-key.pem").read_text() == "not a key"


def test_public_jwk_only_p256() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(ValueError):
        public_jwk(ec.generate_private_key(ec.SECP384R1()).public_key())


async def test_minted_dev_tokens_verify(state_dir: Path) -> None:
    keys = ensure_dev_keys(state_dir)
    settings = dev_identity_settings(keys)
    assert (settings.issuer, settings.audience, settings.jwks_file) == (
        "casb-dev",
        ["casb"],
        keys.jwks_path,
    )
    verifier = build_verifier(settings)
    await verifier.start()
    try:
        assert verifier.ready
        token = mint_token(keys, subject="dr-house", roles=["radiologist", "researcher"])
        principal = await verifier.verify(token)
        assert principal.subject == "dr-house"
        assert principal.roles == frozenset({"radiologist", "researcher"})
        assert principal.mfa is False
        assert principal.claims["amr"] == ("pwd",)
        assert jwt.get_unverified_header(token)["kid"] == keys.kid

        mfa = await verifier.verify(mint_token(keys, subject="a", roles=[], mfa=True))
        assert mfa.mfa is True and mfa.roles == frozenset()
        assert mfa.claims["amr"] == ("pwd", "mfa")

        extra = await verifier.verify(
            mint_token(
                keys,
                subject="a",
                roles=["x"],
                claims={"department": "cardiology", "roles": ["override"]},
            )
        )
        assert extra.claims["department"] == "cardiology"
        assert extra.roles == frozenset({"override"})

        token = mint_token(keys, subject="a", roles=[], ttl_seconds=60, now=time.time() - 3600)
        with pytest.raises(AuthenticationError, match="token expired"):
            await verifier.verify(token)
        with pytest.raises(AuthenticationError, match="issuer not accepted"):
            await verifier.verify(mint_token(keys, subject="a", roles=[], issuer="other"))
        with pytest.raises(AuthenticationError, match="audience not accepted"):
            await verifier.verify(mint_token(keys, subject="a", roles=[], audience="other"))
    finally:
        await verifier.aclose()


def test_mint_token_claims(state_dir: Path) -> None:
    keys = ensure_dev_keys(state_dir)
    token = mint_token(keys, subject="a", roles=["r"], ttl_seconds=120, now=NOW)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iat"] == payload["nbf"] == int(NOW)
    assert payload["exp"] == int(NOW) + 120
    assert payload["iss"] == "casb-dev" and payload["aud"] == "casb"
    assert len(payload["jti"]) == 36
    assert (
        payload["jti"]
        != jwt.decode(
            mint_token(keys, subject="a", roles=["r"], now=NOW), options={"verify_signature": False}
        )["jti"]
    )
    with pytest.raises(ValueError):
        mint_token(keys, subject="a", roles=[], ttl_seconds=0)


async def test_tokens_outliving_a_revocation_are_refused(
    env: Env, keyring: dict[str, TestKey]
) -> None:
    """A revocation lasts identity.max_token_lifetime_seconds: a token that could
    outlive it (or never expires) is refused."""
    key = keyring["ES256"]
    verifier = await env.verifier(key, required_claims=["sub"], max_token_lifetime_seconds=3600)
    now = int(NOW) - 10
    assert (await verifier.verify(key.sign(claims(iat=now, exp=now + 3600)))).subject
    too_long = await rejected(verifier, key.sign(claims(iat=now, exp=now + 7200)))
    assert too_long.description == "token lifetime exceeds the maximum this proxy accepts"
    endless = await rejected(verifier, key.sign(claims(exp=DROP)))
    assert endless.description == "token has no expiry (exp)"
