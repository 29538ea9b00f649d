"""`casb dlp`: scan DICOM files for PHI, de-identify them, offline.

    casb dlp scan PATH... [--json] [--config CASB_YAML]
    casb dlp deid IN OUT [--option OPT ...] [--profile NAME --policy FILE]
                         [--uid-key-file F] [--config CASB_YAML]

``scan`` prints one row per finding (file, rule, keyword, tag, path -- never a value)
and exits 1 when anything was found or a file could not be read, 0 when every file is
clean, 2 when a path does not exist. ``deid`` writes de-identified copies (a file, or a
directory tree into another) and exits 0, 1 when a profile blocked a file, 2 on bad
input. Detector settings come from the ``dlp`` section of the policy files (those of
``--config``, or ``--policy``), else the defaults.

pydicom and the engine load only when a command runs, so ``casb --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from casb.dlp.profile import DEID_OPTIONS, DlpProfile, DlpSettings

if TYPE_CHECKING:
    from casb.dlp.inspector import Inspector

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2
_MIN_KEY_BYTES = 16
_COLUMNS = ("file", "rule", "keyword", "tag", "path")


def add_dlp_commands(subparsers: Any) -> None:
    """Register ``casb dlp scan`` and ``casb dlp deid`` on the ``casb`` sub-parsers."""
    dlp = subparsers.add_parser(
        "dlp",
        help="scan DICOM files for PHI, de-identify them",
        description="Offline DLP on DICOM files: the proxy's detectors and de-identification.",
    )
    dsub = dlp.add_subparsers(dest="dlp_command", required=True, metavar="SUBCOMMAND")

    p = dsub.add_parser(
        "scan",
        help="list the PHI findings of DICOM files",
        description="Scan DICOM files (directories recursively) and print one row per "
        "finding: file, rule, keyword, tag, path -- never a value. Exit 1 when anything "
        "was found or a file could not be read, 0 when all are clean, 2 when a path "
        "does not exist.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or directories")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="casb.yaml whose policy files' dlp section configures the detectors "
        "(default: the built-in detector settings)",
    )
    p.set_defaults(func=cmd_scan)

    p = dsub.add_parser(
        "deid",
        help="write de-identified copies of DICOM files",
        description="De-identify a DICOM file (or a directory, into another directory) "
        "with the PS3.15 basic profile plus options, or with a policy's DLP profile.",
    )
    p.add_argument("input", metavar="IN", help="a DICOM file or a directory")
    p.add_argument("output", metavar="OUT", help="the file (or directory) to write")
    p.add_argument(
        "--option",
        action="append",
        choices=sorted(DEID_OPTIONS),
        metavar="OPT",
        help="a profile option (repeat for several): " + ", ".join(sorted(DEID_OPTIONS)),
    )
    p.add_argument("--profile", metavar="NAME", help="a DLP profile of --policy to apply")
    p.add_argument("--policy", metavar="FILE", help="the policy file that defines --profile")
    p.add_argument(
        "--uid-key-file",
        metavar="F",
        help="the secret for replacement UIDs and date shifts (default: dlp.uid_key_file "
        "or dlp.uid_key_env of the configuration, the dev key in dev)",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="casb.yaml (for the UID key)")
    p.set_defaults(func=cmd_deid)


# -- settings ------------------------------------------------------------------------


def dlp_settings_of_config(config: str | None) -> DlpSettings:
    """The ``dlp`` section of the configuration's policy files; defaults without one."""
    if config is None:
        return DlpSettings()
    from casb.config import load_settings
    from casb.policy import load_policy

    settings = load_settings(config)
    return load_policy(list(settings.policy.paths)).dlp


def _policy_profile(policy_file: str, name: str) -> tuple[DlpProfile, DlpSettings]:
    from casb.policy import load_policy

    dlp = load_policy([Path(policy_file)]).dlp
    if name not in dlp.profiles:
        known = ", ".join(sorted(dlp.profiles)) or "none"
        raise _Usage(f"--profile {name}: not a DLP profile of {policy_file} (known: {known})")
    return dlp.profiles[name], dlp


class _Usage(Exception):
    pass


