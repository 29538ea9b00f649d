"""A real Orthanc with its DICOMweb plugin (Debian `orthanc`, `orthanc-dicomweb`) on a
free loopback port: the stand-in cloud PACS for integration tests and the README
walkthrough (`make orthanc`)."""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.support.processes import Process, free_port, require_binary

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(
        self, workdir: Path, *, port: int | None = None, users: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.users = users or {}
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        binary = require_binary("Orthanc", "orthanc")
        if not PLUGIN.exists():
            raise RuntimeError(
                f"{PLUGIN} is missing: install the Debian package "
                "`orthanc-dicomweb` (.ci/run does this)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "casb-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "StorageCompression": False,
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        self.process = Process([binary, str(cfg)], log_path=self.workdir / "orthanc.log")
        self.process.wait_until(self._ready, timeout=30, what="Orthanc")
        return self

    def _ready(self) -> bool:
        try:
            with self.open("/system") as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def open(
        self,
        path: str,
        *,
        method: str = "GET",
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib.request._UrlopenRet:
        """A direct request to Orthanc, bypassing the proxy (to check what it stored)."""
        req = urllib.request.Request(
            self.url + path, method=method, data=data, headers=dict(headers or {})
        )
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            cred = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {cred}")
        return urllib.request.urlopen(req, timeout=10)

    def get_json(self, path: str) -> object:
        with self.open(path) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a local Orthanc + DICOMweb for casb.")
    parser.add_argument("--port", type=int, default=8042)
    parser.add_argument(
        "--dir", type=Path, default=None, help="storage directory (default: a temporary one)"
    )
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="casb-orthanc-"))
    with Orthanc(workdir, port=args.port) as orthanc:
        print(
            f"Orthanc with DICOMweb at {orthanc.dicomweb_url} (storage {workdir}); Ctrl-C stops it",
            flush=True,
        )
        try:
            assert orthanc.process is not None
            orthanc.process.proc.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
