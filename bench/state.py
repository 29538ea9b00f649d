"""What the shared-state checks cost per request (memory vs Redis vs none), and how long a
published policy takes to reach three replicas sharing one Redis.

Run: ``.venv/bin/python bench/state.py`` (``--help`` for options; ``--quick`` is a smoke
run that records nothing unless ``--out`` is given; ``--parts checks`` or
``--parts propagation`` runs one half). Writes ``bench/results/state.json`` and
``state.md``. Everything runs on 127.0.0.1 on free ports, started here and stopped at the
end (also on Ctrl-C or an exception): one ``redis-server`` of the bench's own
(tests/support/redis_server.py; never the one on 6379), and for the second part an
upstream and three proxies.

**1. Per-request cost of the state checks**, in this process, through the real Pipeline
as ``Runtime.build`` assembles it for the proxy (production settings: identity from a
JWKS file with an ES256 key generated here, ``policies/hospital.yaml``, the JSONL audit
log with signed checkpoints, telemetry off): ``await pipeline.decide(request)`` then
``pipeline.finish(tx, status=200)``, one request after the other, each timed with
``time.perf_counter_ns``. The request is ``GET /pacs/studies?ModalitiesInStudy=CT`` with
a bearer token (roles=[radiologist], allowed by ``radiologist-read``). Variants:

* ``baseline``: no state checks (no revocation checker, no rate limit);
* ``memory``: ``state.url: memory://``, the revocation check and one rate limit
  (``limits.rate``: requests per hour for ``search``, far above what is sent);
* ``redis``: the same with ``state.url: redis://127.0.0.1:PORT/0``.

The audit stream (``state.audit_stream``) is off here: it ships the log off the request
path, and this part measures the request path. The policy distributor is not started
(its polling would add Redis traffic that is not per request).

Two access patterns, because the revocation checker keeps each token's answer for up to
0.5 s:

* ``warm``: one token reused: its revocation answer comes from the checker's cache (the
  store is asked again at most twice a second), so per request Redis sees only the rate
  limit (one EVALSHA);
* ``cold``: a fresh token (new ``jti``) per request, so every request asks the store for
  its revocation (one MGET) and charges the rate limit (one EVALSHA). The tokens are
  minted and verified once before the timed run (the verifier's token cache then holds
  them, as it would a client's token after its first request), so the difference is the
  revocation lookup, not JWT signature checks. ``baseline`` gets the same tokens.

Redis round trips per request come from the server: ``INFO commandstats`` before and
after each run; a round trip is a command a client sent (MGET, EVALSHA, ...), not one a
Lua script ran inside the server (TIME, GET, INCRBY, EXPIREAT: listed separately).
Each round runs every variant of both patterns (variant order rotated per round, a short
unmeasured warm-up first); figures are medians over rounds; comparisons with the
baseline are paired within a round first.

**2. Policy propagation across three replicas**: three ``mitmdump -s addons/casb.py``
processes (``state.url`` the bench's Redis, ``replica_id`` r1..r3, the default
``state.policy_poll_seconds`` unless ``--poll-seconds``) in front of one upstream (the
minimal HTTP server of bench/proxy_overhead.py). mitmdump exposes no admin API, so a
probe per replica sends the same search every ``--probe-interval-ms`` over a keep-alive
connection; the decision flips between ``policies/hospital.yaml`` (200) and a policy
that denies every search (403). Two paths, ``--trials`` each, alternating the policy:

* ``pubsub``: ``casb policy publish`` as the CLI runs it (casb.policy.cli_store.publish:
  compile against the destinations, then one MULTI/EXEC storing the bundle, moving the
  current pointer and PUBLISHing the version) on a store opened once;
* ``poll``: the notification lost: the bench moves ``<prefix>:policy:current`` to the
  other (already published) version with a bare SET and no PUBLISH, so each replica
  notices only when it next polls the pointer (every ``policy_poll_seconds``).

Before each trial the bench waits a random 0..``policy_poll_seconds`` (seeded), so the
change lands at a random point of the replicas' polling cycle. Per replica it records,
from the moment the publish (or SET) returned: the first probe answer with the new
decision (an upper bound, within one probe interval plus one request of the swap), and
the swap itself from the replica's audit log (the ``policy_change`` ``activated``
record's time, millisecond resolution, same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import multiprocessing
import os
import platform
import random
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(1, str(REPO))  # tests.support: the Redis server and the signing key

# The proxy-process plumbing, identity set-up and table helpers are proxy_overhead.py's.
from proxy_overhead import (  # noqa: E402
    ADDON,
    CASB_PATH,
    METRIC_EXPORT_INTERVAL_MS,
    MITMDUMP,
    POLICY,
    BenchError,
    Mitmdump,
    _fmt,
    _interrupt,
    _read_response,
    _version,
    cpu_model,
    make_identity,
    md_table,
    percentile,
    proxy_env,
    request_bytes,
    text_table,
    upstream_process,
    write_casb_config,
)

from casb.config import Settings, StateSettings, load_settings  # noqa: E402
from casb.exchange import Forward, IncomingRequest  # noqa: E402
from casb.pipeline import Pipeline  # noqa: E402
from casb.policy import cli_store  # noqa: E402
from casb.runtime import Runtime  # noqa: E402
from casb.state import StateStore, open_state  # noqa: E402
from tests.jwks_server import TestKey, jwks_of  # noqa: E402
from tests.support.audit_keys import audit_settings  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

ISSUER, AUDIENCE = "https://idp.bench.test/realms/imaging", "casb"
SUBJECT = "bench-radiologist"
CHECK_VARIANTS = ("baseline", "memory", "redis")
PATTERNS = ("warm", "cold")
# What each variant is compared with (paired within a round).
CHECK_COMPARISONS = (("memory", "baseline"), ("redis", "baseline"), ("redis", "memory"))
RATE_LIMIT = {
    "name": "bench-search",
    "actions": ["search"],
    "requests": 1_000_000_000,  # never reached: every request is admitted and counted
    "window_seconds": 3600,
}
CHECKS_PREFIX = "bench-checks"
REPLICAS_PREFIX = "bench-replicas"
REPLICA_IDS = ("r1", "r2", "r3")
# The commands the request path sends (round trips): the revocation lookup (MGET) and the
# rate-limit script (EVALSHA; EVAL / SCRIPT LOAD when the server lacks the script). The
# other commands commandstats counts during a run (TIME, GET, INCRBY, EXPIREAT) are run
# by that script inside the server; they are reported, not counted as round trips.
CLIENT_COMMANDS = frozenset({"mget", "evalsha", "eval", "script|load"})
ADMIN_COMMANDS = frozenset({"info", "ping", "hello", "client|setname", "client|setinfo"})

DENY_SEARCH = """\
version: 1
description: bench/state.py - nobody searches; radiologists retrieve.
roles:
  radiologist:
    description: Reads studies.