# -- scan ----------------------------------------------------------------------------


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def cmd_scan(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        for name in missing:
            print(f"casb: error: {name}: no such file or directory", file=sys.stderr)
        return EXIT_USAGE
    from casb.dlp.findings import InstanceError
    from casb.dlp.inspector import Inspector

    inspector = Inspector(DlpProfile(), dlp_settings_of_config(args.config), uid_key=b"")
    rows: list[dict[str, str]] = []
    scanned = with_findings = errors = 0
    for path in _files(paths):
        scanned += 1
        try:
            data = path.read_bytes()
        except OSError as exc:
            rows.append({"file": str(path), "error": f"cannot read: {exc.strerror}"})
            errors += 1
            continue
        try:
            verdict = inspector.inspect(data, True)
        except InstanceError as exc:
            rows.append({"file": str(path), "error": exc.reason})
            errors += 1
            continue
        if verdict.findings:
            with_findings += 1
        rows.extend({"file": str(path), **f.to_json()} for f in verdict.findings)
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        _print_table(rows)
    print(
        f"{scanned} file(s) scanned: {with_findings} with findings, {errors} unreadable",
        file=sys.stderr,
    )
    return EXIT_FOUND if with_findings or errors else EXIT_OK


def _print_table(rows: list[dict[str, str]]) -> None:
    if not rows:
        return
    table = [
        [r["file"], "error", "", "", r["error"]]
        if "error" in r
        else [r.get(c, "") for c in _COLUMNS]
        for r in rows
    ]
    widths = [max(len(c.upper()), *(len(row[i]) for row in table)) for i, c in enumerate(_COLUMNS)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)).rstrip())
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- deid ----------------------------------------------------------------------------


def _uid_key(args: argparse.Namespace) -> bytes:
    if args.uid_key_file:
        try:
            key = Path(args.uid_key_file).read_bytes().strip()
        except OSError as exc:
            raise _Usage(f"--uid-key-file {args.uid_key_file}: {exc.strerror}") from None
        if len(key) < _MIN_KEY_BYTES:
            raise _Usage(f"--uid-key-file: the key needs at least {_MIN_KEY_BYTES} bytes")
        return key
    from casb.config import load_settings
    from casb.dlp.uid_key import load_uid_key

    found = load_uid_key(load_settings(args.config))
    if found is None:
        raise _Usage(
            "no UID key: pass --uid-key-file, or set dlp.uid_key_file / dlp.uid_key_env "
            "in the configuration"
        )
    return found


def _deid_inspector(args: argparse.Namespace) -> Inspector:
    from casb.dlp.inspector import Inspector

    if (args.profile is None) != (args.policy is None):
        raise _Usage("--profile and --policy go together")
    if args.profile is not None:
        if args.option:
            raise _Usage("--option cannot be combined with --profile (the profile names them)")
        profile, settings = _policy_profile(args.policy, args.profile)
        if profile.deidentify is None:
            raise _Usage(f"--profile {args.profile}: this profile does not de-identify")
    else:
        profile = DlpProfile(deidentify=sorted(set(args.option or [])))
        settings = DlpSettings()
    return Inspector(profile, settings, uid_key=_uid_key(args))


def _pairs(source: Path, target: Path) -> Iterator[tuple[Path, Path]]:
    if source.is_dir():
        for path in _files([source]):
            yield path, target / path.relative_to(source)
    elif target.is_dir():
        yield source, target / source.name
    else:
        yield source, target


def cmd_deid(args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    try:
        if not source.exists():
            raise _Usage(f"{source}: no such file or directory")
        if source.is_dir() and target.exists() and not target.is_dir():
            raise _Usage(f"{target}: the output of a directory must be a directory")
        if source.resolve() == target.resolve():
            raise _Usage("IN and OUT are the same: refusing to overwrite the input")
        inspector = _deid_inspector(args)
    except _Usage as exc:
        print(f"casb: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from casb.dlp.findings import InstanceError

    code = EXIT_OK
    written = 0
    for path, out in _pairs(source, target):
        try:
            verdict = inspector.inspect(path.read_bytes(), True)
        except OSError as exc:
            print(f"casb: error: {path}: cannot read: {exc.strerror}", file=sys.stderr)
            code = EXIT_USAGE
            continue
        except InstanceError as exc:
            print(f"casb: error: {path}: {exc.reason}", file=sys.stderr)
            code = EXIT_USAGE
            continue
        if verdict.action == "block":
            rules = ", ".join(verdict.blocked_by)
            print(f"casb: {path}: blocked by the profile ({rules}); not written", file=sys.stderr)
            code = max(code, EXIT_FOUND)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(verdict.header)
        written += 1
        print(f"{path} -> {out} ({len(verdict.findings)} finding(s) before de-identification)")
    if source.is_dir():
        print(f"{written} file(s) written to {target}", file=sys.stderr)
    return code
