"""The pipeline on object-store destinations (S3, GCS JSON + XML, Azure Blob, an
envelope-encrypted S3), without mitmproxy: real verifier (JWKS file), a small policy,
real router. What is forwarded (target, credentials), what is refused and why, the
error style SDKs get, and the audit record's object fields."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from casb.audit.record import build_record
from casb.config import Settings
from casb.encryption.keyring import create_keyring_file
from casb.exchange import EnvelopeSpec, Forward, IncomingRequest, Refusal, Transaction
from casb.runtime import Runtime
from tests.jwks_server import TestKey, jwks_of
from tests.support.audit_keys import audit_settings

ISS, AUD = "https://idp.test", "casb"
SAS_ENV = "OBJECTSTORE_PIPELINE_TEST_SAS"
PROXY_SAS = "sv=2024-08-04&sr=c&sp=rcw&sig=PROXYSIG%2Bx%3D"
SSE = ("x-amz-server-side-encryption", "AES256")
AWS_AUTH = (
    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=" + "0" * 64
)

POLICY = """
version: 1
roles: {staff: {}, copier: {}, masked: {}, inspected: {}}
rules:
  - id: staff-all
    effect: allow
    roles: [staff]
    actions: [store, retrieve, retrieve_metadata, list, delete, search]
    destinations: [s3, gcs, azure, vault, pacs, plain]
  - id: copier-dst
    effect: allow
    roles: [copier]
    actions: [store, retrieve]
    destinations: [s3, azure]
    when: {resource: {bucket: [dst]}}
  - id: masked-read
    effect: allow
    roles: [masked]
    actions: [retrieve, retrieve_metadata, list]
    destinations: [s3, gcs, azure]
    obligations: {mask: view}
  - id: inspected-store
    effect: allow
    roles: [inspected]
    actions: [store]
    destinations: [s3, gcs, azure, vault]
    obligations: {dlp: guard}
dlp:
  profiles:
    view: {deidentify: [retain_uids]}
    guard: {block: [private_tag]}
"""


@pytest.fixture(scope="module")
def key() -> TestKey:
    return TestKey.generate("ES256")


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory, key: TestKey) -> Iterator[Runtime]:
    """One runtime for the module: deciding never changes it (built once, as in the
    proxy)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(SAS_ENV, PROXY_SAS)
        runtime = _build(tmp_path_factory.mktemp("objectstore-pipeline"), key)
    yield runtime
    runtime.discard()


def _build(tmp_path: Path, key: TestKey) -> Runtime:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_of(key)))
    uid_key = tmp_path / "uid.key"
    uid_key.write_text("0123456789abcdef0123456789abcdef")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    keyring = tmp_path / "keyring.yaml"
    create_keyring_file(keyring)
    destinations: dict[str, Any] = {
        "s3": {"kind": "s3", "upstream": "https://s3.example.org"},
        "gcs": {"kind": "gcs", "upstream": "https://storage.googleapis.com"},
        "azure": {
            "kind": "azure_blob",
            "upstream": "https://acct.blob.core.windows.net",
            "upstream_auth": {"type": "azure_sas", "sas_env": SAS_ENV},
        },
        "vault": {
            "kind": "s3",
            "upstream": "https://vault.example.org",
            "envelope": {"keyring_file": str(keyring)},
        },
        "plain": {"kind": "s3", "upstream": "http://127.0.0.1:9000", "allow_plaintext": True},
        "pacs": {"upstream": "https://pacs.example.org/dw"},
    }
    settings = Settings(
        environment="production",
        destinations=destinations,
        identity={"issuer": ISS, "audience": [AUD], "jwks_file": str(jwks)},
        policy={"paths": [str(policy)]},
        audit=audit_settings(tmp_path),
        dlp={"uid_key_file": str(uid_key)},
    )
    return Runtime.build(settings)


def token(key: TestKey, roles: list[str], sub: str = "u1") -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": AUD, "sub": sub, "iat": now, "exp": now + 300, "roles": roles}
    return key.sign(claims)


