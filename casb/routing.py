"""Which configured destination a request is for, and how to reach it upstream.

Reverse mode: the first path segments name the destination's route ("/pacs/...").
Forward mode: the URL the client aimed at must lie under a destination's upstream base
URL (same scheme, host, port and path prefix). Anything else has no destination and is
refused: the proxy only ever talks to what the configuration names.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from casb.config import ConfigError, Destination, Settings, UpstreamAuth


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    destination: Destination
    prefix: tuple[str, ...]  # reverse-mode route segments on the proxy
    scheme: str
    host: str
    port: int
    base: tuple[str, ...]  # upstream base path segments
    upstream_authorization: str | None  # Authorization value to send upstream, if replaced
    passthrough_auth: bool  # forward the client's own Authorization header

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class Router:
    def __init__(self, settings: Settings) -> None:
        self.routes: tuple[Route, ...] = tuple(
            _build_route(name, dest, settings.route_of(name))
            for name, dest in settings.destinations.items()
        )
        # Longest prefix first, so nested bases/routes pick the most specific one.
        self._by_prefix = sorted(self.routes, key=lambda r: -len(r.prefix))
        self._by_base = sorted(self.routes, key=lambda r: -len(r.base))

    def reverse(self, segments: tuple[str, ...]) -> tuple[Route, tuple[str, ...]] | None:
        for route in self._by_prefix:
            n = len(route.prefix)
            if segments[:n] == route.prefix:
                return route, segments[n:]
        return None

    def forward(
        self, scheme: str, host: str, port: int, segments: tuple[str, ...]
    ) -> tuple[Route, tuple[str, ...]] | None:
        host = host.lower().rstrip(".")
        for route in self._by_base:
            n = len(route.base)
            if (route.scheme, route.host, route.port) == (scheme, host, port) and segments[
                :n
            ] == route.base:
                return route, segments[n:]
        return None

    def knows_host(self, host: str, port: int) -> bool:
        """For forward-mode CONNECT: is any destination at this host and port?"""
        host = host.lower().rstrip(".")
        return any((r.host, r.port) == (host, port) for r in self.routes)


def _build_route(name: str, dest: Destination, route: str) -> Route:
    parts = urlsplit(dest.upstream)
    scheme = parts.scheme
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    base = tuple(s for s in parts.path.split("/") if s)
    prefix = tuple(s for s in route.split("/") if s)
    return Route(
        name=name,
        destination=dest,
        prefix=prefix,
        scheme=scheme,
        host=host,
        port=port,
        base=base,
        upstream_authorization=_upstream_authorization(name, dest.upstream_auth),
        passthrough_auth=dest.upstream_auth.type == "passthrough",
    )


def _secret(name: str, field: str, path: Path | None, env: str | None) -> str:
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"destinations.{name}.upstream_auth.{field}_file: cannot read "
                f"{path}: {exc.strerror}"
            ) from exc
    assert env is not None
    value = os.environ.get(env)
    if not value:
        raise ConfigError(
            f"destinations.{name}.upstream_auth.{field}_env: environment variable {env} is not set"
        )
    return value


def _upstream_authorization(name: str, auth: UpstreamAuth) -> str | None:
    if auth.type == "basic":
        password = _secret(name, "password", auth.password_file, auth.password_env)
        token = base64.b64encode(f"{auth.username}:{password}".encode()).decode()
        return f"Basic {token}"
    if auth.type == "bearer":
        return "Bearer " + _secret(name, "token", auth.token_file, auth.token_env)
    return None
