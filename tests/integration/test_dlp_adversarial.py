"""DLP attacked from outside, through the real rig: a real mitmdump with the casb addon in
front of a real Orthanc (fixtures in tests/integration/conftest.py).

Policy in force (policies/hospital.yaml): technologists' uploads to /pacs go through
`clinical-upload` (blocks private tags and free-text PHI), researchers' uploads to
/research through `research-deidentify`, researchers' reads from /research through
`research-view`.

Every attack carries its own sentinel (a patient name, an SSN, a private-tag value), so
what Orthanc really stored can be checked directly, bypassing the proxy: raw file bytes,
pydicom's reading of them and Orthanc's own (DCMTK's) reading. For each attack the
proxy must answer clearly (4xx / 409 / 202, never hang, never a 5xx without reason),
write an audit record and keep serving.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import random
import socket
import struct
import time
import unicodedata
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from tests.integration.conftest import Mint
from tests.support.orthanc import Orthanc
from tests.support.proxy import CasbProxy

pytestmark = pytest.mark.integration

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={b}'
JSON_STOW_TYPE = 'multipart/related; type="application/dicom+json"; boundary={b}'
NOT_AUTHORIZED = 0x0124
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
TIMEOUT = 30.0
PIXELS = bytes(range(256)) * 2  # 16 x 16 x 16 bits
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}


# -- sentinels ----------------------------------------------------------------------------

SENTINELS: list[str] = []  # every sentinel made, for the final audit / log check


def _remember(value: str) -> str:
    SENTINELS.append(value)
    return value


def phi_name() -> str:
    """A patient name unique to one attack (parts of 3+ characters, ASCII)."""
    return _remember(f"Leak{uuid.uuid4().hex[:8]}^Phiona")


def phi_id() -> str:
    return _remember("PID" + uuid.uuid4().hex[:10].upper())


def ssn() -> str:
    r = random.Random(uuid.uuid4().int)
    return _remember(f"{r.randint(100, 665)}-{r.randint(10, 99)}-{r.randint(1000, 9999)}")


def secret() -> str:
    """A private-tag value unique to one attack."""
    return _remember("PRIV" + uuid.uuid4().hex[:12].upper())


# -- building instances -------------------------------------------------------------------


def make_ct(
    *,
    name: str | None = None,
    patient_id: str | None = None,
    marker: str = "adversarial",
    private: str | None = None,
    comments: str | None = None,
    ts: str = ExplicitVRLittleEndian,
    pixels: bytes | None = PIXELS,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = name or phi_name()
    ds.PatientID = patient_id or phi_id()
    ds.PatientBirthDate = "19370215"
    ds.StudyDate = ds.SeriesDate = "20240301"
    ds.StudyTime = "101500"
    ds.Modality = "CT"
    ds.SeriesDescription = marker
    ds.InstanceNumber = 1
    ds.SeriesNumber = 1
    ds.BurnedInAnnotation = "NO"
    if comments is not None:
        ds.ImageComments = comments
    if private is not None:
        block = ds.private_block(0x0011, "CASB ADVERSARY", create=True)
        block.add_new(0x10, "LO", private)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if pixels is not None:
        ds.PixelData = pixels
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def raw_dataset(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The dataset alone: no preamble, no file meta group."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def el(tag: int, vr: str, value: bytes, *, little: bool = True, length: int | None = None) -> bytes:
    """One explicit VR element, hand-framed (pydicom will not write malformed ones)."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    order = "<" if little else ">"
    size = len(value) if length is None else length
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr.encode() in _LONG_VRS:
        head += b"\x00\x00" + struct.pack(order + "L", size)
    else:
        head += struct.pack(order + "H", size)
    return head + value


def implicit_el(tag: int, value: bytes, *, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, size) + value


def pixel_element(little: bool = True) -> bytes:
    return el(0x7FE00010, "OW", PIXELS, little=little)


def header_and_pixels(ds: Dataset) -> tuple[bytes, bytes]:
    """An encoded instance split just before its top-level Pixel Data element."""
    data = encode(ds)
    tail = pixel_element()
    assert data.endswith(tail)
    return data[: -len(tail)], tail


# -- sending ------------------------------------------------------------------------------


def multipart(parts: Iterable[bytes], boundary: str, ctype: str = "application/dicom") -> bytes:
    out = b"".join(
        f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + part + b"\r\n" for part in parts
    )
    return out + f"--{boundary}--\r\n".encode()


def auth(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def post(
    proxy: CasbProxy,
    token: str,
    body: bytes | Iterator[bytes],
    content_type: str,
    *,
    destination: str = "pacs",
    **headers: str,
) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/{destination}/studies",
        content=body,
        headers=auth(token, **{"Content-Type": content_type, "Accept": "application/dicom+json"})
        | headers,
        timeout=TIMEOUT,
    )


def stow(
    proxy: CasbProxy, token: str, parts: Iterable[bytes], *, destination: str = "pacs"
) -> httpx.Response:
    boundary = uuid.uuid4().hex
    return post(
        proxy,
        token,
        multipart(parts, boundary),
        STOW_TYPE.format(b=boundary),
        destination=destination,
    )


def failure_codes(r: httpx.Response) -> list[int]:
    items = r.json().get("00081198", {}).get("Value", [])
    return [item["00081197"]["Value"][0] for item in items]