rules:
  - id: bench-no-search
    description: Nobody searches.
    effect: deny
    roles: ["*"]
    actions: [search]
    destinations: ["*"]
  - id: bench-radiologist-retrieve
    description: Radiologists retrieve.
    effect: allow
    roles: [radiologist]
    actions: [retrieve]
    destinations: [pacs]
"""
ALLOWED, DENIED = 200, 403
START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 15.0  # a replica must serve a known state within this at set-up
AUDIT_SETTLE_S = 5.0
SEED = 7


# == 1. per-request cost of the state checks ============================================


def check_settings(workdir: Path, jwks: Path, variant: str, redis_url: str) -> Settings:
    """Production settings as the proxy would load them; `variant` picks the store and
    whether the rate limit is configured."""
    workdir.mkdir(parents=True, exist_ok=True)
    uid_key = workdir / "dlp-uid.key"  # hospital.yaml's research profiles de-identify
    uid_key.write_text("bench-only-uid-key-0123456789abcdef")
    state: dict[str, Any] = {
        "url": redis_url if variant == "redis" else "memory://",
        "prefix": CHECKS_PREFIX,
        "replica_id": f"bench-{variant}",
        "audit_stream": {"enabled": False},
    }
    return Settings(
        environment="production",
        state_dir=workdir,
        destinations={
            "pacs": {"upstream": "https://pacs.example.org:8443/dicom-web", "route": "/pacs"},
            "research": {"upstream": "https://research.example.org/dw", "route": "/research"},
        },
        identity={"issuer": ISSUER, "audience": [AUDIENCE], "jwks_file": str(jwks)},
        policy={"paths": [str(POLICY)]},
        audit=audit_settings(workdir),
        dlp={"uid_key_file": str(uid_key)},
        state=state,
        limits={"rate": [RATE_LIMIT]} if variant != "baseline" else {},
    )


def mint(key: TestKey) -> str:
    """A token with its own jti (an hour's lifetime)."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "iat": now,
        "exp": now + 3600,
        "roles": ["radiologist"],
        "jti": uuid.uuid4().hex,
    }
    return key.sign(claims)


def incoming(token: str) -> IncomingRequest:
    return IncomingRequest(
        method="GET",
        target=CASB_PATH,
        headers=[("Authorization", f"Bearer {token}"), ("Accept", "application/dicom+json")],
        client_ip="10.1.2.3",
        client_tls=True,
    )


class RedisStats:
    """What the server did between two samples: calls per command, and its CPU."""

    def __init__(self, server: RedisServer) -> None:
        self._client = server.client()

    def sample(self) -> tuple[dict[str, int], float]:
        commands = {
            name.removeprefix("cmdstat_"): int(v["calls"])
            for name, v in self._client.info("commandstats").items()
        }
        cpu = self._client.info("cpu")
        return commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def close(self) -> None:
        self._client.close()


@dataclass
class CheckRun:
    round: int
    pattern: str  # warm | cold
    variant: str  # baseline | memory | redis
    requests: int
    errors: int
    wall_s: float
    us_per_req: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    cpu_us_per_req: float  # this process: the pipeline and the Redis client
    redis_round_trips_per_req: float | None = None
    redis_cpu_us_per_req: float | None = None  # the redis-server process
    redis_commands: dict[str, int] = field(default_factory=dict)  # calls in this run


async def one_request(pipeline: Pipeline, req: IncomingRequest) -> bool:
    """decide + finish (the audit record): True when it would be forwarded."""
    tx = await pipeline.decide(req)
    forwarded = isinstance(tx.outcome, Forward)
    pipeline.finish(tx, status=200 if forwarded else 403, bytes_out=2 if forwarded else 0)
    return forwarded


async def measure_checks(
    rnd: int,
    pattern: str,
    variant: str,
    pipeline: Pipeline,
    warmup: Sequence[IncomingRequest],
    reqs: Sequence[IncomingRequest],
    stats: RedisStats | None,
) -> CheckRun:
    for req in warmup:
        await one_request(pipeline, req)
    gc.collect()
    before = stats.sample() if stats is not None else None
    perf = time.perf_counter_ns
    latencies: list[int] = []
    errors = 0
    cpu0 = time.process_time()
    t_start = perf()
    for req in reqs:
        t0 = perf()
        tx = await pipeline.decide(req)
        forwarded = isinstance(tx.outcome, Forward)
        pipeline.finish(tx, status=200 if forwarded else 403, bytes_out=2 if forwarded else 0)
        latencies.append(perf() - t0)
        errors += not forwarded
    wall_ns = perf() - t_start
    cpu = time.process_time() - cpu0
    n = len(latencies)
    lat = sorted(latencies)
    run = CheckRun(
        round=rnd,
        pattern=pattern,
        variant=variant,
        requests=n,
        errors=errors,
        wall_s=wall_ns / 1e9,
        us_per_req=wall_ns / n / 1e3,
        p50_us=percentile(lat, 0.50) / 1e3,
        p90_us=percentile(lat, 0.90) / 1e3,
        p99_us=percentile(lat, 0.99) / 1e3,
        max_us=lat[-1] / 1e3,
        cpu_us_per_req=cpu * 1e6 / n,
    )
    if stats is not None and before is not None:
        after = stats.sample()
        calls = {
            name: c - before[0].get(name, 0)
            for name, c in after[0].items()
            if name not in ADMIN_COMMANDS and c - before[0].get(name, 0)
        }
        run.redis_commands = dict(sorted(calls.items()))
        run.redis_round_trips_per_req = (
            sum(c for name, c in calls.items() if name in CLIENT_COMMANDS) / n
        )
        run.redis_cpu_us_per_req = (after[1] - before[1]) * 1e6 / n
    return run


