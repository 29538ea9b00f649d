"""Azure Blob through the proxy, for real: azure-storage-blob (bearer token = the casb
token, over TLS to the proxy) -> mitmdump with the casb addon -> Azurite, which the proxy
reaches with its own account SAS (Azurite checks SAS signatures). What is stored is
checked by reading Azurite directly."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient

from casb.encryption.keyring import create_keyring_file
from tests.integration.conftest import Mint, casb_config
from tests.jwks_server import JwksServer
from tests.support.objectstores import (  # noqa: F401 - pytest fixtures
    AzuriteServer,
    azurite_server_fixture,
    direct_transport,
    object_store_pki_fixture,
)
from tests.support.pki import TlsFiles
from tests.support.proxy import REPO, CasbProxy

pytestmark = pytest.mark.integration

SAS_ENV = "CASB_TEST_AZURE_SAS"
CHUNK = 16 * 1024


class CasbToken:
    """An azure-core TokenCredential handing out the casb token."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 600)


@pytest.fixture(scope="module")
def azproxy(
    tmp_path_factory: pytest.TempPathFactory,
    jwks: JwksServer,
    object_store_pki: TlsFiles,
    azurite_server: AzuriteServer,
) -> Iterator[CasbProxy]:
    workdir = tmp_path_factory.mktemp("casb-azure")
    keyring = workdir / "keyring.yaml"
    create_keyring_file(keyring)
    config = casb_config(workdir, jwks.url, "http://127.0.0.1:9/dicom-web")
    sas = {"type": "azure_sas", "sas_env": SAS_ENV}
    config["destinations"].update(
        {
            "archive": {
                "kind": "azure_blob",
                "upstream": azurite_server.account_url,
                "route": "/archive",
                "allow_plaintext": True,  # loopback test rig
                "upstream_auth": sas,
            },
            "vault": {
                "kind": "azure_blob",
                "upstream": azurite_server.account_url,
                "route": "/vault",
                "allow_plaintext": True,
                "upstream_auth": sas,
                "envelope": {"keyring_file": str(keyring), "chunk_bytes": CHUNK},
            },
            "images": {"kind": "s3", "upstream": "https://127.0.0.1:9"},
            "coldline": {"kind": "gcs", "upstream": "https://127.0.0.1:9"},
        }
    )
    config["policy"]["paths"].append(str(REPO / "policies" / "objectstores.yaml"))
    proxy = CasbProxy(workdir, config, env={SAS_ENV: azurite_server.account_sas()})
    proxy.config["listeners"] = [
        {
            "mode": "reverse",
            "host": "127.0.0.1",
            "port": proxy.port,
            "tls": {
                "cert_file": str(object_store_pki.server_cert),
                "key_file": str(object_store_pki.server_key),
            },
        }
    ]
    with proxy:
        yield proxy


@pytest.fixture(scope="module")
def containers(azurite_server: AzuriteServer) -> None:
    service = azurite_server.service_client()
    service.create_container("studies")
    service.create_container("exports")


def via_proxy(proxy: CasbProxy, pki: TlsFiles, token: str, route: str) -> BlobServiceClient:
    return BlobServiceClient(
        f"https://127.0.0.1:{proxy.port}/{route}",
        credential=CasbToken(token),
        transport=direct_transport(pki.ca_pem),
        retry_total=0,
    )


def test_put_blob_without_an_encryption_scope_is_refused(
    azproxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    containers: None,
    azurite_server: AzuriteServer,
) -> None:
    client = via_proxy(azproxy, object_store_pki, mint(roles=["technologist"]), "archive")
    blob = client.get_blob_client("studies", "report.pdf")
    with pytest.raises(HttpResponseError) as caught:
        blob.upload_blob(b"%PDF-1.7")
    assert caught.value.status_code == 403
    assert caught.value.error_code == "AuthorizationFailure"
    assert "x-ms-encryption-scope" in str(caught.value.message)
    direct = azurite_server.service_client().get_container_client("studies")
    assert [b.name for b in direct.list_blobs()] == []


def test_put_blob_with_customer_provided_key_is_stored(
    azproxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    containers: None,
    azurite_server: AzuriteServer,
) -> None:
    """A customer-provided key (CPK) satisfies the rule; Azurite stores the blob."""
    import base64
    import hashlib

    from azure.storage.blob import CustomerProvidedEncryptionKey

    raw = os.urandom(32)
    cpk = CustomerProvidedEncryptionKey(
        base64.b64encode(raw).decode(), base64.b64encode(hashlib.sha256(raw).digest()).decode()
    )
    client = via_proxy(azproxy, object_store_pki, mint(roles=["technologist"]), "archive")
    body = os.urandom(50_000)
    client.get_blob_client("studies", "notes/a.bin").upload_blob(body, cpk=cpk)
    listed = azurite_server.service_client().get_container_client("studies").list_blobs()
    assert [(b.name, b.size) for b in listed] == [("notes/a.bin", len(body))]
    again = client.get_blob_client("studies", "notes/a.bin").download_blob(cpk=cpk)
    assert again.readall() == body


def test_envelope_blob_is_ciphertext_in_azurite_and_plaintext_through_the_proxy(
    azproxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    containers: None,
    azurite_server: AzuriteServer,
) -> None:
    original = os.urandom(100_000)
    client = via_proxy(azproxy, object_store_pki, mint(roles=["radiologist"]), "vault")
    client.get_blob_client("exports", "research/x.bin").upload_blob(original)
    direct = azurite_server.service_client().get_blob_client("exports", "research/x.bin")
    stored = direct.download_blob().readall()
    assert stored != original and len(stored) == len(original) + 16 * -(-len(original) // CHUNK)
    assert direct.get_blob_properties().metadata["casb_envelope"] == "1"
    # the SDK downloads with x-ms-range requests: served by decrypting the covering chunks
    got = client.get_blob_client("exports", "research/x.bin").download_blob()
    assert got.readall() == original
    part = client.get_blob_client("exports", "research/x.bin").download_blob(
        offset=20_000, length=30_000
    )
    assert part.readall() == original[20_000:50_000]


def test_blocks_cannot_be_envelope_encrypted(
    azproxy: CasbProxy, object_store_pki: TlsFiles, mint: Mint, containers: None
) -> None:
    client = via_proxy(azproxy, object_store_pki, mint(roles=["radiologist"]), "vault")
    blob = client.get_blob_client("exports", "research/blocks.bin")
    with pytest.raises(HttpResponseError) as caught:
        blob.stage_block("YmxvY2sx", b"data")
    assert caught.value.status_code == 501


def test_the_sas_never_leaves_the_proxy(
    azproxy: CasbProxy,
    object_store_pki: TlsFiles,
    mint: Mint,
    containers: None,
    azurite_server: AzuriteServer,
) -> None:
    sig = azurite_server.account_sas().split("sig=")[1].split("&")[0]
    client = via_proxy(azproxy, object_store_pki, mint(roles=["technologist"]), "archive")
    with pytest.raises(HttpResponseError) as caught:  # Azurite's own 404, passed on
        client.get_blob_client("studies", "nope.bin").download_blob().readall()
    assert caught.value.status_code == 404
    assert sig not in str(caught.value.response.text())
    assert sig not in azproxy.log()
    assert sig not in Path(azproxy.audit_path).read_text()
