"""One canonical reading of an HTTP request-target, or a refusal.

The proxy classifies the canonical form and forwards exactly that form
(`encode_target`), so an upstream that would read the raw target differently
(double decoding, dot segments, `;` parameters, `+` in paths, method overrides)
never sees anything but what was authorized. Anything ambiguous raises
`MalformedTarget`; its `reason` never quotes the input (URLs can carry PHI).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote_to_bytes

__all__ = [
    "MalformedTarget",
    "Target",
    "effective_method",
    "encode_target",
    "normalize_target",
]


@dataclass(frozen=True, slots=True)
class Target:
    """A request-target after normalization; `path` is "/" + "/".join(segments)."""

    path: str
    segments: tuple[str, ...]
    query: tuple[tuple[str, str], ...]


class MalformedTarget(ValueError):
    """The request cannot be read unambiguously. `reason` is safe to show a client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Raw path: controls (C0, DEL), space, backslash. '#' is checked on the whole target.
_RAW_PATH_BAD = re.compile(r"[\x00-\x20\x7f\\]")
# Raw query: controls and space (a decoded space comes from '+' or %20).
_RAW_QUERY_BAD = re.compile(r"[\x00-\x20\x7f]")
# A '%' not followed by two hex digits.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Decoded path: '%' (double encoding), controls (C0, DEL, C1), backslash.
_DECODED_PATH_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f%\\]")
# Decoded query: controls (C0, DEL, C1).
_DECODED_QUERY_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_OVERRIDE_HEADERS = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
_OVERRIDE_REASON = "method override headers are not accepted; send the real HTTP method"

# Re-encoding keeps only unreserved characters (quote's default) and ',' (frame and
# multi-value lists) literal; everything else is percent-encoded, so ';', '+', '%'
# and '/' inside a segment or value cannot be re-read differently upstream.
_SAFE = ","


def _decode(text: str, *, plus: bool, what: str) -> str:
    """Percent-decode once (optionally '+' as space); the bytes must be UTF-8."""
    if _BAD_ESCAPE.search(text):
        raise MalformedTarget(f"invalid percent-escape in the {what}")
    if plus:
        text = text.replace("+", " ")
    if text.isascii() and "%" not in text:
        return text
    try:
        return unquote_to_bytes(text.encode("utf-8", "surrogateescape")).decode("utf-8")
    except UnicodeError:
        raise MalformedTarget(f"the {what} is not valid UTF-8") from None


def _normalize_path(raw_path: str) -> tuple[str, ...]:
    if _RAW_PATH_BAD.search(raw_path):
        raise MalformedTarget("the path contains a control character, space or backslash")
    decoded = _decode(raw_path, plus=False, what="path")
    if _DECODED_PATH_BAD.search(decoded):
        raise MalformedTarget(
            "the path contains a double-encoded '%', a control character or a backslash"
        )
    # Empty segments (duplicate or trailing slashes) are dropped before dot segments
    # are resolved, so "/a//../b" is "/b".
    out: list[str] = []
    for seg in decoded.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not out:
                raise MalformedTarget("the path climbs above the root")
            out.pop()
        else:
            out.append(seg)
    return tuple(out)


def _normalize_query(raw_query: str) -> tuple[tuple[str, str], ...]:
    if _RAW_QUERY_BAD.search(raw_query):
        raise MalformedTarget("the query contains a control character or space")
    pairs: list[tuple[str, str]] = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        pair = (_decode(name, plus=True, what="query"), _decode(value, plus=True, what="query"))
        if _DECODED_QUERY_BAD.search(pair[0]) or _DECODED_QUERY_BAD.search(pair[1]):
            raise MalformedTarget("the query contains a control character")
        pairs.append(pair)
    return tuple(pairs)


def _byte_length(raw: str) -> int:
    try:
        return len(raw.encode("utf-8", "surrogateescape"))
    except UnicodeError:  # a surrogate that no byte decodes to
        raise MalformedTarget("the request target is not valid UTF-8") from None


def normalize_target(raw: str, *, max_bytes: int = 8192) -> Target:
    """Read an origin-form request-target ("/a/b?x=1") into its canonical `Target`.

    `raw` is a str decoded with utf-8/surrogateescape (as mitmproxy gives it).
    """
    if len(raw) > max_bytes or (not raw.isascii() and _byte_length(raw) > max_bytes):
        raise MalformedTarget(f"the request target is longer than {max_bytes} bytes")
    if not raw.startswith("/"):
        raise MalformedTarget("the request target must be a path starting with '/'")
    if "#" in raw:
        raise MalformedTarget("the request target must not contain a fragment")
    raw_path, _, raw_query = raw.partition("?")
    segments = _normalize_path(raw_path)
    return Target(
        path="/" + "/".join(segments),
        segments=segments,
        query=_normalize_query(raw_query),
    )


def encode_target(path_segments: Sequence[str], query: Sequence[tuple[str, str]]) -> str:
    """Canonical request-target for decoded segments and query pairs ("/a/b?x=1").

    Raises ValueError for a segment that is empty, "." or ".." or holds "/": such a
    segment has no unambiguous encoding (and never comes out of normalize_target).
    """
    for seg in path_segments:
        if seg in ("", ".", "..") or "/" in seg:
            raise ValueError("a path segment must be non-empty, not a dot segment, no '/'")
    path = "/" + "/".join(quote(seg, safe=_SAFE) for seg in path_segments)
    if not query:
        return path
    return (
        path
        + "?"
        + "&".join(
            f"{quote_plus(name, safe=_SAFE)}={quote_plus(value, safe=_SAFE)}"
            for name, value in query
        )
    )


def effective_method(
    method: str, headers: Iterable[tuple[str, str]], query: Sequence[tuple[str, str]]
) -> str:
    """The method to classify: upper-cased, HEAD read as GET; overrides are refused."""
    for name, _ in headers:
        if name.lower() in _OVERRIDE_HEADERS:
            raise MalformedTarget(_OVERRIDE_REASON)
    for name, _ in query:
        if name.lower() == "_method":
            raise MalformedTarget(_OVERRIDE_REASON)
    upper = method.upper()
    return "GET" if upper == "HEAD" else upper
