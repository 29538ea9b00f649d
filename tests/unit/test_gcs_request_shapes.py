"""Cloud Storage request shapes, as documented (GCS has no local emulator here).

Each shape is a request the public documentation shows (method, path, query and the
headers that matter), with the page it comes from. The tests read them exactly as the
pipeline does (`normalize_target`, then `classify_gcs`, then `check_at_rest`) and
assert the action, operation, bucket, key, forward path and the at-rest verdict.

Documentation used:
* Uploads (JSON media / multipart, XML PUT):
  https://cloud.google.com/storage/docs/uploading-objects
  https://cloud.google.com/storage/docs/json_api/v1/objects/insert
  https://cloud.google.com/storage/docs/xml-api/put-object-upload
* Resumable uploads (session initiation, session URI with upload_id, chunks, status):
  https://cloud.google.com/storage/docs/performing-resumable-uploads
* Reads, lists and deletes:
  https://cloud.google.com/storage/docs/downloading-objects
  https://cloud.google.com/storage/docs/json_api/v1/objects/get
  https://cloud.google.com/storage/docs/json_api/v1/objects/list
  https://cloud.google.com/storage/docs/json_api/v1/objects/delete
  https://cloud.google.com/storage/docs/xml-api/get-object-download
  https://cloud.google.com/storage/docs/xml-api/get-bucket-list
  https://cloud.google.com/storage/docs/xml-api/delete-object
* Encryption: CMEK (kmsKeyName / x-goog-encryption-kms-key-name) and CSEK headers:
  https://cloud.google.com/storage/docs/encryption/using-customer-managed-keys
  https://cloud.google.com/storage/docs/encryption/customer-supplied-keys
  https://cloud.google.com/storage/docs/encryption/using-customer-supplied-keys
* Object names in JSON API URLs are percent-encoded, "/" included:
  https://cloud.google.com/storage/docs/request-endpoints#encoding
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import quote

import pytest

from casb.classify import Classification, classify_gcs, normalize_target
from casb.config import AtRest
from casb.context import Action
from casb.encryption.at_rest import check_at_rest

BUCKET = "my-bucket"
NAME = "pets/dog.png"  # the documentation's example object name
ENCODED = quote(NAME, safe="")  # pets%2Fdog.png
KEY_RESOURCE = "projects/my-project/locations/us/keyRings/my-ring/cryptoKeys/my-key"
# A customer-supplied key and its SHA-256, both standard Base64 (as the CSEK page shows).
CSEK_KEY = "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE="
CSEK_SHA = "2dSxwoH8CrPeHaXcT4VxlN9ZA9bsDVsMHMBKuQbXuDs="
CSEK = (
    ("x-goog-encryption-algorithm", "AES256"),
    ("x-goog-encryption-key", CSEK_KEY),
    ("x-goog-encryption-key-sha256", CSEK_SHA),
)
JSON_BODY = (("Content-Type", "application/json; charset=UTF-8"),)
PNG = (("Content-Type", "image/png"),)


@dataclass(frozen=True)
class Shape:
    doc: str
    method: str
    target: str
    headers: Sequence[tuple[str, str]]
    action: Action
    operation: str
    key: str | None
    forward_path: tuple[str, ...] | None = None


def classify(shape: Shape, extra: Sequence[tuple[str, str]] = ()) -> Classification:
    target = normalize_target(shape.target)
    return classify_gcs(
        shape.method, target.segments, target.query, (*shape.headers, *extra), "gcs"
    )


def at_rest(
    shape: Shape,
    rule: AtRest,
    *,
    extra_headers: Sequence[tuple[str, str]] = (),
    extra_query: str = "",
) -> str | None:
    target = shape.target + (
        ("&" if "?" in shape.target else "?") + extra_query if extra_query else ""
    )
    result = classify(replace(shape, target=target), extra_headers)
    assert result.action is shape.action, result.reason
    return check_at_rest(
        "gcs",
        result.resource.operation,
        (*shape.headers, *extra_headers),
        normalize_target(target).query,
        rule,
    )


# -- uploads ------------------------------------------------------------------------------

MEDIA = Shape(
    # uploading-objects (JSON API, single-request upload): POST .../o?uploadType=media&name=
    "uploading-objects#uploading-an-object",
    "POST",
    f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={ENCODED}",
    PNG,
    Action.STORE,
    "InsertObject:media",
    NAME,
)
MULTIPART = Shape(
    # uploading-objects (JSON API multipart upload): metadata + data in multipart/related;
    # the name is in the metadata part of the body, not the URL.
    "uploading-objects#uploading-an-object (multipart)",
    "POST",
    f"/upload/storage/v1/b/{BUCKET}/o?uploadType=multipart",
    (("Content-Type", "multipart/related; boundary=BOUNDARY_STRING"),),
    Action.STORE,
    "InsertObject:multipart",
    None,
)
RESUMABLE_START = Shape(
    # performing-resumable-uploads: POST .../o?uploadType=resumable&name=OBJECT_NAME
    "performing-resumable-uploads#initiate-session",
    "POST",
    f"/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&name={ENCODED}",
    (*JSON_BODY, ("X-Upload-Content-Type", "image/png"), ("X-Upload-Content-Length", "2000000")),
    Action.STORE,
    "InsertObject:resumable",
    NAME,
)
RESUMABLE_CHUNK = Shape(
    # performing-resumable-uploads: PUT to the session URI (the Location header the
    # initiation returned: ...o?uploadType=resumable&name=...&upload_id=...), one chunk.
    "performing-resumable-uploads#chunked-upload",
    "PUT",
    f"/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&name={ENCODED}&upload_id=xa298sd_sdlkj2",
    (("Content-Length", "524288"), ("Content-Range", "bytes 0-524287/2000000")),
    Action.STORE,
    "ResumableUpload",
    NAME,
)
RESUMABLE_STATUS = Shape(
    # performing-resumable-uploads#status-check: an empty PUT with Content-Range bytes */N
    "performing-resumable-uploads#status-check",
    "PUT",
    f"/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&upload_id=xa298sd_sdlkj2",
    (("Content-Length", "0"), ("Content-Range", "bytes */2000000")),
    Action.STORE,
    "ResumableUpload",
    None,
)
XML_PUT = Shape(
    # xml-api/put-object-upload: PUT /BUCKET_NAME/OBJECT_NAME (path-style endpoint);
    # "/" in the name is literal in XML API paths.
    "xml-api/put-object-upload",
    "PUT",
    f"/{BUCKET}/{NAME}",
    PNG,
    Action.STORE,
    "XmlPutObject",
    NAME,
)

UPLOADS = [MEDIA, MULTIPART, RESUMABLE_START, XML_PUT]

# -- reads, lists, deletes ------------------------------------------------------------------

READS = [
    Shape(
        # downloading-objects (JSON API): GET .../b/BUCKET/o/OBJECT?alt=media
        "downloading-objects / json_api/v1/objects/get",
        "GET",
        f"/storage/v1/b/{BUCKET}/o/{ENCODED}?alt=media",
        (),
        Action.RETRIEVE,
        "GetObject",
        NAME,
        ("storage", "v1", "b", BUCKET, "o", NAME),
    ),
    Shape(
        # json_api/v1/objects/get without alt=media returns the object's metadata
        "json_api/v1/objects/get",
        "GET",
        f"/storage/v1/b/{BUCKET}/o/{ENCODED}",
        (),
        Action.RETRIEVE_METADATA,
        "GetObjectMetadata",
        NAME,
        ("storage", "v1", "b", BUCKET, "o", NAME),
    ),
    Shape(
        # json_api/v1/objects/list with prefix and delimiter
        "json_api/v1/objects/list",
        "GET",
        f"/storage/v1/b/{BUCKET}/o?prefix=pets%2F&delimiter=%2F",
        (),
        Action.LIST,
        "ListObjects",
        None,
    ),
    Shape(
        # json_api/v1/objects/delete: DELETE .../b/BUCKET/o/OBJECT
        "json_api/v1/objects/delete",
        "DELETE",
        f"/storage/v1/b/{BUCKET}/o/{ENCODED}",
        (),
        Action.DELETE,
        "DeleteObject",
        NAME,
        ("storage", "v1", "b", BUCKET, "o", NAME),
    ),
    Shape(
        # The client libraries' media download endpoint: /download/storage/v1/...?alt=media
        "downloading-objects (client libraries)",
        "GET",
        f"/download/storage/v1/b/{BUCKET}/o/{ENCODED}?alt=media",
        (),
        Action.RETRIEVE,
        "GetObject",
        NAME,
        ("download", "storage", "v1", "b", BUCKET, "o", NAME),
    ),
    Shape(
        # xml-api/get-object-download: GET /BUCKET_NAME/OBJECT_NAME
        "xml-api/get-object-download",
        "GET",
        f"/{BUCKET}/{NAME}",
        (),
        Action.RETRIEVE,
        "XmlGetObject",
        NAME,
    ),
    Shape(
        # xml-api/get-bucket-list: GET /BUCKET_NAME?prefix=...
        "xml-api/get-bucket-list",
        "GET",
        f"/{BUCKET}?prefix=pets%2F",
        (),
        Action.LIST,
        "XmlListObjects",
        None,
    ),
    Shape(
        # xml-api/delete-object: DELETE /BUCKET_NAME/OBJECT_NAME
        "xml-api/delete-object",
        "DELETE",
        f"/{BUCKET}/{NAME}",
        (),
        Action.DELETE,
        "XmlDeleteObject",
        NAME,
    ),
]

ALL = [*UPLOADS, RESUMABLE_CHUNK, RESUMABLE_STATUS, *READS]


@pytest.mark.parametrize("shape", ALL, ids=lambda s: f"{s.method} {s.doc}")
def test_documented_shapes_classify(shape: Shape) -> None:
    result = classify(shape)
    assert result.reason == ""
    assert result.action is shape.action
    assert result.resource.operation == shape.operation
    assert result.resource.bucket == BUCKET
    assert result.resource.key == shape.key
    assert result.forward_path == shape.forward_path
    assert not result.resource.query


def test_json_object_name_travels_as_one_segment() -> None:
    # The client sends pets%2Fdog.png; normalization splits it; the classifier puts it
    # back as one segment, which the edge re-encodes as pets%2Fdog.png.
    result = classify(READS[0])
    assert result.forward_path is not None
    assert result.forward_path[-1] == NAME
    assert normalize_target(READS[0].target).segments[-2:] == ("pets", "dog.png")


# -- at-rest verdicts -----------------------------------------------------------------------

ANY_KEY = AtRest()  # CMEK with any key, or CSEK
ONE_KEY = AtRest(kms_keys=[KEY_RESOURCE], customer_keys=False)


@pytest.mark.parametrize("shape", [MEDIA, MULTIPART, RESUMABLE_START], ids=lambda s: s.operation)
def test_json_upload_with_cmek_is_accepted(shape: Shape) -> None:
    # using-customer-managed-keys (JSON API): ...&kmsKeyName=KEY_RESOURCE
    query = "kmsKeyName=" + quote(KEY_RESOURCE, safe="")
    assert at_rest(shape, ANY_KEY, extra_query=query) is None
    assert at_rest(shape, ONE_KEY, extra_query=query) is None


@pytest.mark.parametrize("shape", [MEDIA, MULTIPART, RESUMABLE_START], ids=lambda s: s.operation)
def test_json_upload_with_another_cmek_is_refused_when_keys_are_listed(shape: Shape) -> None:
    other = quote("projects/x/locations/us/keyRings/r/cryptoKeys/other", safe="")
    message = at_rest(shape, ONE_KEY, extra_query="kmsKeyName=" + other)
    assert message is not None
    assert "kmsKeyName" in message and KEY_RESOURCE in message
    assert "other" not in message


@pytest.mark.parametrize("shape", UPLOADS, ids=lambda s: s.operation)
def test_upload_with_csek_is_accepted(shape: Shape) -> None:
    # customer-supplied-keys: x-goog-encryption-algorithm / -key / -key-sha256
    assert at_rest(shape, ANY_KEY, extra_headers=CSEK) is None


@pytest.mark.parametrize("shape", UPLOADS, ids=lambda s: s.operation)
def test_upload_with_csek_is_refused_where_customer_keys_are_not(shape: Shape) -> None:
    message = at_rest(shape, ONE_KEY, extra_headers=CSEK)
    assert message is not None and "CSEK" in message
    assert CSEK_KEY not in message and CSEK_SHA not in message


@pytest.mark.parametrize("shape", [MEDIA, MULTIPART, RESUMABLE_START], ids=lambda s: s.operation)
def test_json_upload_without_encryption_names_kms_key_name_and_csek(shape: Shape) -> None:
    message = at_rest(shape, ANY_KEY)
    assert message is not None
    assert "the kmsKeyName query parameter is missing" in message
    assert "x-goog-encryption-algorithm" in message
    assert "x-goog-encryption-key-sha256" in message


def test_xml_upload_with_cmek_header_is_accepted() -> None:
    # using-customer-managed-keys (XML API): x-goog-encryption-kms-key-name: KEY_RESOURCE
    header = (("x-goog-encryption-kms-key-name", KEY_RESOURCE),)
    assert at_rest(XML_PUT, ANY_KEY, extra_headers=header) is None
    assert at_rest(XML_PUT, ONE_KEY, extra_headers=header) is None


def test_xml_upload_without_encryption_names_the_header() -> None:
    message = at_rest(XML_PUT, ANY_KEY)
    assert message is not None
    assert "the x-goog-encryption-kms-key-name header is missing" in message
    assert "x-goog-encryption-key" in message
    only_cmek = at_rest(XML_PUT, ONE_KEY)
    assert only_cmek is not None and KEY_RESOURCE in only_cmek
    assert "x-goog-encryption-algorithm" not in only_cmek  # CSEK is not offered


def test_xml_upload_cannot_use_the_json_query_parameter() -> None:
    # kmsKeyName is a JSON API parameter: on an XML PUT it is not a known parameter.
    target = normalize_target(XML_PUT.target + "?kmsKeyName=" + quote(KEY_RESOURCE, safe=""))
    result = classify_gcs("PUT", target.segments, target.query, XML_PUT.headers, "gcs")
    assert result.action is Action.UNKNOWN


@pytest.mark.parametrize("shape", [RESUMABLE_CHUNK, RESUMABLE_STATUS], ids=lambda s: s.doc)
def test_resumable_chunks_inherit_the_session_encryption(shape: Shape) -> None:
    assert at_rest(shape, ANY_KEY) is None
    assert at_rest(shape, ONE_KEY) is None
    # CSEK sessions repeat the key headers on every chunk: complete sets are fine ...
    assert at_rest(shape, ANY_KEY, extra_headers=CSEK) is None
    # ... a partial set is refused, naming what is missing.
    message = at_rest(shape, ANY_KEY, extra_headers=CSEK[:2])
    assert message is not None and "x-goog-encryption-key-sha256" in message
    assert CSEK_KEY not in message


def test_reads_need_no_at_rest_headers() -> None:
    for shape in READS:
        assert at_rest(shape, ONE_KEY) is None
