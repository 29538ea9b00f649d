"""Parse the state store's Redis URL (pure: no I/O, no redis import).

Accepted forms (userinfo and the service name percent-decoded):

* ``redis://[user[:password]@]host[:port][/db]`` and ``rediss://...`` (TLS);
* ``redis+sentinel://[user[:password]@]host[:port][,host[:port]...]/service[/db]`` and
  ``rediss+sentinel://...`` (TLS to the Sentinels and to the master they name).

Ports default to 6379 (server) and 26379 (Sentinel); IPv6 hosts go in brackets. Query
strings are refused: TLS files and password sources live under ``state:`` in the config,
where they can be checked, not in a URL.

Every error message describes the problem without quoting the URL or any part of it: a
malformed URL can put a password where a host or port should be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import unquote

SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
REDIS_PORT = 6379
SENTINEL_PORT = 26379
_SERVICE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where and how to connect: one server, or the Sentinels that name the master of
    `service_name`. The password is left out of repr() and describe()."""

    tls: bool
    hosts: tuple[tuple[str, int], ...]  # the server, or every Sentinel
    db: int = 0
    service_name: str | None = None  # Sentinel only: the monitored master's name
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def sentinel(self) -> bool:
        return self.service_name is not None

    def with_password(self, password: str | None) -> RedisTarget:
        return replace(self, password=password)

    def describe(self) -> str:
        """The URL without the password (for health output and error messages)."""
        scheme = ("rediss" if self.tls else "redis") + ("+sentinel" if self.sentinel else "")
        user = f"{self.username}@" if self.username else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        path = f"/{self.service_name}/{self.db}" if self.sentinel else f"/{self.db}"
        return f"{scheme}://{user}{hosts}{path}"


def parse_redis_url(url: str) -> RedisTarget:
    """A RedisTarget from a redis://, rediss://, redis+sentinel:// or rediss+sentinel://
    URL; ValueError (never quoting the URL) when it is not one."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            "must start with redis://, rediss://, redis+sentinel:// or rediss+sentinel://"
        )
    sentinel = scheme.endswith("+sentinel")
    tls = scheme.startswith("rediss")
    if "?" in rest or "#" in rest:
        raise ValueError(
            "query strings and fragments are not supported (set TLS files and the password "
            "source under state:; percent-encode '?', '#', '/' and '@' in a password)"
        )
    authority, _, path = rest.partition("/")
    userinfo, at, hostlist = authority.rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    hosts = _hosts(hostlist, SENTINEL_PORT if sentinel else REDIS_PORT)
    if sentinel:
        service, db = _sentinel_path(path)
    else:
        if len(hosts) > 1:
            raise ValueError("several hosts are only allowed with redis+sentinel://")
        service, db = None, _db(path.rstrip("/"))
    return RedisTarget(
        tls=tls,
        hosts=hosts,
        db=db,
        service_name=service,
        username=username,
        password=password,
    )


def pick_password(
    url_password: str | None, *, from_file: str | None, from_env: str | None
) -> str | None:
    """The one password source in use: the URL's, password_file's or password_env's
    (the file's text without its trailing newline). Two sources at once is a
    configuration error, not a precedence puzzle; so is an empty password."""
    given = [
        name
        for name, value in (
            ("the URL", url_password),
            ("password_file", from_file),
            ("password_env", from_env),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"the password is given twice ({' and '.join(given)}): keep one")
    if from_file is not None:
        from_file = from_file.rstrip("\r\n")
    chosen = next((v for v in (url_password, from_file, from_env) if v is not None), None)
    if chosen is not None and chosen == "":
        raise ValueError(f"the password from {given[0]} is empty")
    return chosen


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    username = unquote(user) or None
    if not colon:
        return username, None
    if not password:
        raise ValueError("the URL has a ':' after the user name but no password")
    return username, unquote(password)


def _hosts(hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not hostlist:
        raise ValueError("no host")
    hosts: list[tuple[str, int]] = []
    for n, item in enumerate(hostlist.split(","), start=1):
        if item.startswith("["):
            host, bracket, tail = item[1:].partition("]")
            if not bracket or not host or (tail and not tail.startswith(":")):
                raise ValueError(f"host #{n}: malformed [IPv6] address")
            port_text = tail[1:] if tail else ""
        else:
            host, _, port_text = item.partition(":")
            if not _HOSTNAME.match(host):
                raise ValueError(f"host #{n}: not a host name or address")
        hosts.append((host, _port(port_text, default_port, n)))
    return tuple(hosts)


def _port(text: str, default: int, n: int) -> int:
    if text == "":
        return default
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"host #{n}: the port is not a number from 1 to 65535")
    return int(text)


def _db(text: str) -> int:
    if text == "":
        return 0
    if not text.isdigit() or int(text) > 1_000_000:
        raise ValueError("the database (the path after the host) is not a number")
    return int(text)


def _sentinel_path(path: str) -> tuple[str, int]:
    parts = [unquote(p) for p in path.rstrip("/").split("/")] if path.strip("/") else []
    if not parts or len(parts) > 2:
        raise ValueError("a Sentinel URL needs /service_name or /service_name/db after the hosts")
    if not _SERVICE.match(parts[0]):
        raise ValueError("the Sentinel service name has characters outside A-Z a-z 0-9 _ . : -")
    return parts[0], _db(parts[1] if len(parts) == 2 else "")
