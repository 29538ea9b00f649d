"""A large STOW-RS upload streamed through casb (DLP de-identifying every instance header
in flight) versus bare mitmdump with streaming on: throughput and the proxy's peak memory.

Run: ``.venv/bin/python bench/upload_stream.py`` (``--help`` for options; ``--quick`` runs
200 MB only). Writes ``bench/results/upload_stream.json`` and ``upload_stream.md``.

The upload: one ``POST .../studies`` with ``Content-Type: multipart/related;
type="application/dicom"; boundary=...`` holding ``--instances`` (default 4) multiframe
X-ray angiography instances (explicit VR little endian, 1024 x 1024 x 16 bit frames, as
many frames as the size asks for), ``--size`` bytes in all (decimal: 2G = 2,000,000,000;
default: 200M and 2G). The body is generated LAZILY: each instance's header (preamble,
DICM, file meta, dataset up to Pixel Data) comes from pydicom; the Pixel Data element's
12-byte header is packed here (pydicom cannot write an element without holding its value)
and its value is a 1 MiB pseudo-random buffer repeated, so memory stays at a few MiB
whatever the size. The header carries a made-up patient (name, ID, birth date).

Everything runs on 127.0.0.1, on free ports, started here and stopped at the end (also
on Ctrl-C or an exception):

* upstream: a minimal asyncio HTTP/1.1 sink in its own process: reads and discards the
  request body (chunked or Content-Length), counting the decoded bytes and keeping the
  first 256 KiB and the last 64 bytes, reports them to this process over a pipe, and
  answers ``200`` with a small Orthanc-shaped STOW-RS JSON (Referenced SOP Sequence).
* ``mitmdump``: bare ``mitmdump --mode reverse:http://127.0.0.1:UP --set
  stream_large_bodies=1`` (streaming on).
* ``casb``: ``mitmdump -s addons/casb.py --set casb_config=<casb.yaml>``, production
  environment, identity from a JWKS file (RS256 key generated here), destination ``pacs``
  -> ``http://127.0.0.1:UP/dicom-web``, DLP UID key from a file, and a policy written here:
  one rule allowing ``store`` on ``pacs`` with the obligation ``dlp: bench-deidentify``, a
  profile with ``deidentify: []`` (the basic profile), so every instance header is
  rewritten in flight.
* client (this process): a raw blocking socket writing the request head, then the body
  in 1 MiB pieces with chunked transfer encoding (``--framing length`` sends a
  Content-Length instead) as fast as the proxy takes it, then reading the response.

Method: every run starts a FRESH proxy process (so its VmHWM, the kernel's peak resident
set, belongs to that run alone), sends one warm-up upload (same shape, 4 frames per
instance, about 34 MB: a fresh process is slower on its first large body) that must be
answered 200, then the measured upload. MB/s = body bytes /
wall time from the first byte sent to the last byte of the response (MB = 10^6 bytes).
The proxy's memory is read from /proc/PID/status every 20 ms during the run (VmRSS, peak
of the samples) and VmHWM at the end; its CPU from /proc/PID/stat (utime + stime).
Rounds (``--rounds``) run each size through mitmdump then casb; figures are medians over
rounds, the casb/mitmdump ratio is paired within a round. Checks, each run: the answer is
200; bare mitmdump delivers exactly the bytes sent (count, first 256 KiB and last bytes
identical); through casb the upstream receives the same body except the rewritten
instance headers: the byte counts are reported (in/out) and must differ by less than
64 KiB per instance, the first 256 KiB must no longer hold the generated patient name,
and the body must end with the closing boundary. Benchmarks report; they never fail on a
threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import pstats
import queue
import random
import shlex
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

# The proxy-process plumbing and the identity set-up are proxy_overhead.py's (same rig).
from proxy_overhead import (  # noqa: E402
    ADDON,
    AUDIENCE,
    ISSUER,
    MITMDUMP,
    BenchError,
    Mitmdump,
    _fmt,
    _interrupt,
    _version,
    audit_lines,
    cpu_model,
    cpu_ticks,
    make_identity,
    text_table,
)

from casb.audit.checkpoint import write_keypair  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
IO_TIMEOUT_S = 120.0  # no progress for this long: the run failed
PIECE = 1024 * 1024  # client write size
HEAD_SAMPLE = 256 * 1024
TAIL_SAMPLE = 64
RSS_SAMPLE_S = 0.02
MAX_DELTA_PER_INSTANCE = 64 * 1024
WARM_FRAMES = 4  # frames per instance in the warm-up upload

BOUNDARY = "casb-bench-7d1c0a5e3f9b4c2a8e6d1f0b"
CASB_PATH = "/pacs/studies"
UPSTREAM_PATH = "/dicom-web/studies"
PROFILE = "bench-deidentify"
RULE_ID = "bench-store-deidentified"
UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # a made-up root under a test arc
PATIENT_NAME = "BENCHMARK^XAPATIENT^Q"
PATIENT_ID = "BENCH0067890"
XA_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"
VARIANTS = ("mitmdump", "casb")


# -- the upload, generated lazily ---------------------------------------------------------------


def xa_header(index: int, frames: int, rows: int, cols: int, study_uid: str) -> bytes:
    """A multiframe XA instance up to (not including) Pixel Data, as Part 10 bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.SOPClassUID = XA_STORAGE
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240306"
    ds.StudyTime = "140500"
    ds.SeriesTime = ds.ContentTime = f"1406{index % 60:02d}"
    ds.AccessionNumber = "ACC20240306042"
    ds.Modality = "XA"
    ds.Manufacturer = "EXAMPLE MEDICAL"
    ds.InstitutionName = "St. Example General Hospital"
    ds.ReferringPhysicianName = "REFERRER^ROBERTA^^DR"
    ds.StationName = "CATHLAB2"
    ds.StudyDescription = "CORONARY ANGIOGRAPHY"
    ds.SeriesDescription = f"LCA RAO30 CAU20 run {index + 1}"
    ds.OperatorsName = "TECH^TERRY"
    ds.ManufacturerModelName = "ExampleAngio 9"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = study_uid
    ds.ReferencedStudySequence = DicomSequence([ref])
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19610923"
    ds.PatientSex = "M"
    ds.PatientAge = "062Y"
    ds.KVP = "80"
    ds.DeviceSerialNumber = "XA2-55812"
    ds.SoftwareVersions = "VC21"
    ds.ProtocolName = "CORO LEFT"
    ds.FrameTime = "66.7"
    ds.DistanceSourceToDetector = "1195"
    ds.ExposureTime = "7"
    ds.XRayTubeCurrent = "620"
    ds.PositionerPrimaryAngle = "-30"
    ds.PositionerSecondaryAngle = "20"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(UID_ROOT)
    ds.StudyID = "42"
    ds.SeriesNumber = str(index + 1)
    ds.InstanceNumber = "1"
    ds.PatientOrientation = ["A", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = str(frames)
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def pixel_element_header(length: int) -> bytes:
    """(7FE0,0010) OW with a 32-bit length, explicit VR little endian. Packed by hand:
    pydicom writes an element only from its value in memory, and the value here is
    streamed (GBs) from a repeating buffer."""
    if length % 2 or length >= 0xFFFFFFFF:
        raise BenchError("pixel data length must be even and below 4 GiB")
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


@dataclass(frozen=True)
class Upload:
    """A multipart/related body as a list of pieces: bytes, or a length of pixel data."""

    pieces: tuple[bytes | int, ...]
    pattern: bytes
    instances: int
    frames: int
    rows: int
    cols: int

    @property
    def length(self) -> int:
        return sum(p if isinstance(p, int) else len(p) for p in self.pieces)

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

    def chunks(self, size: int = PIECE) -> Iterator[memoryview]:
        pattern = memoryview(self.pattern)
        for piece in self.pieces:
            if isinstance(piece, int):
                left, at = piece, 0
                while left:
                    n = min(size, left, len(pattern) - at)
                    yield pattern[at : at + n]
                    left -= n
                    at = (at + n) % len(pattern)
            else:
                view = memoryview(piece)
                for i in range(0, len(view), size):
                    yield view[i : i + size]

    def prefix(self, n: int) -> bytes:
        out = bytearray()
        for chunk in self.chunks():
            out += chunk[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)


def make_upload(size: int, instances: int, rows: int = 1024, cols: int = 1024) -> Upload:
    """About ``size`` bytes of body in ``instances`` multiframe XA instances."""
    from pydicom.uid import generate_uid

    frame_bytes = rows * cols * 2
    frames = max(1, round(size / instances / frame_bytes))
    pattern = random.Random(20240306).randbytes(1024 * 1024)
    delimiter = f"--{BOUNDARY}".encode()
    if delimiter in pattern + pattern[: len(delimiter)]:  # astronomically unlikely
        raise BenchError("the pixel pattern contains the boundary")
    study_uid = generate_uid(UID_ROOT)
    pieces: list[bytes | int] = []
    for i in range(instances):
        part_head = (
            (b"\r\n" if i else b"") + delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n"
        )
        pixels = frames * frame_bytes
        pieces += [
            part_head + xa_header(i, frames, rows, cols, study_uid) + pixel_element_header(pixels),
            pixels,
        ]
    pieces.append(b"\r\n" + delimiter + b"--\r\n")
    return Upload(tuple(pieces), pattern, instances, frames, rows, cols)


def check_upload_parses(upload: Upload) -> None:
    """The generated instances are valid DICOM (pydicom reads one back, pixels included)."""
    import pydicom

    body = b"".join(bytes(c) for c in upload.chunks())
    delimiter = f"--{BOUNDARY}".encode()
    part = body.split(delimiter)[1].split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
    ds = pydicom.dcmread(io.BytesIO(part))
    if int(ds.NumberOfFrames) != upload.frames or len(ds.PixelData) != (
        upload.frames * upload.rows * upload.cols * 2
    ):
        raise BenchError("generated instance does not read back as generated")


# -- the upstream sink (runs in its own process) ------------------------------------------------


def stow_response(port: int) -> bytes:
    """A small Orthanc-shaped STOW-RS answer (made-up UIDs)."""
    base = f"http://127.0.0.1:{port}/dicom-web/studies/1.2.826.0.1.3680043.10.1234.1"
    body = json.dumps(
        {
            "00081190": {"vr": "UR", "Value": [base]},
            "00081199": {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": [XA_STORAGE]},
                        "00081155": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.10.1234.2"]},
                        "00081190": {"vr": "UR", "Value": [base + "/series/1/instances/2"]},
                    }
                ],
            },
        }
    ).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


