"""Policy decision point: who may do what on which destination, decided in pure code.

``load_policy(paths)`` reads and compiles YAML policy files once; the result's
``decide(principal, action, resource, facts)`` answers a :class:`Decision` in
microseconds, without I/O. The file format is :mod:`casb.policy.model` (JSON Schema in
``policies/schema.json``); the decision semantics are documented in
:mod:`casb.policy.engine`.
"""

from casb.policy.decision import Decision
from casb.policy.engine import CompiledPolicy, CompiledRule
from casb.policy.loader import (
    PolicyLoadError,
    compile_policy,
    load_policy,
    parse_policy,
    policy_json_schema,
)
from casb.policy.model import PolicyDocument

__all__ = [
    "CompiledPolicy",
    "CompiledRule",
    "Decision",
    "PolicyDocument",
    "PolicyLoadError",
    "compile_policy",
    "load_policy",
    "parse_policy",
    "policy_json_schema",
]
