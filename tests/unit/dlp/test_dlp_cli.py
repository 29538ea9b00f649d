"""`casb dlp scan` / `casb dlp deid` in-process: exit codes, output, no PHI printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from casb.cli import main
from casb.dlp.deidentify import hashed_uid
from tests.support.dicom_corpus import (
    INSTANCE_UID,
    PATIENT_ID,
    PATIENT_NAME,
    UID_KEY,
    add_nested_phi,
    add_private,
    bundled,
    ct_dataset,
    encode_instance,
    reread,
)

REPO = Path(__file__).resolve().parents[3]
HOSPITAL_POLICY = REPO / "policies" / "hospital.yaml"


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "ct.dcm"
    path.parent.mkdir()
    ds = add_nested_phi(add_private(ct_dataset()))
    ds.StudyDescription = f"{PATIENT_NAME} tel 555-123-4567"
    path.write_bytes(encode_instance(ds))
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "uid.key"
    path.write_bytes(UID_KEY + b"\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "SENTINEL" not in out.upper() + err.upper()
    assert PATIENT_ID not in out + err
    assert "555-123-4567" not in out + err
    return code, out, err


def test_help_lists_the_dlp_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--help"],
        ["dlp", "--help"],
        ["dlp", "scan", "--help"],
        ["dlp", "deid", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    assert "dlp" in capsys.readouterr().out


def test_scan_a_pydicom_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "CT_small.dcm"
    path.write_bytes(bundled("CT_small.dcm"))
    code, out, err = run(capsys, "dlp", "scan", str(path))
    assert code == 1
    header, *rows = out.splitlines()
    assert header.split() == ["FILE", "RULE", "KEYWORD", "TAG", "PATH"]
    assert any(
        r.split()[1:5] == ["annex_e", "PatientName", "(0010,0010)", "PatientName"] for r in rows
    )
    assert "CompressedSamples" not in out  # the file's patient name
    assert "1 file(s) scanned: 1 with findings, 0 unreadable" in err


def test_scan_json_lines(ct_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "dlp", "scan", "--json", str(ct_file))
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(set(r) == {"file", "rule", "keyword", "tag", "path"} for r in rows)
    found = {(r["rule"], r["path"]) for r in rows}
    assert ("free_text.patient_name", "StudyDescription") in found
    assert ("free_text.phone", "StudyDescription") in found
    assert ("private_tag", "(0019,xx10)") in found


def test_scan_a_directory_with_an_unreadable_file(
    ct_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = ct_file.parent / "sub" / "notes.txt"
    garbage.parent.mkdir()
    garbage.write_text(f"{PATIENT_NAME} is not DICOM at all, not even close to it\n")
    code, out, err = run(capsys, "dlp", "scan", "--json", str(ct_file.parent))
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    errors = [r for r in rows if "error" in r]
    assert errors == [{"file": str(garbage), "error": errors[0]["error"]}]
    assert "2 file(s) scanned: 1 with findings, 1 unreadable" in err


def test_scan_exit_codes(
    tmp_path: Path, ct_file: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "dlp", "scan", str(tmp_path / "missing.dcm"))[0] == 2
    clean = tmp_path / "clean.dcm"
    code, _, _ = run(
        capsys, "dlp", "deid", str(ct_file), str(clean), "--uid-key-file", str(key_file)
    )
    assert code == 0
    assert run(capsys, "dlp", "scan", str(clean)) == (
        0,
        "",
        "1 file(s) scanned: 0 with findings, 0 unreadable\n",
    )


def test_scan_uses_the_dlp_section_of_the_configs_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        HOSPITAL_POLICY.read_text().replace(r"'\bMRN[:#\s]*\d{5,}\b'", r"'\bCHART-\d{4}\b'")
    )
    config = tmp_path / "casb.yaml"
    config.write_text(
        f"environment: dev\nstate_dir: {tmp_path / 'state'}\n"
        "destinations:\n  pacs: {upstream: 'http://127.0.0.1:1/dicom-web'}\n"
        "  research: {upstream: 'http://127.0.0.1:1/dicom-web'}\n"
        f"policy: {{paths: ['{policy}']}}\n"
    )
    ds = ct_dataset()
    ds.StudyDescription = "see CHART-1234"
    path = tmp_path / "chart.dcm"
    path.write_bytes(encode_instance(ds))
    _, default, _ = run(capsys, "dlp", "scan", "--json", str(path))
    _, configured, _ = run(capsys, "dlp", "scan", "--json", "--config", str(config), str(path))
    assert "free_text.mrn" not in default
    assert "free_text.mrn" in configured


def test_deid_a_file(
    ct_file: Path, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "out.dcm"
    code, out, _ = run(
        capsys, "dlp", "deid", str(ct_file), str(out_path), "--uid-key-file", str(key_file)
    )
    assert code == 0
    assert str(out_path) in out
    written = out_path.read_bytes()
    assert b"SENTINEL" not in written
    ds = reread(written)
    assert str(ds.PatientName) == ""
    assert ds.SOPInstanceUID == hashed_uid(UID_KEY, INSTANCE_UID)
    assert ds.PixelData == ct_dataset().PixelData
    assert ds.PatientIdentityRemoved == "YES"


def test_deid_options(
    ct_file: Path, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "out.dcm"
    argv = ["dlp", "deid", str(ct_file), str(out_path), "--uid-key-file", str(key_file)]
    assert run(capsys, *argv, "--option", "retain_uids", "--option", "clean_descriptors")[0] == 0
    ds = reread(out_path.read_bytes())
    assert ds.SOPInstanceUID == INSTANCE_UID
    assert ds.StudyDescription == "[REMOVED]^[REMOVED] tel [REMOVED]"  # name parts, phone
    with pytest.raises(SystemExit):
        main([*argv, "--option", "retain_everything"])
    capsys.readouterr()


def test_deid_with_a_policy_profile(
    ct_file: Path, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "out.dcm"
    base = ["dlp", "deid", str(ct_file), str(out_path), "--uid-key-file", str(key_file)]
    code, _, _ = run(
        capsys, *base, "--profile", "research-deidentify", "--policy", str(HOSPITAL_POLICY)
    )
    assert code == 0
    ds = reread(out_path.read_bytes())
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    code, _, err = run(
        capsys, *base, "--profile", "clinical-upload", "--policy", str(HOSPITAL_POLICY)
    )
    assert code == 2
    assert "does not de-identify" in err
    code, _, err = run(capsys, *base, "--profile", "nope", "--policy", str(HOSPITAL_POLICY))
    assert code == 2
    assert "research-deidentify" in err
    assert run(capsys, *base, "--profile", "research-deidentify")[0] == 2


def test_deid_a_directory(
    ct_file: Path, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nested = ct_file.parent / "a" / "b.dcm"
    nested.parent.mkdir()
    nested.write_bytes(bundled("MR_small.dcm"))
    (ct_file.parent / "junk.bin").write_bytes(b"\x00" * 300)
    target = tmp_path / "out"
    code, _, err = run(
        capsys, "dlp", "deid", str(ct_file.parent), str(target), "--uid-key-file", str(key_file)
    )
    assert code == 2  # one input was not DICOM
    assert "junk.bin" in err
    assert str(reread((target / "a" / "b.dcm").read_bytes()).PatientName) == ""
    assert (target / "ct.dcm").exists()
    assert not (target / "junk.bin").exists()
    assert "2 file(s) written" in err


def test_deid_bad_input(
    tmp_path: Path, ct_file: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "out.dcm"
    key = ["--uid-key-file", str(key_file)]
    assert run(capsys, "dlp", "deid", str(tmp_path / "missing"), str(out_path), *key)[0] == 2
    short = tmp_path / "short.key"
    short.write_bytes(b"tiny")
    code, _, err = run(
        capsys, "dlp", "deid", str(ct_file), str(out_path), "--uid-key-file", str(short)
    )
    assert code == 2
    assert "at least 16 bytes" in err
    truncated = tmp_path / "truncated.dcm"
    data = ct_file.read_bytes()
    truncated.write_bytes(data[: data.index(b"SENTINEL") + 3])  # inside a value
    code, _, err = run(capsys, "dlp", "deid", str(truncated), str(out_path), *key)
    assert code == 2
    assert str(truncated) in err
    assert not out_path.exists()
    assert run(capsys, "dlp", "deid", str(ct_file), str(ct_file), *key)[0] == 2


def test_deid_takes_the_key_from_the_configuration(
    ct_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "casb.yaml"
    config.write_text(
        f"environment: dev\nstate_dir: {tmp_path / 'state'}\n"
        "destinations:\n  pacs: {upstream: 'http://127.0.0.1:1/dicom-web'}\n"
    )
    first, second = tmp_path / "one.dcm", tmp_path / "two.dcm"
    assert run(capsys, "dlp", "deid", str(ct_file), str(first), "--config", str(config))[0] == 0
    assert run(capsys, "dlp", "deid", str(ct_file), str(second), "--config", str(config))[0] == 0
    assert (tmp_path / "state" / "dlp-uid.key").exists()
    assert first.read_bytes() == second.read_bytes()  # the same dev key both times
