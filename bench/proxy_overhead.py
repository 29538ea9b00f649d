"""What casb costs per request, versus bare mitmdump and a direct connection.

Run: ``.venv/bin/python bench/proxy_overhead.py`` (``--help`` for options; also from
``make bench``). Everything runs on 127.0.0.1, on free ports, started here and stopped
at the end (also on Ctrl-C or an exception):

* upstream: a minimal asyncio HTTP/1.1 server (keep-alive, answers any request with
  ``200`` and the body ``[]``), in its own process so it shares no GIL with the load
  generator. It is far faster than mitmdump, so it is never the bottleneck.
* ``direct``: the load generator talks straight to the upstream.
* ``mitmdump``: bare ``mitmdump --mode reverse:...`` (no addon).
* ``casb``: ``mitmdump -s addons/casb.py`` with a generated casb.yaml: production
  environment, identity from a JWKS *file* (an RS256 key generated here), destination
  ``pacs`` -> ``http://127.0.0.1:UP/dicom-web`` (plus ``research``, unused, because
  ``policies/hospital.yaml`` names it and the policy loader refuses unknown
  destinations), the JSONL audit log in a temporary directory.

Requests: ``GET /pacs/studies?ModalitiesInStudy=CT`` with ``Authorization: Bearer
<token>`` (roles=[radiologist], allowed by ``radiologist-read``) to casb; the same path
as the upstream sees it, ``/dicom-web/studies?ModalitiesInStudy=CT``, with the same
header (ignored) to ``direct`` and ``mitmdump``, so the upstream work is identical. One
token is reused, so casb verifies its signature once and then hits its token cache: the
figures are casb's warm path.

Method: the load generator runs in this process (no server shares it) with raw asyncio
streams: ``--concurrency`` keep-alive HTTP/1.1 connections, each sending its requests
one after the other (closed loop), timing each with ``time.perf_counter_ns``. Each
round runs direct, mitmdump and casb one after the other (a short unmeasured warm-up
first), so machine drift hits all three alike; every figure reported is the median over
``--rounds`` rounds, and ratios are paired within a round before taking the median.
The proxy's CPU is read from ``/proc/PID/stat`` (utime + stime, all threads) before and
after each measured run: CPU ms per request is the steadiest figure on a small, noisy
machine, and casb - mitmdump is what the addon adds. Non-200 answers are errors (there
must be none); after every casb run the audit log must hold one record per request sent.

Under load, p50 is mostly queueing (N connections on a saturated, single-threaded proxy
wait about N x its CPU time per request), so each round also runs every variant over one
connection (``--latency-requests``): the latency one request pays without queueing.

``--profile FILE`` adds one more casb run under ``python -m cProfile`` (a separate
instance; its figures are not reported) and prints casb's own functions on the request
path by cumulative time, and the library calls they make.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing
import os
import platform
import pstats
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
POLICY = REPO / "policies" / "hospital.yaml"
ADDON = REPO / "addons" / "casb.py"

ISSUER = "https://idp.bench.test/realms/imaging"
AUDIENCE = "casb"
KID = "casb-bench-rs256"
CASB_PATH = "/pacs/studies?ModalitiesInStudy=CT"
UPSTREAM_PATH = "/dicom-web/studies?ModalitiesInStudy=CT"
VARIANTS = ("direct", "mitmdump", "casb")

TARGET_RPS_RATIO = 0.85  # casb requests/s >= 0.85 x bare mitmdump
TARGET_ADDED_P50_MS = 1.0  # casb p50 - mitmdump p50 <= 1 ms

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 30.0
AUDIT_SETTLE_S = 5.0


class BenchError(Exception):
    """The rig could not be set up, or a run was not what it should measure."""


# -- the upstream (runs in its own process) ---------------------------------------------

_UPSTREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 2\r\n\r\n[]"
)


async def _upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                end = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : end])
                if length:
                    await reader.readexactly(length)
            writer.write(_UPSTREAM_RESPONSE)
            await writer.drain()
            if b"\r\nconnection: close" in lower:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def _upstream_main(ready: Connection) -> None:
    server = await asyncio.start_server(_upstream_connection, "127.0.0.1", 0, backlog=1024)
    ready.send(server.sockets[0].getsockname()[1])
    ready.close()
    async with server:
        await server.serve_forever()


def upstream_process(ready: Connection) -> None:
    """Entry point of the upstream process; the parent stops it (SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_upstream_main(ready))