def req(
    target: str,
    headers: list[tuple[str, str]],
    method: str = "GET",
    *,
    client_tls: bool = True,
) -> IncomingRequest:
    return IncomingRequest(
        method=method, target=target, headers=headers, client_ip="10.0.0.9", client_tls=client_tls
    )


def bearer(key: TestKey, roles: list[str], *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token(key, roles)}"), *extra]


async def decide(rt: Runtime, request: IncomingRequest) -> Transaction:
    return await rt.pipeline.decide(request)


async def forwarded(rt: Runtime, request: IncomingRequest) -> Forward:
    tx = await decide(rt, request)
    assert isinstance(tx.outcome, Forward), (tx.outcome, tx.reasons)
    return tx.outcome


async def refused(rt: Runtime, request: IncomingRequest, status: int, code: str) -> Refusal:
    tx = await decide(rt, request)
    assert isinstance(tx.outcome, Refusal), tx.outcome
    assert (tx.outcome.status, tx.outcome.code) == (status, code), tx.outcome.message
    return tx.outcome


# -- the casb token in an S3 SDK request ----------------------------------------------------


async def test_the_token_rides_in_the_s3_session_token(rt: Runtime, key: TestKey) -> None:
    headers = [
        ("Authorization", AWS_AUTH),
        ("X-Amz-Security-Token", token(key, ["staff"], sub="sdk-user")),
        ("X-Amz-Date", "20240101T000000Z"),
    ]
    tx = await decide(rt, req("/s3/bkt/a.dcm", headers))
    assert isinstance(tx.outcome, Forward), tx.reasons
    assert tx.principal is not None and tx.principal.subject == "sdk-user"
    removed = {h.lower() for h in tx.outcome.remove_headers}
    assert {"authorization", "x-amz-security-token", "x-amz-date"} <= removed


async def test_two_session_tokens_are_refused(rt: Runtime, key: TestKey) -> None:
    tok = token(key, ["staff"])
    headers = [("Authorization", AWS_AUTH), ("X-Amz-Security-Token", tok)]
    headers.append(("x-amz-security-token", tok))
    refusal = await refused(rt, req("/s3/bkt/a.dcm", headers), 401, "unauthenticated")
    assert tok not in refusal.message


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", AWS_AUTH)],  # a plain AWS credential: no casb token
        [("Authorization", AWS_AUTH), ("X-Amz-Security-Token", "not-a-jwt")],
        [("X-Amz-Security-Token", "x.y.z")],  # without SigV4 the session token is no token
    ],
)
async def test_no_valid_session_token_is_unauthenticated(
    rt: Runtime, headers: list[tuple[str, str]]
) -> None:
    refusal = await refused(rt, req("/s3/bkt/a.dcm", headers), 401, "unauthenticated")
    assert any(n == "WWW-Authenticate" for n, _ in refusal.headers)


async def test_a_session_token_beside_a_bearer_token_is_not_read(rt: Runtime, key: TestKey) -> None:
    headers = [
        ("Authorization", f"Bearer {token(key, ['staff'], sub='bearer-user')}"),
        ("X-Amz-Security-Token", token(key, ["staff"], sub="session-user")),
    ]
    tx = await decide(rt, req("/s3/bkt/a.dcm", headers))
    assert tx.principal is not None and tx.principal.subject == "bearer-user"


