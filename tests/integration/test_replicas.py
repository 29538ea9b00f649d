"""Three proxy replicas sharing one Redis in front of one Orthanc (issue 7, "Tests against
real servers"): a published policy reaches all three within a second and rolls back; a
revocation is enforced by all three within a second; a rate limit counts across them;
killing Redis mid-traffic refuses requests (fail_closed) while the audit records wait in
the local logs, and once Redis is back (empty) the proxies serve again and the audit
stream holds every record exactly once; with degraded_mode cached, a token seen before
the outage keeps working during it and its records say degraded_state.

Everything real: mitmdump with the casb addon (three processes), redis-server on a free
port (never the one on 6379), Orthanc with DICOMweb, a JWKS server, the `casb` CLI as an
operator runs it. Propagation is measured with time.monotonic against the documented
one-second contract; everything else polls a condition until a deadline.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Mint, casb_config
from tests.jwks_server import JwksServer
from tests.support.orthanc import Orthanc
from tests.support.proxy import REPO, CasbProxy
from tests.support.redis_server import RedisServer
from tests.support.replicas import (
    Replicas,
    http_client,
    log_records,
    replica_config,
    request_records,
    running_replicas,
    wait_for,
)

pytestmark = pytest.mark.integration

PREFIX = "replicas"
REPLICA_IDS = ("r1", "r2", "r3")
PROPAGATION_SECONDS = 1.0  # the documented contract: every replica within a second
RATE_LIMIT = 6  # technologist searches per window, per principal, across replicas
RATE_WINDOW = 86400 * 31  # long: the test never straddles a window boundary in practice
HOSPITAL = REPO / "policies" / "hospital.yaml"

DENY_SEARCH = """\
version: 1
description: Replicas test policy - nobody searches; radiologists retrieve.
roles:
  radiologist:
    description: Reads studies.
rules:
  - id: no-search
    description: Nobody searches.
    effect: deny
    roles: ["*"]
    actions: [search]
    destinations: ["*"]
  - id: radiologist-retrieve
    description: Radiologists retrieve.
    effect: allow
    roles: [radiologist]
    actions: [retrieve]
    destinations: [pacs]
"""

# Well-formed YAML and a valid rule shape, but a destination the configuration does not
# have: only compiling against the destinations (as every replica would) refuses it.
UNKNOWN_DESTINATION = """\
version: 1
description: Replicas test policy naming a destination that does not exist.
roles:
  radiologist:
    description: Reads studies.
rules:
  - id: nowhere-search
    description: Search a destination nobody configured.
    effect: allow
    roles: [radiologist]
    actions: [search]
    destinations: [nowhere]
