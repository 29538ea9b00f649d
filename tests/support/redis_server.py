"""Real `redis-server` processes for tests: a server on a free loopback port (plain or
TLS, with ACL users or a default-user password) and a Sentinel watching it.

Each server runs from a config file in its own directory with persistence off
(`save ""`, `appendonly no`), so nothing outlives the test unless a test asks for it
(`stop(save=True)` writes a snapshot the next `start()` loads). `stop()`/`start()` keep the
port, so clients configured with the URL reconnect to the same address after an outage;
`pause()`/`resume()` (SIGSTOP/SIGCONT) make a server that accepts connections but never
answers, for timeout tests.

The Redis on 127.0.0.1:6379 is never touched: servers here always take a free port. When
REDIS_URL is set, the `redis_url` fixture hands that out instead of starting a server
(tests that stop, pause or reconfigure a server use their own `RedisServer`).

Fixtures (import them into a test module or conftest): `redis_server` (module-scoped
RedisServer) and `redis_url`.
"""

from __future__ import annotations

import os
import signal
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.pki import TlsFiles
from tests.support.processes import Process, free_port, require_binary

READY_TIMEOUT = 15.0
HOST = "127.0.0.1"
SENTINEL_SERVICE = "casbmaster"


@dataclass(frozen=True)
class RedisTls:
    """The server side of TLS: the test PKI's server certificate; with
    `require_client_cert`, clients must present a certificate from the client CA."""

    files: TlsFiles
    require_client_cert: bool = False


class RedisServer:
    """One `redis-server` on 127.0.0.1:<free port> (TLS-only when `tls` is set)."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: RedisTls | None = None,
        password: str | None = None,
        users: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.tls = tls
        self.password = password  # the default user's (requirepass)
        self.users = dict(users or {})  # ACL users with every permission
        self.port = port or free_port()
        self.process: Process | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        """The URL a client uses (credentials not included)."""
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def _config(self) -> str:
        lines = [
            f"bind {HOST}",
            f"dir {self.workdir}",
            'save ""',
            "appendonly no",
            "daemonize no",
            'logfile ""',
            "protected-mode no",
        ]
        if self.tls is None:
            lines.append(f"port {self.port}")
        else:
            f = self.tls.files
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {f.server_cert}",
                f"tls-key-file {f.server_key}",
                f"tls-ca-cert-file {f.client_ca_pem}",
                f"tls-auth-clients {'yes' if self.tls.require_client_cert else 'no'}",
            ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        lines += [f"user {name} on >{pw} ~* &* +@all" for name, pw in self.users.items()]
        return "\n".join(lines) + "\n"

    def client(self, **kw: Any) -> redis.Redis:
        """A synchronous client straight to this server, as its admin (for looking at
        what was stored, and for readiness)."""
        params: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "password": self.password,
            "socket_timeout": 2,
            "socket_connect_timeout": 2,
        }
        if self.tls is not None:
            f = self.tls.files
            params |= {"ssl": True, "ssl_ca_certs": str(f.ca_pem)}
            if self.tls.require_client_cert:
                params |= {"ssl_certfile": str(f.client_cert), "ssl_keyfile": str(f.client_key)}
        params.update(kw)
        return redis.Redis(**params)

    def _ready(self) -> bool:
        try:
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as c:
                return bool(c.ping())
        except (redis.RedisError, OSError, ssl.SSLError):
            return False

    def start(self) -> RedisServer:
        if self.running:
            return self
        binary = require_binary("redis-server", "redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        conf.write_text(self._config())
        conf.chmod(0o600)
        self._starts += 1
        self.process = Process(
            [binary, str(conf)], log_path=self.workdir / f"redis-{self._starts}.log"
        )
        try:
            self.process.wait_until(self._ready, timeout=READY_TIMEOUT, what="redis-server")
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self, *, save: bool = False) -> None:
        """Stop the server (SIGTERM; with `save`, SHUTDOWN SAVE writes a snapshot that
        the next start() loads). The port stays reserved for start()."""
        if not self.running or self.process is None:
            return
        if save:
            try:
                with self.client() as c:
                    c.shutdown(save=True)
            except redis.ConnectionError:
                pass  # the server closed the connection as it shut down
        self.process.stop()

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash."""
        if self.running and self.process is not None:
            self.process.proc.kill()
            self.process.stop()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers."""
        if self.running and self.process is not None:
            os.kill(self.process.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self.process is not None:
            os.kill(self.process.proc.pid, signal.SIGCONT)

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.resume()
        self.stop()


class RedisSentinel:
    """A `redis-server --sentinel` on a free port, monitoring `master` as
    SENTINEL_SERVICE (quorum 1). With `password`, the Sentinel requires it too and uses
    it (with `auth_user`, when set) to talk to the master."""

    def __init__(
        self,
        workdir: Path,
        master: RedisServer,
        *,
        password: str | None = None,
        auth_user: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.master = master
        self.password = password
        self.auth_user = auth_user
        self.tls = master.tls  # TLS to clients and to the master when the master has it
        self.port = free_port()
        self.process: Process | None = None

    def url(self, credentials: str = "") -> str:
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{credentials}{HOST}:{self.port}/{SENTINEL_SERVICE}/0"

    def _config(self) -> str:
        lines = [f"port {self.port}"]
        if self.tls is not None:
            f = self.tls.files
            lines = [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {f.server_cert}",
                f"tls-key-file {f.server_key}",
                f"tls-ca-cert-file {f.ca_pem}",  # to verify the master's certificate
                "tls-auth-clients no",
                "tls-replication yes",  # Sentinel talks TLS to the master
            ]
            if self.tls.require_client_cert:
                lines += [
                    f"tls-client-cert-file {f.client_cert}",
                    f"tls-client-key-file {f.client_key}",
                ]
        lines += [
            f"bind {HOST}",
            f"dir {self.workdir}",
            'logfile ""',
            "protected-mode no",
            f"sentinel monitor {SENTINEL_SERVICE} {HOST} {self.master.port} 1",
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 60000",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
            lines.append(f"sentinel auth-pass {SENTINEL_SERVICE} {self.password}")
            if self.auth_user:
                lines.append(f"sentinel auth-user {SENTINEL_SERVICE} {self.auth_user}")
        return "\n".join(lines) + "\n"

    def _ready(self) -> bool:
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.files.ca_pem)}
        try:
            with redis.Redis(
                host=HOST,
                port=self.port,
                password=self.password,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                decode_responses=True,
                **tls,
            ) as c:
                masters: dict[str, Any] = c.sentinel_masters()
        except (redis.RedisError, OSError):
            return False
        state = masters.get(SENTINEL_SERVICE)
        return bool(state and state["is_master"] and not state["is_sdown"])

    def start(self) -> RedisSentinel:
        binary = require_binary("redis-server", "redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"  # Sentinel rewrites it: it must be writable
        conf.write_text(self._config())
        conf.chmod(0o600)
        self.process = Process(
            [binary, str(conf), "--sentinel"], log_path=self.workdir / "sentinel.log"
        )
        try:
            self.process.wait_until(self._ready, timeout=READY_TIMEOUT, what="redis sentinel")
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> RedisSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A plain redis-server of this module's own (never the one on 6379)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module", name="redis_url")
def redis_url_fixture(request: pytest.FixtureRequest) -> str:
    """REDIS_URL from the environment when set, else the module's own server's URL.
    Tests sharing it keep apart by key prefix, not by flushing."""
    from_env = os.environ.get("REDIS_URL")
    if from_env:
        return from_env
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url
