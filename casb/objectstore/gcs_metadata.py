"""GCS JSON API uploads carry the object's metadata in the body (the first part of an
`uploadType=multipart` body, the whole body of the POST that starts a resumable upload),
and that metadata may carry an `acl` that opens the object to `allUsers`. Access is
decided by casb's policy, so an upload whose metadata names an ACL is refused, as is
metadata that cannot be read (fail closed). Pure: the edge hands over the whole body.
"""

from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP

MAX_METADATA_BYTES = 1024 * 1024


def _metadata_of(operation: str, content_type: str, body: bytes) -> object:
    if operation == "InsertObject:resumable":
        if not body.strip():
            return {}
        return json.loads(body[: MAX_METADATA_BYTES + 1])
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise ValueError("not a multipart body")
    parts = list(message.iter_parts())
    if len(parts) != 2:
        raise ValueError("a multipart upload has a metadata part and a media part")
    payload = parts[0].get_payload(decode=True)
    if not isinstance(payload, bytes) or len(payload) > MAX_METADATA_BYTES:
        raise ValueError("unreadable metadata part")
    return json.loads(payload)


def metadata_refusal(operation: str, content_type: str, body: bytes) -> str | None:
    """Why this GCS JSON upload's metadata is refused, or None."""
    if operation not in ("InsertObject:multipart", "InsertObject:resumable"):
        return None
    try:
        metadata = _metadata_of(operation, content_type, body)
    except (ValueError, UnicodeError):
        return "the upload's object metadata (JSON) cannot be read"
    if not isinstance(metadata, dict):
        return "the upload's object metadata must be a JSON object"
    if "acl" in metadata:
        return (
            "uploads may not set object ACLs (the metadata's 'acl'): access is decided by "
            "casb's policy"
        )
    return None
