"""Envelope encryption throughput: casb's streaming format versus raw AES-256-GCM.

Run: ``.venv/bin/python bench/envelope.py`` (``--help`` for options; ``--quick`` for a
smoke run). Writes ``bench/results/envelope.json`` and ``envelope.md``.

Data: ``--size`` MiB (default 256) of random bytes (``os.urandom``), in memory. One
process pinned to one core (``os.sched_setaffinity``), the garbage collector enabled.

Variants, all on the same bytes:

* ``format encrypt``: ``casb.encryption.envelope.new_object(keyring, length, 1 MiB)``
  (fresh data key, wrapped by an in-memory ``LocalKeyring``) and ``Sealer.feed`` with
  64 KiB ``bytes`` pieces, as the proxy receives an upload, then ``finish``; the sealed
  pieces are dropped as they come (the proxy forwards them).
* ``raw encrypt``: ``AESGCM(key).encrypt(nonce, piece, aad)`` over the same data in 1 MiB
  pieces (memoryview slices of the one buffer: no copy), a counter nonce: the cost of the
  cipher alone, the reference.
* ``format decrypt``: ``open_object`` (unwrap) and ``Opener.feed`` with 64 KiB pieces of
  the sealed body, then ``finish``; the plaintext is dropped as it comes.
* ``raw decrypt``: ``AESGCM(key).decrypt`` of the raw ciphertext in (1 MiB + 16) pieces.

Method: one untimed warm-up pass per variant, which also checks that each did its job
(the sealed body has ``ciphertext_length`` bytes and opens to the data; both
decryptions give the data back; compared by SHA-256). Then ``--reps`` repetitions, the variant
order rotating between repetitions so drift hits all alike; each times one pass with
``time.perf_counter``. MB/s = plaintext bytes / pass time (MB = 10^6 bytes); figures are
medians over repetitions, and ``x raw`` is the median of per-repetition ratios (format
rate / raw rate, paired within a repetition). Benchmarks report; they never fail on a
threshold. The target (issue 5) is printed next to the figures: the format at
>= 0.8 x raw AES-GCM throughput.

Then the S3 PutObject upload through the proxy (``proxy_upload``; ``--no-upload`` skips
it), reusing bench/upload_stream.py's discarding sink and memory sampler and
bench/proxy_overhead.py's mitmdump and identity plumbing (the process pinning is undone
first). One casb process (``mitmdump -s addons/casb.py`` with the options ``casb proxy``
sets, fresh per object size) with one loopback reverse listener (``allow_plaintext``) and
two S3 destinations on the same sink, both SigV4-signed by the proxy: ``plain`` (the
client's ``x-amz-server-side-encryption: AES256`` meets the at-rest rule) and ``sealed``
(envelope encryption, a keyring made with ``create_keyring_file``, 1 MiB chunks). The
client (httpx) PUTs ``--upload-size`` objects (default 200 MB and 2 GB; quick 200 MB) with
a Content-Length, the body the same random 1 MiB piece over and over. After a 32 MB
warm-up per destination, ``--upload-runs`` (default 5; quick 3) runs per destination,
interleaved, the order alternating per round. Each run: MB/s (object bytes / wall time to
the response), proxy CPU seconds per GB (/proc/PID/stat), VmHWM (reset through
/proc/PID/clear_refs before the upload) and its growth over VmRSS before. Every run must be
answered 200 with the store's ETag, the sink must get exactly the plaintext length (plain)
or length + 16 x ceil(length / chunk) (sealed), plaintext only for plain, and an audit
record per request: anything else stops the benchmark. Last, per size, a fresh process
that only ever takes sealed uploads gives the memory figure free of plain uploads' residue.
Writes ``envelope.md`` too. Target (issue 5): sealed >= 0.9 x plain MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from proxy_overhead import (  # noqa: E402  (shared helpers and the proxy-process plumbing)
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
from upload_stream import (  # noqa: E402  (the discarding sink, memory sampling, sizes)
    CLK_TCK,
    HEAD_SAMPLE,
    IO_TIMEOUT_S,
    Received,
    RssSampler,
    Upstream,
    parse_size,
    size_label,
)

from casb.audit.checkpoint import write_keypair  # noqa: E402
from casb.encryption.envelope import (  # noqa: E402
    EnvelopeHeader,
    ciphertext_length,
    new_object,
    open_object,
)
from casb.encryption.keyring import LocalKeyring  # noqa: E402

MiB = 1024 * 1024
CHUNK = MiB  # the format's chunk size (casb's default envelope.chunk_bytes)
PIECE = 64 * 1024  # what the proxy hands over per body chunk
TARGET_RATIO = 0.8
RAW_AAD = b"casb-bench-envelope"


@dataclass
class Rig:
    """The data and everything each variant reads, built once."""

    data: bytes
    pieces: list[bytes]  # data in PIECE-sized bytes objects
    keyring: LocalKeyring
    header: EnvelopeHeader  # of the sealed body below
    sealed_pieces: list[bytes]  # the sealed body in PIECE-sized bytes objects
    raw_key: bytes
    raw_ciphertext: bytes  # raw AES-GCM of data, 1 MiB pieces, each + 16-byte tag


def _nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")


def _buf(view: memoryview) -> bytes:
    return cast(bytes, view)  # AESGCM reads any buffer; its stubs say bytes


def _pieces(buf: bytes, size: int) -> list[bytes]:
    return [buf[i : i + size] for i in range(0, len(buf), size)]


def build_rig(size: int) -> Rig:
    data = os.urandom(size)
    keyring = LocalKeyring("bench-kek", {"bench-kek": os.urandom(32)})
    pieces = _pieces(data, PIECE)
    header, sealer = new_object(keyring, size, CHUNK)
    sealed = bytearray()
    for piece in pieces:
        for out in sealer.feed(piece):
            sealed += out
    for out in sealer.finish():
        sealed += out
    if len(sealed) != ciphertext_length(size, CHUNK):
        raise BenchError(f"sealed body is {len(sealed)} bytes, expected the format's length")
    raw_key = os.urandom(32)
    aead = AESGCM(raw_key)
    view = memoryview(data)
    raw = b"".join(
        aead.encrypt(_nonce(i), _buf(view[pos : pos + CHUNK]), RAW_AAD)
        for i, pos in enumerate(range(0, size, CHUNK))
    )
    return Rig(data, pieces, keyring, header, _pieces(bytes(sealed), PIECE), raw_key, raw)


# -- the variants (each returns a digest of its output only when asked, for the checks) --


def format_encrypt(rig: Rig, check: bool) -> str:
    header, sealer = new_object(rig.keyring, len(rig.data), CHUNK)
    kept: list[bytes] | None = [] if check else None
    for piece in rig.pieces:
        out = sealer.feed(piece)
        if kept is not None:
            kept += out
    out = sealer.finish()
    if kept is None:
        return ""
    kept += out
    if sum(map(len, kept)) != header.ciphertext_length:
        raise BenchError("format encrypt: the body has the wrong length")
    opener = open_object(rig.keyring, header)
    digest = hashlib.sha256()
    for plain in [*opener.feed(b"".join(kept)), *opener.finish()]:
        digest.update(plain)
    return digest.hexdigest()


def raw_encrypt(rig: Rig, check: bool) -> str:
    aead = AESGCM(rig.raw_key)
    view = memoryview(rig.data)
    total = 0
    for i, pos in enumerate(range(0, len(rig.data), CHUNK)):
        total += len(aead.encrypt(_nonce(i), _buf(view[pos : pos + CHUNK]), RAW_AAD))
    return str(total) if check else ""


def format_decrypt(rig: Rig, check: bool) -> str:
    opener = open_object(rig.keyring, rig.header)
    digest = hashlib.sha256() if check else None
    for piece in rig.sealed_pieces:
        out = opener.feed(piece)
        if digest is not None:
            for plain in out:
                digest.update(plain)
    opener.finish()
    return digest.hexdigest() if digest is not None else ""


def raw_decrypt(rig: Rig, check: bool) -> str:
    aead = AESGCM(rig.raw_key)
    view = memoryview(rig.raw_ciphertext)
    digest = hashlib.sha256() if check else None
    step = CHUNK + 16
    for i, pos in enumerate(range(0, len(view), step)):
        plain = aead.decrypt(_nonce(i), _buf(view[pos : pos + step]), RAW_AAD)
        if digest is not None:
            digest.update(plain)
    return digest.hexdigest() if digest is not None else ""


Variant = tuple[str, str, Callable[[Rig, bool], str]]
VARIANTS: list[Variant] = [
    ("format encrypt", "raw encrypt", format_encrypt),
    ("raw encrypt", "raw encrypt", raw_encrypt),
    ("format decrypt", "raw decrypt", format_decrypt),
    ("raw decrypt", "raw decrypt", raw_decrypt),
]
DESCRIPTIONS = {
    "format encrypt": "new_object + Sealer.feed, 64 KiB pieces, 1 MiB chunks",
    "raw encrypt": "AESGCM.encrypt, 1 MiB pieces",
    "format decrypt": "open_object + Opener.feed, 64 KiB pieces, 1 MiB chunks",
    "raw decrypt": "AESGCM.decrypt, 1 MiB + 16 pieces",
}


def warm_up_and_check(rig: Rig) -> None:
    expected = hashlib.sha256(rig.data).hexdigest()
    if format_encrypt(rig, True) != expected:
        raise BenchError("format encrypt: the body does not open to the data")
    raw_encrypt(rig, True)
    if format_decrypt(rig, True) != expected:
        raise BenchError("format decrypt: the plaintext differs from the data")
    if raw_decrypt(rig, True) != expected:
        raise BenchError("raw decrypt: the plaintext differs from the data")


def measure(rig: Rig, reps: int) -> dict[str, list[float]]:
    """Seconds per pass, per variant, one entry per repetition."""
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    size = len(rig.data)
    for rep in range(reps):
        shift = rep % len(VARIANTS)
        for name, _, run in [*VARIANTS[shift:], *VARIANTS[:shift]]:
            t0 = time.perf_counter()
            run(rig, False)
            seconds[name].append(time.perf_counter() - t0)
        print(
            f"rep {rep + 1}/{reps}: "
            + ", ".join(f"{name} {size / s[-1] / 1e6:,.0f} MB/s" for name, s in seconds.items()),
            file=sys.stderr,
        )
    return seconds


def summarise(seconds: dict[str, list[float]], size: int) -> list[dict[str, Any]]:
    rows = []
    for name, ref, _ in VARIANTS:
        rates = [size / s / 1e6 for s in seconds[name]]
        ratio = statistics.median(
            theirs / mine for mine, theirs in zip(seconds[name], seconds[ref], strict=True)
        )
        rows.append(
            {
                "variant": name,
                "description": DESCRIPTIONS[name],
                "mb_per_s": statistics.median(rates),
                "min_mb_per_s": min(rates),
                "max_mb_per_s": max(rates),
                "reference": ref,
                "x_raw": ratio,
                "target_x_raw": None if name == ref else TARGET_RATIO,
                "target_met": None if name == ref else ratio >= TARGET_RATIO,
                "per_rep_mb_per_s": rates,
            }
        )
    return rows


HEADERS = ["variant", "MB/s", "min", "max", "x raw", "what"]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["variant"],
            _fmt(r["mb_per_s"], ",.0f"),
            _fmt(r["min_mb_per_s"], ",.0f"),
            _fmt(r["max_mb_per_s"], ",.0f"),
            _fmt(r["x_raw"], ".2f"),
            r["description"],
        ]
        for r in rows
    ]


# -- the S3 upload through the proxy, with and without envelope encryption -----------------

UPLOAD_SIZES = (200 * 10**6, 2 * 10**9)  # decimal, as upload_stream.py
WARM_BYTES = 32 * 10**6  # one warm-up upload per destination on a fresh proxy
UPLOAD_DESTINATIONS = ("plain", "sealed")
UPLOAD_ROLE = "radiologist"  # the role make_identity's token carries
UPLOAD_RULE = "bench-store-objects"
BUCKET = "bucket"
S3_SECRET_ENV = "BENCH_S3_SECRET"
TAG = 16  # AES-GCM tag per sealed chunk
TARGET_UPLOAD_RATIO = 0.9
# What the sink answers every PUT: an S3 PutObject success.
SINK_ETAG = '"0123456789abcdef0123456789abcdef"'
S3_PUT_ANSWER = (
    b"HTTP/1.1 200 OK\r\n"
    b"ETag: " + SINK_ETAG.encode() + b"\r\n"
    b"x-amz-request-id: casb-bench\r\n"
    b"Server: AmazonS3\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def expected_upstream_bytes(destination: str, length: int) -> int:
    """What the store must receive: the plaintext, or the format's ciphertext (one 16-byte
    tag per chunk). Cross-checked against casb's own ciphertext_length."""
    if destination == "plain":
        return length
    sealed = length + TAG * -(-length // CHUNK)
    if sealed != ciphertext_length(length, CHUNK):
        raise BenchError("casb's ciphertext_length disagrees with length + 16 x chunks")
    return sealed


def write_upload_policy(workdir: Path) -> Path:
    import yaml

    policy = {
        "version": 1,
        "description": "bench/envelope.py: object uploads to both bench destinations",
        "roles": {UPLOAD_ROLE: {"description": "the benchmark's uploader"}},
        "rules": [
            {
                "id": UPLOAD_RULE,
                "description": "PUT objects to the plain and the envelope-encrypted bucket",
                "effect": "allow",
                "roles": [UPLOAD_ROLE],
                "actions": ["store"],
                "destinations": list(UPLOAD_DESTINATIONS),
            }
        ],
    }
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def write_upload_config(
    workdir: Path, listen: int, sink: int, jwks: Path, policy: Path, keyring: Path
) -> tuple[Path, Path]:
    """casb.yaml: one reverse listener, `plain` and `sealed` S3 destinations on the sink."""
    import yaml

    plain = {
        "kind": "s3",
        "upstream": f"http://127.0.0.1:{sink}",
        "route": "/plain",
        "allow_plaintext": True,
        "upstream_auth": {
            "type": "aws_sigv4",
            "access_key_id": "bench",
            "secret_access_key_env": S3_SECRET_ENV,
        },
    }
    sealed = {**plain, "route": "/sealed", "envelope": {"keyring_file": str(keyring)}}
    audit = workdir / "audit.jsonl"
    signing = workdir / "audit-signing.pem"  # production signs audit checkpoints
    write_keypair(signing, workdir / "audit-signing.pub.pem")
    config = {
        "environment": "production",
        "state_dir": str(workdir),
        "listeners": [
            {"mode": "reverse", "host": "127.0.0.1", "port": listen, "allow_plaintext": True}
        ],
        "destinations": {"plain": plain, "sealed": sealed},
        "identity": {"issuer": ISSUER, "audience": [AUDIENCE], "jwks_file": str(jwks)},
        "policy": {"paths": [str(policy)]},
        "audit": {"path": str(audit), "checkpoints": {"signing_key_file": str(signing)}},
    }
    path = workdir / "casb.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, audit


def casb_proxy_options(config: Path) -> list[str]:
    """The mitmproxy options `casb proxy` sets from this config (casb.serve), as --set
    arguments; mode, confdir and connection_strategy (lazy) are set by Mitmdump."""
    from casb.config import load_settings
    from casb.serve import mitmproxy_options

    out = []
    for name, value in mitmproxy_options(load_settings(config)).items():
        if name in ("mode", "confdir", "connection_strategy"):
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"{name}={text}"]
    return out