# -- the load generator (runs in this process) ------------------------------------------


@dataclass
class Load:
    latencies_ns: list[int] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    reconnects: int = 0
    wall_ns: int = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; (status, whether the server will close the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length: int | None = None
    chunked = close = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif key == b"connection" and b"close" in value.lower():
            close = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    elif length is None and status not in (204, 304) and status >= 200:
        await reader.read()  # body delimited by the connection close
        close = True
    return status, close


def request_bytes(port: int, path: str, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Accept: application/dicom+json\r\n"
        "User-Agent: casb-bench\r\n"
        "\r\n"
    ).encode()


async def _connection(
    port: int,
    request: bytes,
    n: int,
    connected: asyncio.Queue[None],
    start: asyncio.Event,
    load: Load,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    perf = time.perf_counter_ns
    latencies, statuses = load.latencies_ns, load.statuses
    try:
        connected.put_nowait(None)
        await start.wait()
        for _ in range(n):
            t0 = perf()
            writer.write(request)
            status, close = await _read_response(reader)
            latencies.append(perf() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if close:
                writer.close()
                load.reconnects += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _generate(port: int, request: bytes, total: int, concurrency: int) -> Load:
    load = Load()
    start = asyncio.Event()
    connected: asyncio.Queue[None] = asyncio.Queue()
    concurrency = max(1, min(concurrency, total))
    shares = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
    tasks = [
        asyncio.create_task(_connection(port, request, n, connected, start, load)) for n in shares
    ]
    runner = asyncio.gather(*tasks)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            for _ in shares:  # every connection is open before the clock starts
                getter = asyncio.ensure_future(connected.get())
                waiters: list[asyncio.Future[Any]] = [getter, runner]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    await runner  # a connection failed: raise its error
        t0 = time.perf_counter_ns()
        start.set()
        async with asyncio.timeout(REQUEST_TIMEOUT_S + total / 10):
            await runner
        load.wall_ns = time.perf_counter_ns() - t0
    finally:
        runner.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await runner
    return load


def generate(port: int, request: bytes, total: int, concurrency: int) -> Load:
    return asyncio.run(_generate(port, request, total, concurrency))


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


class Mitmdump:
    """One mitmdump process in reverse mode in front of the upstream."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        upstream: int,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = free_port()
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.argv = [
            *prefix,
            str(MITMDUMP),
            *extra,
            "--mode",
            f"reverse:http://127.0.0.1:{upstream}@127.0.0.1:{self.port}",
            "--set",
            f"confdir={workdir / 'mitmproxy'}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            "flow_detail=0",
            "-q",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Mitmdump:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
            )
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open(self.port):
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not listening after {START_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # mitmdump shuts down cleanly (addon `done`)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


# -- identity and config ------------------------------------------------------------------


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def make_identity(workdir: Path) -> tuple[Path, str]:
    """An RS256 key: its public JWKS written to a file, and one minted token."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "kid": KID,
        "use": "sig",
        "alg": "RS256",
        "n": _b64url_uint(public.n),
        "e": _b64url_uint(public.e),
    }
    jwks_path = workdir / "jwks.json"
    jwks_path.write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "bench-radiologist",
        "iat": now,
        "exp": now + 6 * 3600,
        "roles": ["radiologist"],
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})
    return jwks_path, token


def write_casb_config(workdir: Path, upstream: int, jwks_path: Path) -> tuple[Path, Path]:
    import yaml

    audit = workdir / "audit.jsonl"
    uid_key = workdir / "dlp-uid.key"  # hospital.yaml's research profiles de-identify
    uid_key.write_text("bench-only-uid-key-0123456789abcdef")
    base = f"http://127.0.0.1:{upstream}/dicom-web"
    config = {
        "environment": "production",
        "state_dir": str(workdir),
        "destinations": {
            "pacs": {"upstream": base, "route": "/pacs"},
            # hospital.yaml also names `research`; the policy refuses unknown destinations.
            # No benchmark request goes there.
            "research": {"upstream": base, "route": "/research"},
        },
        "identity": {"issuer": ISSUER, "audience": [AUDIENCE], "jwks_file": str(jwks_path)},
        "policy": {"paths": [str(POLICY)]},
        "audit": {"path": str(audit)},
        "dlp": {"uid_key_file": str(uid_key)},
    }
    path = workdir / "casb.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, audit


