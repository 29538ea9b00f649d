"""`casb policy publish | versions | rollback` through argparse, against the real
MemoryState (the commands' store-facing halves) and the real `run` wrapper (memory://
refused, invalid policies refused before any store is contacted, a store that is down)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from casb.config import Settings, load_settings
from casb.policy import load_policy
from casb.policy.cli_store import add_policy_store_commands, publish, rollback, versions
from casb.state import MemoryState
from tests.support.processes import free_port

ROLES = "version: 1\nroles:\n  reader: {}\n"


def rules(action: str, destination: str = "pacs") -> str:
    return (
        "version: 1\nrules:\n  - id: r1\n    effect: allow\n    roles: [reader]\n"
        f"    actions: [{action}]\n    destinations: [{destination}]\n"
    )


def parser() -> argparse.ArgumentParser:
    """`casb policy ...` as casb/cli.py builds it."""
    top = argparse.ArgumentParser(prog="casb")
    sub = top.add_subparsers(dest="command", required=True)
    policy = sub.add_parser("policy")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    add_policy_store_commands(psub)
    return top


def config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "casb.yaml"
    path.write_text(
        "environment: dev\n"
        "state_dir: .casb\n"
        "destinations:\n  pacs: {upstream: 'https://pacs.example.org/dicom-web'}\n"
        "policy: {paths: [policies]}\n"
        f"state: {{url: '{url}', policy_poll_seconds: 2}}\n"
    )
    return path


def policies(tmp_path: Path, rules_text: str, name: str = "policies") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "10-roles.yaml").write_text(ROLES)
    (directory / "20-rules.yaml").write_text(rules_text)
    return directory


@pytest.fixture
def redis_config(tmp_path: Path) -> Path:
    """A configuration naming a Redis nobody listens on: the real `run` wrapper fails
    only if it gets as far as the store."""
    return config(tmp_path, f"redis://127.0.0.1:{free_port()}/0")


def settings_of(cfg: Path) -> Settings:
    return load_settings(cfg)


@pytest.mark.parametrize(
    "argv",
    [["publish", "policies"], ["versions"], ["rollback", "sha256:" + "a" * 64]],
)
def test_with_memory_state_the_commands_say_to_edit_the_files(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    policies(tmp_path, rules("retrieve"))
    cfg = config(tmp_path, "memory://")
    args = parser().parse_args(["policy", *argv, "--config", str(cfg)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "publishing needs a shared state store" in err
    assert "edit the policy files instead" in err and "watches them" in err


async def test_publish_validates_against_the_destinations_then_publishes(
    tmp_path: Path, redis_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "alice")
    directory = policies(tmp_path, rules("search"))
    args = parser().parse_args(
        ["policy", "publish", str(directory), "--comment", "search only", "-c", str(redis_config)]
    )
    store, out = MemoryState(), io.StringIO()
    assert await publish(args, settings_of(redis_config), store, out) == 0
    expected = load_policy([directory]).version
    assert await store.current_policy_version() == expected
    [meta] = await store.policy_versions()
    assert (meta.author, meta.comment, meta.current) == ("alice", "search only", True)
    assert out.getvalue().startswith(f"published {expected}: 1 rules from 10-roles.yaml, ")
    assert "replicas switch within 2 s" in out.getvalue()


async def test_an_invalid_policy_is_not_published(
    tmp_path: Path, redis_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = policies(tmp_path, rules("search", destination="archive"))
    args = parser().parse_args(["policy", "publish", str(directory), "-c", str(redis_config)])
    store = MemoryState()
    assert await publish(args, settings_of(redis_config), store, io.StringIO()) == 1
    assert await store.policy_versions() == [] and await store.current_policy() is None
    err = capsys.readouterr().err
    assert "policy not published" in err
    assert "20-rules.yaml: rules[0].destinations[0]: unknown destination 'archive'" in err


def test_the_command_refuses_an_invalid_policy_before_using_the_store(
    tmp_path: Path, redis_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = policies(tmp_path, rules("search", destination="archive"))
    args = parser().parse_args(["policy", "publish", str(directory), "-c", str(redis_config)])
    assert args.func(args) == 1  # the store is down: a store call would say "unavailable"
    err = capsys.readouterr().err
    assert "unknown destination 'archive'" in err and "unavailable" not in err


def test_a_store_that_is_down_publishes_nothing_and_says_so(
    tmp_path: Path, redis_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = policies(tmp_path, rules("search"))
    args = parser().parse_args(["policy", "publish", str(directory), "-c", str(redis_config)])
    assert args.func(args) == 1
    assert "state store unavailable, nothing published: redis" in capsys.readouterr().err


async def test_versions_lists_newest_first_with_the_current_marked(
    tmp_path: Path, redis_config: Path
) -> None:
    settings = settings_of(redis_config)
    store, p = MemoryState(), parser()
    empty = io.StringIO()
    args = p.parse_args(["policy", "versions", "-c", str(redis_config)])
    assert await versions(args, settings, store, empty) == 0
    assert "no policy published yet" in empty.getvalue()
    one = policies(tmp_path, rules("search"), "one")
    two = policies(tmp_path, rules("retrieve"), "two")
    for directory, who in ((one, "alice"), (two, "bob")):
        args = p.parse_args(["policy", "publish", str(directory), "--author", who])
        assert await publish(args, settings, store, io.StringIO()) == 0
    v1, v2 = load_policy([one]).version, load_policy([two]).version
    await store.set_current_policy(v1, author="carol")

    out = io.StringIO()
    assert await versions(p.parse_args(["policy", "versions"]), settings, store, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"  {v2}  ") and lines[0].endswith("  bob")
    assert lines[1].startswith(f"* {v1}  ") and lines[1].endswith("  alice")

    out = io.StringIO()
    args = p.parse_args(["policy", "versions", "--json", "--limit", "1"])
    assert await versions(args, settings, store, out) == 0
    [entry] = json.loads(out.getvalue())
    assert entry["version"] == v2 and entry["current"] is False and entry["author"] == "bob"
    assert entry["published_at"].endswith("Z")


async def test_rollback_takes_a_known_version_or_a_unique_prefix_and_refuses_others(
    tmp_path: Path, redis_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_of(redis_config)
    store, p = MemoryState(), parser()
    one = policies(tmp_path, rules("search"), "one")
    two = policies(tmp_path, rules("retrieve"), "two")
    for directory in (one, two):
        args = p.parse_args(["policy", "publish", str(directory)])
        assert await publish(args, settings, store, io.StringIO()) == 0
    v1, v2 = load_policy([one]).version, load_policy([two]).version

    out = io.StringIO()
    args = p.parse_args(["policy", "rollback", v1, "--comment", "reads broke", "--author", "dan"])
    assert await rollback(args, settings, store, out) == 0
    assert await store.current_policy_version() == v1
    assert out.getvalue().startswith(f"current policy is now {v1} (published by ")
    prefix = v2.removeprefix("sha256:")[:10]
    assert await rollback(p.parse_args(["policy", "rollback", prefix]), settings, store, out) == 0
    assert await store.current_policy_version() == v2

    unknown = "sha256:" + "0" * 64
    assert await rollback(p.parse_args(["policy", "rollback", unknown]), settings, store, out) == 1
    assert f"no published policy version {unknown}" in capsys.readouterr().err
    assert (
        await rollback(p.parse_args(["policy", "rollback", "00000000"]), settings, store, out) == 1
    )
    assert "no published policy version 00000000" in capsys.readouterr().err
    assert await rollback(p.parse_args(["policy", "rollback", "latest"]), settings, store, out) == 1
    assert "'latest' is not a policy version" in capsys.readouterr().err
    assert await store.current_policy_version() == v2  # nothing moved


def test_files_given_out_of_name_order_are_noted(
    tmp_path: Path, redis_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = policies(tmp_path, rules("search"))
    args = parser().parse_args(
        [
            "policy",
            "publish",
            str(directory / "20-rules.yaml"),
            str(directory / "10-roles.yaml"),
            "-c",
            str(redis_config),
        ]
    )
    assert args.func(args) == 1  # the store is down; the note comes first
    err = capsys.readouterr().err
    assert "note: the files load in name order: 10-roles.yaml, 20-rules.yaml" in err
