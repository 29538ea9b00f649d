"""What casb costs per request, with and without telemetry, versus bare mitmdump and direct.

Run: ``.venv/bin/python bench/proxy_overhead.py`` (``--help`` for options; also from
``make bench``); ``--variants casb,casb+otlp`` runs a subset. Everything runs on
127.0.0.1, on free ports, started here and stopped at the end (also on Ctrl-C or an
exception):

* upstream: a minimal asyncio HTTP/1.1 server (keep-alive, answers any request with
  ``200`` and the body ``[]``), in its own process so it shares no GIL with the load
  generator. It is far faster than mitmdump, so it is never the bottleneck.
* ``direct``: the load generator talks straight to the upstream.
* ``mitmdump``: bare ``mitmdump --mode reverse:...`` (no addon).
* ``casb``: ``mitmdump -s addons/casb.py`` with a generated casb.yaml: production
  environment, identity from a JWKS *file* (an RS256 key generated here), destination
  ``pacs`` -> ``http://127.0.0.1:UP/dicom-web`` (plus ``research``, unused, because
  ``policies/hospital.yaml`` names it and the policy loader refuses unknown
  destinations), the JSONL audit log in a temporary directory. Telemetry off: no
  ``OTEL_*`` variable reaches the process (any in this environment are removed).
* ``casb+console``: the same, with ``OTEL_TRACES_EXPORTER=console`` and
  ``OTEL_METRICS_EXPORTER=console`` (spans written synchronously, one JSON document
  each, by the SDK's SimpleSpanProcessor, as casb configures the console exporter); the
  proxy's stdout, where the console exporters write, goes to /dev/null. A separate
  probe instance, its stdout to a file, checks once that the same settings do print
  the spans and metrics of a request.
* ``casb+otlp``: the same, with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set to a local OTLP/HTTP
  receiver (``bench/support/otlp_sink.py``, its own process; it decodes and counts what
  arrives): http/protobuf, the SDK's default BatchSpanProcessor settings.
  Both telemetry variants export metrics every ``--metric-interval-ms`` (default
  5000, instead of the SDK's 60 s, so the metric export is inside the measured runs).

Requests: ``GET /pacs/studies?ModalitiesInStudy=CT`` with ``Authorization: Bearer
<token>`` (roles=[radiologist], allowed by ``radiologist-read``) to the casb variants;
the same path as the upstream sees it, ``/dicom-web/studies?ModalitiesInStudy=CT``,
with the same header (ignored) to ``direct`` and ``mitmdump``, so the upstream work is
identical. One token is reused, so casb verifies its signature once and then hits its
token cache: the figures are casb's warm path.

Method: the load generator runs in this process (no server shares it) with raw asyncio
streams: ``--concurrency`` keep-alive HTTP/1.1 connections, each sending its requests
one after the other (closed loop), timing each with ``time.perf_counter_ns``. Each
round runs every variant one after the other (a short unmeasured warm-up first), so
machine drift hits all alike; every figure reported is the median over ``--rounds``
rounds, and ratios are paired within a round before taking the median.
The proxy's CPU is read from ``/proc/PID/stat`` (utime + stime, all threads: the span
exporter's thread included) before and after each measured run: CPU ms per request is
the steadiest figure on a small, noisy machine. Non-200 answers are errors (there must
be none); after every casb run its audit log must hold one record per request sent.
After every ``casb+otlp`` run the bench waits (bounded) until the receiver holds one
SERVER span per request sent so far (the batch processor exports at most 5 s later)
and reports spans received per request; at the end it stops that proxy (which flushes
its exporters) and checks the receiver's totals: SERVER spans and the cumulative
``casb.requests`` counter both equal to the requests sent.

Under load, p50 is mostly queueing (N connections on a saturated, single-threaded proxy
wait about N x its CPU time per request), so each round also runs every variant over one
connection (``--latency-requests``): the latency one request pays without queueing.

``--profile FILE`` adds one more run of a casb variant (``--profile-variant``, default
``casb``) under ``python -m cProfile`` (a separate instance; its figures are not
reported) and prints casb's own functions on the request path by cumulative time, and
the library calls they make.
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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from support.otlp_sink import SinkProcess

REPO = Path(__file__).resolve().parents[1]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
POLICY = REPO / "policies" / "hospital.yaml"
ADDON = REPO / "addons" / "casb.py"

ISSUER = "https://idp.bench.test/realms/imaging"
AUDIENCE = "casb"
KID = "casb-bench-rs256"
CASB_PATH = "/pacs/studies?ModalitiesInStudy=CT"
UPSTREAM_PATH = "/dicom-web/studies?ModalitiesInStudy=CT"
VARIANTS = ("direct", "mitmdump", "casb", "casb+console", "casb+otlp")
CASB_VARIANTS = ("casb", "casb+console", "casb+otlp")  # casb's addon; its audit log checked
TELEMETRY_VARIANTS = ("casb+console", "casb+otlp")  # compared with casb (telemetry off) too
METRIC_EXPORT_INTERVAL_MS = 5000
EXPORT_SETTLE_S = 20.0  # the batch processor exports within 5 s (its schedule delay)

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
    """One mitmdump process in reverse mode in front of the upstream.

    `env`: its whole environment (default: this process's). `stdout`: where its stdout
    goes instead of the log file (stderr always goes to the log file).
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        upstream: int,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        stdout: Path | None = None,
    ) -> None:
        self.name = name
        self.env = dict(env) if env is not None else None
        self.stdout_path = stdout
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
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("wb"))
            out = files.enter_context(self.stdout_path.open("wb")) if self.stdout_path else log
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=self.env,
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
        """The end of its log; with stdout to a file, mitmproxy's own lines from there
        too (its log goes to stdout, where the console exporters write)."""
        found: list[str] = []
        with contextlib.suppress(OSError):
            found = self.log_path.read_text(errors="replace").splitlines()
        out = self.stdout_path
        if out is not None and out.is_file():
            with contextlib.suppress(OSError):
                found += [
                    line  # not part of an indented JSON document
                    for line in out.read_text(errors="replace").splitlines()
                    if line and line[0] not in " {}"
                ]
        return "\n".join(found[-lines:])

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

    from casb.audit.checkpoint import write_keypair

    audit = workdir / "audit.jsonl"
    signing_key = workdir / "audit-signing.pem"  # production signs audit checkpoints
    write_keypair(signing_key, workdir / "audit-signing.pub.pem")
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
        "audit": {"path": str(audit), "checkpoints": {"signing_key_file": str(signing_key)}},
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


