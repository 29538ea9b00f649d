"""Real object-store servers for integration tests: moto's S3 server (`moto_server` from
the venv) and Azurite's blob service (`azurite-blob`, npm package `azurite`), each on a
free loopback port, optionally over TLS with a certificate from tests.support.pki.

Readiness is a real SDK call (boto3 list_buckets, azure-storage-blob
get_service_properties) polled until a deadline, so a fixture hands out a server that
has already answered the kind of request the test will send. The clients built here
talk to the server directly and ignore HTTP(S)_PROXY from the environment: they are how
a test looks behind the proxy at what was really stored.

The pytest fixtures at the bottom are registered under the names `object_store_pki`,
`moto_server`, `moto_tls_server`, `azurite_server` and `azurite_tls_server`; import the
`*_fixture` functions into a conftest or test module to use them."""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from azure.core.exceptions import AzureError
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import (
    AccountSasPermissions,
    BlobServiceClient,
    ResourceTypes,
    generate_account_sas,
)
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support.pki import TlsFiles, tls_files
from tests.support.processes import Process, free_port

# Dummy credentials: moto accepts any; these are what the direct clients sign with.
AWS_ACCESS_KEY_ID = "testing"
AWS_SECRET_ACCESS_KEY = "testing"
AWS_REGION = "us-east-1"

# Azurite's well-known development account (published in Azure's docs, not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

READY_TIMEOUT = 30.0
TlsPair = tuple[Path, Path]


def _moto_argv() -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "moto.server"]


def direct_transport(verify: Path | None) -> RequestsTransport:
    """azure-core's requests transport without the environment's proxy settings."""
    return RequestsTransport(
        use_env_settings=False, connection_verify=str(verify) if verify else True
    )


class _Server:
    """A server process on 127.0.0.1:<free port>, HTTP or HTTPS: what moto and Azurite
    share (start with readiness, log, stop, context manager)."""

    name = ""

    def __init__(self, workdir: Path, *, tls: TlsPair | None = None, ca: Path | None = None):
        if tls is not None and ca is None:
            raise ValueError(f"a TLS {self.name} needs the CA that issued its certificate")
        self.workdir = workdir
        self.tls = tls
        self.ca = ca
        self.port = free_port()
        self.process: Process | None = None
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _launch(self, argv: list[str], ready: Callable[[], bool]) -> None:
        """Start `argv`, poll `ready` (a real client call) until the deadline; on
        failure the process is stopped and the error carries its log."""
        started = time.monotonic()
        self.process = Process(argv, log_path=self.workdir / f"{self.name}.log", cwd=self.workdir)
        try:
            self.process.wait_until(ready, timeout=READY_TIMEOUT, what=self.name)
        except BaseException:
            self.process.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def stop(self) -> int:
        return self.process.stop() if self.process else 0

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoServer(_Server):
    """moto's S3-compatible server on 127.0.0.1:<free port>, HTTP or HTTPS."""

    name = "moto_server"

    def client(self, **kw: Any) -> Any:
        """A boto3 S3 client straight to moto (no proxy), verifying against the test CA
        when TLS. Keyword arguments override the defaults (e.g. config=...)."""
        params: dict[str, Any] = {
            "endpoint_url": self.url,
            "aws_access_key_id": AWS_ACCESS_KEY_ID,
            "aws_secret_access_key": AWS_SECRET_ACCESS_KEY,
            "region_name": AWS_REGION,
            "verify": str(self.ca) if self.tls else None,
            "config": Config(proxies={}, s3={"addressing_style": "path"}),
        }
        params.update(kw)
        return boto3.client("s3", **params)

    def start(self) -> MotoServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [*_moto_argv(), "-H", "127.0.0.1", "-p", str(self.port)]
        if self.tls is not None:
            argv += ["-c", str(self.tls[0]), "-k", str(self.tls[1])]
        probe = self.client(
            config=Config(
                proxies={},
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=1,
                read_timeout=5,
            )
        )

        def ready() -> bool:
            try:
                probe.list_buckets()
            except (BotoCoreError, ClientError):
                return False
            return True

        self._launch(argv, ready)
        return self

    def __enter__(self) -> MotoServer:
        return self.start()


