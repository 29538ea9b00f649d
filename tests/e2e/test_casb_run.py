"""`casb run` as a user starts it: dev mode, generated keys, `casb token mint`, the proxy
in front of a real Orthanc, and the admin API on the same process."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from pydicom.data import get_testdata_file

from tests.support.orthanc import Orthanc
from tests.support.pki import tls_files
from tests.support.processes import Process, free_port, port_open
from tests.support.proxy import REPO

CASB = Path(sys.executable).with_name("casb")
DICOMWEB_CLIENT = Path(sys.executable).with_name("dicomweb_client")


@pytest.fixture(scope="module")
def casb_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int, int]]:
    work = tmp_path_factory.mktemp("casb-run")
    with Orthanc(work / "orthanc") as orthanc:
        proxy_port, admin_port, tls_port = free_port(), free_port(), free_port()
        pki = tls_files(work / "pki")
        config = {
            "environment": "dev",
            "state_dir": str(work / "state"),
            "listeners": [
                # as `make run`: loopback, uploads over plaintext allowed
                {
                    "mode": "reverse",
                    "host": "127.0.0.1",
                    "port": proxy_port,
                    "allow_plaintext": True,
                },
                # as production: TLS with the operator's certificate
                {
                    "mode": "reverse",
                    "host": "127.0.0.1",
                    "port": tls_port,
                    "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
                },
            ],
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "destinations": {
                "pacs": {"upstream": orthanc.dicomweb_url, "allow_plaintext": True},
                "research": {"upstream": orthanc.dicomweb_url, "allow_plaintext": True},
            },
            "policy": {"paths": [str(REPO / "policies" / "hospital.yaml")]},
            "audit": {"path": str(work / "audit.jsonl")},
        }
        cfg = work / "casb.yaml"
        cfg.write_text(yaml.safe_dump(config))
        proc = Process([str(CASB), "run", "--config", str(cfg)], log_path=work / "run.log")
        try:
            proc.wait_until(
                lambda: port_open(proxy_port) and port_open(admin_port) and port_open(tls_port),
                timeout=30,
                what="casb run",
            )
            TLS[cfg] = (tls_port, pki.ca_pem)
            yield cfg, proxy_port, admin_port
        finally:
            proc.stop()
        assert "Try it:" in proc.log()  # it told the user how to use it


TLS: dict[Path, tuple[int, Path]] = {}  # config -> (TLS listener port, CA that issued it)


def mint(cfg: Path, *args: str) -> str:
    out = subprocess.run(
        [str(CASB), "token", "mint", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_minted_token_works_through_the_proxy(casb_run: tuple[Path, int, int]) -> None:
    cfg, proxy_port, _ = casb_run
    token = mint(cfg, "--sub", "alice", "--role", "radiologist")
    base = f"http://127.0.0.1:{proxy_port}/pacs"

    # The README walkthrough's upload and search, with dicomweb-client's own CLI.
    def store(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(DICOMWEB_CLIENT),
                "--url",
                base,
                "--bearer-token",
                token,
                "store",
                "instances",
                get_testdata_file(name),
            ],
            capture_output=True,
            text=True,
        )

    stored = store("MR_small.dcm")
    assert stored.returncode == 0, stored.stderr
    # CT_small carries vendor private tags: the clinical-upload DLP profile blocks it.
    blocked = store("CT_small.dcm")
    assert blocked.returncode == 1 and "409" in blocked.stderr
    r = httpx.get(f"{base}/studies", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert any(s["0020000D"]["Value"] for s in r.json())

    ref = mint(cfg, "--sub", "bob", "--role", "referring_physician")
    r = httpx.post(
        f"{base}/studies",
        headers={"Authorization": f"Bearer {ref}", "Content-Type": "application/dicom"},
    )
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_uploads_over_tls_pass_and_over_plaintext_are_refused(
    casb_run: tuple[Path, int, int],
) -> None:
    """`casb run` (the addon after mitmproxy's own TLS set-up) presents the configured
    certificate, and refuses uploads that reach a TLS listener over plaintext."""
    cfg, _, _ = casb_run
    tls_port, ca = TLS[cfg]
    token = mint(cfg, "--sub", "alice", "--role", "radiologist")
    body, ctype = stow_body(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    headers = {"Authorization": f"Bearer {token}", "Content-Type": ctype}
    ok = httpx.post(
        f"https://localhost:{tls_port}/pacs/studies",
        content=body,
        headers=headers,
        verify=ssl.create_default_context(cafile=str(ca)),
    )
    assert ok.status_code == 200, ok.text
    plain = httpx.post(f"http://127.0.0.1:{tls_port}/pacs/studies", content=body, headers=headers)
    assert plain.status_code == 403 and plain.json()["error"] == "insecure_transport"


def stow_body(instance: bytes) -> tuple[bytes, str]:
    boundary = "casb-e2e-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + instance
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_admin_api(casb_run: tuple[Path, int, int]) -> None:
    cfg, _, admin_port = casb_run
    admin = f"http://127.0.0.1:{admin_port}"
    assert httpx.get(f"{admin}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{admin}/readyz")
    assert ready.status_code == 200 and ready.json()["policy_version"].startswith("sha256:")

    body = {
        "method": "DELETE",
        "url": "/pacs/studies/1.2.3",
        "principal": {"sub": "carol", "roles": ["admin"], "mfa": False},
    }
    assert httpx.post(f"{admin}/v1/policy/simulate", json=body).status_code == 401
    rad = mint(cfg, "--sub", "dave", "--role", "radiologist")
    r = httpx.post(
        f"{admin}/v1/policy/simulate", json=body, headers={"Authorization": f"Bearer {rad}"}
    )
    assert r.status_code == 403
    adm = mint(cfg, "--sub", "erin", "--role", "admin", "--mfa")
    r = httpx.post(
        f"{admin}/v1/policy/simulate", json=body, headers={"Authorization": f"Bearer {adm}"}
    )
    assert r.status_code == 200
    decision = r.json()
    assert decision["decision"] == "deny" and decision["status"] == 401  # step-up to MFA
    assert decision["rule_id"] == "delete-needs-mfa"
    # Same JSON as `casb policy explain`.
    cli = subprocess.run(
        [
            str(CASB),
            "policy",
            "explain",
            "--config",
            str(cfg),
            "--method",
            "DELETE",
            "--url",
            "/pacs/studies/1.2.3",
            "--sub",
            "carol",
            "--role",
            "admin",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(cli.stdout) == decision


def test_token_mint_refuses_outside_dev(tmp_path: Path) -> None:
    res = subprocess.run(
        [str(CASB), "token", "mint", "--config", str(REPO / "casb.example.yaml"), "--sub", "x"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "dev signing key" in res.stderr


def test_casb_run_with_redis_reports_a_redis_outage_as_degraded(tmp_path: Path) -> None:
    """`casb run` against its own redis-server: ready with the store up; with the store
    killed it keeps answering /readyz (200, "degraded": every replica at once must not
    leave the Service) while requests are refused 503 state_unavailable (fail closed)."""
    from tests.support.redis_server import RedisServer

    proxy_port, admin_port = free_port(), free_port()
    with RedisServer(tmp_path / "redis") as redis:
        config = {
            "environment": "dev",
            "state_dir": str(tmp_path / "state"),
            "listeners": [
                {
                    "mode": "reverse",
                    "host": "127.0.0.1",
                    "port": proxy_port,
                    "allow_plaintext": True,
                }
            ],
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "destinations": {
                "pacs": {"upstream": "http://127.0.0.1:9/dicom-web", "allow_plaintext": True},
                "research": {"upstream": "http://127.0.0.1:9/dicom-web", "allow_plaintext": True},
            },
            "policy": {"paths": [str(REPO / "policies" / "hospital.yaml")]},
            "audit": {"path": str(tmp_path / "audit.jsonl")},
            "state": {"url": redis.url, "policy_poll_seconds": 0.2},
        }
        cfg = tmp_path / "casb.yaml"
        cfg.write_text(yaml.safe_dump(config))
        admin = f"http://127.0.0.1:{admin_port}"
        proc = Process([str(CASB), "run", "--config", str(cfg)], log_path=tmp_path / "run.log")
        try:
            proc.wait_until(
                lambda: port_open(proxy_port) and port_open(admin_port), timeout=30, what="casb run"
            )
            ready = httpx.get(f"{admin}/readyz").json()
            assert ready["status"] == "ready", ready
            assert ready["state"]["backend"] == "redis" and not ready["state"]["degraded"]
            token = mint(cfg, "--sub", "frank", "--role", "radiologist")
            redis.kill()

            def degraded() -> bool:
                body = httpx.get(f"{admin}/readyz")
                return body.status_code == 200 and body.json()["status"] == "degraded"

            proc.wait_until(degraded, timeout=10, what="/readyz to report degraded")
            r = httpx.get(
                f"http://127.0.0.1:{proxy_port}/pacs/studies",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 503 and r.json()["error"] == "state_unavailable"
        finally:
            proc.stop()
