"""`casb token revoke`: revoke one token, or every token of a subject issued before a time.

    casb token revoke --jti ID [--expires TIME]
    casb token revoke --sub SUBJECT [--before TIME] [--expires TIME]

The revocation goes to the shared state store (`state.url`), where every replica
enforces it within a second. With `memory://` there is nothing shared to write to (each
proxy process keeps its own state), so the command refuses (exit 2).

A revocation only needs to live as long as the tokens it revokes: `--expires` defaults
to `identity.max_token_lifetime_seconds` (24 h unless configured) after now, or after
`--before` if that is later. The proxy refuses tokens that live longer (and tokens with
no `exp`), so the revocation outlives every token it covers. With
`max_token_lifetime_seconds: null` the default is 24 h: give `--expires` then.

TIME is ISO 8601 with an offset (2024-05-01T12:00:00Z) or epoch seconds. Nothing of the
token is printed, and the subject only as a hash prefix (output ends up in logs).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import sys
import time
from datetime import UTC, datetime

from casb.config import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# How long a revocation lives when --expires is not given and the identity settings
# set no maximum token lifetime (max_token_lifetime_seconds: null).
DEFAULT_TOKEN_LIFETIME = 24 * 3600.0


def token_lifetime(settings: Settings) -> float:
    """The longest a token the proxy accepts can live (identity.max_token_lifetime_seconds;
    dev settings fill in identity, whose default is 24 h)."""
    identity = settings.identity
    longest = identity.max_token_lifetime_seconds if identity is not None else None
    return float(longest) if longest is not None else DEFAULT_TOKEN_LIFETIME


_EPOCH = re.compile(r"^\d{1,12}(\.\d+)?$")


class _Usage(Exception):
    pass


def parse_time(text: str) -> float:
    """Epoch seconds from ISO 8601 with an offset, or from epoch seconds. A time without
    an offset is refused: which zone it meant cannot be known."""
    text = text.strip()
    if _EPOCH.match(text):
        return float(text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _Usage(
            f"{text!r} is not a time: give ISO 8601 with an offset "
            "(2024-05-01T12:00:00Z) or epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        raise _Usage(f"{text!r} has no UTC offset: add Z or +HH:MM")
    return parsed.timestamp()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def subject_label(subject: str) -> str:
    """How the subject is named in output: a hash prefix (subjects are identifiers)."""
    return "sha256:" + hashlib.sha256(subject.encode()).hexdigest()[:16]


def add_revoke_command(tsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `casb token revoke` under the `casb token` subcommands."""
    p = tsub.add_parser(
        "revoke",
        help="revoke a token, or a subject's tokens, on every replica",
        description="Revoke one token (--jti) or every token of a subject issued before a "
        "time (--sub, --before; default now) in the shared state store: every replica "
        "refuses it within a second (401 token_revoked). Needs a shared store "
        "(state.url redis://...). TIME: ISO 8601 with an offset, or epoch seconds.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti", metavar="ID", help="the token's id (its jti claim)")
    which.add_argument("--sub", metavar="SUBJECT", help="the subject (sub claim) whose tokens")
    p.add_argument(
        "--before",
        metavar="TIME",
        help="with --sub: revoke the tokens issued before this time (default now)",
    )
    p.add_argument(
        "--expires",
        metavar="TIME",
        help="when the revocation may be forgotten: once the tokens it revokes have expired "
        "(default: identity.max_token_lifetime_seconds after now, or after --before if later)",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="casb.yaml naming the state store")
    p.set_defaults(func=cmd_token_revoke)


def cmd_token_revoke(args: argparse.Namespace) -> int:
    try:
        return _revoke(args)
    except (_Usage, ConfigError) as exc:
        print(f"casb: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _revoke(args: argparse.Namespace, now: float | None = None) -> int:
    from casb.state.store import StateUnavailable

    now = time.time() if now is None else now
    if args.before is not None and args.sub is None:
        raise _Usage("--before goes with --sub (a --jti names one token)")
    if args.jti is not None and not args.jti.strip():
        raise _Usage("--jti: empty token id")
    if args.sub is not None and not args.sub:
        raise _Usage("--sub: empty subject")
    before = now if args.before is None else parse_time(args.before)
    settings = load_settings(args.config)
    if args.expires is not None:
        expires = parse_time(args.expires)
    else:
        # identity.max_token_lifetime_seconds: the proxy refuses tokens living longer, so
        # the revocation outlives every token it covers (before is now for --jti)
        expires = max(now, before) + token_lifetime(settings)
    if expires <= now:
        raise _Usage(f"--expires {iso(expires)} has passed: the tokens have expired already")

    scheme = settings.state.url.split("://", 1)[0].lower()
    if scheme == "memory":
        raise _Usage(
            "state.url is memory://: each proxy process keeps its own state there, so a "
            "revocation cannot reach it; revocation needs a shared store (state.url: "
            "redis://, rediss:// or redis+sentinel://)"
        )
    try:
        asyncio.run(_write(settings, args.jti, args.sub, before, expires))
    except StateUnavailable as exc:
        print(f"casb: error: the state store cannot be reached: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.sub is None:
        print(f"revoked token jti={args.jti}; the revocation lasts until {iso(expires)}")
    else:
        print(
            f"revoked every token of subject {subject_label(args.sub)} issued before "
            f"{iso(before)}; the revocation lasts until {iso(expires)}"
        )
    return EXIT_OK


async def _write(
    settings: Settings, jti: str | None, sub: str | None, before: float, expires: float
) -> None:
    from casb.state import open_state

    store = open_state(settings.state, state_dir=settings.state_dir)
    try:
        if jti is not None:
            await store.revoke_token(jti, expires_at=expires)
        else:
            assert sub is not None
            await store.revoke_subject(sub, before=before, expires_at=expires)
    finally:
        await store.aclose()