# -- the forwarded target ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "forwarded_target"),
    [
        (
            "/s3/bkt/dir/a%20b+c(1)!'*~%C3%A9.dcm",
            "/bkt/dir/a%20b%2Bc%281%29%21%27%2A~%C3%A9.dcm",
        ),
        ("/s3/bkt/a%2Bb;c,d.dcm", "/bkt/a%2Bb%3Bc%2Cd.dcm"),
        (
            "/s3/bkt?list-type=2&prefix=a%2Fb%20c&delimiter=%2F",
            "/bkt?delimiter=%2F&list-type=2&prefix=a%2Fb%20c",
        ),
        (
            "/gcs/storage/v1/b/bkt/o/dir%2Fsub%2Fimg%201.dcm?alt=media",
            "/storage/v1/b/bkt/o/dir%2Fsub%2Fimg%201.dcm?alt=media",
        ),
        (
            "/gcs/download/storage/v1/b/bkt/o/a%2Fb.dcm?alt=media",
            "/download/storage/v1/b/bkt/o/a%2Fb.dcm?alt=media",
        ),
        ("/gcs/bkt/dir/sub/img%201.dcm", "/bkt/dir/sub/img%201.dcm"),
        ("/gcs/bkt?prefix=p%2Fq", "/bkt?prefix=p%2Fq"),
    ],
)
async def test_targets_are_forwarded_fully_encoded(
    rt: Runtime, key: TestKey, target: str, forwarded_target: str
) -> None:
    fwd = await forwarded(rt, req(target, bearer(key, ["staff"])))
    assert fwd.target == forwarded_target
    assert fwd.scheme == "https" and fwd.port == 443


async def test_the_destination_base_and_host_are_used(rt: Runtime, key: TestKey) -> None:
    fwd = await forwarded(rt, req("/azure/cont/dir/x%3Fy.dcm", bearer(key, ["staff"])))
    assert fwd.host == "acct.blob.core.windows.net" and fwd.kind == "azure_blob"
    assert fwd.target.startswith("/cont/dir/x%3Fy.dcm?")
    assert fwd.operation == "GetBlob"
    assert ("Host", "acct.blob.core.windows.net") in fwd.set_headers


# -- credentials in the URL ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "forwarded_target"),
    [
        (
            "/s3/bkt/k.dcm?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDSECRET%2F2024"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host"
            "&X-Amz-Signature=abcd&X-Amz-Security-Token=tok&versionId=3",
            "/bkt/k.dcm?versionId=3",
        ),
        (
            "/s3/bkt/k.dcm?AWSAccessKeyId=AKIDSECRET&Signature=c2ln&Expires=1700000000"
            "&response-content-type=application%2Fdicom",
            "/bkt/k.dcm?response-content-type=application%2Fdicom",
        ),
        (
            "/s3/bkt/k.dcm?x-amz-server-side-encryption=AES256&x-amz-credential=AKIDSECRET",
            "/bkt/k.dcm",
        ),
        (
            "/gcs/bkt/k.dcm?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=AKIDSECRET%40p"
            "&X-Goog-Date=20240101T000000Z&X-Goog-Expires=60&X-Goog-SignedHeaders=host"
            "&X-Goog-Signature=ff&generation=5",
            "/bkt/k.dcm?generation=5",
        ),
        (
            "/gcs/bkt/k.dcm?GoogleAccessId=AKIDSECRET%40p.iam&Expires=1700000000&Signature=c2ln",
            "/bkt/k.dcm",
        ),
    ],
)
async def test_presigned_url_credentials_never_reach_the_store(
    rt: Runtime, key: TestKey, target: str, forwarded_target: str
) -> None:
    fwd = await forwarded(rt, req(target, bearer(key, ["staff"])))
    assert fwd.target == forwarded_target
    assert "AKIDSECRET" not in fwd.target and "Signature" not in fwd.target


async def test_a_client_sas_is_replaced_by_the_routes(rt: Runtime, key: TestKey) -> None:
    target = "/azure/cont/b.dcm?sv=2020-02-10&SIG=CLIENTSIG&se=2030-01-01&sp=racwd&sr=b&timeout=30"
    fwd = await forwarded(rt, req(target, bearer(key, ["staff"])))
    assert fwd.target == "/cont/b.dcm?sig=PROXYSIG%2Bx%3D&sp=rcw&sr=c&sv=2024-08-04&timeout=30"