def audit_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


# -- the rig --------------------------------------------------------------------------------


class Rig:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.upstream_port = 0
        self._upstream: BaseProcess | None = None
        self.token = ""
        self.jwks_path = workdir / "jwks.json"
        self.mitmdump: Mitmdump | None = None
        self.casb: Mitmdump | None = None
        self.audit_path = workdir / "casb" / "audit.jsonl"
        self.casb_sent = 0

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        self._upstream = ctx.Process(
            target=upstream_process, args=(child,), daemon=True, name="casb-bench-upstream"
        )
        self._upstream.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            raise BenchError("the upstream did not report its port")
        self.upstream_port = int(parent.recv())
        parent.close()

        self.jwks_path, self.token = make_identity(self.workdir)
        casb_dir = self.workdir / "casb"
        casb_dir.mkdir()
        config, self.audit_path = write_casb_config(casb_dir, self.upstream_port, self.jwks_path)
        self.mitmdump = Mitmdump("mitmdump", self.workdir / "mitmdump", self.upstream_port)
        self.casb = Mitmdump(
            "casb",
            casb_dir,
            self.upstream_port,
            extra=["-s", str(ADDON), "--set", f"casb_config={config}"],
        )
        self.mitmdump.start()
        self.casb.start()
        self.mitmdump.wait_ready()
        self.casb.wait_ready()
        for variant in VARIANTS:  # a first request must succeed: no benchmark of 401s
            try:
                load = self.send(variant, 1, 1)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                proxy = self.proxy(variant)
                raise BenchError(
                    f"{variant}: first request failed: {exc!r}"
                    + (f"\n{proxy.log_tail()}" if proxy else "")
                ) from exc
            if load.statuses != {200: 1}:
                proxy = self.proxy(variant)
                raise BenchError(
                    f"{variant}: first request answered {load.statuses}, not 200"
                    + (f"\n{proxy.log_tail()}" if proxy else "")
                )
        print(
            f"ready: upstream :{self.upstream_port}, mitmdump :{self.mitmdump.port}, "
            f"casb :{self.casb.port} (first request 200 on each)",
            file=sys.stderr,
        )

    def port(self, variant: str) -> int:
        proxy = self.proxy(variant)
        return proxy.port if proxy else self.upstream_port

    def proxy(self, variant: str) -> Mitmdump | None:
        return {"direct": None, "mitmdump": self.mitmdump, "casb": self.casb}[variant]

    def upstream_pid(self) -> int:
        assert self._upstream is not None and self._upstream.pid is not None
        return self._upstream.pid

    def send(self, variant: str, total: int, concurrency: int) -> Load:
        path = CASB_PATH if variant == "casb" else UPSTREAM_PATH
        port = self.port(variant)
        if variant == "casb":
            self.casb_sent += total
        return generate(port, request_bytes(port, path, self.token), total, concurrency)

    def check_audit(self) -> tuple[int, int]:
        """(records, how many were still missing when the last response had arrived).

        casb writes a streamed response's audit record in the `response` hook, which
        mitmproxy runs after the body went out: the client can see the whole response a
        moment before its record is on disk. Wait (bounded) for the log to catch up.
        """
        lines = audit_lines(self.audit_path)
        behind = self.casb_sent - lines
        deadline = time.monotonic() + AUDIT_SETTLE_S
        while lines < self.casb_sent and time.monotonic() < deadline:
            time.sleep(0.002)
            lines = audit_lines(self.audit_path)
        if lines != self.casb_sent:
            raise BenchError(
                f"casb audit log holds {lines} records for {self.casb_sent} "
                "requests sent: expected one record per request"
            )
        return lines, behind

    def stop(self) -> None:
        for proxy in (self.casb, self.mitmdump):
            if proxy is not None:
                proxy.stop()
        proc, self._upstream = self._upstream, None
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Run:
    round: int
    variant: str
    concurrency: int
    requests: int
    errors: int
    statuses: dict[str, int]
    reconnects: int
    wall_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    proxy_cpu_ms_per_req: float | None
    upstream_cpu_ms_per_req: float
    loadgen_cpu_ms_per_req: float
    proxy_rss_mb: float | None
    audit_records: int | None = None
    audit_behind_at_end: int | None = None


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])


