"""`casb policy publish | versions | rollback`: policy versions in the shared state store.

    casb policy publish FILE|DIR... [--author NAME] [--comment TEXT]
    casb policy versions [--json] [--limit N]
    casb policy rollback VERSION [--comment TEXT]

`publish` compiles the files against the configuration's destinations first (what every
replica will do) and publishes nothing when they do not compile (exit 1, the loader's
reasons). Every replica then swaps to the new version within `state.policy_poll_seconds`
(at once when it hears the notification). `rollback` makes an earlier version current
again; a version the store does not hold is refused (exit 1).

They need a shared store (`state.url: redis://...`): with `memory://` the state lives
inside one proxy process, so they exit 2 and say to edit the policy files, which the proxy
watches. Exit codes: 0 done; 1 refused (invalid policy, unknown version, store
unreachable); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from casb.config import Settings, load_settings
from casb.policy.bundle import bundle_from_paths, compile_bundle
from casb.policy.loader import PolicyLoadError, policy_files
from casb.state.store import PolicyVersion, StateConflict, StateStore, StateUnavailable

__all__ = [
    "add_policy_store_commands",
    "publish",
    "rollback",
    "versions",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

MEMORY_STATE = (
    "state.url is memory://: publishing needs a shared state store (state.url: redis://, "
    "rediss:// or redis+sentinel://). Memory state lives inside one proxy process, which "
    "no command can reach; edit the policy files instead (policy.paths): the proxy "
    "watches them and reloads them when they change"
)
_FULL_VERSION = re.compile(r"^sha256:[0-9a-f]{64}$")
_VERSION_PREFIX = re.compile(r"^(sha256:)?[0-9a-f]{8,64}$")
_LOOKUP_LIMIT = 1000  # versions searched for a prefix

Command = Callable[[argparse.Namespace, Settings, StateStore, TextIO], Awaitable[int]]


def add_policy_store_commands(
    policy_subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Register `casb policy publish`, `casb policy versions` and `casb policy rollback`."""
    config_help = (
        "casb.yaml naming the state store (state.url) and the destinations (default: "
        "$CASB_CONFIG, ./casb.yaml, else the embedded dev defaults)"
    )
    p = policy_subparsers.add_parser(
        "publish",
        help="publish policy files to every replica (shared state store)",
        description="Compile the policy files against the configuration's destinations, "
        "then publish them as the current version in the shared state store: every "
        "replica switches to it within state.policy_poll_seconds. Nothing is published "
        "when they do not compile (exit 1). The files load in name order, as a "
        "directory's do.",
    )
    p.add_argument("files", nargs="+", metavar="FILE|DIR", help="policy YAML files or directories")
    p.add_argument(
        "--author",
        default=os.environ.get("USER") or "unknown",
        help="who publishes (default: $USER)",
    )
    p.add_argument("--comment", default="", help="why (kept with the version)")
    p.add_argument("--config", "-c", metavar="FILE", help=config_help)
    p.set_defaults(func=lambda a: run(a, publish))

    p = policy_subparsers.add_parser(
        "versions",
        help="list the published policy versions",
        description="List the policy versions in the shared state store, newest first; "
        "the current one is marked with '*'.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--config", "-c", metavar="FILE", help=config_help)
    p.set_defaults(func=lambda a: run(a, versions))

    p = policy_subparsers.add_parser(
        "rollback",
        help="make an earlier published version current again",
        description="Make a published policy version current again (a unique prefix of "
        "at least 8 hex digits will do); every replica switches to it. A version the "
        "store does not hold is refused (exit 1).",
    )
    p.add_argument("version", metavar="VERSION", help="sha256:... as `casb policy versions` shows")
    p.add_argument(
        "--author",
        default=os.environ.get("USER") or "unknown",
        help="who rolls back (default: $USER)",
    )
    p.add_argument("--comment", default="", help="why (kept with the change)")
    p.add_argument("--config", "-c", metavar="FILE", help=config_help)
    p.set_defaults(func=lambda a: run(a, rollback))


