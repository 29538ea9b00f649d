"""GCS JSON upload metadata: an `acl` in it would open the object; casb refuses it.
Bodies shaped as the JSON API documents them
(https://cloud.google.com/storage/docs/uploading-objects#uploading-an-object,
https://cloud.google.com/storage/docs/performing-resumable-uploads)."""

from __future__ import annotations

import json

import pytest

from casb.objectstore.gcs_metadata import metadata_refusal

BOUNDARY = "separator_string"
CTYPE = f"multipart/related; boundary={BOUNDARY}"


def multipart(metadata: object, media: bytes = b"\x00DICM\xff binary") -> bytes:
    meta = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode()
        + meta
        + f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + media
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def test_plain_metadata_passes() -> None:
    body = multipart({"name": "ct/1.dcm", "contentType": "application/dicom"})
    assert metadata_refusal("InsertObject:multipart", CTYPE, body) is None
    assert metadata_refusal("InsertObject:resumable", "application/json", b'{"name": "a"}') is None
    assert metadata_refusal("InsertObject:resumable", "application/json", b"") is None


@pytest.mark.parametrize("operation", ["InsertObject:multipart", "InsertObject:resumable"])
def test_an_acl_in_the_metadata_is_refused(operation: str) -> None:
    meta = {"name": "a.dcm", "acl": [{"entity": "allUsers", "role": "READER"}]}
    body = multipart(meta) if operation.endswith("multipart") else json.dumps(meta).encode()
    ctype = CTYPE if operation.endswith("multipart") else "application/json"
    problem = metadata_refusal(operation, ctype, body)
    assert problem is not None and "acl" in problem and "allUsers" not in problem


@pytest.mark.parametrize(
    "body",
    [
        b"not multipart at all",
        multipart(b"{not json"),
        multipart(b"[1, 2]"),
        # a metadata part and no media part
        (
            f"--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}"
            + f"\r\n--{BOUNDARY}--\r\n"
        ).encode(),
    ],
)
def test_unreadable_metadata_fails_closed(body: bytes) -> None:
    assert metadata_refusal("InsertObject:multipart", CTYPE, body) is not None


def test_other_operations_are_not_its_business() -> None:
    assert metadata_refusal("InsertObject:media", "application/dicom", b'{"acl": 1}') is None