async def test_no_client_sas_key_the_classifier_ignores_reaches_the_store(
    rt: Runtime, key: TestKey
) -> None:
    # classify_azure ignores every SAS key in its list (skdutid, sduoid included); the
    # pipeline must strip the same set, or those client values go upstream.
    target = "/azure/cont/b.dcm?sv=2025-07-05&sig=CLIENTSIG&skdutid=CLIENTTENANT&sduoid=CLIENTOID"
    fwd = await forwarded(rt, req(target, bearer(key, ["staff"])))
    assert "CLIENT" not in fwd.target
    assert fwd.target == "/cont/b.dcm?sig=PROXYSIG%2Bx%3D&sp=rcw&sr=c&sv=2024-08-04"


# -- copies ---------------------------------------------------------------------------------


async def test_a_copy_source_the_caller_may_not_read_is_refused(rt: Runtime, key: TestKey) -> None:
    headers = bearer(key, ["copier"], ("x-amz-copy-source", "src/Doe-John-MRN4711.dcm"), SSE)
    tx = await decide(rt, req("/s3/dst/new.dcm", headers, "PUT"))
    assert isinstance(tx.outcome, Refusal)
    assert (tx.outcome.status, tx.outcome.code) == (403, "forbidden")
    assert tx.outcome.message.startswith("copy source")
    assert "MRN4711" not in tx.outcome.message
    assert tx.decision is not None and tx.decision.allow  # the store itself was allowed
    record = json.dumps(build_record(tx, status=403, bytes_in=0, bytes_out=0, policy_version="x"))
    assert "MRN4711" not in record


async def test_a_copy_within_readable_buckets_goes_ahead(rt: Runtime, key: TestKey) -> None:
    headers = bearer(key, ["copier"], ("x-amz-copy-source", "/dst/old.dcm"), SSE)
    fwd = await forwarded(rt, req("/s3/dst/new.dcm", headers, "PUT"))
    assert fwd.operation == "CopyObject"


async def test_an_azure_copy_source_is_authorized_as_a_read(rt: Runtime, key: TestKey) -> None:
    source = "https://acct.blob.core.windows.net/src/secret.dcm"
    headers = bearer(key, ["copier"], ("x-ms-copy-source", source))
    headers.append(("x-ms-encryption-scope", "scope1"))
    refusal = await refused(rt, req("/azure/dst/new.dcm", headers, "PUT"), 403, "forbidden")
    assert refusal.message.startswith("copy source")
    ok = bearer(key, ["copier"], ("x-ms-copy-source", source.replace("/src/", "/dst/")))
    ok.append(("x-ms-encryption-scope", "scope1"))
    assert (await forwarded(rt, req("/azure/dst/new.dcm", ok, "PUT"))).operation == "CopyBlob"


async def test_a_copy_into_a_bucket_not_allowed_is_refused_by_the_rule(
    rt: Runtime, key: TestKey
) -> None:
    headers = bearer(key, ["copier"], ("x-amz-copy-source", "dst/a.dcm"), SSE)
    refusal = await refused(rt, req("/s3/src/a.dcm", headers, "PUT"), 403, "forbidden")
    assert not refusal.message.startswith("copy source")


# -- encryption at rest, public access ----------------------------------------------------


@pytest.mark.parametrize(
    ("target", "extra", "named"),
    [
        ("/s3/bkt/a.dcm", [], "x-amz-server-side-encryption"),
        ("/s3/bkt/a.dcm?uploads", [], "x-amz-server-side-encryption"),
        ("/azure/cont/a.dcm", [("x-ms-blob-type", "BlockBlob")], "x-ms-encryption-scope"),
        ("/gcs/bkt/a.dcm", [], "x-goog-encryption-kms-key-name"),
        ("/gcs/upload/storage/v1/b/bkt/o?uploadType=media&name=a.dcm", [], "kmsKeyName"),
    ],
)
async def test_uploads_without_at_rest_encryption_are_refused(
    rt: Runtime, key: TestKey, target: str, extra: list[tuple[str, str]], named: str
) -> None:
    method = "POST" if "uploads" in target or "uploadType" in target else "PUT"
    headers = bearer(key, ["staff"], *extra)
    refusal = await refused(rt, req(target, headers, method), 403, "encryption_required")
    assert named in refusal.message


