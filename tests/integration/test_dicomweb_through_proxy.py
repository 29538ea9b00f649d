"""End to end: dicomweb-client and httpx -> real mitmdump with the casb addon -> real
Orthanc with DICOMweb. Tokens are signed by a test IdP whose JWKS a real HTTP server
serves."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from unittest.mock import ANY

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.integration.conftest import Mint, casb_config
from tests.jwks_server import JwksServer
from tests.support.audit_keys import public_key
from tests.support.orthanc import Orthanc
from tests.support.proxy import CasbProxy

pytestmark = pytest.mark.integration
CASB = Path(sys.executable).with_name("casb")


def fresh_instance(patient_name: str = "Doe^Jane") -> Dataset:
    """pydicom's CT_small with new UIDs (so tests don't share studies) and our PHI."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = "PID-" + uuid.uuid4().hex[:8]
    # CT_small carries 179 vendor private tags; the clinical-upload DLP profile of
    # hospital.yaml blocks those (tests/integration/test_dlp_through_proxy.py).
    ds.remove_private_tags()
    return ds


def client(proxy: CasbProxy, token: str | None, destination: str = "pacs") -> DICOMwebClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return DICOMwebClient(url=f"{proxy.url}/{destination}", headers=headers)


def error_of(exc: requests.HTTPError) -> tuple[int, dict[str, object]]:
    assert exc.response is not None
    return exc.response.status_code, exc.response.json()


def test_radiologist_stores_searches_and_retrieves(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint
) -> None:
    dw = client(proxy, mint("rad1", ["radiologist"]))
    ds = fresh_instance()
    dw.store_instances(datasets=[ds])

    found = dw.search_for_studies(search_filters={"StudyInstanceUID": ds.StudyInstanceUID})
    assert [s["0020000D"]["Value"][0] for s in found] == [ds.StudyInstanceUID]

    got = dw.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.PixelData == ds.PixelData

    meta = dw.retrieve_study_metadata(ds.StudyInstanceUID)
    assert meta[0]["00080018"]["Value"] == [ds.SOPInstanceUID]
    # And it really is in the PACS, by a direct look that bypasses the proxy.
    assert orthanc.get_json(f"/dicom-web/studies/{ds.StudyInstanceUID}/series")


def test_referring_physician_reads_but_cannot_store_or_delete(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint
) -> None:
    ds = fresh_instance()
    client(proxy, mint("rad2", ["radiologist"])).store_instances(datasets=[ds])

    ref = client(proxy, mint("ref1", ["referring_physician"]))
    assert ref.search_for_series(ds.StudyInstanceUID)
    assert (
        ref.retrieve_instance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        ).SOPInstanceUID
        == ds.SOPInstanceUID
    )

    with pytest.raises(requests.HTTPError) as stored:
        ref.store_instances(datasets=[fresh_instance()])
    status, body = error_of(stored.value)
    assert status == 403
    assert body["error"] == "forbidden"
    assert "store" in str(body["message"]) and body["request_id"]

    with pytest.raises(requests.HTTPError) as deleted:
        ref.delete_study(ds.StudyInstanceUID)
    assert error_of(deleted.value)[0] == 403
    # The study is still there.
    assert orthanc.get_json(f"/dicom-web/studies/{ds.StudyInstanceUID}/series")


