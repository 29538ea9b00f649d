"""Identity: who is calling, from a bearer JWT.

    token, where = extract_token(headers, query, allow_query=..., max_bytes=...)
    verifier = build_verifier(settings.identity); await verifier.start()
    principal = await verifier.verify(token)

`AuthenticationError` -> 401 with `err.www_authenticate()`; `IdentityUnavailable` -> 503
(no key set could be obtained). Keys come from the IdP's JWKS URL or a JWKS file
(`keys`), with rotation, a rate-limited refetch for unknown `kid`s and stale-while-error.
`devkeys` makes and uses the dev signing key of `make run` / `casb token mint`.
"""

from casb.identity.devkeys import DevKeys, dev_identity_settings, ensure_dev_keys, mint_token
from casb.identity.keys import IdentityUnavailable, JwksFileSource, JwksUrlSource, KeySource
from casb.identity.tokens import AuthenticationError, extract_token, strip_query_token
from casb.identity.verifier import TokenVerifier, build_verifier

__all__ = [
    "AuthenticationError",
    "DevKeys",
    "IdentityUnavailable",
    "JwksFileSource",
    "JwksUrlSource",
    "KeySource",
    "TokenVerifier",
    "build_verifier",
    "dev_identity_settings",
    "ensure_dev_keys",
    "extract_token",
    "mint_token",
    "strip_query_token",
]