def measure(rig: Rig, variant: str, rnd: int, requests: int, concurrency: int, warmup: int) -> Run:
    if warmup:
        rig.send(variant, warmup, concurrency)
    proxy = rig.proxy(variant)
    up_pid = rig.upstream_pid()
    proxy_t0 = cpu_ticks(proxy.pid) if proxy else 0
    up_t0 = cpu_ticks(up_pid)
    me_t0 = time.process_time()
    load = rig.send(variant, requests, concurrency)
    me_cpu = time.process_time() - me_t0
    up_cpu = (cpu_ticks(up_pid) - up_t0) / CLK_TCK
    proxy_cpu = (cpu_ticks(proxy.pid) - proxy_t0) / CLK_TCK if proxy else None
    lat = sorted(load.latencies_ns)
    n = len(lat)
    errors = sum(c for s, c in load.statuses.items() if s != 200) + (requests - n)
    run = Run(
        round=rnd,
        variant=variant,
        concurrency=concurrency,
        requests=n,
        errors=errors,
        statuses={str(s): c for s, c in sorted(load.statuses.items())},
        reconnects=load.reconnects,
        wall_s=load.wall_ns / 1e9,
        rps=n / (load.wall_ns / 1e9),
        p50_ms=percentile(lat, 0.50) / 1e6,
        p90_ms=percentile(lat, 0.90) / 1e6,
        p99_ms=percentile(lat, 0.99) / 1e6,
        mean_ms=sum(lat) / n / 1e6,
        max_ms=lat[-1] / 1e6,
        proxy_cpu_ms_per_req=proxy_cpu * 1000 / n if proxy_cpu is not None else None,
        upstream_cpu_ms_per_req=up_cpu * 1000 / n,
        loadgen_cpu_ms_per_req=me_cpu * 1000 / n,
        proxy_rss_mb=rss_mb(proxy.pid) if proxy else None,
    )
    if variant == "casb":
        run.audit_records, run.audit_behind_at_end = rig.check_audit()
    return run


# -- summarising ----------------------------------------------------------------------------