def print_check(run: CheckRun, rounds: int) -> None:
    trips = (
        f"  Redis {run.redis_round_trips_per_req:.3f} round trips/req {dict(run.redis_commands)}"
        if run.redis_round_trips_per_req is not None
        else ""
    )
    print(
        f"round {run.round}/{rounds} {run.pattern:4} {run.variant:8} "
        f"{run.us_per_req:7.1f} us/req  p50 {run.p50_us:7.1f}  p99 {run.p99_us:7.1f} us  "
        f"CPU {run.cpu_us_per_req:7.1f} us/req  errors {run.errors}{trips}",
        file=sys.stderr,
    )


async def run_checks(
    workdir: Path, server: RedisServer, rounds: int, requests: int, warmup: int
) -> list[CheckRun]:
    """Every round: both patterns, every variant (order rotated per round)."""
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[name]  # telemetry off, as in proxy_overhead's `casb` variant
    workdir.mkdir(parents=True, exist_ok=True)
    key = TestKey.generate("ES256")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(jwks_of(key)))
    runtimes: dict[str, Runtime] = {}
    stats = RedisStats(server)
    runs: list[CheckRun] = []
    try:
        for variant in CHECK_VARIANTS:
            rt = Runtime.build(check_settings(workdir / variant, jwks, variant, server.url))
            runtimes[variant] = rt
            if variant == "baseline":
                rt.pipeline.revocation = None  # the state checks off
            checks = (rt.pipeline.revocation is not None, rt.pipeline.rate_limiter is not None)
            want = (variant != "baseline",) * 2
            if checks != want or rt.state.backend != ("redis" if variant == "redis" else "memory"):
                raise BenchError(f"{variant}: built with checks {checks} on {rt.state.backend}")
        warm_req = incoming(mint(key))
        for variant, rt in runtimes.items():  # a first request must be forwarded
            if not await one_request(rt.pipeline, warm_req):
                raise BenchError(f"{variant}: the first request was not forwarded")
        for rnd in range(1, rounds + 1):
            cold_warmup = [mint(key) for _ in range(warmup)]
            cold = [mint(key) for _ in range(requests)]
            shift = (rnd - 1) % len(CHECK_VARIANTS)
            order = CHECK_VARIANTS[shift:] + CHECK_VARIANTS[:shift]
            for pattern in PATTERNS:
                for variant in order:
                    pipeline = runtimes[variant].pipeline
                    if pattern == "warm":
                        warm_reqs = [warm_req] * warmup
                        reqs = [warm_req] * requests
                    else:
                        for token in (*cold_warmup, *cold):  # into the token cache
                            await pipeline.verifier.verify(token)
                        warm_reqs = [incoming(t) for t in cold_warmup]
                        reqs = [incoming(t) for t in cold]
                    run = await measure_checks(
                        rnd,
                        pattern,
                        variant,
                        pipeline,
                        warm_reqs,
                        reqs,
                        stats if variant == "redis" else None,
                    )
                    runs.append(run)
                    print_check(run, rounds)
    finally:
        stats.close()
        for rt in runtimes.values():
            await rt.aclose()
    return runs


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


CHECK_METRICS = (
    "us_per_req",
    "p50_us",
    "p90_us",
    "p99_us",
    "cpu_us_per_req",
    "redis_round_trips_per_req",
    "redis_cpu_us_per_req",
)
CHECK_DELTAS = (
    ("added_us_per_req", "us_per_req", "diff"),
    ("ratio", "us_per_req", "ratio"),
    ("added_p50_us", "p50_us", "diff"),
    ("added_p99_us", "p99_us", "diff"),
    ("added_cpu_us_per_req", "cpu_us_per_req", "diff"),
)


def summarise_checks(runs: Sequence[CheckRun]) -> dict[str, Any]:
    """Per pattern and variant, medians over rounds; comparisons paired per round."""
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    comparisons: dict[str, list[dict[str, Any]]] = {}
    rounds = sorted({r.round for r in runs})
    for pattern in PATTERNS:
        for v in CHECK_VARIANTS:
            rs = [r for r in runs if r.pattern == pattern and r.variant == v]
            if not rs:
                continue
            n = sum(r.requests for r in rs)
            calls: dict[str, int] = {}
            for r in rs:
                for name, c in r.redis_commands.items():
                    calls[name] = calls.get(name, 0) + c
            variants.setdefault(pattern, {})[v] = {
                **{m: _median([getattr(r, m) for r in rs]) for m in CHECK_METRICS},
                "requests": n,
                "errors": sum(r.errors for r in rs),
                "redis_commands_per_req": {k: c / n for k, c in sorted(calls.items())},
            }
        for v, base in CHECK_COMPARISONS:
            comp: dict[str, Any] = {"variant": v, "vs": base}
            for name, metric, op in CHECK_DELTAS:
                per: list[float | None] = []
                for rnd in rounds:
                    got = {r.variant: r for r in runs if r.round == rnd and r.pattern == pattern}
                    a, b = got.get(v), got.get(base)
                    if a is None or b is None:
                        per.append(None)
                        continue
                    x, y = getattr(a, metric), getattr(b, metric)
                    per.append(x / y if op == "ratio" else x - y)
                comp[name], comp[f"{name}_per_round"] = _median(per), per
            comparisons.setdefault(pattern, []).append(comp)
    return {"variants": variants, "comparisons": comparisons}


