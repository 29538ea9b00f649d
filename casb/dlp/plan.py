"""Which DLP work a forwarded request carries, and the inspectors that do it.

The pipeline turns a decision's DLP obligations into plans (pure: no parsing happens
here); the edge runs them on the request body (``dlp``: uploads) or on the response
(``mask``). Inspectors are built once per profile of a compiled policy, on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from casb.config import DlpConfig
from casb.context import Action, Resource
from casb.dlp.profile import DlpSettings

if TYPE_CHECKING:
    from casb.dlp.inspector import Inspector


class DlpUnavailable(Exception):
    """DLP cannot run (no UID key configured for a de-identifying profile)."""


# QIDO-RS parameters that are not matching keys.
_QIDO_CONTROLS = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
_UID_TAGS = (0x0020000D, 0x0020000E, 0x00080018)  # study, series, SOP instance


class DlpInspectors:
    """The inspectors of one compiled policy's DLP section, keyed by profile name."""

    def __init__(self, settings: DlpSettings, config: DlpConfig, uid_key: bytes | None) -> None:
        self.settings = settings
        self.config = config
        self._uid_key = uid_key
        self._built: dict[str, Inspector] = {}
        self._kept: dict[str, Callable[[int | None], bool]] = {}
        self._lock = threading.Lock()

    def mask_refusal(self, profile: str, action: Action, resource: Resource) -> str | None:
        """Why a masked read must be refused, or None. Masking hides what is returned;
        matching on what it hides would still link an identity to the results (search
        PatientID=X, get X's studies), and naming original UIDs links them to the
        replaced ones. So a masked request may only match on attributes the profile
        keeps unchanged, and name UIDs only when it keeps UIDs."""
        kept = self._kept_by(profile)
        if not all(kept(tag) for tag in _UID_TAGS) and (
            resource.study_uid or resource.series_uid or resource.instance_uid
        ):
            return (
                f"the policy masks this read with profile '{profile}', which replaces UIDs: "
                "a request naming original UIDs would link them to the replaced ones"
            )
        if action != Action.SEARCH:
            return None
        refused = sorted(
            key
            for key in resource.query
            if key.lower() not in _QIDO_CONTROLS and not all(kept(tag) for tag in _tags_of(key))
        )
        if refused:
            return (
                f"the policy masks this search with profile '{profile}': matching on "
                f"{', '.join(refused)} is refused (the profile removes or changes them, and "
                "a match would link that identity to the results)"
            )
        return None

    def _kept_by(self, profile: str) -> Callable[[int | None], bool]:
        found = self._kept.get(profile)
        if found is None:
            from casb.dlp.rules import ActionTable, load_table

            table = ActionTable(load_table(), self.settings.profiles[profile].deidentify or [])

            def kept(tag: int | None) -> bool:
                return tag is not None and table.action(tag) == "K"

            found = self._kept[profile] = kept
        return found

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
    # Wraps the inspector for one request (telemetry: a span per inspected instance).
    wrap: Callable[[Inspector], Inspector] | None = field(default=None, compare=False)

    @property
    def max_header_bytes(self) -> int:
        return self.inspectors.config.max_header_bytes

    @property
    def max_json_bytes(self) -> int:
        return self.inspectors.config.max_json_bytes

    @property
    def max_object_bytes(self) -> int:
        return self.inspectors.config.max_object_bytes

    def inspector(self) -> Inspector:
        found = self.inspectors.inspector(self.profile)
        return found if self.wrap is None else self.wrap(found)


def _tags_of(key: str) -> list[int | None]:
    """The tags a QIDO key names (a keyword, or a dotted path into sequences); None for
    a part that names no attribute (refused: it cannot be shown to be kept)."""
    from pydicom.datadict import tag_for_keyword

    return [tag_for_keyword(part) for part in key.split(".")]