@pytest.mark.parametrize(
    ("target", "method", "extra"),
    [
        ("/s3/bkt/a.dcm", "PUT", [SSE]),
        (
            "/azure/cont/a.dcm",
            "PUT",
            [("x-ms-blob-type", "BlockBlob"), ("x-ms-encryption-scope", "s")],
        ),
        ("/gcs/bkt/a.dcm", "PUT", [("x-goog-encryption-kms-key-name", "projects/p/keys/k")]),
        ("/s3/bkt/a.dcm", "GET", []),  # reads need nothing
    ],
)
async def test_uploads_asking_for_at_rest_encryption_go_ahead(
    rt: Runtime, key: TestKey, target: str, method: str, extra: list[tuple[str, str]]
) -> None:
    await forwarded(rt, req(target, bearer(key, ["staff"], *extra), method))


@pytest.mark.parametrize(
    ("target", "extra", "named"),
    [
        ("/s3/bkt/a.dcm", [SSE, ("x-amz-acl", "public-read")], "x-amz-acl"),
        ("/s3/bkt/a.dcm", [SSE, ("X-Amz-Grant-Read", "uri=AllUsers")], "x-amz-grant-read"),
        (
            "/gcs/bkt/a.dcm",
            [("x-goog-encryption-kms-key-name", "k"), ("x-goog-acl", "public-read")],
            "x-goog-acl",
        ),
        ("/vault/bkt/a.dcm", [("x-amz-acl", "authenticated-read")], "x-amz-acl"),
        ("/s3/bkt/a.dcm", [("x-amz-acl", "public-read-write")], "x-amz-acl"),  # before at rest
    ],
)
async def test_uploads_opening_objects_to_others_are_refused(
    rt: Runtime, key: TestKey, target: str, extra: list[tuple[str, str]], named: str
) -> None:
    refusal = await refused(
        rt, req(target, bearer(key, ["staff"], *extra), "PUT"), 403, "forbidden"
    )
    assert named in refusal.message


async def test_reads_are_not_checked_for_acl_headers(rt: Runtime, key: TestKey) -> None:
    await forwarded(rt, req("/s3/bkt/a.dcm", bearer(key, ["staff"], ("x-amz-acl", "public-read"))))


# -- envelope destinations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "method", "extra", "operation"),
    [
        ("/vault/bkt/a.dcm", "PUT", [], "PutObject"),  # no SSE header: the proxy encrypts
        ("/vault/bkt/a.dcm", "GET", [("Range", "bytes=0-9")], "GetObject"),
        ("/vault/bkt/a.dcm", "HEAD", [], "GetObject"),
        ("/vault/bkt?list-type=2", "GET", [], "ListObjectsV2"),
        ("/vault/bkt/a.dcm", "DELETE", [], "DeleteObject"),
        ("/vault/bkt/b.dcm", "PUT", [("x-amz-copy-source", "bkt/a.dcm")], "CopyObject"),
    ],
)
async def test_envelope_destinations_forward_what_they_can_serve(
    rt: Runtime,
    key: TestKey,
    target: str,
    method: str,
    extra: list[tuple[str, str]],
    operation: str,
) -> None:
    fwd = await forwarded(rt, req(target, bearer(key, ["staff"], *extra), method))
    assert fwd.operation == operation
    assert isinstance(fwd.envelope, EnvelopeSpec)
    assert fwd.envelope.chunk_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("target", "method", "extra", "said"),
    [
        ("/vault/bkt/a.dcm?uploads", "POST", [], "CreateMultipartUpload cannot be"),
        ("/vault/bkt/a.dcm?partNumber=1&uploadId=u", "PUT", [], "UploadPart cannot be"),
        ("/vault/bkt/a.dcm?uploadId=u", "POST", [], "CompleteMultipartUpload cannot be"),
        (
            "/vault/bkt/b.dcm",
            "PUT",
            [("x-amz-copy-source", "bkt/a.dcm"), ("x-amz-metadata-directive", "REPLACE")],
            "x-amz-metadata-directive: COPY",
        ),
        ("/vault/bkt/b.dcm", "PUT", [("x-amz-copy-source", "other/a.dcm")], "same bucket"),
    ],
)
async def test_envelope_destinations_refuse_what_they_cannot(
    rt: Runtime, key: TestKey, target: str, method: str, extra: list[tuple[str, str]], said: str
) -> None:
    headers = bearer(key, ["staff"], SSE, *extra)
    refusal = await refused(rt, req(target, headers, method), 501, "envelope_unsupported")
    assert said in refusal.message


