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
from urllib.parse import parse_qsl, urlsplit

from casb.config import ConfigError, Destination, Settings, UpstreamAuth


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    """What the proxy signs S3 requests with (AWS Signature Version 4)."""

    access_key_id: str
    secret_access_key: str
    region: str

    def __repr__(self) -> str:  # never print the secret
        return f"AwsCredentials({self.access_key_id!r}, region={self.region!r})"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    destination: Destination
    prefix: tuple[str, ...]  # reverse-mode route segments on the proxy
    scheme: str
    host: str
    port: int
    base: tuple[str, ...]  # upstream base path segments
    # What every request forwarded here gets, decided once from the config.
    set_headers: tuple[tuple[str, str], ...]  # Host, and the upstream credential if replaced
    remove_headers: tuple[str, ...]  # never forwarded (incl. the client's token unless
    #                                   the destination passes it through)
    aws: AwsCredentials | None = None  # s3 + aws_sigv4: sign every request
    sas: tuple[tuple[str, str], ...] = ()  # azure_sas: query pairs added to every request

    @property
    def kind(self) -> str:
        return self.destination.kind

    def host_bucket(self, host: str) -> str | None:
        """S3 virtual-hosted style: the bucket a Host header names, if any."""
        vhost = self.destination.virtual_host
        if vhost is None:
            return None
        host = _strip_port(host).lower().rstrip(".")
        suffix = "." + vhost
        if host.endswith(suffix) and len(host) > len(suffix):
            return host[: -len(suffix)]
        return None


class Router:
    def __init__(self, settings: Settings) -> None:
        self.routes: tuple[Route, ...] = tuple(
            _build_route(name, dest, settings.route_of(name))
            for name, dest in settings.destinations.items()
        )
        # Longest prefix first, so nested bases/routes pick the most specific one.
        self._by_prefix = sorted(self.routes, key=lambda r: -len(r.prefix))
        self._by_base = sorted(self.routes, key=lambda r: -len(r.base))
        self._by_name = {r.name: r for r in self.routes}

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
        for route in self.routes:  # S3 virtual-hosted: <bucket>.<virtual_host>
            if (route.scheme, route.port) == (scheme, port) and route.host_bucket(host):
                return route, segments
        return None

    def knows_host(self, host: str, port: int) -> bool:
        """For forward-mode CONNECT: is any destination at this host and port?"""
        host = host.lower().rstrip(".")
        return any(
            r.port == port and (r.host == host or r.host_bucket(host) is not None)
            for r in self.routes
        )

    def by_name(self, name: str) -> Route:
        return self._by_name[name]

    def by_address(self, host: str, port: int) -> Route | None:
        """The destination the proxy connects to at this upstream address (TLS setup)."""
        host = host.lower().rstrip(".")
        return next((r for r in self.routes if (r.host, r.port) == (host, port)), None)


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# Headers never sent upstream: our own credential handling decides Authorization, and
# a protocol upgrade (WebSocket, h2c) would carry traffic past every check.
_ALWAYS_REMOVED = ("Proxy-Authorization", "Upgrade")
# S3: the client's signature material (its session token is the casb token), replaced
# by the proxy's own signature.
_S3_CLIENT_SIGNING = ("X-Amz-Security-Token", "X-Amz-Date")


def _build_route(name: str, dest: Destination, route: str) -> Route:
    parts = urlsplit(dest.upstream)
    scheme = parts.scheme
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    default_port = 443 if scheme == "https" else 80
    set_headers = [("Host", host if port == default_port else f"{host}:{port}")]
    remove = list(_ALWAYS_REMOVED)
    authorization = _upstream_authorization(name, dest.upstream_auth)
    if authorization is not None:
        set_headers.append(("Authorization", authorization))
    elif dest.upstream_auth.type != "passthrough":
        remove.append("Authorization")
    if dest.kind == "s3" and dest.upstream_auth.type != "passthrough":
        remove.extend(_S3_CLIENT_SIGNING)
    auth = dest.upstream_auth
    aws = None
    if auth.type == "aws_sigv4":
        assert auth.access_key_id is not None
        secret = _secret(
            name, "secret_access_key", auth.secret_access_key_file, auth.secret_access_key_env
        )
        aws = AwsCredentials(auth.access_key_id, secret, auth.region)
    sas: tuple[tuple[str, str], ...] = ()
    if auth.type == "azure_sas":
        raw = _secret(name, "sas", auth.sas_file, auth.sas_env).lstrip("?")
        sas = tuple(parse_qsl(raw, keep_blank_values=True))
        if not sas:
            raise ConfigError(f"destinations.{name}.upstream_auth: the SAS is empty")
    return Route(
        aws=aws,
        sas=sas,
        name=name,
        destination=dest,
        prefix=tuple(s for s in route.split("/") if s),
        scheme=scheme,
        host=host,
        port=port,
        base=tuple(s for s in parts.path.split("/") if s),
        set_headers=tuple(set_headers),
        remove_headers=tuple(remove),
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
