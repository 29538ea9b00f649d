"""The proxy -> upstream leg: TLS verified against the destination's own CA bundle, with
an optional client certificate (mTLS), TLS 1.2 or newer. The upstreams here are real
TLS servers (Python's ssl module) on loopback; the one that requires a client
certificate refuses a proxy that has none."""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Mint, casb_config
from tests.jwks_server import JwksServer
from tests.support.objectstores import object_store_pki_fixture  # noqa: F401 - fixture
from tests.support.pki import TlsFiles
from tests.support.proxy import CasbProxy

pytestmark = pytest.mark.integration


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        peer = self.connection.getpeercert()  # type: ignore[attr-defined]
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Client-Cert", "yes" if peer else "no")
        self.send_header("X-Tls-Version", self.connection.version())  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _TlsServer(http.server.ThreadingHTTPServer):
    """Handshakes in the connection's thread. When the handshake fails the server does
    what a TLS 1.3 server that wants a client certificate does: its alert goes out, the
    client (whose side of the handshake ended first) sends its request anyway, and the
    server closes. Reading that request before closing makes the order on the wire
    always alert, then close (closing with the request unread would send a reset, which
    can discard the alert before the client reads it, and hide the case under test)."""

    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError):
            raw = socket.socket(fileno=tls.detach())
            raw.settimeout(30)
            with contextlib.suppress(OSError):
                raw.recv(65536)  # the request, or the end if the client gave up first
            raw.close()
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class TlsUpstream:
    """A DICOMweb-ish HTTPS server; `client_ca` makes a client certificate mandatory."""

    def __init__(self, pki: TlsFiles, *, client_ca: Path | None = None) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca)
        self.server = _TlsServer(("127.0.0.1", 0), _Answer)
        self.server.context = context
        self.url = f"https://127.0.0.1:{self.server.server_port}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TlsUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def upstreams(object_store_pki: TlsFiles) -> Iterator[tuple[TlsUpstream, TlsUpstream]]:
    with (
        TlsUpstream(object_store_pki, client_ca=object_store_pki.client_ca_pem) as mtls,
        TlsUpstream(object_store_pki) as plain_tls,
    ):
        yield mtls, plain_tls


def start_proxy(workdir: Path, jwks: JwksServer, pacs: dict, research: dict) -> CasbProxy:
    config = casb_config(workdir, jwks.url, "https://127.0.0.1:9/unused")
    config["destinations"]["pacs"] = {"route": "/pacs", **pacs}
    config["destinations"]["research"] = {"route": "/research", **research}
    return CasbProxy(workdir, config)


def test_client_certificate_and_ca_bundle_per_destination(
    tmp_path: Path,
    jwks: JwksServer,
    mint: Mint,
    object_store_pki: TlsFiles,
    upstreams: tuple[TlsUpstream, TlsUpstream],
) -> None:
    mtls, plain_tls = upstreams
    pki = object_store_pki
    with start_proxy(
        tmp_path / "a",
        jwks,
        pacs={
            "upstream": mtls.url,
            "tls": {
                "ca_bundle": str(pki.ca_pem),
                "client_cert_file": str(pki.client_cert),
                "client_key_file": str(pki.client_key),
            },
        },
        # the right server, but this destination trusts only an unrelated CA
        research={"upstream": plain_tls.url, "tls": {"ca_bundle": str(pki.rogue_ca_pem)}},
    ) as proxy:
        token = mint(roles=["radiologist"])
        ok = httpx.get(f"{proxy.url}/pacs/studies", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-client-cert"] == "yes"
        assert ok.headers["x-tls-version"] in ("TLSv1.2", "TLSv1.3")

        researcher = mint(roles=["researcher"])
        bad = httpx.get(
            f"{proxy.url}/research/studies", headers={"Authorization": f"Bearer {researcher}"}
        )
        assert bad.status_code == 502  # the upstream's certificate does not verify
        assert "certificate" in proxy.log().lower()
        records = [r for r in proxy.audit_records() if r["destination"] == "research"]
        assert records and records[-1]["error"] == "upstream_unreachable"


def test_without_its_client_certificate_the_proxy_is_refused_by_an_mtls_upstream(
    tmp_path: Path,
    jwks: JwksServer,
    mint: Mint,
    object_store_pki: TlsFiles,
    upstreams: tuple[TlsUpstream, TlsUpstream],
) -> None:
    mtls, plain_tls = upstreams
    with start_proxy(
        tmp_path / "b",
        jwks,
        pacs={"upstream": mtls.url, "tls": {"ca_bundle": str(object_store_pki.ca_pem)}},
        research={"upstream": plain_tls.url, "tls": {"ca_bundle": str(object_store_pki.ca_pem)}},
    ) as proxy:
        token = mint(roles=["radiologist"])
        refused = httpx.get(
            f"{proxy.url}/pacs/studies", headers={"Authorization": f"Bearer {token}"}
        )
        assert refused.status_code == 502  # not a hang: the alert ends the request
        assert "certificate required" in proxy.log()
        records = [r for r in proxy.audit_records() if r["destination"] == "pacs"]
        assert records and records[-1]["error"] == "upstream_unreachable"
        assert records[-1]["status"] == 502
        researcher = mint(roles=["researcher"])
        fine = httpx.get(
            f"{proxy.url}/research/studies", headers={"Authorization": f"Bearer {researcher}"}
        )
        assert fine.status_code == 200
        assert fine.headers["x-client-cert"] == "no"