def run(args: argparse.Namespace, command: Command) -> int:
    """Load the configuration, refuse memory://, open the store, run `command`."""
    from casb.state import open_state

    settings = load_settings(args.config)
    if settings.state.url.lower().startswith("memory://"):
        print(f"casb: error: {MEMORY_STATE}", file=sys.stderr)
        return EXIT_USAGE

    async def go() -> int:
        store = open_state(settings.state, state_dir=settings.state_dir)
        try:
            return await command(args, settings, store, sys.stdout)
        finally:
            await store.aclose()

    return asyncio.run(go())


def _error(message: str) -> int:
    print(f"casb: error: {message}", file=sys.stderr)
    return EXIT_FAILED


async def publish(
    args: argparse.Namespace, settings: Settings, store: StateStore, out: TextIO
) -> int:
    """Validate (compile against the destinations), then publish and make current."""
    paths = [Path(p) for p in args.files]
    try:
        bundle = bundle_from_paths(paths)
        policy = compile_bundle(bundle, set(settings.destinations))
    except PolicyLoadError as exc:
        return _error(f"policy not published:\n{exc}")
    given = [p.name for p in policy_files(paths)]
    if given != sorted(given):
        print(
            f"note: the files load in name order: {', '.join(bundle.files)}",
            file=sys.stderr,
        )
    try:
        meta = await store.publish_policy(bundle, author=args.author, comment=args.comment)
    except StateUnavailable as exc:
        return _error(f"state store unavailable, nothing published: {exc}")
    print(
        f"published {meta.version}: {policy.rule_count} rules from "
        f"{', '.join(bundle.files)}; it is current (replicas switch within "
        f"{settings.state.policy_poll_seconds:g} s)",
        file=out,
    )
    return EXIT_OK


async def versions(
    args: argparse.Namespace, settings: Settings, store: StateStore, out: TextIO
) -> int:
    """The published versions, newest first, the current one marked."""
    try:
        found = await store.policy_versions(limit=max(args.limit, 1))
    except StateUnavailable as exc:
        return _error(f"state store unavailable: {exc}")
    if args.json:
        print(json.dumps([_as_json(v) for v in found], indent=2), file=out)
        return EXIT_OK
    if not found:
        print("no policy published yet: the replicas enforce their policy files", file=out)
        return EXIT_OK
    for v in found:
        line = f"{'*' if v.current else ' '} {v.version}  {_time(v.published_at)}  {v.author}"
        print(f"{line}  {v.comment}" if v.comment else line, file=out)
    return EXIT_OK


def _as_json(v: PolicyVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "published_at": _time(v.published_at),
        "author": v.author,
        "comment": v.comment,
        "current": v.current,
    }


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def rollback(
    args: argparse.Namespace, settings: Settings, store: StateStore, out: TextIO
) -> int:
    """Make a stored version current again; unknown or ambiguous versions are refused."""
    wanted: str = args.version.strip().lower()
    try:
        version = wanted
        if not _FULL_VERSION.match(wanted):
            if not _VERSION_PREFIX.match(wanted):
                return _error(
                    f"{args.version!r} is not a policy version (sha256: and hex digits, "
                    "as `casb policy versions` shows)"
                )
            prefix = wanted if wanted.startswith("sha256:") else f"sha256:{wanted}"
            stored = await store.policy_versions(limit=_LOOKUP_LIMIT)
            matches = sorted({v.version for v in stored if v.version.startswith(prefix)})
            if len(matches) > 1:
                return _error(f"{args.version} matches several versions: {', '.join(matches)}")
            if not matches:
                return _error(f"no published policy version {args.version}")
            version = matches[0]
        meta = await store.set_current_policy(version, author=args.author, comment=args.comment)
    except StateConflict:
        return _error(f"no published policy version {args.version}")
    except StateUnavailable as exc:
        return _error(f"state store unavailable, nothing changed: {exc}")
    print(f"current policy is now {meta.version} (published by {meta.author})", file=out)
    return EXIT_OK