def object_body(length: int, piece: bytes) -> Iterator[bytes]:
    """`length` bytes as the same `piece` again and again (the last one cut short)."""
    left = length
    while left >= len(piece):
        yield piece
        left -= len(piece)
    if left:
        yield piece[:left]


def reset_vmhwm(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of a process (proc(5) clear_refs, value 5), so
    VmHWM covers one upload on a long-lived proxy. False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def last_audit_record(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64 * 1024))
        return cast(dict[str, Any], json.loads(fh.read().splitlines()[-1]))


@dataclass
class UploadRun:
    round: int
    destination: str
    size: int
    upstream_bytes: int
    status: int
    etag: str | None  # what the client got back
    seconds: float
    mb_per_s: float
    proxy_cpu_s: float
    proxy_cpu_s_per_gb: float
    proxy_cpu_pct: float
    rss_before_mb: float
    peak_rss_mb: float  # max of the 20 ms VmRSS samples
    vmhwm_mb: float  # VmHWM after the upload (reset right before it when vmhwm_reset)
    vmhwm_growth_mb: float  # VmHWM - VmRSS before: what this upload added at its peak
    vmhwm_reset: bool
    audit_envelope: str | None


class UploadRig:
    """The sink, one casb process (fresh per size) and the client."""

    def __init__(self, workdir: Path, extra: Sequence[str]) -> None:
        self.workdir = workdir
        self.extra = list(extra)
        self.sink = Upstream(S3_PUT_ANSWER)
        self.piece = os.urandom(MiB)
        self.token = ""
        self.jwks = workdir / "jwks.json"
        self.policy = workdir / "policy.yaml"
        self.keyring = workdir / "keyring.yaml"
        self.proxy: Mitmdump | None = None
        self.audit = workdir / "audit.jsonl"
        self.requests = 0  # sent to the current proxy (one audit record each)
        self.objects = 0
        self.options: list[str] = []

    def start(self) -> None:
        from casb.encryption.keyring import create_keyring_file

        os.environ.setdefault(S3_SECRET_ENV, "casb-bench-s3-secret-not-a-secret")
        self.sink.start()
        self.jwks, self.token = make_identity(self.workdir)
        self.policy = write_upload_policy(self.workdir)
        create_keyring_file(self.keyring)

    def stop(self) -> None:
        self.stop_proxy()
        self.sink.stop()

    def new_proxy(self, label: str) -> Mitmdump:
        self.stop_proxy()
        workdir = self.workdir / label
        workdir.mkdir(parents=True)
        config = workdir / "casb.yaml"
        proxy = Mitmdump(
            "casb",
            workdir,
            self.sink.port,
            extra=["-s", str(ADDON), "--set", f"casb_config={config}"],
        )
        _, self.audit = write_upload_config(
            workdir, proxy.port, self.sink.port, self.jwks, self.policy, self.keyring
        )
        self.options = casb_proxy_options(config)
        proxy.argv += [*self.options, *self.extra]
        self.proxy = proxy
        self.requests = 0
        proxy.start()
        proxy.wait_ready()
        return proxy

    def stop_proxy(self) -> None:
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            proxy.stop()

    def put(
        self, client: Any, destination: str, length: int
    ) -> tuple[int, str | None, float, Received]:
        """PUT one object through the proxy; (status, ETag, seconds, what the sink got)."""
        assert self.proxy is not None
        self.objects += 1
        self.requests += 1
        self.sink.drain()
        url = f"http://127.0.0.1:{self.proxy.port}/{destination}/{BUCKET}/obj-{self.objects}"
        headers = {
            "Authorization": f"Bearer {self.token}",
            "x-amz-server-side-encryption": "AES256",
            "Content-Length": str(length),
            "Content-Type": "application/octet-stream",
        }
        t0 = time.perf_counter()
        resp = client.put(url, headers=headers, content=object_body(length, self.piece))
        seconds = time.perf_counter() - t0
        if resp.status_code != 200:
            raise BenchError(
                f"{destination}: PUT of {length:,} bytes answered {resp.status_code}: "
                f"{resp.text[:300]}\n{self.proxy.log_tail()}"
            )
        got = self.sink.received()
        self.check(destination, length, got)
        if resp.headers.get("etag") != SINK_ETAG:
            raise BenchError(f"{destination}: the answer lacks the store's ETag")
        return resp.status_code, resp.headers.get("etag"), seconds, got

    def check(self, destination: str, length: int, got: Received) -> None:
        """Fail loudly unless the store got the right object: the path, framing and byte
        count, plaintext for `plain` and not for `sealed`."""
        assert self.proxy is not None
        want = expected_upstream_bytes(destination, length)
        problems = []
        if got.body_bytes != want:
            problems.append(f"the sink received {got.body_bytes:,} bytes, expected {want:,}")
        if got.path != f"/{BUCKET}/obj-{self.objects}":
            problems.append(f"the sink was asked for {got.path!r}")
        if got.framing != "content-length":
            problems.append(f"the body reached the sink {got.framing or 'unframed'}")
        sample = self.piece[: min(HEAD_SAMPLE, length)]
        if destination == "plain" and got.head != sample:
            problems.append("the plain object's first bytes differ from what was sent")
        if destination == "sealed" and self.piece[:64] in got.head:
            problems.append("the sealed object's first bytes hold plaintext")
        if problems:
            raise BenchError(
                f"{destination} {size_label(length)}: "
                + "; ".join(problems)
                + "\n"
                + self.proxy.log_tail()
            )

    def audited(self, destination: str) -> str | None:
        """Wait for the proxy's audit record of the last request and check it; its
        `envelope` field."""
        deadline = time.monotonic() + 5
        while audit_lines(self.audit) < self.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        if audit_lines(self.audit) != self.requests:
            raise BenchError(f"{destination}: the upload was not audited")
        rec = last_audit_record(self.audit)
        envelope = rec.get("envelope")
        ok = (
            rec.get("destination") == destination
            and rec.get("decision") == "allow"
            and rec.get("status") == 200
            and envelope == ("encrypted" if destination == "sealed" else None)
        )
        if not ok:
            raise BenchError(f"{destination}: unexpected audit record: {rec}")
        return cast(str | None, envelope)

    def measure(self, client: Any, rnd: int, destination: str, length: int) -> UploadRun:
        assert self.proxy is not None
        pid = self.proxy.pid
        reset = reset_vmhwm(pid)
        sampler = RssSampler(pid)
        sampler.sample()
        rss_before_kb = sampler.peak_rss_kb
        cpu0 = cpu_ticks(pid)
        sampler.start()
        try:
            status, etag, seconds, got = self.put(client, destination, length)
        finally:
            sampler.finish()
        cpu = (cpu_ticks(pid) - cpu0) / CLK_TCK
        return UploadRun(
            round=rnd,
            destination=destination,
            size=length,
            upstream_bytes=got.body_bytes,
            status=status,
            etag=etag,
            seconds=seconds,
            mb_per_s=length / seconds / 1e6,
            proxy_cpu_s=cpu,
            proxy_cpu_s_per_gb=cpu / (length / 1e9),
            proxy_cpu_pct=100 * cpu / seconds,
            rss_before_mb=rss_before_kb / 1024,
            peak_rss_mb=sampler.peak_rss_kb / 1024,
            vmhwm_mb=sampler.hwm_kb / 1024,
            vmhwm_growth_mb=(sampler.hwm_kb - rss_before_kb) / 1024,
            vmhwm_reset=reset,
            audit_envelope=self.audited(destination),
        )