METRICS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "proxy_cpu_ms_per_req",
    "upstream_cpu_ms_per_req",
    "loadgen_cpu_ms_per_req",
    "proxy_rss_mb",
)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: Sequence[Run]) -> dict[str, Any]:
    """Per variant, the median of each figure over rounds; ratios paired per round."""
    by: dict[str, list[Run]] = {v: [r for r in runs if r.variant == v] for v in VARIANTS}
    variants = {
        v: {
            **{m: _median([getattr(r, m) for r in rs]) for m in METRICS},
            "requests": sum(r.requests for r in rs),
            "errors": sum(r.errors for r in rs),
        }
        for v, rs in by.items()
    }
    rounds = sorted({r.round for r in runs})

    def paired(fn: Callable[[dict[str, Run]], float | None]) -> tuple[float | None, list[Any]]:
        per = []
        for rnd in rounds:
            got = {r.variant: r for r in runs if r.round == rnd}
            per.append(fn(got) if all(v in got for v in VARIANTS) else None)
        return _median(per), per

    def cpu_added(g: dict[str, Run]) -> float | None:
        a, b = g["casb"].proxy_cpu_ms_per_req, g["mitmdump"].proxy_cpu_ms_per_req
        return a - b if a is not None and b is not None else None

    ratios: dict[str, Any] = {}
    for name, fn in {
        "casb_over_mitmdump_rps": lambda g: g["casb"].rps / g["mitmdump"].rps,
        "casb_added_p50_ms": lambda g: g["casb"].p50_ms - g["mitmdump"].p50_ms,
        "casb_added_p99_ms": lambda g: g["casb"].p99_ms - g["mitmdump"].p99_ms,
        "casb_added_cpu_ms_per_req": cpu_added,
        "mitmdump_over_direct_rps": lambda g: g["mitmdump"].rps / g["direct"].rps,
        "mitmdump_added_p50_ms": lambda g: g["mitmdump"].p50_ms - g["direct"].p50_ms,
    }.items():
        ratios[name], ratios[f"{name}_per_round"] = paired(fn)
    rps_ratio = ratios["casb_over_mitmdump_rps"]
    added_p50 = ratios["casb_added_p50_ms"]
    targets = {
        "casb_over_mitmdump_rps": {
            "target": f">= {TARGET_RPS_RATIO:g}",
            "value": rps_ratio,
            "met": rps_ratio is not None and rps_ratio >= TARGET_RPS_RATIO,
        },
        "casb_added_p50_ms": {
            "target": f"<= {TARGET_ADDED_P50_MS:g}",
            "value": added_p50,
            "met": added_p50 is not None and added_p50 <= TARGET_ADDED_P50_MS,
        },
    }
    return {
        "concurrency": runs[0].concurrency if runs else None,
        "variants": variants,
        "ratios": ratios,
        "targets": targets,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


TABLE_HEADERS = [
    "variant",
    "requests/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "proxy CPU ms/req",
    "upstream CPU ms/req",
    "errors",
]


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in VARIANTS:
        s = summary["variants"][v]
        rows.append(
            [
                v,
                _fmt(s["rps"], ",.0f"),
                _fmt(s["p50_ms"], ".3f"),
                _fmt(s["p90_ms"], ".3f"),
                _fmt(s["p99_ms"], ".3f"),
                _fmt(s["proxy_cpu_ms_per_req"], ".3f"),
                _fmt(s["upstream_cpu_ms_per_req"], ".3f"),
                str(s["errors"]),
            ]
        )
    return rows


def text_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, text_last: bool = False
) -> str:
    """Columns right-aligned but the first (and the last, when it holds text)."""
    all_rows = [list(headers), *map(list, rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    left = {0, len(headers) - 1} if text_last else {0}
    out = []
    for n, row in enumerate(all_rows):
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip() if text_last else "  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(summary: dict[str, Any]) -> list[str]:
    return [
        "| " + " | ".join(TABLE_HEADERS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(TABLE_HEADERS))) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(summary)),
    ]


def ratio_lines(summary: dict[str, Any], *, targets: bool = True) -> list[str]:
    r, t = summary["ratios"], summary["targets"]

    def mark(key: str, text: str) -> str:
        if not targets:
            return ""
        return f"   (target {text}: {'MET' if t[key]['met'] else 'MISSED'})"

    return [
        f"casb / mitmdump requests/s:       {_fmt(r['casb_over_mitmdump_rps'], '.3f')}"
        + mark("casb_over_mitmdump_rps", f">= {TARGET_RPS_RATIO:g}"),
        f"casb - mitmdump p50:              {_fmt(r['casb_added_p50_ms'], '+.3f')} ms"
        + mark("casb_added_p50_ms", f"<= {TARGET_ADDED_P50_MS:g} ms"),
        f"casb - mitmdump p99:              {_fmt(r['casb_added_p99_ms'], '+.3f')} ms",
        f"casb added proxy CPU per request: {_fmt(r['casb_added_cpu_ms_per_req'], '+.3f')} ms",
        f"mitmdump / direct requests/s:     {_fmt(r['mitmdump_over_direct_rps'], '.3f')}",
        f"mitmdump - direct p50:            {_fmt(r['mitmdump_added_p50_ms'], '+.3f')} ms",
    ]


