"""Object-store requests (S3, GCS JSON and XML APIs, Azure Blob) -> Classification.

Each store's operations are a whitelist: the method, the path shape and the query
parameters that select an operation (S3 "subresources" such as ``?uploads``, GCS
``uploadType``, Azure ``comp``) must match a listed operation exactly, and every
other query parameter must be one that operation takes. Anything else (``?acl``,
``?policy``, ``?tagging``, append or page blobs, a repeated query parameter, an
invalid bucket name, a copy whose source cannot be read unambiguously) is
`Action.UNKNOWN`, with a reason that never quotes the request: keys and query values
can be PHI (file names, patient ids in prefixes).

Inputs are a normalized target (normalize.py): `rest` holds the decoded path segments
after the destination's base path ("%2F" has already become a separator), `query` the
decoded (name, value) pairs. Parameters that only authenticate or sign a request
(presigned-URL ``X-Amz-*``, GCS signed-URL ``X-Goog-*``, Azure SAS keys, casb's own
``access_token``) and hints that do not change the operation (boto3's ``x-id``,
Azure's ``timeout``) are ignored; the edge strips or replaces the credentials.

`forward_path` is set when the upstream path differs from `rest`: S3 virtual-hosted
requests are forwarded path-style (bucket first), and a GCS JSON object name travels
as ONE path segment (the edge percent-encodes the "/" in it), so what is forwarded is
exactly the object that was authorized. `Resource.query` stays empty: values can be PHI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes, urlsplit

from casb.classify import Classification
from casb.context import Action, Resource
from casb.identity.tokens import QUERY_PARAM

__all__ = ["classify_azure", "classify_gcs", "classify_s3"]

Headers = Sequence[tuple[str, str]]
Query = Sequence[tuple[str, str]]
ValueCheck = Callable[[str], bool]

_MAX_KEY_BYTES = 1024  # S3 keys and GCS object names (UTF-8); Azure: 1024 characters
_METHODS = frozenset({"GET", "PUT", "POST", "DELETE"})


class _Unknown(Exception):
    """Not a whitelisted operation. `reason` is safe to show a client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- shared readers ------------------------------------------------------------------------


def _any(value: str) -> bool:
    return True


def _empty(value: str) -> bool:
    return value == ""


def _non_empty(value: str) -> bool:
    return value != ""


def _digits(value: str) -> bool:
    return 0 < len(value) <= 10 and value.isascii() and value.isdigit()


def _one_of(*accepted: str) -> ValueCheck:
    choices = frozenset(accepted)
    return lambda value: value in choices


def _part_number(value: str) -> bool:
    return _digits(value) and value[0] != "0" and int(value) <= 10000


@dataclass(frozen=True, slots=True)
class _Op:
    """One operation: its name, action, and the query parameters it takes."""

    name: str
    action: Action
    required: Mapping[str, ValueCheck] = field(default_factory=dict)
    optional: Mapping[str, ValueCheck] = field(default_factory=dict)


def _accept(op: _Op, params: Mapping[str, str]) -> None:
    """Every query parameter is one `op` takes, with a valid value; required ones present."""
    for name, value in params.items():
        check = op.required.get(name) or op.optional.get(name)
        if check is None:
            raise _Unknown(f"a query parameter is not accepted for {op.name}")
        if not check(value):
            raise _Unknown(f"invalid {name} query parameter for {op.name}")
    for name in op.required:
        if name not in params:
            raise _Unknown(f"{op.name} needs the {name} query parameter")


def _params(query: Query, ignored: Callable[[str], bool], *, fold: bool) -> dict[str, str]:
    """The query as a mapping, without ignored names (given lower-cased to `ignored`).

    A name given twice (compared case-insensitively) is refused: the store might read
    either value. `fold` lower-cases names for stores that read them so (Azure)."""
    seen: set[str] = set()
    out: dict[str, str] = {}
    for name, value in query:
        lower = name.lower()
        if lower in seen:
            raise _Unknown("a query parameter is repeated")
        seen.add(lower)
        if lower == QUERY_PARAM or ignored(lower):
            continue
        out[lower if fold else name] = value
    return out


