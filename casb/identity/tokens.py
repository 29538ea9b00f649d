"""Where the caller's token is: the `Authorization: Bearer` header (RFC 6750 §2.1) or,
when enabled, the `access_token` query parameter (§2.3).

The query form exists for viewers that cannot set headers on every request (OHIF loads
frames through plain URLs, OHIF/Viewers#1870). It leaks the token into URLs, so it is off
unless configured, and the edge strips it (`strip_query_token`) before forwarding.

Errors raised here carry descriptions that go back to the client: they never echo the
token or anything taken from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

QUERY_PARAM = "access_token"

# A compact JWS: three base64url segments (RFC 7515 §7.1). Some issuers pad with '='
# (pyjwt accepts that too). The signature may be empty so that an `alg: none` token
# reaches the verifier and is refused for its algorithm, with a clear reason.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*={0,2}")


class AuthenticationError(Exception):
    """The caller is not authenticated: HTTP 401 with a `WWW-Authenticate: Bearer` header.

    `code` is "" when no credentials were sent at all (RFC 6750 §3.1: no error attribute
    then), else "invalid_request" or "invalid_token". `description` is short and safe to
    return to the client: it never contains the token or a claim value.
    """

    def __init__(
        self, code: Literal["", "invalid_request", "invalid_token"], description: str
    ) -> None:
        super().__init__(description)
        self.code: str = code
        self.description: str = description

    def www_authenticate(self, realm: str = "casb") -> str:
        """The `WWW-Authenticate` header value for this error (RFC 6750 §3)."""
        parts = [f'realm="{_quote(realm)}"']
        if self.code:
            parts.append(f'error="{self.code}"')
            if self.description:
                parts.append(f'error_description="{_quote(self.description)}"')
        return "Bearer " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"AuthenticationError({self.code!r}, {self.description!r})"


def _quote(value: str) -> str:
    # RFC 6750 limits error_description to %x20-21 / %x23-5B / %x5D-7E: no '"' or '\'.
    return "".join(
        c if " " <= c <= "~" and c not in '"\\' else "'" if c == '"' else "?" for c in value
    )


def extract_token(
    headers: Iterable[tuple[str, str]],
    query: Sequence[tuple[str, str]],
    *,
    allow_query: bool,
    max_bytes: int,
) -> tuple[str, Literal["header", "query"]]:
    """Return the caller's token and where it came from, or raise AuthenticationError.

    `headers` are (name, value) pairs (names compared case-insensitively); `query` are
    the decoded query parameters in order.
    """
    authorization = [value for name, value in headers if name.lower() == "authorization"]
    query_tokens = [value for name, value in query if name == QUERY_PARAM]

    if query_tokens and not allow_query:
        raise AuthenticationError("invalid_request", "access_token query parameter is disabled")
    if len(authorization) > 1:
        raise AuthenticationError("invalid_request", "more than one Authorization header")
    if len(query_tokens) > 1:
        raise AuthenticationError(
            "invalid_request", "access_token query parameter given more than once"
        )
    if authorization and query_tokens:
        raise AuthenticationError(
            "invalid_request",
            "send the token in the Authorization header or the "
            "access_token query parameter, not both",
        )
    if not authorization and not query_tokens:
        raise AuthenticationError("", "no credentials")

    source: Literal["header", "query"]
    if authorization:
        source = "header"
        parts = authorization[0].strip().split(None, 1)
        if not parts:
            raise AuthenticationError("invalid_request", "empty Authorization header")
        if parts[0].lower() != "bearer":
            raise AuthenticationError("invalid_request", "expected a Bearer token")
        token = parts[1].strip() if len(parts) > 1 else ""
        if not token:
            raise AuthenticationError("invalid_request", "empty Bearer token")
    else:
        source = "query"
        token = query_tokens[0].strip()
        if not token:
            raise AuthenticationError("invalid_request", "empty access_token")

    # Size before shape: the shape check must not run over an arbitrarily long string.
    # A token that passes the shape check is ASCII, so characters count as bytes.
    if len(token) > max_bytes:
        raise AuthenticationError("invalid_token", "token too large")
    if not _COMPACT_JWS.fullmatch(token):
        raise AuthenticationError("invalid_token", "malformed token")
    return token, source


def strip_query_token(query: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The query parameters without `access_token`, for forwarding upstream."""
    return tuple((name, value) for name, value in query if name != QUERY_PARAM)