CHECK_HEADERS = [
    "pattern",
    "variant",
    "us/req",
    "p50 us",
    "p90 us",
    "p99 us",
    "CPU us/req",
    "Redis round trips/req",
    "redis-server CPU us/req",
    "errors",
]
CHECK_COMPARISON_HEADERS = [
    "pattern",
    "variant",
    "vs",
    "added us/req",
    "ratio",
    "added p50 us",
    "added p99 us",
    "added CPU us/req",
]


def check_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for pattern, by in summary["variants"].items():
        for v, s in by.items():
            rows.append(
                [
                    pattern,
                    v,
                    _fmt(s["us_per_req"], ".1f"),
                    _fmt(s["p50_us"], ".1f"),
                    _fmt(s["p90_us"], ".1f"),
                    _fmt(s["p99_us"], ".1f"),
                    _fmt(s["cpu_us_per_req"], ".1f"),
                    _fmt(s["redis_round_trips_per_req"], ".3f"),
                    _fmt(s["redis_cpu_us_per_req"], ".1f"),
                    str(s["errors"]),
                ]
            )
    return rows


def check_comparison_rows(summary: dict[str, Any]) -> list[list[str]]:
    return [
        [
            pattern,
            c["variant"],
            c["vs"],
            _fmt(c["added_us_per_req"], "+.1f"),
            _fmt(c["ratio"], ".3f"),
            _fmt(c["added_p50_us"], "+.1f"),
            _fmt(c["added_p99_us"], "+.1f"),
            _fmt(c["added_cpu_us_per_req"], "+.1f"),
        ]
        for pattern, comps in summary["comparisons"].items()
        for c in comps
    ]


def check_findings(summary: dict[str, Any]) -> list[str]:
    """One line per pattern: what the Redis checks add, and the round trips."""
    lines = []
    for pattern in PATTERNS:
        by = summary["variants"].get(pattern)
        comps = {(c["variant"], c["vs"]): c for c in summary["comparisons"].get(pattern, [])}
        if not by or "redis" not in by:
            continue
        rb, mb, rm = (
            comps.get(("redis", "baseline")),
            comps.get(("memory", "baseline")),
            comps.get(("redis", "memory")),
        )
        per_req = by["redis"]["redis_commands_per_req"]
        sent = ", ".join(f"{n.upper()} {c:.3f}" for n, c in per_req.items() if n in CLIENT_COMMANDS)
        inside = ", ".join(n.upper() for n in per_req if n not in CLIENT_COMMANDS)
        what = (
            "one token reused: revocation answered from the 0.5 s cache"
            if pattern == "warm"
            else "a fresh jti per request: every request asks the store for its revocation"
        )
        lines.append(
            f"{pattern} ({what}): the checks add {_fmt(rb and rb['added_us_per_req'], '+.1f')} "
            f"us/request with Redis ({_fmt(rb and rb['ratio'], '.2f')}x the baseline's "
            f"{_fmt(by['baseline']['us_per_req'], '.1f')} us), "
            f"{_fmt(mb and mb['added_us_per_req'], '+.1f')} us with the memory backend; "
            f"Redis vs memory {_fmt(rm and rm['added_us_per_req'], '+.1f')} us "
            f"({_fmt(rm and rm['ratio'], '.2f')}x); "
            f"{_fmt(by['redis']['redis_round_trips_per_req'], '.3f')} Redis round trips per "
            f"request ({sent}; run inside the script: {inside or 'nothing'})"
        )
    return lines


# == 2. policy propagation across three replicas ========================================


class Upstream:
    """proxy_overhead's minimal upstream (200 `[]` to anything), in its own process."""

    def __init__(self) -> None:
        self.port = 0
        self._proc: BaseProcess | None = None

    def start(self) -> Upstream:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=upstream_process, args=(child,), daemon=True, name="casb-bench-upstream"
        )
        self._proc.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            raise BenchError("the upstream did not report its port")
        self.port = int(parent.recv())
        parent.close()
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join()


class Probe:
    """One keep-alive connection to a replica, sending the bench's search."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self._request = request_bytes(port, CASB_PATH, token)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def status(self) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self._reader is not None
        self._writer.write(self._request)
        status, close = await _read_response(self._reader)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@dataclass
class Seen:
    """One replica in one trial; times in ms from the moment the change returned."""

    first_answer_ms: float | None = None  # first probe answer with the new decision
    sent_ms: float | None = None  # when that probe request was sent
    activated_ms: float | None = None  # the replica's audit record of the swap
    probes: int = 0
    unexpected: dict[str, int] = field(default_factory=dict)  # other statuses seen


@dataclass
class Trial:
    path: str  # pubsub | poll
    n: int
    policy: str  # deny | allow
    version: str
    phase_wait_s: float
    change_ms: float  # the publish (or SET) call itself
    replicas: list[Seen]


class AuditTail:
    """New records of a replica's audit log since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [json.loads(line) for line in complete if line.strip()]