def _header(headers: Headers, name: str) -> str | None:
    """The one value of header `name` (case-insensitive), None if absent; refused if
    repeated (which value the store reads is not ours to guess)."""
    found: str | None = None
    for key, value in headers:
        if key.lower() == name:
            if found is not None:
                raise _Unknown(f"the {name} header is repeated")
            found = value.strip()
    return found


def _media_type(headers: Headers) -> str:
    value = _header(headers, "content-type") or ""
    return value.partition(";")[0].strip().lower()


def _check_key(key: str, *, chars: bool = False) -> str:
    size = len(key) if chars else len(key.encode("utf-8", "surrogatepass"))
    if size > _MAX_KEY_BYTES:
        raise _Unknown(f"the object name is longer than {_MAX_KEY_BYTES} bytes")
    return key


_IPV4_LIKE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")


def _unknown(destination: str, reason: str) -> Classification:
    return Classification(Action.UNKNOWN, Resource(destination=destination), reason)


def _effective(method: str) -> str:
    upper = method.upper()
    return "GET" if upper == "HEAD" else upper


def _classified(
    op: _Op,
    destination: str,
    route: str,
    bucket: str | None,
    key: str | None,
    *,
    copy_source: tuple[str, str] | None = None,
    forward_path: tuple[str, ...] | None = None,
) -> Classification:
    return Classification(
        op.action,
        Resource(
            destination=destination,
            route=route,
            bucket=bucket,
            key=key,
            operation=op.name,
            copy_source=copy_source,
        ),
        forward_path=forward_path,
    )


# -- S3 -----------------------------------------------------------------------------------

