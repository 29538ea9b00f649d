"""Run the proxy (mitmproxy's DumpMaster with the casb addon) and, for `casb run`, the
admin API (uvicorn) on the same event loop, sharing one Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Generator

import uvicorn
from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster

from casb.admin import create_app
from casb.config import Settings
from casb.mitm_addon import CasbAddon
from casb.runtime import Runtime


class _AdminServer(uvicorn.Server):
    """uvicorn without its own signal handling: the proxy's handlers stop both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def proxy_modes(settings: Settings) -> list[str]:
    """mitmproxy mode specs for the configured listeners.

    Reverse listeners get the first destination as their nominal target; the addon
    rewrites every allowed request to its own destination and answers all others."""
    first = next(iter(settings.destinations.values())).upstream
    origin = first.split("/", 3)
    target = "/".join(origin[:3])
    modes = []
    for lst in settings.listeners:
        spec = f"reverse:{target}" if lst.mode == "reverse" else "regular"
        modes.append(f"{spec}@{lst.host}:{lst.port}")
    return modes


def mitmproxy_options(settings: Settings) -> dict[str, object]:
    return {
        "mode": proxy_modes(settings),
        "confdir": str(settings.state_dir / "mitmproxy"),  # the CA forward-mode clients trust
        "connection_strategy": "lazy",  # connect upstream only for requests we allow
        "body_size_limit": str(settings.limits.max_body_bytes),
        # keep the client's Host (S3 virtual-hosted buckets are named in it); the addon
        # always sets Host for the destination it forwards to
        "keep_host_header": True,
        # TLS 1.2 or newer on both legs; upstream certificates are always verified.
        "tls_version_client_min": "TLS1_2",
        "tls_version_server_min": "TLS1_2",
        "ssl_insecure": False,
    }


def banner(settings: Settings, admin: bool, telemetry: str = "") -> str:
    lines = [
        "casb is running"
        + (
            " in DEV mode (generated signing key; never deploy this)"
            if settings.environment == "dev"
            else ""
        )
    ]
    for lst in settings.listeners:
        tls = "https" if lst.tls is not None or lst.mode == "forward" else "http(s)"
        plain = ", uploads over plaintext allowed" if lst.allow_plaintext else ""
        lines.append(f"  proxy ({lst.mode}): {tls}://{lst.host}:{lst.port}{plain}")
    for name, dest in settings.destinations.items():
        lines.append(f"  destination {name}: {settings.route_of(name)}/ -> {dest.upstream}")
    if admin and settings.admin.enabled:
        lines.append(
            f"  admin API: http://{settings.admin.host}:{settings.admin.port} "
            "(/healthz, /readyz, /v1/policy/simulate)"
        )
    lines.append(f"  audit log: {settings.audit.path}")
    if settings.audit.syslog is not None:
        sink = settings.audit.syslog
        lines.append(
            f"  audit copy: syslog {sink.transport}://{sink.host}:{sink.port} ({sink.format})"
        )
    if telemetry:
        lines.append(f"  telemetry: {telemetry} (OTEL_* variables)")
    if settings.environment == "dev":
        rev = next((lst for lst in settings.listeners if lst.mode == "reverse"), None)
        name = next(iter(settings.destinations))
        lines += [
            "",
            "Try it:",
            "  TOKEN=$(.venv/bin/casb token mint --sub alice --role radiologist)",
            f'  curl -H "Authorization: Bearer $TOKEN" '
            f"http://{rev.host if rev else '127.0.0.1'}:{rev.port if rev else 8080}"
            f"{settings.route_of(name)}/studies",
        ]
    return "\n".join(lines)


async def serve(settings: Settings, *, admin: bool) -> None:
    runtime = Runtime.build(settings)
    settings = runtime.settings
    opts = options.Options()
    master = DumpMaster(opts, with_termlog=True, with_dumper=False)
    opts.update(**mitmproxy_options(settings))  # known once the default addons loaded
    master.addons.add(CasbAddon(runtime))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)

    admin_server: _AdminServer | None = None
    admin_task: asyncio.Task[None] | None = None
    if admin and settings.admin.enabled:
        admin_server = _AdminServer(
            uvicorn.Config(
                create_app(runtime),
                host=settings.admin.host,
                port=settings.admin.port,
                log_level="warning",
                lifespan="off",
            )
        )
        admin_task = asyncio.create_task(admin_server.serve())
    print(banner(settings, admin, runtime.pipeline.telemetry.describe()), flush=True)
    try:
        await master.run()
    finally:
        if admin_server is not None and admin_task is not None:
            admin_server.should_exit = True
            await admin_task