@dataclass
class Received:
    path: str = ""
    framing: str = ""
    body_bytes: int = 0
    head: bytes = b""
    tail: bytes = b""
    seconds: float = 0.0


class _Sink:
    def __init__(self, received: Received) -> None:
        self.r = received

    def take(self, data: bytes) -> None:
        r = self.r
        r.body_bytes += len(data)
        if len(r.head) < HEAD_SAMPLE:
            r.head += data[: HEAD_SAMPLE - len(r.head)]
        r.tail = (r.tail + data[-TAIL_SAMPLE:])[-TAIL_SAMPLE:]


async def _read_body(reader: asyncio.StreamReader, head: bytes, sink: _Sink) -> None:
    lower = head.lower()
    te = lower.find(b"\r\ntransfer-encoding:")
    if te >= 0 and b"chunked" in lower[te : lower.find(b"\r\n", te + 2)]:
        sink.r.framing = "chunked"
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return
            left = size
            while left:
                data = await reader.read(min(left, 1 << 20))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                sink.take(data)
                left -= len(data)
            await reader.readexactly(2)
    at = lower.find(b"\r\ncontent-length:")
    sink.r.framing = "content-length"
    if at < 0:
        return
    end = lower.find(b"\r\n", at + 2)
    left = int(lower[at + 17 : end])
    while left:
        data = await reader.read(min(left, 1 << 20))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        sink.take(data)
        left -= len(data)