def audit_epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class Replicas:
    """The upstream and three casb proxies sharing the bench's Redis."""

    def __init__(self, workdir: Path, server: RedisServer, poll_seconds: float | None) -> None:
        self.workdir = workdir
        self.server = server
        self.poll_seconds = poll_seconds
        self.upstream = Upstream()
        self.proxies: list[Mitmdump] = []
        self.audits: list[AuditTail] = []
        self.config_path = workdir / "r1" / "casb.yaml"
        self.token = ""

    def start(self) -> None:
        self.upstream.start()
        jwks, self.token = make_identity(self.workdir)
        env = proxy_env("casb", None, METRIC_EXPORT_INTERVAL_MS)
        for rid in REPLICA_IDS:
            workdir = self.workdir / rid
            workdir.mkdir()
            config, audit = write_casb_config(workdir, self.upstream.port, jwks)
            settings = yaml.safe_load(config.read_text())
            state: dict[str, Any] = {
                "url": self.server.url,
                "prefix": REPLICAS_PREFIX,
                "replica_id": rid,
            }
            if self.poll_seconds is not None:
                state["policy_poll_seconds"] = self.poll_seconds
            settings["state"] = state
            config.write_text(yaml.safe_dump(settings, sort_keys=False))
            extra = ["-s", str(ADDON), "--set", f"casb_config={config}"]
            self.proxies.append(Mitmdump(rid, workdir, self.upstream.port, extra, env=env))
            self.audits.append(AuditTail(audit))
        for proxy in self.proxies:
            proxy.start()
        for proxy in self.proxies:
            proxy.wait_ready()

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        self.proxies = []
        self.upstream.stop()


async def settle(probes: Sequence[Probe], expected: int, what: str) -> None:
    """Every replica answers `expected` (polled until a deadline)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    for i, probe in enumerate(probes):
        while (status := await probe.status()) != expected:
            if time.monotonic() > deadline:
                raise BenchError(f"replica r{i + 1} answers {status}, not {expected}: {what}")
            await asyncio.sleep(0.01)  # polling pace, not a synchronisation


async def watch(
    probe: Probe,
    expected: int,
    old: int,
    seen: Seen,
    started: asyncio.Event,
    changed: list[int],
    interval_s: float,
    deadline: float,
) -> None:
    """Probe every `interval_s` until the new decision shows (or the deadline)."""
    perf = time.perf_counter_ns
    while True:
        t_sent = perf()
        try:
            status = await probe.status()
        except BaseException:
            started.set()  # the trial must not wait for this probe: gather() raises
            raise
        t_recv = perf()
        seen.probes += 1
        if not started.is_set():
            started.set()
            if status != old:
                raise BenchError(f"before the change a replica answered {status}, not {old}")
        elif status == expected and changed:
            seen.sent_ms = (t_sent - changed[0]) / 1e6
            seen.first_answer_ms = (t_recv - changed[0]) / 1e6
            return
        elif status != old and status != expected:
            seen.unexpected[str(status)] = seen.unexpected.get(str(status), 0) + 1
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(max(0.0, interval_s - (perf() - t_sent) / 1e9))


async def trial(
    path: str,
    n: int,
    policy: str,
    version: str,
    change: Callable[[], Awaitable[None]],
    probes: Sequence[Probe],
    audits: Sequence[AuditTail],
    *,
    phase_wait_s: float,
    interval_s: float,
    timeout_s: float,
) -> Trial:
    expected, old = (DENIED, ALLOWED) if policy == "deny" else (ALLOWED, DENIED)
    for tail in audits:
        tail.read()  # skip what came before this trial
    await asyncio.sleep(phase_wait_s)  # a random point of the replicas' polling cycle
    seen = [Seen() for _ in probes]
    started = [asyncio.Event() for _ in probes]
    changed: list[int] = []  # perf_counter_ns when the change returned
    deadline = time.monotonic() + timeout_s
    tasks = [
        asyncio.create_task(watch(p, expected, old, s, e, changed, interval_s, deadline))
        for p, s, e in zip(probes, seen, started, strict=True)
    ]
    try:
        for e in started:  # every probe has seen the old decision: then change
            await e.wait()
        t_call = time.perf_counter_ns()
        await change()
        changed.append(time.perf_counter_ns())
        wall_changed = time.time()
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    for s, tail in zip(seen, audits, strict=True):
        found = await activation(tail, version)
        if found is not None:
            s.activated_ms = (found - wall_changed) * 1000
    return Trial(
        path=path,
        n=n,
        policy=policy,
        version=version,
        phase_wait_s=phase_wait_s,
        change_ms=(changed[0] - t_call) / 1e6,
        replicas=seen,
    )


async def activation(tail: AuditTail, version: str) -> float | None:
    """The time of the replica's `activated` record for `version` (epoch seconds)."""
    deadline = time.monotonic() + AUDIT_SETTLE_S
    while time.monotonic() < deadline:
        for rec in tail.read():
            if (
                rec.get("type") == "policy_change"
                and rec.get("event") == "activated"
                and rec.get("policy_version") == version
            ):
                return audit_epoch(rec["time"])
        await asyncio.sleep(0.02)  # polling pace for a file another process writes
    return None


async def publish_file(settings: Settings, store: StateStore, policy: Path) -> str:
    """`casb policy publish FILE` as the CLI runs it (compile, then publish); the version."""
    args = argparse.Namespace(files=[str(policy)], author="bench", comment="bench/state.py")
    out = io.StringIO()
    code = await cli_store.publish(args, settings, store, out)
    found = re.search(r"published (sha256:[0-9a-f]{64})", out.getvalue())
    if code != 0 or found is None:
        raise BenchError(f"casb policy publish {policy} exited {code}: {out.getvalue()!r}")
    return found.group(1)


