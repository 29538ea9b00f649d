"""HTTP request -> (Action, Resource).

`normalize_target` gives the one canonical reading of a request-target (or refuses
it); `effective_method` reads the method; a protocol classifier (`classify_dicomweb`)
maps the canonical form to a `Classification`. The proxy forwards
`encode_target(...)` of what was classified, never the raw target.
"""

from __future__ import annotations

from dataclasses import dataclass

from casb.context import Action, Resource


@dataclass(frozen=True, slots=True)
class Classification:
    """What a request does and to what. `reason` says why it is UNKNOWN ("" otherwise);
    it never quotes the request."""

    action: Action
    resource: Resource
    reason: str = ""


# The classifiers import Classification from here, so it is defined first.
from casb.classify.dicomweb import classify_dicomweb  # noqa: E402
from casb.classify.normalize import (  # noqa: E402
    MalformedTarget,
    Target,
    effective_method,
    encode_target,
    normalize_target,
)

__all__ = [
    "Classification",
    "MalformedTarget",
    "Target",
    "classify_dicomweb",
    "effective_method",
    "encode_target",
    "normalize_target",
]
