"""The keyring (casb.encryption.keyring): wrapping, the file format and its errors,
creation and rotation, and the `casb envelope` commands."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from casb.encryption.cli import add_commands
from casb.encryption.envelope import EnvelopeHeader, IntegrityError, new_object, open_object
from casb.encryption.keyring import (
    KeyEncryptionKeys,
    KeyringError,
    LocalKeyring,
    create_keyring_file,
    rotate_keyring_file,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
B64_A = base64.b64encode(KEY_A).decode()
B64_B = base64.b64encode(KEY_B).decode()
ID_PATTERN = re.compile(r"kek-\d{8}-[0-9a-f]{6}")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def seal_bytes(keys: KeyEncryptionKeys, data: bytes) -> tuple[dict[str, str], bytes]:
    header, sealer = new_object(keys, len(data), 16)
    return header.to_metadata(), b"".join(sealer.feed(data) + sealer.finish())


def open_bytes(keys: KeyEncryptionKeys, meta: dict[str, str], body: bytes) -> bytes:
    opener = open_object(keys, EnvelopeHeader.from_metadata(meta))
    return b"".join(opener.feed(body) + opener.finish())


# -- wrapping -----------------------------------------------------------------------------


def test_wrap_uses_the_primary_and_the_documented_layout() -> None:
    ring: KeyEncryptionKeys = LocalKeyring("a", {"a": KEY_A, "b": KEY_B})  # the interface
    dek = os.urandom(32)
    kid, blob = ring.wrap(dek, b"ctx")
    assert kid == "a" == ring.primary_id
    assert len(blob) == 60
    aad = b"casb-envelope-dek/1\0" + b"a" + b"\0" + b"ctx"
    assert AESGCM(KEY_A).decrypt(blob[:12], blob[12:], aad) == dek
    assert ring.unwrap("a", blob, b"ctx") == dek
    assert ring.wrap(dek, b"ctx")[1] != blob  # random nonce


@pytest.mark.parametrize(
    ("kid", "mangle", "context", "message"),
    [
        ("b", lambda b: b, b"ctx", "does not unwrap"),  # another key of the ring
        ("zz", lambda b: b, b"ctx", "unknown key-encryption key 'zz'"),
        ("bad id!", lambda b: b, b"ctx", "^unknown key-encryption key$"),
        ("a", lambda b: b, b"ctx2", "does not unwrap"),  # another object's context
        ("a", lambda b: b[:-1], b"ctx", "does not unwrap"),
        ("a", lambda b: b + b"\0", b"ctx", "does not unwrap"),
        ("a", lambda b: b[:11] + bytes([b[11] ^ 1]) + b[12:], b"ctx", "does not unwrap"),
        ("a", lambda b: b"", b"ctx", "does not unwrap"),
    ],
)
def test_unwrap_refuses(kid: str, mangle: object, context: bytes, message: str) -> None:
    ring = LocalKeyring("a", {"a": KEY_A, "b": KEY_B})
    _, blob = ring.wrap(os.urandom(32), b"ctx")
    assert callable(mangle)
    with pytest.raises(IntegrityError, match=message):
        ring.unwrap(kid, mangle(blob), context)


def test_the_id_is_bound_even_for_equal_keys() -> None:
    ring = LocalKeyring("a", {"a": KEY_A, "b": KEY_A})
    _, blob = ring.wrap(os.urandom(32), b"")
    with pytest.raises(IntegrityError):
        ring.unwrap("b", blob, b"")


def test_repr_shows_ids_not_keys() -> None:
    text = repr(LocalKeyring("a", {"a": KEY_A}))
    assert "'a'" in text
    assert B64_A not in text
    assert KEY_A.hex() not in text
    assert repr(KEY_A) not in text


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="primary"):
        LocalKeyring("x", {"a": KEY_A})
    with pytest.raises(ValueError, match="32 bytes"):
        LocalKeyring("a", {"a": KEY_A[:16]})
    with pytest.raises(ValueError, match="key id"):
        LocalKeyring("a b", {"a b": KEY_A})
    with pytest.raises(ValueError, match="32 bytes"):
        LocalKeyring("a", {"a": KEY_A}).wrap(b"short", b"")


# -- the file -----------------------------------------------------------------------------


def test_from_file_yaml_and_json(tmp_path: Path) -> None:
    yml = tmp_path / "ring.yaml"
    yml.write_text(f"# keys\nprimary: kek-1\nkeys:\n  kek-1: {B64_A}\n  old.key_2: '{B64_B}'\n")
    ring = LocalKeyring.from_file(yml)
    assert ring.primary_id == "kek-1"
    assert ring.key_ids == ("kek-1", "old.key_2")
    js = tmp_path / "ring.json"
    js.write_text(json.dumps({"primary": "b", "keys": {"a": B64_A, "b": B64_B}}))
    ring = LocalKeyring.from_file(str(js))
    _, blob = ring.wrap(bytes(32), b"")
    assert AESGCM(KEY_B).decrypt(blob[:12], blob[12:], b"casb-envelope-dek/1\0b\0") == bytes(32)


BAD_FILES = {
    "empty": ("", "is empty"),
    "not yaml": ("primary: [a\n", "not valid YAML: line 2"),
    "a list": ("- a\n- b\n", "must be a mapping"),
    "unknown field": (f"primary: a\nprimay: a\nkeys: {{a: {B64_A}}}\n", "unknown field 'primay'"),
    "no primary": (f"keys: {{a: {B64_A}}}\n", "'primary' is missing"),
    "no keys": ("primary: a\n", "'keys' is missing"),
    "keys empty": ("primary: a\nkeys: {}\n", "'keys' must be a non-empty mapping"),
    "keys a list": (f"primary: a\nkeys: [{B64_A}]\n", "'keys' must be a non-empty mapping"),
    "primary not a key": (f"primary: b\nkeys: {{a: {B64_A}}}\n", "primary: 'b' is not one of"),
    "primary a number": (f"primary: 7\nkeys: {{a: {B64_A}}}\n", "'primary' must be a key id"),
    "key twice as id": (
        f"primary: a\nkeys:\n  {B64_A}: x\n  {B64_A}: y\n",
        "line 4, column 3: duplicate key",
    ),
    "key not base64": ("primary: a\nkeys: {a: 'not base64 at all!'}\n", "keys.a: not valid base64"),
    "key 16 bytes": (
        f"primary: a\nkeys: {{a: {base64.b64encode(KEY_A[:16]).decode()}}}\n",
        "keys.a: must decode to 32 bytes, not 16",
    ),
    "key a number": ("primary: a\nkeys: {a: 12}\n", "keys.a: must be the base64 of 32"),
    "id with a space": (f"primary: a\nkeys: {{'a b': {B64_A}}}\n", "entry 1: the key id must"),
    "id too long": (f"primary: a\nkeys: {{{'k' * 65}: {B64_A}}}\n", "must match"),
    "id a number": (
        f"primary: a\nkeys: {{a: {B64_A}, 2024: {B64_A}}}\n",
        "entry 2: the key id must be a string",
    ),
    "id is a key": (f"primary: a\nkeys: {{{B64_A}: {B64_B}}}\n", "entry 1: the key id must match"),
    "primary is a key": (f"primary: {B64_A}\nkeys: {{a: {B64_A}}}\n", "'primary' must be a key id"),
    "id twice": (
        f"primary: a\nkeys:\n  a: {B64_A}\n  a: {B64_B}\n",
        "duplicate key 'a'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_keyring_file_errors_are_clear(tmp_path: Path, case: str) -> None:
    content, expected = BAD_FILES[case]
    path = tmp_path / "ring.yaml"
    path.write_text(content)
    with pytest.raises(KeyringError) as caught:
        LocalKeyring.from_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert B64_A not in message and B64_B not in message  # never a key


def test_keyring_file_syntax_error_does_not_quote_the_line(tmp_path: Path) -> None:
    path = tmp_path / "ring.yaml"
    path.write_text(f"primary: a\nkeys:\n  a: {B64_A}\n b: [\n")
    with pytest.raises(KeyringError) as caught:
        LocalKeyring.from_file(path)
    assert B64_A not in str(caught.value)
    assert "line" in str(caught.value)


def test_keyring_file_unreadable_or_odd(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read the keyring: No such file"):
        LocalKeyring.from_file(tmp_path / "missing.yaml")
    with pytest.raises(KeyringError, match="cannot read the keyring"):
        LocalKeyring.from_file(tmp_path)  # a directory
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyringError, match="not UTF-8"):
        LocalKeyring.from_file(binary)
    huge = tmp_path / "huge"
    huge.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(KeyringError, match="larger than"):
        LocalKeyring.from_file(huge)


# -- create and rotate --------------------------------------------------------------------


def test_create_keyring_file(tmp_path: Path) -> None:
    path = tmp_path / "ring.yaml"
    old_umask = os.umask(0)  # the file is 0600 whatever the umask
    try:
        kid = create_keyring_file(path)
    finally:
        os.umask(old_umask)
    assert ID_PATTERN.fullmatch(kid)
    assert mode(path) == 0o600
    ring = LocalKeyring.from_file(path)
    assert ring.primary_id == kid
    assert ring.key_ids == (kid,)
    assert create_keyring_file(tmp_path / "other.yaml") != kid  # fresh every time


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "ring.yaml"
    path.write_text("keep me")
    with pytest.raises(KeyringError, match="already exists"):
        create_keyring_file(path)
    assert path.read_text() == "keep me"
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "nowhere.yaml")  # a dangling symlink is not followed
    with pytest.raises(KeyringError, match="already exists"):
        create_keyring_file(link)
    assert not (tmp_path / "nowhere.yaml").exists()
    with pytest.raises(KeyringError, match="cannot create"):
        create_keyring_file(tmp_path / "no" / "such" / "dir.yaml")


def test_rotation_keeps_old_objects_readable(tmp_path: Path) -> None:
    path = tmp_path / "ring.yaml"
    first = create_keyring_file(path)
    old_ring = LocalKeyring.from_file(path)
    meta, body = seal_bytes(old_ring, b"sealed before the rotation")
    path.chmod(0o644)

    second = rotate_keyring_file(path)

    assert second != first and ID_PATTERN.fullmatch(second)
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ring.yaml"]  # no temp file left
    ring = LocalKeyring.from_file(path)
    assert ring.primary_id == second
    assert ring.key_ids == tuple(sorted((first, second)))
    assert open_bytes(ring, meta, body) == b"sealed before the rotation"
    new_meta, new_body = seal_bytes(ring, b"after")
    assert new_meta["casb-kek"] == second
    with pytest.raises(IntegrityError, match="unknown key-encryption key"):
        open_bytes(old_ring, new_meta, new_body)  # a proxy with the old file cannot read it

    third = rotate_keyring_file(path)
    ring = LocalKeyring.from_file(path)
    assert ring.primary_id == third and len(ring.key_ids) == 3
    assert open_bytes(ring, meta, body) == b"sealed before the rotation"
    assert open_bytes(ring, new_meta, new_body) == b"after"


def test_rotation_keeps_hand_written_keys(tmp_path: Path) -> None:
    path = tmp_path / "ring.yaml"
    path.write_text(f"primary: '1.5'\nkeys:\n  '1.5': {B64_A}\n  'true': {B64_B}\n")
    rotate_keyring_file(path)
    ring = LocalKeyring.from_file(path)  # "1.5" and "true" stay strings
    assert set(ring.key_ids) >= {"1.5", "true"}
    _, blob = LocalKeyring("1.5", {"1.5": KEY_A}).wrap(bytes(32), b"")
    assert ring.unwrap("1.5", blob, b"") == bytes(32)


def test_rotation_through_a_symlink_replaces_the_target(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    create_keyring_file(real)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    kid = rotate_keyring_file(link)
    assert link.is_symlink()
    assert LocalKeyring.from_file(real).primary_id == kid


def test_rotation_of_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ring.yaml"
    content = f"primary: b\nkeys: {{a: {B64_A}}}\n"
    path.write_text(content)
    with pytest.raises(KeyringError, match="primary"):
        rotate_keyring_file(path)
    assert path.read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ring.yaml"]
    with pytest.raises(KeyringError, match="No such file"):
        rotate_keyring_file(tmp_path / "missing.yaml")


# -- casb envelope keygen / rotate ----------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="casb")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli_keygen_and_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ring.yaml"
    assert run_cli("envelope", "keygen", "--keyring", str(path)) == 0
    out = capsys.readouterr()
    first = out.out.strip()
    assert ID_PATTERN.fullmatch(first)
    assert LocalKeyring.from_file(path).primary_id == first
    assert B64_A not in out.err

    assert run_cli("envelope", "keygen", "--keyring", str(path)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"casb: error: {path}: already exists")

    assert run_cli("envelope", "rotate", "--keyring", str(path)) == 0
    second = capsys.readouterr().out.strip()
    ring = LocalKeyring.from_file(path)
    assert ID_PATTERN.fullmatch(second) and ring.primary_id == second
    assert first in ring.key_ids


def test_cli_rotate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("envelope", "rotate", "--keyring", str(tmp_path / "missing.yaml")) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "casb: error:" in captured.err and "missing.yaml" in captured.err
    bad = tmp_path / "bad.yaml"
    bad.write_text("primary: a\nkeys: {a: AAAA}\n")
    assert run_cli("envelope", "rotate", "--keyring", str(bad)) == 1
    assert "keys.a: must decode to 32 bytes" in capsys.readouterr().err


def test_cli_needs_the_keyring_option() -> None:
    with pytest.raises(SystemExit) as caught:
        run_cli("envelope", "keygen")
    assert caught.value.code == 2
