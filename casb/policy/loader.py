"""Load policy files: read YAML, validate against the model, check across files, compile.

``load_policy([Path("policies/")])`` reads every ``*.yaml`` / ``*.yml`` of a directory
(sorted by name, hidden files skipped) or the named files, in the order given. All
problems are reported as :class:`PolicyLoadError` naming the file and the location::

    policies/x.yaml: rules[3].when.time.timezone: unknown time zone 'Europe/Berln'

A policy that fails to load must not be used: the caller keeps the previous policy or,
at start-up, refuses to start (fail closed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import ValidationError

from casb.dlp.profile import DlpProfile, DlpSettings
from casb.policy.engine import ANY, CompiledPolicy, CompiledRule, LocalClock, compile_rule
from casb.policy.model import PolicyDocument, RoleDef, Rule

__all__ = [
    "PolicyLoadError",
    "compile_policy",
    "load_policy",
    "parse_policy",
    "policy_files",
    "policy_json_schema",
    "policy_version",
]

POLICY_SUFFIXES = (".yaml", ".yml")


class PolicyLoadError(Exception):
    """A policy that cannot be used. ``problems`` holds one line per problem, each
    starting with the file and the location; ``str()`` joins them."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class _Source:
    name: str
    doc: PolicyDocument


# -- reading ----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one
    silently, which would let a second ``when:`` replace the first)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_mapping(node, deep=True))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _expand(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
            if not found:
                raise PolicyLoadError([f"{path}: no *.yaml or *.yml policy files in directory"])
            files.extend(found)
        else:
            files.append(path)
    return files


def policy_files(paths: Sequence[Path]) -> list[Path]:
    """The files ``load_policy(paths)`` reads, in load order (directories expanded)."""
    return _expand(paths)


def policy_version(contents: Iterable[bytes]) -> str:
    """A policy's version: ``sha256:`` of its files' bytes concatenated in load order
    (``cat files | sha256sum``). Policy bundles (casb.policy.bundle) hash the same way."""
    digest = hashlib.sha256()
    for raw in contents:
        digest.update(raw)
    return f"sha256:{digest.hexdigest()}"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc


def parse_policy(text: str | bytes, source: str = "<policy>") -> PolicyDocument:
    """Parse and validate one policy document (YAML or JSON text)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyLoadError([f"{source}: not UTF-8 text (byte {exc.start})"]) from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise PolicyLoadError([f"{source}: {_yaml_problem(exc)}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyLoadError([f"{source}: expected a mapping at the top level"])
    try:
        return PolicyDocument.model_validate(data)
    except ValidationError as exc:
        raise PolicyLoadError(
            [f"{source}: {_location(err['loc'])}: {_message(err)}" for err in exc.errors()]
        ) from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {exc.problem}"
    return f"not valid YAML: {exc}"


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _message(err: Any) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


# -- loading and compiling --------------------------------------------------------------


def load_policy(
    paths: Sequence[Path], known_destinations: Collection[str] | None = None
) -> CompiledPolicy:
    """Read, validate and compile policy files (directories expand to their YAML files).

    ``known_destinations``: when given, a rule naming any other destination is an
    error (typo protection). ``version`` of the result is ``sha256:`` of the files'
    bytes concatenated in load order (``cat files | sha256sum``).
    """
    if not paths:
        raise PolicyLoadError(["no policy files given"])
    files = _expand(paths)
    raws: list[bytes] = []
    docs: list[tuple[str, PolicyDocument]] = []
    problems: list[str] = []
    for path in files:
        raw = _read(path)
        raws.append(raw)
        try:
            docs.append((str(path), parse_policy(raw, str(path))))
        except PolicyLoadError as exc:
            problems.extend(exc.problems)
    if problems:
        raise PolicyLoadError(problems)
    return compile_policy(docs, known_destinations, version=policy_version(raws))


def compile_policy(
    docs: Sequence[tuple[str, PolicyDocument]],
    known_destinations: Collection[str] | None = None,
    *,
    version: str | None = None,
) -> CompiledPolicy:
    """Check validated documents across files and compile them into one policy.

    ``docs`` are (source name, document) pairs in load order. Without ``version``,
    the version hashes the documents' canonical JSON.
    """
    problems: list[str] = []
    roles: dict[str, tuple[str, RoleDef]] = {}
    for source, doc in docs:
        for name, role in doc.roles.items():
            if name == ANY:
                problems.append(f"{source}: roles.{name}: '*' is reserved for 'any role'")
            elif name in roles:
                problems.append(f"{source}: roles.{name}: role already defined in {roles[name][0]}")
            else:
                roles[name] = (source, role)
    for name, (source, role) in roles.items():
        for n, parent in enumerate(role.inherits):
            if parent not in roles:
                problems.append(f"{source}: roles.{name}.inherits[{n}]: undefined role '{parent}'")
    if not problems:
        problems.extend(_cycles(roles))
    closure = _closure(roles) if not problems else {}

    known = None if known_destinations is None else frozenset(known_destinations)
    seen_ids: dict[str, str] = {}
    clocks: dict[str, LocalClock] = {}
    compiled: list[CompiledRule] = []
    for source, doc in docs:
        for n, rule in enumerate(doc.rules):
            where = f"{source}: rules[{n}]"
            if rule.id in seen_ids:
                problems.append(
                    f"{where}.id: duplicate rule id '{rule.id}' (first defined in "
                    f"{seen_ids[rule.id]})"
                )
            else:
                seen_ids[rule.id] = where.replace(": ", " ", 1)
            for i, role_name in enumerate(rule.roles):
                if role_name != ANY and role_name not in roles:
                    problems.append(f"{where}.roles[{i}]: undefined role '{role_name}'")
            if known is not None:
                for i, dest in enumerate(rule.destinations):
                    if dest != ANY and dest not in known:
                        listed = ", ".join(sorted(known)) or "none"
                        problems.append(
                            f"{where}.destinations[{i}]: unknown destination '{dest}' "
                            f"(known: {listed})"
                        )
            clock = None
            if rule.when.time is not None:
                name = rule.when.time.timezone
                clock = clocks.get(name)
                if clock is None:
                    zone = _zone(name)
                    if zone is None:
                        problems.append(f"{where}.when.time.timezone: unknown time zone '{name}'")
                        continue
                    clock = clocks[name] = LocalClock(zone)
            compiled.append(compile_rule(rule, source=source, clock=clock))
    dlp = _merge_dlp(docs, problems)
    for source, doc in docs:
        for n, rule in enumerate(doc.rules):
            problems.extend(_check_dlp_obligations(rule, dlp, f"{source}: rules[{n}]"))
    if problems:
        raise PolicyLoadError(problems)
    if version is None:
        digest = hashlib.sha256()
        for _, doc in docs:
            digest.update(doc.model_dump_json(by_alias=True).encode())
        version = f"sha256:{digest.hexdigest()}"
    return CompiledPolicy(
        compiled, closure, version=version, sources=[source for source, _ in docs], dlp=dlp
    )


# Obligations that name a DLP profile: `dlp` (uploads are inspected with it) and `mask`
# (responses are de-identified with it, so its profile must de-identify).
DLP_OBLIGATIONS = ("dlp", "mask")


def _merge_dlp(docs: Sequence[tuple[str, PolicyDocument]], problems: list[str]) -> DlpSettings:
    """One DLP section from every file's: profiles are merged (a name is defined once);
    a detector setting may be set by one file only."""
    profiles: dict[str, DlpProfile] = {}
    defined_in: dict[str, str] = {}
    settings: dict[str, Any] = {}
    set_in: dict[str, str] = {}
    for source, doc in docs:
        if doc.dlp is None:
            continue
        for name, profile in doc.dlp.profiles.items():
            if name in profiles:
                problems.append(
                    f"{source}: dlp.profiles.{name}: profile already defined in {defined_in[name]}"
                )
                continue
            profiles[name], defined_in[name] = profile, source
        for field in doc.dlp.model_fields_set - {"profiles"}:
            if field in settings:
                problems.append(f"{source}: dlp.{field}: already set in {set_in[field]}")
                continue
            settings[field], set_in[field] = getattr(doc.dlp, field), source
    return DlpSettings(profiles=profiles, **settings)


def _check_dlp_obligations(rule: Rule, dlp: DlpSettings, where: str) -> list[str]:
    problems: list[str] = []
    for key in DLP_OBLIGATIONS:
        if key not in rule.obligations:
            continue
        value = rule.obligations[key]
        known = ", ".join(sorted(dlp.profiles)) or "none: add a dlp.profiles section"
        if not isinstance(value, str):
            problems.append(f"{where}.obligations.{key}: expected a DLP profile name")
        elif value not in dlp.profiles:
            problems.append(
                f"{where}.obligations.{key}: unknown DLP profile '{value}' (known: {known})"
            )
        elif key == "mask" and dlp.profiles[value].deidentify is None:
            problems.append(
                f"{where}.obligations.mask: profile '{value}' does not de-identify "
                "(give it `deidentify: [...]`, [] for the basic profile)"
            )
    return problems


def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _cycles(roles: dict[str, tuple[str, RoleDef]]) -> list[str]:
    """Inheritance cycles, one problem each (Kahn's algorithm, then walk the rest)."""
    children: dict[str, list[str]] = {name: [] for name in roles}
    pending = {name: len(set(role.inherits)) for name, (_, role) in roles.items()}
    for name, (_, role) in roles.items():
        for parent in set(role.inherits):
            children[parent].append(name)
    ready = [name for name, count in pending.items() if count == 0]
    while ready:
        parent = ready.pop()
        for child in children[parent]:
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    stuck = {name for name, count in pending.items() if count > 0}
    problems: list[str] = []
    reported: set[str] = set()
    for start in sorted(stuck):
        if start in reported:
            continue
        path = [start]
        node = start
        while True:  # follow stuck parents until a role repeats: that is a cycle
            node = next(p for p in roles[node][1].inherits if p in stuck)
            if node in path:
                cycle = [*path[path.index(node) :], node]
                break
            path.append(node)
        if not reported.intersection(cycle):
            source = roles[cycle[0]][0]
            problems.append(
                f"{source}: roles.{cycle[0]}.inherits: inheritance cycle " + " -> ".join(cycle)
            )
        reported.update(path)
    return problems


def _closure(roles: dict[str, tuple[str, RoleDef]]) -> dict[str, frozenset[str]]:
    """Each role with every role it inherits from, transitively (no cycles left)."""
    done: dict[str, frozenset[str]] = {}
    for start in roles:
        stack = [start]
        while stack:  # iterative post-order: parents before children
            name = stack[-1]
            if name in done:
                stack.pop()
                continue
            parents = roles[name][1].inherits
            todo = [p for p in parents if p not in done]
            if todo:
                stack.extend(todo)
                continue
            acc = {name}
            for parent in parents:
                acc |= done[parent]
            done[name] = frozenset(acc)
            stack.pop()
    return done


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file, generated from the model (``policies/schema.json``
    is this, written with ``json.dumps(indent=2, sort_keys=True)``)."""
    return PolicyDocument.model_json_schema(by_alias=True)
