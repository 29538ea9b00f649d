"""Several casb proxies sharing one Redis, as SREs run them behind one Service: each
replica a real mitmdump with the casb addon, its own workdir, audit log and replica id,
the same configuration otherwise (state.url, prefix, limits, policy files).

Helpers for the multi-replica tests: start the replicas in parallel, run the `casb` CLI
against the same store, read the shared audit stream straight from Redis, and poll a
condition until a deadline (never a fixed sleep).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from tests.support.proxy import REPO, CasbProxy
from tests.support.redis_server import RedisServer

CASB = Path(sys.executable).with_name("casb")
T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll `condition` until it returns something truthy (returned) or `timeout` passes
    (AssertionError naming `what`). The interval paces the polling; it synchronises
    nothing."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


@dataclass
class Replicas:
    """N proxies sharing `redis` under key prefix `prefix`."""

    proxies: list[CasbProxy]
    redis: RedisServer
    prefix: str
    stream_name: str = "audit"

    @property
    def config_path(self) -> Path:
        """A casb.yaml naming the same store (and destinations): for the CLI."""
        return self.proxies[0].workdir / "casb.yaml"

    def cli(
        self, *args: str | Path, config: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`casb ARGS --config <the replicas' casb.yaml>`, as an operator runs it."""
        argv = [str(CASB), *map(str, args), "--config", str(config or self.config_path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)

    @property
    def stream_key(self) -> str:
        return f"{self.prefix}:audit:{self.stream_name}"

    def stream_entries(self) -> list[dict[str, Any]]:
        """Every entry of the shared audit stream: replica (key), seq, hash, record."""
        with self.redis.client() as c:
            raw: list[tuple[bytes, dict[bytes, bytes]]] = c.xrange(self.stream_key)
        return [
            {
                "id": entry_id.decode(),
                "replica": fields[b"replica"].decode(),
                "seq": int(fields[b"seq"]),
                "hash": fields[b"hash"].decode(),
                "record": json.loads(fields[b"record"]),
            }
            for entry_id, fields in raw
        ]

    def stream_len(self) -> int:
        with self.redis.client() as c:
            return int(c.xlen(self.stream_key))


def replica_config(base: dict[str, Any], replica_id: str) -> dict[str, Any]:
    """`base` with this replica's id (its audit stream cursor is named after it)."""
    state = {**base["state"], "replica_id": replica_id}
    return {**base, "state": state}


@contextmanager
def running_replicas(
    workdirs: Sequence[Path],
    configs: Sequence[dict[str, Any]],
    redis: RedisServer,
    prefix: str,
) -> Iterator[Replicas]:
    """Start one proxy per (workdir, config) in parallel (mitmdump takes seconds to come
    up); stop them all on exit."""
    proxies = [CasbProxy(w, c) for w, c in zip(workdirs, configs, strict=True)]
    with ExitStack() as stack:
        with ThreadPoolExecutor(len(proxies)) as pool:
            futures = [pool.submit(p.start) for p in proxies]
        for proxy in proxies:
            stack.callback(proxy.stop)
        for future in futures:
            future.result()  # a proxy that did not start fails here, with its log
        yield Replicas(proxies, redis, prefix)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def request_records(path: Path) -> list[dict[str, Any]]:
    """The request records of an audit log (readiness probes included)."""
    return [r for r in log_records(path) if r.get("type") == "request"]


def log_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def http_client() -> httpx.Client:
    """A client that goes straight to the proxy (no proxy from the environment)."""
    return httpx.Client(trust_env=False, timeout=10)
