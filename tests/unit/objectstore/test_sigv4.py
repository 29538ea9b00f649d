"""casb.objectstore.sigv4 against AWS's published example and, differentially, botocore's
S3SigV4Auth (the signer boto3 itself uses) on many request shapes."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from botocore import auth as botocore_auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import percent_encode, percent_encode_sequence

from casb.objectstore.sigv4 import (
    EMPTY_SHA256,
    REPLACED_HEADERS,
    STREAMING_UNSIGNED_PAYLOAD_TRAILER,
    UNSIGNED_PAYLOAD,
    SigningError,
    canonical_path,
    canonical_query,
    sign_s3,
)

AKID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
NOW = datetime(2024, 3, 9, 23, 59, 58, tzinfo=UTC)
BODY = b"DICM and some pixel data"


def _sign(
    method: str,
    host: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Sequence[tuple[str, str]],
    payload_hash: str,
    *,
    token: str | None = None,
    region: str = "eu-west-1",
    now: datetime = NOW,
) -> dict[str, str]:
    out = sign_s3(
        method,
        host,
        path,
        query,
        headers,
        access_key_id=AKID,
        secret_access_key=SECRET,
        region=region,
        payload_hash=payload_hash,
        now=now,
        session_token=token,
    )
    return dict(out)


def _botocore(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    url: str,
    query: Sequence[tuple[str, str]],
    headers: Sequence[tuple[str, str]],
    payload: str,
    *,
    body: bytes = b"",
    token: str | None = None,
    region: str = "eu-west-1",
    query_in_url: bool = False,
) -> AWSRequest:
    """Sign with botocore: `payload` picks how it computes X-Amz-Content-SHA256."""
    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    if query_in_url and query:
        url = f"{url}?{percent_encode_sequence(list(query))}"
    request = AWSRequest(
        method=method, url=url, data=body, params=[] if query_in_url else list(query)
    )
    for name, value in headers:
        request.headers[name] = value  # HTTPHeaders: a repeated name is added, not replaced
    context: dict[str, Any] = {}
    if payload == UNSIGNED_PAYLOAD:
        context["client_config"] = SimpleNamespace(s3={"payload_signing_enabled": False})
    elif payload == STREAMING_UNSIGNED_PAYLOAD_TRAILER:
        context["checksum"] = {"request_algorithm": {"in": "trailer", "name": "x"}}
    request.context.update(context)
    signer = botocore_auth.S3SigV4Auth(Credentials(AKID, SECRET, token), "s3", region)
    signer.add_auth(request)
    return request


def _assert_same(ours: dict[str, str], theirs: AWSRequest, token: str | None) -> None:
    assert ours["Authorization"] == theirs.headers["Authorization"]
    assert ours["X-Amz-Date"] == theirs.headers["X-Amz-Date"]
    assert ours["X-Amz-Content-Sha256"] == theirs.headers["X-Amz-Content-SHA256"]
    if token is None:
        assert "X-Amz-Security-Token" not in ours
    else:
        assert ours["X-Amz-Security-Token"] == theirs.headers["X-Amz-Security-Token"] == token


def test_aws_published_example_get_object_with_range() -> None:
    # AWS S3 API reference, "Signature Calculations for the Authorization Header:
    # Transferring Payload in a Single Chunk", Example: GET Object.
    out = sign_s3(
        "GET",
        "examplebucket.s3.amazonaws.com",
        "/test.txt",
        [],
        [("Range", "bytes=0-9")],
        access_key_id=AKID,
        secret_access_key=SECRET,
        region="us-east-1",
        payload_hash=EMPTY_SHA256,
        now=datetime(2013, 5, 24, tzinfo=UTC),
    )
    authorization = dict(out)["Authorization"]
    assert authorization == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert dict(out)["X-Amz-Date"] == "20130524T000000Z"


KEYS = [
    "studies/1.2.840.113619/series 1/image 001.dcm",
    "pätient/Ünïcode/日本語/😀.dcm",
    "a+b=c&d;e,f:g@h$i!j'k(l)m*n~o",
    "percent%20literal/%2F",
    "trailing/slash/",
    "dots/../and/./segments",
]


@pytest.mark.parametrize("key", KEYS)
def test_put_object_with_sse_headers_matches_botocore(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    path = "/bucket/" + percent_encode(key, safe="/~")  # what botocore puts on the wire
    assert canonical_path(path) == path
    headers = [
        ("Content-Type", "application/dicom"),
        ("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg=="),
        ("x-amz-server-side-encryption", "aws:kms"),
        ("x-amz-server-side-encryption-aws-kms-key-id", "arn:aws:kms:eu-west-1:1:key/abc"),
        ("X-Amz-Meta-Study", "  spaced    out\tvalue  "),
        ("x-amz-storage-class", "STANDARD_IA"),
    ]
    theirs = _botocore(
        monkeypatch, "PUT", f"http://127.0.0.1:9000{path}", [], headers, "", body=BODY
    )
    payload = theirs.headers["X-Amz-Content-SHA256"]
    assert re.fullmatch("[0-9a-f]{64}", payload)
    ours = _sign("PUT", "127.0.0.1:9000", path, [], headers, payload)
    _assert_same(ours, theirs, None)
    assert (
        "SignedHeaders=content-md5;content-type;host;x-amz-content-sha256;x-amz-date;"
        "x-amz-meta-study;x-amz-server-side-encryption;"
        "x-amz-server-side-encryption-aws-kms-key-id;x-amz-storage-class," in ours["Authorization"]
    )


QUERY_SHAPES: list[tuple[str, list[tuple[str, str]], str]] = [
    ("POST", [("uploads", "")], UNSIGNED_PAYLOAD),
    ("PUT", [("partNumber", "1"), ("uploadId", "VXBsb2Fk+IElE/w==~x y")], UNSIGNED_PAYLOAD),
    (
        "GET",
        [
            ("list-type", "2"),
            ("prefix", "studies/1.2.3/series 4/"),
            ("delimiter", "/"),
            ("continuation-token", "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=+"),
            ("encoding-type", "url"),
        ],
        EMPTY_SHA256,
    ),
    ("GET", [("versions", ""), ("a", ""), ("key-marker", "")], EMPTY_SHA256),
    ("GET", [("a", "2"), ("a", "1"), ("A", "0"), ("a-", ""), ("a_", "ü")], EMPTY_SHA256),
    ("DELETE", [("uploadId", "abc")], EMPTY_SHA256),
]


@pytest.mark.parametrize(("method", "query", "payload"), QUERY_SHAPES)
@pytest.mark.parametrize("query_in_url", [False, True])
def test_query_shapes_match_botocore(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    query: list[tuple[str, str]],
    payload: str,
    query_in_url: bool,
) -> None:
    path = "/bucket/some%20key.dcm"
    url = f"https://bucket.s3.eu-west-1.amazonaws.com{path}"
    headers = [("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg==")]  # lets botocore skip the hash
    theirs = _botocore(monkeypatch, method, url, query, headers, payload, query_in_url=query_in_url)
    assert theirs.headers["X-Amz-Content-SHA256"] == payload
    ours = _sign(method, "bucket.s3.eu-west-1.amazonaws.com", path, query, headers, payload)
    _assert_same(ours, theirs, None)


def test_canonical_query_is_the_wire_form_botocore_sends() -> None:
    query = [("prefix", "a b/ü+"), ("uploads", ""), ("list-type", "2")]
    assert canonical_query(query) == "list-type=2&prefix=a%20b%2F%C3%BC%2B&uploads="
    assert sorted(canonical_query(query).split("&")) == sorted(
        percent_encode_sequence(query).split("&")
    )


def test_session_token_duplicate_headers_and_streaming_trailer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = "FwoGZXIvYXdzEJr//////////wEaDOn+token=="
    headers = [
        ("x-amz-meta-tag", "one"),
        ("x-amz-meta-tag", " two  words "),
        ("x-amz-trailer", "x-amz-checksum-crc32"),
        ("x-amz-decoded-content-length", "1048576"),
        ("x-amz-sdk-checksum-algorithm", "CRC32"),
    ]
    path = "/bucket/big.dcm"
    theirs = _botocore(
        monkeypatch,
        "PUT",
        f"https://s3.eu-west-1.amazonaws.com{path}",
        [("partNumber", "3"), ("uploadId", "u")],
        headers,
        STREAMING_UNSIGNED_PAYLOAD_TRAILER,
        token=token,
    )
    ours = _sign(
        "PUT",
        "s3.eu-west-1.amazonaws.com",
        path,
        [("partNumber", "3"), ("uploadId", "u")],
        headers,
        STREAMING_UNSIGNED_PAYLOAD_TRAILER,
        token=token,
    )
    _assert_same(ours, theirs, token)
    assert "x-amz-security-token" in ours["Authorization"]


def test_get_with_range_matches_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    headers = [("Range", "bytes=100-199"), ("x-amz-checksum-mode", "ENABLED")]
    theirs = _botocore(
        monkeypatch, "GET", "http://localhost:5000/b/k.dcm", [], headers, "", region="us-east-1"
    )
    ours = _sign("GET", "localhost:5000", "/b/k.dcm", [], headers, EMPTY_SHA256, region="us-east-1")
    _assert_same(ours, theirs, None)


_KEY_CHARS = "abcXYZ019 -_.~/+=&?#%:;@,!$'()*[]{}<>|^`\"\\éü日😀\u00a0"


def test_random_requests_match_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(20240309)
    for _ in range(150):
        key = "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(1, 24)))
        path = "/bkt/" + percent_encode(key, safe="/~")
        query = [
            (
                "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(1, 6))),
                "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(0, 6))),
            )
            for _ in range(rng.randint(0, 4))
        ]
        meta = "".join(rng.choice("ab \t") for _ in range(rng.randint(0, 8)))
        headers = [("x-amz-meta-r", meta), ("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg==")]
        payload = rng.choice([UNSIGNED_PAYLOAD, EMPTY_SHA256])
        theirs = _botocore(monkeypatch, "GET", f"https://h.example{path}", query, headers, payload)
        ours = _sign("GET", "h.example", path, query, headers, payload)
        _assert_same(ours, theirs, None)


def test_unsigned_and_replaced_headers_do_not_change_the_signature() -> None:
    base = [("x-amz-acl", "private")]
    noise = [
        ("User-Agent", "Boto3/1.35"),
        ("Content-Length", "12"),
        ("Accept-Encoding", "identity"),
        ("Expect", "100-continue"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=CLIENT/..."),
        ("X-Amz-Date", "19990101T000000Z"),
        ("x-amz-content-sha256", "0" * 64),
        ("X-Amz-Security-Token", "client-token"),
        ("Host", "attacker.example"),
    ]
    plain = _sign("PUT", "h.example", "/b/k", [], base, UNSIGNED_PAYLOAD)
    noisy = _sign("PUT", "h.example", "/b/k", [], base + noise, UNSIGNED_PAYLOAD)
    assert plain == noisy
    assert "SignedHeaders=host;x-amz-acl;x-amz-content-sha256;x-amz-date," in plain["Authorization"]
    assert set(REPLACED_HEADERS) == {
        "authorization",
        "x-amz-date",
        "x-amz-content-sha256",
        "x-amz-security-token",
    }


def test_signature_depends_on_every_signed_input() -> None:
    base = _sign("PUT", "h.example", "/b/k", [("a", "1")], [("x-amz-acl", "private")], EMPTY_SHA256)
    variants = [
        _sign("POST", "h.example", "/b/k", [("a", "1")], [("x-amz-acl", "private")], EMPTY_SHA256),
        _sign("PUT", "h2.example", "/b/k", [("a", "1")], [("x-amz-acl", "private")], EMPTY_SHA256),
        _sign("PUT", "h.example", "/b/K", [("a", "1")], [("x-amz-acl", "private")], EMPTY_SHA256),
        _sign("PUT", "h.example", "/b/k", [("a", "2")], [("x-amz-acl", "private")], EMPTY_SHA256),
        _sign("PUT", "h.example", "/b/k", [("a", "1")], [("x-amz-acl", "public")], EMPTY_SHA256),
        _sign("PUT", "h.example", "/b/k", [("a", "1")], [("x-amz-acl", "private")], "b" * 64),
        _sign(
            "PUT",
            "h.example",
            "/b/k",
            [("a", "1")],
            [("x-amz-acl", "private")],
            EMPTY_SHA256,
            now=NOW + timedelta(seconds=1),
        ),
    ]
    signatures = {v["Authorization"].rsplit("=", 1)[1] for v in variants}
    assert len(signatures) == len(variants)
    assert base["Authorization"].rsplit("=", 1)[1] not in signatures


def test_timezone_aware_time_is_converted_to_utc() -> None:
    local = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert _sign("GET", "h", "/", [], [], EMPTY_SHA256, now=local) == _sign(
        "GET", "h", "/", [], [], EMPTY_SHA256
    )


def test_canonical_path_normalises_to_what_s3_checks() -> None:
    assert canonical_path("") == "/"
    assert canonical_path("/b/a b+c") == "/b/a%20b%2Bc"
    assert canonical_path("/b/%41%7e%2f%e2%82%ac") == "/b/A~/%E2%82%AC"
    assert canonical_path("/b/%FF") == "/b/%FF"
    for path in ("/b/a b", "/b/a%2fb", "/b/%41", "/b/a+b", "b/no-slash"):
        with pytest.raises(SigningError, match="canonical form"):
            _sign("GET", "h", path, [], [], EMPTY_SHA256)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"headers": [("x-amz-meta-a", "line\r\nInjected: 1")]}, "cannot be signed"),
        ({"headers": [("x-amz-meta-a", "caf\u00e9")]}, "cannot be signed"),
        ({"headers": [("x-amz-meta-a", "nul\x00")]}, "cannot be signed"),
        ({"headers": [("bad name", "v")]}, "invalid header name"),
        ({"headers": [("x-amz-meta-a\n", "v")]}, "invalid header name"),
        ({"method": "GET /x"}, "invalid method"),
        ({"host": "h.example\r\nX: y"}, "invalid host"),
        ({"host": ""}, "invalid host"),
        ({"payload_hash": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"}, "unsupported payload"),
        ({"payload_hash": "A" * 64}, "unsupported payload"),
        ({"now": datetime(2024, 1, 1)}, "timezone-aware"),
        ({"region": "eu/west"}, "credential scope"),
        ({"access_key_id": ""}, "credential scope"),
        ({"session_token": "tok\nen"}, "session token"),
        ({"session_token": ""}, "session token"),
    ],
)
def test_refuses_what_cannot_be_signed_safely(kwargs: dict[str, Any], reason: str) -> None:
    args: dict[str, Any] = {
        "method": "PUT",
        "host": "h.example",
        "path": "/b/k",
        "query": [],
        "headers": [],
        "access_key_id": AKID,
        "secret_access_key": SECRET,
        "region": "eu-west-1",
        "payload_hash": EMPTY_SHA256,
        "now": NOW,
    }
    args.update(kwargs)
    with pytest.raises(SigningError, match=reason) as info:
        sign_s3(**args)
    # The reason never echoes the offending value.
    assert "Injected" not in info.value.reason and "caf" not in info.value.reason


def test_unsigned_header_values_are_not_validated() -> None:
    # Only signed headers are canonicalised; others are the HTTP layer's business.
    out = _sign("GET", "h", "/", [], [("User-Agent", "caf\u00e9")], EMPTY_SHA256)
    assert "user-agent" not in out["Authorization"]
