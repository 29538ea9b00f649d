"""The Redis URL parser and open_state's configuration checks (no server: nothing
connects until the first call)."""

from __future__ import annotations

from pathlib import Path

import pytest

from casb.config import ConfigError, StateSettings, StateTls
from casb.state import MemoryState, RedisState, open_state
from casb.state.redis_url import RedisTarget, parse_redis_url, pick_password

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://cache", RedisTarget(tls=False, hosts=(("cache", 6379),))),
        ("redis://cache:6380/2", RedisTarget(tls=False, hosts=(("cache", 6380),), db=2)),
        ("REDISS://10.0.0.5/", RedisTarget(tls=True, hosts=(("10.0.0.5", 6379),))),
        ("redis://[::1]:7000/1", RedisTarget(tls=False, hosts=(("::1", 7000),), db=1)),
        ("redis://[fd00::5]", RedisTarget(tls=False, hosts=(("fd00::5", 6379),))),
        (
            "redis://casb:p%40ss%2Fw0rd@cache:6379/0",
            RedisTarget(tls=False, hosts=(("cache", 6379),), username="casb", password="p@ss/w0rd"),
        ),
        (
            "redis://:only-a-password@cache",
            RedisTarget(tls=False, hosts=(("cache", 6379),), password="only-a-password"),
        ),
        ("redis://casb@cache", RedisTarget(tls=False, hosts=(("cache", 6379),), username="casb")),
        (
            "redis://u:p@ss@cache",  # the last '@' ends the userinfo
            RedisTarget(tls=False, hosts=(("cache", 6379),), username="u", password="p@ss"),
        ),
        (
            "redis+sentinel://s1,s2:26380,[::1]/mymaster",
            RedisTarget(
                tls=False,
                hosts=(("s1", 26379), ("s2", 26380), ("::1", 26379)),
                service_name="mymaster",
            ),
        ),
        (
            "rediss+sentinel://casb:pw@s1:26379/my-master.1/3/",
            RedisTarget(
                tls=True,
                hosts=(("s1", 26379),),
                service_name="my-master.1",
                db=3,
                username="casb",
                password="pw",
            ),
        ),
    ],
)
def test_parses(url: str, expected: RedisTarget) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://cache", "must start with redis://"),
        ("cache:6379", "must start with redis://"),
        ("redis://", "no host"),
        ("redis://cache:0", "port is not a number"),
        ("redis://cache:99999", "port is not a number"),
        (f"redis://user:{SECRET}/x@cache", "port is not a number"),  # unencoded '/'
        ("redis://cache/abc", "database"),
        ("redis://a,b/0", r"only allowed with redis\+sentinel"),
        ("redis://cache/0?ssl_cert_reqs=none", "query strings"),
        (f"redis://user:{SECRET}#@cache", "query strings"),
        ("redis://[::1/0", "IPv6"),
        ("redis://user:@cache", "no password"),
        ("redis+sentinel://s1:26379", "service_name"),
        ("redis+sentinel://s1:26379/", "service_name"),
        ("redis+sentinel://s1/svc/1/2", "service_name"),
        ("redis+sentinel://s1/sv%20c", "service name"),
        ("redis://ca che", "not a host name"),
    ],
)
def test_refuses_without_echoing(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_redis_url(url)
    assert SECRET not in str(err.value)
    assert "cache" not in str(err.value)


def test_describe_and_repr_hide_the_password() -> None:
    target = parse_redis_url(f"rediss://casb:{SECRET}@cache:6380/4")
    assert target.describe() == "rediss://casb@cache:6380/4"
    assert SECRET not in repr(target)
    sentinel = parse_redis_url(f"redis+sentinel://:{SECRET}@[::1],s2:1/svc")
    assert sentinel.describe() == "redis+sentinel://[::1]:26379,s2:1/svc/0"


def test_pick_password() -> None:
    assert pick_password(None, from_file=None, from_env=None) is None
    assert pick_password("u", from_file=None, from_env=None) == "u"
    assert pick_password(None, from_file="f\n", from_env=None) == "f"
    assert pick_password(None, from_file=None, from_env="e") == "e"
    with pytest.raises(ValueError, match=r"given twice \(the URL and password_file\)") as err:
        pick_password(SECRET, from_file=SECRET, from_env=None)
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="given twice"):
        pick_password(None, from_file="f", from_env="e")
    with pytest.raises(ValueError, match="password_file is empty"):
        pick_password(None, from_file="\n", from_env=None)


# -- open_state -----------------------------------------------------------------------
def test_memory_by_default(tmp_path: Path) -> None:
    assert isinstance(open_state(StateSettings(), state_dir=tmp_path), MemoryState)


async def test_redis_without_connecting(tmp_path: Path) -> None:
    store = open_state(StateSettings(url="redis://127.0.0.1:1/0"), state_dir=tmp_path)
    assert isinstance(store, RedisState)
    assert store.description == "redis://127.0.0.1:1/0"
    await store.aclose()


async def test_password_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    store = open_state(
        StateSettings(url="redis://casb@cache/0", password_file=pw), state_dir=tmp_path
    )
    assert isinstance(store, RedisState) and store._target.password == SECRET
    assert SECRET not in store.description
    await store.aclose()
    monkeypatch.setenv("CASB_TEST_REDIS_PW", SECRET)
    store = open_state(
        StateSettings(url="redis://cache/0", password_env="CASB_TEST_REDIS_PW"),
        state_dir=tmp_path,
    )
    assert isinstance(store, RedisState) and store._target.password == SECRET
    await store.aclose()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (StateSettings(url="redis://cache:x"), "state.url: host #1: the port"),
        (
            StateSettings(url=f"redis://:{SECRET}@cache", password_env="CASB_TEST_REDIS_PW"),
            "given twice",
        ),
        (
            StateSettings(url="redis://cache", password_env="CASB_TEST_UNSET_VARIABLE"),
            "CASB_TEST_UNSET_VARIABLE is not set",
        ),
        (
            StateSettings(url="redis://cache", password_file=Path("/nonexistent/pw")),
            "state.password_file: cannot read",
        ),
        (
            StateSettings(url="redis://cache", tls=StateTls(ca_bundle=Path("/etc/hostname"))),
            "use rediss://",
        ),
        (
            StateSettings(url="rediss://cache", tls=StateTls(ca_bundle=Path("/nonexistent"))),
            "state.tls.ca_bundle",
        ),
    ],
)
def test_config_errors(
    settings: StateSettings, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASB_TEST_REDIS_PW", SECRET)
    monkeypatch.delenv("CASB_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(ConfigError, match=message) as err:
        open_state(settings, state_dir=tmp_path)
    assert SECRET not in str(err.value)
