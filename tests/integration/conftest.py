"""Integration rig: a real JWKS server, a real Orthanc + DICOMweb plugin, and a real
mitmdump running the casb addon in front of it, all on free loopback ports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.jwks_server import JwksServer, TestKey
from tests.support.audit_keys import audit_settings
from tests.support.orthanc import Orthanc
from tests.support.proxy import REPO, CasbProxy

ISSUER = "https://idp.hospital.test/realms/imaging"
AUDIENCE = "casb"

Mint = Callable[..., str]


@pytest.fixture(scope="session")
def signing_key() -> TestKey:
    return TestKey.generate("RS256")


@pytest.fixture(scope="session")
def jwks(signing_key: TestKey) -> Iterator[JwksServer]:
    with JwksServer() as server:
        server.set_keys(signing_key)
        yield server


@pytest.fixture(scope="session")
def mint(signing_key: TestKey) -> Mint:
    def _mint(
        sub: str = "alice",
        roles: list[str] | None = None,
        *,
        mfa: bool = False,
        ttl: int = 600,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "roles": roles or [],
            "amr": ["pwd", "otp"] if mfa else ["pwd"],
            **claims,
        }
        return signing_key.sign(body)

    return _mint


def casb_config(
    workdir: Path, jwks_url: str, upstream: str, *, pacs: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """A production casb.yaml for tests: `pacs` and `research` (the destinations
    policies/hospital.yaml names) both lead to `upstream`."""
    workdir.mkdir(parents=True, exist_ok=True)
    uid_key = workdir / "dlp-uid.key"
    uid_key.write_text("test-only-uid-key-0123456789abcdef")
    return {
        "environment": "production",
        "state_dir": str(workdir),
        "destinations": {
            # Orthanc speaks plain http on loopback: a test rig
            "pacs": {
                "upstream": upstream,
                "route": "/pacs",
                "allow_plaintext": True,
                **(pacs or {}),
            },
            "research": {"upstream": upstream, "route": "/research", "allow_plaintext": True},
        },
        "identity": {"issuer": ISSUER, "audience": [AUDIENCE], "jwks_url": jwks_url},
        "policy": {"paths": [str(REPO / "policies" / "hospital.yaml")]},
        "audit": audit_settings(workdir),
        "dlp": {"uid_key_file": str(uid_key)},
        **extra,
    }


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, jwks: JwksServer
) -> Iterator[CasbProxy]:
    workdir = tmp_path_factory.mktemp("casb")
    config = casb_config(workdir, jwks.url, orthanc.dicomweb_url)
    with CasbProxy(workdir, config, forward=True) as server:
        yield server