"""


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own redis-server (tests kill it, so never REDIS_URL's)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def replica_settings(
    workdir: Path,
    replica_id: str,
    *,
    jwks: JwksServer,
    orthanc: Orthanc,
    redis: RedisServer,
    prefix: str,
    degraded_mode: str = "fail_closed",
) -> dict[str, Any]:
    """One replica's casb.yaml: the shared store, a short policy poll, the rate limit;
    only the workdir (audit log, state_dir) and the replica id differ between replicas."""
    base = casb_config(
        workdir,
        jwks.url,
        orthanc.dicomweb_url,
        state={
            "url": redis.url,
            "prefix": prefix,
            "degraded_mode": degraded_mode,
            "policy_poll_seconds": 0.5,
        },
        limits={
            "rate": [
                {
                    "name": "tech-search",
                    "actions": ["search"],
                    "roles": ["technologist"],
                    "requests": RATE_LIMIT,
                    "window_seconds": RATE_WINDOW,
                }
            ]
        },
    )
    return replica_config(base, replica_id)


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    orthanc: Orthanc,
    jwks: JwksServer,
    redis_srv: RedisServer,
) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("replicas")
    workdirs = [root / rid for rid in REPLICA_IDS]
    configs = [
        replica_settings(w, rid, jwks=jwks, orthanc=orthanc, redis=redis_srv, prefix=PREFIX)
        for w, rid in zip(workdirs, REPLICA_IDS, strict=True)
    ]
    with running_replicas(workdirs, configs, redis_srv, PREFIX) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with http_client() as c:
        yield c


# -- helpers --------------------------------------------------------------------------------
def search(client: httpx.Client, proxy: CasbProxy, token: str) -> httpx.Response:
    """A QIDO-RS study search through `proxy` (Orthanc answers 200 with a JSON list)."""
    return client.get(f"{proxy.url}/pacs/studies", headers={"Authorization": f"Bearer {token}"})


def error_code(response: httpx.Response) -> str | None:
    if response.status_code < 400:
        return None
    body = response.json()
    return body.get("error") if isinstance(body, dict) else None


def record_of(proxy: CasbProxy, response: httpx.Response) -> dict[str, Any]:
    """The audit record `proxy` wrote for `response` (written before the response
    completed; polled only to name the request when it is missing)."""
    rid = response.headers["X-Request-Id"]
    return wait_for(
        lambda: next(
            (r for r in request_records(proxy.audit_path) if r["request_id"] == rid), None
        ),
        timeout=5,
        what=f"the audit record of request {rid} in {proxy.audit_path}",
    )


def propagation(
    client: httpx.Client,
    proxies: list[CasbProxy],
    token: str,
    flipped: Callable[[httpx.Response], bool],
    since: float,
) -> list[float | None]:
    """Seconds from `since` (time.monotonic) until each proxy first answered a search so
    that `flipped` holds, polling the proxies in turn; None for one that had not after
    PROPAGATION_SECONDS + 4 s (measured, not waited for: the caller asserts)."""
    found: list[float | None] = [None] * len(proxies)
    deadline = since + PROPAGATION_SECONDS + 4
    while None in found and time.monotonic() < deadline:
        for i, proxy in enumerate(proxies):
            if found[i] is None and flipped(search(client, proxy, token)):
                found[i] = time.monotonic() - since
    return found


def assert_within_contract(times: list[float | None], what: str) -> None:
    late = [t for t in times if t is None or t > PROPAGATION_SECONDS]
    shown = ", ".join("never" if t is None else f"{t:.3f}s" for t in times)
    assert not late, f"{what}: replicas took {shown} (contract: {PROPAGATION_SECONDS:g} s)"


def cli_ok(replicas: Replicas, *args: str | Path) -> str:
    done = replicas.cli(*args)
    assert done.returncode == 0, f"casb {' '.join(map(str, args))}: {done.stderr}"
    return done.stdout


def published_version(stdout: str) -> str:
    match = re.search(r"published (sha256:[0-9a-f]{64})", stdout)
    assert match, f"publish printed no version: {stdout!r}"
    return match.group(1)


def versions(replicas: Replicas) -> list[dict[str, Any]]:
    return list(json.loads(cli_ok(replicas, "policy", "versions", "--json")))


def jti() -> str:
    return uuid.uuid4().hex


# -- 1. policy distribution -----------------------------------------------------------------
def test_a_published_policy_reaches_every_replica_within_a_second_and_rolls_back(
    replicas: Replicas, client: httpx.Client, mint: Mint, tmp_path: Path
) -> None:
    proxies = replicas.proxies
    token = mint("pub-rad", ["radiologist"])
    assert [search(client, p, token).status_code for p in proxies] == [200, 200, 200]

    # The hospital policy, published as the baseline every replica follows.
    v1 = published_version(
        cli_ok(replicas, "policy", "publish", HOSPITAL, "--author", "tests", "--comment", "base")
    )
    for proxy in proxies:
        wait_for(
            lambda proxy=proxy: (
                record_of(proxy, search(client, proxy, token))["policy_version"] == v1
            ),
            timeout=3,
            what=f"{proxy.url} enforcing {v1}",
        )

    deny = tmp_path / "deny-search.yaml"
    deny.write_text(DENY_SEARCH)
    out = cli_ok(replicas, "policy", "publish", deny, "--author", "tests", "--comment", "deny")
    published = time.monotonic()
    v2 = published_version(out)
    assert v2 != v1
    try:
        times = propagation(
            client,
            proxies,
            token,
            lambda r: r.status_code == 403 and error_code(r) == "forbidden",
            published,
        )
        assert_within_contract(times, f"publishing {v2}")
        for proxy in proxies:
            record = record_of(proxy, search(client, proxy, token))
            assert (record["status"], record["rule_id"], record["policy_version"]) == (
                403,
                "no-search",
                v2,
            )
            activated = [
                r
                for r in proxy.audit_records(all_types=True)
                if r["type"] == "policy_change" and r.get("event") == "activated"
            ]
            assert activated and activated[-1]["policy_version"] == v2, activated

        listed = versions(replicas)
        assert [v["version"] for v in listed if v["current"]] == [v2]
        assert {v1, v2} <= {v["version"] for v in listed}
    except BaseException:
        # the tests after this one expect the hospital policy
        replicas.cli("policy", "rollback", v1, "--comment", "test failed")
        raise

    cli_ok(replicas, "policy", "rollback", v1, "--comment", "undo")
    rolled_back = time.monotonic()
    times = propagation(client, proxies, token, lambda r: r.status_code == 200, rolled_back)
    assert_within_contract(times, f"rolling back to {v1}")
    listed = versions(replicas)
    assert [v["version"] for v in listed if v["current"]] == [v1]
    assert {v1, v2} <= {v["version"] for v in listed}

    # An invalid bundle is refused at publish: nothing is stored, nothing changes.
    bad = tmp_path / "unknown-destination.yaml"
    bad.write_text(UNKNOWN_DESTINATION)
    refused = replicas.cli("policy", "publish", bad, "--author", "tests")
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert "not published" in refused.stderr and "nowhere" in refused.stderr
    assert versions(replicas) == listed
    for proxy in proxies:
        response = search(client, proxy, token)
        assert response.status_code == 200
        assert record_of(proxy, response)["policy_version"] == v1


# -- 2. revocation --------------------------------------------------------------------------
def revoked(response: httpx.Response) -> bool:
    return response.status_code == 401 and error_code(response) == "token_revoked"


def test_a_revoked_token_is_refused_by_every_replica_within_a_second(
    replicas: Replicas, client: httpx.Client, mint: Mint
) -> None:
    proxies = replicas.proxies
    token_id = jti()
    token = mint("rev-one", ["radiologist"], jti=token_id)
    sibling = mint("rev-one", ["radiologist"], jti=jti())
    # every replica has just seen (and may cache) "not revoked" for it
    assert [search(client, p, token).status_code for p in proxies] == [200, 200, 200]

    cli_ok(replicas, "token", "revoke", "--jti", token_id)
    times = propagation(client, proxies, token, revoked, time.monotonic())
    assert_within_contract(times, "revoking a token by jti")
    for proxy in proxies:
        response = search(client, proxy, token)
        assert revoked(response)
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        record = record_of(proxy, response)
        assert (record["status"], record["error"], record["decision"]) == (
            401,
            "token_revoked",
            "deny",
        )
        # the subject's other token is not revoked
        assert search(client, proxy, sibling).status_code == 200


def test_revoking_a_subject_refuses_its_earlier_tokens_everywhere_and_no_later_one(
    replicas: Replicas, client: httpx.Client, mint: Mint
) -> None:
    proxies = replicas.proxies
    now = int(time.time())
    earlier = mint("rev-sub", ["radiologist"], iat=now - 120, jti=jti())
    later = mint("rev-sub", ["radiologist"], iat=now - 10, jti=jti())
    bystander = mint("rev-bystander", ["radiologist"], iat=now - 120, jti=jti())
    for proxy in proxies:
        assert [search(client, proxy, t).status_code for t in (earlier, later)] == [200, 200]

    out = cli_ok(replicas, "token", "revoke", "--sub", "rev-sub", "--before", str(now - 60))
    assert "rev-sub" not in out  # subjects are printed as a hash prefix only
    times = propagation(client, proxies, earlier, revoked, time.monotonic())
    assert_within_contract(times, "revoking a subject's earlier tokens")
    for proxy in proxies:
        assert revoked(search(client, proxy, earlier))
        assert search(client, proxy, later).status_code == 200
        assert search(client, proxy, bystander).status_code == 200


# -- 3. rate limits -------------------------------------------------------------------------
def test_a_rate_limit_counts_across_replicas(
    replicas: Replicas, client: httpx.Client, mint: Mint
) -> None:
    proxies = replicas.proxies
    token = mint("rl-tech", ["technologist"])
    spread = [search(client, proxies[i % 3], token).status_code for i in range(RATE_LIMIT)]
    assert spread == [200] * RATE_LIMIT  # 2 per replica: none alone reaches the budget

    for proxy in proxies:
        response = search(client, proxy, token)
        assert response.status_code == 429, response.text
        assert error_code(response) == "rate_limited"
        retry_after = int(response.headers["Retry-After"])
        assert 1 <= retry_after <= RATE_WINDOW
        record = record_of(proxy, response)
        assert (record["status"], record["error"], record["decision"]) == (
            429,
            "rate_limited",
            "deny",
        )
        assert "tech-search" in " ".join(record["reasons"])

    forwarded = [
        r
        for p in proxies
        for r in request_records(p.audit_path)
        if r["principal"] and r["principal"]["sub"] == "rl-tech" and r["status"] == 200
    ]
    assert len(forwarded) == RATE_LIMIT
    # per principal: another technologist has a budget of its own
    assert search(client, proxies[0], mint("rl-tech-2", ["technologist"])).status_code == 200


# -- 4. Redis outage ------------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    proxy: int
    started: float
    ended: float
    status: int
    error: str | None
    request_id: str
    retry_after: str | None


class Traffic(threading.Thread):
    """Searches round-robin over the proxies, each with a fresh token (a new jti: no
    replica has a cached revocation answer for it), until stopped."""

    def __init__(self, proxies: list[CasbProxy], mint: Mint) -> None:
        super().__init__(name="replicas-traffic", daemon=True)
        self.proxies = proxies
        self.mint = mint
        self.sent: list[Sent] = []
        self.failure: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with http_client() as client:
                i = 0
                while not self._halt.is_set():
                    idx = i % len(self.proxies)
                    i += 1
                    token = self.mint("outage-rad", ["radiologist"], jti=jti())
                    started = time.monotonic()
                    response = search(client, self.proxies[idx], token)
                    self.sent.append(
                        Sent(
                            idx,
                            started,
                            time.monotonic(),
                            response.status_code,
                            error_code(response),
                            response.headers["X-Request-Id"],
                            response.headers.get("Retry-After"),
                        )
                    )
                    self._halt.wait(0.01)  # paces the traffic; synchronises nothing
        except BaseException as exc:  # reported by stop()
            self.failure = exc

    def stop(self) -> list[Sent]:
        self._halt.set()
        self.join(timeout=15)
        assert not self.is_alive(), "the traffic thread did not stop"
        if self.failure is not None:
            raise AssertionError(f"traffic failed: {self.failure!r}") from self.failure
        return list(self.sent)

    def count(self, proxy: int, since: float, status: int | None = None) -> int:
        return sum(
            1
            for s in list(self.sent)
            if s.proxy == proxy and s.started > since and (status is None or s.status == status)
        )


def test_redis_outage_fails_closed_then_serves_again_and_the_stream_drains_exactly(
    replicas: Replicas, mint: Mint
) -> None:
    proxies, redis = replicas.proxies, replicas.redis
    n = len(proxies)
    baseline = [len(request_records(p.audit_path)) for p in proxies]
    traffic = Traffic(proxies, mint)
    traffic.start()
    try:
        wait_for(
            lambda: all(traffic.count(i, 0, 200) >= 2 for i in range(n)),
            timeout=10,
            what="traffic served by every replica before the outage",
        )
        killing = time.monotonic()
        redis.kill()
        killed = time.monotonic()
        wait_for(
            lambda: all(traffic.count(i, killed) >= 3 for i in range(n)),
            timeout=10,
            what="three requests to every replica during the outage",
        )
        restarting = time.monotonic()
        redis.start()  # empty: no persistence, as after a crash
        restarted = time.monotonic()
        wait_for(
            lambda: all(traffic.count(i, restarted, 200) >= 2 for i in range(n)),
            timeout=10,
            what="every replica serving again once Redis is back",
        )
    finally:
        if not redis.running:
            redis.start()
        sent = traffic.stop()

    before = [s for s in sent if s.ended < killing]
    during = [s for s in sent if s.started > killed and s.ended < restarting]
    assert before and all(s.status == 200 for s in before)
    assert len(during) >= 3 * n
    assert {(s.status, s.error) for s in during} == {(503, "state_unavailable")}
    assert all(s.retry_after is not None for s in during)
    for i in range(n):  # once a replica served again, it kept serving
        after = sorted((s for s in sent if s.proxy == i and s.started > restarted), key=_start)
        first_ok = next(k for k, s in enumerate(after) if s.status == 200)
        assert {s.status for s in after[first_ok:]} == {200}

    # Every request has exactly one audit record in its replica's local log, with the
    # status and error the client saw.
    by_id: dict[str, dict[str, Any]] = {}
    for i, proxy in enumerate(proxies):
        records = request_records(proxy.audit_path)[baseline[i] :]
        mine = sorted(s.request_id for s in sent if s.proxy == i)
        assert sorted(r["request_id"] for r in records) == mine, f"replica {i}"
        by_id |= {r["request_id"]: r for r in records}
    for s in sent:
        assert (by_id[s.request_id]["status"], by_id[s.request_id]["error"]) == (
            s.status,
            s.error,
        )
    # The last good policy kept serving through the outage and after it (Redis came
    # back empty: no current pointer, nothing to replace it with).
    policy_before = {by_id[s.request_id]["policy_version"] for s in before}
    assert len(policy_before) == 1
    assert {by_id[s.request_id]["policy_version"] for s in sent} == policy_before

    # The stream (Redis restarted empty) drains to exactly the local logs: every
    # (replica, seq) once, in order, the same records.
    def drained() -> tuple[list[dict[str, Any]], int] | None:
        entries = replicas.stream_entries()  # read first: the logs only grow
        local = {
            rid: log_records(p.audit_path) for rid, p in zip(REPLICA_IDS, proxies, strict=True)
        }
        seqs: dict[str, list[int]] = defaultdict(list)
        for e in entries:
            seqs[e["replica"].split("/")[0]].append(e["seq"])
        complete = all(set(seqs[rid]) == {r["seq"] for r in local[rid]} for rid in REPLICA_IDS)
        return (entries, sum(len(v) for v in local.values())) if complete else None

    entries, local_lines = wait_for(
        drained, timeout=30, what="the audit stream holding every local audit record"
    )
    assert len(entries) == len({(e["replica"], e["seq"]) for e in entries}), "duplicates"
    assert len(entries) == local_lines
    assert replicas.stream_len() >= local_lines  # XLEN (records written since may add)
    stream_requests = 0
    for rid, proxy in zip(REPLICA_IDS, proxies, strict=True):
        shipped = [e for e in entries if e["replica"].split("/")[0] == rid]
        local = log_records(proxy.audit_path)[: len(shipped)]
        assert len({e["replica"] for e in shipped}) == 1, "one log file, one replica key"
        assert [e["seq"] for e in shipped] == [r["seq"] for r in local], "in order"
        assert [e["hash"] for e in shipped] == [r["hash"] for r in local]
        assert [e["record"] for e in shipped] == local
        requests = sum(1 for e in shipped if e["record"]["type"] == "request")
        assert requests == len(request_records(proxy.audit_path)), rid
        stream_requests += requests
    # the record count equals the request count: probes, earlier tests and this traffic
    assert stream_requests == sum(len(request_records(p.audit_path)) for p in proxies)


def _start(s: Sent) -> float:
    return s.started


# -- 5. degraded mode: cached ---------------------------------------------------------------
@pytest.fixture
def cached_replica(
    tmp_path_factory: pytest.TempPathFactory,
    orthanc: Orthanc,
    jwks: JwksServer,
    redis_srv: RedisServer,
) -> Iterator[Replicas]:
    redis_srv.start()  # no-op when running
    workdir = tmp_path_factory.mktemp("cached") / "c1"
    config = replica_settings(
        workdir,
        "c1",
        jwks=jwks,
        orthanc=orthanc,
        redis=redis_srv,
        prefix="cached",
        degraded_mode="cached",
    )
    with running_replicas([workdir], [config], redis_srv, "cached") as running:
        yield running


def test_degraded_mode_cached_keeps_a_seen_token_working_and_says_so(
    cached_replica: Replicas, client: httpx.Client, mint: Mint, tmp_path: Path
) -> None:
    proxy, redis = cached_replica.proxies[0], cached_replica.redis
    # A policy that differs from the files (a comment): its version shows which serves.
    variant = tmp_path / "hospital.yaml"
    variant.write_text(HOSPITAL.read_text() + "\n# published for the degraded-mode test\n")
    version = published_version(
        cli_ok(cached_replica, "policy", "publish", variant, "--author", "tests")
    )
    seen = mint("cached-rad", ["radiologist"], jti=jti())
    wait_for(
        lambda: record_of(proxy, search(client, proxy, seen))["policy_version"] == version,
        timeout=3,
        what=f"the replica enforcing {version}",
    )

    redis.kill()
    try:

        def served_degraded() -> dict[str, Any] | None:
            response = search(client, proxy, seen)
            assert response.status_code == 200, response.text
            record = record_of(proxy, response)
            return record if "degraded_state" in record["warnings"] else None

        record = wait_for(served_degraded, timeout=5, what="a request served degraded")
        assert (record["status"], record["error"]) == (200, None)
        assert record["policy_version"] == version  # the last good policy keeps serving

        unseen = search(client, proxy, mint("cached-rad", ["radiologist"], jti=jti()))
        assert (unseen.status_code, error_code(unseen)) == (503, "state_unavailable")
        assert record_of(proxy, unseen)["error"] == "state_unavailable"
    finally:
        redis.start()

    def served_normally() -> bool:
        response = search(client, proxy, seen)
        return (
            response.status_code == 200
            and "degraded_state" not in record_of(proxy, response)["warnings"]
        )

    wait_for(served_normally, timeout=5, what="the replica leaving degraded mode")
