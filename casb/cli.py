"""The `casb` command.

    casb run                 proxy + admin API (the main job)
    casb proxy               proxy only
    casb policy validate     check policy files
    casb policy explain      what would the proxy decide for this request?
    casb policy test         run policy test cases (like `opa test`)
    casb policy schema       print the policy JSON Schema
    casb policy publish      publish policy files to every replica (shared state store)
    casb policy versions     list the published policy versions
    casb policy rollback     make an earlier published version current again
    casb token mint          mint a dev token (dev signing key only)
    casb token revoke        revoke a token (--jti) or a subject's tokens (--sub) everywhere
    casb audit verify        check an audit log's hash chain and signed checkpoints
    casb audit keygen        new key pair for signing audit checkpoints
    casb audit export        export the audit trail (JSONL or ATNA syslog)
    casb dlp scan|deid       DICOM header DLP on files
    casb envelope keygen     new keyring of key-encryption keys (envelope encryption)
    casb envelope rotate     add a key-encryption key and make it the primary

Exit codes: 0 success; 1 the check ran and failed (tampering found, a test failed, a
request would be denied with --exit-code); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from casb.config import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# -- run / proxy ----------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, *, admin: bool) -> int:
    from casb.serve import serve

    asyncio.run(serve(_settings(args), admin=admin))
    return EXIT_OK


# -- policy ---------------------------------------------------------------------------
def cmd_policy_validate(args: argparse.Namespace) -> int:
    from casb.policy import load_policy

    known = None
    if args.config or args.with_config:
        known = set(_settings(args).destinations)
    policy = load_policy([Path(p) for p in args.files], known_destinations=known)
    print(
        f"OK: {policy.rule_count} rules from {len(policy.sources)} file(s), "
        f"version {policy.version}"
    )
    return EXIT_OK


def _parse_claims(pairs: Sequence[str]) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--claim expects KEY=VALUE, got {pair!r}")
        claims[key] = value
    return claims


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from casb.explain import explain
    from casb.runtime import Runtime

    runtime = Runtime.build(_settings(args), audit=False)
    try:
        principal: Any
        if args.token:
            from casb.identity import AuthenticationError, IdentityUnavailable

            try:
                principal = asyncio.run(runtime.pipeline.verifier.verify(args.token))
            except (AuthenticationError, IdentityUnavailable) as exc:
                raise UsageError(f"--token: {getattr(exc, 'description', exc)}") from None
        elif args.claims:
            try:
                principal = json.loads(args.claims)
            except ValueError:
                raise UsageError("--claims must be a JSON object") from None
        else:
            principal = {
                "sub": args.sub,
                "roles": args.role or [],
                "mfa": args.mfa,
                "claims": _parse_claims(args.claim or []),
            }
        try:
            result = asyncio.run(
                explain(
                    runtime.pipeline,
                    method=args.method,
                    url=args.url,
                    principal=principal,
                    at=args.time,
                )
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    finally:
        runtime.discard()
    print(json.dumps(result, indent=2))
    return EXIT_FAILED if args.exit_code and result["decision"] != "allow" else EXIT_OK


def cmd_policy_test(args: argparse.Namespace) -> int:
    from casb.policy_cases import run_case_files

    report = run_case_files(
        [Path(p) for p in args.files], settings=_settings(args), verbose=args.verbose
    )
    print(report.render())
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from casb.policy import policy_json_schema

    print(json.dumps(policy_json_schema(), indent=2, sort_keys=True))
    return EXIT_OK


# -- token ----------------------------------------------------------------------------
def cmd_token_mint(args: argparse.Namespace) -> int:
    from casb.identity.devkeys import ensure_dev_keys, mint_token

    settings = _settings(args)
    if settings.environment != "dev" or settings.identity is not None:
        raise UsageError(
            "token mint only works with the dev signing key (environment: dev "
            "and no identity section); real tokens come from your identity "
            "provider"
        )
    keys = ensure_dev_keys(settings.state_dir)
    print(
        mint_token(
            keys,
            subject=args.sub,
            roles=args.role or [],
            mfa=args.mfa,
            claims=_parse_claims(args.claim or []),
            ttl_seconds=args.ttl,
        )
    )
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casb", description="Inline Cloud Access Security Broker for medical imaging."
    )
    config_help = (
        "casb.yaml to use (default: $CASB_CONFIG, ./casb.yaml, else the embedded dev defaults)"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE", help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        parents=[common],
        help="run the proxy and the admin API",
        description="Run the proxy and the admin API in one process.",
    )
    p.set_defaults(func=lambda a: cmd_serve(a, admin=True))
    p = sub.add_parser(
        "proxy",
        parents=[common],
        help="run the proxy only",
        description="Run the proxy only (no admin API).",
    )
    p.set_defaults(func=lambda a: cmd_serve(a, admin=False))

    policy = sub.add_parser(
        "policy", help="validate, explain and test policies", description="Work with RBAC policies."
    )
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    p = psub.add_parser(
        "validate",
        parents=[common],
        help="check policy files",
        description="Parse and compile policy files; exit 2 naming the file "
        "and field on the first error.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files or directories")
    p.add_argument(
        "--with-config",
        action="store_true",
        help="also check destination names against the configuration",
    )
    p.set_defaults(func=cmd_policy_validate)

    p = psub.add_parser(
        "explain",
        parents=[common],
        help="show the decision for one request",
        description="Print the decision JSON the proxy would audit for a request. Give the "
        "caller as --token, as --claims JSON, or with --sub/--role/--mfa/--claim.",
    )
    p.add_argument("--method", default="GET", help="HTTP method (default GET)")
    p.add_argument(
        "--url",
        required=True,
        help="proxy path as a client sends it, e.g. /pacs/studies?ModalitiesInStudy=CT",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument("--token", help="a JWT, verified like the proxy does")
    who.add_argument("--claims", help='principal as JSON: {"sub":..,"roles":[..],"mfa":..}')
    p.add_argument("--sub", default="simulated", help="subject (default: simulated)")
    p.add_argument("--role", action="append", help="a role (repeat for several)")
    p.add_argument("--mfa", action="store_true", help="the principal used MFA")
    p.add_argument("--claim", action="append", metavar="KEY=VALUE", help="an extra claim")
    p.add_argument("--time", help="ISO 8601 time with offset to decide at (default now)")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the decision is deny")
    p.set_defaults(func=cmd_policy_explain)

    p = psub.add_parser(
        "test",
        parents=[common],
        help="run policy test cases",
        description="Run policy test cases (YAML) against the policy; exit 1 if any case fails.",
    )
    p.add_argument("files", nargs="+", metavar="CASES.yaml")
    p.add_argument("--verbose", "-v", action="store_true", help="list passing cases too")
    p.set_defaults(func=cmd_policy_test)

    p = psub.add_parser(
        "schema",
        help="print the policy JSON Schema",
        description="Print the JSON Schema of the policy format.",
    )
    p.set_defaults(func=cmd_policy_schema)
    from casb.policy.cli_store import add_policy_store_commands

    add_policy_store_commands(psub)

    token = sub.add_parser(
        "token", help="mint dev tokens, revoke tokens", description="Token tools."
    )
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND")
    p = tsub.add_parser(
        "mint",
        parents=[common],
        help="mint a token with the dev key",
        description="Mint a JWT signed by the dev key (generated on first "
        "use). Refuses outside dev mode.",
    )
    p.add_argument("--sub", required=True, help="subject (user id)")
    p.add_argument("--role", action="append", help="a role (repeat for several)")
    p.add_argument("--mfa", action="store_true", help="mark the token as MFA (amr: mfa)")
    p.add_argument("--claim", action="append", metavar="KEY=VALUE", help="an extra claim")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    p.set_defaults(func=cmd_token_mint)
    from casb.identity.cli_revoke import add_revoke_command

    add_revoke_command(tsub)

    from casb.audit.cli import add_audit_commands

    add_audit_commands(sub)

    from casb.dlp.cli import add_dlp_commands

    add_dlp_commands(sub)

    from casb.encryption.cli import add_commands as add_envelope_commands

    add_envelope_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from casb.audit import AuditError
    from casb.policy import PolicyLoadError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ConfigError, PolicyLoadError, AuditError, UsageError) as exc:
        print(f"casb: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `casb dlp scan DIR | head`: the reader went away; stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        # The command did not finish its output: exit 1 (a scan had printed findings).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
