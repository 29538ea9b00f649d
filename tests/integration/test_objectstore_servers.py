"""The object-store rig itself, without the proxy: moto's S3 server and Azurite are real
servers that store what they are sent, verify TLS against the test PKI, and (Azurite)
check SAS signatures. The proxy tests lean on all of this, so it is proven here."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import ipaddress
import os
import urllib.parse
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.storage.blob import (
    AccountSasPermissions,
    BlobServiceClient,
    ResourceTypes,
    generate_account_sas,
)
from azure.storage.blob import ContentSettings as BlobContentSettings
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import SSLError
from cryptography import x509
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.verification import PolicyBuilder, Store
from cryptography.x509.verification import VerificationError as X509VerificationError

from tests.support.objectstores import (  # noqa: F401 - pytest fixtures
    AzuriteServer,
    MotoServer,
    azurite_server_fixture,
    azurite_tls_server_fixture,
    direct_transport,
    moto_server_fixture,
    moto_tls_server_fixture,
    object_store_pki_fixture,
)
from tests.support.pki import TlsFiles
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

NO_RETRY = Config(
    proxies={}, s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"}
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


# --- the PKI -------------------------------------------------------------------------


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize(
    "name",
    [
        DNSName("localhost"),
        DNSName("bucket.localhost"),
        IPAddress(ipaddress.ip_address("127.0.0.1")),
        IPAddress(ipaddress.ip_address("::1")),
    ],
)
def test_server_cert_verifies_for_loopback_names(object_store_pki: TlsFiles, name: Any) -> None:
    verifier = PolicyBuilder().store(Store([cert(object_store_pki.ca_pem)]))
    chain = verifier.build_server_verifier(name).verify(cert(object_store_pki.server_cert), [])
    assert chain[-1] == cert(object_store_pki.ca_pem)


def test_server_cert_refused_for_other_names_and_other_cas(object_store_pki: TlsFiles) -> None:
    server = cert(object_store_pki.server_cert)
    right_ca = PolicyBuilder().store(Store([cert(object_store_pki.ca_pem)]))
    with pytest.raises(X509VerificationError, match="subjectAltName"):
        right_ca.build_server_verifier(DNSName("s3.amazonaws.com")).verify(server, [])
    for other in (object_store_pki.rogue_ca_pem, object_store_pki.client_ca_pem):
        wrong_ca = PolicyBuilder().store(Store([cert(other)]))
        with pytest.raises(X509VerificationError):
            wrong_ca.build_server_verifier(DNSName("localhost")).verify(server, [])


def test_client_cert_chains_to_client_ca_only(object_store_pki: TlsFiles) -> None:
    client = cert(object_store_pki.client_cert)
    ok = PolicyBuilder().store(Store([cert(object_store_pki.client_ca_pem)]))
    assert ok.build_client_verifier().verify(client, []).subjects == [
        x509.DNSName("casb-test-client")
    ]
    server_ca = PolicyBuilder().store(Store([cert(object_store_pki.ca_pem)]))
    with pytest.raises(X509VerificationError):
        server_ca.build_client_verifier().verify(client, [])
    # clientAuth only: it cannot pose as a server even to its own CA
    with pytest.raises(X509VerificationError, match="EKU"):
        ok.build_server_verifier(DNSName("casb-test-client")).verify(client, [])


# --- moto (S3) -----------------------------------------------------------------------


def test_moto_put_get_over_plain_http(moto_server: MotoServer) -> None:
    assert moto_server.url.startswith("http://127.0.0.1:")
    s3 = moto_server.client()
    bucket = unique("plain")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="a/b.dcm", Body=b"DICM plain")
    assert s3.get_object(Bucket=bucket, Key="a/b.dcm")["Body"].read() == b"DICM plain"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a/b.dcm"]


def test_moto_put_get_over_tls_verified_against_test_ca(moto_tls_server: MotoServer) -> None:
    assert moto_tls_server.url.startswith("https://127.0.0.1:")
    s3 = moto_tls_server.client()
    assert s3.meta.endpoint_url == moto_tls_server.url
    bucket = unique("tls")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"over tls")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"over tls"


def test_moto_tls_client_trusting_rogue_ca_fails_verification(
    moto_tls_server: MotoServer, object_store_pki: TlsFiles
) -> None:
    bucket = unique("rogue")
    rogue = moto_tls_server.client(verify=str(object_store_pki.rogue_ca_pem), config=NO_RETRY)
    with pytest.raises(SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        rogue.create_bucket(Bucket=bucket)
    buckets = moto_tls_server.client().list_buckets()["Buckets"]
    assert bucket not in [b["Name"] for b in buckets]


def test_moto_default_aws_chunked_upload_over_tls(moto_tls_server: MotoServer) -> None:
    """boto3's default (since 1.36) over https: aws-chunked body with a CRC32 trailer;
    moto decodes it and stores the plain bytes."""
    s3 = moto_tls_server.client()
    sent: dict[str, str] = {}

    def capture(request: Any, **_: Any) -> None:
        sent.update(
            {
                k.lower(): v.decode() if isinstance(v, bytes) else v
                for k, v in request.headers.items()
            }
        )

    s3.meta.events.register("before-send.s3.PutObject", capture)
    bucket = unique("chunked")
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(300 * 1024)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=data)

    assert sent["content-encoding"] == "aws-chunked"
    assert sent["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert sent["x-amz-trailer"] == "x-amz-checksum-crc32"
    assert sent["x-amz-decoded-content-length"] == str(len(data))
    got = s3.get_object(Bucket=bucket, Key="big.bin", ChecksumMode="ENABLED")
    assert got["Body"].read() == data
    assert got["ChecksumCRC32"] == crc32_b64(data)
    assert "ContentEncoding" not in got  # aws-chunked is transport framing, not stored


def test_moto_multipart_upload_over_tls(moto_tls_server: MotoServer) -> None:
    s3 = moto_tls_server.client()
    bucket = unique("multipart")
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(6 * 1024 * 1024)
    mib5 = 5 * 1024 * 1024
    s3.upload_fileobj(
        io.BytesIO(data),
        bucket,
        "series.zip",
        Config=TransferConfig(multipart_threshold=mib5, multipart_chunksize=mib5),
    )
    head = s3.head_object(Bucket=bucket, Key="series.zip")
    assert head["ETag"].endswith('-2"')  # two parts
    assert s3.get_object(Bucket=bucket, Key="series.zip")["Body"].read() == data


def test_direct_clients_ignore_proxy_environment(
    moto_server: MotoServer, azurite_server: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, dead)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(moto_server.client(config=NO_RETRY).list_buckets()["Buckets"], list)
    assert azurite_server.service_client(retry_total=0).get_service_properties()


# --- Azurite (Azure Blob) ------------------------------------------------------------


def sas_client(server: AzuriteServer, token: str) -> BlobServiceClient:
    return BlobServiceClient(
        server.account_url,
        credential=token,
        transport=direct_transport(server.ca if server.tls else None),
        retry_total=0,
    )


def test_azurite_upload_via_account_sas_and_read_back(azurite_server: AzuriteServer) -> None:
    container = unique("sas")
    sas = azurite_server.account_sas()
    assert "sig=" in sas and "sp=" in sas
    via_sas = sas_client(azurite_server, sas)
    via_sas.create_container(container)
    via_sas.get_blob_client(container, "study/1.dcm").upload_blob(b"DICM via sas")

    direct = azurite_server.service_client()
    assert (
        direct.get_blob_client(container, "study/1.dcm").download_blob().readall()
        == b"DICM via sas"
    )
    assert via_sas.get_blob_client(container, "study/1.dcm").download_blob().readall() == (
        b"DICM via sas"
    )


def _flip_signature(token: str) -> str:
    q = dict(urllib.parse.parse_qsl(token))
    sig = base64.b64decode(q["sig"])
    q["sig"] = base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode()
    return urllib.parse.urlencode(q)


def _widen_permissions(server: AzuriteServer) -> str:
    q = dict(urllib.parse.parse_qsl(server.account_sas(AccountSasPermissions(read=True))))
    q["sp"] = "rwdlac"
    return urllib.parse.urlencode(q)


def _other_key(server: AzuriteServer) -> str:
    return generate_account_sas(
        server.account_name,
        base64.b64encode(os.urandom(64)).decode(),
        resource_types=ResourceTypes(service=True, container=True, object=True),
        permission=AccountSasPermissions(read=True, write=True, create=True),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )


def _drop_signature(server: AzuriteServer) -> str:
    q = dict(urllib.parse.parse_qsl(server.account_sas()))
    del q["sig"]
    return urllib.parse.urlencode(q)


BAD_SAS: dict[str, Callable[[AzuriteServer], str]] = {
    "flipped-signature-bit": lambda s: _flip_signature(s.account_sas()),
    "permissions-widened-after-signing": _widen_permissions,
    "signed-with-another-key": _other_key,
    "signature-removed": _drop_signature,
    "expired": lambda s: s.account_sas(expiry=dt.timedelta(hours=-1)),
}


@pytest.mark.parametrize("case", sorted(BAD_SAS))
def test_azurite_refuses_bad_sas(azurite_server: AzuriteServer, case: str) -> None:
    container = unique("badsas")
    azurite_server.service_client().create_container(container)
    token = BAD_SAS[case](azurite_server)
    blob = sas_client(azurite_server, token).get_blob_client(container, "x.dcm")
    with pytest.raises(HttpResponseError) as err:
        blob.upload_blob(b"must not land")
    assert err.value.status_code == 403
    # Azurite's code for "signature did not verify" (Azure itself says AuthenticationFailed)
    assert getattr(err.value, "error_code", None) == "AuthorizationFailure"
    assert "failed to authenticate" in str(err.value)
    assert not azurite_server.service_client().get_blob_client(container, "x.dcm").exists()


def test_azurite_enforces_sas_permissions(azurite_server: AzuriteServer) -> None:
    container = unique("readonly")
    azurite_server.service_client().create_container(container)
    token = azurite_server.account_sas(AccountSasPermissions(read=True, list=True))
    blob = sas_client(azurite_server, token).get_blob_client(container, "x.dcm")
    with pytest.raises(HttpResponseError) as err:
        blob.upload_blob(b"must not land")
    assert err.value.status_code == 403
    assert getattr(err.value, "error_code", None) == "AuthorizationPermissionMismatch"


def test_azurite_refuses_wrong_shared_key(azurite_server: AzuriteServer) -> None:
    container = unique("sharedkey")
    azurite_server.service_client().create_container(container)
    wrong = BlobServiceClient(
        azurite_server.account_url,
        credential={
            "account_name": azurite_server.account_name,
            "account_key": base64.b64encode(os.urandom(64)).decode(),
        },
        transport=direct_transport(None),
        retry_total=0,
    )
    with pytest.raises(HttpResponseError) as err:
        wrong.get_blob_client(container, "x").upload_blob(b"no")
    assert err.value.status_code == 403


def test_azurite_checks_content_md5(azurite_server: AzuriteServer) -> None:
    """Unlike moto, Azurite verifies a declared body digest (so a proxy that rewrites a
    body must rewrite or drop Content-MD5)."""
    container = unique("md5")
    client = azurite_server.service_client(retry_total=0)
    client.create_container(container)
    blob = client.get_blob_client(container, "x")
    bad_md5 = bytearray(hashlib.md5(b"other", usedforsecurity=False).digest())
    with pytest.raises(HttpResponseError) as err:
        blob.upload_blob(b"data", content_settings=BlobContentSettings(content_md5=bad_md5))
    assert err.value.status_code == 400
    assert not blob.exists()


def test_azurite_over_tls_verified_against_test_ca(
    azurite_tls_server: AzuriteServer, object_store_pki: TlsFiles
) -> None:
    assert azurite_tls_server.account_url.startswith("https://127.0.0.1:")
    container = unique("tls")
    client = sas_client(azurite_tls_server, azurite_tls_server.account_sas())
    client.create_container(container)
    client.get_blob_client(container, "k").upload_blob(b"over tls")
    direct = azurite_tls_server.service_client()
    assert direct.get_blob_client(container, "k").download_blob().readall() == b"over tls"

    rogue = BlobServiceClient(
        azurite_tls_server.account_url,
        credential=azurite_tls_server.account_sas(),
        transport=direct_transport(object_store_pki.rogue_ca_pem),
        retry_total=0,
    )
    with pytest.raises(ServiceRequestError, match="CERTIFICATE_VERIFY_FAILED"):
        rogue.get_blob_client(container, "k").download_blob()