def audit_record_types(path: Path) -> dict[str, int]:
    """Records in an audit log by type (request, policy_change, checkpoint); a last line
    still being written is not counted."""
    if not path.exists():
        return {}
    *complete, _partial = path.read_bytes().split(b"\n")
    types = [json.loads(line).get("type", "request") for line in complete]
    return {t: types.count(t) for t in sorted(set(types))}


def audit_requests(path: Path) -> int:
    return audit_record_types(path).get("request", 0)


# -- the rig --------------------------------------------------------------------------------


def proxy_env(variant: str, sink_endpoint: str | None, metric_interval_ms: int) -> dict[str, str]:
    """A proxy's whole environment: this one's without any OTEL_* variable (so `casb`
    really runs with telemetry off), loopback never through an HTTP proxy, and the
    variant's telemetry settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    no_proxy = [env.get("NO_PROXY") or env.get("no_proxy") or "", "127.0.0.1", "localhost"]
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, no_proxy))
    interval = {"OTEL_METRIC_EXPORT_INTERVAL": str(metric_interval_ms)}
    if variant == "casb+console":
        env |= {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "console", **interval}
    elif variant == "casb+otlp":
        if sink_endpoint is None:
            raise BenchError("casb+otlp needs the OTLP receiver")
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_endpoint, **interval}
    return env


def server_spans(stats: Mapping[str, Any]) -> int:
    return int(stats["spans_by_kind"].get("SERVER", 0))


def console_output(path: Path) -> dict[str, Any]:
    """What the console exporters printed (JSON documents one after the other, spans and
    metric batches): spans by kind, and the names of the metrics."""
    text = path.read_text(errors="replace") if path.exists() else ""
    decoder = json.JSONDecoder()
    kinds: list[str] = []
    metrics: set[str] = set()
    at = text.find("{")
    while at >= 0:
        try:
            doc, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            end = at + 1  # not a document (another line on stdout): skip on
        else:
            if isinstance(doc, dict) and "kind" in doc:
                kinds.append(str(doc["kind"]).removeprefix("SpanKind."))
            elif isinstance(doc, dict):
                for rm in doc.get("resource_metrics", []):
                    for sm in rm.get("scope_metrics", []):
                        metrics.update(m.get("name", "") for m in sm.get("metrics", []))
        at = text.find("{", end)
    return {
        "spans": len(kinds),
        "server_spans": kinds.count("SERVER"),
        "metrics": sorted(metrics - {""}),
        "bytes": len(text.encode()),
    }


class Rig:
    """The upstream, the proxies of the chosen variants, and the OTLP receiver."""

    def __init__(
        self,
        workdir: Path,
        variants: Sequence[str] = VARIANTS,
        metric_interval_ms: int = METRIC_EXPORT_INTERVAL_MS,
    ) -> None:
        self.workdir = workdir
        self.variants = tuple(variants)
        self.metric_interval_ms = metric_interval_ms
        self.upstream_port = 0
        self._upstream: BaseProcess | None = None
        self.token = ""
        self.jwks_path = workdir / "jwks.json"
        self.proxies: dict[str, Mitmdump] = {}
        self.audit_paths: dict[str, Path] = {}
        self.sent: dict[str, int] = dict.fromkeys(VARIANTS, 0)
        self.sink: SinkProcess | None = None
        self.console_probe: dict[str, Any] | None = None
        self.otlp_final: dict[str, Any] | None = None

    def env(self, variant: str) -> dict[str, str]:
        endpoint = self.sink.endpoint if self.sink is not None else None
        return proxy_env(variant, endpoint, self.metric_interval_ms)

    def new_casb(
        self, variant: str, name: str, stdout: Path | None = None, prefix: Sequence[str] = ()
    ) -> tuple[Mitmdump, Path]:
        """A casb instance of `variant` in its own directory (state, audit log, lock)."""
        workdir = self.workdir / name
        workdir.mkdir()
        config, audit = write_casb_config(workdir, self.upstream_port, self.jwks_path)
        if stdout is None and variant == "casb+console":
            stdout = Path(os.devnull)
        proxy = Mitmdump(
            name,
            workdir,
            self.upstream_port,
            extra=["-s", str(ADDON), "--set", f"casb_config={config}"],
            prefix=prefix,
            env=self.env(variant),
            stdout=stdout,
        )
        return proxy, audit

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
        if "casb+otlp" in self.variants:
            from support.otlp_sink import SinkProcess

            try:
                self.sink = SinkProcess(free_port(), self.workdir / "otlp_sink.log").start()
            except RuntimeError as exc:
                raise BenchError(str(exc)) from exc
        if "mitmdump" in self.variants:
            self.proxies["mitmdump"] = Mitmdump(
                "mitmdump",
                self.workdir / "mitmdump",
                self.upstream_port,
                env=self.env("mitmdump"),
            )
        for variant in CASB_VARIANTS:
            if variant in self.variants:
                name = variant.replace("+", "-")
                self.proxies[variant], self.audit_paths[variant] = self.new_casb(variant, name)
        probe: Mitmdump | None = None
        if "casb+console" in self.variants:
            # The measured instance prints to /dev/null; this one shows what it prints.
            probe_out = self.workdir / "console-probe.out"
            probe, _ = self.new_casb("casb+console", "console-probe", stdout=probe_out)
        starting = [*self.proxies.values(), *([probe] if probe else [])]
        for proxy in starting:
            proxy.start()
        for proxy in starting:
            proxy.wait_ready()
        if probe is not None:
            self.console_probe = self.probe_console(probe, probe_out)
        for variant in self.variants:  # a first request must succeed: no benchmark of 401s
            try:
                load = self.send(variant, 1, 1)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                raise BenchError(
                    f"{variant}: first request failed: {exc!r}{self.tail(variant)}"
                ) from exc
            if load.statuses != {200: 1}:
                raise BenchError(
                    f"{variant}: first request answered {load.statuses}, not 200"
                    + self.tail(variant)
                )
        if self.sink is not None:  # the export works before anything is measured
            stats, waited = self.wait_exported()
            if server_spans(stats) != self.sent["casb+otlp"]:
                raise BenchError(
                    f"casb+otlp: the receiver got {server_spans(stats)} SERVER spans for "
                    f"{self.sent['casb+otlp']} requests after {waited:.0f} s: {stats}"
                    + self.tail("casb+otlp")
                )
        ports = ", ".join(f"{v} :{p.port}" for v, p in self.proxies.items())
        print(
            f"ready: upstream :{self.upstream_port}, {ports} (first request 200 on each)",
            file=sys.stderr,
        )

    def probe_console(self, probe: Mitmdump, out: Path) -> dict[str, Any]:
        """One request through a console-exporting casb, stopped (which flushes its
        metrics); its stdout must hold that request's spans and casb's metrics."""
        try:
            load = generate(probe.port, request_bytes(probe.port, CASB_PATH, self.token), 1, 1)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            probe.stop()
            raise BenchError(
                f"console exporter probe: request failed: {exc!r}\n{probe.log_tail()}"
            ) from exc
        code = probe.stop()
        seen = console_output(out)
        if load.statuses != {200: 1} or seen["server_spans"] != 1 or not seen["metrics"]:
            raise BenchError(
                f"console exporter probe: status {load.statuses}, printed {seen} "
                f"(exit code {code}): expected 1 SERVER span and casb's metrics\n"
                + probe.log_tail()
            )
        print(
            f"console probe: 1 request printed {seen['spans']} spans "
            f"({seen['bytes']:,} bytes) and metrics {', '.join(seen['metrics'])}",
            file=sys.stderr,
        )
        return seen

    def tail(self, variant: str) -> str:
        proxy = self.proxy(variant)
        return f"\n{proxy.log_tail()}" if proxy else ""

    def port(self, variant: str) -> int:
        proxy = self.proxy(variant)
        return proxy.port if proxy else self.upstream_port

    def proxy(self, variant: str) -> Mitmdump | None:
        if variant != "direct" and variant not in self.proxies:
            raise BenchError(f"{variant} is not running")
        return self.proxies.get(variant)

    def upstream_pid(self) -> int:
        assert self._upstream is not None and self._upstream.pid is not None
        return self._upstream.pid

    def send(self, variant: str, total: int, concurrency: int) -> Load:
        path = CASB_PATH if variant in CASB_VARIANTS else UPSTREAM_PATH
        port = self.port(variant)
        self.sent[variant] += total
        return generate(port, request_bytes(port, path, self.token), total, concurrency)

    def check_audit(self, variant: str) -> tuple[int, int]:
        """(records, how many were still missing when the last response had arrived).

        casb writes a streamed response's audit record in the `response` hook, which
        mitmproxy runs after the body went out: the client can see the whole response a
        moment before its record is on disk. Wait (bounded) for the log to catch up.
        """
        path, sent = self.audit_paths[variant], self.sent[variant]
        records = audit_requests(path)
        behind = sent - records
        deadline = time.monotonic() + AUDIT_SETTLE_S
        while records < sent and time.monotonic() < deadline:
            time.sleep(0.01)
            records = audit_requests(path)
        if records != sent:
            raise BenchError(
                f"{variant} audit log holds {records} request records for {sent} "
                "requests sent: expected one record per request"
            )
        return records, behind

    def sink_stats(self) -> dict[str, Any]:
        assert self.sink is not None
        try:
            return self.sink.stats()
        except OSError as exc:
            raise BenchError(f"OTLP receiver: {exc}\n{self.sink.log_tail()}") from exc

    def wait_exported(self) -> tuple[dict[str, Any], float]:
        """Wait (bounded) until the receiver holds one SERVER span per request sent to
        casb+otlp: (its stats, seconds waited). Returns short at the deadline (spans
        lost): the caller reports it."""
        t0 = time.monotonic()
        while True:
            stats = self.sink_stats()
            waited = time.monotonic() - t0
            if server_spans(stats) >= self.sent["casb+otlp"] or waited > EXPORT_SETTLE_S:
                return stats, waited
            time.sleep(0.05)

    def finish_otlp(self) -> dict[str, Any]:
        """Stop casb+otlp (it flushes its exporters on shutdown) and take the
        receiver's totals: they must match the requests sent to it."""
        proxy = self.proxies.pop("casb+otlp")
        code = proxy.stop()
        stats = self.sink_stats()
        sent = self.sent["casb+otlp"]
        requests_counter = stats["cumulative_sums"].get("casb.requests")
        problems = []
        if server_spans(stats) != sent:
            problems.append(f"{server_spans(stats)} SERVER spans for {sent} requests")
        if requests_counter != sent:
            problems.append(f"casb.requests = {requests_counter} for {sent} requests")
        if stats["refused"]:
            problems.append(f"{stats['refused']} exports refused: {stats['errors']}")
        self.otlp_final = {
            "requests_sent": sent,
            "proxy_exit_code": code,
            "receiver": stats,
            "problems": problems,
        }
        return self.otlp_final

    def stop(self) -> None:
        for name in list(self.proxies):
            self.proxies.pop(name).stop()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.stop()
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
    # casb+otlp: what the receiver got for this run's requests (warm-up included)
    export_requests: int | None = None
    spans_received: int | None = None
    server_spans_received: int | None = None
    export_wait_s: float | None = None


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])