_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Reserved prefixes / suffixes (IDN, access point aliases, Object Lambda, directory and
# table buckets, multi-region access points): not plain buckets, refused.
_S3_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_S3_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def _is_s3_bucket(name: str) -> bool:
    return (
        _S3_BUCKET.fullmatch(name) is not None
        and ".." not in name
        and ".-" not in name
        and "-." not in name
        and _IPV4_LIKE.fullmatch(name) is None
        and not name.startswith(_S3_RESERVED_PREFIXES)
        and not name.endswith(_S3_RESERVED_SUFFIXES)
    )


# Presigned-URL authentication (SigV4 X-Amz-*, legacy SigV2) and boto3's x-id hint.
# Other X-Amz-* names are headers an SDK hoisted into a presigned URL; the edge strips
# every X-Amz-* parameter, and at_rest refuses a hoisted SSE header. A hoisted copy
# source is not ignored: it would name a second object, so it is refused.
_S3_IGNORED = frozenset({"x-id", "awsaccesskeyid", "signature", "expires"})


def _s3_ignored(lower: str) -> bool:
    if lower in _S3_IGNORED:
        return True
    return lower.startswith("x-amz-") and not lower.startswith("x-amz-copy-source")


_LIST_COMMON = {"prefix": _any, "delimiter": _any, "max-keys": _digits}
_ENCODING = {"encoding-type": _one_of("url")}
_RESPONSE_OVERRIDES = dict.fromkeys(
    (
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "response-content-language",
        "response-content-type",
        "response-expires",
    ),
    _any,
)

_S3_LIST_BUCKETS = _Op(
    "ListBuckets",
    Action.LIST,
    optional={
        "max-buckets": _digits,
        "continuation-token": _any,
        "prefix": _any,
        "bucket-region": _any,
    },
)
_S3_LIST_V2 = _Op(
    "ListObjectsV2",
    Action.LIST,
    required={"list-type": _one_of("2")},
    optional={
        **_LIST_COMMON,
        **_ENCODING,
        "continuation-token": _any,
        "start-after": _any,
        "fetch-owner": _one_of("true", "false"),
    },
)
_S3_LIST_V1 = _Op(
    "ListObjects", Action.LIST, optional={**_LIST_COMMON, **_ENCODING, "marker": _any}
)
_S3_LIST_UPLOADS = _Op(
    "ListMultipartUploads",
    Action.LIST,
    required={"uploads": _empty},
    optional={
        **_LIST_COMMON,
        **_ENCODING,
        "key-marker": _any,
        "upload-id-marker": _any,
        "max-uploads": _digits,
    },
)
_S3_DELETE_OBJECTS = _Op("DeleteObjects", Action.DELETE, required={"delete": _empty})
_S3_POST_OBJECT = _Op("PostObject", Action.STORE)
_S3_GET_OBJECT = _Op(
    "GetObject",
    Action.RETRIEVE,
    optional={"versionId": _non_empty, "partNumber": _part_number, **_RESPONSE_OVERRIDES},
)
_S3_LIST_PARTS = _Op(
    "ListParts",
    Action.LIST,
    required={"uploadId": _non_empty},
    optional={"max-parts": _digits, "part-number-marker": _digits, **_ENCODING},
)
_S3_PUT_OBJECT = _Op("PutObject", Action.STORE)
_S3_COPY_OBJECT = _Op("CopyObject", Action.STORE)
_PART = {"partNumber": _part_number, "uploadId": _non_empty}
_S3_UPLOAD_PART = _Op("UploadPart", Action.STORE, required=_PART)
_S3_UPLOAD_PART_COPY = _Op("UploadPartCopy", Action.STORE, required=_PART)
_S3_CREATE_MPU = _Op("CreateMultipartUpload", Action.STORE, required={"uploads": _empty})
_S3_COMPLETE_MPU = _Op("CompleteMultipartUpload", Action.STORE, required={"uploadId": _non_empty})
_S3_ABORT_MPU = _Op("AbortMultipartUpload", Action.DELETE, required={"uploadId": _non_empty})
_S3_DELETE_OBJECT = _Op("DeleteObject", Action.DELETE, optional={"versionId": _non_empty})

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _url_decode(text: str, what: str) -> str:
    """Percent-decode once ('+' stays '+'); the result must be UTF-8 without controls."""
    if _BAD_ESCAPE.search(text):
        raise _Unknown(f"the {what} has an invalid percent-escape")
    try:
        decoded = unquote_to_bytes(text).decode("utf-8")
    except UnicodeError:
        raise _Unknown(f"the {what} is not valid UTF-8") from None
    if _CONTROL.search(decoded):
        raise _Unknown(f"the {what} contains a control character")
    return decoded


def _plain_key(key: str, what: str) -> str:
    """A copy-source key the store reads literally: no empty or dot segments, which a
    path-reading policy and the store could read differently."""
    if not key or any(part in ("", ".", "..") for part in key.split("/")):
        raise _Unknown(f"the {what} names no plain object key")
    return _check_key(key)


def _s3_copy_source(value: str) -> tuple[str, str]:
    """x-amz-copy-source: "bucket/key" or "/bucket/key", URL-encoded, optionally
    followed by "?versionId=..."; access point ARNs and anything else are refused."""
    what = "x-amz-copy-source header"
    path, question, version = value.partition("?")
    if question and (not version.startswith("versionId=") or "&" in version):
        raise _Unknown(f"the {what} may carry only a versionId")
    if question and not _url_decode(version[len("versionId=") :], what):
        raise _Unknown(f"the {what} has an empty versionId")
    path = path.removeprefix("/")
    raw_bucket, slash, raw_key = path.partition("/")
    if not slash:
        raise _Unknown(f"the {what} must be bucket/key")
    bucket = _url_decode(raw_bucket, what)
    if not _is_s3_bucket(bucket):
        raise _Unknown(f"the {what} names an invalid bucket")
    return bucket, _plain_key(_url_decode(raw_key, what), what)


def _s3_service(method: str) -> _Op:
    if method != "GET":
        raise _Unknown("method not allowed on /")
    return _S3_LIST_BUCKETS


def _s3_bucket_op(method: str, params: Mapping[str, str], headers: Headers) -> _Op:
    if method == "GET":
        if "uploads" in params:
            return _S3_LIST_UPLOADS
        return _S3_LIST_V2 if "list-type" in params else _S3_LIST_V1
    if method == "POST":
        if "delete" in params:
            return _S3_DELETE_OBJECTS
        if _media_type(headers) == "multipart/form-data":
            return _S3_POST_OBJECT
        raise _Unknown("a POST to a bucket must be a browser upload (multipart/form-data)")
    raise _Unknown("method not allowed on /{bucket}")


def _s3_object_op(method: str, params: Mapping[str, str], copy: bool) -> _Op:
    if method == "GET":
        return _S3_LIST_PARTS if "uploadId" in params else _S3_GET_OBJECT
    if method == "PUT":
        if "partNumber" in params or "uploadId" in params:
            return _S3_UPLOAD_PART_COPY if copy else _S3_UPLOAD_PART
        return _S3_COPY_OBJECT if copy else _S3_PUT_OBJECT
    if method == "POST":
        if "uploads" in params:
            return _S3_CREATE_MPU
        if "uploadId" in params:
            return _S3_COMPLETE_MPU
        raise _Unknown("a POST to an object must start or complete a multipart upload")
    if method == "DELETE":
        return _S3_ABORT_MPU if "uploadId" in params else _S3_DELETE_OBJECT
    raise _Unknown("method not allowed on /{bucket}/{key}")


def classify_s3(
    method: str,
    rest: tuple[str, ...],
    query: Query,
    headers: Headers,
    destination: str,
    host_bucket: str | None = None,
) -> Classification:
    """Classify an S3 request, path-style (`rest` = bucket, key...) or virtual-hosted
    (`host_bucket` from the Host header, `rest` = the key only)."""
    try:
        method = _effective(method)
        if method not in _METHODS:
            raise _Unknown("HTTP method not supported for S3")
        params = _params(query, _s3_ignored, fold=False)
        raw_copy = _header(headers, "x-amz-copy-source")
        if host_bucket is not None:
            bucket: str | None = host_bucket
            key_parts = rest
            forward: tuple[str, ...] | None = (host_bucket, *rest)
        elif rest:
            bucket, key_parts, forward = rest[0], rest[1:], None
        else:
            bucket, key_parts, forward = None, (), None
        if bucket is None:
            op, route, key = _s3_service(method), "/", None
        elif not _is_s3_bucket(bucket):
            raise _Unknown("invalid S3 bucket name")
        elif not key_parts:
            op, route, key = _s3_bucket_op(method, params, headers), "/{bucket}", None
        else:
            key = _check_key("/".join(key_parts))
            op, route = _s3_object_op(method, params, raw_copy is not None), "/{bucket}/{key}"
        _accept(op, params)
        copy_source = None
        if raw_copy is not None:
            if op not in (_S3_COPY_OBJECT, _S3_UPLOAD_PART_COPY):
                raise _Unknown(f"x-amz-copy-source is not accepted for {op.name}")
            copy_source = _s3_copy_source(raw_copy)
        return _classified(
            op, destination, route, bucket, key, copy_source=copy_source, forward_path=forward
        )
    except _Unknown as exc:
        return _unknown(destination, exc.reason)


# -- GCS ----------------------------------------------------------------------------------

_GCS_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")


def _is_gcs_bucket(name: str) -> bool:
    if _GCS_NAME.fullmatch(name) is None or _IPV4_LIKE.fullmatch(name) is not None:
        return False
    if name.startswith("goog") or "google" in name or "g00gle" in name:
        return False
    if "." not in name:
        return 3 <= len(name) <= 63
    parts = name.split(".")
    return len(name) <= 222 and all(0 < len(part) <= 63 for part in parts)


# The JSON API's first path segments; a bucket of one of these names is not reachable
# through the XML API here (the request would be read as a JSON API call).
_GCS_JSON_ROOTS = frozenset({"storage", "upload", "download", "batch"})

_JSON_STANDARD = {"fields": _any, "prettyPrint": _one_of("true", "false"), "quotaUser": _any}
_JSON_PRECONDITIONS = dict.fromkeys(
    (
        "ifGenerationMatch",
        "ifGenerationNotMatch",
        "ifMetagenerationMatch",
        "ifMetagenerationNotMatch",
    ),
    _digits,
)
_JSON_COMMON = {**_JSON_STANDARD, "userProject": _any}
# objects.insert: predefinedAcl is left out (it can make an object public).
_JSON_INSERT = {
    **_JSON_COMMON,
    **_JSON_PRECONDITIONS,
    "name": _non_empty,
    "kmsKeyName": _non_empty,
    "contentEncoding": _any,
    "projection": _one_of("full", "noAcl"),
    "alt": _one_of("json"),
}
_UPLOAD_TYPES = ("media", "multipart", "resumable")
_GCS_INSERT = {
    kind: _Op(
        f"InsertObject:{kind}",
        Action.STORE,
        required={"uploadType": _one_of(kind)},
        optional=_JSON_INSERT,
    )
    for kind in _UPLOAD_TYPES
}
_GCS_RESUMABLE = _Op(
    "ResumableUpload",
    Action.STORE,
    required={"uploadType": _one_of("resumable"), "upload_id": _non_empty},
    optional=_JSON_INSERT,
)
_GCS_LIST = _Op(
    "ListObjects",
    Action.LIST,
    optional={
        **_JSON_COMMON,
        "prefix": _any,
        "delimiter": _any,
        "maxResults": _digits,
        "pageToken": _any,
        "versions": _one_of("true", "false"),
        "startOffset": _any,
        "endOffset": _any,
        "includeTrailingDelimiter": _one_of("true", "false"),
        "matchGlob": _any,
        "projection": _one_of("full", "noAcl"),
        "alt": _one_of("json"),
    },
)
_JSON_OBJECT = {**_JSON_COMMON, **_JSON_PRECONDITIONS, "generation": _digits}
_GCS_GET_MEDIA = _Op(
    "GetObject", Action.RETRIEVE, required={"alt": _one_of("media")}, optional=_JSON_OBJECT
)
_GCS_GET_METADATA = _Op(
    "GetObjectMetadata",
    Action.RETRIEVE_METADATA,
    optional={**_JSON_OBJECT, "alt": _one_of("json"), "projection": _one_of("full", "noAcl")},
)
_GCS_DELETE = _Op("DeleteObject", Action.DELETE, optional=_JSON_OBJECT)

_XML_LIST = _Op(
    "XmlListObjects",
    Action.LIST,
    optional={
        **_LIST_COMMON,
        **_ENCODING,
        "marker": _any,
        "list-type": _one_of("2"),
        "continuation-token": _any,
        "start-after": _any,
        "fetch-owner": _one_of("true", "false"),
    },
)
_XML_PUT = _Op("XmlPutObject", Action.STORE)
_XML_GET = _Op(
    "XmlGetObject",
    Action.RETRIEVE,
    optional={
        "generation": _digits,
        "response-content-disposition": _any,
        "response-content-type": _any,
    },
)
_XML_DELETE = _Op("XmlDeleteObject", Action.DELETE, optional={"generation": _digits})

# XML API signed URLs: V4 (X-Goog-*, or X-Amz-* with HMAC keys) and V2. Hoisted copy
# sources are refused, not ignored.
_GCS_XML_IGNORED = frozenset({"googleaccessid", "expires", "signature"})


def _gcs_xml_ignored(lower: str) -> bool:
    if lower in _GCS_XML_IGNORED:
        return True
    return lower.startswith(("x-goog-", "x-amz-")) and "copy-source" not in lower


def _no_ignored(lower: str) -> bool:
    return False


def _gcs_json(
    method: str,
    root: str,
    api: tuple[str, ...],
    params: Mapping[str, str],
    destination: str,
    rest: tuple[str, ...],
) -> Classification:
    """JSON API: api = segments after ("storage"|"upload"|"download", "v1")."""
    if len(api) < 3 or api[0] != "b" or api[2] != "o":
        raise _Unknown("no GCS JSON API route matches this path")
    bucket = api[1]
    if not _is_gcs_bucket(bucket):
        raise _Unknown("invalid GCS bucket name")
    obj = api[3:]
    base = "/storage/v1" if root == "storage" else f"/{root}/storage/v1"
    prefix = base + "/b/{bucket}/o"
    if root == "upload":
        if obj:
            raise _Unknown("no GCS JSON API route matches this path")
        if method == "POST":
            kind = params.get("uploadType")
            if kind not in _GCS_INSERT:
                raise _Unknown("uploads need uploadType media, multipart or resumable")
            op = _GCS_INSERT[kind]
        elif method == "PUT":
            op = _GCS_RESUMABLE
        else:
            raise _Unknown(f"method not allowed on {prefix}")
        _accept(op, params)
        name = params.get("name")
        if op is _GCS_INSERT["media"] and name is None:
            raise _Unknown("media uploads need the name query parameter")
        key = None if name is None else _check_key(name)
        return _classified(op, destination, prefix, bucket, key)
    if not obj:
        if root != "storage" or method != "GET":
            raise _Unknown(f"method not allowed on {prefix}")
        _accept(_GCS_LIST, params)
        return _classified(_GCS_LIST, destination, prefix, bucket, None)
    key = _check_key("/".join(obj))
    if method == "GET":
        media = params.get("alt") == "media"
        if root == "download" and not media:
            raise _Unknown("downloads need alt=media")
        op = _GCS_GET_MEDIA if media else _GCS_GET_METADATA
    elif method == "DELETE" and root == "storage":
        op = _GCS_DELETE
    else:
        raise _Unknown(f"method not allowed on {prefix}/{{object}}")
    _accept(op, params)
    forward = (*rest[: len(rest) - len(obj)], key)
    return _classified(
        op,
        destination,
        prefix + "/{object}",
        bucket,
        key,
        forward_path=forward if forward != rest else None,
    )


def _gcs_xml(
    method: str, rest: tuple[str, ...], params: Mapping[str, str], headers: Headers, dest: str
) -> Classification:
    if not rest:
        raise _Unknown("listing buckets is not supported")
    bucket = rest[0]
    if not _is_gcs_bucket(bucket):
        raise _Unknown("invalid GCS bucket name")
    if _header(headers, "x-goog-copy-source") is not None:
        raise _Unknown("GCS XML API copies (x-goog-copy-source) are not supported")
    if len(rest) == 1:
        if method != "GET":
            raise _Unknown("method not allowed on /{bucket}")
        _accept(_XML_LIST, params)
        return _classified(_XML_LIST, dest, "/{bucket}", bucket, None)
    key = _check_key("/".join(rest[1:]))
    ops = {"PUT": _XML_PUT, "GET": _XML_GET, "DELETE": _XML_DELETE}
    op = ops.get(method)
    if op is None:
        raise _Unknown("method not allowed on /{bucket}/{object}")
    _accept(op, params)
    return _classified(op, dest, "/{bucket}/{object}", bucket, key)


def classify_gcs(
    method: str,
    rest: tuple[str, ...],
    query: Query,
    headers: Headers,
    destination: str,
) -> Classification:
    """Classify a Cloud Storage request: JSON API under ("storage", "v1"),
    ("upload", "storage", "v1") or ("download", "storage", "v1"); XML API otherwise."""
    try:
        method = _effective(method)
        if method not in _METHODS:
            raise _Unknown("HTTP method not supported for GCS")
        if rest and rest[0] in _GCS_JSON_ROOTS:
            params = _params(query, _no_ignored, fold=False)
            if rest[:2] == ("storage", "v1"):
                return _gcs_json(method, "storage", rest[2:], params, destination, rest)
            if rest[1:3] == ("storage", "v1") and rest[0] in ("upload", "download"):
                return _gcs_json(method, rest[0], rest[3:], params, destination, rest)
            raise _Unknown("no GCS JSON API route matches this path")
        params = _params(query, _gcs_xml_ignored, fold=False)
        return _gcs_xml(method, rest, params, headers, destination)
    except _Unknown as exc:
        return _unknown(destination, exc.reason)


# -- Azure Blob ---------------------------------------------------------------------------

_AZURE_CONTAINER = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")

# Shared access signature parameters (account, service and user delegation SAS) and
# their response-header overrides; the edge replaces a client's SAS with the proxy's.
SAS_KEYS = frozenset(
    {"sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "si", "sip", "ses", "sdd"}
    | {"skoid", "sktid", "skt", "ske", "sks", "skv", "skdutid", "sduoid"}
    | {"saoid", "suoid", "scid", "rscc", "rscd", "rsce", "rscl", "rsct"}
)


def _is_container(name: str) -> bool:
    return 3 <= len(name) <= 63 and _AZURE_CONTAINER.fullmatch(name) is not None


def _azure_ignored(lower: str) -> bool:
    return lower == "timeout" or lower in SAS_KEYS


_BLOB_VERSION = {"snapshot": _non_empty, "versionid": _non_empty}
_AZ_PUT_BLOB = _Op("PutBlob", Action.STORE)
_AZ_COPY_BLOB = _Op("CopyBlob", Action.STORE)
_AZ_PUT_BLOCK = _Op(
    "PutBlock", Action.STORE, required={"comp": _one_of("block"), "blockid": _non_empty}
)
_AZ_PUT_BLOCK_LIST = _Op("PutBlockList", Action.STORE, required={"comp": _one_of("blocklist")})
_AZ_GET_BLOB = _Op("GetBlob", Action.RETRIEVE, optional=_BLOB_VERSION)
_AZ_GET_BLOCK_LIST = _Op(
    "GetBlockList",
    Action.LIST,
    required={"comp": _one_of("blocklist")},
    optional={"blocklisttype": _one_of("committed", "uncommitted", "all"), "snapshot": _non_empty},
)
_AZ_LIST_BLOBS = _Op(
    "ListBlobs",
    Action.LIST,
    required={"restype": _one_of("container"), "comp": _one_of("list")},
    optional={
        "prefix": _any,
        "delimiter": _any,
        "marker": _any,
        "maxresults": _digits,
        "include": _any,
        "showonly": _any,
        "startfrom": _any,
        "endbefore": _any,
    },
)
_AZ_DELETE_BLOB = _Op("DeleteBlob", Action.DELETE, optional=_BLOB_VERSION)


def _azure_copy_source(value: str, accounts: Sequence[str]) -> tuple[str, str]:
    """The (container, blob) an x-ms-copy-source URL names, when it lies under one of
    `accounts` (this destination's base URLs); anything else is refused."""
    what = "x-ms-copy-source URL"
    try:
        src = urlsplit(value)
        port = src.port
    except ValueError:
        raise _Unknown(f"the {what} is malformed") from None
    if src.fragment or src.username is not None or src.password is not None:
        raise _Unknown(f"the {what} is malformed")
    if src.query:
        for piece in src.query.split("&"):
            name = piece.partition("=")[0].lower()
            if name not in SAS_KEYS and name not in _BLOB_VERSION:
                raise _Unknown(f"the {what} carries a query parameter that is not accepted")
    for account in accounts:
        base = urlsplit(account)
        if (
            src.scheme.lower() == base.scheme.lower()
            and (src.hostname or "") == (base.hostname or "").lower()
            and port == base.port
        ):
            prefix = base.path.rstrip("/") + "/"
            if src.path.startswith(prefix):
                raw_container, slash, raw_blob = src.path[len(prefix) :].partition("/")
                container = _url_decode(raw_container, what)
                if not slash or not _is_container(container):
                    raise _Unknown(f"the {what} names no valid container and blob")
                return container, _plain_key(_url_decode(raw_blob, what), what)
    raise _Unknown(f"the {what} does not name a blob of this destination's account")


def _azure_blob_op(method: str, params: Mapping[str, str], headers: Headers, copy: bool) -> _Op:
    comp = params.get("comp")
    if method == "PUT":
        if comp == "block":
            op = _AZ_PUT_BLOCK
        elif comp == "blocklist":
            op = _AZ_PUT_BLOCK_LIST
        elif comp is not None:
            raise _Unknown("this blob operation (comp) is not supported")
        elif copy:
            op = _AZ_COPY_BLOB
        else:
            op = _AZ_PUT_BLOB
        blob_type = _header(headers, "x-ms-blob-type")
        if op is _AZ_PUT_BLOB and blob_type is None:
            raise _Unknown("Put Blob needs x-ms-blob-type BlockBlob")
        block_op = op in (_AZ_PUT_BLOB, _AZ_COPY_BLOB)
        if blob_type is not None and (not block_op or blob_type != "BlockBlob"):
            raise _Unknown("only block blobs are supported (x-ms-blob-type BlockBlob)")
        return op
    if method == "GET":
        if comp == "blocklist":
            return _AZ_GET_BLOCK_LIST
        if comp is not None:
            raise _Unknown("this blob operation (comp) is not supported")
        return _AZ_GET_BLOB
    if method == "DELETE":
        return _AZ_DELETE_BLOB
    raise _Unknown("method not allowed on /{container}/{blob}")


def classify_azure(
    method: str,
    rest: tuple[str, ...],
    query: Query,
    headers: Headers,
    destination: str,
    *,
    account_urls: Sequence[str] = (),
) -> Classification:
    """Classify an Azure Blob request (`rest` = container, blob...; the account is in the
    destination's base URL). `account_urls` are the base URLs under which an
    x-ms-copy-source URL names a blob of this account (the upstream URL, and the URL
    clients use for this destination through the proxy); without them every copy is
    refused."""
    try:
        method = _effective(method)
        if method not in _METHODS:
            raise _Unknown("HTTP method not supported for Azure Blob")
        params = _params(query, _azure_ignored, fold=True)
        raw_copy = _header(headers, "x-ms-copy-source")
        if not rest:
            raise _Unknown("account operations are not supported")
        container = rest[0]
        if not _is_container(container):
            # Also "$root" / "$web", and one-segment paths naming a blob in $root.
            raise _Unknown("invalid Azure container name")
        if len(rest) == 1:
            # Without restype=container, Azure reads "/name" as a blob in $root.
            if method != "GET" or params.get("restype") != "container":
                raise _Unknown("only listing blobs is supported on /{container}")
            if raw_copy is not None:
                raise _Unknown("x-ms-copy-source is not accepted for ListBlobs")
            _accept(_AZ_LIST_BLOBS, params)
            return _classified(_AZ_LIST_BLOBS, destination, "/{container}", container, None)
        blob = _check_key("/".join(rest[1:]), chars=True)
        op = _azure_blob_op(method, params, headers, raw_copy is not None)
        _accept(op, params)
        copy_source = None
        if raw_copy is not None:
            if op is not _AZ_COPY_BLOB:
                raise _Unknown(f"x-ms-copy-source is not accepted for {op.name}")
            copy_source = _azure_copy_source(raw_copy, account_urls)
        return _classified(
            op, destination, "/{container}/{blob}", container, blob, copy_source=copy_source
        )
    except _Unknown as exc:
        return _unknown(destination, exc.reason)