class AzuriteServer(_Server):
    """Azurite's blob service on 127.0.0.1:<free port>, HTTP or HTTPS, path-style
    account URLs (http://127.0.0.1:P/devstoreaccount1)."""

    name = "azurite-blob"
    account_name = AZURITE_ACCOUNT
    account_key = AZURITE_KEY

    @property
    def account_url(self) -> str:
        return f"{self.url}/{self.account_name}"

    def account_sas(
        self,
        permission: AccountSasPermissions | None = None,
        *,
        expiry: dt.timedelta = dt.timedelta(hours=1),
    ) -> str:
        """An account SAS token (query string, no leading '?') on service, container and
        object; by default read/write/delete/list/create/add, valid for an hour."""
        return generate_account_sas(
            self.account_name,
            self.account_key,
            resource_types=ResourceTypes(service=True, container=True, object=True),
            permission=permission
            or AccountSasPermissions(
                read=True, write=True, delete=True, list=True, create=True, add=True
            ),
            expiry=dt.datetime.now(dt.UTC) + expiry,
        )

    def service_client(self, credential: Any = None, **kw: Any) -> BlobServiceClient:
        """A BlobServiceClient straight to Azurite (no proxy), with the shared key unless
        `credential` is given (e.g. a SAS token string)."""
        cred = credential or {"account_name": self.account_name, "account_key": self.account_key}
        kw.setdefault("transport", direct_transport(self.ca if self.tls else None))
        return BlobServiceClient(self.account_url, credential=cred, **kw)

    def start(self) -> AzuriteServer:
        binary = shutil.which("azurite-blob")
        if binary is None:
            raise RuntimeError(
                "Azurite is not installed: npm install -g azurite (.ci/run installs it)"
            )
        location = self.workdir / "azurite"
        location.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(location),
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]
        if self.tls is not None:
            argv += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        probe = self.service_client(retry_total=0)

        def ready() -> bool:
            try:
                probe.get_service_properties(timeout=5)
            except AzureError:
                return False
            return True

        self._launch(argv, ready)
        return self

    def __enter__(self) -> AzuriteServer:
        return self.start()


def start_moto(workdir: Path, *, tls: TlsPair | None = None, ca: Path | None = None) -> MotoServer:
    """Start moto (call .stop(), or use it as a context manager)."""
    return MotoServer(workdir, tls=tls, ca=ca).start()


def start_azurite(
    workdir: Path, *, tls: TlsPair | None = None, ca: Path | None = None
) -> AzuriteServer:
    """Start Azurite's blob service (call .stop(), or use it as a context manager)."""
    return AzuriteServer(workdir, tls=tls, ca=ca).start()


@pytest.fixture(scope="session", name="object_store_pki")
def object_store_pki_fixture(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """One test PKI per session (see tests.support.pki.TlsFiles)."""
    return tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", name="moto_server")
def moto_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module", name="moto_tls_server")
def moto_tls_server_fixture(
    tmp_path_factory: pytest.TempPathFactory, object_store_pki: TlsFiles
) -> Iterator[MotoServer]:
    pki = object_store_pki
    with MotoServer(tmp_path_factory.mktemp("moto-tls"), tls=pki.server, ca=pki.ca_pem) as server:
        yield server


@pytest.fixture(scope="module", name="azurite_server")
def azurite_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    with AzuriteServer(tmp_path_factory.mktemp("azurite")) as server:
        yield server


@pytest.fixture(scope="module", name="azurite_tls_server")
def azurite_tls_server_fixture(
    tmp_path_factory: pytest.TempPathFactory, object_store_pki: TlsFiles
) -> Iterator[AzuriteServer]:
    pki = object_store_pki
    with AzuriteServer(
        tmp_path_factory.mktemp("azurite-tls"), tls=pki.server, ca=pki.ca_pem
    ) as server:
        yield server