def report(loaded: dict[str, Any], unloaded: dict[str, Any] | None) -> str:
    lines = [
        f"Under load: {loaded['concurrency']} keep-alive connections, closed loop",
        text_table(TABLE_HEADERS, table_rows(loaded)),
        "",
        *ratio_lines(loaded),
    ]
    if unloaded is not None:
        lines += [
            "",
            "Unloaded: 1 connection, one request at a time (latency without queueing)",
            text_table(TABLE_HEADERS, table_rows(unloaded)),
            "",
            *ratio_lines(unloaded, targets=False),
            f"(added p50 unloaded vs the {TARGET_ADDED_P50_MS:g} ms target: "
            f"{'within' if unloaded['targets']['casb_added_p50_ms']['met'] else 'over'})",
        ]
    return "\n".join(lines)


def _md_bullets(lines: Sequence[str]) -> list[str]:
    return [f"- {' '.join(line.split())}" for line in lines]


def markdown(loaded: dict[str, Any], unloaded: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    cfg = meta["config"]
    lines = [
        "# Proxy overhead benchmark: casb vs bare mitmdump vs direct",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- Python {meta['python']}, mitmproxy {meta['mitmproxy']}, casb {meta['casb']}",
        f"- CPU: {meta['cpu']} ({meta['nproc']} CPUs), {meta['platform']}",
        f"- {cfg['rounds']} rounds, each running direct, mitmdump and casb in turn; every "
        "figure is the median over rounds, ratios are paired within a round first",
        f"- requests: `GET {CASB_PATH}` with a bearer token (casb, allowed by "
        f"`radiologist-read`); `GET {UPSTREAM_PATH}` with the same header (direct, "
        "mitmdump); the upstream answers `200 []`",
        "",
        f"## Under load: {cfg['concurrency']} keep-alive connections, "
        f"{cfg['requests']:,} requests per variant per round",
        "",
        *markdown_table(loaded),
        "",
        *_md_bullets(ratio_lines(loaded)),
    ]
    if unloaded is not None:
        lines += [
            "",
            f"## Unloaded: 1 connection, {cfg['latency_requests']:,} requests per variant "
            "per round",
            "",
            *markdown_table(unloaded),
            "",
            *_md_bullets(ratio_lines(unloaded, targets=False)),
        ]
    lines += [
        "",
        "## Notes",
        "",
        "- Proxy CPU is the mitmdump process's utime + stime (all threads, from "
        "/proc/PID/stat) over the measured run, divided by the requests. It is the "
        "steadiest figure here: the load generator, the upstream and the proxy share "
        f"{meta['nproc']} CPUs, and mitmdump, single-threaded and CPU-bound, is the "
        "bottleneck.",
        "- Under load, p50 is mostly queueing: with N connections on a saturated proxy, "
        "p50 is about N x the proxy's CPU time per request, so casb's added p50 there is "
        "about N x its added CPU. The unloaded table shows the added latency of a single "
        "request.",
        "- One token is reused, so casb verifies its RS256 signature once and then hits "
        "its token cache: these are casb's warm-path costs.",
        f"- Every casb request was audited: after each run the audit log held one record "
        f"per request sent ({meta['audit_records']:,} records in total, warm-ups and "
        "readiness checks included).",
    ]
    if meta["audit_max_behind_at_end"]:
        lines.append(
            f"- Up to {meta['audit_max_behind_at_end']} audit records were not yet on disk "
            "when the last response of a run reached the client (casb streams responses "
            "and writes the record in mitmproxy's `response` hook, which runs after the "
            "streamed body went out); they appeared moments later."
        )
    lines.append("")
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


# -- profiling --------------------------------------------------------------------------------


def profile_casb(rig: Rig, out: Path, requests: int, concurrency: int, warmup: int) -> str:
    """One casb run under cProfile (a separate instance); the top entries of casb's code."""
    workdir = rig.workdir / "profile"
    workdir.mkdir()
    config, audit = write_casb_config(workdir, rig.upstream_port, rig.jwks_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    proxy = Mitmdump(
        "casb-profiled",
        workdir,
        rig.upstream_port,
        extra=["-s", str(ADDON), "--set", f"casb_config={config}"],
        prefix=[sys.executable, "-m", "cProfile", "-o", str(out)],
    )
    try:
        proxy.start()
        proxy.wait_ready()
        port = proxy.port
        req = request_bytes(port, CASB_PATH, rig.token)
        generate(port, req, warmup + 1, concurrency)
        load = generate(port, req, requests, concurrency)
    finally:
        code = proxy.stop()
    if load.statuses != {200: requests}:
        raise BenchError(f"profiled casb run answered {load.statuses}")
    if not out.exists():
        raise BenchError(f"cProfile wrote no {out} (mitmdump exit code {code})")
    print(
        f"profiled casb: {requests} requests, {audit_lines(audit)} audit records, "
        f"{requests / (load.wall_ns / 1e9):,.0f} req/s under the profiler",
        file=sys.stderr,
    )

    return hot_paths(out, requests + warmup + 1)


def hot_paths(prof: Path, requests: int, top: int = 25) -> str:
    """casb's per-request hot path from a cProfile dump: start-up (module bodies, and
    anything called less than once per two requests) left out; times per request."""
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, dict[Any, Any]]]
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    ours = re.compile(re.escape(str(REPO)) + r"/(casb|addons)/")

    def name(key: tuple[str, int, str]) -> str:
        file, line, func = key
        if ours.match(file):
            file = file[len(str(REPO)) + 1 :]
        elif "site-packages/" in file:
            file = file.split("site-packages/", 1)[1]
        elif file.startswith(sys.base_prefix):
            file = "stdlib:" + file.rsplit("/", 1)[-1]
        return f"{file}:{line}({func})" if line else func

    own = [
        (key, nc, tt, ct)
        for key, (_cc, nc, tt, ct, _callers) in stats.items()
        if ours.match(key[0]) and key[2] != "<module>" and nc * 2 >= requests
    ]
    own.sort(key=lambda e: e[3], reverse=True)
    lines = [
        f"casb's own functions on the request path, by cumulative time ({requests} "
        "requests, times under cProfile: inflated, compare them with each other)",
        f"{'calls/req':>9}  {'cum us/req':>10}  {'own us/req':>10}  function",
    ]
    for key, nc, tt, ct in own[:top]:
        lines.append(
            f"{nc / requests:9.2f}  {ct * 1e6 / requests:10.1f}  {tt * 1e6 / requests:10.1f}  "
            f"{name(key)}"
        )
    # Time in code outside casb, called straight from casb's functions.
    external: list[tuple[tuple[str, int, str], float, int]] = []
    for key, (_cc, _nc, _tt, _ct, callers) in stats.items():
        if ours.match(key[0]):
            continue
        from_us = [v for caller, v in callers.items() if ours.match(caller[0])]
        if from_us:
            ct = sum(v[3] for v in from_us)
            nc = sum(v[1] for v in from_us)
            if nc * 2 >= requests:
                external.append((key, ct, nc))
    external.sort(key=lambda e: e[1], reverse=True)
    lines += [
        "",
        "calls out of casb's code (library code called directly by casb), by cumulative time",
        f"{'calls/req':>9}  {'cum us/req':>10}  function",
    ]
    for key, ct, nc in external[:top]:
        lines.append(f"{nc / requests:9.2f}  {ct * 1e6 / requests:10.1f}  {name(key)}")
    return "\n".join(lines) + "\n"


