"""Object-store classification: S3 (path-style and virtual-hosted), GCS, Azure Blob.

Request shapes are those the SDKs send (recorded from boto3 1.35 and azure-storage-blob
12 with their transport stubbed out), read through `normalize_target` as the pipeline
does. Anything outside the whitelist must be `unknown`, with a reason that quotes
nothing from the request.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from casb.classify import (
    Classification,
    classify_azure,
    classify_gcs,
    classify_s3,
    normalize_target,
)
from casb.context import Action

PHI = "Doe^Jane"  # appears in hostile keys / values: must never reach a reason
Headers = Sequence[tuple[str, str]]


def s3(
    method: str, target: str, headers: Headers = (), host_bucket: str | None = None
) -> Classification:
    t = normalize_target(target)
    return classify_s3(method, t.segments, t.query, headers, "s3dest", host_bucket)


def gcs(method: str, target: str, headers: Headers = ()) -> Classification:
    t = normalize_target(target)
    return classify_gcs(method, t.segments, t.query, headers, "gcsdest")


AZURITE = "http://127.0.0.1:10000/devstoreaccount1"
PROXY_URL = "https://casb.example.org:8443/azure"


def azure(method: str, target: str, headers: Headers = ()) -> Classification:
    t = normalize_target(target)
    return classify_azure(
        method, t.segments, t.query, headers, "azdest", account_urls=(AZURITE, PROXY_URL)
    )


def assert_unknown(result: Classification, target: str = "") -> None:
    assert result.action is Action.UNKNOWN
    assert result.reason
    assert result.resource.bucket is None and result.resource.key is None
    assert result.resource.operation == ""
    assert result.forward_path is None
    assert "Doe" not in result.reason and "Jane" not in result.reason
    assert not result.resource.query


# -- S3: every route, in the shapes boto3 sends ---------------------------------------

S3_ROUTES = [
    # (method, target, headers, action, operation, bucket, key, route)
    ("GET", "/", (), Action.LIST, "ListBuckets", None, None, "/"),
    ("GET", "/?x-id=ListBuckets", (), Action.LIST, "ListBuckets", None, None, "/"),
    ("GET", "/bkt", (), Action.LIST, "ListObjects", "bkt", None, "/{bucket}"),
    ("HEAD", "/bkt", (), Action.LIST, "ListObjects", "bkt", None, "/{bucket}"),
    (
        "GET",
        "/bkt?prefix=research%2F&encoding-type=url",
        (),
        Action.LIST,
        "ListObjects",
        "bkt",
        None,
        "/{bucket}",
    ),
    (
        "GET",
        "/bkt?prefix=a&delimiter=%2F&max-keys=100&marker=a%2Fb",
        (),
        Action.LIST,
        "ListObjects",
        "bkt",
        None,
        "/{bucket}",
    ),
    (
        "GET",
        "/bkt?list-type=2&prefix=research%2F&encoding-type=url",
        (),
        Action.LIST,
        "ListObjectsV2",
        "bkt",
        None,
        "/{bucket}",
    ),
    (
        "GET",
        "/bkt?list-type=2&continuation-token=abc&start-after=x&fetch-owner=true&max-keys=5",
        (),
        Action.LIST,
        "ListObjectsV2",
        "bkt",
        None,
        "/{bucket}",
    ),
    ("GET", "/bkt?uploads", (), Action.LIST, "ListMultipartUploads", "bkt", None, "/{bucket}"),
    (
        "GET",
        "/bkt?uploads&prefix=a&key-marker=k&upload-id-marker=u&max-uploads=3",
        (),
        Action.LIST,
        "ListMultipartUploads",
        "bkt",
        None,
        "/{bucket}",
    ),
    ("POST", "/bkt?delete", (), Action.DELETE, "DeleteObjects", "bkt", None, "/{bucket}"),
    (
        "POST",
        "/bkt",
        (("Content-Type", "multipart/form-data; boundary=xyz"),),
        Action.STORE,
        "PostObject",
        "bkt",
        None,
        "/{bucket}",
    ),
    (
        "POST",
        "/bkt",
        (("content-type", "Multipart/Form-Data;boundary=xyz"),),
        Action.STORE,
        "PostObject",
        "bkt",
        None,
        "/{bucket}",
    ),
    ("GET", "/bkt/a/b.dcm", (), Action.RETRIEVE, "GetObject", "bkt", "a/b.dcm", "/{bucket}/{key}"),
    ("HEAD", "/bkt/a/b.dcm", (), Action.RETRIEVE, "GetObject", "bkt", "a/b.dcm", "/{bucket}/{key}"),
    (
        "GET",
        "/bkt/a/b%20c%2Bd.dcm",
        (),
        Action.RETRIEVE,
        "GetObject",
        "bkt",
        "a/b c+d.dcm",
        "/{bucket}/{key}",
    ),
    (
        "GET",
        "/bkt/a%2Fb.dcm",  # %2F was decoded into a separator: same key as /bkt/a/b.dcm
        (),
        Action.RETRIEVE,
        "GetObject",
        "bkt",
        "a/b.dcm",
        "/{bucket}/{key}",
    ),
    (
        "GET",
        "/bkt/k?versionId=v1&partNumber=2&response-content-type=application%2Fdicom"
        "&response-content-disposition=attachment&x-id=GetObject",
        (),
        Action.RETRIEVE,
        "GetObject",
        "bkt",
        "k",
        "/{bucket}/{key}",
    ),
    (
        "GET",
        "/bkt/k?AWSAccessKeyId=a&Signature=s%3D&Expires=1795633437",  # SigV2 presigned
        (),
        Action.RETRIEVE,
        "GetObject",
        "bkt",
        "k",
        "/{bucket}/{key}",
    ),
    (
        "GET",
        "/bkt/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=a%2F20240101%2Fus-east-1"
        "%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
        "&X-Amz-SignedHeaders=host&X-Amz-Signature=abc&X-Amz-Security-Token=tok",
        (),
        Action.RETRIEVE,
        "GetObject",
        "bkt",
        "k",
        "/{bucket}/{key}",
    ),
    ("GET", "/bkt/a/b.dcm?uploadId=x", (), Action.LIST, "ListParts", "bkt", "a/b.dcm", None),
    (
        "GET",
        "/bkt/k?uploadId=x&max-parts=10&part-number-marker=3",
        (),
        Action.LIST,
        "ListParts",
        "bkt",
        "k",
        None,
    ),
    ("PUT", "/bkt/a/b.dcm", (), Action.STORE, "PutObject", "bkt", "a/b.dcm", None),
    ("PUT", "/bkt/a/b.dcm?x-id=PutObject", (), Action.STORE, "PutObject", "bkt", "a/b.dcm", None),
    (
        "PUT",
        "/bkt/a/b.dcm?partNumber=1&uploadId=x",
        (),
        Action.STORE,
        "UploadPart",
        "bkt",
        "a/b.dcm",
        None,
    ),
    (
        "PUT",
        "/bkt/k?partNumber=10000&uploadId=x&x-id=UploadPart",
        (),
        Action.STORE,
        "UploadPart",
        "bkt",
        "k",
        None,
    ),
    (
        "POST",
        "/bkt/a/b.dcm?uploads",
        (),
        Action.STORE,
        "CreateMultipartUpload",
        "bkt",
        "a/b.dcm",
        None,
    ),
    (
        "POST",
        "/bkt/a/b.dcm?uploads=&x-id=CreateMultipartUpload",
        (),
        Action.STORE,
        "CreateMultipartUpload",
        "bkt",
        "a/b.dcm",
        None,
    ),
    (
        "POST",
        "/bkt/a/b.dcm?uploadId=x",
        (),
        Action.STORE,
        "CompleteMultipartUpload",
        "bkt",
        "a/b.dcm",
        None,
    ),
    (
        "DELETE",
        "/bkt/a/b.dcm?uploadId=x",
        (),
        Action.DELETE,
        "AbortMultipartUpload",
        "bkt",
        "a/b.dcm",
        None,
    ),
    ("DELETE", "/bkt/a/b.dcm", (), Action.DELETE, "DeleteObject", "bkt", "a/b.dcm", None),
    ("DELETE", "/bkt/k?versionId=v", (), Action.DELETE, "DeleteObject", "bkt", "k", None),
    ("GET", "/my.bucket-1/k", (), Action.RETRIEVE, "GetObject", "my.bucket-1", "k", None),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "action", "operation", "bucket", "key", "route"), S3_ROUTES
)
def test_s3_routes_path_style(
    method: str,
    target: str,
    headers: Headers,
    action: Action,
    operation: str,
    bucket: str | None,
    key: str | None,
    route: str | None,
) -> None:
    result = s3(method, target, headers)
    assert result.reason == ""
    assert (result.action, result.resource.operation) == (action, operation)
    assert (result.resource.bucket, result.resource.key) == (bucket, key)
    expected_route = route or ("/{bucket}/{key}" if key else "/{bucket}")
    assert result.resource.route == expected_route
    assert result.resource.destination == "s3dest"
    assert result.resource.copy_source is None
    assert result.forward_path is None  # path-style is forwarded as it came
    assert not result.resource.query  # values can be PHI


@pytest.mark.parametrize(
    ("method", "target", "headers", "action", "operation", "bucket", "key", "route"),
    [row for row in S3_ROUTES if row[5] == "bkt"],
)
def test_s3_routes_virtual_hosted_become_path_style(
    method: str,
    target: str,
    headers: Headers,
    action: Action,
    operation: str,
    bucket: str | None,
    key: str | None,
    route: str | None,
) -> None:
    hosted = "/" + target.removeprefix("/bkt").removeprefix("/")
    result = s3(method, hosted, headers, host_bucket="bkt")
    assert (result.action, result.resource.operation) == (action, operation)
    assert (result.resource.bucket, result.resource.key) == (bucket, key)
    path = normalize_target(target).segments
    assert result.forward_path == path
    assert result.forward_path[0] == "bkt"


def test_s3_virtual_hosted_root_lists_the_host_bucket_not_the_buckets() -> None:
    result = s3("GET", "/?list-type=2&prefix=a", host_bucket="bkt")
    assert (result.action, result.resource.operation) == (Action.LIST, "ListObjectsV2")
    assert result.resource.bucket == "bkt"
    assert result.forward_path == ("bkt",)


@pytest.mark.parametrize("host_bucket", ["", "BKT", "a", "bad_bucket", "192.168.1.1", PHI])
def test_s3_virtual_hosted_invalid_host_bucket(host_bucket: str) -> None:
    assert_unknown(s3("GET", "/k", host_bucket=host_bucket))


# -- S3 copies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "source", "operation", "copy_source"),
    [
        ("/bkt/a/b.dcm", "src/k/1%202.dcm?versionId=v1", "CopyObject", ("src", "k/1 2.dcm")),
        ("/bkt/a/b.dcm", "/src/k/1.dcm", "CopyObject", ("src", "k/1.dcm")),
        ("/bkt/a/b.dcm", "bkt/a%2Fc%3Fd.dcm", "CopyObject", ("bkt", "a/c?d.dcm")),
        (
            "/bkt/a/b.dcm?partNumber=1&uploadId=x",
            "src/k/1%202.dcm",
            "UploadPartCopy",
            ("src", "k/1 2.dcm"),
        ),
    ],
)
def test_s3_copy_source_is_parsed(
    target: str, source: str, operation: str, copy_source: tuple[str, str]
) -> None:
    result = s3("PUT", target, (("X-Amz-Copy-Source", source),))
    assert (result.action, result.resource.operation) == (Action.STORE, operation)
    assert result.resource.copy_source == copy_source
    assert (result.resource.bucket, result.resource.key) == ("bkt", "a/b.dcm")


@pytest.mark.parametrize(
    "source",
    [
        "",
        "bkt",  # no key
        "bkt/",
        "/bkt",
        "arn:aws:s3:us-east-1:123456789012:accesspoint/ap/object/k",  # elsewhere
        "arn%3Aaws%3As3%3A%3A%3Abkt/k",
        "BKT/k",
        "b/k",
        "bkt%2Fk/x",  # a separator hidden in the bucket
        "bkt/a/../secret",  # dot segments: the store reads the key literally
        "bkt/a//b",
        "bkt/./a",
        "bkt/k%ZZ",
        "bkt/k%FF",  # not UTF-8
        "bkt/k%0A",  # control character
        "bkt/k?versionId=",
        "bkt/k?versionId=v&x=y",
        "bkt/k?partNumber=1",
        f"bkt/{PHI}?acl",
        "bkt/" + "k" * 1025,
    ],
)
def test_s3_malformed_copy_source_is_unknown(source: str) -> None:
    assert_unknown(s3("PUT", "/bkt/k", (("x-amz-copy-source", source),)))


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/bkt/k"),
        ("POST", "/bkt/k?uploads"),
        ("DELETE", "/bkt/k"),
        ("GET", "/bkt"),
        ("POST", "/bkt?delete"),
    ],
)
def test_s3_copy_source_only_on_copies(method: str, target: str) -> None:
    assert_unknown(s3(method, target, (("x-amz-copy-source", "src/k"),)))


def test_s3_repeated_copy_source_is_unknown() -> None:
    headers = (("x-amz-copy-source", "src/a"), ("X-Amz-Copy-Source", "src/b"))
    assert_unknown(s3("PUT", "/bkt/k", headers))


def test_s3_copy_source_hoisted_into_the_query_is_unknown() -> None:
    assert_unknown(s3("PUT", "/bkt/k?x-amz-copy-source=src%2Fk"))
    assert_unknown(s3("PUT", "/bkt/k?X-Amz-Copy-Source-Range=bytes%3D0-1"))


def test_s3_other_hoisted_headers_are_ignored() -> None:
    result = s3("PUT", "/bkt/k?x-amz-meta-a=b&X-Amz-Acl=private")
    assert result.resource.operation == "PutObject"


# -- S3: hostile or unsupported ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        # subresources outside the whitelist
        ("GET", "/bkt/k?acl", ()),
        ("PUT", "/bkt/k?acl", (("x-amz-acl", "public-read"),)),
        ("GET", "/bkt/k?tagging", ()),
        ("PUT", "/bkt/k?tagging", ()),
        ("GET", "/bkt/k?attributes", ()),
        ("GET", "/bkt/k?torrent", ()),
        ("GET", "/bkt/k?retention", ()),
        ("PUT", "/bkt/k?legal-hold", ()),
        ("POST", "/bkt/k?restore", ()),
        ("POST", "/bkt/k?select&select-type=2", ()),
        ("PUT", "/bkt/k?renameObject", ()),
        ("GET", "/bkt?acl", ()),
        ("GET", "/bkt?policy", ()),
        ("PUT", "/bkt?policy", ()),
        ("GET", "/bkt?versioning", ()),
        ("GET", "/bkt?cors", ()),
        ("PUT", "/bkt?lifecycle", ()),
        ("GET", "/bkt?encryption", ()),
        ("DELETE", "/bkt?encryption", ()),
        ("PUT", "/bkt?website", ()),
        ("PUT", "/bkt?replication", ()),
        ("GET", "/bkt?versions", ()),
        ("GET", "/bkt?location", ()),
        ("GET", "/?acl", ()),
        # unknown or misplaced query keys, bad values
        ("GET", f"/bkt/k?{PHI}=1", ()),
        ("GET", f"/bkt/k?foo={PHI}", ()),
        ("GET", "/bkt/k?VersionId=v", ()),  # S3 names are case-sensitive
        ("GET", "/bkt/k?versionId=", ()),
        ("GET", "/bkt?list-type=1", ()),
        ("GET", "/bkt?list-type=2&marker=a", ()),
        ("GET", "/bkt?continuation-token=a", ()),  # a V2 parameter on V1
        ("GET", "/bkt?max-keys=abc", ()),
        ("GET", "/bkt?max-keys=-1", ()),
        ("GET", "/bkt?encoding-type=base64", ()),
        ("GET", "/bkt?uploads=x", ()),
        ("GET", "/bkt/k?uploads", ()),
        ("GET", "/bkt/k?uploadId=x&partNumber=1", ()),
        # multipart upload abuse
        ("POST", "/bkt/k?uploads&uploadId=x", ()),
        ("POST", "/bkt/k?uploadId=", ()),
        ("POST", "/bkt/k", ()),
        ("PUT", "/bkt/k?partNumber=0&uploadId=x", ()),
        ("PUT", "/bkt/k?partNumber=10001&uploadId=x", ()),
        ("PUT", "/bkt/k?partNumber=abc&uploadId=x", ()),
        ("PUT", "/bkt/k?partNumber=01&uploadId=x", ()),
        ("PUT", "/bkt/k?partNumber=%EF%BC%91&uploadId=x", ()),  # fullwidth digit one
        ("PUT", "/bkt/k?partNumber=1", ()),
        ("PUT", "/bkt/k?uploadId=x", ()),
        ("PUT", "/bkt/k?partNumber=1&uploadId=x&versionId=v", ()),
        ("DELETE", "/bkt/k?uploadId=x&versionId=v", ()),
        # duplicate query keys (any case)
        ("GET", "/bkt/k?versionId=a&versionId=b", ()),
        ("PUT", "/bkt/k?partNumber=1&uploadId=x&uploadId=y", ()),
        ("PUT", "/bkt/k?partNumber=1&partNumber=2&uploadId=x", ()),
        ("PUT", "/bkt/k?partNumber=1&uploadId=x&UploadId=y", ()),
        ("GET", "/bkt?prefix=a&prefix=b", ()),
        ("GET", "/bkt/k?x-id=GetObject&x-id=PutObject", ()),
        # methods a route does not take
        ("PUT", "/bkt", ()),  # CreateBucket
        ("DELETE", "/bkt", ()),  # DeleteBucket
        ("PUT", "/", ()),
        ("POST", "/", ()),
        ("PATCH", "/bkt/k", ()),
        ("OPTIONS", "/bkt/k", ()),
        ("TRACE", "/bkt/k", ()),
        ("POST", "/bkt", (("content-type", "application/xml"),)),
        ("POST", "/bkt", ()),
        ("POST", "/bkt?uploads", (("content-type", "multipart/form-data; boundary=x"),)),
        (
            "POST",
            "/bkt",
            (
                ("content-type", "multipart/form-data; boundary=x"),
                ("Content-Type", "application/xml"),
            ),
        ),
        # invalid bucket names
        ("GET", "/ab/k", ()),
        ("GET", "/" + "a" * 64 + "/k", ()),
        ("GET", "/Bucket/k", ()),
        ("GET", "/bad_bucket/k", ()),
        ("GET", "/-bkt/k", ()),
        ("GET", "/bkt-/k", ()),
        ("GET", "/b..kt/k", ()),
        ("GET", "/b.-kt/k", ()),
        ("GET", "/192.168.5.4/k", ()),
        ("GET", "/xn--bkt/k", ()),
        ("GET", "/bkt-s3alias/k", ()),
        ("GET", "/bkt--ol-s3/k", ()),
        ("GET", "/b%C3%BCcket/k", ()),
        ("GET", f"/{PHI}/k", ()),
        # over-long keys
        ("GET", "/bkt/" + "k" * 1025, ()),
        ("GET", "/bkt/" + "\u00e9" * 513, ()),  # 1026 bytes in UTF-8
    ],
)
def test_s3_hostile_requests_are_unknown(method: str, target: str, headers: Headers) -> None:
    assert_unknown(s3(method, target, headers), target)


def test_s3_longest_key_is_accepted() -> None:
    assert s3("GET", "/bkt/" + "k" * 1024).resource.key == "k" * 1024
    assert s3("GET", "/" + "a" * 63 + "/k").resource.bucket == "a" * 63


def test_s3_reason_names_the_problem_not_the_request() -> None:
    assert "partNumber" in s3("PUT", "/bkt/k?partNumber=0&uploadId=x").reason
    assert "repeated" in s3("GET", "/bkt/k?versionId=a&versionId=b").reason
    assert "bucket" in s3("GET", f"/{PHI}/k").reason
    assert "not accepted" in s3("GET", "/bkt/k?acl").reason


# -- GCS: JSON and XML APIs ------------------------------------------------------------------
# (shapes from the documented APIs: see test_gcs_request_shapes.py for the citations)

GCS_ROUTES = [
    # (method, target, action, operation, bucket, key, forward_path)
    (
        "POST",
        "/upload/storage/v1/b/bkt/o?uploadType=media&name=a%2Fb.dcm",
        Action.STORE,
        "InsertObject:media",
        "bkt",
        "a/b.dcm",
        None,
    ),
    (
        "POST",
        "/upload/storage/v1/b/bkt/o?uploadType=multipart",
        Action.STORE,
        "InsertObject:multipart",
        "bkt",
        None,
        None,
    ),
    (
        "POST",
        "/upload/storage/v1/b/bkt/o?uploadType=resumable&name=k&kmsKeyName=projects%2Fp",
        Action.STORE,
        "InsertObject:resumable",
        "bkt",
        "k",
        None,
    ),
    (
        "PUT",
        "/upload/storage/v1/b/bkt/o?uploadType=resumable&name=k&upload_id=xa298sd_sdlkj2",
        Action.STORE,
        "ResumableUpload",
        "bkt",
        "k",
        None,
    ),
    (
        "PUT",
        "/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=xa298",
        Action.STORE,
        "ResumableUpload",
        "bkt",
        None,
        None,
    ),
    (
        "GET",
        "/storage/v1/b/bkt/o?prefix=research%2F&delimiter=%2F&maxResults=10&pageToken=t",
        Action.LIST,
        "ListObjects",
        "bkt",
        None,
        None,
    ),
    (
        "GET",
        "/storage/v1/b/bkt/o/k.dcm",
        Action.RETRIEVE_METADATA,
        "GetObjectMetadata",
        "bkt",
        "k.dcm",
        None,
    ),
    (
        "GET",
        "/storage/v1/b/bkt/o/a%2Fb.dcm",
        Action.RETRIEVE_METADATA,
        "GetObjectMetadata",
        "bkt",
        "a/b.dcm",
        ("storage", "v1", "b", "bkt", "o", "a/b.dcm"),
    ),
    (
        "GET",
        "/storage/v1/b/bkt/o/a%2Fb.dcm?alt=media&generation=5",
        Action.RETRIEVE,
        "GetObject",
        "bkt",
        "a/b.dcm",
        ("storage", "v1", "b", "bkt", "o", "a/b.dcm"),
    ),
    (
        "HEAD",
        "/storage/v1/b/bkt/o/k?alt=json",
        Action.RETRIEVE_METADATA,
        "GetObjectMetadata",
        "bkt",
        "k",
        None,
    ),
    (
        "GET",
        "/download/storage/v1/b/bkt/o/a%2Fb.dcm?alt=media",
        Action.RETRIEVE,
        "GetObject",
        "bkt",
        "a/b.dcm",
        ("download", "storage", "v1", "b", "bkt", "o", "a/b.dcm"),
    ),
    (
        "DELETE",
        "/storage/v1/b/bkt/o/a%2Fb.dcm?ifGenerationMatch=3",
        Action.DELETE,
        "DeleteObject",
        "bkt",
        "a/b.dcm",
        ("storage", "v1", "b", "bkt", "o", "a/b.dcm"),
    ),
    ("PUT", "/bkt/a/b.dcm", Action.STORE, "XmlPutObject", "bkt", "a/b.dcm", None),
    ("GET", "/bkt/a/b.dcm", Action.RETRIEVE, "XmlGetObject", "bkt", "a/b.dcm", None),
    ("HEAD", "/bkt/a/b.dcm", Action.RETRIEVE, "XmlGetObject", "bkt", "a/b.dcm", None),
    (
        "GET",
        "/bkt/k?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=c&X-Goog-Date=d"
        "&X-Goog-Expires=900&X-Goog-SignedHeaders=host&X-Goog-Signature=s",
        Action.RETRIEVE,
        "XmlGetObject",
        "bkt",
        "k",
        None,
    ),
    ("GET", "/bkt?prefix=a%2F", Action.LIST, "XmlListObjects", "bkt", None, None),
    ("DELETE", "/bkt/a/b.dcm", Action.DELETE, "XmlDeleteObject", "bkt", "a/b.dcm", None),
    (
        "GET",
        "/my_bucket.example/k",
        Action.RETRIEVE,
        "XmlGetObject",
        "my_bucket.example",
        "k",
        None,
    ),
]


@pytest.mark.parametrize(
    ("method", "target", "action", "operation", "bucket", "key", "forward_path"), GCS_ROUTES
)
def test_gcs_routes(
    method: str,
    target: str,
    action: Action,
    operation: str,
    bucket: str,
    key: str | None,
    forward_path: tuple[str, ...] | None,
) -> None:
    result = gcs(method, target)
    assert result.reason == ""
    assert (result.action, result.resource.operation) == (action, operation)
    assert (result.resource.bucket, result.resource.key) == (bucket, key)
    assert result.forward_path == forward_path
    assert not result.resource.query


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("POST", "/upload/storage/v1/b/bkt/o", ()),
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=media", ()),  # media needs a name
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=chunked&name=k", ()),
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=media&name=k&predefinedAcl=publicRead", ()),
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=media&name=k&name=j", ()),
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=media&uploadType=resumable&name=k", ()),
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=media&name=", ()),
        ("POST", f"/upload/storage/v1/b/bkt/o?uploadType=media&name=k&{PHI}=1", ()),
        ("POST", "/upload/storage/v1/b/bkt/o/k?uploadType=media", ()),
        ("PUT", "/upload/storage/v1/b/bkt/o?uploadType=resumable", ()),  # no upload_id
        ("PUT", "/upload/storage/v1/b/bkt/o?uploadType=media&upload_id=x", ()),
        ("DELETE", "/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=x", ()),
        ("GET", "/upload/storage/v1/b/bkt/o", ()),
        ("POST", "/storage/v1/b/bkt/o", ()),  # metadata-only insert
        ("GET", "/storage/v1/b", ()),  # list buckets
        ("GET", "/storage/v1/b/bkt", ()),  # bucket metadata
        ("GET", "/storage/v1/b/bkt/iam", ()),
        ("GET", "/storage/v1/b/bkt/acl", ()),
        ("PATCH", "/storage/v1/b/bkt/o/k", ()),
        ("PUT", "/storage/v1/b/bkt/o/k", ()),
        ("POST", "/storage/v1/b/bkt/o/k/rewriteTo/b/other/o/k", ()),
        ("POST", "/storage/v1/b/bkt/o/k/copyTo/b/other/o/k", ()),
        ("POST", "/storage/v1/b/bkt/o/k/compose", ()),
        ("GET", "/storage/v1/b/bkt/o/k?alt=proto", ()),
        ("GET", "/storage/v1/b/bkt/o?versions=maybe", ()),
        ("GET", "/storage/v1/b/bkt/o/k?key=apikey", ()),
        ("GET", "/download/storage/v1/b/bkt/o/k", ()),  # downloads need alt=media
        ("DELETE", "/download/storage/v1/b/bkt/o/k?alt=media", ()),
        ("GET", "/download/storage/v1/b/bkt/o?alt=media", ()),
        ("GET", "/storage/v2/b/bkt/o/k", ()),
        ("GET", "/storage", ()),
        ("GET", "/batch/storage/v1", ()),
        ("GET", "/upload/storage/v2/b/bkt/o", ()),
        ("GET", "/storage/v1/b/Bkt/o/k", ()),
        ("GET", "/storage/v1/b/googlebucket/o/k", ()),
        ("GET", "/storage/v1/b/goog-x/o/k", ()),
        ("GET", "/storage/v1/b/" + "a" * 64 + "/o/k", ()),
        ("GET", "/storage/v1/b/bkt/o/" + "k" * 1025, ()),
        # XML API
        ("GET", "/", ()),
        ("PUT", "/bkt", ()),
        ("DELETE", "/bkt", ()),
        ("POST", "/bkt/k", (("x-goog-resumable", "start"),)),
        ("POST", "/bkt/k?uploads", ()),
        ("PUT", "/bkt/k?partNumber=1&uploadId=x", ()),
        ("PUT", "/bkt/k", (("x-goog-copy-source", "/other/k"),)),
        ("PUT", "/bkt/k?x-goog-copy-source=%2Fother%2Fk", ()),
        ("GET", "/bkt/k?acl", ()),
        ("PUT", "/bkt/k?acl", ()),
        ("GET", "/bkt?acl", ()),
        ("GET", "/bkt?lifecycle", ()),
        ("GET", "/bkt/k?generation=1&generation=2", ()),
        ("PATCH", "/bkt/k", ()),
        ("GET", "/bk/k", ()),
        ("GET", "/-bkt/k", ()),
        ("GET", "/192.168.0.1/k", ()),
        ("GET", f"/{PHI}/k", ()),
    ],
)
def test_gcs_hostile_requests_are_unknown(method: str, target: str, headers: Headers) -> None:
    assert_unknown(gcs(method, target, headers), target)


@pytest.mark.parametrize(
    ("method", "target", "route"),
    [
        (
            "POST",
            "/upload/storage/v1/b/bkt/o?uploadType=multipart",
            "/upload/storage/v1/b/{bucket}/o",
        ),
        ("GET", "/storage/v1/b/bkt/o", "/storage/v1/b/{bucket}/o"),
        ("GET", "/storage/v1/b/bkt/o/a%2Fb", "/storage/v1/b/{bucket}/o/{object}"),
        (
            "GET",
            "/download/storage/v1/b/bkt/o/a?alt=media",
            "/download/storage/v1/b/{bucket}/o/{object}",
        ),
        ("PUT", "/bkt/a/b", "/{bucket}/{object}"),
        ("GET", "/bkt", "/{bucket}"),
    ],
)
def test_gcs_route_templates(method: str, target: str, route: str) -> None:
    result = gcs(method, target)
    assert result.action is not Action.UNKNOWN
    assert result.resource.route == route


def test_gcs_json_object_routes_forward_the_name_as_one_segment() -> None:
    # GET .../o/k/acl is the object "k/acl" (the client percent-encoded the "/"), and is
    # forwarded so: the upstream reads the same object, not the ACL of "k".
    result = gcs("DELETE", "/storage/v1/b/bkt/o/k/acl/allUsers")
    assert (result.action, result.resource.key) == (Action.DELETE, "k/acl/allUsers")
    assert result.forward_path == ("storage", "v1", "b", "bkt", "o", "k/acl/allUsers")


def test_gcs_bucket_names_with_dots_may_be_longer() -> None:
    long_dotted = ".".join(["a" * 63] * 3)  # 191 characters
    assert gcs("GET", f"/{long_dotted}/k").resource.bucket == long_dotted
    assert_unknown(gcs("GET", "/" + ".".join(["a" * 64, "b"]) + "/k"))
    assert_unknown(gcs("GET", "/" + ".".join(["a" * 63] * 4) + "/k"))  # 255 > 222


# -- Azure Blob --------------------------------------------------------------------------
# Shapes recorded from azure-storage-blob against Azurite's path-style account URL
# (the account segment is the destination's base path, so `rest` starts at the container).

BLOCK = (("x-ms-blob-type", "BlockBlob"),)

AZURE_ROUTES = [
    # (method, target, headers, action, operation, container, blob)
    ("PUT", "/images/a/b%20c.dcm", BLOCK, Action.STORE, "PutBlob", "images", "a/b c.dcm"),
    (
        "PUT",
        "/images/a/b%20c.dcm?timeout=30",
        (("X-MS-Blob-Type", "BlockBlob"), ("x-ms-encryption-scope", "scope1")),
        Action.STORE,
        "PutBlob",
        "images",
        "a/b c.dcm",
    ),
    (
        "PUT",
        "/images/a/b%20c.dcm?comp=block&blockid=WW14dlkyc3g%3D",
        (),
        Action.STORE,
        "PutBlock",
        "images",
        "a/b c.dcm",
    ),
    (
        "PUT",
        "/images/a/b%20c.dcm?comp=blocklist",
        (("Content-Type", "application/xml"),),
        Action.STORE,
        "PutBlockList",
        "images",
        "a/b c.dcm",
    ),
    ("GET", "/images/a/b%20c.dcm", (), Action.RETRIEVE, "GetBlob", "images", "a/b c.dcm"),
    ("HEAD", "/images/a/b%20c.dcm", (), Action.RETRIEVE, "GetBlob", "images", "a/b c.dcm"),
    (
        "GET",
        "/images/k?snapshot=2024-01-01T00%3A00%3A00.0000000Z",
        (),
        Action.RETRIEVE,
        "GetBlob",
        "images",
        "k",
    ),
    (
        "GET",
        "/images/a/b%20c.dcm?comp=blocklist&blocklisttype=committed",
        (),
        Action.LIST,
        "GetBlockList",
        "images",
        "a/b c.dcm",
    ),
    (
        "GET",
        "/images?restype=container&comp=list&prefix=a%2F",
        (),
        Action.LIST,
        "ListBlobs",
        "images",
        None,
    ),
    (
        "GET",
        "/images?RESTYPE=container&Comp=list&maxresults=5&marker=m&include=metadata",
        (),
        Action.LIST,
        "ListBlobs",
        "images",
        None,
    ),
    ("DELETE", "/images/a/b%20c.dcm", (), Action.DELETE, "DeleteBlob", "images", "a/b c.dcm"),
    (
        "GET",  # a SAS in the query is ignored for classification
        "/images/k?sv=2023-11-03&ss=b&srt=o&sp=r&se=2030-01-01&st=2024-01-01&spr=https"
        "&sig=abc%3D&sr=b&skoid=x&sktid=y&skt=z&ske=w&sks=b&skv=2023",
        (),
        Action.RETRIEVE,
        "GetBlob",
        "images",
        "k",
    ),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "action", "operation", "container", "blob"), AZURE_ROUTES
)
def test_azure_routes(
    method: str,
    target: str,
    headers: Headers,
    action: Action,
    operation: str,
    container: str,
    blob: str | None,
) -> None:
    result = azure(method, target, headers)
    assert result.reason == ""
    assert (result.action, result.resource.operation) == (action, operation)
    assert (result.resource.bucket, result.resource.key) == (container, blob)
    assert result.resource.route == ("/{container}/{blob}" if blob else "/{container}")
    assert result.forward_path is None
    assert result.resource.copy_source is None


@pytest.mark.parametrize(
    ("source", "copy_source"),
    [
        (AZURITE + "/images/src%20x.dcm", ("images", "src x.dcm")),
        (AZURITE + "/other/dir/a.dcm?snapshot=2024-01-01", ("other", "dir/a.dcm")),
        (AZURITE + "/other/a.dcm?sv=2023&sig=abc&sp=r", ("other", "a.dcm")),
        (PROXY_URL + "/images/a%2Fb.dcm", ("images", "a/b.dcm")),
        ("HTTPS://CASB.example.org:8443/azure/images/a.dcm", ("images", "a.dcm")),
    ],
)
def test_azure_copy_blob_reads_the_source_path(source: str, copy_source: tuple[str, str]) -> None:
    for headers in (
        (("x-ms-copy-source", source),),  # Copy Blob
        (("x-ms-copy-source", source), *BLOCK),  # Put Blob From URL
    ):
        result = azure("PUT", "/images/a/b%20c.dcm", headers)
        assert (result.action, result.resource.operation) == (Action.STORE, "CopyBlob")
        assert result.resource.copy_source == copy_source
        assert (result.resource.bucket, result.resource.key) == ("images", "a/b c.dcm")


@pytest.mark.parametrize(
    "source",
    [
        "https://evil.blob.core.windows.net/images/a.dcm",  # another account
        "http://127.0.0.1:10001/devstoreaccount1/images/a.dcm",  # another port
        "https://127.0.0.1:10000/devstoreaccount1/images/a.dcm",  # another scheme
        "http://127.0.0.1:10000/otheraccount/images/a.dcm",
        "http://127.0.0.1:10000/devstoreaccount1x/images/a.dcm",
        "http://127.0.0.1:10000/devstoreaccount1/images",  # no blob
        "http://127.0.0.1:10000/devstoreaccount1/images/",
        "http://127.0.0.1:10000/devstoreaccount1/$root/a.dcm",
        "http://127.0.0.1:10000/devstoreaccount1/im%2Fages/a.dcm",
        "http://127.0.0.1:10000/devstoreaccount1/images/a/../../other/b.dcm",
        "http://127.0.0.1:10000/devstoreaccount1/images/a//b.dcm",
        "http://127.0.0.1:10000/devstoreaccount1/images/a%ZZ",
        "http://127.0.0.1:10000/devstoreaccount1/images/a.dcm?comp=block",
        "http://127.0.0.1:10000/devstoreaccount1/images/a.dcm#frag",
        "http://user:pw@127.0.0.1:10000/devstoreaccount1/images/a.dcm",
        "http://127.0.0.1:99999/devstoreaccount1/images/a.dcm",
        "/devstoreaccount1/images/a.dcm",  # not a URL
        "images/a.dcm",
        "",
        f"http://127.0.0.1:10000/devstoreaccount1/images/{PHI}?{PHI}=1",
    ],
)
def test_azure_copy_source_elsewhere_or_malformed_is_unknown(source: str) -> None:
    assert_unknown(azure("PUT", "/images/k", (("x-ms-copy-source", source),)))


def test_azure_copy_needs_configured_account_urls() -> None:
    t = normalize_target("/images/k")
    headers = (("x-ms-copy-source", AZURITE + "/images/src.dcm"),)
    assert_unknown(classify_azure("PUT", t.segments, t.query, headers, "azdest"))


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("PUT", "/images/k", ()),  # Put Blob without a blob type
        ("PUT", "/images/k", (("x-ms-blob-type", "AppendBlob"),)),
        ("PUT", "/images/k", (("x-ms-blob-type", "PageBlob"), ("x-ms-blob-content-length", "512"))),
        ("PUT", "/images/k", (("x-ms-blob-type", "blockblob"),)),
        ("PUT", "/images/k", (*BLOCK, ("x-ms-blob-type", "AppendBlob"))),
        ("PUT", "/images/k?comp=appendblock", ()),
        ("PUT", "/images/k?comp=page", ()),
        ("PUT", "/images/k?comp=metadata", ()),
        ("PUT", "/images/k?comp=properties", ()),
        ("PUT", "/images/k?comp=tags", ()),
        ("PUT", "/images/k?comp=lease", ()),
        ("PUT", "/images/k?comp=snapshot", ()),
        ("PUT", "/images/k?comp=tier", ()),
        ("PUT", "/images/k?comp=copy&copyid=x", ()),
        ("PUT", "/images/k?comp=block", ()),  # no blockid
        ("PUT", "/images/k?comp=block&blockid=", ()),
        ("PUT", "/images/k?comp=block&blockid=a&comp=appendblock", ()),
        ("PUT", "/images/k?comp=block&blockid=a&COMP=appendblock", ()),
        ("PUT", "/images/k?comp=block&blockid=a", BLOCK),
        # Put Block From URL: a copy disguised as a block
        ("PUT", "/images/k?comp=block&blockid=a", (("x-ms-copy-source", AZURITE + "/i/s"),)),
        ("PUT", "/images/k?comp=blocklist&blockid=a", ()),
        ("GET", "/images/k", (("x-ms-copy-source", AZURITE + "/images/s"),)),
        ("GET", "/images/k?comp=tags", ()),
        ("GET", "/images/k?comp=metadata", ()),
        ("GET", "/images/k?comp=blocklist&blocklisttype=bogus", ()),
        ("GET", f"/images/k?{PHI}=1", ()),
        ("DELETE", "/images/k?comp=blocklist", ()),
        ("POST", "/images/k", BLOCK),
        ("PATCH", "/images/k", BLOCK),
        # container-level: only listing
        ("GET", "/images", ()),  # Azure reads this as blob "images" in $root
        ("PUT", "/images", BLOCK),
        ("GET", "/images?restype=container", ()),  # container properties
        ("PUT", "/images?restype=container", ()),  # create container
        ("DELETE", "/images?restype=container", ()),
        ("GET", "/images?restype=container&comp=acl", ()),
        ("GET", "/images?restype=container&comp=list&bogus=1", ()),
        ("GET", "/images?restype=container&comp=list&prefix=a&prefix=b", ()),
        ("GET", "/images?restype=container&comp=list", (("x-ms-copy-source", "x"),)),
        ("GET", "/?comp=list", ()),  # list containers
        ("GET", "/?restype=service&comp=properties", ()),
        # invalid container names
        ("GET", "/$root/k", ()),
        ("GET", "/$web/k", ()),
        ("GET", "/ab/k", ()),
        ("GET", "/Images/k", ()),
        ("GET", "/im--ages/k", ()),
        ("GET", "/-images/k", ()),
        ("GET", "/images-/k", ()),
        ("GET", "/im_ages/k", ()),
        ("GET", "/im.ages/k", ()),
        ("GET", "/" + "a" * 64 + "/k", ()),
        ("GET", "/images/" + "k" * 1025, ()),
    ],
)
def test_azure_hostile_requests_are_unknown(method: str, target: str, headers: Headers) -> None:
    assert_unknown(azure(method, target, headers), target)


def test_azure_timeout_and_sas_do_not_change_the_operation() -> None:
    result = azure("PUT", "/images/k?comp=block&blockid=YQ%3D%3D&timeout=5&sig=x&sv=1", ())
    assert result.resource.operation == "PutBlock"


# -- properties shared by every store ----------------------------------------------------


@pytest.mark.parametrize(
    "classify",
    [
        lambda m, t, h: s3(m, t, h),
        lambda m, t, h: gcs(m, t, h),
        lambda m, t, h: azure(m, t, h),
    ],
)
def test_access_token_is_ignored_and_method_case_does_not_matter(classify: object) -> None:
    assert callable(classify)
    plain = classify("GET", "/images/k", BLOCK)
    with_token = classify("get", "/images/k?access_token=abc", BLOCK)
    assert plain.action is Action.RETRIEVE
    assert with_token == plain


def test_object_store_resources_never_carry_query_values() -> None:
    for result in (
        s3("GET", f"/bkt?list-type=2&prefix={PHI}"),
        gcs("GET", f"/storage/v1/b/bkt/o?prefix={PHI}"),
        azure("GET", f"/images?restype=container&comp=list&prefix={PHI}"),
    ):
        assert result.action is Action.LIST
        assert not result.resource.query
        assert PHI not in repr(result)
