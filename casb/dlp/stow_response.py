"""PS3.18 STOW-RS answers for instances DLP kept from the upstream.

Each instance DLP did not forward becomes an item of the Failed SOP Sequence (0008,1198)
with Referenced SOP Class UID (0008,1150), Referenced SOP Instance UID (0008,1155) (their
values omitted when DLP could not read them) and Failure Reason (0008,1197, US):

====================  =========  ===========================================================
Failure Reason        Meaning    When
====================  =========  ===========================================================
0x0124 (292)          Refused:   the instance was blocked by the DLP policy (a finding matched
                      Not        the profile's ``block`` list)
                      authorized
0xC000 (49152)        Error:     DLP could not parse the instance (truncated, garbage, bad
                      Cannot     framing, unreadable JSON) — fail closed, never forwarded
                      understand
0xA700 (42752)        Refused:   the instance's header (everything before Pixel Data) or its
                      Out of     JSON part is larger than the configured cap
                      resources  (``dlp.max_header_bytes`` / ``dlp.max_json_bytes``)
====================  =========  ===========================================================

:func:`merge_stow_response` folds these failures into the upstream's own STOW-RS answer
(DICOM JSON, application/dicom+json); :func:`stow_failure_body` builds an answer holding
only ours (409 Conflict when nothing reached the upstream).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final, Protocol

FAILURE_BLOCKED: Final = 0x0124  # Refused: Not authorized
FAILURE_UNREADABLE: Final = 0xC000  # Error: Cannot understand
FAILURE_TOO_LARGE: Final = 0xA700  # Refused: Out of resources

CONTENT_TYPE: Final = "application/dicom+json"

_FAILED_SOP_SEQUENCE: Final = "00081198"
_REFERENCED_SOP_SEQUENCE: Final = "00081199"
_REFERENCED_SOP_CLASS_UID: Final = "00081150"
_REFERENCED_SOP_INSTANCE_UID: Final = "00081155"
_FAILURE_REASON: Final = "00081197"


class FailedInstance(Protocol):
    """What a failure item needs (casb.dlp.multipart_stream.PartResult has it)."""

    @property
    def failure_code(self) -> int | None: ...

    @property
    def sop_class_uid(self) -> str: ...

    @property
    def sop_instance_uid(self) -> str: ...


def _uid(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def failed_sop_items(failures: Sequence[FailedInstance]) -> list[dict[str, Any]]:
    """Failed SOP Sequence items for the failures that carry a failure code."""
    return [
        {
            _REFERENCED_SOP_CLASS_UID: _uid(f.sop_class_uid),
            _REFERENCED_SOP_INSTANCE_UID: _uid(f.sop_instance_uid),
            _FAILURE_REASON: {"vr": "US", "Value": [f.failure_code]},
        }
        for f in failures
        if f.failure_code is not None
    ]


def stow_failure_body(failures: Sequence[FailedInstance]) -> bytes:
    """A STOW-RS response body (DICOM JSON) holding only our failures."""
    body = {_FAILED_SOP_SEQUENCE: {"vr": "SQ", "Value": failed_sop_items(failures)}}
    return json.dumps(body, separators=(",", ":")).encode("ascii")


def _dicom_json(body: bytes, content_type: str) -> dict[str, Any] | None:
    """The upstream's answer as a DICOM JSON dataset, or None (absent, XML, not JSON...)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if not body.strip() or media.endswith("xml") or media.startswith("text/html"):
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if isinstance(parsed, list) and len(parsed) == 1:
        parsed = parsed[0]
    if not isinstance(parsed, dict):
        return None
    return parsed


def _stored_any(dataset: dict[str, Any]) -> bool:
    referenced = dataset.get(_REFERENCED_SOP_SEQUENCE)
    return isinstance(referenced, dict) and bool(referenced.get("Value"))


def _with_failures(dataset: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(dataset)
    failed = merged.get(_FAILED_SOP_SEQUENCE)
    existing = failed.get("Value") if isinstance(failed, dict) else None
    values = list(existing) if isinstance(existing, list) else []
    merged[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": values + items}
    return merged


def merge_stow_response(
    upstream_status: int,
    upstream_body: bytes,
    upstream_content_type: str,
    failures: Sequence[FailedInstance],
) -> tuple[int, bytes] | None:
    """The STOW-RS answer for the client: ``None`` to pass the upstream's through untouched
    (no failures of ours), else ``(status, DICOM JSON body)``.

    Our failure items are appended to the upstream's Failed SOP Sequence. Status: 202 when
    the upstream stored at least one instance (non-empty Referenced SOP Sequence), else 409
    — for upstream answers below 400 and for 400/409. Any other upstream error (401, 403,
    413, 5xx, ...) keeps its status: our failures are added to its body when that is DICOM
    JSON, else the body holds only ours.
    """
    items = failed_sop_items(failures)
    if not items:
        return None
    upstream = _dicom_json(upstream_body, upstream_content_type)
    if upstream_status >= 400 and upstream_status not in (400, 409):
        if upstream is None:
            return upstream_status, stow_failure_body(failures)
        status = upstream_status
    else:
        upstream = upstream if upstream is not None else {}
        status = 202 if _stored_any(upstream) else 409
    body = json.dumps(_with_failures(upstream, items), separators=(",", ":"))
    return status, body.encode("utf-8")