def measure(rig: Rig, variant: str, rnd: int, requests: int, concurrency: int, warmup: int) -> Run:
    # casb+otlp: every earlier span is in (the rig waited), so the difference is this run's
    before = rig.sink_stats() if variant == "casb+otlp" else None
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
    if variant in CASB_VARIANTS:
        run.audit_records, run.audit_behind_at_end = rig.check_audit(variant)
    if before is not None:
        after, run.export_wait_s = rig.wait_exported()
        run.export_requests = warmup + requests
        run.spans_received = after["spans"] - before["spans"]
        run.server_spans_received = server_spans(after) - server_spans(before)
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
# (name, Run field, ratio or difference), each paired within a round
COMPARISONS = (
    ("rps_ratio", "rps", "ratio"),
    ("added_p50_ms", "p50_ms", "diff"),
    ("added_p99_ms", "p99_ms", "diff"),
    ("added_cpu_ms_per_req", "proxy_cpu_ms_per_req", "diff"),
    ("cpu_ratio", "proxy_cpu_ms_per_req", "ratio"),
)


def baselines(variant: str) -> tuple[str, ...]:
    """What a variant is compared with."""
    if variant == "mitmdump":
        return ("direct",)
    if variant == "casb":
        return ("mitmdump",)
    if variant in TELEMETRY_VARIANTS:
        return ("casb", "mitmdump")
    return ()


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _compare(a: float | None, b: float | None, op: str) -> float | None:
    if a is None or b is None or (op == "ratio" and b == 0):
        return None  # e.g. a CPU reading of 0 over a handful of requests: no ratio
    return a / b if op == "ratio" else a - b


