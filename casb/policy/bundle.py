"""Policy bundles: the set of policy files a replica enforces, as published to the
shared state store (casb.state.store.PolicyBundle: file name -> YAML text, version).

A bundle holds the same files ``load_policy`` reads (directories expand to their
``*.yaml`` / ``*.yml`` files), keyed by base name. Its files load in name order, as a
directory's do (name them ``10-roles.yaml``, ``20-rules.yaml`` to order them), and its
version is the one the compiled policy reports and the proxy audits: ``sha256:`` of the
files' bytes concatenated in that order (``casb.policy.loader.policy_version``). So a
directory published as a bundle has the version ``load_policy([directory])`` gives.

Everything here is pure apart from ``bundle_from_paths``, which reads the files.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from casb.policy.engine import CompiledPolicy
from casb.policy.loader import (
    PolicyLoadError,
    compile_policy,
    parse_policy,
    policy_files,
    policy_version,
)
from casb.policy.model import PolicyDocument
from casb.state.store import PolicyBundle

__all__ = [
    "MAX_BUNDLE_BYTES",
    "bundle_from_paths",
    "bundle_version",
    "compile_bundle",
    "make_bundle",
]

# A bundle is a handful of YAML files; anything near this size is a mistake (or an
# attack on every replica's memory through the store).
MAX_BUNDLE_BYTES = 8 * 1024 * 1024
_MAX_NAME = 255


def _name_problem(name: str) -> str | None:
    """Why `name` cannot name a file of a bundle (a base name: no directories)."""
    if not name or len(name) > _MAX_NAME:
        return "a file name must have 1 to 255 characters"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "a file name must be a base name, without directories"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "a file name must not hold control characters"
    return None


def _ordered(files: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """The files in load order (by name), encoded; PolicyLoadError for bad names/sizes."""
    if not files:
        raise PolicyLoadError(["policy bundle: no files"])
    problems = [
        f"policy bundle: {name!r}: {problem}"
        for name in files
        if (problem := _name_problem(name)) is not None
    ]
    if problems:
        raise PolicyLoadError(problems)
    ordered: list[tuple[str, bytes]] = []
    for name in sorted(files):
        try:
            ordered.append((name, files[name].encode("utf-8")))
        except UnicodeEncodeError as exc:
            problems.append(f"policy bundle: {name}: not UTF-8 text (character {exc.start})")
    if problems:
        raise PolicyLoadError(problems)
    size = sum(len(raw) for _, raw in ordered)
    if size > MAX_BUNDLE_BYTES:
        raise PolicyLoadError(
            [f"policy bundle: {size} bytes, more than the {MAX_BUNDLE_BYTES} allowed"]
        )
    return ordered


def bundle_version(files: Mapping[str, str]) -> str:
    """The version of a bundle of these files (what its compiled policy reports)."""
    return policy_version(raw for _, raw in _ordered(files))


def make_bundle(files: Mapping[str, str]) -> PolicyBundle:
    """A bundle of these files (base name -> text), its version computed."""
    ordered = dict(sorted(files.items()))
    return PolicyBundle(files=ordered, version=bundle_version(ordered))


def bundle_from_paths(paths: Sequence[Path]) -> PolicyBundle:
    """A bundle of the files ``load_policy(paths)`` would read. Their base names must be
    unique (a bundle has no directories); PolicyLoadError names the problem."""
    files: dict[str, str] = {}
    origin: dict[str, Path] = {}
    problems: list[str] = []
    for path in policy_files(paths) if paths else []:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{path}: not UTF-8 text (byte {exc.start})")
            continue
        if path.name in origin:
            problems.append(
                f"{path}: file name {path.name!r} is also {origin[path.name]}: the files of "
                "a bundle need distinct names"
            )
            continue
        files[path.name], origin[path.name] = text, path
    if not paths:
        problems.append("no policy files given")
    if problems:
        raise PolicyLoadError(problems)
    return make_bundle(files)


def compile_bundle(
    bundle: PolicyBundle, known_destinations: Collection[str] | None = None
) -> CompiledPolicy:
    """Validate and compile a bundle without touching the disk. Refuses (PolicyLoadError
    with the loader's reasons, file names as sources) a bundle whose content does not
    hash to its version: a replica enforces exactly the version it reports."""
    ordered = _ordered(bundle.files)
    actual = policy_version(raw for _, raw in ordered)
    if actual != bundle.version:
        raise PolicyLoadError(
            [f"policy bundle {bundle.version}: its files hash to {actual}, not to its version"]
        )
    docs: list[tuple[str, PolicyDocument]] = []
    problems: list[str] = []
    for name, raw in ordered:
        try:
            docs.append((name, parse_policy(raw, name)))
        except PolicyLoadError as exc:
            problems.extend(exc.problems)
    if problems:
        raise PolicyLoadError(problems)
    return compile_policy(docs, known_destinations, version=bundle.version)
