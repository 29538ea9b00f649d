"""Which object-store operations envelope encryption can serve, and how.

The proxy encrypts a whole object in one request (its length known up front: the
ciphertext length is computed from it) and decrypts objects on read. Operations that
assemble an object from several requests (S3 multipart uploads, Azure blocks, GCS
resumable and JSON multipart uploads, browser POST) cannot be envelope-encrypted in this
version: they are refused, never stored in plaintext. A copy keeps the ciphertext and its
metadata, so it is allowed only inside the same bucket (whose objects the proxy sealed),
without replacing the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

# Where the envelope metadata rides, per store: header prefix and separator (Azure
# metadata names must be C# identifiers: no '-').
META_PREFIX = {"s3": "x-amz-meta-", "gcs": "x-goog-meta-", "azure_blob": "x-ms-meta-"}


def meta_name(kind: str, name: str) -> str:
    """Header name of envelope metadata item `name` ("casb-kek") for a store."""
    if kind == "azure_blob":
        name = name.replace("-", "_")
    return META_PREFIX[kind] + name


class EnvelopeOp(Enum):
    ENCRYPT = "encrypt"  # the request body is the whole object: seal it
    DECRYPT = "decrypt"  # the response body is an object: open it
    METADATA = "metadata"  # HEAD: report the plaintext length
    PASS = "pass"  # noqa: S105 (not a password) — no object bytes (list, delete, abort): nothing to do


_OPS: dict[str, dict[str, EnvelopeOp]] = {
    "s3": {
        "PutObject": EnvelopeOp.ENCRYPT,
        "GetObject": EnvelopeOp.DECRYPT,
        "CopyObject": EnvelopeOp.PASS,
        "ListObjects": EnvelopeOp.PASS,
        "ListObjectsV2": EnvelopeOp.PASS,
        "ListBuckets": EnvelopeOp.PASS,
        "ListMultipartUploads": EnvelopeOp.PASS,
        "ListParts": EnvelopeOp.PASS,
        "AbortMultipartUpload": EnvelopeOp.PASS,
        "DeleteObject": EnvelopeOp.PASS,
        "DeleteObjects": EnvelopeOp.PASS,
    },
    "azure_blob": {
        "PutBlob": EnvelopeOp.ENCRYPT,
        "GetBlob": EnvelopeOp.DECRYPT,
        "ListBlobs": EnvelopeOp.PASS,
        "DeleteBlob": EnvelopeOp.PASS,
    },
    "gcs": {
        "XmlPutObject": EnvelopeOp.ENCRYPT,
        "XmlGetObject": EnvelopeOp.DECRYPT,
        "XmlListObjects": EnvelopeOp.PASS,
        "XmlDeleteObject": EnvelopeOp.PASS,
    },
}


def envelope_op(
    kind: str,
    operation: str,
    *,
    method: str,
    headers: Sequence[tuple[str, str]],
    copy_in_destination: bool,
) -> EnvelopeOp | str:
    """The envelope work for one request, or the reason it is refused."""
    op = _OPS.get(kind, {}).get(operation)
    if op is None:
        return (
            f"{operation or 'this request'} cannot be envelope-encrypted: this destination "
            "stores only objects the proxy encrypts whole, so send the object in one "
            "request (for boto3, raise TransferConfig's multipart_threshold)"
        )
    if op is EnvelopeOp.DECRYPT and method == "HEAD":
        return EnvelopeOp.METADATA
    if operation == "CopyObject":
        directive = [v for n, v in headers if n.lower() == "x-amz-metadata-directive"]
        if not copy_in_destination:
            return "a copy into an envelope-encrypted bucket must come from the same bucket"
        if any(v.strip().upper() != "COPY" for v in directive):
            return (
                "a copy must keep the object's metadata (x-amz-metadata-directive: COPY): "
                "the envelope's wrapped key rides in it"
            )
    return op