def stored_uids(r: httpx.Response) -> list[str]:
    items = r.json().get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def raw_http(
    proxy: CasbProxy,
    head: bytes,
    body: bytes = b"",
    *,
    half_close: bool = False,
    expect_continue: bool = False,
) -> http.client.HTTPResponse:
    """Raw bytes to the proxy, its answer parsed by http.client (bounded by TIMEOUT)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    sock.sendall(head)
    if expect_continue:
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(1)
            if not chunk:
                break
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100"), "no 100 Continue before the body"
    sock.sendall(body)
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    resp.read()
    sock.close()
    return resp


# -- what Orthanc holds, read directly ------------------------------------------------------

_SEEN: dict[str, str] = {}  # Orthanc instance id -> everything readable in it (cached)


def _texts(raw: bytes) -> Iterator[str]:
    yield raw.decode("latin-1")
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
        for elem in ds.iterall():
            yield str(elem.value)
            if isinstance(elem.value, bytes):
                yield elem.value.decode("latin-1")
    except Exception:  # an unreadable file still has its raw bytes, yielded above
        pass


def _readable(orthanc: Orthanc, iid: str) -> str:
    if iid not in _SEEN:
        with orthanc.open(f"/instances/{iid}/file") as resp:
            raw = resp.read()
        tags = orthanc.get_json(f"/instances/{iid}/tags")
        text = "\n".join([*_texts(raw), json.dumps(tags, ensure_ascii=False)])
        _SEEN[iid] = unicodedata.normalize("NFKC", text)
    return _SEEN[iid]


def orthanc_holding(orthanc: Orthanc, *needles: str) -> list[str]:
    """Ids of the instances Orthanc stored that contain any needle, however encoded."""
    ids = orthanc.get_json("/instances")
    assert isinstance(ids, list)
    wanted = [unicodedata.normalize("NFKC", n) for n in needles]
    return [iid for iid in ids if any(n in _readable(orthanc, iid) for n in wanted)]


def orthanc_has_sop(orthanc: Orthanc, sop_uid: str) -> bool:
    found = httpx.get(f"{orthanc.dicomweb_url}/instances", params={"SOPInstanceUID": sop_uid})
    found.raise_for_status()
    return bool(found.content.strip()) and bool(found.json())


def orthanc_series(orthanc: Orthanc, marker: str) -> list[dict[str, Any]]:
    found = httpx.get(
        f"{orthanc.dicomweb_url}/instances",
        params={"SeriesDescription": marker, "includefield": "all"},
    )
    found.raise_for_status()
    return found.json() if found.content.strip() else []


# -- what the proxy did ---------------------------------------------------------------------


def record_of(proxy: CasbProxy, request_id: str | None) -> dict[str, Any]:
    assert request_id, "no X-Request-Id"
    matches = [r for r in proxy.audit_records() if r["request_id"] == request_id]
    assert len(matches) == 1, f"{len(matches)} audit records for the request"
    return matches[0]


def assert_serving(proxy: CasbProxy, mint: Mint) -> None:
    ok = httpx.get(
        f"{proxy.url}/pacs/studies",
        params={"limit": "1"},
        headers=auth(mint("tech-probe", ["technologist"])),
        timeout=TIMEOUT,
    )
    assert ok.status_code == 200


def assert_clear_answer(proxy: CasbProxy, r: httpx.Response, *allowed: int) -> dict[str, Any]:
    """A clear status, an audit record with that status, no PHI in the answer."""
    assert r.status_code in allowed, (r.status_code, r.text[:300])
    record = record_of(proxy, r.headers.get("x-request-id"))
    assert record["status"] == r.status_code
    return record


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Bounded polling of an observable condition (not a sleep for synchronisation)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def tech(mint: Mint) -> str:
    return mint("tech-adv", ["technologist"])


@pytest.fixture
def researcher(mint: Mint) -> str:
    return mint("res-adv", ["researcher"])


# == multipart tricks ======================================================================


def test_boundary_inside_part_data_without_crlf_is_data(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    """`--boundary` inside pixel data (not preceded by CRLF) is not a delimiter per RFC 2046:
    a whole dirty part hidden there must not become a second instance upstream."""
    dirty = make_ct(private=secret())
    boundary = uuid.uuid4().hex
    smuggle = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + encode(dirty)
        + f"\n--{boundary}".encode()
    )
    ds = make_ct(pixels=smuggle + b"\x00" * (len(smuggle) % 2))
    r = post(proxy, tech, multipart([encode(ds)], boundary), STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 200, 202, 400, 409)
    assert not orthanc_has_sop(orthanc, dirty.SOPInstanceUID)
    assert_serving(proxy, mint)


@pytest.mark.parametrize("ending", ["lf", "crlf-in-pixels"])
def test_lf_only_delimiters_cannot_smuggle_a_part(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str, ending: str
) -> None:
    """A dirty part framed with LF-only line endings inside a clean instance's pixel data:
    casb (RFC: CRLF) and Orthanc must agree on where parts start."""
    dirty = make_ct(private=secret())
    boundary = uuid.uuid4().hex
    crlf = "\n" if ending == "lf" else "\r\n"
    head = f"{crlf}--{boundary}{crlf}Content-Type: application/dicom{crlf}{crlf}"
    inner = head.encode() + encode(dirty)
    inner += b"\x00" * (len(inner) % 2)
    ds = make_ct(pixels=inner)
    r = post(proxy, tech, multipart([encode(ds)], boundary), STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 200, 202, 400, 409)
    assert not orthanc_has_sop(orthanc, dirty.SOPInstanceUID)
    assert_serving(proxy, mint)


def test_whole_body_with_lf_only_line_endings(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\nContent-Type: application/dicom\n\n".encode()
        + encode(make_ct(private=hidden))
        + f"\n--{boundary}--\n".encode()
    )
    r = post(proxy, tech, body, STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 400, 409)
    assert orthanc_holding(orthanc, hidden) == []
    assert_serving(proxy, mint)


@pytest.mark.parametrize("label", [None, "application/octet-stream", "text/plain"])
def test_parts_without_or_with_a_misleading_content_type_are_inspected(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, label: str | None
) -> None:
    hidden = secret()
    ds = make_ct(private=hidden)
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\n" + (f"Content-Type: {label}\r\n" if label else "") + "\r\n"
    body = head.encode() + encode(ds) + f"\r\n--{boundary}--\r\n".encode()
    r = post(proxy, tech, body, STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 409)
    assert failure_codes(r) == [NOT_AUTHORIZED]
    assert orthanc_holding(orthanc, hidden) == []


def test_part_with_two_content_type_headers_is_inspected(
    proxy: CasbProxy, orthanc: Orthanc, tech: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        "Content-Type: application/dicom\r\n\r\n".encode()
        + encode(make_ct(private=hidden))
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = post(proxy, tech, body, STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 400, 409)
    assert orthanc_holding(orthanc, hidden) == []


@pytest.mark.parametrize(
    "template",
    [
        'multipart/related; type="application/dicom"; BOUNDARY={b}',
        'Multipart/Related; Type="Application/DICOM"; Boundary="{b}"',
        'multipart/related; boundary="{b}"; type=application/dicom',
        "multipart/related; boundary={b}",  # no type: every part is DICOM
    ],
)
def test_boundary_parameter_spellings_are_all_inspected(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, template: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    body = multipart([encode(make_ct(private=hidden))], boundary)
    r = post(proxy, tech, body, template.format(b=boundary))
    assert_clear_answer(proxy, r, 400, 409, 415)
    assert orthanc_holding(orthanc, hidden) == []


def _hidden_behind(other: str) -> tuple[Dataset, bytes]:
    """A dirty instance, and pixel data holding a complete multipart framed with boundary
    `other` around it: data for a parser using the outer boundary, a part for one using
    `other`. (Pixel data is forwarded unread by design, so the dirty bytes may well be
    stored INSIDE the outer instance; what must not exist is the dirty instance itself.)"""
    dirty = make_ct(private=secret())
    framed = (
        f"\r\n--{other}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + encode(dirty)
        + f"\r\n--{other}--\r\n".encode()
    )
    return dirty, framed + b"\x00" * (len(framed) % 2)


@pytest.mark.parametrize("order", ["hidden-boundary-first", "hidden-boundary-last"])
def test_two_boundary_parameters_cannot_frame_a_hidden_part(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str, order: str
) -> None:
    """`boundary=A; boundary=B`: the body is B-framed (one clean instance) and carries an
    A-framed dirty instance inside the clean one's pixel data. Refusing the ambiguity
    (400/415) or framing it the way the upstream does are both fine; storing the hidden
    instance is not."""
    a, b = "AAAA" + uuid.uuid4().hex, "BBBB" + uuid.uuid4().hex
    dirty, pixels = _hidden_behind(a)
    body = multipart([encode(make_ct(pixels=pixels))], b)
    first, second = (a, b) if order == "hidden-boundary-first" else (b, a)
    ctype = f'multipart/related; type="application/dicom"; boundary={first}; boundary={second}'
    r = post(proxy, tech, body, ctype)
    assert_clear_answer(proxy, r, 200, 400, 409, 415)
    assert_serving(proxy, mint)
    assert not orthanc_has_sop(orthanc, dirty.SOPInstanceUID)


@pytest.mark.parametrize(
    "order",
    ["hidden-boundary-first", "hidden-boundary-last"],
)
def test_two_content_type_headers_on_the_message(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str, order: str
) -> None:
    """Two Content-Type headers: mitmproxy joins them ("…boundary=A, …boundary=B") and
    casb reads the last boundary; the upstream may read the first header."""
    a, b = "AAAA" + uuid.uuid4().hex, "BBBB" + uuid.uuid4().hex
    dirty, pixels = _hidden_behind(a)
    body = multipart([encode(make_ct(pixels=pixels))], b)
    first, second = (a, b) if order == "hidden-boundary-first" else (b, a)
    head = (
        "POST /pacs/studies HTTP/1.1\r\nHost: casb.test\r\n"
        f"Authorization: Bearer {tech}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={first}\r\n'
        f'Content-Type: multipart/related; type="application/dicom"; boundary={second}\r\n'
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    resp = raw_http(proxy, head, body)
    assert resp.status == 400, resp.status  # the framing is ambiguous: refused
    assert record_of(proxy, resp.getheader("x-request-id"))["error"] == "bad_request"
    assert_serving(proxy, mint)
    assert not orthanc_has_sop(orthanc, dirty.SOPInstanceUID)


def test_preamble_before_the_first_boundary(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    clean = make_ct()
    preamble = b"ignore me\r\n" + encode(make_ct(private=hidden)) + b"\r\n"
    body = preamble + multipart([encode(clean)], boundary)
    r = post(proxy, tech, body, STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 200, 400)
    assert orthanc_holding(orthanc, hidden) == []
    if r.status_code == 200:
        assert orthanc_has_sop(orthanc, clean.SOPInstanceUID)
    assert_serving(proxy, mint)


def test_epilogue_after_close_delimiter_holding_a_whole_part(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    clean = make_ct()
    epilogue = multipart([encode(make_ct(private=hidden))], boundary)
    body = multipart([encode(clean)], boundary) + epilogue
    r = post(proxy, tech, body, STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 200, 400)
    assert orthanc_holding(orthanc, hidden) == []
    if r.status_code == 200:
        assert stored_uids(r) == [clean.SOPInstanceUID]
    assert_serving(proxy, mint)


def test_one_megabyte_part_header_section(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    padding = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(1024))
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n{padding}\r\n".encode()
        + encode(make_ct(private=hidden))
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = post(proxy, tech, body, STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 400)
    assert r.json()["error"] == "bad_request"
    assert orthanc_holding(orthanc, hidden) == []
    assert_serving(proxy, mint)


def _json_stow(
    proxy: CasbProxy, token: str, bulk: bytes, *, destination: str, ctype: str
) -> httpx.Response:
    ds = make_ct(pixels=None)
    meta = {
        "00080016": {"vr": "UI", "Value": [ds.SOPClassUID]},
        "00080018": {"vr": "UI", "Value": [ds.SOPInstanceUID]},
        "0020000D": {"vr": "UI", "Value": [ds.StudyInstanceUID]},
        "0020000E": {"vr": "UI", "Value": [ds.SeriesInstanceUID]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "bulk/1"},
    }
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n".encode()
        + json.dumps([meta]).encode()
        + f"\r\n--{boundary}\r\nContent-Type: {ctype}\r\nContent-Location: bulk/1\r\n\r\n".encode()
        + bulk
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return post(proxy, token, body, JSON_STOW_TYPE.format(b=boundary), destination=destination)


@pytest.mark.parametrize("form", ["file", "no-preamble", "raw-dataset"])
def test_json_stow_bulk_part_holding_a_dicom_file(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str, researcher: str, form: str
) -> None:
    hidden, name = secret(), phi_name()
    ds = make_ct(private=hidden, name=name)
    data = {"file": encode(ds), "no-preamble": encode(ds)[128:], "raw-dataset": raw_dataset(ds)}
    for destination, token in (("pacs", tech), ("research", researcher)):
        r = _json_stow(
            proxy, token, data[form], destination=destination, ctype="application/octet-stream"
        )
        assert_clear_answer(proxy, r, 200, 202, 400, 409, 415)
    assert orthanc_holding(orthanc, hidden, name) == []
    assert_serving(proxy, mint)


def test_nested_multipart_part(proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str) -> None:
    hidden = secret()
    outer, inner = uuid.uuid4().hex, uuid.uuid4().hex
    nested = multipart([encode(make_ct(private=hidden))], inner)
    body = (
        f'--{outer}\r\nContent-Type: multipart/related; type="application/dicom"; '
        f"boundary={inner}\r\n\r\n".encode()
        + nested
        + f"\r\n--{outer}--\r\n".encode()
    )
    r = post(proxy, tech, body, STOW_TYPE.format(b=outer))
    assert_clear_answer(proxy, r, 400, 409)
    if r.status_code == 409:
        assert failure_codes(r) == [CANNOT_UNDERSTAND]
    assert orthanc_holding(orthanc, hidden) == []
    assert_serving(proxy, mint)


# == DICOM tricks =========================================================================


def _no_meta(ds: Dataset) -> bytes:
    return raw_dataset(ds)


def _no_meta_implicit(ds: Dataset) -> bytes:
    return raw_dataset(ds, implicit=True)


def _no_preamble(ds: Dataset) -> bytes:
    return encode(ds)[128:]


def _meta_no_dicm(ds: Dataset) -> bytes:
    return encode(ds)[132:]


def _with_ts(ts: str) -> Callable[[Dataset], bytes]:
    def build(ds: Dataset) -> bytes:
        ds.file_meta.TransferSyntaxUID = UID(ts)
        return encode(ds)

    build.__name__ = f"ts_{ts}"
    return build


ENCODINGS: dict[str, Callable[[Dataset], bytes]] = {
    "no-meta-explicit": _no_meta,
    "no-meta-implicit": _no_meta_implicit,
    "meta-without-preamble": _meta_no_dicm,
    "dicm-without-preamble": _no_preamble,
    "implicit-vr": _with_ts(ImplicitVRLittleEndian),
    "big-endian": _with_ts(ExplicitVRBigEndian),
    "deflated": _with_ts(DeflatedExplicitVRLittleEndian),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_private_tag_phi_is_blocked_in_every_encoding(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, encoding: str
) -> None:
    hidden = secret()
    ds = make_ct(private=hidden)
    r = stow(proxy, tech, [ENCODINGS[encoding](ds)])
    record = assert_clear_answer(proxy, r, 409)
    assert failure_codes(r) in ([NOT_AUTHORIZED], [CANNOT_UNDERSTAND])
    assert record["dlp"]["forwarded"] == 0
    assert orthanc_holding(orthanc, hidden) == []


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_research_upload_is_deidentified_in_every_encoding(
    proxy: CasbProxy, orthanc: Orthanc, researcher: str, encoding: str
) -> None:
    name, pid = phi_name(), phi_id()
    ds = make_ct(name=name, patient_id=pid)
    boundary = uuid.uuid4().hex
    r = post(
        proxy,
        researcher,
        multipart([ENCODINGS[encoding](ds)], boundary),
        STOW_TYPE.format(b=boundary),
        destination="research",
    )
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, name, pid, name.split("^")[0]) == []


def _nested_private(hidden: str) -> Dataset:
    ds = make_ct()
    inner = Dataset()
    inner.CodeValue = "X"
    block = inner.private_block(0x0013, "CASB NESTED", create=True)
    block.add_new(0x01, "LO", hidden)
    middle = Dataset()
    middle.ReferencedSOPInstanceUID = generate_uid()
    middle.PurposeOfReferenceCodeSequence = DicomSequence([inner])
    ds.ReferencedImageSequence = DicomSequence([middle])
    return ds


@pytest.mark.parametrize("length", ["defined", "undefined"])
def test_private_tag_inside_nested_sequences_is_blocked(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, length: str
) -> None:
    hidden = secret()
    ds = _nested_private(hidden)
    if length == "undefined":
        ds.ReferencedImageSequence.is_undefined_length = True
        ds.ReferencedImageSequence[0].is_undefined_length_sequence_item = True
        ds.ReferencedImageSequence[0].PurposeOfReferenceCodeSequence.is_undefined_length = True
    r = stow(proxy, tech, [encode(ds)])
    assert_clear_answer(proxy, r, 409)
    assert failure_codes(r) == [NOT_AUTHORIZED]
    assert orthanc_holding(orthanc, hidden) == []


def test_un_vr_private_element_is_blocked(proxy: CasbProxy, orthanc: Orthanc, tech: str) -> None:
    hidden = secret()
    head, tail = header_and_pixels(make_ct())
    smuggled = el(0x00110010, "LO", b"CASB UN VENDOR") + el(0x00111001, "UN", hidden.encode())
    # group 0011 sorts after 0010 and before 0018, but order is the attacker's choice
    r = stow(proxy, tech, [head + smuggled + tail])
    assert_clear_answer(proxy, r, 409)
    assert failure_codes(r) in ([NOT_AUTHORIZED], [CANNOT_UNDERSTAND])
    assert orthanc_holding(orthanc, hidden) == []


def test_un_vr_patient_name_is_deidentified(
    proxy: CasbProxy, orthanc: Orthanc, researcher: str
) -> None:
    """PatientName sent with VR UN (explicit VR LE): must be recognised and removed."""
    name = phi_name()
    ds = make_ct(name="PLACEHOLDER^NAME")
    data = encode(ds)
    pn = el(0x00100010, "PN", b"PLACEHOLDER^NAME")
    assert data.count(pn) == 1
    data = data.replace(pn, el(0x00100010, "UN", name.encode()))
    r = stow(proxy, researcher, [data], destination="research")
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, name, name.split("^")[0]) == []


def test_un_vr_free_text_with_ssn_is_blocked(proxy: CasbProxy, orthanc: Orthanc, tech: str) -> None:
    """ImageComments (an LT) sent as UN holding an SSN."""
    number = ssn()
    head, tail = header_and_pixels(make_ct())
    comments = el(0x00204000, "UN", f"follow-up, SSN {number}".encode())
    # (0020,4000) sorts before (0028,...): put it in its place
    at = head.index(struct.pack("<HH", 0x0028, 0x0002))
    r = stow(proxy, tech, [head[:at] + comments + head[at:] + tail])
    assert_clear_answer(proxy, r, 409)
    assert orthanc_holding(orthanc, number) == []


def test_duplicated_patient_name_is_deidentified(
    proxy: CasbProxy, orthanc: Orthanc, researcher: str
) -> None:
    name, other = phi_name(), phi_name()
    ds = make_ct(name=name)
    data = encode(ds)
    pn = el(0x00100010, "PN", name.encode())
    assert data.count(pn) == 1
    data = data.replace(pn, pn + el(0x00100010, "PN", other.encode()))
    r = stow(proxy, researcher, [data], destination="research")
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, name, other, name.split("^")[0], other.split("^")[0]) == []


def test_duplicated_free_text_with_ssn_is_blocked(
    proxy: CasbProxy, orthanc: Orthanc, tech: str
) -> None:
    number = ssn()
    ds = make_ct(comments="nothing to see")
    data = encode(ds)
    first = el(0x00204000, "LT", b"nothing to see")
    assert data.count(first) == 1
    data = data.replace(first, first + el(0x00204000, "LT", f"SSN {number}".encode()))
    r = stow(proxy, tech, [data])
    assert_clear_answer(proxy, r, 409)
    assert orthanc_holding(orthanc, number) == []


def test_elements_out_of_order(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, researcher: str
) -> None:
    """PHI elements placed after higher tags (PatientName after group 0028, a private
    group after it too): parsers that assume ascending order may miss them."""
    name, hidden = phi_name(), secret()
    head, tail = header_and_pixels(make_ct(name="PLACE^HOLDER"))
    late = (
        el(0x00100010, "PN", name.encode())
        + el(0x00090010, "LO", b"CASB LATE")
        + el(0x00091001, "LO", hidden.encode())
    )
    r = stow(proxy, tech, [head + late + tail])
    assert_clear_answer(proxy, r, 409)
    r = stow(
        proxy,
        researcher,
        [head + el(0x00100010, "PN", name.encode()) + tail],
        destination="research",
    )
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, hidden, name, name.split("^")[0]) == []


@pytest.mark.parametrize(
    "after",
    ["second-pixel-data", "patient-name", "private-group", "garbage", "padding-then-private"],
)
def test_phi_after_pixel_data_never_reaches_orthanc(
    proxy: CasbProxy, orthanc: Orthanc, researcher: str, tech: str, after: str
) -> None:
    name = phi_name()
    trailer = {
        "second-pixel-data": el(0x7FE00010, "OB", name.encode()),
        "patient-name": el(0x00100010, "PN", name.encode()),
        "private-group": el(0x7FE10010, "LO", b"CASB TRAIL") + el(0x7FE11001, "LO", name.encode()),
        "garbage": b"\x01\x02" + name.encode(),
        "padding-then-private": el(0xFFFCFFFC, "OB", b"\x00" * 8)
        + el(0x7FE10010, "LO", name.encode()),
    }[after]
    for destination, token in (("research", researcher), ("pacs", tech)):
        ds = make_ct(name="Clean^Patient" if destination == "pacs" else phi_name())
        r = stow(proxy, token, [encode(ds) + trailer], destination=destination)
        record = assert_clear_answer(proxy, r, 200, 202, 409)
        assert "trailing_data" in record["dlp"]["rules"] or r.status_code == 409
    assert orthanc_holding(orthanc, name, name.split("^")[0]) == []


def _encapsulated(ds: Dataset, after: bytes) -> bytes:
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    del ds.PixelData
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    head = encode(ds)
    fragment = b"\xff\xd8" + b"\x00" * 30 + b"\xff\xd9"
    pixels = (
        struct.pack("<HH", 0x7FE0, 0x0010)
        + b"OB\x00\x00"
        + struct.pack("<L", 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0)  # empty basic offset table
        + struct.pack("<HHL", 0xFFFE, 0xE000, len(fragment))
        + fragment
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    return head + pixels + after


@pytest.mark.parametrize("where", ["after-delimiter", "fake-fragment", "in-fragment-header"])
def test_encapsulated_pixel_data_hiding_phi(
    proxy: CasbProxy, orthanc: Orthanc, researcher: str, where: str
) -> None:
    name = phi_name()
    after = {
        # an item after the delimiter, then a PatientName
        "after-delimiter": struct.pack("<HHL", 0xFFFE, 0xE000, 4)
        + b"\x00" * 4
        + el(0x00100010, "PN", name.encode()),
        "fake-fragment": el(0x00100010, "PN", name.encode()),
        "in-fragment-header": struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        + el(0x00100010, "PN", name.encode()),
    }[where]
    data = _encapsulated(make_ct(name=phi_name()), after)
    r = stow(proxy, researcher, [data], destination="research")
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, name, name.split("^")[0]) == []


@pytest.mark.parametrize("variant", ["fullwidth-digits", "escape-split-ascii"])
def test_iso_2022_encoded_ssn_is_blocked(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, variant: str
) -> None:
    number = ssn()
    if variant == "fullwidth-digits":
        wide = "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in number)
        value = wide.encode("iso2022_jp")
    else:
        a, rest = number[:3], number[3:]
        value = a.encode() + b"\x1b$B\x1b(B" + rest.encode()
    assert number.encode() not in value
    ds = make_ct()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    head, tail = header_and_pixels(ds)
    at = head.index(struct.pack("<HH", 0x0028, 0x0002))
    r = stow(proxy, tech, [head[:at] + el(0x00204000, "LT", value) + head[at:] + tail])
    assert_clear_answer(proxy, r, 409)
    assert failure_codes(r) == [NOT_AUTHORIZED]
    assert orthanc_holding(orthanc, number) == []


@pytest.mark.parametrize("where", ["last-element", "before-pixels", "pixel-data"])
def test_declared_length_past_the_end(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, where: str
) -> None:
    number = ssn()
    head, tail = header_and_pixels(make_ct())
    text = f"SSN {number}".encode()
    if where == "last-element":
        data = head + el(0x00204000, "LT", text, length=len(text) + 4000)
    elif where == "before-pixels":
        data = head + el(0x00204000, "LT", text, length=len(text) + 100) + tail
    else:
        data = head + el(0x7FE00010, "OW", PIXELS, length=len(PIXELS) + 1000) + text
    r = stow(proxy, tech, [data, encode(make_ct())])
    assert_clear_answer(proxy, r, 202, 400, 409)
    assert orthanc_holding(orthanc, number) == []


@pytest.mark.parametrize("encoding", ["explicit-UT", "explicit-UN", "implicit-LT"])
def test_undefined_length_on_text(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, encoding: str
) -> None:
    number = ssn()
    text = f"SSN {number}".encode()
    delimiter = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    ds = make_ct()
    if encoding == "implicit-LT":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        head = encode(ds)
        tail = implicit_el(0x7FE00010, PIXELS)
        assert head.endswith(tail)
        head = head[: -len(tail)]
        at = head.index(struct.pack("<HH", 0x0028, 0x0002))
        smuggled = implicit_el(0x00204000, text + delimiter, length=0xFFFFFFFF)
    else:
        head, tail = header_and_pixels(ds)
        at = head.index(struct.pack("<HH", 0x0028, 0x0002))
        vr = encoding.split("-")[1]
        smuggled = el(0x00204000, vr, text + delimiter, length=0xFFFFFFFF)
    r = stow(proxy, tech, [head[:at] + smuggled + head[at:] + tail])
    assert_clear_answer(proxy, r, 409)
    assert orthanc_holding(orthanc, number) == []


@pytest.mark.parametrize(
    ("declared", "actual"),
    [("explicit", "implicit"), ("implicit", "explicit"), ("big", "explicit")],
)
def test_transfer_syntax_that_lies_about_the_encoding(
    proxy: CasbProxy, orthanc: Orthanc, tech: str, declared: str, actual: str
) -> None:
    """The file meta group names one encoding, the dataset uses another: casb (pydicom's
    guess) and the upstream (the declared syntax) may read different elements."""
    hidden = secret()
    ds = make_ct(private=hidden)
    ds.file_meta.TransferSyntaxUID = {
        "explicit": ExplicitVRLittleEndian,
        "implicit": ImplicitVRLittleEndian,
        "big": ExplicitVRBigEndian,
    }[declared]
    r = stow(proxy, tech, [_meta_only(ds) + raw_dataset(ds, implicit=actual == "implicit")])
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, hidden) == []


def _meta_only(ds: Dataset) -> bytes:
    """Preamble, DICM and the file meta group of `ds`, without its dataset."""
    data = encode(ds)
    length = struct.unpack_from("<L", data, 132 + 8)[0]
    return data[: 132 + 12 + length]


def test_deflated_instance_with_a_private_group_after_pixel_data(
    proxy: CasbProxy, orthanc: Orthanc, tech: str
) -> None:
    """Deflated instances are read whole (no walker): elements after Pixel Data are
    inside the deflate stream, where the trailing-data stripping cannot see them."""
    hidden = secret()
    ds = make_ct()
    ds.add_new(0x7FE10010, "LO", "CASB AFTER")
    ds.add_new(0x7FE11001, "LO", hidden)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    r = stow(proxy, tech, [encode(ds)])
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, hidden) == []


def test_odd_length_values_are_still_deidentified(
    proxy: CasbProxy, orthanc: Orthanc, researcher: str
) -> None:
    name = phi_name() + "X"  # odd length, written without padding
    head, tail = header_and_pixels(make_ct(name="Place^Holder"))
    pn = el(0x00100010, "PN", b"Place^Holder")
    assert head.count(pn) == 1
    odd = struct.pack("<HH", 0x0010, 0x0010) + b"PN" + struct.pack("<H", len(name)) + name.encode()
    r = stow(proxy, researcher, [head.replace(pn, odd) + tail], destination="research")
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, name, name.split("^")[0]) == []


def test_phi_in_nested_attributes_is_deidentified(
    proxy: CasbProxy, orthanc: Orthanc, researcher: str
) -> None:
    name = phi_name()
    ds = make_ct(name=name)
    ref = Dataset()
    ref.PatientName = name
    ref.PatientID = phi_id()
    ds.ReferencedPatientSequence = DicomSequence([ref])
    ds.PerformingPhysicianName = name
    item = Dataset()
    item.TextValue = f"patient {name.replace('^', ' ')} seen"
    item.ValueType = "TEXT"
    ds.ContentSequence = DicomSequence([item])
    r = stow(proxy, researcher, [encode(ds)], destination="research")
    assert_clear_answer(proxy, r, 200, 409)
    assert orthanc_holding(orthanc, name, name.split("^")[0]) == []


def test_header_just_over_16_mib_is_refused_and_proxy_survives(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    ds = make_ct()
    ds.EncapsulatedDocument = b"\x00" * (16 * 1024 * 1024 + 2)
    r = stow(proxy, tech, [encode(ds)])
    assert_clear_answer(proxy, r, 409)
    assert failure_codes(r) == [OUT_OF_RESOURCES]
    assert not orthanc_has_sop(orthanc, ds.SOPInstanceUID)
    assert_serving(proxy, mint)


# == HTTP tricks ==========================================================================


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP", "identity, gzip", "br"])
def test_compressed_upload_is_refused_with_415(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str, encoding: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    plain = multipart([encode(make_ct(private=hidden))], boundary)
    body = zlib.compress(plain) if encoding == "deflate" else gzip.compress(plain)
    r = post(proxy, tech, body, STOW_TYPE.format(b=boundary), **{"Content-Encoding": encoding})
    assert_clear_answer(proxy, r, 415)
    assert r.json()["error"] == "unsupported_media_type"
    assert orthanc_holding(orthanc, hidden) == []
    assert_serving(proxy, mint)


def test_two_content_encoding_headers(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    body = gzip.compress(multipart([encode(make_ct(private=hidden))], boundary))
    head = (
        "POST /pacs/studies HTTP/1.1\r\nHost: casb.test\r\n"
        f"Authorization: Bearer {tech}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
        "Content-Encoding: gzip\r\nContent-Encoding: identity\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    resp = raw_http(proxy, head, body)
    # casb's 415 check reads the LAST Content-Encoding ("identity") and lets it through;
    # the gzip bytes then fail multipart framing (400), and only what casb parsed and
    # re-framed goes upstream. Either refusal is safe.
    assert resp.status in (400, 415), resp.status
    record_of(proxy, resp.getheader("x-request-id"))
    assert orthanc_holding(orthanc, hidden) == []
    assert_serving(proxy, mint)


def test_chunked_upload_in_small_pieces_is_inspected(
    proxy: CasbProxy, orthanc: Orthanc, tech: str
) -> None:
    hidden = secret()
    clean, dirty = make_ct(), make_ct(private=hidden)
    boundary = uuid.uuid4().hex
    body = multipart([encode(clean), encode(dirty)], boundary)

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    r = post(proxy, tech, pieces(), STOW_TYPE.format(b=boundary))
    assert_clear_answer(proxy, r, 202)
    assert failure_codes(r) == [NOT_AUTHORIZED]
    assert stored_uids(r) == [clean.SOPInstanceUID]
    assert orthanc_holding(orthanc, hidden) == []


def test_expect_100_continue(proxy: CasbProxy, orthanc: Orthanc, tech: str) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    body = multipart([encode(make_ct(private=hidden))], boundary)
    head = (
        "POST /pacs/studies HTTP/1.1\r\nHost: casb.test\r\n"
        f"Authorization: Bearer {tech}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
        "Accept: application/dicom+json\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    resp = raw_http(proxy, head, body, expect_continue=True)
    assert resp.status == 409
    record_of(proxy, resp.getheader("x-request-id"))
    assert orthanc_holding(orthanc, hidden) == []


def _http_1_0_upload(tech: str, boundary: str) -> bytes:
    return (
        "POST /pacs/studies HTTP/1.0\r\nHost: casb.test\r\n"
        f"Authorization: Bearer {tech}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
        "\r\n"
    ).encode()


def test_http_1_0_without_content_length(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    """No Content-Length, no Transfer-Encoding: the request has no body (RFC 9112 6.3);
    what follows the headers is not an upload."""
    hidden = secret()
    boundary = uuid.uuid4().hex
    body = multipart([encode(make_ct(private=hidden))], boundary)
    resp = raw_http(proxy, _http_1_0_upload(tech, boundary), body)
    assert resp.status == 400
    record = record_of(proxy, resp.getheader("x-request-id"))
    assert record["status"] == 400 and record["action"] == "store"
    assert orthanc_holding(orthanc, hidden) == []
    assert_serving(proxy, mint)


def test_http_1_0_without_content_length_then_half_close(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    hidden = secret()
    boundary = uuid.uuid4().hex
    body = multipart([encode(make_ct(private=hidden))], boundary)
    before = {r["request_id"] for r in proxy.audit_records()}
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(_http_1_0_upload(tech, boundary) + body)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # whatever the answer, until the proxy closes
            pass

    def new_stores() -> list[dict[str, Any]]:
        return [
            r
            for r in proxy.audit_records()
            if r["request_id"] not in before and r["action"] == "store"
        ]

    wait_for(lambda: bool(new_stores()), "an audit record of the upload")
    assert new_stores()[0]["status"] >= 400
    assert orthanc_holding(orthanc, hidden) == []
    assert_serving(proxy, mint)


def _abort_mid_instance(proxy: CasbProxy, tech: str) -> tuple[Dataset, dict[str, Any]]:
    """Send half of a clean 2 MiB instance (its header is allowed, so it goes upstream),
    then disconnect; return the instance and the upload's audit record."""
    ds = make_ct(pixels=bytes(range(256)) * 8192)
    ds.Rows = ds.Columns = 1024
    boundary = uuid.uuid4().hex
    body = multipart([encode(ds)], boundary)
    head = (
        "POST /pacs/studies HTTP/1.1\r\nHost: casb.test\r\n"
        f"Authorization: Bearer {tech}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = {r["request_id"] for r in proxy.audit_records()}
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(head + body[: len(body) // 2])

    def new_stores() -> list[dict[str, Any]]:
        return [
            r
            for r in proxy.audit_records()
            if r["request_id"] not in before and r["action"] == "store"
        ]

    wait_for(lambda: bool(new_stores()), "the aborted upload's audit record")
    return ds, new_stores()[0]


def test_client_closes_mid_instance(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    """The body stops in the pixel data and the client disconnects: Orthanc must store
    nothing, casb must audit."""
    ds, record = _abort_mid_instance(proxy, tech)
    assert record["status"] >= 400 and record["error"], record
    assert not orthanc_has_sop(orthanc, ds.SOPInstanceUID)
    assert_serving(proxy, mint)


def test_client_abort_is_not_audited_as_an_upstream_failure(
    proxy: CasbProxy, orthanc: Orthanc, tech: str
) -> None:
    _ds, record = _abort_mid_instance(proxy, tech)
    assert (record["status"], record["error"]) == (499, "client_disconnected")


def test_body_truncated_inside_pixel_data_after_the_header_went_upstream(
    proxy: CasbProxy, orthanc: Orthanc, mint: Mint, tech: str
) -> None:
    """The multipart is well formed but the instance inside stops in its pixel data, after
    casb forwarded its header: 400, and the upstream must not keep a partial instance."""
    ds = make_ct(pixels=bytes(1024 * 1024))
    ds.Rows = ds.Columns = 724
    head = encode(ds)[: -(1024 * 1024 + 12)]
    truncated = head + el(0x7FE00010, "OW", bytes(600_000), length=1024 * 1024)
    r = stow(proxy, tech, [truncated])
    record = assert_clear_answer(proxy, r, 400)
    assert "truncated" in r.json()["message"]
    assert record["dlp"]["failed"] == 1
    assert not orthanc_has_sop(orthanc, ds.SOPInstanceUID)
    assert_serving(proxy, mint)


# == masked reads ==========================================================================

READ_NAME = "Readleak^Phiona"
READ_ID = "READ4711PHI"


@pytest.fixture(scope="module")
def identified(orthanc: Orthanc) -> Dataset:
    """An identified instance put straight into Orthanc: what the researcher reads through
    the proxy must never carry its PHI."""
    ds = make_ct(
        name=READ_NAME,
        patient_id=READ_ID,
        private=READ_NAME,
        comments=f"seen with Readleak's husband, ID {READ_ID}",
    )
    ds.OtherPatientIDsSequence = DicomSequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = READ_ID
    boundary = uuid.uuid4().hex
    r = httpx.post(
        f"{orthanc.dicomweb_url}/studies",
        content=multipart([encode(ds)], boundary),
        headers={"Content-Type": STOW_TYPE.format(b=boundary)},
    )
    r.raise_for_status()
    return ds


def _no_read_phi(data: bytes) -> None:
    for needle in (READ_NAME, "Readleak", READ_ID):
        assert needle.encode() not in data, "PHI in a masked read"


def _urls(ds: Dataset, base: str) -> dict[str, str]:
    study = f"{base}/studies/{ds.StudyInstanceUID}"
    series = f"{study}/series/{ds.SeriesInstanceUID}"
    return {
        "study": study,
        "series": series,
        "instance": f"{series}/instances/{ds.SOPInstanceUID}",
        "study-metadata": f"{study}/metadata",
        "series-metadata": f"{series}/metadata",
        "instance-metadata": f"{series}/instances/{ds.SOPInstanceUID}/metadata",
    }


@pytest.mark.parametrize("what", ["study-metadata", "series-metadata", "instance-metadata"])
def test_metadata_as_xml_is_never_passed_unmasked(
    proxy: CasbProxy, orthanc: Orthanc, researcher: str, identified: Dataset, what: str
) -> None:
    direct = httpx.get(
        _urls(identified, orthanc.dicomweb_url)[what],
        headers={"Accept": 'multipart/related; type="application/dicom+xml"'},
    )
    url = _urls(identified, f"{proxy.url}/research")[what]
    for accept in ('multipart/related; type="application/dicom+xml"', "application/dicom+xml"):
        r = httpx.get(url, headers=auth(researcher, Accept=accept), timeout=TIMEOUT)
        _no_read_phi(r.content)
        assert_clear_answer(proxy, r, 200, 400, 403, 406, 502)
        if r.status_code == 200:
            assert "json" in r.headers["content-type"]
    assert b"Readleak" in direct.content or direct.status_code != 200


@pytest.mark.parametrize(
    "what", ["study", "series", "instance", "study-metadata", "series-metadata"]
)
def test_reads_with_accept_encoding_gzip_are_masked(
    proxy: CasbProxy, researcher: str, identified: Dataset, what: str
) -> None:
    url = _urls(identified, f"{proxy.url}/research")[what]
    accept = (
        "application/dicom+json"
        if "metadata" in what
        else ('multipart/related; type="application/dicom"')
    )
    r = httpx.get(
        url,
        headers=auth(researcher, Accept=accept, **{"Accept-Encoding": "gzip, br, deflate"}),
        timeout=TIMEOUT,
    )
    _no_read_phi(r.content)  # httpx decodes a compressed body
    assert_clear_answer(proxy, r, 200)
    assert identified.PatientBirthDate.encode() not in r.content


def test_qido_includefield_all_is_masked(
    proxy: CasbProxy, researcher: str, identified: Dataset
) -> None:
    for level, params in (
        ("studies", {"StudyInstanceUID": identified.StudyInstanceUID}),
        ("series", {"SeriesInstanceUID": identified.SeriesInstanceUID}),
        ("instances", {"SOPInstanceUID": identified.SOPInstanceUID}),
    ):
        r = httpx.get(
            f"{proxy.url}/research/{level}",
            params={**params, "includefield": "all"},
            headers=auth(researcher, Accept="application/dicom+json"),
            timeout=TIMEOUT,
        )
        assert_clear_answer(proxy, r, 200)
        _no_read_phi(r.content)
        assert r.json(), f"no {level} found"


@pytest.mark.parametrize(
    ("level", "key", "value"),
    [
        ("studies", "PatientID", READ_ID),
        ("instances", "PatientID", READ_ID),
        ("studies", "PatientBirthDate", "19370215"),
    ],
)
def test_masked_search_is_no_oracle_for_identifying_keys(
    proxy: CasbProxy, researcher: str, identified: Dataset, level: str, key: str, value: str
) -> None:
    r = httpx.get(
        f"{proxy.url}/research/{level}",
        params={key: value},
        headers=auth(researcher, Accept="application/dicom+json"),
        timeout=TIMEOUT,
    )
    _no_read_phi(r.content)
    assert_clear_answer(proxy, r, 403)
    assert identified.StudyInstanceUID not in r.text, "a PHI match key re-identified a study"
    assert f"matching on {key} is refused" in r.json()["message"]
    assert value not in r.text  # the refusal names the key, never the value


@pytest.mark.parametrize("what", ["study", "series"])
def test_whole_study_and_series_retrieves_are_masked(
    proxy: CasbProxy, researcher: str, identified: Dataset, what: str
) -> None:
    url = _urls(identified, f"{proxy.url}/research")[what]
    for accept in (
        'multipart/related; type="application/dicom"',
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        'multipart/related; type="application/octet-stream"',
        "application/zip",
        "*/*",
    ):
        r = httpx.get(url, headers=auth(researcher, Accept=accept), timeout=TIMEOUT)
        _no_read_phi(r.content)
        assert_clear_answer(proxy, r, 200, 400, 403, 406, 502)
        if r.status_code == 200 and "dicom" in r.headers["content-type"]:
            assert identified.PixelData in r.content


@pytest.mark.parametrize("what", ["study", "series", "instance", "study-metadata"])
@pytest.mark.parametrize("byte_range", ["bytes=0-99", "bytes=-2000", "bytes=200-"])
def test_range_requests_on_masked_reads(
    proxy: CasbProxy, researcher: str, identified: Dataset, what: str, byte_range: str
) -> None:
    url = _urls(identified, f"{proxy.url}/research")[what]
    accept = (
        "application/dicom+json"
        if "metadata" in what
        else ('multipart/related; type="application/dicom"')
    )
    r = httpx.get(url, headers=auth(researcher, Accept=accept, Range=byte_range), timeout=TIMEOUT)
    _no_read_phi(r.content)
    assert_clear_answer(proxy, r, 200, 416)
    assert r.status_code != 206


@pytest.mark.parametrize(
    "suffix",
    [
        "/frames/1",
        "/rendered",
        "/thumbnail",
        "/bulkdata/7fe00010",
    ],
)
def test_reads_that_cannot_be_masked_are_refused(
    proxy: CasbProxy, researcher: str, identified: Dataset, suffix: str
) -> None:
    url = _urls(identified, f"{proxy.url}/research")["instance"] + suffix
    r = httpx.get(url, headers=auth(researcher), timeout=TIMEOUT)
    _no_read_phi(r.content)
    assert_clear_answer(proxy, r, 400, 403, 404)


@pytest.mark.parametrize(
    "path",
    [
        "/research/../instances",
        "/research/studies/../../instances",
        "/research/%2e%2e/instances",
        "/research/..%2finstances",
        "/research/%252e%252e/instances",
        "/research/./../tools/find",
        "//instances",
        "/research\\..\\instances",
    ],
)
def test_orthanc_native_rest_is_not_reachable_through_research(
    proxy: CasbProxy, researcher: str, identified: Dataset, path: str
) -> None:
    """Orthanc's own REST API (/instances/{id}/file: unmasked files) lives beside the
    DICOMweb root the destinations lead to: no path may climb out to it."""
    head = (
        f"GET {path} HTTP/1.1\r\nHost: casb.test\r\nAuthorization: Bearer {researcher}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    sock.sendall(head)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    sock.close()
    _no_read_phi(body)
    assert resp.status in (400, 403, 404), resp.status
    record_of(proxy, resp.getheader("x-request-id"))


def test_no_sentinel_in_the_audit_log_or_the_proxy_log(proxy: CasbProxy) -> None:
    """Runs last: every attack above carried sentinel PHI through the proxy."""
    assert len(SENTINELS) > 50
    texts = {"audit log": proxy.audit_path.read_text(), "proxy log": proxy.log()}
    for where, text in texts.items():
        for sentinel in [*SENTINELS, READ_NAME, "Readleak", READ_ID]:
            assert sentinel not in text, f"a sentinel is in the {where}"
