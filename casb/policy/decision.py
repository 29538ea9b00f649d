"""The policy decision: a small immutable value, and the JSON the proxy audits.

The same JSON is returned by ``casb policy explain`` and the admin ``simulate``
endpoint, so an operator sees exactly what the proxy recorded. Reasons name rule ids,
condition kinds, keys, actions, destinations and roles, never request values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

EMPTY_OBLIGATIONS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of the policy decision point.

    ``rule_id`` names the deciding rule, or is None for the default deny. ``obligations``
    tell enforcement what it must do on an allow (e.g. ``deidentify: research-basic``);
    list values are tuples. ``step_up`` marks a default deny that multi-factor
    authentication would have turned into an allow: enforcement answers 401
    ``insufficient_user_authentication`` instead of 403.
    """

    allow: bool
    rule_id: str | None
    reasons: tuple[str, ...]
    obligations: Mapping[str, Any] = field(default_factory=lambda: EMPTY_OBLIGATIONS)
    step_up: bool = False

    @property
    def effect(self) -> str:
        """``"allow"`` or ``"deny"``."""
        return "allow" if self.allow else "deny"

    def to_json(self) -> dict[str, Any]:
        """The audit / explain form: plain JSON types only (tuples become lists)."""
        return {
            "decision": "allow" if self.allow else "deny",
            "rule_id": self.rule_id,
            "reasons": list(self.reasons),
            "obligations": {
                key: list(value) if isinstance(value, tuple | list) else value
                for key, value in self.obligations.items()
            },
            "step_up": self.step_up,
        }
