"""A real mitmdump running the casb addon (`mitmdump -s addons/casb.py`), in reverse
and/or forward mode, on free loopback ports, with a casb.yaml written for the test."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.support.processes import Process, free_port, port_open

REPO = Path(__file__).resolve().parents[2]
MITMDUMP = Path(sys.executable).with_name("mitmdump")


class CasbProxy:
    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        forward: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.port = free_port()
        self.forward_port = free_port() if forward else None
        self.env = env or {}
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def audit_path(self) -> Path:
        return Path(self.config["audit"]["path"])

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "mitmproxy" / "mitmproxy-ca-cert.pem"

    def audit_records(
        self, *, include_probes: bool = False, all_types: bool = False
    ) -> list[dict[str, Any]]:
        """The request records, without those of the readiness probes start() sent;
        with `all_types`, every line (policy changes and signed checkpoints too)."""
        if not self.audit_path.is_file():  # e.g. /dev/full in the audit-failure test
            return []
        records = [json.loads(line) for line in self.audit_path.read_bytes().splitlines()]
        if all_types:
            return records
        requests = [r for r in records if r.get("type") == "request"]
        return requests if include_probes else requests[self._probe_records :]

    def start(self) -> CasbProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "casb.yaml"
        if "listeners" not in self.config:
            # what this process listens on (mitmdump takes the modes from argv): loopback
            # test rigs take uploads over plaintext unless a test says otherwise
            listeners: list[dict[str, Any]] = [
                {"mode": "reverse", "host": "127.0.0.1", "port": self.port, "allow_plaintext": True}
            ]
            if self.forward_port is not None:
                listeners.append(
                    {"mode": "forward", "host": "127.0.0.1", "port": self.forward_port}
                )
            self.config = {**self.config, "listeners": listeners}
        cfg.write_text(yaml.safe_dump(self.config, sort_keys=False))
        first = next(iter(self.config["destinations"].values()))["upstream"]
        origin = "/".join(first.split("/")[:3])
        argv = [
            str(MITMDUMP),
            "-s",
            str(REPO / "addons" / "casb.py"),
            "--set",
            f"casb_config={cfg}",
            "--set",
            f"confdir={self.workdir / 'mitmproxy'}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            "keep_host_header=true",
            "--mode",
            f"reverse:{origin}@127.0.0.1:{self.port}",
        ]
        if self.forward_port is not None:
            argv += ["--mode", f"regular@127.0.0.1:{self.forward_port}"]
        self.process = Process(argv, log_path=self.workdir / "mitmdump.log", cwd=REPO, env=self.env)
        self._probe_records = 0
        ports = [self.port] + ([self.forward_port] if self.forward_port else [])
        self.process.wait_until(
            lambda: all(port_open(p) for p in ports) and self._casb_answers(),
            timeout=30,
            what="mitmdump with the casb addon",
        )
        self._probe_records = len(self.audit_records(include_probes=True))
        return self

    def _casb_answers(self) -> bool:
        """The listener is up AND the addon loaded: casb stamps every answer with an id."""
        try:
            with urllib.request.urlopen(self.url + "/", timeout=2) as resp:
                return "X-Request-Id" in resp.headers
        except urllib.error.HTTPError as err:
            return "X-Request-Id" in err.headers
        except OSError:
            return False

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def stop(self) -> int:
        return self.process.stop() if self.process else 0

    def __enter__(self) -> CasbProxy:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