async def run_propagation(
    rig: Replicas, trials: int, interval_s: float, rng: random.Random
) -> tuple[list[Trial], float]:
    settings = load_settings(rig.config_path)
    poll_s = settings.state.policy_poll_seconds
    deny_file = rig.workdir / "deny-search.yaml"
    deny_file.write_text(DENY_SEARCH)
    files = {"deny": deny_file, "allow": POLICY}
    store = open_state(settings.state, state_dir=rig.workdir)
    raw = redis.asyncio.Redis(host="127.0.0.1", port=rig.server.port)
    probes = [Probe(p.port, rig.token) for p in rig.proxies]
    results: list[Trial] = []
    try:
        await settle(probes, ALLOWED, "at start (the policy files)")
        versions = {"deny": await publish_file(settings, store, deny_file)}
        await settle(probes, DENIED, "after publishing the deny policy")
        versions["allow"] = await publish_file(settings, store, POLICY)
        await settle(probes, ALLOWED, "after publishing the hospital policy")
        current = f"{REPLICAS_PREFIX}:policy:current"
        serving = "allow"
        for path in ("pubsub", "poll"):
            for n in range(1, trials + 1):
                policy = serving = "deny" if serving == "allow" else "allow"  # flip

                async def change(policy: str = policy, path: str = path) -> None:
                    if path == "pubsub":
                        await publish_file(settings, store, files[policy])
                    else:  # the pointer moves and nobody is told: polling must find it
                        await raw.set(current, versions[policy])

                t = await trial(
                    path,
                    n,
                    policy,
                    versions[policy],
                    change,
                    probes,
                    rig.audits,
                    phase_wait_s=rng.uniform(0, poll_s),
                    interval_s=interval_s,
                    timeout_s=poll_s + 5,
                )
                results.append(t)
                print_trial(t, trials)
                if any(s.first_answer_ms is None for s in t.replicas):
                    await settle(
                        probes, DENIED if policy == "deny" else ALLOWED, "after a missed trial"
                    )
        if serving != "allow":  # leave the hospital policy current
            await publish_file(settings, store, POLICY)
    finally:
        for probe in probes:
            await probe.close()
        await raw.aclose()
        await store.aclose()
    return results, poll_s


def print_trial(t: Trial, trials: int) -> None:
    def ms(v: float | None) -> str:
        return "never" if v is None else f"{v:6.1f}"

    print(
        f"{t.path:6} {t.n:2}/{trials} -> {t.policy:5} (wait {t.phase_wait_s:4.2f} s, change "
        f"{t.change_ms:5.1f} ms)  first answer "
        + " ".join(ms(s.first_answer_ms) for s in t.replicas)
        + " ms  swap (audit) "
        + " ".join(ms(s.activated_ms) for s in t.replicas)
        + " ms  probes "
        + " ".join(str(s.probes) for s in t.replicas),
        file=sys.stderr,
    )


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None, "max": None, "min": None}
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * 9 // 10))
    return {
        "median": statistics.median(ordered),
        "p90": ordered[rank - 1],
        "max": ordered[-1],
        "min": ordered[0],
    }


