"""Uploads must not publish what they store: canned ACLs and grants that open an object
to the world (or to every authenticated cloud user, or to other accounts) are refused.

S3 `x-amz-acl: public-read | public-read-write | authenticated-read` and any
`x-amz-grant-*` header (grants name other accounts or groups); GCS XML
`x-goog-acl` (or its `x-amz-acl` twin, which GCS honours) with the same values (the
JSON API's `predefinedAcl` is refused by the classifier). Azure has no per-blob public access (it
is a container setting, and container operations are not forwarded).
"""

from __future__ import annotations

from collections.abc import Sequence

_OPEN_CANNED = frozenset({"public-read", "public-read-write", "authenticated-read"})
# GCS's XML API also honours x-amz-* headers that have an x-goog-* twin.
_ACL_HEADERS = {"s3": ("x-amz-acl",), "gcs": ("x-goog-acl", "x-amz-acl")}


def public_access_refusal(kind: str, headers: Sequence[tuple[str, str]]) -> str | None:
    """Why an upload's ACL headers are refused, or None."""
    acls = _ACL_HEADERS.get(kind)
    if acls is None:
        return None
    for name, value in headers:
        lname = name.lower()
        if lname in acls and value.strip().lower() in _OPEN_CANNED:
            return (
                f"uploads may not open objects to others: {lname} "
                f"{value.strip().lower()} is refused (use private or bucket-owner-full-control)"
            )
        if lname.startswith("x-amz-grant-"):
            return (
                f"uploads may not grant access to others: the {lname} header is refused "
                "(access is decided by casb's policy)"
            )
    return None