async def test_plain_destinations_carry_no_envelope(rt: Runtime, key: TestKey) -> None:
    fwd = await forwarded(rt, req("/s3/bkt/a.dcm", bearer(key, ["staff"])))
    assert fwd.envelope is None


# -- DLP obligations on object stores -----------------------------------------------------


@pytest.mark.parametrize("target", ["/s3/bkt/a.dcm", "/azure/cont/a.dcm", "/gcs/bkt/a.dcm"])
async def test_a_mask_obligation_cannot_be_met_on_object_reads(
    rt: Runtime, key: TestKey, target: str
) -> None:
    refusal = await refused(
        rt, req(target, bearer(key, ["masked"])), 403, "unenforceable_obligation"
    )
    assert "view" in refusal.message and "object-store" in refusal.message


@pytest.mark.parametrize(
    ("target", "method", "extra"),
    [
        ("/s3/bkt/a.dcm?uploads", "POST", [SSE]),
        ("/s3/bkt/a.dcm?partNumber=1&uploadId=u", "PUT", []),
        ("/azure/cont/a.dcm?comp=block&blockid=QUFB", "PUT", [("x-ms-encryption-scope", "s")]),
        ("/gcs/upload/storage/v1/b/bkt/o?uploadType=multipart&kmsKeyName=k", "POST", []),
        ("/gcs/upload/storage/v1/b/bkt/o?uploadType=resumable&kmsKeyName=k", "POST", []),
        ("/vault/bkt/a.dcm?uploads", "POST", []),
    ],
)
async def test_inspected_uploads_in_several_requests_are_415(
    rt: Runtime, key: TestKey, target: str, method: str, extra: list[tuple[str, str]]
) -> None:
    headers = bearer(key, ["inspected"], *extra)
    refusal = await refused(rt, req(target, headers, method), 415, "unsupported_media_type")
    assert "single request" in refusal.message


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("/s3/bkt/a.dcm", [SSE, ("Content-Type", "application/octet-stream")]),
        ("/vault/bkt/a.dcm", []),
        ("/azure/cont/a.dcm", [("x-ms-blob-type", "BlockBlob"), ("x-ms-encryption-scope", "s")]),
    ],
)
async def test_inspected_whole_object_uploads_carry_a_request_plan(
    rt: Runtime, key: TestKey, target: str, extra: list[tuple[str, str]]
) -> None:
    fwd = await forwarded(rt, req(target, bearer(key, ["inspected"], *extra), "PUT"))
    assert fwd.dlp is not None
    assert (fwd.dlp.direction, fwd.dlp.profile) == ("request", "guard")


# -- error style ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "style"),
    [
        ("/s3/bkt/a.dcm", "s3"),
        ("/vault/bkt/a.dcm", "s3"),
        ("/azure/cont/a.dcm", "azure"),
        ("/gcs/storage/v1/b/bkt/o/a.dcm?alt=media", "gcs"),
        ("/gcs/upload/storage/v1/b/bkt/o?uploadType=media&name=a", "gcs"),
        ("/gcs/download/storage/v1/b/bkt/o/a.dcm?alt=media", "gcs"),
        ("/gcs/bkt/a.dcm", "s3"),  # the XML API answers like S3
        ("/gcs", "s3"),
        ("/pacs/studies", "json"),
        ("/elsewhere/x", "json"),
    ],
)
async def test_refusals_are_styled_for_the_client(rt: Runtime, target: str, style: str) -> None:
    tx = await decide(rt, req(target, []))  # no token: refused, in the client's style
    assert isinstance(tx.outcome, Refusal)
    assert tx.error_style == style