def print_run(run: Run, rounds: int) -> None:
    audit = (
        f", audit log {run.audit_records} records = requests sent "
        f"({run.audit_behind_at_end} not yet written when the last response arrived)"
        if run.audit_records is not None
        else ""
    )
    print(
        f"round {run.round}/{rounds} {run.variant:8} x{run.concurrency:<2} "
        f"{run.rps:8,.0f} req/s  p50 {run.p50_ms:7.3f}  p99 {run.p99_ms:7.3f} ms  "
        f"proxy CPU {_fmt(run.proxy_cpu_ms_per_req, '.3f')} ms/req  errors {run.errors}{audit}",
        file=sys.stderr,
    )


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="measured requests per variant per round (default 3000; --quick: 300)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="keep-alive connections, each a closed loop (default 8)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of direct/mitmdump/casb; medians reported (default 3; --quick: 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="unmeasured requests before each run (default requests/10)",
    )
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=None,
        help="requests per variant per round over 1 connection, for latency without "
        "queueing (default 600; --quick: 100; 0 skips)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 300 requests, 1 round; writes results only with --out",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="also run casb once under cProfile, save the stats to FILE and "
        "print casb's top cumulative entries",
    )
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 300 if args.quick else 3000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.latency_requests is None:
        args.latency_requests = 100 if args.quick else 600
    warmup = args.warmup if args.warmup is not None else max(args.concurrency, args.requests // 10)
    out: Path | None = args.out
    if out is None and not args.quick:
        out = REPO / "bench" / "results"
    if args.requests < 1 or args.concurrency < 1 or args.rounds < 1 or args.latency_requests < 0:
        parser.error("--requests, --concurrency and --rounds must be positive")
    if not MITMDUMP.exists():
        parser.error(f"{MITMDUMP} not found: run from the project venv (.venv/bin/python)")

    command = " ".join(
        [
            ".venv/bin/python bench/proxy_overhead.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    ).strip()
    runs: list[Run] = []
    profile_text = ""
    audit_total = 0
    with tempfile.TemporaryDirectory(prefix="casb-bench-") as tmp:
        rig = Rig(Path(tmp))
        try:
            rig.start()
            for rnd in range(1, args.rounds + 1):
                for variant in VARIANTS:
                    plan = [(args.requests, args.concurrency, warmup)]
                    if args.latency_requests:
                        plan.append((args.latency_requests, 1, 0))
                    for requests, concurrency, warm in plan:
                        run = measure(rig, variant, rnd, requests, concurrency, warm)
                        runs.append(run)
                        print_run(run, args.rounds)
            audit_total, _ = rig.check_audit()
            print(
                f"casb audit log: {audit_total} records for {rig.casb_sent} requests sent "
                "(readiness check and warm-ups included): one per request",
                file=sys.stderr,
            )
            if args.profile is not None:
                if rig.mitmdump is not None:
                    rig.mitmdump.stop()  # the profiled casb gets the core to itself
                profile_text = profile_casb(
                    rig, args.profile.resolve(), args.requests, args.concurrency, warmup
                )
        finally:
            rig.stop()

    loaded = summarise([r for r in runs if r.concurrency == args.concurrency])
    unloaded = (
        summarise([r for r in runs if r.concurrency == 1])
        if args.latency_requests and args.concurrency != 1
        else None
    )
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "mitmproxy": _version("mitmproxy"),
        "casb": _version("casb"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "clock_ticks_per_s": CLK_TCK,
        "config": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "latency_requests": args.latency_requests,
            "warmup": warmup,
            "quick": args.quick,
            "casb_path": CASB_PATH,
            "upstream_path": UPSTREAM_PATH,
            "policy": str(POLICY.relative_to(REPO)),
            "mitmdump_options": ["connection_strategy=lazy", "flow_detail=0", "-q"],
        },
        "audit_records": audit_total,
        "audit_requests_sent": rig.casb_sent,
        "audit_max_behind_at_end": max(
            (r.audit_behind_at_end or 0 for r in runs if r.variant == "casb"), default=0
        ),
    }

    print()
    print(
        f"casb proxy overhead, {meta['cpu']} ({meta['nproc']} CPUs), Python "
        f"{meta['python']}, mitmproxy {meta['mitmproxy']}; median of {args.rounds} "
        f"round(s) x {args.requests} requests, {args.concurrency} connections"
    )
    print(report(loaded, unloaded))
    if profile_text:
        print()
        print(profile_text)

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "meta": meta,
            "loaded": loaded,
            "unloaded": unloaded,
            "runs": [asdict(r) for r in runs],
        }
        (out / "proxy_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "proxy_overhead.md").write_text(markdown(loaded, unloaded, meta))
        print(f"\nwrote {out / 'proxy_overhead.json'} and {out / 'proxy_overhead.md'}")
    errors = sum(r.errors for r in runs)
    if errors:
        print(f"\n{errors} requests were not answered 200", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    # Stop cleanly (servers stopped, temp dir removed) on Ctrl-C or a plain `kill`, also
    # when started in the background, where SIGINT would otherwise be ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"proxy_overhead: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("proxy_overhead: interrupted; servers stopped", file=sys.stderr)
        raise SystemExit(130) from None
