"""AWS Signature Version 4 for the requests the proxy sends to S3 destinations.

Clients never hold bucket credentials: the proxy drops whatever signature a client sent and
signs the request it forwards with the destination's own credentials. This module computes
that signature with hashlib/hmac alone (casb does not depend on botocore at runtime; the
tests hold it equal to botocore's ``S3SigV4Auth``).

What is signed, and why:

* ``host``, ``x-amz-date``, ``x-amz-content-sha256`` and (with temporary credentials)
  ``x-amz-security-token``: the values this module returns, which the caller SETS on the
  outgoing request after removing :data:`REPLACED_HEADERS` (the client's own copies);
* every other ``x-amz-*`` header (S3 refuses a request whose x-amz-* headers are unsigned),
  and ``content-type``, ``content-md5`` and ``range`` when present: headers that change
  what is stored or returned, so an intermediary cannot alter them.

The canonical URI is the path exactly as it goes on the wire. S3 does not normalise or
double-encode it, but it canonicalises what it receives (percent-decode, then encode every
byte but the RFC 3986 unreserved ones and "/"): a wire path in any other form would sign
differently than S3 checks. :func:`sign_s3` therefore refuses a path that is not already in
that form, and :func:`canonical_path` gives the form to put on the wire. The same goes for
the query: :func:`canonical_query` is both the signed string and a valid wire query.

Malformed input (control or non-ASCII characters in a signed header, a path not in
canonical form, a naive timestamp...) raises :class:`SigningError` with a short reason that
never quotes the value.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote, unquote_to_bytes

ALGORITHM: Final = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD: Final = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_PAYLOAD_TRAILER: Final = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()

# Headers the caller removes from the outgoing request before setting what sign_s3 returns:
# the client's signature and the values it signed with.
REPLACED_HEADERS: Final = (
    "authorization",
    "x-amz-date",
    "x-amz-content-sha256",
    "x-amz-security-token",
)
_SIGNED_PLAIN: Final = frozenset({"content-type", "content-md5", "range"})
_PAYLOAD_LITERALS: Final = frozenset({UNSIGNED_PAYLOAD, STREAMING_UNSIGNED_PAYLOAD_TRAILER})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field-name
_VALUE = re.compile(r"[\t\x20-\x7e]*")  # printable ASCII, space and tab
_SPACES = re.compile(r"[ \t]+")
_SCOPE_PART = re.compile(r"[A-Za-z0-9_.\-]+")
_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]_]+")
_PATH = re.compile(r"/(?:[A-Za-z0-9\-._~/]|%[0-9A-F]{2})*")
_UNRESERVED = "-_.~"  # with ASCII letters and digits, which quote never encodes


class SigningError(ValueError):
    """The request cannot be signed as given; ``reason`` is safe to show a client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def uri_encode(value: str) -> str:
    """RFC 3986 percent-encoding of UTF-8 bytes: everything but A-Z a-z 0-9 - _ . ~"""
    return quote(value, safe=_UNRESERVED)


def canonical_path(path: str) -> str:
    """The form S3 checks a signature against: percent-decoded, then every byte but the
    unreserved ones and "/" percent-encoded (upper-case hex). Idempotent."""
    if not path:
        return "/"
    return quote(unquote_to_bytes(path), safe="/" + _UNRESERVED)


def canonical_query(query: Sequence[tuple[str, str]]) -> str:
    """The canonical query string of decoded (name, value) pairs: each side RFC 3986
    encoded, pairs sorted by encoded name then encoded value, empty values kept as
    ``name=``. Also a valid wire query for the same pairs."""
    pairs = sorted((uri_encode(name), uri_encode(value)) for name, value in query)
    return "&".join(f"{name}={value}" for name, value in pairs)


def _canonical_headers(
    host: str, headers: Sequence[tuple[str, str]], own: Sequence[tuple[str, str]]
) -> tuple[str, str]:
    """(canonical header block, signed header list)."""
    values: dict[str, list[str]] = {"host": [host]}
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise SigningError("invalid header name")
        lname = name.lower()
        if lname == "host" or lname in REPLACED_HEADERS:
            continue
        if not (lname.startswith("x-amz-") or lname in _SIGNED_PLAIN):
            continue
        if not _VALUE.fullmatch(value):
            raise SigningError(f"header {lname} has characters that cannot be signed")
        values.setdefault(lname, []).append(_SPACES.sub(" ", value).strip(" "))
    for name, value in own:
        values[name] = [value]
    names = sorted(values)
    block = "".join(f"{name}:{','.join(values[name])}\n" for name in names)
    return block, ";".join(names)


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    """kSigning = HMAC chain over the date, region, service and "aws4_request"."""
    key = hmac.new(f"AWS4{secret_access_key}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _check_inputs(
    method: str,
    host: str,
    path: str,
    access_key_id: str,
    region: str,
    service: str,
    payload_hash: str,
    now: datetime,
    session_token: str | None,
) -> None:
    if not _TOKEN.fullmatch(method):
        raise SigningError("invalid method")
    if not _HOST.fullmatch(host):
        raise SigningError("invalid host")
    if not _PATH.fullmatch(path) or canonical_path(path) != path:
        raise SigningError("path is not in S3 canonical form")
    for part in (access_key_id, region, service):
        if not _SCOPE_PART.fullmatch(part):
            raise SigningError("invalid credential scope")
    if payload_hash not in _PAYLOAD_LITERALS and not _HEX64.fullmatch(payload_hash):
        raise SigningError("unsupported payload hash")
    if now.tzinfo is None or now.utcoffset() is None:
        raise SigningError("signing time must be timezone-aware")
    if session_token is not None and (not session_token or not _VALUE.fullmatch(session_token)):
        raise SigningError("invalid session token")


def sign_s3(
    method: str,
    host: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Sequence[tuple[str, str]],
    *,
    access_key_id: str,
    secret_access_key: str,
    region: str,
    payload_hash: str,
    now: datetime,
    session_token: str | None = None,
    service: str = "s3",
) -> list[tuple[str, str]]:
    """The headers to SET on the outgoing request (after removing
    :data:`REPLACED_HEADERS`): Authorization, X-Amz-Date, X-Amz-Content-Sha256 and, with
    a session token, X-Amz-Security-Token.

    ``host`` is the Host header value as sent; ``path`` the wire path, already in
    :func:`canonical_path` form; ``query`` the decoded (name, value) pairs of the wire
    query; ``headers`` the other headers of the outgoing request (the ones this module
    signs are picked out, see the module docstring). ``payload_hash`` is the hex SHA-256
    of the body, ``UNSIGNED-PAYLOAD`` or ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` (a
    signed-chunk body cannot be re-signed by anyone but its author: decode it first).
    """
    _check_inputs(
        method, host, path, access_key_id, region, service, payload_hash, now, session_token
    )
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    date = stamp[:8]
    own = [("x-amz-content-sha256", payload_hash), ("x-amz-date", stamp)]
    if session_token is not None:
        own.append(("x-amz-security-token", session_token))
    block, signed = _canonical_headers(host, headers, own)
    canonical_request = "\n".join(
        [method.upper(), path, canonical_query(query), block, signed, payload_hash]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = signing_key(secret_access_key, date, region, service)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    out = [
        ("Authorization", authorization),
        ("X-Amz-Date", stamp),
        ("X-Amz-Content-Sha256", payload_hash),
    ]
    if session_token is not None:
        out.append(("X-Amz-Security-Token", session_token))
    return out