# -- encryption in transit ------------------------------------------------------------------


async def test_a_plaintext_upload_is_refused_but_a_plaintext_read_is_not(
    rt: Runtime, key: TestKey
) -> None:
    put = req("/s3/bkt/a.dcm", bearer(key, ["staff"], SSE), "PUT", client_tls=False)
    refusal = await refused(rt, put, 403, "insecure_transport")
    assert "plaintext HTTP" in refusal.message
    await forwarded(rt, req("/s3/bkt/a.dcm", bearer(key, ["staff"]), client_tls=False))


async def test_an_allowed_plaintext_upstream_is_audited_with_a_warning(
    rt: Runtime, key: TestKey
) -> None:
    tx = await decide(rt, req("/plain/bkt/a.dcm", bearer(key, ["staff"], SSE), "PUT"))
    assert isinstance(tx.outcome, Forward) and tx.outcome.scheme == "http"
    assert tx.warnings == ["plaintext_upstream"]
    record = build_record(tx, status=200, bytes_in=0, bytes_out=0, policy_version="x")
    assert record["warnings"] == ["plaintext_upstream"]


# -- audit ----------------------------------------------------------------------------------

SECRET_KEY = "patients/Doe^John/MRN-123456.dcm"


@pytest.mark.parametrize(
    ("target", "method", "extra", "bucket", "operation", "allowed"),
    [
        ("/s3/bkt/patients/Doe%5EJohn/MRN-123456.dcm", "GET", [], "bkt", "GetObject", True),
        ("/s3/bkt/patients/Doe%5EJohn/MRN-123456.dcm", "PUT", [], "bkt", "PutObject", False),
        (
            "/gcs/storage/v1/b/gbkt/o/patients%2FDoe%5EJohn%2FMRN-123456.dcm?alt=media",
            "GET",
            [],
            "gbkt",
            "GetObject",
            True,
        ),
        (
            "/azure/cont/patients/Doe%5EJohn/MRN-123456.dcm",
            "DELETE",
            [],
            "cont",
            "DeleteBlob",
            True,
        ),
    ],
)
async def test_the_audit_record_names_the_object_by_hash_only(
    rt: Runtime,
    key: TestKey,
    target: str,
    method: str,
    extra: list[tuple[str, str]],
    bucket: str,
    operation: str,
    allowed: bool,
) -> None:
    tx = await decide(rt, req(target, bearer(key, ["staff"], *extra), method))
    assert tx.allowed is allowed
    record = build_record(
        tx, status=200 if allowed else 403, bytes_in=0, bytes_out=0, policy_version="x"
    )
    assert record["object"] == {
        "bucket": bucket,
        "operation": operation,
        "key_sha256": hashlib.sha256(SECRET_KEY.encode()).hexdigest(),
    }
    assert "{" in record["route"]  # a template
    dumped = json.dumps(record)
    for fragment in ("Doe", "MRN-123456", "Doe%5EJohn", "patients%2F"):
        assert fragment not in dumped, fragment
    if not allowed:
        assert record["error"] == "encryption_required"


async def test_a_bucket_request_has_no_key_hash(rt: Runtime, key: TestKey) -> None:
    tx = await decide(rt, req("/s3/bkt?list-type=2&prefix=Doe", bearer(key, ["staff"])))
    record = build_record(tx, status=200, bytes_in=0, bytes_out=0, policy_version="x")
    assert record["object"] == {"bucket": "bkt", "operation": "ListObjectsV2", "key_sha256": None}
    assert "Doe" not in json.dumps(record)


async def test_requests_without_a_bucket_have_no_object(rt: Runtime, key: TestKey) -> None:
    tx = await decide(rt, req("/pacs/studies", bearer(key, ["staff"])))
    record = build_record(tx, status=200, bytes_in=0, bytes_out=0, policy_version="x")
    assert record["object"] is None