async def _upstream_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    report: Connection,
    port: int,
    answer: bytes | None = None,
) -> None:
    answer = stow_response(port) if answer is None else answer
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            received = Received(path=head.split(b" ", 2)[1].decode("latin-1"))
            t0 = time.perf_counter()
            await _read_body(reader, head, _Sink(received))
            received.seconds = time.perf_counter() - t0
            report.send(asdict(received))
            writer.write(answer)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def _upstream_main(ready: Connection, report: Connection, answer: bytes | None) -> None:
    port_box: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _upstream_connection(reader, writer, report, port_box[0], answer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port_box.append(server.sockets[0].getsockname()[1])
    ready.send(port_box[0])
    ready.close()
    async with server:
        await server.serve_forever()


def upstream_process(ready: Connection, report: Connection, answer: bytes | None = None) -> None:
    """Entry point of the upstream process; the parent stops it (SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_upstream_main(ready, report, answer))


class Upstream:
    """The sink process. `answer`: the whole HTTP response it sends after each request
    (default: the STOW-RS answer above)."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.port = 0
        self.answer = answer
        self._proc: BaseProcess | None = None
        self._reports: queue.Queue[dict[str, Any]] = queue.Queue()

    def start(self) -> Upstream:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        reports_in, reports_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=upstream_process,
            args=(child, reports_out, self.answer),
            daemon=True,
            name="casb-bench-sink",
        )
        self._proc.start()
        child.close()
        reports_out.close()
        # A report (with its 256 KiB sample) is larger than a pipe's buffer: read them as
        # they come, or the sink would block before answering.
        threading.Thread(
            target=self._collect, args=(reports_in,), daemon=True, name="sink-reports"
        ).start()
        if not parent.poll(START_TIMEOUT_S):
            raise BenchError("the upstream sink did not report its port")
        self.port = int(parent.recv())
        parent.close()
        return self

    def _collect(self, reports: Connection) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                self._reports.put(reports.recv())

    def received(self, timeout: float = 5.0) -> Received:
        """What the sink got for the last request (it reports before it answers)."""
        try:
            return Received(**self._reports.get(timeout=timeout))
        except queue.Empty:
            raise BenchError("the upstream sink reported no request") from None

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._reports.get_nowait()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- the client -----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float
    sent: int
    early: bool  # the proxy answered before the whole body was sent


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise BenchError("connection closed before a response")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head[9:12])
    length: int | None = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            line, _, rest = rest.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(rest) < size + 2:
                data = sock.recv(65536)
                if not data:
                    raise BenchError("connection closed inside a chunked response")
                rest += data
            body += rest[:size]
            rest = rest[size + 2 :]
            if size == 0:
                return status, body
    if length is None:
        while data := sock.recv(65536):
            rest += data
        return status, rest
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise BenchError("connection closed inside the response")
        rest += data
    return status, rest[:length]


