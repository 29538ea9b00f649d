"""No PHI anywhere (issue 6): sentinel PHI pushed through every path the proxy has, then
searched for in everything the proxy emits.

DICOM instances carry distinct, unguessable sentinels in Patient Name, Patient ID,
Patient Birth Date, free text (Study Description, Image Comments) and a private tag. They
go through a real mitmdump with the casb addon (exporting OTLP/HTTP to a real receiver)
to a real Orthanc on every path: an allowed upload, a de-identified upload, blocked and
partly blocked uploads, masked and unmasked reads, and malformed input (truncated DICOM,
broken multipart, raw bodies, query values, headers, forged and odd tokens, unknown
destinations and routes, unparsable HTTP). Each path's status is asserted, so the
check at the end cannot pass vacuously; then the proxy is stopped (its telemetry
flushes) and the sentinels, in their DICOM and URL encodings and in any letter case,
must be in none of: the raw OTLP payloads (spans, metrics, logs), the proxy's output,
the audit log, any file the proxy wrote, any error response (body and headers).
Responses that answer an authorized client may carry them: those are not checked.

The tests of this module run in order and share one proxy; the last one checks.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import socket
import string
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.integration.conftest import Mint, casb_config
from tests.jwks_server import JwksServer, TestKey
from tests.support.orthanc import Orthanc
from tests.support.otlp import OtlpReceiver
from tests.support.proxy import CasbProxy

pytestmark = pytest.mark.integration


def _letters(n: int) -> str:
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(n))


@dataclass(frozen=True)
class Sentinels:
    """Fresh per run: none of these can occur anywhere by chance."""

    family: str = field(default_factory=lambda: "Zq" + _letters(10))
    given: str = field(default_factory=lambda: "Wv" + _letters(10))
    patient_id: str = field(default_factory=lambda: "PIDX" + _letters(6) + "7")
    birth_date: str = field(
        default_factory=lambda: (
            f"19{secrets.randbelow(30) + 10}"
            f"{secrets.randbelow(12) + 1:02d}{secrets.randbelow(28) + 1:02d}"
        )
    )
    study_description: str = field(default_factory=lambda: "Kx" + _letters(12))
    image_comments: str = field(default_factory=lambda: "Rj" + _letters(12))
    private_value: str = field(default_factory=lambda: "Pv" + _letters(12))

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"

    def variants(self) -> list[str]:
        """Every form a sentinel could take on the way out: DICOM PN as stored and
        displayed, its components, ISO dates, URL encodings (compared case-blind)."""
        d = self.birth_date
        plain = [
            self.name,
            f"{self.family} {self.given}",
            f"{self.given} {self.family}",
            self.family,
            self.given,
            self.patient_id,
            d,
            f"{d[:4]}-{d[4:6]}-{d[6:]}",
            self.study_description,
            self.image_comments,
            self.private_value,
        ]
        encoded = [urllib.parse.quote(v, safe="") for v in plain]
        return sorted(set(plain + encoded))


S = Sentinels()
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={b}'
NOT_AUTHORIZED, CANNOT_UNDERSTAND = 0x0124, 0xC000


@dataclass
class Evidence:
    """What the paths did: statuses (so the scan is not vacuous), the request ids the
    proxy answered with (each must have its span), every error response."""

    statuses: dict[str, int] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)
    error_responses: list[tuple[str, bytes]] = field(default_factory=list)

    def saw(self, path: str, r: httpx.Response, expected: int | Sequence[int]) -> httpx.Response:
        allowed = (expected,) if isinstance(expected, int) else tuple(expected)
        assert r.status_code in allowed, (path, r.status_code, r.text[:500])
        assert path not in self.statuses, f"path {path!r} used twice"
        self.statuses[path] = r.status_code
        self.request_ids.append(r.headers["x-request-id"])
        if r.status_code >= 400:
            head = "\n".join(f"{k}: {v}" for k, v in r.headers.multi_items())
            self.error_responses.append((path, head.encode() + b"\n\n" + r.content))
        return r


EVIDENCE = Evidence()
ALL_PATHS = {
    "stow pacs allowed",
    "stow research deidentified",
    "stow pacs blocked private tag",
    "stow pacs partly blocked",
    "stow pacs truncated instance",
    "stow pacs garbage part",
    "stow broken multipart",
    "stow no boundary",
    "stow raw application/dicom",
    "stow unauthenticated",
    "stow denied by policy",
    "qido sentinel query allowed",
    "qido sentinel query masked",
    "qido sentinel query unauthenticated",
    "qido sentinel headers",
    "wado retrieve allowed",
    "wado metadata masked",
    "wado instance masked",
    "wado rendered refused",
    "token forged signature",
    "token alg none",
    "token expired",
    "token garbage",
    "token sentinel claims valid",
    "unknown destination",
    "unknown route",
    "bad uid in path",
    "raw http garbage",
}


# -- DICOM -------------------------------------------------------------------------------


def phi_instance(study: str | None = None, *, private: bool = False) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = S.name
    ds.PatientID = S.patient_id
    ds.PatientBirthDate = S.birth_date
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20240301"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "A" + uuid.uuid4().hex[:10]
    ds.Modality = "CT"
    ds.StudyDescription = S.study_description
    ds.ImageComments = S.image_comments
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "NO"
    if private:
        block = ds.private_block(0x0011, "CASB SENTINEL VENDOR", create=True)
        block.add_new(0x10, "LO", S.private_value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(128))
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = b"".join(
        f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts
    )
    return body + f"--{b}--\r\n".encode(), STOW_TYPE.format(b=b)


def failure_reasons(r: httpx.Response) -> list[int]:
    items = r.json().get("00081198", {}).get("Value", [])
    return [item["00081197"]["Value"][0] for item in items]


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("casb-sentinel")


@pytest.fixture(scope="module")
def px(
    workdir: Path, jwks: JwksServer, orthanc: Orthanc, receiver: OtlpReceiver
) -> Iterator[CasbProxy]:
    config = casb_config(workdir, jwks.url, orthanc.dicomweb_url)
    key = workdir / "pseudonym.key"
    key.write_text(secrets.token_hex(32))
    config["telemetry"] = {"pseudonym_key_file": str(key)}
    with CasbProxy(workdir, config, forward=False, env=receiver.env()) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def stored(px: CasbProxy, mint: Mint) -> Dataset:
    """The identified instance the allowed upload put in the PACS (read back later)."""
    ds = phi_instance()
    body, ctype = multipart([encode(ds)])
    EVIDENCE.saw("stow pacs allowed", stow(px, mint("rad-s1", ["radiologist"]), body, ctype), 200)
    return ds


def stow(
    px: CasbProxy, token: str | None, body: bytes, ctype: str, destination: str = "pacs"
) -> httpx.Response:
    headers = {"Content-Type": ctype, "Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{px.url}/{destination}/studies", content=body, headers=headers, timeout=60)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- uploads -----------------------------------------------------------------------------


def test_allowed_and_deidentified_uploads(
    px: CasbProxy, orthanc: Orthanc, mint: Mint, stored: Dataset
) -> None:
    # The clinical PACS holds identified data: the allowed upload really carried PHI.
    held = orthanc.get_json(
        f"/dicom-web/studies?StudyInstanceUID={stored.StudyInstanceUID}&includefield=00100010"
    )
    assert S.family in json.dumps(held)

    ds = phi_instance(private=True)
    body, ctype = multipart([encode(ds), encode(phi_instance(ds.StudyInstanceUID))])
    r = stow(px, mint("res-s1", ["researcher"]), body, ctype, "research")
    EVIDENCE.saw("stow research deidentified", r, 200)


def test_blocked_and_partly_blocked_uploads(px: CasbProxy, mint: Mint) -> None:
    tech = mint("tech-s1", ["technologist"])
    body, ctype = multipart([encode(phi_instance(private=True))])
    r = EVIDENCE.saw("stow pacs blocked private tag", stow(px, tech, body, ctype), 409)
    assert failure_reasons(r) == [NOT_AUTHORIZED]

    study = generate_uid()
    body, ctype = multipart(
        [encode(phi_instance(study)), encode(phi_instance(study, private=True))]
    )
    r = EVIDENCE.saw("stow pacs partly blocked", stow(px, tech, body, ctype), 202)
    assert failure_reasons(r) == [NOT_AUTHORIZED]


def test_unreadable_uploads(px: CasbProxy, mint: Mint) -> None:
    tech = mint("tech-s2", ["technologist"])
    whole = encode(phi_instance())
    cut = whole.index(S.patient_id.encode()) + len(S.patient_id)  # PHI, then nothing
    body, ctype = multipart([whole[:cut]])
    r = EVIDENCE.saw("stow pacs truncated instance", stow(px, tech, body, ctype), 409)
    assert failure_reasons(r) == [CANNOT_UNDERSTAND]

    garbage = b"\x00\x01not dicom " + S.name.encode() + b" " + S.patient_id.encode()
    body, ctype = multipart([garbage * 8])
    r = EVIDENCE.saw("stow pacs garbage part", stow(px, tech, body, ctype), 409)
    assert failure_reasons(r) == [CANNOT_UNDERSTAND]

    # The boundary does not match the body: PHI bytes the parser never gets to frame.
    body = b"--other\r\n\r\n" + whole + b"\r\n--other--\r\n"
    r = stow(px, tech, body, STOW_TYPE.format(b="expected"))
    EVIDENCE.saw("stow broken multipart", r, 400)
    r = stow(px, tech, whole, 'multipart/related; type="application/dicom"')
    EVIDENCE.saw("stow no boundary", r, 400)
    r = stow(px, tech, whole, "application/dicom")
    EVIDENCE.saw("stow raw application/dicom", r, 415)


def test_uploads_refused_before_inspection(px: CasbProxy, mint: Mint) -> None:
    body, ctype = multipart([encode(phi_instance())])
    EVIDENCE.saw("stow unauthenticated", stow(px, None, body, ctype), 401)
    ref = mint("ref-s1", ["referring_physician"])
    EVIDENCE.saw("stow denied by policy", stow(px, ref, body, ctype), 403)


# -- reads -------------------------------------------------------------------------------


def test_searches_with_sentinel_query_values(px: CasbProxy, mint: Mint, stored: Dataset) -> None:
    query = {  # (PatientName too, in the request with sentinel headers below)
        "PatientID": S.patient_id,
        "PatientBirthDate": S.birth_date,
        "StudyDescription": S.study_description,
    }
    rad = bearer(mint("rad-s2", ["radiologist"]))
    r = httpx.get(f"{px.url}/pacs/studies", params=query, headers=rad)
    EVIDENCE.saw("qido sentinel query allowed", r, 200)
    assert stored.StudyInstanceUID in [s["0020000D"]["Value"][0] for s in r.json()]

    # research-view replaces patient attributes: a search by them is refused.
    res = bearer(mint("res-s2", ["researcher"]))
    r = httpx.get(f"{px.url}/research/studies", params=query, headers=res)
    EVIDENCE.saw("qido sentinel query masked", r, 403)
    r = httpx.get(f"{px.url}/pacs/studies", params=query)
    EVIDENCE.saw("qido sentinel query unauthenticated", r, 401)

    # PHI in headers a client controls (none may be copied into a span or record).
    r = httpx.get(
        f"{px.url}/pacs/studies",
        params={"StudyInstanceUID": stored.StudyInstanceUID, "PatientName": S.name},
        headers={
            **rad,
            "traceparent": f"00-{S.family}-{S.given}-01",
            "tracestate": f"phi={S.patient_id}",
            "baggage": f"patient={urllib.parse.quote(S.name)}",
            "X-Request-Id": S.given,
            "User-Agent": f"viewer ({S.name})",
            "Referer": f"https://viewer.test/p/{S.patient_id}",
            "X-Patient-Name": S.name,
        },
    )
    EVIDENCE.saw("qido sentinel headers", r, 200)
    assert r.headers["x-request-id"] != S.given


def test_retrievals_allowed_masked_and_refused(px: CasbProxy, mint: Mint, stored: Dataset) -> None:
    path = (
        f"/studies/{stored.StudyInstanceUID}/series/{stored.SeriesInstanceUID}"
        f"/instances/{stored.SOPInstanceUID}"
    )
    multipart_dicom = {"Accept": 'multipart/related; type="application/dicom"'}
    rad = bearer(mint("rad-s3", ["radiologist"]))
    r = httpx.get(f"{px.url}/pacs{path}", headers={**rad, **multipart_dicom})
    EVIDENCE.saw("wado retrieve allowed", r, 200)
    assert S.patient_id.encode() in r.content  # identified, to an authorized reader

    res = bearer(mint("res-s3", ["researcher"]))
    r = httpx.get(f"{px.url}/research{path}/metadata", headers=res)
    EVIDENCE.saw("wado metadata masked", r, 200)
    r = httpx.get(f"{px.url}/research{path}", headers={**res, **multipart_dicom})
    EVIDENCE.saw("wado instance masked", r, 200)
    r = httpx.get(f"{px.url}/research{path}/rendered", headers=res)
    EVIDENCE.saw("wado rendered refused", r, 403)


# -- identity, routing and protocol errors -----------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_bad_tokens_carrying_sentinels(px: CasbProxy, mint: Mint, signing_key: TestKey) -> None:
    claims = {
        "iss": "https://idp.hospital.test/realms/imaging",
        "aud": "casb",
        "sub": S.name,
        "name": S.name,
        "patient_id": S.patient_id,
        "birthdate": S.birth_date,
        "roles": ["radiologist"],
        "iat": 0,
        "exp": 4_102_444_800,
    }
    url = f"{px.url}/pacs/studies"
    forger = TestKey.generate("RS256", kid=signing_key.kid)  # the right kid, the wrong key
    r = httpx.get(url, headers=bearer(forger.sign(claims)))
    EVIDENCE.saw("token forged signature", r, 401)
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    EVIDENCE.saw("token alg none", httpx.get(url, headers=bearer(unsigned)), 401)
    expired = mint("rad-s4", ["radiologist"], ttl=-600, name=S.name, patient_id=S.patient_id)
    EVIDENCE.saw("token expired", httpx.get(url, headers=bearer(expired)), 401)
    r = httpx.get(url, headers=bearer(f"{S.name}.{S.patient_id}.{S.birth_date}"))
    EVIDENCE.saw("token garbage", r, 401)
    # A valid token whose extra claims hold PHI: allowed, and the claims go nowhere.
    valid = mint(
        "rad-s5", ["radiologist"], name=S.name, patient_id=S.patient_id, birthdate=S.birth_date
    )
    EVIDENCE.saw("token sentinel claims valid", httpx.get(url, headers=bearer(valid)), 200)


def test_unknown_destinations_routes_and_bad_uids(px: CasbProxy, mint: Mint) -> None:
    rad = bearer(mint("rad-s6", ["radiologist"]))
    name_in_url = urllib.parse.quote(S.name, safe="")
    r = httpx.get(
        f"{px.url}/{name_in_url}/studies", params={"PatientID": S.patient_id}, headers=rad
    )
    EVIDENCE.saw("unknown destination", r, 403)
    assert r.json()["error"] == "unknown_destination"
    r = httpx.get(f"{px.url}/pacs/patients/{S.patient_id}/{name_in_url}", headers=rad)
    EVIDENCE.saw("unknown route", r, (400, 403))
    r = httpx.get(f"{px.url}/pacs/studies/{S.patient_id}.{S.birth_date}/series", headers=rad)
    EVIDENCE.saw("bad uid in path", r, (400, 403))


def test_http_the_proxy_cannot_parse(px: CasbProxy) -> None:
    raw = (
        f"GET /pacs/studies?PatientName={S.name}&PatientID={S.patient_id}\x00 HTTP/1.1\r\n"
        f"Host: x\r\nX-Patient: {S.study_description}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", px.port), timeout=5) as sock:
        sock.sendall(raw.encode())
        answer = sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length and (chunk := sock.recv(65536)):
            answer, body = answer + chunk, body + chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    EVIDENCE.statuses["raw http garbage"] = 400
    EVIDENCE.error_responses.append(("raw http garbage", answer))


# -- the check ---------------------------------------------------------------------------


def test_no_sentinel_in_any_output(px: CasbProxy, receiver: OtlpReceiver, workdir: Path) -> None:
    """Runs last: every path above has happened (asserted), the proxy is stopped so its
    telemetry flushed, and nothing it emitted holds a sentinel in any form."""
    missing = ALL_PATHS - set(EVIDENCE.statuses)
    assert not missing, f"paths not exercised (run the whole module): {sorted(missing)}"
    px.stop()  # SIGTERM: spans and metrics are flushed before it exits

    # The exports really happened: a SERVER span for every request that got an id.
    traced = {s.attributes.get("casb.request_id") for s in receiver.spans if s.kind == "SERVER"}
    untraced = [rid for rid in EVIDENCE.request_ids if rid not in traced]
    assert not untraced, f"{len(untraced)} requests without a span; {receiver}"
    assert any(s.name == "casb.dlp" for s in receiver.spans), receiver
    assert receiver.points and receiver.errors == [], receiver

    haystacks: list[tuple[str, bytes]] = []
    for n, p in enumerate(receiver.payloads):
        haystacks.append((f"OTLP payload {n} {p.path}", p.body))
    haystacks.append(("decoded spans", repr(receiver.spans).encode()))
    haystacks.append(("decoded metric points", repr(receiver.points).encode()))
    haystacks.append(("proxy stdout/stderr", px.log().encode()))
    haystacks.append(("audit log", px.audit_path.read_bytes()))
    for f in sorted(workdir.rglob("*")):
        if f.is_file():
            haystacks.append((f"file {f.relative_to(workdir)}", f.read_bytes()))
    haystacks += [(f"error response: {path}", data) for path, data in EVIDENCE.error_responses]
    assert len(EVIDENCE.error_responses) >= 15
    assert px.audit_path.stat().st_size > 0 and len(receiver.payloads) > 0

    needles = [v.lower().encode() for v in S.variants()]
    found = [
        (where, needle.decode())
        for where, data in haystacks
        for needle in needles
        if needle in data.lower()
    ]
    assert found == [], f"sentinel PHI leaked: {found}"