def summarise(runs: Sequence[Run], variants: Sequence[str]) -> dict[str, Any]:
    """Per variant, the median of each figure over rounds; comparisons paired per round."""
    by: dict[str, list[Run]] = {v: [r for r in runs if r.variant == v] for v in variants}
    summary_variants: dict[str, dict[str, Any]] = {}
    for v, rs in by.items():
        s: dict[str, Any] = {
            **{m: _median([getattr(r, m) for r in rs]) for m in METRICS},
            "requests": sum(r.requests for r in rs),
            "errors": sum(r.errors for r in rs),
        }
        exported = [r for r in rs if r.export_requests]
        if exported:
            sent = sum(r.export_requests or 0 for r in exported)
            spans = sum(r.spans_received or 0 for r in exported)
            server = sum(r.server_spans_received or 0 for r in exported)
            s["export"] = {
                "requests": sent,
                "spans": spans,
                "server_spans": server,
                "spans_per_request": spans / sent,
                "server_spans_per_request": server / sent,
                "max_wait_s": max(r.export_wait_s or 0.0 for r in exported),
            }
        summary_variants[v] = s
    rounds = sorted({r.round for r in runs})
    comparisons: dict[str, dict[str, dict[str, Any]]] = {}
    for v in variants:
        for base in baselines(v):
            if base not in variants:
                continue
            comp: dict[str, Any] = {}
            for name, metric, op in COMPARISONS:
                per: list[float | None] = []
                for rnd in rounds:
                    got = {r.variant: r for r in runs if r.round == rnd}
                    a, b = got.get(v), got.get(base)
                    per.append(
                        _compare(getattr(a, metric), getattr(b, metric), op) if a and b else None
                    )
                comp[name], comp[f"{name}_per_round"] = _median(per), per
            comparisons.setdefault(v, {})[base] = comp
    targets: dict[str, Any] = {}
    casb = comparisons.get("casb", {}).get("mitmdump")
    if casb is not None:
        rps_ratio, added_p50 = casb["rps_ratio"], casb["added_p50_ms"]
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
        "variants": summary_variants,
        "comparisons": comparisons,
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
COMPARISON_HEADERS = [
    "variant",
    "vs",
    "requests/s ratio",
    "p50 added ms",
    "p99 added ms",
    "proxy CPU added ms/req",
    "proxy CPU ratio",
]


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v, s in summary["variants"].items():
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