def upload(port: int, path: str, token: str, body: Upload, framing: str) -> Answer:
    """POST the body as fast as the proxy takes it; the response."""
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: Bearer {token}",
        f"Content-Type: {body.content_type}",
        "Accept: application/dicom+json",
        "User-Agent: casb-bench",
    ]
    head.append(
        "Transfer-Encoding: chunked" if framing == "chunked" else f"Content-Length: {body.length}"
    )
    request_head = ("\r\n".join(head) + "\r\n\r\n").encode()
    sent = 0
    early = False
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        try:
            sock.sendall(request_head)
            for chunk in body.chunks():
                if framing == "chunked":
                    sock.sendall(b"%x\r\n" % len(chunk))
                    sock.sendall(chunk)
                    sock.sendall(b"\r\n")
                else:
                    sock.sendall(chunk)
                sent += len(chunk)
            if framing == "chunked":
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            early = True  # answered (and closed) early: read what it said
        status, answer = _read_response(sock)
        seconds = time.perf_counter() - t0
    return Answer(status, answer, seconds, sent, early or sent < body.length)


# -- the proxy's memory -------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


class RssSampler(threading.Thread):
    """Samples VmRSS (keeps the peak) and VmHWM of a process every RSS_SAMPLE_S."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.peak_rss_kb = 0
        self.hwm_kb = 0
        self.samples = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        rss = _status_kb(self.pid, "VmRSS")
        hwm = _status_kb(self.pid, "VmHWM")
        if rss is not None:
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.samples += 1
        if hwm is not None:
            self.hwm_kb = max(self.hwm_kb, hwm)

    def run(self) -> None:
        while not self._halt.wait(RSS_SAMPLE_S):
            self.sample()

    def finish(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


# -- config ----------------------------------------------------------------------------------


def write_policy(workdir: Path) -> Path:
    policy = {
        "version": 1,
        "description": "bench/upload_stream.py: store allowed, every instance de-identified",
        "roles": {"radiologist": {"description": "the benchmark's uploader"}},
        "rules": [
            {
                "id": RULE_ID,
                "description": "store on pacs, headers de-identified in flight",
                "effect": "allow",
                "roles": ["radiologist"],
                "actions": ["store"],
                "destinations": ["pacs"],
                "obligations": {"dlp": PROFILE},
            }
        ],
        "dlp": {
            "profiles": {
                PROFILE: {
                    "description": "PS3.15 basic profile on every instance",
                    "block": [],
                    "deidentify": [],
                }
            }
        },
    }
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def write_casb_config(
    workdir: Path, upstream: int, jwks_path: Path, policy: Path, max_body: int, port: int
) -> tuple[Path, Path]:
    audit = workdir / "audit.jsonl"
    signing = workdir / "audit-signing.pem"  # production signs audit checkpoints
    write_keypair(signing, workdir / "audit-signing.pub.pem")
    key = workdir / "dlp-uid.key"
    key.write_text("casb-bench-upload-uid-key-not-a-secret-0123456789\n")
    key.chmod(0o600)
    config = {
        "environment": "production",
        "state_dir": str(workdir),
        # loopback bench rig: plaintext legs allowed (casb refuses them otherwise)
        "listeners": [
            {"mode": "reverse", "host": "127.0.0.1", "port": port, "allow_plaintext": True}
        ],
        "destinations": {
            "pacs": {
                "upstream": f"http://127.0.0.1:{upstream}/dicom-web",
                "route": "/pacs",
                "allow_plaintext": True,
            }
        },
        "identity": {"issuer": ISSUER, "audience": [AUDIENCE], "jwks_file": str(jwks_path)},
        "policy": {"paths": [str(policy)]},
        "audit": {"path": str(audit), "checkpoints": {"signing_key_file": str(signing)}},
        "dlp": {"uid_key_file": str(key)},
        "limits": {"max_body_bytes": max_body},
    }
    path = workdir / "casb.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, audit


# -- runs ----------------------------------------------------------------------------------------


@dataclass
class Run:
    round: int
    variant: str
    size_arg: int
    body_bytes_in: int
    body_bytes_out: int
    delta_bytes: int
    status: int
    seconds: float
    mb_per_s: float
    proxy_cpu_s: float
    proxy_cpu_s_per_gb: float
    proxy_cpu_pct: float  # proxy CPU time / wall time: near 100 means the proxy is the limit
    rss_before_mb: float  # VmRSS after the warm-up, right before the measured upload
    peak_rss_mb: float  # max VmRSS over the samples
    vmhwm_mb: float  # VmHWM at the end
    rss_samples: int
    upstream_framing: str
    upstream_seconds: float
    checks: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Rig:
    def __init__(self, workdir: Path, framing: str, extra_casb: Sequence[str]) -> None:
        self.workdir = workdir
        self.framing = framing
        self.extra_casb = list(extra_casb)
        self.upstream = Upstream()
        self.token = ""
        self.jwks_path = workdir / "jwks.json"
        self.policy = workdir / "policy.yaml"
        self.audit_path = workdir / "casb" / "audit.jsonl"
        self.casb_sent = 0
        self.proxy: Mitmdump | None = None
        self.runs = 0

    def start(self) -> None:
        self.upstream.start()
        self.jwks_path, self.token = make_identity(self.workdir)
        self.policy = write_policy(self.workdir)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        self.upstream.stop()

    def new_proxy(self, variant: str, max_body: int, prefix: Sequence[str] = ()) -> Mitmdump:
        self.runs += 1
        workdir = self.workdir / f"{variant}-{self.runs}"
        if variant == "mitmdump":
            proxy = Mitmdump(
                "mitmdump",
                workdir,
                self.upstream.port,
                extra=["--set", "stream_large_bodies=1"],
                prefix=prefix,
            )
        else:
            workdir.mkdir(parents=True)
            config = workdir / "casb.yaml"
            self.casb_sent = 0
            proxy = Mitmdump(
                "casb",
                workdir,
                self.upstream.port,
                extra=["-s", str(ADDON), "--set", f"casb_config={config}", *self.extra_casb],
                prefix=prefix,
            )
            _, self.audit_path = write_casb_config(
                workdir, self.upstream.port, self.jwks_path, self.policy, max_body, proxy.port
            )
        self.proxy = proxy
        proxy.start()
        proxy.wait_ready()
        return proxy

    def send(self, variant: str, port: int, body: Upload) -> tuple[Answer, Received]:
        path = CASB_PATH if variant == "casb" else UPSTREAM_PATH
        self.upstream.drain()
        if variant == "casb":
            self.casb_sent += 1
        answer = upload(port, path, self.token, body, self.framing)
        if answer.status != 200:
            return answer, Received()
        return answer, self.upstream.received()


def verify(variant: str, body: Upload, answer: Answer, got: Received) -> dict[str, bool]:
    """The checks of one run (see the module docstring)."""
    delimiter = f"--{BOUNDARY}".encode()
    checks = {"status_200": answer.status == 200, "whole_body_sent": not answer.early}
    if answer.status != 200:
        return checks
    closing = b"\r\n" + delimiter + b"--\r\n"
    checks["ends_with_closing_boundary"] = got.tail.endswith(closing[-TAIL_SAMPLE:])
    if variant == "mitmdump":
        checks["bytes_identical_count"] = got.body_bytes == body.length
        checks["head_identical"] = got.head == body.prefix(HEAD_SAMPLE)
    else:
        delta = got.body_bytes - body.length
        checks["delta_within_64KiB_per_instance"] = (
            abs(delta) < MAX_DELTA_PER_INSTANCE * body.instances
        )
        checks["head_starts_with_boundary"] = got.head.startswith(delimiter)
        checks["head_has_dicm"] = b"DICM" in got.head
        checks["patient_name_removed"] = PATIENT_NAME.encode() not in got.head
        checks["patient_id_removed"] = PATIENT_ID.encode() not in got.head
    return checks


def measure(rig: Rig, variant: str, rnd: int, size: int, body: Upload, warm: Upload) -> Run:
    proxy = rig.new_proxy(variant, max(2 * 1024**3, 2 * body.length))
    try:
        answer, got = rig.send(variant, proxy.port, warm)
        if answer.status != 200:
            raise BenchError(
                f"{variant}: warm-up upload answered {answer.status}, not 200 "
                f"(response {len(answer.body)} bytes)\n{proxy.log_tail()}"
            )
        sampler = RssSampler(proxy.pid)
        sampler.sample()
        rss_before_kb = sampler.peak_rss_kb
        cpu0 = cpu_ticks(proxy.pid)
        sampler.start()
        try:
            answer, got = rig.send(variant, proxy.port, body)
        finally:
            sampler.finish()
        cpu = (cpu_ticks(proxy.pid) - cpu0) / CLK_TCK
        problems = []
        if answer.status != 200:
            problems.append(f"answered {answer.status}: {answer.body[:300]!r}")
        checks = verify(variant, body, answer, got)
        if variant == "casb":
            deadline = time.monotonic() + 5
            while audit_lines(rig.audit_path) < rig.casb_sent and time.monotonic() < deadline:
                time.sleep(0.01)
            checks["audited"] = audit_lines(rig.audit_path) == rig.casb_sent
        problems += [f"check failed: {name}" for name, ok in checks.items() if not ok]
        if problems:
            problems.append("proxy log tail:\n" + proxy.log_tail())
    finally:
        rig.proxy = None
        proxy.stop()
    return Run(
        round=rnd,
        variant=variant,
        size_arg=size,
        body_bytes_in=body.length,
        body_bytes_out=got.body_bytes,
        delta_bytes=got.body_bytes - body.length,
        status=answer.status,
        seconds=answer.seconds,
        mb_per_s=body.length / answer.seconds / 1e6,
        proxy_cpu_s=cpu,
        proxy_cpu_s_per_gb=cpu / (body.length / 1e9),
        proxy_cpu_pct=100 * cpu / answer.seconds,
        rss_before_mb=rss_before_kb / 1024,
        peak_rss_mb=sampler.peak_rss_kb / 1024,
        vmhwm_mb=sampler.hwm_kb / 1024,
        rss_samples=sampler.samples,
        upstream_framing=got.framing,
        upstream_seconds=got.seconds,
        checks=checks,
        problems=problems,
    )


def profile_casb(rig: Rig, out: Path, body: Upload, warm: Upload, top: int = 25) -> str:
    """One casb upload under cProfile (a separate proxy; its figures are not reported)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proxy = rig.new_proxy(
        "casb",
        max(2 * 1024**3, 2 * body.length),
        prefix=[sys.executable, "-m", "cProfile", "-o", str(out)],
    )
    try:
        for upload_body in (warm, body):
            answer, _ = rig.send("casb", proxy.port, upload_body)
            if answer.status != 200:
                raise BenchError(f"profiled casb answered {answer.status}\n{proxy.log_tail()}")
        seconds = answer.seconds
    finally:
        rig.proxy = None
        proxy.stop()
    if not out.exists():
        raise BenchError(f"cProfile wrote no {out}")
    buf = io.StringIO()
    stats = pstats.Stats(str(out), stream=buf)
    buf.write(
        f"casb under cProfile: {body.length / seconds / 1e6:,.1f} MB/s (inflated times; "
        f"compare entries with each other). Whole process, by own time:\n"
    )
    stats.sort_stats("tottime").print_stats(top)
    buf.write("casb's own code, by cumulative time:\n")
    stats.sort_stats("cumulative").print_stats(r"/casb/", top)
    return buf.getvalue()


