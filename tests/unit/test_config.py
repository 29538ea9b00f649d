from pathlib import Path
from typing import Any

import pytest

from casb.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]

IDENTITY = """
identity:
  issuer: https://idp.example
  audience: casb
  jwks_url: https://idp.example/jwks
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "casb.yaml"
    p.write_text(text)
    return p


def test_example_config_is_valid() -> None:
    s = load_settings(REPO / "casb.example.yaml")
    assert s.environment == "production"
    assert set(s.destinations) == {"pacs", "research"}
    assert s.identity is not None and s.identity.audience == ["casb"]
    assert s.route_of("research") == "/research"


def test_embedded_dev_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CASB_CONFIG", raising=False)
    s = load_settings()
    assert s.environment == "dev"
    assert s.identity is None
    assert s.listeners[0].host == "127.0.0.1"
    assert s.policy.paths == [tmp_path / "policies" / "hospital.yaml"]


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        IDENTITY
        + """
destinations: {pacs: {upstream: "http://127.0.0.1:8042/dicom-web"}}
audit: {path: logs/audit.jsonl}
policy: {paths: [pol.yaml]}
""",
    )
    s = load_settings(p)
    assert s.audit.path == tmp_path / "logs" / "audit.jsonl"
    assert s.policy.paths == [tmp_path / "pol.yaml"]


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, IDENTITY + 'destinations: {pacs: {upstream: "http://h/dw"}}\n')
    monkeypatch.setenv("CASB_AUDIT__PATH", "/tmp/elsewhere.jsonl")
    monkeypatch.setenv("CASB_ENVIRONMENT", "dev")
    s = load_settings(p)
    assert s.audit.path == Path("/tmp/elsewhere.jsonl")
    assert s.environment == "dev"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('destinations: {pacs: {upstream: "ftp://x/y"}}\n', "destinations.pacs.upstream", "http"),
        (
            'destinations: {pacs: {upstream: "http://x/y", colour: red}}\n',
            "destinations.pacs.colour",
            "Extra inputs",
        ),
        ("destinations: {}\n", "destinations", "at least 1"),
        (
            'destinations: {pacs: {upstream: "http://x"}}\nidentity: {issuer: i, audience: a, '
            'jwks_url: "https://k", algorithms: [HS256]}\n',
            "identity.algorithms",
            "HS256",
        ),
        (
            'destinations: {pacs: {upstream: "http://x"}}\nidentity: {issuer: i, audience: a}\n',
            "identity",
            "exactly one of 'jwks_url' or 'jwks_file'",
        ),
        (
            'destinations: {pacs: {upstream: "http://x"}}\n',
            "(top level)",
            "identity: required when environment is production",
        ),
        (
            'environment: dev\ndestinations: {a: {upstream: "http://x", route: /p}, '
            'b: {upstream: "http://y", route: /p/q}}\n',
            "(top level)",
            "overlaps",
        ),
        (
            'environment: dev\ndestinations: {a: {upstream: "http://x", upstream_auth: '
            "{type: basic, username: u}}}\n",
            "destinations.a.upstream_auth",
            "password",
        ),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, field: str, words: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(p)
    msg = str(err.value)
    assert str(p) in msg
    assert field in msg
    assert words in msg


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "a: [1, 2"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_settings(write(tmp_path, "- 1\n- 2\n"))


def test_helm_values_config_is_a_valid_casb_config() -> None:
    """The chart's default `config` (plus the keys the chart sets itself) must load."""
    import yaml

    from casb.config import Settings

    values = yaml.safe_load((REPO / "helm" / "casb" / "values.yaml").read_text())
    config = dict(values["config"])
    config.update(
        state_dir="/var/lib/casb",
        policy={"paths": ["/etc/casb/policies"]},
        audit={
            "path": "/var/log/casb/audit.jsonl",
            "checkpoints": {"signing_key_file": "/etc/casb/audit-signing/signing-key.pem"},
        },
        listeners=[
            {
                "mode": "reverse",
                "host": "0.0.0.0",
                "port": values["service"]["proxyPort"],
                "tls": {"cert_file": "/etc/casb/tls/tls.crt", "key_file": "/etc/casb/tls/tls.key"},
            }
        ],
    )
    config["admin"] = {
        **config.get("admin", {}),
        "host": "0.0.0.0",
        "port": values["service"]["adminPort"],
    }
    s = Settings(**config)
    assert s.environment == "production" and s.identity is not None
    assert (REPO / "helm" / "casb" / "files" / "hospital.yaml").read_text() == (
        REPO / "policies" / "hospital.yaml"
    ).read_text()


def test_rate_limits_name_known_actions_and_destinations() -> None:
    from casb.config import Settings

    base: dict[str, Any] = {
        "environment": "dev",
        "destinations": {"pacs": {"upstream": "http://p/x"}},
    }
    ok = Settings(**base, limits={"rate": [{"name": "r", "actions": ["retrieve"], "requests": 5}]})
    assert ok.limits.rate[0].window_seconds == 60
    for bad, message in (
        ({"name": "r", "requests": 1, "actions": ["fetch"]}, "unknown action"),
        ({"name": "r", "requests": 1, "destinations": ["vault"]}, "unknown destination"),
        ({"name": "r"}, "set requests, bytes or both"),
    ):
        with pytest.raises(ValueError, match=message):
            Settings(**base, limits={"rate": [bad]})
    with pytest.raises(ValueError, match="share a name"):
        Settings(**base, limits={"rate": [{"name": "r", "requests": 1}] * 2})


def test_state_urls_are_checked() -> None:
    from casb.config import Settings

    base: dict[str, Any] = {
        "environment": "dev",
        "destinations": {"pacs": {"upstream": "http://p/x"}},
    }
    for url in ("memory://", "redis://h:6379/0", "rediss://u@h", "redis+sentinel://a:1,b:2/m"):
        assert Settings(**base, state={"url": url}).state.url == url
    with pytest.raises(ValueError, match="must be memory://"):
        Settings(**base, state={"url": "http://redis:6379"})
