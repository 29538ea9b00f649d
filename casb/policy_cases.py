"""`casb policy test`: policy unit tests written by security teams, like `opa test`.

A cases file (YAML):

    policy: [../hospital.yaml]        # optional, relative to this file; default: config's
    cases:
      - name: referring physicians cannot store
        principal: {sub: bob, roles: [referring_physician], mfa: false, claims: {}}
        request: {method: POST, url: /pacs/studies}
        time: "2026-03-02T10:00:00+01:00"      # optional, default now
        expect:
          decision: deny                       # required: allow | deny
          rule_id: null                        # optional (null = default deny)
          status: 403                          # optional: what the proxy would answer
          action: store                        # optional
          obligations: {}                      # optional: these keys with these values
          reason_contains: "no allow rule"     # optional substring of a reason

Each case runs the proxy's own URL normalisation, routing, classification and policy
decision (not a re-implementation), so a case also catches an evasive URL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from casb.config import ConfigError, Settings, describe_validation_error
from casb.explain import explain
from casb.policy import PolicyLoadError, load_policy
from casb.runtime import Runtime


class _Expect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: str = Field(pattern="^(allow|deny)$")
    rule_id: str | None = "<any>"
    status: int | None = None
    action: str | None = None
    obligations: dict[str, Any] | None = None
    reason_contains: str | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = "GET"
    url: str


class _Case(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    principal: dict[str, Any]
    request: _Request
    time: str | None = None
    expect: _Expect


class _CaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: list[str] | None = None
    cases: list[_Case] = Field(min_length=1)


@dataclass
class CaseReport:
    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    verbose: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def render(self) -> str:
        lines = [f"PASS {name}" for name in self.passed] if self.verbose else []
        lines += [f"FAIL {name}\n     {why}" for name, why in self.failed]
        lines.append(f"{len(self.passed)} passed, {len(self.failed)} failed")
        return "\n".join(lines)


def _mismatches(expect: _Expect, got: dict[str, Any]) -> list[str]:
    out = []
    if got["decision"] != expect.decision:
        out.append(f"decision: expected {expect.decision}, got {got['decision']}")
    if expect.rule_id != "<any>" and got["rule_id"] != expect.rule_id:
        out.append(f"rule_id: expected {expect.rule_id!r}, got {got['rule_id']!r}")
    if expect.status is not None and got["status"] != expect.status:
        out.append(f"status: expected {expect.status}, got {got['status']}")
    if expect.action is not None and got["action"] != expect.action:
        out.append(f"action: expected {expect.action}, got {got['action']}")
    for key, value in (expect.obligations or {}).items():
        if got["obligations"].get(key) != value:
            out.append(f"obligation {key}: expected {value!r}, got {got['obligations'].get(key)!r}")
    if expect.reason_contains and not any(expect.reason_contains in r for r in got["reasons"]):
        out.append(f"no reason contains {expect.reason_contains!r}; reasons: {got['reasons']}")
    return out


def _load(path: Path) -> _CaseFile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return _CaseFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(str(path), exc, "policy test file")) from exc


def run_case_files(paths: list[Path], *, settings: Settings, verbose: bool = False) -> CaseReport:
    runtime = Runtime.build(settings, audit=False)
    report = CaseReport(verbose=verbose)
    try:
        for path in paths:
            spec = _load(path)
            pipeline = runtime.pipeline
            if spec.policy:
                try:
                    pipeline.policy = load_policy(
                        [path.parent / p for p in spec.policy],
                        known_destinations=set(runtime.settings.destinations),
                    )
                except PolicyLoadError as exc:
                    raise ConfigError(f"{path}: policy: {exc}") from exc
            for case in spec.cases:
                label = f"{path.name}: {case.name}"
                try:
                    got = asyncio.run(
                        explain(
                            pipeline,
                            method=case.request.method,
                            url=case.request.url,
                            principal=case.principal,
                            at=case.time,
                        )
                    )
                except ValueError as exc:
                    report.failed.append((label, f"invalid case: {exc}"))
                    continue
                problems = _mismatches(case.expect, got)
                if problems:
                    report.failed.append((label, "; ".join(problems)))
                else:
                    report.passed.append(label)
    finally:
        runtime.discard()
    return report
