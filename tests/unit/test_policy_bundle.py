"""Policy bundles: the files load_policy reads, keyed by name, with the same version the
compiled policy reports; compiled from text without touching the disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from casb.policy import PolicyLoadError, load_policy
from casb.policy.bundle import (
    MAX_BUNDLE_BYTES,
    bundle_from_paths,
    bundle_version,
    compile_bundle,
    make_bundle,
)
from casb.policy.loader import policy_files, policy_version
from casb.state.store import PolicyBundle

REPO = Path(__file__).resolve().parents[2]
HOSPITAL = REPO / "policies" / "hospital.yaml"

ROLES = "version: 1\nroles:\n  reader: {}\n"
RULES = """version: 1
rules:
  - id: read-pacs
    effect: allow
    roles: [reader]
    actions: [retrieve]
    destinations: [pacs]
"""


def write(directory: Path, name: str, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_a_directory_bundle_has_the_version_load_policy_reports(tmp_path: Path) -> None:
    write(tmp_path, "20-rules.yaml", RULES)
    write(tmp_path, "10-roles.yml", ROLES)
    write(tmp_path, "notes.txt", "not policy")
    write(tmp_path, ".hidden.yaml", "version: 1\n")
    bundle = bundle_from_paths([tmp_path])
    assert list(bundle.files) == ["10-roles.yml", "20-rules.yaml"]
    loaded = load_policy([tmp_path], known_destinations={"pacs"})
    assert bundle.version == loaded.version
    assert bundle.version == "sha256:" + hashlib.sha256((ROLES + RULES).encode()).hexdigest()
    compiled = compile_bundle(bundle, {"pacs"})
    assert compiled.version == loaded.version
    assert compiled.rule_count == loaded.rule_count == 1
    assert compiled.sources == ("10-roles.yml", "20-rules.yaml")  # base names


def test_the_shipped_policy_as_a_bundle_keeps_its_version() -> None:
    bundle = bundle_from_paths([HOSPITAL])
    assert bundle.version == load_policy([HOSPITAL]).version
    assert compile_bundle(bundle).rule_count == load_policy([HOSPITAL]).rule_count


def test_bytes_survive_as_text_crlf_and_bom_included(tmp_path: Path) -> None:
    raw = b"\xef\xbb\xbfversion: 1\r\nrules: []\r\n"
    path = write(tmp_path, "p.yaml", raw)
    bundle = bundle_from_paths([path])
    assert bundle.version == load_policy([path]).version == policy_version([raw])
    assert compile_bundle(bundle).version == bundle.version


def test_files_load_in_name_order_whatever_order_they_are_given(tmp_path: Path) -> None:
    b = write(tmp_path, "b.yaml", RULES)
    a = write(tmp_path, "a.yaml", ROLES)
    bundle = bundle_from_paths([b, a])
    assert list(bundle.files) == ["a.yaml", "b.yaml"]
    assert bundle.version == load_policy([a, b]).version
    assert make_bundle({"b.yaml": RULES, "a.yaml": ROLES}) == bundle


def test_policy_files_is_what_load_policy_reads(tmp_path: Path) -> None:
    one = write(tmp_path / "d", "x.yaml", ROLES)
    two = write(tmp_path, "y.yaml", RULES)
    assert policy_files([tmp_path / "d", two]) == [one, two]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyLoadError, match=r"no \*\.yaml"):
        policy_files([tmp_path / "empty"])


def test_names_must_be_distinct_base_names(tmp_path: Path) -> None:
    one = write(tmp_path / "a", "p.yaml", ROLES)
    two = write(tmp_path / "b", "p.yaml", RULES)
    with pytest.raises(PolicyLoadError) as err:
        bundle_from_paths([one, two])
    assert f"{two}: file name 'p.yaml' is also {one}" in str(err.value)
    for bad in ("dir/p.yaml", "..", "", "a\nb.yaml", "x\\y.yaml"):
        with pytest.raises(PolicyLoadError, match="policy bundle: "):
            make_bundle({bad: ROLES})


def test_unreadable_inputs_are_named(tmp_path: Path) -> None:
    binary = write(tmp_path, "bin.yaml", b"version: 1\n\xff\n")
    with pytest.raises(PolicyLoadError, match=f"{binary}: not UTF-8 text \\(byte 11\\)"):
        bundle_from_paths([binary])
    with pytest.raises(PolicyLoadError, match="cannot read"):
        bundle_from_paths([tmp_path / "missing.yaml"])
    with pytest.raises(PolicyLoadError, match="no policy files given"):
        bundle_from_paths([])
    with pytest.raises(PolicyLoadError, match="no files"):
        make_bundle({})
    with pytest.raises(PolicyLoadError, match="not UTF-8 text"):
        make_bundle({"s.yaml": "version: 1\n\udcff"})


def test_an_invalid_bundle_is_refused_with_the_loaders_reasons() -> None:
    bundle = make_bundle({"rules.yaml": RULES.replace("[pacs]", "[pcas]"), "roles.yaml": ROLES})
    with pytest.raises(PolicyLoadError) as err:
        compile_bundle(bundle, {"pacs"})
    assert str(err.value) == (
        "rules.yaml: rules[0].destinations[0]: unknown destination 'pcas' (known: pacs)"
    )
    assert compile_bundle(bundle).rule_count == 1  # without known destinations: no check
    broken = make_bundle({"a.yaml": "version: 1\nrules: [\n", "b.yaml": "version: 2\n"})
    with pytest.raises(PolicyLoadError) as err:
        compile_bundle(broken)
    assert [p.split(":")[0] for p in err.value.problems] == ["a.yaml", "b.yaml"]


def test_a_bundle_that_does_not_hash_to_its_version_is_refused() -> None:
    good = make_bundle({"roles.yaml": ROLES})
    forged = PolicyBundle(files={"roles.yaml": ROLES + "# changed\n"}, version=good.version)
    with pytest.raises(PolicyLoadError, match=r"hash to sha256:[0-9a-f]{64}, not to its"):
        compile_bundle(forged)
    assert bundle_version(forged.files) != good.version


def test_an_oversized_bundle_is_refused() -> None:
    with pytest.raises(PolicyLoadError, match="more than the"):
        make_bundle({"big.yaml": "#" * (MAX_BUNDLE_BYTES + 1)})