def comparison_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v, by_base in summary["comparisons"].items():
        for base, c in by_base.items():
            rows.append(
                [
                    v,
                    base,
                    _fmt(c["rps_ratio"], ".3f"),
                    _fmt(c["added_p50_ms"], "+.3f"),
                    _fmt(c["added_p99_ms"], "+.3f"),
                    _fmt(c["added_cpu_ms_per_req"], "+.3f"),
                    _fmt(c["cpu_ratio"], ".3f"),
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


def md_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], text_cols: int = 1
) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i < text_cols else "---:" for i in range(len(headers))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def target_lines(summary: dict[str, Any], *, verdict: bool = True) -> list[str]:
    """casb (telemetry off) against the targets set relative to bare mitmdump."""
    t = summary["targets"]
    if not t:
        return []

    def line(key: str, label: str, spec: str, unit: str) -> str:
        mark = f" (target {t[key]['target']}{unit}: {'MET' if t[key]['met'] else 'MISSED'})"
        return f"{label} {_fmt(t[key]['value'], spec)}{unit}" + (mark if verdict else "")

    return [
        line("casb_over_mitmdump_rps", "casb / mitmdump requests/s:", ".3f", ""),
        line("casb_added_p50_ms", "casb - mitmdump p50:", "+.3f", " ms"),
    ]


def export_lines(summary: dict[str, Any]) -> list[str]:
    """What the OTLP receiver got for the casb+otlp runs of this summary."""
    e = summary["variants"].get("casb+otlp", {}).get("export")
    if e is None:
        return []
    return [
        f"casb+otlp export: the receiver got {e['spans']:,} spans for {e['requests']:,} "
        f"requests ({e['spans_per_request']:.2f} per request, "
        f"{e['server_spans_per_request']:.3f} SERVER spans per request); all in at most "
        f"{e['max_wait_s']:.1f} s after a run's last response",
    ]


