"""S3 through the proxy, for real: boto3 -> mitmdump with the casb addon -> moto's S3
server, in reverse mode (boto3's endpoint_url is the proxy, over TLS) and in forward mode
(boto3 uses the proxy as its HTTPS proxy and trusts the proxy's CA; the proxy verifies
moto's certificate against the destination's CA bundle).

What is stored is always checked by reading moto directly, bypassing the proxy.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from pydicom import dcmread
from pydicom.data import get_testdata_file

from casb.encryption.keyring import create_keyring_file, rotate_keyring_file
from tests.integration.conftest import Mint, casb_config
from tests.jwks_server import JwksServer
from tests.support.objectstores import (  # noqa: F401 - pytest fixtures
    MotoServer,
    moto_server_fixture,
    moto_tls_server_fixture,
    object_store_pki_fixture,
)
from tests.support.pki import TlsFiles
from tests.support.proxy import REPO, CasbProxy

pytestmark = pytest.mark.integration

SECRET_ENV = "CASB_TEST_S3_SECRET"
CHUNK = 16 * 1024  # small chunks, so small test objects span several
VERIFY_WHOLE = 64 * 1024  # objects above this stream (chunk by chunk)


def proxy_config(
    workdir: Path,
    jwks: JwksServer,
    pki: TlsFiles,
    moto_tls: MotoServer,
    moto: MotoServer,
    keyring: Path,
) -> dict[str, Any]:
    config = casb_config(workdir, jwks.url, "http://127.0.0.1:9/dicom-web")
    auth = {"type": "aws_sigv4", "access_key_id": "testing", "secret_access_key_env": SECRET_ENV}
    config["destinations"].update(
        {
            "images": {
                "kind": "s3",
                "upstream": moto_tls.url,
                "route": "/images",
                "virtual_host": "localhost",  # <bucket>.localhost names the bucket
                "upstream_auth": auth,
                "tls": {"ca_bundle": str(pki.ca_pem)},
            },
            "vault": {
                "kind": "s3",
                "upstream": moto.url,
                "route": "/vault",
                "allow_plaintext": True,  # loopback test rig
                "upstream_auth": auth,
                "envelope": {
                    "keyring_file": str(keyring),
                    "chunk_bytes": CHUNK,
                    "verify_whole_bytes": VERIFY_WHOLE,
                },
            },
            # the client signs for itself (browser POST policies): passthrough
            "archive": {
                "kind": "s3",
                "upstream": moto_tls.url,
                "route": "/archive",
                "upstream_auth": {"type": "passthrough"},
                "tls": {"ca_bundle": str(pki.ca_pem)},
            },
            "coldline": {"kind": "gcs", "upstream": "https://127.0.0.1:9"},
        }
    )
    config["policy"]["paths"].append(str(REPO / "policies" / "objectstores.yaml"))
    config["dlp"]["max_object_bytes"] = 100_000  # objects DLP reads whole, in memory
    # a role that uploads without DLP (browser POST forms cannot be inspected)
    extra = workdir / "uploader.yaml"
    extra.write_text(
        "version: 1\n"
        "roles: {uploader: {description: test uploads without DLP}}\n"
        "rules:\n"
        "  - {id: test-uploader, effect: allow, roles: [uploader], actions: [store],"
        " destinations: [archive, images]}\n"
    )
    config["policy"]["paths"].append(str(extra))
    return config


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keyring.yaml"
    create_keyring_file(path)
    return path


@pytest.fixture(scope="module")
def s3proxy(
    tmp_path_factory: pytest.TempPathFactory,
    jwks: JwksServer,
    object_store_pki: TlsFiles,
    moto_tls_server: MotoServer,
    moto_server: MotoServer,
    keyring: Path,
) -> Iterator[CasbProxy]:
    workdir = tmp_path_factory.mktemp("casb-s3")
    config = proxy_config(workdir, jwks, object_store_pki, moto_tls_server, moto_server, keyring)
    with CasbProxy(workdir, config, forward=True, env={SECRET_ENV: "moto-secret"}) as proxy:
        # the reverse listener presents the operator's certificate; it takes no
        # uploads over plaintext
        proxy.config["listeners"][0]["tls"] = {
            "cert_file": str(object_store_pki.server_cert),
            "key_file": str(object_store_pki.server_key),
        }
        proxy.config["listeners"][0]["allow_plaintext"] = False
        proxy.stop()
        proxy.start()
        yield proxy


@pytest.fixture(scope="module")
def buckets(moto_tls_server: MotoServer, moto_server: MotoServer) -> None:
    moto_tls_server.client().create_bucket(Bucket="scans")
    moto_server.client().create_bucket(Bucket="exports")


def s3_via_proxy(proxy: CasbProxy, pki: TlsFiles, token: str, route: str, **config: Any) -> Any:
    """boto3 pointed at the proxy (reverse mode): the casb token is the session token."""
    return boto3.client(
        "s3",
        endpoint_url=f"https://127.0.0.1:{proxy.port}/{route}",
        aws_access_key_id="casb",
        aws_secret_access_key="unused-by-casb",
        aws_session_token=token,
        region_name="us-east-1",
        verify=str(pki.ca_pem),
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            proxies={},
            **config,
        ),
    )


def records_for(proxy: CasbProxy, request_id: str) -> list[dict[str, Any]]:
    return [r for r in proxy.audit_records() if r["request_id"] == request_id]


def request_id_of(err: ClientError) -> str:
    return err.response["ResponseMetadata"]["HTTPHeaders"]["x-request-id"]


def dicom_bytes(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


# -- at-rest encryption rules -----------------------------------------------------------


def test_put_object_without_sse_is_refused_naming_the_header(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket="scans", Key="report.pdf", Body=b"%PDF-1.7 report")
    error = caught.value.response["Error"]
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert error["Code"] == "AccessDenied"
    assert "x-amz-server-side-encryption" in error["Message"]
    direct = moto_tls_server.client()
    assert direct.list_objects_v2(Bucket="scans").get("KeyCount", 0) == 0
    (record,) = records_for(s3proxy, request_id_of(caught.value))
    assert (record["decision"], record["error"], record["status"]) == (
        "deny",
        "encryption_required",
        403,
    )
    assert record["object"]["operation"] == "PutObject"
    assert "report.pdf" not in json.dumps(record)  # keys are file names: hashed only


def test_put_object_with_sse_is_stored(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    body = os.urandom(60_000)  # under dlp.max_object_bytes: this role uploads under DLP
    s3.put_object(Bucket="scans", Key="notes/a.bin", Body=body, ServerSideEncryption="AES256")
    direct = moto_tls_server.client()
    stored = direct.get_object(Bucket="scans", Key="notes/a.bin")
    assert stored["Body"].read() == body
    assert stored["ServerSideEncryption"] == "AES256"
    # and the same object reads back through the proxy
    assert s3.get_object(Bucket="scans", Key="notes/a.bin")["Body"].read() == body
    listed = s3.list_objects_v2(Bucket="scans", Prefix="notes/")
    assert [o["Key"] for o in listed["Contents"]] == ["notes/a.bin"]


def test_virtual_hosted_requests_name_the_bucket_in_the_host(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    token = mint(roles=["technologist"])
    base = f"https://127.0.0.1:{s3proxy.port}/images"
    tls = ssl.create_default_context(cafile=str(object_store_pki.ca_pem))
    host = {"Host": f"scans.localhost:{s3proxy.port}", "Authorization": f"Bearer {token}"}
    put = httpx.put(
        f"{base}/vhost/a.bin",
        content=b"virtual",
        headers={**host, "x-amz-server-side-encryption": "AES256"},
        verify=tls,
    )
    assert put.status_code == 200, put.text
    stored = moto_tls_server.client().get_object(Bucket="scans", Key="vhost/a.bin")
    assert stored["Body"].read() == b"virtual"
    listed = httpx.get(f"{base}/?list-type=2&prefix=vhost/", headers=host, verify=tls)
    assert listed.status_code == 200 and "<Key>vhost/a.bin</Key>" in listed.text
    (record,) = records_for(s3proxy, put.headers["x-request-id"])
    assert record["object"]["bucket"] == "scans"


def test_kms_without_a_key_is_refused_when_sse_is_malformed(
    s3proxy: CasbProxy, object_store_pki: TlsFiles, mint: Mint, buckets: None
) -> None:
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    with pytest.raises(ClientError) as caught:
        s3.put_object(
            Bucket="scans",
            Key="x.bin",
            Body=b"x",
            SSECustomerAlgorithm="AES256",  # SSE-C without its key: incomplete
            SSECustomerKey="",
        )
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 403)


def test_a_client_without_a_valid_token_gets_an_s3_error(
    s3proxy: CasbProxy, object_store_pki: TlsFiles, buckets: None
) -> None:
    s3 = s3_via_proxy(s3proxy, object_store_pki, "not-a-token", "images")
    with pytest.raises(ClientError) as caught:
        s3.list_objects_v2(Bucket="scans")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401
    assert caught.value.response["Error"]["Code"] == "AccessDenied"


def test_unknown_subresources_are_denied(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    """PUT ?acl would make an object public: not a `store`, denied by default."""
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["admin"], mfa=True), "images")
    with pytest.raises(ClientError) as caught:
        s3.put_bucket_acl(Bucket="scans", ACL="public-read")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    acl = moto_tls_server.client().get_bucket_acl(Bucket="scans")
    assert all(g["Grantee"].get("URI", "").find("AllUsers") < 0 for g in acl["Grants"])


def test_multipart_upload_needs_sse_at_creation_and_then_streams_its_parts(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    """boto3's managed upload (CreateMultipartUpload, UploadPart, CompleteMultipartUpload)
    through the proxy, re-signed by it; the at-rest rule is checked at creation."""
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["uploader"]), "images")
    body = os.urandom(11 * 1024 * 1024)
    config = TransferConfig(
        multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024
    )
    with pytest.raises(ClientError) as caught:
        s3.upload_fileobj(io.BytesIO(body), "scans", "multi/a.bin", Config=config)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "x-amz-server-side-encryption" in caught.value.response["Error"]["Message"]
    s3.upload_fileobj(
        io.BytesIO(body),
        "scans",
        "multi/a.bin",
        Config=config,
        ExtraArgs={"ServerSideEncryption": "AES256"},
    )
    stored = moto_tls_server.client().get_object(Bucket="scans", Key="multi/a.bin")
    assert stored["Body"].read() == body
    assert stored["ServerSideEncryption"] == "AES256"
    operations = [
        r["object"]["operation"]
        for r in s3proxy.audit_records()
        if r["object"] and r["status"] == 200 and r["method"] in ("POST", "PUT")
    ]
    for op in ("CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"):
        assert op in operations


def test_a_copy_is_also_a_read_of_its_source(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    """`uploader` may store but not read: copying an object it cannot read into a key it
    can write would launder the read."""
    moto_tls_server.client().put_object(Bucket="scans", Key="secret/s.bin", Body=b"secret")
    uploader = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["uploader"]), "images")
    copy = {"Bucket": "scans", "Key": "mine/s.bin", "ServerSideEncryption": "AES256"}
    with pytest.raises(ClientError) as caught:
        uploader.copy_object(CopySource={"Bucket": "scans", "Key": "secret/s.bin"}, **copy)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "copy source" in caught.value.response["Error"]["Message"]
    listed = moto_tls_server.client().list_objects_v2(Bucket="scans", Prefix="mine/")
    assert listed.get("KeyCount", 0) == 0
    # a technologist may read the source: the copy goes through (no DLP on a copy? the
    # images-upload rule inspects uploads, and a copy cannot be inspected: refused)
    tech = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    with pytest.raises(ClientError) as refused:
        tech.copy_object(CopySource={"Bucket": "scans", "Key": "secret/s.bin"}, **copy)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 415


# -- browser POST uploads ------------------------------------------------------------------


def post_form(proxy: CasbProxy, pki: TlsFiles, token: str, route: str, **fields: str) -> Any:
    return httpx.post(
        f"https://127.0.0.1:{proxy.port}/{route}/scans",
        data=fields,
        files={"file": ("upload.bin", b"posted bytes", "application/octet-stream")},
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=str(pki.ca_pem)),
    )


def test_browser_post_needs_the_sse_form_field(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    token = mint(roles=["uploader"])
    refused = post_form(s3proxy, object_store_pki, token, "archive", key="post/a.bin")
    assert refused.status_code == 403
    assert "x-amz-server-side-encryption" in refused.text and "form field" in refused.text
    direct = moto_tls_server.client()
    assert direct.list_objects_v2(Bucket="scans", Prefix="post/").get("KeyCount", 0) == 0
    stored = post_form(
        s3proxy,
        object_store_pki,
        token,
        "archive",
        key="post/b.bin",
        **{"x-amz-server-side-encryption": "AES256"},
    )
    assert stored.status_code in (200, 201, 204), stored.text
    got = direct.get_object(Bucket="scans", Key="post/b.bin")
    assert got["Body"].read() == b"posted bytes"


def test_browser_post_is_refused_where_the_proxy_signs(
    s3proxy: CasbProxy, object_store_pki: TlsFiles, mint: Mint, buckets: None
) -> None:
    response = post_form(
        s3proxy,
        object_store_pki,
        mint(roles=["uploader"]),
        "images",
        key="post/c.bin",
        **{"x-amz-server-side-encryption": "AES256"},
    )
    assert response.status_code == 501
    assert "PutObject" in response.text
    # and under DLP a form upload cannot be inspected as one object: refused too
    dlp = post_form(
        s3proxy,
        object_store_pki,
        mint(roles=["technologist"]),
        "archive",
        key="post/d.bin",
        **{"x-amz-server-side-encryption": "AES256"},
    )
    assert dlp.status_code == 415


# -- DLP on DICOM objects -----------------------------------------------------------------


def test_dicom_with_phi_in_private_tags_is_blocked(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    with pytest.raises(ClientError) as caught:
        s3.put_object(
            Bucket="scans",
            Key="ct/CT_small.dcm",
            Body=dicom_bytes("CT_small.dcm"),
            ServerSideEncryption="AES256",
            ContentType="application/dicom",
        )
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "private_tag" in caught.value.response["Error"]["Message"]
    keys = moto_tls_server.client().list_objects_v2(Bucket="scans", Prefix="ct/")
    assert keys.get("KeyCount", 0) == 0
    (record,) = records_for(s3proxy, request_id_of(caught.value))
    assert record["dlp"]["blocked"] == 1 and "private_tag" in record["dlp"]["rules"]


def test_clean_dicom_is_stored_unchanged(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    body = dicom_bytes("MR_small.dcm")
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    s3.put_object(Bucket="scans", Key="mr/MR_small.dcm", Body=body, ServerSideEncryption="AES256")
    stored = moto_tls_server.client().get_object(Bucket="scans", Key="mr/MR_small.dcm")
    assert stored["Body"].read() == body


def test_an_upload_dlp_would_hold_beyond_its_cap_is_refused_before_reading(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_tls_server: MotoServer,
) -> None:
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    with pytest.raises(ClientError) as caught:
        s3.put_object(
            Bucket="scans",
            Key="big/x.dcm",
            Body=os.urandom(200_000),
            ServerSideEncryption="AES256",
        )
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert "max_object_bytes" in caught.value.response["Error"]["Message"]
    keys = moto_tls_server.client().list_objects_v2(Bucket="scans", Prefix="big/")
    assert keys.get("KeyCount", 0) == 0


def test_dicom_dlp_refuses_multipart_uploads(
    s3proxy: CasbProxy, object_store_pki: TlsFiles, mint: Mint, buckets: None
) -> None:
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    with pytest.raises(ClientError) as caught:
        s3.create_multipart_upload(Bucket="scans", Key="big.dcm", ServerSideEncryption="AES256")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 415
    assert "single request" in caught.value.response["Error"]["Message"]


# -- transport ------------------------------------------------------------------------------


def test_upload_over_plaintext_http_is_refused(
    s3proxy: CasbProxy, mint: Mint, buckets: None
) -> None:
    response = httpx.put(
        f"http://127.0.0.1:{s3proxy.port}/images/scans/plain.bin",
        content=b"data",
        headers={
            "Authorization": f"Bearer {mint(roles=['technologist'])}",
            "x-amz-server-side-encryption": "AES256",
        },
    )
    assert response.status_code == 403
    assert "<CasbError>insecure_transport</CasbError>" in response.text
    # reads over the same plaintext listener are not refused for the transport
    listed = httpx.get(
        f"http://127.0.0.1:{s3proxy.port}/images/scans?list-type=2",
        headers={"Authorization": f"Bearer {mint(roles=['technologist'])}"},
    )
    assert listed.status_code == 200


def test_forward_mode_trusts_the_proxy_ca_and_verifies_the_upstream(
    s3proxy: CasbProxy, mint: Mint, buckets: None, moto_tls_server: MotoServer
) -> None:
    assert s3proxy.forward_port is not None
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_tls_server.url,  # where the client aims; the proxy intercepts
        aws_access_key_id="casb",
        aws_secret_access_key="unused",
        aws_session_token=mint(roles=["technologist"]),
        region_name="us-east-1",
        verify=str(s3proxy.ca_cert),  # the proxy's CA, not moto's
        config=Config(
            s3={"addressing_style": "path"},
            proxies={"https": f"http://127.0.0.1:{s3proxy.forward_port}"},
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    )
    s3.put_object(Bucket="scans", Key="fwd/x.bin", Body=b"forward", ServerSideEncryption="AES256")
    assert s3.get_object(Bucket="scans", Key="fwd/x.bin")["Body"].read() == b"forward"
    stored = moto_tls_server.client().get_object(Bucket="scans", Key="fwd/x.bin")
    assert stored["Body"].read() == b"forward"


def test_plaintext_upstream_refuses_store_unless_allowed(s3proxy: CasbProxy, mint: Mint) -> None:
    """`pacs` in this rig points at an http:// upstream without allow_plaintext... but the
    shared casb_config allows it: `vault` (allow_plaintext) warns instead; see the audit
    record of the envelope tests. Here a STOW-RS to a plaintext, not-allowed upstream."""
    workdir = s3proxy.workdir.parent / "casb-plain-upstream"
    config = casb_config(
        workdir,
        "http://127.0.0.1:9/jwks",
        "http://127.0.0.1:9/dicom-web",
        pacs={"allow_plaintext": False},
    )
    config["identity"] = s3proxy.config["identity"]
    with CasbProxy(workdir, config) as proxy:
        response = httpx.post(
            f"{proxy.url}/pacs/studies",
            content=b"--b--\r\n",
            headers={
                "Authorization": f"Bearer {mint(roles=['technologist'])}",
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
            },
        )
        assert response.status_code == 403
        assert response.json()["error"] == "insecure_transport"
        assert "plaintext http://" in response.json()["message"]
        (record,) = [r for r in proxy.audit_records() if r["method"] == "POST"]
        assert record["error"] == "insecure_transport"


# -- envelope encryption ----------------------------------------------------------------


def flip_stored_bit(store: MotoServer, key: str, where: Callable[[int], int], mask: int) -> None:
    """Tamper with a stored envelope object in place, straight in the store (as someone
    with write access to the bucket could), keeping its metadata."""
    direct = store.client()
    stored = direct.get_object(Bucket="exports", Key=key)
    body = bytearray(stored["Body"].read())
    body[where(len(body))] ^= mask
    direct.put_object(Bucket="exports", Key=key, Body=bytes(body), Metadata=stored["Metadata"])


def vault_client(proxy: CasbProxy, pki: TlsFiles, mint: Mint) -> Any:
    return s3_via_proxy(proxy, pki, mint(roles=["radiologist"]), "vault")


def test_envelope_object_is_ciphertext_in_the_store_and_plaintext_through_the_proxy(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_server: MotoServer,
) -> None:
    original = dicom_bytes("CT_small.dcm")  # patient name CompressedSamples^CT1
    s3 = vault_client(s3proxy, object_store_pki, mint)
    s3.put_object(Bucket="exports", Key="research/ct.dcm", Body=original)

    stored = moto_server.client().get_object(Bucket="exports", Key="research/ct.dcm")
    ciphertext = stored["Body"].read()
    assert b"DICM" not in ciphertext and b"CompressedSamples" not in ciphertext
    assert len(ciphertext) == len(original) + 16 * -(-len(original) // CHUNK)
    assert stored["Metadata"]["casb-envelope"] == "1"
    assert stored["Metadata"]["casb-length"] == str(len(original))

    got = s3.get_object(Bucket="exports", Key="research/ct.dcm")
    assert got["Body"].read() == original
    assert got["ContentLength"] == len(original)
    head = s3.head_object(Bucket="exports", Key="research/ct.dcm")
    assert head["ContentLength"] == len(original)
    assert not any(k.startswith("casb") for k in head.get("Metadata", {}))

    ranged = s3.get_object(Bucket="exports", Key="research/ct.dcm", Range="bytes=100-20000")
    assert ranged["Body"].read() == original[100:20001]
    assert ranged["ContentRange"] == f"bytes 100-20000/{len(original)}"
    tail = s3.get_object(Bucket="exports", Key="research/ct.dcm", Range="bytes=30000-99999")
    assert tail["Body"].read() == original[30000:]
    assert tail["ContentRange"] == f"bytes 30000-{len(original) - 1}/{len(original)}"
    suffix = s3.get_object(Bucket="exports", Key="research/ct.dcm", Range="bytes=-10")
    assert suffix["Body"].read() == original[-10:]

    puts = [r for r in s3proxy.audit_records() if r["envelope"] == "encrypted"]
    assert puts and puts[-1]["warnings"] == ["plaintext_upstream"]


def test_download_file_uses_ranges_and_gets_the_plaintext(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    tmp_path: Path,
) -> None:
    original = os.urandom(300_000)  # streams (above verify_whole) and spans many chunks
    s3 = vault_client(s3proxy, object_store_pki, mint)
    s3.put_object(Bucket="exports", Key="research/big.bin", Body=original)
    out = tmp_path / "big.bin"
    config = TransferConfig(multipart_threshold=64 * 1024, multipart_chunksize=64 * 1024)
    s3.download_file("exports", "research/big.bin", str(out), Config=config)
    assert out.read_bytes() == original


def test_a_flipped_ciphertext_byte_fails_the_read_with_an_integrity_error(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_server: MotoServer,
) -> None:
    original = dicom_bytes("MR_small.dcm")
    s3 = vault_client(s3proxy, object_store_pki, mint)
    s3.put_object(Bucket="exports", Key="research/mr.dcm", Body=original)
    flip_stored_bit(moto_server, "research/mr.dcm", lambda size: size // 2, 0x01)
    with pytest.raises(ClientError) as caught:
        s3.get_object(Bucket="exports", Key="research/mr.dcm")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 502
    assert "does not authenticate" in caught.value.response["Error"]["Message"]
    (record,) = records_for(s3proxy, request_id_of(caught.value))
    assert record["error"] == "integrity_error"
    assert record["envelope"].startswith("integrity_error")


def test_a_tampered_large_object_releases_only_authenticated_plaintext(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_server: MotoServer,
) -> None:
    original = os.urandom(5 * VERIFY_WHOLE)  # streamed
    s3 = vault_client(s3proxy, object_store_pki, mint)
    s3.put_object(Bucket="exports", Key="research/large.bin", Body=original)
    bad_chunk = 10
    flip_stored_bit(moto_server, "research/large.bin", lambda _: bad_chunk * (CHUNK + 16) + 5, 0x80)
    token = mint(roles=["radiologist"])
    received = bytearray()
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream(
            "GET",
            f"https://127.0.0.1:{s3proxy.port}/vault/exports/research/large.bin",
            headers={"Authorization": f"Bearer {token}"},
            verify=ssl.create_default_context(cafile=str(object_store_pki.ca_pem)),
        ) as response,
    ):
        assert response.status_code == 200
        for piece in response.iter_raw():
            received += piece
    # what arrived is authenticated plaintext only: chunks before the bad one, at most
    assert len(received) <= bad_chunk * CHUNK
    assert bytes(received) == original[: len(received)]
    rid = response.headers["x-request-id"]
    (record,) = records_for(s3proxy, rid)
    assert record["envelope"].startswith("integrity_error")


def test_old_objects_still_read_after_the_kek_is_rotated(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    keyring: Path,
    moto_server: MotoServer,
) -> None:
    """`casb envelope rotate` on the running proxy's keyring file: new writes move to
    the new primary (the proxy follows the file), old objects keep reading."""
    s3 = vault_client(s3proxy, object_store_pki, mint)
    direct = moto_server.client()
    s3.put_object(Bucket="exports", Key="research/old.bin", Body=b"before rotation")
    old_kek = direct.head_object(Bucket="exports", Key="research/old.bin")["Metadata"]["casb-kek"]
    new_kek = rotate_keyring_file(keyring)
    assert new_kek != old_kek
    deadline = time.monotonic() + 15
    while True:  # the proxy looks at the file at most once a second
        s3.put_object(Bucket="exports", Key="research/new.bin", Body=b"after rotation")
        used = direct.head_object(Bucket="exports", Key="research/new.bin")["Metadata"]
        if used["casb-kek"] == new_kek or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert used["casb-kek"] == new_kek
    assert s3.get_object(Bucket="exports", Key="research/old.bin")["Body"].read() == (
        b"before rotation"
    )
    assert s3.get_object(Bucket="exports", Key="research/new.bin")["Body"].read() == (
        b"after rotation"
    )


def test_an_upload_whose_checksum_trailer_is_wrong_is_never_stored(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_server: MotoServer,
) -> None:
    """aws-chunked with a CRC32 trailer that does not match: the proxy learns of the
    mismatch only at the end of the body and must not let the store complete the object.
    (How the body is split on the way is up to the network; the hold-back of the final
    sealed chunk that makes this hold for every split is unit-tested with controlled
    splits in tests/unit/test_object_crypto.py.)"""
    import base64
    import zlib

    data = os.urandom(3 * CHUNK + 100)
    bad_crc = base64.b64encode((zlib.crc32(data) ^ 1).to_bytes(4, "big")).decode()
    body = (
        f"{len(data):x}\r\n".encode()
        + data
        + b"\r\n0\r\n"
        + f"x-amz-checksum-crc32:{bad_crc}\r\n\r\n".encode()
    )
    token = mint(roles=["radiologist"])
    with pytest.raises(httpx.HTTPError):
        response = httpx.put(
            f"https://127.0.0.1:{s3proxy.port}/vault/exports/research/bad-crc.bin",
            content=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Encoding": "aws-chunked",
                "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                "x-amz-decoded-content-length": str(len(data)),
                "x-amz-trailer": "x-amz-checksum-crc32",
            },
            verify=ssl.create_default_context(cafile=str(object_store_pki.ca_pem)),
        )
        response.raise_for_status()
    listed = moto_server.client().list_objects_v2(Bucket="exports", Prefix="research/bad-crc")
    assert listed.get("KeyCount", 0) == 0
    records = [
        r
        for r in s3proxy.audit_records()
        if r["object"] and r["object"]["operation"] == "PutObject" and r["status"] == 400
    ]
    assert records and records[-1]["error"] == "bad_request"
    assert any("checksum" in reason for reason in records[-1]["reasons"])


def test_envelope_destination_refuses_multipart_uploads(
    s3proxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    buckets: None,
    moto_server: MotoServer,
) -> None:
    s3 = vault_client(s3proxy, object_store_pki, mint)
    with pytest.raises(ClientError) as caught:
        s3.upload_fileobj(
            io.BytesIO(os.urandom(6 * 1024 * 1024)),
            "exports",
            "research/multi.bin",
            Config=TransferConfig(multipart_threshold=5 * 1024 * 1024),
        )
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 501
    assert "multipart_threshold" in caught.value.response["Error"]["Message"]
    listed = moto_server.client().list_objects_v2(Bucket="exports", Prefix="research/multi")
    assert listed.get("KeyCount", 0) == 0


def test_phi_never_reaches_the_logs(
    s3proxy: CasbProxy, object_store_pki: TlsFiles, mint: Mint, buckets: None
) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    name = str(ds.PatientName)
    s3 = s3_via_proxy(s3proxy, object_store_pki, mint(roles=["technologist"]), "images")
    with pytest.raises(ClientError):
        s3.put_object(
            Bucket="scans",
            Key=f"phi/{name}.dcm",
            Body=dicom_bytes("CT_small.dcm"),
            ServerSideEncryption="AES256",
        )
    assert name not in s3proxy.audit_path.read_text()
    assert name not in s3proxy.log()