def summarise_propagation(trials: Sequence[Trial]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in ("pubsub", "poll"):
        ts = [t for t in trials if t.path == path]
        if not ts:
            continue
        first = [s.first_answer_ms for t in ts for s in t.replicas]
        swaps = [s.activated_ms for t in ts for s in t.replicas]
        per_trial = [[s.first_answer_ms for s in t.replicas] for t in ts]
        last = [max(v for v in vs if v is not None) for vs in per_trial if None not in vs]
        out[path] = {
            "trials": len(ts),
            "samples": len(first),
            "missed": sum(v is None for v in first),
            "first_answer_ms": _stats([v for v in first if v is not None]),
            "all_replicas_ms": _stats(last),
            "swap_ms": _stats([v for v in swaps if v is not None]),
            "swap_missing": sum(v is None for v in swaps),
            "first_answer_ms_by_policy": {
                policy: _stats(
                    [
                        s.first_answer_ms
                        for t in ts
                        if t.policy == policy
                        for s in t.replicas
                        if s.first_answer_ms is not None
                    ]
                )
                for policy in ("deny", "allow")
            },
            "change_ms": _stats([t.change_ms for t in ts]),
            "probes": sum(s.probes for t in ts for s in t.replicas),
            "unexpected": sum(sum(s.unexpected.values()) for t in ts for s in t.replicas),
        }
    return out


PROPAGATION_HEADERS = [
    "path",
    "trials",
    "first answer median ms",
    "first answer p90 ms",
    "first answer max ms",
    "all 3 median ms",
    "all 3 max ms",
    "swap median ms",
    "swap max ms",
    "change call median ms",
    "missed",
]
PATH_LABELS = {
    "pubsub": "pubsub (casb policy publish)",
    "poll": "poll (notification lost)",
}


def propagation_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for path, s in summary.items():
        f, a, w, c = s["first_answer_ms"], s["all_replicas_ms"], s["swap_ms"], s["change_ms"]
        rows.append(
            [
                PATH_LABELS[path],
                str(s["trials"]),
                _fmt(f["median"], ".1f"),
                _fmt(f["p90"], ".1f"),
                _fmt(f["max"], ".1f"),
                _fmt(a["median"], ".1f"),
                _fmt(a["max"], ".1f"),
                _fmt(w["median"], ".0f"),
                _fmt(w["max"], ".0f"),
                _fmt(c["median"], ".1f"),
                str(s["missed"]),
            ]
        )
    return rows


def propagation_findings(summary: dict[str, Any], poll_s: float, interval_ms: float) -> list[str]:
    lines = []
    p, q = summary.get("pubsub"), summary.get("poll")
    if p is not None:
        by = p["first_answer_ms_by_policy"]
        lines.append(
            f"pubsub: a replica served the new decision a median "
            f"{_fmt(p['first_answer_ms']['median'], '.1f')} ms (max "
            f"{_fmt(p['first_answer_ms']['max'], '.1f')} ms) after `casb policy publish` "
            f"returned; all three by a median {_fmt(p['all_replicas_ms']['median'], '.1f')} ms "
            f"(max {_fmt(p['all_replicas_ms']['max'], '.1f')} ms); {p['missed']} of "
            f"{p['samples']} replica-trials missed the {poll_s + 5:g} s deadline. Median by "
            f"direction: to the deny policy {_fmt(by['deny']['median'], '.1f')} ms, back to "
            f"hospital.yaml {_fmt(by['allow']['median'], '.1f')} ms (a replica fetches the "
            "bundle, compiles it and builds its DLP inspectors before it serves it)"
        )
    if q is not None:
        lines.append(
            f"poll (no notification; policy_poll_seconds {poll_s:g}): median "
            f"{_fmt(q['first_answer_ms']['median'], '.0f')} ms, max "
            f"{_fmt(q['first_answer_ms']['max'], '.0f')} ms per replica; all three by a "
            f"median {_fmt(q['all_replicas_ms']['median'], '.0f')} ms (max "
            f"{_fmt(q['all_replicas_ms']['max'], '.0f')} ms): a replica that misses the "
            f"notification catches up within one poll interval plus a fetch"
        )
    if p is not None or q is not None:
        lines.append(
            f"first answer: upper bound, within one probe interval ({interval_ms:g} ms) plus "
            "one request of the swap; swap (audit): the replica's `policy_change activated` "
            "record time (ms resolution, truncated, so it can read up to 1 ms early)"
        )
    return lines


# == reporting ============================================================================


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def busy_processes() -> list[str]:
    """pytest or mitmdump processes not started by this bench (other work on the box)."""
    mine = os.getpid()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == mine:
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        text = b" ".join(argv).decode(errors="replace").strip()
        if ppid != mine and re.search(r"pytest|mitmdump", text):
            found.append(f"{proc.name} {text[:100]}")
    return found


def report(checks: dict[str, Any] | None, prop: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    lines: list[str] = []
    if checks is not None:
        lines += [
            "State checks per request, in process (decide + finish), median of rounds",
            text_table(CHECK_HEADERS, check_rows(checks)),
            "",
            "Paired within each round (median over rounds)",
            text_table(CHECK_COMPARISON_HEADERS, check_comparison_rows(checks)),
            "",
            *check_findings(checks),
        ]
    if prop is not None:
        cfg = meta["config"]
        lines += [
            *([""] if lines else []),
            f"Policy propagation to 3 replicas (policy_poll_seconds "
            f"{meta['policy_poll_seconds']:g}, probes every {cfg['probe_interval_ms']:g} ms)",
            text_table(PROPAGATION_HEADERS, propagation_rows(prop)),
            "",
            *propagation_findings(prop, meta["policy_poll_seconds"], cfg["probe_interval_ms"]),
        ]
    return "\n".join(lines)


def markdown(
    checks: dict[str, Any] | None, prop: dict[str, Any] | None, meta: dict[str, Any]
) -> str:
    cfg = meta["config"]
    lines = [
        "# Shared-state benchmark: per-request cost of the state checks, policy propagation",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- Python {meta['python']}, mitmproxy {meta['mitmproxy']}, redis-py "
        f"{meta['redis_py']}, {meta['redis_server']}, casb {meta['casb']}",
        f"- CPU: {meta['cpu']} ({meta['nproc']} CPUs), {meta['platform']}; load average at "
        "start " + " ".join(f"{x:.2f}" for x in meta["loadavg_at_start"]),
        f"- machine quiet at start: {meta['quiet']}",
        f"- {meta['duration_s']:.0f} s in all",
    ]
    if checks is not None:
        lines += [
            "",
            f"## State checks per request: {cfg['rounds']} rounds x {cfg['requests']:,} "
            "requests per variant and pattern",
            "",
            "In this process, through the real Pipeline built by `Runtime.build` (production "
            "settings, JWKS file, `policies/hospital.yaml`, audit log with signed "
            "checkpoints, telemetry off): `decide` + `finish` of `GET "
            f"{CASB_PATH}` (allowed), one request after the other. baseline: no state "
            "checks; memory / redis: the revocation check and one rate limit (`limits.rate`, "
            "requests per hour for `search`) on `memory://` / `redis://` (a local "
            "redis-server on loopback). warm: one token reused (its revocation answer is "
            "cached for 0.5 s); cold: a fresh jti per request (every request asks the store; "
            "the tokens were verified beforehand, so no JWT signature is checked in the "
            "timed run).",
            "",
            *md_table(CHECK_HEADERS, check_rows(checks), text_cols=2),
            "",
            "Paired within each round (median over rounds):",
            "",
            *md_table(CHECK_COMPARISON_HEADERS, check_comparison_rows(checks), text_cols=3),
            "",
            *(f"- {line}" for line in check_findings(checks)),
        ]
    if prop is not None:
        lines += [
            "",
            f"## Policy propagation to 3 replicas: {cfg['trials']} trials per path",
            "",
            "Three `mitmdump -s addons/casb.py` processes sharing the redis-server "
            f"(`state.policy_poll_seconds: {meta['policy_poll_seconds']:g}`), one probe "
            f"connection per replica sending the search every {cfg['probe_interval_ms']:g} "
            "ms; the decision flips between `policies/hospital.yaml` (200) and a "
            "deny-every-search policy (403). Times from the moment the change returned. "
            "pubsub: `casb policy publish` (casb.policy.cli_store.publish on a store opened "
            "once: compile, then one MULTI/EXEC that stores the bundle, moves the pointer and "
            "PUBLISHes). poll: the pointer moved with a bare SET and no PUBLISH (the "
            "notification lost), so replicas find it by polling. Before each trial a random "
            "wait of 0..policy_poll_seconds puts the change at a random point of the polling "
            "cycle.",
            "",
            *md_table(PROPAGATION_HEADERS, propagation_rows(prop)),
            "",
            *(
                f"- {line}"
                for line in propagation_findings(
                    prop, meta["policy_poll_seconds"], cfg["probe_interval_ms"]
                )
            ),
        ]
    lines += [
        "",
        "## Notes",
        "",
        "- us/req: wall time of the run / requests (median over rounds); p50/p99: of the "
        "per-request latencies within a run (median over rounds). CPU us/req: this "
        "process's CPU (the pipeline and the Redis client); redis-server CPU us/req: the "
        "server's (INFO cpu, getrusage: approximate, it varies by tens of us between "
        "rounds), which can run on the other CPU.",
        "- Redis round trips per request: commands the clients sent, from `INFO "
        "commandstats` around each run (MGET: the revocation lookup, jti and subject in one "
        "call; EVALSHA: the rate-limit counter, one atomic script). TIME, GET, INCRBY and "
        "EXPIREAT run inside that script, in the server, and are not round trips.",
        "- Propagation: a negative swap time means the replica swapped before the "
        "publisher's coroutine saw the publish return (the PUBLISH reaches the replicas "
        "as the MULTI/EXEC runs; the reply then waits for the publisher's event loop, "
        "which also runs the probes). Each notification restarts a replica's poll timer, "
        "so after a publish the replicas poll in near lockstep: in the poll path the "
        "three swap within tens of milliseconds of each other.",
        "- The audit stream (state.audit_stream) was off in part 1 (it ships the log off "
        "the request path) and on (the default) in part 2.",
    ]
    if not meta["quiet"]:
        lines.append(
            "- The machine was NOT quiet at start (other pytest or mitmdump processes ran): "
            "figures may be noisier than usual."
        )
    lines.append("")
    return "\n".join(lines)


# == main =================================================================================


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--parts",
        default="checks,propagation",
        help="comma-separated: checks, propagation (default both)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the checks (default 5; --quick: 1)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="timed requests per variant, pattern and round (default 2000; --quick: 300)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="unmeasured requests before each run"
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="propagation trials per path (default 20; --quick: 3)",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=None,
        help="state.policy_poll_seconds of the replicas (default: casb's default, "
        f"{StateSettings().policy_poll_seconds:g})",
    )
    parser.add_argument(
        "--probe-interval-ms",
        type=float,
        default=10.0,
        help="how often each replica is probed during a trial (default 10)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run; records only with --out")
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results)"
    )
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"checks", "propagation"}:
        parser.error("--parts: choose from checks, propagation")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    requests = args.requests if args.requests is not None else (300 if args.quick else 2000)
    warmup = args.warmup if args.warmup is not None else max(20, requests // 10)
    trials = args.trials if args.trials is not None else (3 if args.quick else 20)
    if rounds < 1 or requests < 1 or warmup < 0 or trials < 1 or args.probe_interval_ms <= 0:
        parser.error("--rounds, --requests, --trials and --probe-interval-ms must be positive")
    out: Path | None = args.out
    if out is None and not args.quick:
        out = REPO / "bench" / "results"
    if "propagation" in parts and not MITMDUMP.exists():
        parser.error(f"{MITMDUMP} not found: run from the project venv (.venv/bin/python)")

    command = " ".join(
        [
            ".venv/bin/python bench/state.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    ).strip()
    busy = busy_processes()
    if busy:
        print("note: other work is running: " + "; ".join(busy[:4]), file=sys.stderr)
    started = time.monotonic()
    load_at_start = loadavg()
    check_runs: list[CheckRun] = []
    trial_runs: list[Trial] = []
    poll_s: float | None = None
    redis_version = "redis-server ?"
    with tempfile.TemporaryDirectory(prefix="casb-bench-state-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis")
        rig: Replicas | None = None
        try:
            server.start()
            with server.client() as c:
                redis_version = f"redis-server {c.info('server')['redis_version']}"
            print(f"{redis_version} on 127.0.0.1:{server.port}", file=sys.stderr)
            if "checks" in parts:
                check_runs = asyncio.run(
                    run_checks(workdir / "checks", server, rounds, requests, warmup)
                )
            if "propagation" in parts:
                (workdir / "replicas").mkdir()
                rig = Replicas(workdir / "replicas", server, args.poll_seconds)
                rig.start()
                print(
                    "replicas: " + ", ".join(f":{p.port}" for p in rig.proxies),
                    file=sys.stderr,
                )
                trial_runs, poll_s = asyncio.run(
                    run_propagation(rig, trials, args.probe_interval_ms / 1000, random.Random(SEED))
                )
        finally:
            if rig is not None:
                rig.stop()
            server.stop()

    checks = summarise_checks(check_runs) if check_runs else None
    prop = summarise_propagation(trial_runs) if trial_runs else None
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "mitmproxy": _version("mitmproxy"),
        "redis_py": _version("redis"),
        "redis_server": redis_version,
        "casb": _version("casb"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_at_start": load_at_start,
        "quiet": not busy,
        "other_work_at_start": busy,
        "duration_s": round(time.monotonic() - started, 1),
        "policy_poll_seconds": poll_s,
        "config": {
            "parts": sorted(parts),
            "rounds": rounds,
            "requests": requests,
            "warmup": warmup,
            "trials": trials,
            "probe_interval_ms": args.probe_interval_ms,
            "quick": args.quick,
            "rate_limit": RATE_LIMIT,
            "seed": SEED,
        },
    }
    print()
    print(
        f"casb shared state, {meta['cpu']} ({meta['nproc']} CPUs), Python {meta['python']}, "
        f"{redis_version}; {meta['duration_s']:.0f} s in all"
    )
    print(report(checks, prop, meta))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "meta": meta,
            "checks": checks,
            "propagation": prop,
            "check_runs": [asdict(r) for r in check_runs],
            "trials": [asdict(t) for t in trial_runs],
        }
        (out / "state.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "state.md").write_text(markdown(checks, prop, meta))
        print(f"\nwrote {out / 'state.json'} and {out / 'state.md'}")
    errors = sum(r.errors for r in check_runs)
    missed = sum(s.first_answer_ms is None for t in trial_runs for s in t.replicas)
    if errors or missed:
        print(f"\n{errors} requests not forwarded, {missed} replica-trials missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Stop cleanly (servers stopped, temp dir removed) on Ctrl-C or a plain `kill`.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"state: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("state: interrupted; servers stopped", file=sys.stderr)
        raise SystemExit(130) from None