def test_no_token_and_bad_tokens_get_401_with_bearer_challenge(
    proxy: CasbProxy, mint: Mint
) -> None:
    with httpx.Client(base_url=proxy.url) as http:
        r = http.get("/pacs/studies")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "error=" not in r.headers["www-authenticate"]  # RFC 6750: no credentials
        assert r.json()["error"] == "unauthenticated"

        expired = mint("rad3", ["radiologist"], ttl=-600)
        r = http.get("/pacs/studies", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert "expired" in r.headers["www-authenticate"]
        assert r.json()["message"] == "token expired"

        r = http.get("/pacs/studies", headers={"Authorization": "Bearer not.a.jwt"})
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        r = http.get("/pacs/studies", headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert r.status_code == 401
        assert 'error="invalid_request"' in r.headers["www-authenticate"]
        assert r.is_redirect is False


def test_unknown_routes_and_destinations_are_denied(proxy: CasbProxy, mint: Mint) -> None:
    auth = {"Authorization": f"Bearer {mint('admin1', ['admin'], mfa=True)}"}
    with httpx.Client(base_url=proxy.url, headers=auth) as http:
        r = http.get("/pacs/patients")  # not DICOMweb: classified unknown
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        r = http.get("/elsewhere/studies")
        assert r.status_code == 403 and r.json()["error"] == "unknown_destination"
        r = http.request("PATCH", "/pacs/studies")
        assert r.status_code == 403
        r = http.get("/pacs/studies", headers={"X-HTTP-Method-Override": "DELETE"})
        assert r.status_code == 400 and "override" in r.json()["message"]


def test_evasive_urls_cannot_escape_the_destination(proxy: CasbProxy, mint: Mint) -> None:
    """A referring physician may read pacs but not research: encoded traversal, duplicate
    slashes and double encoding must not reach research or confuse the upstream."""
    auth = {"Authorization": f"Bearer {mint('ref2', ['referring_physician'])}"}
    with httpx.Client(base_url=proxy.url, headers=auth) as http:
        assert http.get("/pacs//studies/").status_code == 200
        assert http.get("/pacs/%73tudies").status_code == 200
        # Each resolves to /research/studies, and is judged there (not as an unknown
        # pacs route): the reason names research.
        for evasive in (
            "/pacs/%2e%2e/research/studies",
            "/pacs/%2E%2E%2Fresearch/studies",
            "/pacs/x/..%2f..%2fresearch/studies",
        ):
            r = http.get(evasive)
            assert r.status_code == 403, evasive
            assert "action 'search' on destination 'research'" in r.json()["message"]
        assert http.get("/pacs/%252e%252e/research/studies").status_code == 400
    # httpx would resolve a raw "../" itself; send it as a client could.
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"GET /pacs/../../studies HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: {auth['Authorization']}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")  # climbs above the root


def test_researcher_reads_research_masked_and_never_pacs(proxy: CasbProxy, mint: Mint) -> None:
    """The policy lets researchers read `research` only masked (`mask: research-view`;
    what masking does is tested in test_dlp_through_proxy.py), and never `pacs`."""
    auth = {"Authorization": f"Bearer {mint('res1', ['researcher'])}"}
    with httpx.Client(base_url=proxy.url, headers=auth) as http:
        r = http.get("/research/studies")
        assert r.status_code == 200 and isinstance(r.json(), list)
        r = http.get("/research/studies/1.2.3/thumbnail")
        assert r.status_code == 403 and r.json()["error"] == "unenforceable_obligation"
        r = http.get("/pacs/studies")
        assert r.status_code == 403 and "no allow rule" in r.json()["message"]
    record = proxy.audit_records()[-3]
    assert record["obligations"] == {"mask": "research-view"}
    assert record["dlp"]["profile"] == "research-view"


def test_forward_mode_reaches_only_destinations(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint
) -> None:
    assert proxy.forward_port is not None
    auth = {"Authorization": f"Bearer {mint('rad4', ['radiologist'])}"}
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy.forward_port}", headers=auth) as http:
        r = http.get(f"{orthanc.dicomweb_url}/studies")
        assert r.status_code == 200 and isinstance(r.json(), list)
        # Orthanc's own REST API is on the same host but outside the destination's base.
        r = http.get(f"{orthanc.url}/patients")
        assert r.status_code == 403 and r.json()["error"] == "unknown_destination"
        r = http.get("http://127.0.0.2:9/studies")
        assert r.status_code == 403