# -- summarising ---------------------------------------------------------------------------------

METRICS = (
    "mb_per_s",
    "seconds",
    "proxy_cpu_s_per_gb",
    "proxy_cpu_pct",
    "rss_before_mb",
    "peak_rss_mb",
    "vmhwm_mb",
)


def summarise(runs: Sequence[Run], sizes: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for size in sizes:
        at = [r for r in runs if r.size_arg == size]
        entry: dict[str, Any] = {"size_arg": size, "variants": {}}
        for v in VARIANTS:
            rs = [r for r in at if r.variant == v]
            if not rs:
                continue
            entry["variants"][v] = {
                **{m: statistics.median(getattr(r, m) for r in rs) for m in METRICS},
                "max_vmhwm_mb": max(r.vmhwm_mb for r in rs),
                "body_bytes_in": rs[0].body_bytes_in,
                "body_bytes_out": [r.body_bytes_out for r in rs],
                "delta_bytes": [r.delta_bytes for r in rs],
                "runs": len(rs),
                "failed_runs": sum(bool(r.problems) for r in rs),
            }
        ratios, cpu_ratios = [], []
        for rnd in sorted({r.round for r in at}):
            got = {r.variant: r for r in at if r.round == rnd and not r.problems}
            if all(v in got for v in VARIANTS):
                ratios.append(got["casb"].mb_per_s / got["mitmdump"].mb_per_s)
                cpu_ratios.append(
                    got["casb"].proxy_cpu_s_per_gb / got["mitmdump"].proxy_cpu_s_per_gb
                )
        entry["casb_over_mitmdump_mb_per_s"] = statistics.median(ratios) if ratios else None
        entry["ratio_per_round"] = ratios
        entry["casb_over_mitmdump_cpu_per_gb"] = (
            statistics.median(cpu_ratios) if cpu_ratios else None
        )
        entry["cpu_ratio_per_round"] = cpu_ratios
        out.append(entry)
    return out


HEADERS = [
    "upload",
    "MB/s",
    "s",
    "proxy CPU s/GB",
    "proxy CPU %",
    "VmRSS before MB",
    "peak VmRSS MB",
    "VmHWM MB",
    "bytes in",
    "bytes out",
    "casb/mitmdump MB/s",
    "casb/mitmdump CPU/GB",
]


def size_label(n: int) -> str:
    return f"{n / 1e9:g} GB" if n >= 10**9 else f"{n / 1e6:g} MB"


def table_rows(summary: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for entry in summary:
        for v, s in entry["variants"].items():
            outs = sorted(set(s["body_bytes_out"]))
            rows.append(
                [
                    f"{size_label(entry['size_arg'])} {v}"
                    + (f" ({s['failed_runs']} FAILED)" if s["failed_runs"] else ""),
                    _fmt(s["mb_per_s"], ",.1f"),
                    _fmt(s["seconds"], ".2f"),
                    _fmt(s["proxy_cpu_s_per_gb"], ".2f"),
                    _fmt(s["proxy_cpu_pct"], ".0f"),
                    _fmt(s["rss_before_mb"], ",.1f"),
                    _fmt(s["peak_rss_mb"], ",.1f"),
                    _fmt(s["vmhwm_mb"], ",.1f"),
                    f"{s['body_bytes_in']:,}",
                    "/".join(f"{o:,}" for o in outs),
                    _fmt(entry["casb_over_mitmdump_mb_per_s"], ".3f") if v == "casb" else "",
                    _fmt(entry["casb_over_mitmdump_cpu_per_gb"], ".3f") if v == "casb" else "",
                ]
            )
    return rows


def findings_lines(summary: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The headline comparisons: the casb/mitmdump ratio per size, memory growth with size,
    and the outcome of the per-run checks."""
    lines = [
        f"{size_label(e['size_arg'])}: casb / mitmdump MB/s = "
        f"{_fmt(e['casb_over_mitmdump_mb_per_s'], '.3f')}, proxy CPU per GB = "
        f"{_fmt(e['casb_over_mitmdump_cpu_per_gb'], '.3f')} (medians of per-round ratios; "
        "per round MB/s: " + ", ".join(f"{x:.2f}" for x in e["ratio_per_round"]) + ")"
        for e in summary
    ]
    if len(summary) > 1:
        small, large = summary[0], summary[-1]
        for v in VARIANTS:
            if v in small["variants"] and v in large["variants"]:
                a, b = small["variants"][v]["vmhwm_mb"], large["variants"][v]["vmhwm_mb"]
                lines.append(
                    f"{v} VmHWM at {size_label(large['size_arg'])} vs "
                    f"{size_label(small['size_arg'])}: {b:,.1f} vs {a:,.1f} MB ({b - a:+,.1f} MB)"
                )
    for v, names in meta["checks"].items():
        failed = meta["failed_runs"].get(v, 0)
        verdict = "all passed" if not failed else f"FAILED in {failed} run(s)"
        lines.append(f"checks, every {v} run ({', '.join(names)}): {verdict}")
    return lines


def markdown(summary: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    cfg = meta["config"]
    lines = [
        "# Streaming upload benchmark: casb (DLP de-identification in flight) vs mitmdump",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- Python {meta['python']}, mitmproxy {meta['mitmproxy']}, pydicom {meta['pydicom']}",
        f"- CPU: {meta['cpu']} ({meta['nproc']} CPUs), {meta['platform']}; client, proxy and "
        "upstream share these CPUs; load average at start "
        + " ".join(f"{x:.2f}" for x in meta["loadavg_at_start"]),
        f"- upload: STOW-RS multipart/related, {cfg['instances']} multiframe XA instances "
        f"(1024x1024x16 bit frames), {cfg['framing']} framing, 1 MiB client writes; casb "
        f"policy: `store` with obligation `dlp: {PROFILE}` (`deidentify: []`)",
        f"- {cfg['rounds']} round(s); every run a fresh proxy process; median figures; "
        "MB = 10^6 bytes",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADERS))) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(summary)),
        "",
        *(f"- {line}" for line in findings_lines(summary, meta)),
        "- The proxy is the bottleneck (proxy CPU near 100 %: mitmproxy is single-threaded), "
        "so proxy CPU seconds per GB is the steadiest figure; MB/s varies with the machine "
        "(client, upstream and other work share the CPUs), most in the short 200 MB runs.",
        "- bytes in: body bytes the client sent; bytes out: body bytes the upstream "
        "received (decoded). mitmdump must deliver them unchanged; casb differs by the "
        "rewritten instance headers only.",
        "- VmRSS before: the proxy's resident set after start-up and the 34 MB warm-up "
        "upload, right before the measured one; peak VmRSS: the highest of the 20 ms samples "
        "during the measured upload; VmHWM: the kernel's peak resident set of the proxy "
        "process (fresh per run) at the end.",
    ]
    if meta["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in meta["notes"])]
    lines.append("")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    t = text.strip().upper().removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 200M, 2G)") from None


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--size",
        type=parse_size,
        action="append",
        default=None,
        help="upload size, e.g. 200M or 2G (decimal; repeatable; default 200M and 2G)",
    )
    parser.add_argument(
        "--instances", type=int, default=4, help="instances in the upload (default 4)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of mitmdump + casb (default 7; quick 1)"
    )
    parser.add_argument(
        "--framing",
        choices=("chunked", "length"),
        default="chunked",
        help="client body framing: chunked transfer encoding (default) or Content-Length",
    )
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        action="append",
        default=None,
        help="run only this proxy (repeatable; default both)",
    )
    parser.add_argument(
        "--casb-set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="extra mitmproxy option for the casb process only (repeatable)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="also run casb once under cProfile (largest size), save the stats to FILE "
        "and print where its CPU goes",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 200M only, 1 round; writes results only with --out",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results)"
    )
    args = parser.parse_args(argv)
    sizes: list[int] = args.size or ([200 * 10**6] if args.quick else [200 * 10**6, 2 * 10**9])
    if args.rounds is None:
        args.rounds = 1 if args.quick else 7
    if args.rounds < 1 or args.instances < 1 or any(s < 1 for s in sizes):
        parser.error("--rounds, --instances and --size must be positive")
    out: Path | None = args.out
    if out is None and not args.quick:
        out = REPO / "bench" / "results"
    if not MITMDUMP.exists():
        parser.error(f"{MITMDUMP} not found: run from the project venv (.venv/bin/python)")
    extra_casb = [a for opt in args.casb_set for a in ("--set", opt)]
    command = " ".join(
        [
            ".venv/bin/python bench/upload_stream.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    ).strip()

    load_at_start = os.getloadavg()
    warm = make_upload(args.instances * WARM_FRAMES * 1024 * 1024 * 2, args.instances)
    check_upload_parses(make_upload(1, 2))  # a tiny one of the same shape
    bodies = {size: make_upload(size, args.instances) for size in sizes}
    for size, body in bodies.items():
        print(
            f"{size_label(size)}: {body.instances} XA instances x {body.frames} frames, "
            f"body {body.length:,} bytes (generated lazily)",
            file=sys.stderr,
        )
    runs: list[Run] = []
    profile_text = ""
    with tempfile.TemporaryDirectory(prefix="casb-bench-upload-") as tmp:
        rig = Rig(Path(tmp), args.framing, extra_casb)
        try:
            rig.start()
            for rnd in range(1, args.rounds + 1):
                for size in sizes:
                    for variant in args.variant or VARIANTS:
                        run = measure(rig, variant, rnd, size, bodies[size], warm)
                        runs.append(run)
                        print_run(run, args.rounds)
            if args.profile is not None:
                profile_text = profile_casb(rig, args.profile.resolve(), bodies[max(sizes)], warm)
        finally:
            rig.stop()

    summary = summarise(runs, sizes)
    notes = []
    if extra_casb:
        notes.append(f"casb process extra options: {' '.join(extra_casb)}")
    for r in runs:
        for p in r.problems:
            notes.append(f"round {r.round} {r.variant} {size_label(r.size_arg)}: {p}")
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "mitmproxy": _version("mitmproxy"),
        "pydicom": _version("pydicom"),
        "casb": _version("casb"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_at_start": load_at_start,
        "config": {
            "sizes": sizes,
            "instances": args.instances,
            "rounds": args.rounds,
            "framing": args.framing,
            "client_write_bytes": PIECE,
            "profile": PROFILE,
            "rule": RULE_ID,
            "mitmdump_options": ["stream_large_bodies=1", "connection_strategy=lazy", "-q"],
            "casb_options": [
                "-s addons/casb.py",
                "casb_config=<generated>",
                "connection_strategy=lazy",
                "-q",
                *extra_casb,
            ],
        },
        "notes": [n.splitlines()[0] for n in notes],
        "checks": {
            v: sorted({name for r in runs if r.variant == v for name in r.checks})
            for v in VARIANTS
            if any(r.variant == v for r in runs)
        },
        "failed_runs": {v: sum(bool(r.problems) for r in runs if r.variant == v) for v in VARIANTS},
    }
    print()
    print(
        f"streaming STOW-RS upload, {meta['cpu']} ({meta['nproc']} CPUs), Python "
        f"{meta['python']}, mitmproxy {meta['mitmproxy']}; median of {args.rounds} round(s)"
    )
    print(text_table(HEADERS, table_rows(summary)))
    for line in findings_lines(summary, meta):
        print(line)
    for note in notes:
        print(f"note: {note}")
    if profile_text:
        print()
        print(profile_text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]}
        (out / "upload_stream.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "upload_stream.md").write_text(markdown(summary, meta))
        print(f"\nwrote {out / 'upload_stream.json'} and {out / 'upload_stream.md'}")
    return 1 if any(r.problems for r in runs) else 0


def print_run(run: Run, rounds: int) -> None:
    failed = f"  FAILED: {run.problems[0]}" if run.problems else ""
    print(
        f"round {run.round}/{rounds} {size_label(run.size_arg):>7} {run.variant:8} "
        f"{run.mb_per_s:8,.1f} MB/s  {run.seconds:6.2f} s  proxy CPU "
        f"{run.proxy_cpu_s_per_gb:5.2f} s/GB ({run.proxy_cpu_pct:3.0f}%)  "
        f"peak RSS {run.peak_rss_mb:7.1f} MB  VmHWM "
        f"{run.vmhwm_mb:7.1f} MB  in {run.body_bytes_in:,} out {run.body_bytes_out:,}{failed}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"upload_stream: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("upload_stream: interrupted; servers stopped", file=sys.stderr)
        raise SystemExit(130) from None
