"""Which DLP work a forwarded request carries, and the inspectors that do it.

The pipeline turns a decision's DLP obligations into plans (pure: no parsing happens
here); the edge runs them on the request body (``dlp``: uploads) or on the response
(``mask``). Inspectors are built once per profile of a compiled policy, on first use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from casb.config import DlpConfig
from casb.dlp.profile import DlpSettings

if TYPE_CHECKING:
    from casb.dlp.inspector import Inspector


class DlpUnavailable(Exception):
    """DLP cannot run (no UID key configured for a de-identifying profile)."""


class DlpInspectors:
    """The inspectors of one compiled policy's DLP section, keyed by profile name."""

    def __init__(self, settings: DlpSettings, config: DlpConfig, uid_key: bytes | None) -> None:
        self.settings = settings
        self.config = config
        self._uid_key = uid_key
        self._built: dict[str, Inspector] = {}
        self._lock = threading.Lock()

    def missing_key_profiles(self) -> list[str]:
        """Profiles that de-identify while no UID key is configured."""
        if self._uid_key is not None:
            return []
        return sorted(n for n, p in self.settings.profiles.items() if p.deidentify is not None)

    def inspector(self, profile: str) -> Inspector:
        found = self._built.get(profile)
        if found is not None:
            return found
        from casb.dlp.inspector import Inspector  # pydicom loads only when DLP is used

        spec = self.settings.profiles[profile]
        if spec.deidentify is not None and self._uid_key is None:
            raise DlpUnavailable(
                f"DLP profile '{profile}' de-identifies but no UID key is configured "
                "(dlp.uid_key_file or dlp.uid_key_env)"
            )
        with self._lock:
            found = self._built.get(profile)
            if found is None:
                found = Inspector(spec, self.settings, uid_key=self._uid_key or b"")
                self._built[profile] = found
        return found


@dataclass(frozen=True, slots=True)
class DlpPlan:
    """Inspect the request body (uploads) or the response with a named profile."""

    direction: Literal["request", "response"]
    profile: str
    inspectors: DlpInspectors

    @property
    def max_header_bytes(self) -> int:
        return self.inspectors.config.max_header_bytes

    @property
    def max_json_bytes(self) -> int:
        return self.inspectors.config.max_json_bytes

    def inspector(self) -> Inspector:
        return self.inspectors.inspector(self.profile)