def report(loaded: dict[str, Any], unloaded: dict[str, Any] | None) -> str:
    lines = [
        f"Under load: {loaded['concurrency']} keep-alive connections, closed loop",
        text_table(TABLE_HEADERS, table_rows(loaded)),
        "",
        "Paired within each round (median over rounds)",
        text_table(COMPARISON_HEADERS, comparison_rows(loaded)),
        "",
        *target_lines(loaded),
        *export_lines(loaded),
    ]
    if unloaded is not None:
        lines += [
            "",
            "Unloaded: 1 connection, one request at a time (latency without queueing)",
            text_table(TABLE_HEADERS, table_rows(unloaded)),
            "",
            text_table(COMPARISON_HEADERS, comparison_rows(unloaded)),
            "",
            *export_lines(unloaded),
        ]
    return "\n".join(lines)


def _md_bullets(lines: Sequence[str]) -> list[str]:
    return [f"- {' '.join(line.split())}" for line in lines]


def per_request(counts: Mapping[str, int], requests: int) -> str:
    return ", ".join(
        f"{name} {n / requests:.2f}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])
    )


def telemetry_notes(meta: dict[str, Any]) -> list[str]:
    lines = []
    probe = meta.get("console_probe")
    if probe is not None:
        lines.append(
            f"- casb+console: `OTEL_TRACES_EXPORTER=console OTEL_METRICS_EXPORTER=console "
            f"OTEL_METRIC_EXPORT_INTERVAL={meta['config']['metric_interval_ms']}`, stdout to "
            f"/dev/null. A probe instance with the same settings and its stdout to a file "
            f"printed {probe['spans']} spans ({probe['server_spans']} SERVER, "
            f"{probe['bytes']:,} bytes of JSON) for one request, and the metrics "
            f"{', '.join(f'`{m}`' for m in probe['metrics'])} when stopped."
        )
    final = meta.get("otlp_final")
    if final is not None:
        got, sent = final["receiver"], final["requests_sent"]
        verdict = (
            "PROBLEMS: " + "; ".join(final["problems"])
            if final["problems"]
            else f"{got['spans_by_kind'].get('SERVER', 0):,} SERVER spans and "
            f"`casb.requests` = {got['cumulative_sums'].get('casb.requests', 0):,}: one per "
            "request, nothing lost"
        )
        lines += [
            f"- casb+otlp: `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT` "
            f"(http/protobuf, default batch settings), "
            f"`OTEL_METRIC_EXPORT_INTERVAL={meta['config']['metric_interval_ms']}`, to "
            "`bench/support/otlp_sink.py` in its own process (it decodes every export with "
            "opentelemetry-proto and counts it). After every run the bench waited until "
            "the receiver held one SERVER span per request sent; the spans counted per "
            "run are in the tables' export lines.",
            f"- casb+otlp totals, after the proxy was stopped (which flushes its exporters): "
            f"{sent:,} requests sent (warm-ups and the readiness check included), "
            f"{got['spans']:,} spans received in {got['requests'].get('traces', 0):,} trace "
            f"exports, {got['metric_points']:,} metric points in "
            f"{got['requests'].get('metrics', 0):,} metric exports, {got['refused']} "
            f"refused; {verdict}.",
            f"- Spans per request by kind: {per_request(got['spans_by_kind'], sent)}; by "
            f"name: {per_request(got['spans_by_name'], sent)}.",
        ]
    return lines