def print_upload_run(run: UploadRun, rounds: int) -> None:
    print(
        (f"round {run.round}/{rounds}" if rounds else "sealed only")
        + f" {size_label(run.size):>7} {run.destination:6} "
        f"{run.mb_per_s:7,.1f} MB/s  {run.seconds:6.2f} s  proxy CPU "
        f"{run.proxy_cpu_s_per_gb:5.2f} s/GB ({run.proxy_cpu_pct:3.0f}%)  VmHWM "
        f"{run.vmhwm_mb:7.1f} MB  upstream {run.upstream_bytes:,} bytes",
        file=sys.stderr,
    )


UPLOAD_METRICS = (
    "mb_per_s",
    "seconds",
    "proxy_cpu_s_per_gb",
    "proxy_cpu_pct",
    "rss_before_mb",
    "peak_rss_mb",
    "vmhwm_mb",
    "vmhwm_growth_mb",
)


def summarise_uploads(runs: Sequence[UploadRun], sizes: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for size in sizes:
        at = [r for r in runs if r.size == size]
        entry: dict[str, Any] = {"size": size, "destinations": {}}
        for d in UPLOAD_DESTINATIONS:
            rs = [r for r in at if r.destination == d]
            entry["destinations"][d] = {
                **{m: statistics.median(getattr(r, m) for r in rs) for m in UPLOAD_METRICS},
                "min_mb_per_s": min(r.mb_per_s for r in rs),
                "max_mb_per_s": max(r.mb_per_s for r in rs),
                "max_vmhwm_mb": max(r.vmhwm_mb for r in rs),
                "max_vmhwm_growth_mb": max(r.vmhwm_growth_mb for r in rs),
                "upstream_bytes": rs[0].upstream_bytes,
                "runs": len(rs),
            }
        pairs = [
            (p, s)
            for rnd in sorted({r.round for r in at})
            for p in at
            if p.round == rnd and p.destination == "plain"
            for s in at
            if s.round == rnd and s.destination == "sealed"
        ]
        ratios = [s.mb_per_s / p.mb_per_s for p, s in pairs]
        cpu_ratios = [s.proxy_cpu_s_per_gb / p.proxy_cpu_s_per_gb for p, s in pairs]
        entry["sealed_over_plain_mb_per_s"] = statistics.median(ratios)
        entry["ratio_per_round"] = ratios
        entry["sealed_over_plain_cpu_per_gb"] = statistics.median(cpu_ratios)
        entry["target_ratio"] = TARGET_UPLOAD_RATIO
        entry["target_met"] = entry["sealed_over_plain_mb_per_s"] >= TARGET_UPLOAD_RATIO
        out.append(entry)
    return out


UPLOAD_HEADERS = [
    "object",
    "plain MB/s",
    "sealed MB/s",
    "sealed/plain",
    "plain CPU s/GB",
    "sealed CPU s/GB",
    "plain VmHWM MB",
    "sealed VmHWM MB",
    "plain growth MB",
    "sealed growth MB",
    "upstream bytes plain / sealed",
]


def upload_table_rows(summary: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for e in summary:
        p, s = e["destinations"]["plain"], e["destinations"]["sealed"]
        rows.append(
            [
                size_label(e["size"]),
                _fmt(p["mb_per_s"], ",.1f"),
                _fmt(s["mb_per_s"], ",.1f"),
                _fmt(e["sealed_over_plain_mb_per_s"], ".3f"),
                _fmt(p["proxy_cpu_s_per_gb"], ".2f"),
                _fmt(s["proxy_cpu_s_per_gb"], ".2f"),
                _fmt(p["vmhwm_mb"], ",.1f"),
                _fmt(s["vmhwm_mb"], ",.1f"),
                _fmt(p["vmhwm_growth_mb"], ",.1f"),
                _fmt(s["vmhwm_growth_mb"], ",.1f"),
                f"{p['upstream_bytes']:,} / {s['upstream_bytes']:,}",
            ]
        )
    return rows


def upload_lines(upload: dict[str, Any]) -> list[str]:
    """Per size: the ratio per round and the MB/s spread, the memory against size."""
    summary = upload["summary"]
    lines = [
        f"{size_label(e['size'])}: sealed/plain MB/s per round "
        + ", ".join(f"{x:.3f}" for x in e["ratio_per_round"])
        + f" (target >= {TARGET_UPLOAD_RATIO}: {'met' if e['target_met'] else 'NOT met'}); "
        f"MB/s range plain {e['destinations']['plain']['min_mb_per_s']:,.1f}-"
        f"{e['destinations']['plain']['max_mb_per_s']:,.1f}, sealed "
        f"{e['destinations']['sealed']['min_mb_per_s']:,.1f}-"
        f"{e['destinations']['sealed']['max_mb_per_s']:,.1f}; CPU/GB sealed/plain "
        f"{e['sealed_over_plain_cpu_per_gb']:.3f}"
        for e in summary
    ]
    lines.append(
        "sealed only (a fresh process, one 32 MB warm-up, then one upload): VmHWM "
        + ", ".join(
            f"{r['vmhwm_mb']:,.1f} MB at {size_label(r['size'])}" for r in upload["sealed_only"]
        )
    )
    big = summary[-1]
    if big["destinations"]["plain"]["vmhwm_growth_mb"] * MiB > big["size"] / 2:
        lines.append(
            "plain uploads are held whole in the proxy's memory: with the options `casb "
            "proxy` sets (no stream_large_bodies), mitmproxy buffers a request body the addon "
            "does not stream itself, while sealed bodies stream through the Sealer; the "
            "ratio then compares store-and-forward (plain) with streaming (sealed)"
        )
    if len(summary) > 1:
        small, large = summary[0], summary[-1]
        for d in UPLOAD_DESTINATIONS:
            a = small["destinations"][d]["max_vmhwm_growth_mb"]
            b = large["destinations"][d]["max_vmhwm_growth_mb"]
            lines.append(
                f"{d}: largest VmHWM growth in one upload at {size_label(large['size'])} vs "
                f"{size_label(small['size'])}: {b:,.1f} vs {a:,.1f} MB"
            )
    return lines


def proxy_upload(args: argparse.Namespace) -> dict[str, Any] | None:
    """S3 PutObject through one casb process to two destinations on the same discarding
    sink, `plain` (SSE header, no envelope) and `sealed` (envelope encryption, 1 MiB
    chunks): MB/s, proxy CPU per GB and the proxy's peak memory. None with --no-upload."""
    if args.no_upload:
        return None
    import httpx

    if not MITMDUMP.exists():
        raise BenchError(f"{MITMDUMP} not found: run from the project venv (.venv/bin/python)")
    sizes: list[int] = args.upload_size
    rounds: int = args.upload_runs
    extra = [a for opt in args.casb_set for a in ("--set", opt)]
    runs: list[UploadRun] = []
    probes: list[UploadRun] = []
    options: list[str] = []
    with tempfile.TemporaryDirectory(prefix="casb-bench-envelope-") as tmp:
        rig = UploadRig(Path(tmp), extra)
        try:
            rig.start()
            for size in sizes:
                rig.new_proxy(f"proxy-{size}")
                options = rig.options
                timeout = httpx.Timeout(IO_TIMEOUT_S)
                with httpx.Client(timeout=timeout) as client:
                    for d in UPLOAD_DESTINATIONS:  # a fresh process is slower at first
                        rig.put(client, d, WARM_BYTES)
                        rig.audited(d)
                    for rnd in range(1, rounds + 1):
                        order = UPLOAD_DESTINATIONS if rnd % 2 else UPLOAD_DESTINATIONS[::-1]
                        for d in order:
                            run = rig.measure(client, rnd, d, size)
                            runs.append(run)
                            print_upload_run(run, rounds)
                rig.stop_proxy()
            for size in sizes:  # memory of a process that never buffered a plain upload
                rig.new_proxy(f"sealed-only-{size}")
                with httpx.Client(timeout=httpx.Timeout(IO_TIMEOUT_S)) as client:
                    rig.put(client, "sealed", WARM_BYTES)
                    rig.audited("sealed")
                    run = rig.measure(client, 0, "sealed", size)
                print_upload_run(run, 0)
                probes.append(run)
                rig.stop_proxy()
        finally:
            rig.stop()
    return {
        "config": {
            "sizes": sizes,
            "runs_per_destination": rounds,
            "warm_up_bytes": WARM_BYTES,
            "client": f"httpx {_version('httpx')} PUT, Content-Length, 1 MiB pieces",
            "chunk_bytes": CHUNK,
            "sse_header": "AES256",
            "upstream_auth": "aws_sigv4",
            "mitmproxy": _version("mitmproxy"),
            "casb_options": [
                "-s addons/casb.py",
                "casb_config=<generated>",
                *(o for o in options if o != "--set"),
                *extra,
            ],
            "target_sealed_over_plain": TARGET_UPLOAD_RATIO,
        },
        "summary": summarise_uploads(runs, sizes),
        "runs": [asdict(r) for r in runs],
        "sealed_only": [asdict(r) for r in probes],
    }


def pin_one_core() -> int | None:
    """Pin this process to one CPU (the last one it may use); None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    return cpus[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--size", type=int, default=None, help="MiB of data (default 256; quick 64)"
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="timed passes per variant (default 9; quick 3)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    parser.add_argument(
        "--upload-size",
        type=parse_size,
        action="append",
        default=None,
        help="proxy upload object size, e.g. 200M or 2G (decimal; repeatable; default 200M "
        "and 2G; quick 200M)",
    )
    parser.add_argument(
        "--upload-runs",
        type=int,
        default=None,
        help="proxy uploads per destination and size (default 5; quick 3)",
    )
    parser.add_argument(
        "--casb-set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="extra mitmproxy option for the proxy in the upload runs (repeatable)",
    )
    parser.add_argument(
        "--no-upload", action="store_true", help="the micro benchmark only (no proxy upload)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 MiB, 3 reps; proxy upload 200M x 3; writes results only with --out",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results)"
    )
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 64 if args.quick else 256
    if args.reps is None:
        args.reps = 3 if args.quick else 9
    if args.upload_size is None:
        args.upload_size = list(UPLOAD_SIZES[:1] if args.quick else UPLOAD_SIZES)
    if args.upload_runs is None:
        args.upload_runs = 3 if args.quick else 5
    if args.size < 1 or args.reps < 1 or args.upload_runs < 1:
        parser.error("--size, --reps and --upload-runs must be positive")
    if any(n < 1 for n in args.upload_size):
        parser.error("--upload-size must be positive")
    out: Path | None = args.out
    if out is None and not args.quick:
        out = REPO / "bench" / "results"
    command = " ".join(
        [
            ".venv/bin/python bench/envelope.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    ).strip()

    load_at_start = os.getloadavg()
    all_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pinned = None if args.no_pin else pin_one_core()
    size = args.size * MiB
    t0 = time.perf_counter()
    rig = build_rig(size)
    print(f"built {args.size} MiB of data in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    warm_up_and_check(rig)
    print("warm-up done; every variant checked", file=sys.stderr)
    seconds = measure(rig, args.reps)
    rows = summarise(seconds, size)
    del rig
    if all_cpus is not None:  # the proxy, the sink and the client use every CPU
        os.sched_setaffinity(0, all_cpus)
    upload = proxy_upload(args)

    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "cryptography": _version("cryptography"),
        "openssl": _openssl_version(),
        "mitmproxy": _version("mitmproxy"),
        "httpx": _version("httpx"),
        "casb": _version("casb"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "pinned_cpu": pinned,
        "platform": platform.platform(),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
        "config": {
            "size_mib": args.size,
            "reps": args.reps,
            "quick": args.quick,
            "chunk_bytes": CHUNK,
            "piece_bytes": PIECE,
        },
        "targets": {"format_x_raw": TARGET_RATIO, "upload_sealed_over_plain": TARGET_UPLOAD_RATIO},
    }

    print()
    print(
        f"Envelope throughput, {meta['cpu']} ({meta['nproc']} CPUs, pinned to "
        f"{pinned if pinned is not None else 'none'}), Python {meta['python']}, cryptography "
        f"{meta['cryptography']} ({meta['openssl']}); {args.size} MiB, median of "
        f"{args.reps} passes"
    )
    print(text_table(HEADERS, table_rows(rows), text_last=True))
    print(f"target (issue 5): the format >= {TARGET_RATIO} x raw AES-GCM throughput")
    if upload is not None:
        print()
        print(
            f"S3 PUT through casb (mitmproxy {meta['mitmproxy']}), plain vs envelope-sealed, "
            f"median of {args.upload_runs} interleaved runs"
        )
        print(text_table(UPLOAD_HEADERS, upload_table_rows(upload["summary"])))
        for line in upload_lines(upload):
            print(line)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "results": rows, "proxy_upload": upload}
        (out / "envelope.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "envelope.md").write_text(markdown(rows, upload, meta))
        print(f"\nwrote {out / 'envelope.json'} and {out / 'envelope.md'}")
    return 0


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def markdown(
    rows: list[dict[str, Any]], upload: dict[str, Any] | None, meta: dict[str, Any]
) -> str:
    cfg = meta["config"]
    lines = [
        "# Envelope encryption benchmark",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- CPU: {meta['cpu']} ({meta['nproc']} CPUs), {meta['platform']}; load average at "
        "start "
        + " ".join(f"{x:.2f}" for x in meta["loadavg_at_start"])
        + ", at end "
        + " ".join(f"{x:.2f}" for x in meta["loadavg_at_end"]),
        f"- Python {meta['python']}, cryptography {meta['cryptography']} ({meta['openssl']}), "
        f"mitmproxy {meta['mitmproxy']}, httpx {meta['httpx']}, casb {meta['casb']}",
        "- MB = 10^6 bytes",
        "",
        f"## The format vs raw AES-256-GCM ({cfg['size_mib']} MiB in memory, one process "
        f"pinned to CPU {meta['pinned_cpu']}, median of {cfg['reps']} passes)",
        "",
        *_md_table(HEADERS, table_rows(rows)),
        "",
        f"Target (issue 5): the format >= {TARGET_RATIO} x raw AES-GCM throughput.",
    ]
    if upload is not None:
        ucfg = upload["config"]
        lines += [
            "",
            "## S3 PutObject through the proxy: plain vs envelope-sealed",
            "",
            f"One casb process per object size (`mitmdump {' '.join(ucfg['casb_options'])}`), "
            "two S3 destinations on the same discarding sink: `plain` (client sends "
            "`x-amz-server-side-encryption: AES256`) and `sealed` (envelope, "
            f"{ucfg['chunk_bytes'] // MiB} MiB chunks); both SigV4-signed by the proxy. "
            f"Client: {ucfg['client']}. After a {ucfg['warm_up_bytes'] // 10**6} MB warm-up "
            f"per destination, {ucfg['runs_per_destination']} runs per destination, "
            "interleaved (plain/sealed order alternating); medians, ratio paired per round. "
            "Client, proxy and sink share the CPUs.",
            "",
            *_md_table(UPLOAD_HEADERS, upload_table_rows(upload["summary"])),
            "",
            *(f"- {line}" for line in upload_lines(upload)),
            f"- target: sealed >= {TARGET_UPLOAD_RATIO} x plain MB/s.",
            "- VmHWM: the proxy's peak resident set during one upload (reset through "
            "/proc/PID/clear_refs before each); growth: VmHWM - VmRSS right before the upload "
            "(one process serves both destinations, so VmHWM alone carries what earlier "
            "uploads left behind); proxy CPU from /proc/PID/stat utime+stime.",
            "- checked every run: 200 carrying the sink's ETag; the sink got the object's "
            "path and a Content-Length body of exactly the plaintext length (plain) or "
            "length + 16 x ceil(length / chunk) (sealed), plaintext for plain and not for "
            "sealed; one audit record (envelope: encrypted for sealed, none for plain).",
        ]
    lines.append("")
    return "\n".join(lines)


def _openssl_version() -> str:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        return str(backend.openssl_version_text())
    except Exception:  # a report field only
        return "unknown"


if __name__ == "__main__":
    # Stop the proxy and the sink cleanly on Ctrl-C or a plain `kill` (see proxy_overhead).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"envelope bench: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("envelope bench: interrupted; servers stopped", file=sys.stderr)
        raise SystemExit(130) from None
