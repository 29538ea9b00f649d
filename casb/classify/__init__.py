"""HTTP request -> (Action, Resource).

`normalize_target` gives the one canonical reading of a request-target (or refuses
it); `effective_method` reads the method; a protocol classifier (`classify_dicomweb`)
maps the canonical form to a `Classification`; the object-store classifiers
(`classify_s3`, `classify_gcs`, `classify_azure`) do the same for S3, GCS and Azure
Blob. The proxy forwards `encode_target(...)` of what was classified (with the
classification's `forward_path` when set), never the raw target.
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
    # The upstream path segments (relative to the destination's base) when they differ
    # from the request's: S3 virtual-hosted -> path-style, GCS JSON object names as one
    # segment. None: forward the request's own segments.
    forward_path: tuple[str, ...] | None = None


# The classifiers import Classification from here, so it is defined first.
from casb.classify.dicomweb import classify_dicomweb  # noqa: E402
from casb.classify.normalize import (  # noqa: E402
    MalformedTarget,
    Target,
    effective_method,
    encode_target,
    normalize_target,
)
from casb.classify.objectstore import classify_azure, classify_gcs, classify_s3  # noqa: E402

__all__ = [
    "Classification",
    "MalformedTarget",
    "Target",
    "classify_azure",
    "classify_dicomweb",
    "classify_gcs",
    "classify_s3",
    "effective_method",
    "encode_target",
    "normalize_target",
]