def markdown(loaded: dict[str, Any], unloaded: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    cfg = meta["config"]
    names = ", ".join(cfg["variants"])
    lines = [
        "# Proxy overhead benchmark: casb with and without telemetry vs bare mitmdump vs direct",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- Python {meta['python']}, mitmproxy {meta['mitmproxy']}, casb {meta['casb']}, "
        f"opentelemetry-sdk {meta['opentelemetry_sdk']}",
        f"- CPU: {meta['cpu']} ({meta['nproc']} CPUs), {meta['platform']}",
        f"- {cfg['rounds']} rounds, each running {names} in turn; every figure is the "
        "median over rounds, comparisons are paired within a round first",
        f"- requests: `GET {CASB_PATH}` with a bearer token (casb variants, allowed by "
        f"`radiologist-read`); `GET {UPSTREAM_PATH}` with the same header (direct, "
        "mitmdump); the upstream answers `200 []`",
        "- casb: telemetry off (no `OTEL_*` variable); casb+console: spans and metrics "
        "to the console exporters, stdout to /dev/null; casb+otlp: OTLP/HTTP to a local "
        "receiver in its own process",
        "",
        f"## Under load: {cfg['concurrency']} keep-alive connections, "
        f"{cfg['requests']:,} requests per variant per round",
        "",
        *md_table(TABLE_HEADERS, table_rows(loaded)),
        "",
        "Paired within each round (median over rounds):",
        "",
        *md_table(COMPARISON_HEADERS, comparison_rows(loaded), text_cols=2),
        "",
        *_md_bullets([*target_lines(loaded), *export_lines(loaded)]),
    ]
    if unloaded is not None:
        lines += [
            "",
            f"## Unloaded: 1 connection, {cfg['latency_requests']:,} requests per variant "
            "per round",
            "",
            *md_table(TABLE_HEADERS, table_rows(unloaded)),
            "",
            *md_table(COMPARISON_HEADERS, comparison_rows(unloaded), text_cols=2),
            "",
            *_md_bullets(export_lines(unloaded)),
        ]
    lines += [
        "",
        "## Notes",
        "",
        "- Proxy CPU is the mitmdump process's utime + stime (all threads, the span "
        "exporter's included, from /proc/PID/stat) over the measured run, divided by the "
        "requests. It is the steadiest figure here: the load generator, the upstream and "
        f"the proxy share {meta['nproc']} CPUs, and mitmdump, single-threaded and "
        "CPU-bound, is the bottleneck.",
        "- Under load, p50 is mostly queueing: with N connections on a saturated proxy, "
        "p50 is about N x the proxy's CPU time per request, so an added p50 there is "
        "about N x the added CPU. The unloaded table shows the added latency of a single "
        "request.",
        "- One token is reused, so casb verifies its RS256 signature once and then hits "
        "its token cache: these are casb's warm-path costs.",
        *telemetry_notes(meta),
        f"- Every casb request was audited: after each run the variant's audit log held "
        f"one record per request sent ({meta['audit_records']:,} request records in total, "
        "warm-ups and readiness checks included). "
        + "; ".join(
            f"{v}'s log: " + ", ".join(f"{n:,} {t}" for t, n in types.items())
            for v, types in meta["audit_record_types"].items()
        )
        + " (signed checkpoints at casb's default interval).",
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


def profile_casb(
    rig: Rig, out: Path, requests: int, concurrency: int, warmup: int, variant: str = "casb"
) -> str:
    """One run of a casb variant under cProfile (a separate instance); the top entries
    of casb's code."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proxy, audit = rig.new_casb(
        variant,
        "profile",
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
        raise BenchError(f"profiled {variant} run answered {load.statuses}")
    if not out.exists():
        raise BenchError(f"cProfile wrote no {out} (mitmdump exit code {code})")
    print(
        f"profiled {variant}: {requests} requests, {audit_requests(audit)} audit request records, "
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
        f", audit {run.audit_records} = sent (+{run.audit_behind_at_end} late)"
        if run.audit_records is not None
        else ""
    )
    export = (
        f", {(run.spans_received or 0) / run.export_requests:.2f} spans/req exported "
        f"({run.server_spans_received}/{run.export_requests} SERVER, in "
        f"{run.export_wait_s:.1f} s)"
        if run.export_requests
        else ""
    )
    print(
        f"round {run.round}/{rounds} {run.variant:12} x{run.concurrency:<2} "
        f"{run.rps:8,.0f} req/s  p50 {run.p50_ms:7.3f}  p99 {run.p99_ms:7.3f} ms  "
        f"proxy CPU {_fmt(run.proxy_cpu_ms_per_req, '.3f')} ms/req  errors {run.errors}"
        f"{audit}{export}",
        file=sys.stderr,
    )


def parse_variants(text: str) -> tuple[str, ...]:
    """A comma-separated subset of VARIANTS, run in VARIANTS' order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(VARIANTS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(sorted(unknown)) or '(none given)'}: "
            f"choose from {', '.join(VARIANTS)}"
        )
    return tuple(v for v in VARIANTS if v in names)


def lost_spans(runs: Sequence[Run]) -> list[str]:
    return [
        f"round {r.round} x{r.concurrency}: {r.server_spans_received} SERVER spans for "
        f"{r.export_requests} requests"
        for r in runs
        if r.export_requests and r.server_spans_received != r.export_requests
    ]


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default=VARIANTS,
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="measured requests per variant per round (default 2000; --quick: 300)",
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
        help="rounds of all variants; medians reported (default 3; --quick: 1)",
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
        "queueing (default 400; --quick: 100; 0 skips)",
    )
    parser.add_argument(
        "--metric-interval-ms",
        type=int,
        default=METRIC_EXPORT_INTERVAL_MS,
        help="OTEL_METRIC_EXPORT_INTERVAL of the telemetry variants "
        f"(default {METRIC_EXPORT_INTERVAL_MS})",
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
        help="also run a casb variant once under cProfile, save the stats to FILE and "
        "print casb's top cumulative entries",
    )
    parser.add_argument(
        "--profile-variant",
        choices=CASB_VARIANTS,
        default="casb",
        help="the variant --profile runs (default casb; it must be among --variants)",
    )
    args = parser.parse_args(argv)
    variants: tuple[str, ...] = args.variants
    if args.requests is None:
        args.requests = 300 if args.quick else 2000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.latency_requests is None:
        args.latency_requests = 100 if args.quick else 400
    warmup = args.warmup if args.warmup is not None else max(args.concurrency, args.requests // 10)
    out: Path | None = args.out
    if out is None and not args.quick:
        out = REPO / "bench" / "results"
    if args.requests < 1 or args.concurrency < 1 or args.rounds < 1 or args.latency_requests < 0:
        parser.error("--requests, --concurrency and --rounds must be positive")
    if args.metric_interval_ms < 1:
        parser.error("--metric-interval-ms must be positive")
    if args.profile is not None and args.profile_variant not in variants:
        parser.error(f"--profile-variant {args.profile_variant} is not among --variants")
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
    audit_types: dict[str, dict[str, int]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="casb-bench-") as tmp:
        rig = Rig(Path(tmp), variants, args.metric_interval_ms)
        try:
            rig.start()
            for rnd in range(1, args.rounds + 1):
                for variant in variants:
                    plan = [(args.requests, args.concurrency, warmup)]
                    if args.latency_requests:
                        plan.append((args.latency_requests, 1, 0))
                    for requests, concurrency, warm in plan:
                        run = measure(rig, variant, rnd, requests, concurrency, warm)
                        runs.append(run)
                        print_run(run, args.rounds)
            for variant in CASB_VARIANTS:
                if variant in variants:
                    records, _ = rig.check_audit(variant)
                    audit_total += records
                    audit_types[variant] = audit_record_types(rig.audit_paths[variant])
                    print(
                        f"{variant} audit log: {records} records for {rig.sent[variant]} "
                        "requests sent (readiness check and warm-ups included)",
                        file=sys.stderr,
                    )
            if "casb+otlp" in variants:
                final = rig.finish_otlp()
                got = final["receiver"]
                print(
                    f"casb+otlp stopped: the receiver holds {got['spans']} spans "
                    f"({server_spans(got)} SERVER) and casb.requests = "
                    f"{got['cumulative_sums'].get('casb.requests')} for "
                    f"{final['requests_sent']} requests sent"
                    + (f"; PROBLEMS: {'; '.join(final['problems'])}" if final["problems"] else ""),
                    file=sys.stderr,
                )
            if args.profile is not None:
                for name in ("mitmdump", *CASB_VARIANTS):  # the profiled casb gets the CPU
                    proxy = rig.proxies.pop(name, None)
                    if proxy is not None:
                        proxy.stop()
                profile_text = profile_casb(
                    rig,
                    args.profile.resolve(),
                    args.requests,
                    args.concurrency,
                    warmup,
                    args.profile_variant,
                )
        finally:
            rig.stop()

    loaded = summarise([r for r in runs if r.concurrency == args.concurrency], variants)
    unloaded = (
        summarise([r for r in runs if r.concurrency == 1], variants)
        if args.latency_requests and args.concurrency != 1
        else None
    )
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "mitmproxy": _version("mitmproxy"),
        "casb": _version("casb"),
        "opentelemetry_sdk": _version("opentelemetry-sdk"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "clock_ticks_per_s": CLK_TCK,
        "duration_s": round(time.monotonic() - started, 1),
        "config": {
            "variants": list(variants),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "latency_requests": args.latency_requests,
            "warmup": warmup,
            "quick": args.quick,
            "metric_interval_ms": args.metric_interval_ms,
            "casb_path": CASB_PATH,
            "upstream_path": UPSTREAM_PATH,
            "policy": str(POLICY.relative_to(REPO)),
            "mitmdump_options": ["connection_strategy=lazy", "flow_detail=0", "-q"],
        },
        "audit_records": audit_total,
        "audit_record_types": audit_types,
        "audit_requests_sent": sum(rig.sent[v] for v in CASB_VARIANTS if v in variants),
        "audit_max_behind_at_end": max(
            (r.audit_behind_at_end or 0 for r in runs if r.variant in CASB_VARIANTS), default=0
        ),
        "console_probe": rig.console_probe,
        "otlp_final": rig.otlp_final,
    }

    print()
    print(
        f"casb proxy overhead, {meta['cpu']} ({meta['nproc']} CPUs), Python "
        f"{meta['python']}, mitmproxy {meta['mitmproxy']}; median of {args.rounds} "
        f"round(s) x {args.requests} requests, {args.concurrency} connections; "
        f"{meta['duration_s']:.0f} s in all"
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
    status = 0
    errors = sum(r.errors for r in runs)
    if errors:
        print(f"\n{errors} requests were not answered 200", file=sys.stderr)
        status = 1
    problems = lost_spans(runs) + (rig.otlp_final or {}).get("problems", [])
    if problems:
        print("\ncasb+otlp did not export every request: " + "; ".join(problems), file=sys.stderr)
        status = 1
    return status


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