def test_client_token_is_not_forwarded_upstream(
    tmp_path: Path, jwks: JwksServer, mint: Mint
) -> None:
    """An Orthanc that requires its own Basic credential: casb replaces the client's JWT
    with it, and a client cannot get in without casb's credential."""

    secret = tmp_path / "pacs-password"
    secret.write_text("s3cret-" + uuid.uuid4().hex)
    with Orthanc(tmp_path / "orthanc", users={"casb": secret.read_text()}) as pacs:
        auth = {"type": "basic", "username": "casb", "password_file": str(secret)}
        config = casb_config(
            tmp_path / "casb", jwks.url, pacs.dicomweb_url, pacs={"upstream_auth": auth}
        )
        with CasbProxy(tmp_path / "casb", config) as px:
            token = mint("rad5", ["radiologist"])
            with httpx.Client(base_url=px.url) as http:
                r = http.get("/pacs/studies", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200, r.text
            # Without casb's credential Orthanc refuses: the 200 above was casb's doing.
            r = httpx.get(f"{pacs.dicomweb_url}/studies")
            assert r.status_code == 401


def test_upstream_down_gives_502_and_an_audit_record(
    tmp_path: Path, jwks: JwksServer, mint: Mint
) -> None:
    from tests.support.processes import free_port

    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    config = casb_config(tmp_path, jwks.url, dead)
    with CasbProxy(tmp_path, config) as px:
        r = httpx.get(
            f"{px.url}/pacs/studies",
            headers={"Authorization": f"Bearer {mint('rad6', ['radiologist'])}"},
        )
        assert r.status_code == 502
        records = px.audit_records()
    assert len(records) == 1
    assert records[0]["status"] == 502 and records[0]["error"] == "upstream_unreachable"
    assert records[0]["decision"] == "allow"


def test_every_request_is_audited_and_the_chain_verifies(
    tmp_path: Path, jwks: JwksServer, orthanc: Orthanc, mint: Mint
) -> None:

    config = casb_config(tmp_path, jwks.url, orthanc.dicomweb_url)
    sentinel = "Sentinel^Zebulon" + uuid.uuid4().hex[:6]
    ds = fresh_instance(patient_name=sentinel)
    with CasbProxy(tmp_path, config) as px:
        rad = client(px, mint("rad7", ["radiologist"]))
        rad.store_instances(datasets=[ds])  # 1 allow
        rad.search_for_studies(search_filters={"PatientName": sentinel})  # 2 allow
        rad.retrieve_instance(
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,  # 3 allow
            ds.SOPInstanceUID,
        )
        with pytest.raises(requests.HTTPError):
            client(px, mint("ref3", ["referring_physician"])).store_instances(
                datasets=[fresh_instance(patient_name=sentinel)]
            )  # 4 deny
        with pytest.raises(requests.HTTPError):
            client(px, None).search_for_studies()  # 5 deny (401)
        r = httpx.get(f"{px.url}/pacs/studies?PatientName={sentinel}")  # 6 deny (401)
        assert r.status_code == 401
        records = px.audit_records()
        log = px.log()
    # every line: start()'s readiness probe, the policy loaded, the final checkpoint
    on_file = len(px.audit_records(all_types=True))
    assert [r["type"] for r in px.audit_records(all_types=True)][-1] == "checkpoint"

    assert [r["status"] for r in records] == [200, 200, 200, 403, 401, 401]
    assert [r["decision"] for r in records] == ["allow"] * 3 + ["deny"] * 3
    assert [r["action"] for r in records[:4]] == ["store", "search", "retrieve", "store"]
    store, search, retrieve, denied = records[:4]
    assert store["principal"]["sub"] == "rad7" and store["bytes_in"] > len(ds.PixelData)
    assert search["query_keys"] == ["PatientName"]
    assert retrieve["uids"] == {
        "study": ds.StudyInstanceUID,
        "series": ds.SeriesInstanceUID,
        "instance": ds.SOPInstanceUID,
    }
    assert retrieve["bytes_out"] > 10_000  # the instance, as sent (Orthanc gzips it)
    assert denied["rule_id"] is None and denied["reasons"]
    assert all(r["request_id"] and r["policy_version"].startswith("sha256:") for r in records)

    # No PHI in the audit trail or the proxy's log: the sentinel name went through
    # stores, searches (as a query value) and denials.
    audit_text = (tmp_path / "audit.jsonl").read_text()
    assert sentinel not in audit_text and ds.PatientID not in audit_text
    assert sentinel not in log and ds.PatientID not in log

    key = ["--public-key", str(public_key(tmp_path))]
    ok = subprocess.run(
        [str(CASB), "audit", "verify", *key, str(tmp_path / "audit.jsonl")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"OK: {on_file} records" in ok.stdout
    assert "1 signed checkpoint(s) verified" in ok.stdout

    lines = (tmp_path / "audit.jsonl").read_text().splitlines(keepends=True)
    edited = list(lines)
    deny_at = next(i for i, line in enumerate(lines) if json.loads(line).get("status") == 403)
    rec = json.loads(edited[deny_at])
    rec["decision"] = "allow"  # someone hides a refused upload attempt
    edited[deny_at] = json.dumps(rec) + "\n"
    for name, tampered, bad_line in (
        ("edited", edited, deny_at + 1),
        ("deleted", lines[:2] + lines[3:], 3),
        ("reordered", [lines[0], lines[2], lines[1], *lines[3:]], 2),
    ):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(tampered))
        res = subprocess.run(
            [str(CASB), "audit", "verify", *key, str(f)], capture_output=True, text=True
        )
        assert res.returncode == 1, name
        assert f"line {bad_line}" in res.stdout, (name, res.stdout)
    # A forger who recomputes the whole chain after the edit passes the hash chain
    # check, not the signed checkpoint (they do not hold the signing key).
    rechained = tmp_path / "rechained.jsonl"
    rechained.write_text("".join(_rechain(edited)))
    res = subprocess.run(
        [str(CASB), "audit", "verify", *key, str(rechained)], capture_output=True, text=True
    )
    assert res.returncode == 1 and "TAMPERED" in res.stdout, res.stdout
    assert "signature" in res.stdout, res.stdout


def _rechain(lines: list[str]) -> list[str]:
    """The lines with seq/prev_hash/hash recomputed, as a forger would."""
    from casb.audit.chain import GENESIS_HASH, sealed_line

    out, prev = [], GENESIS_HASH
    for seq, line in enumerate(lines, start=1):
        rec = json.loads(line)
        for k in ("seq", "prev_hash", "hash"):
            rec.pop(k)
        if rec["type"] == "checkpoint":  # made consistent too: only its signature fails
            rec["checkpoint"].update(covers_seq=seq - 1, head_hash=prev)
        sealed, prev = sealed_line(rec, seq, prev)
        out.append(sealed.decode())
    return out


def test_large_responses_stream_and_are_audited_before_they_complete(
    proxy: CasbProxy, mint: Mint
) -> None:
    """A retrieval bigger than the buffer limit streams through; its audit record, with
    the byte count, is on disk by the time the client has the whole body."""
    import os

    ds = fresh_instance()
    ds.Rows, ds.Columns = 1024, 1536  # 3 MiB of 16-bit pixels, incompressible
    ds.PixelData = os.urandom(1024 * 1536 * 2)
    token = mint("rad8", ["radiologist"])
    client(proxy, token).store_instances(datasets=[ds])
    url = (
        f"{proxy.url}/pacs/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    with httpx.stream(
        "GET",
        url,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": 'multipart/related; type="application/dicom"',
            "Accept-Encoding": "identity",
        },
    ) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        received = sum(len(chunk) for chunk in r.iter_raw())
        # Read the log the moment the body is complete: the record must be there.
        records = {rec["request_id"]: rec for rec in proxy.audit_records()}
    assert received > len(ds.PixelData)
    assert records[request_id]["bytes_out"] == received
    assert records[request_id]["action"] == "retrieve"


def test_an_unwritable_audit_log_refuses_everything(
    tmp_path: Path, jwks: JwksServer, orthanc: Orthanc, mint: Mint
) -> None:
    """/dev/full accepts the open and fails every write (ENOSPC): no request may reach
    the PACS while no audit record can be written."""

    config = casb_config(tmp_path, jwks.url, orthanc.dicomweb_url)
    config["audit"] = {**config["audit"], "path": "/dev/full"}
    ds = fresh_instance()
    with CasbProxy(tmp_path, config) as px:
        token = mint("rad9", ["radiologist"])
        auth = {"Authorization": f"Bearer {token}"}
        # The first request finds out: its response is withheld — a 503 when it was
        # buffered, a cut connection when it was streaming (Orthanc sends larger QIDO
        # answers without Content-Length).
        try:
            r = httpx.get(f"{px.url}/pacs/studies", headers=auth)
            assert r.status_code == 503 and r.json()["error"] == "audit_unavailable"
        except httpx.RemoteProtocolError:
            pass
        # From then on nothing is forwarded at all.
        r = httpx.get(f"{px.url}/pacs/studies", headers=auth)
        assert r.status_code == 503 and r.json()["error"] == "audit_unavailable"
        uploader = client(px, token)
        uploader.set_http_retry_params(retry=False)  # it would retry a 503
        with pytest.raises(requests.HTTPError) as stored:
            uploader.store_instances(datasets=[ds])
        assert error_of(stored.value) == (
            503,
            {"error": "audit_unavailable", "message": ANY, "request_id": ANY},
        )
        # mitmdump writes its log asynchronously: wait (bounded) for the line.
        assert px.process is not None
        px.process.wait_until(
            lambda: "audit write failed" in px.log(), timeout=10, what="the audit-failure log line"
        )
    # The upload never reached the PACS.
    assert orthanc.get_json(f"/dicom-web/studies?StudyInstanceUID={ds.StudyInstanceUID}") == []


def test_malformed_requests_get_400_and_leave_no_phi_in_the_log(proxy: CasbProxy) -> None:
    """Requests mitmproxy itself cannot parse: a 400, the proxy keeps serving, and the
    raw bytes it echoes into its log are redacted."""
    import socket

    sentinel = "Sentinel" + uuid.uuid4().hex[:8]

    def send(raw: str) -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(raw.encode())
            return sock.recv(4096).split(b"\r\n", 1)[0]

    for raw in (
        f"GARBAGE /pacs/studies?PatientName={sentinel}\r\n\r\n",
        f"GET /pacs/studies?PatientName={sentinel}\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        status_line = send(raw)
        assert status_line.startswith(b"HTTP/1.1 400"), (raw, status_line)
    # Smuggling-shaped framing (Content-Length and a broken chunked body): never a 2xx;
    # mitmproxy may answer 4xx or drop the connection.
    status_line = send(
        f"POST /pacs/studies?PatientName={sentinel} HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    assert status_line == b"" or status_line.startswith(b"HTTP/1.1 4"), status_line
    assert httpx.get(f"{proxy.url}/pacs/studies").status_code == 401  # still serving
    log = proxy.log()
    assert sentinel not in log
    assert sentinel not in proxy.audit_path.read_text()
