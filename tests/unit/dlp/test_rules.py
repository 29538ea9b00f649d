"""casb.dlp.rules: PS3.15 Table E.1-1 loaded as data, composite and option resolution."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from casb.dlp.profile import DEID_OPTIONS
from casb.dlp.rules import (
    ActionTable,
    load_table,
    option_keys,
    parse_table,
    resolve_basic,
)


def raw_rows() -> list[dict[str, str]]:
    text = resources.files("casb.dlp").joinpath("data", "ps3.15-table-e1-1.json").read_text()
    rows: list[dict[str, str]] = json.loads(text)
    return rows


def raw_row(tag: str) -> dict[str, str]:
    return next(r for r in raw_rows() if r["tag"] == tag)


def test_the_packaged_table_has_all_621_rows() -> None:
    assert len(raw_rows()) == 621
    table = load_table()
    assert table.row_count == 621
    # every row is somewhere: exact tags, three tag patterns, one private row
    assert len(table.rows) + len(table.patterns) + 1 == 621


@pytest.mark.parametrize(
    ("tag", "keyword", "basic", "resolved"),
    [
        ("(0010,0010)", "PatientName", "Z", "Z"),
        ("(0010,0020)", "PatientID", "Z/D", "Z"),
        ("(0010,0030)", "PatientBirthDate", "Z", "Z"),
        ("(0020,000D)", "StudyInstanceUID", "U", "U"),
        ("(0008,0018)", "SOPInstanceUID", "U", "U"),
        ("(0002,0003)", "MediaStorageSOPInstanceUID", "U", "U"),
        ("(0008,0080)", "InstitutionName", "X/Z/D", "Z"),
        ("(0008,0021)", "SeriesDate", "X/D", "X"),
        ("(0008,0022)", "AcquisitionDate", "X/Z", "Z"),
        ("(0008,1140)", "ReferencedImageSequence", "X/Z/U*", "U"),
        ("(0008,1030)", "StudyDescription", "X", "X"),
        ("(0040,A730)", "ContentSequence", "D", "D"),
    ],
)
def test_known_rows_match_the_json(tag: str, keyword: str, basic: str, resolved: str) -> None:
    assert raw_row(tag)["basicProfile"] == basic
    value = int(tag[1:5] + tag[6:10], 16)
    row = load_table().row_for(value)
    assert row is not None
    assert row.basic == basic
    assert row.action == resolved
    assert ActionTable(load_table(), []).action(value) == resolved


@pytest.mark.parametrize(
    ("code", "action"),
    [
        ("X/Z", "Z"),
        ("X/D", "X"),
        ("Z/D", "Z"),
        ("X/Z/D", "Z"),
        ("X/Z/U*", "U"),
        ("K", "K"),
        ("C", "C"),
    ],
)
def test_composite_actions_resolve_to_one(code: str, action: str) -> None:
    assert resolve_basic(code) == action


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown basic profile action"):
        resolve_basic("Q")


def test_tag_patterns_cover_overlays_and_curves_only() -> None:
    basic = ActionTable(load_table(), [])
    assert basic.action(0x60003000) == "X"  # Overlay Data, group 6000
    assert basic.action(0x601E3000) == "X"  # ... any overlay group
    assert basic.action(0x60024000) == "X"  # Overlay Comments
    assert basic.action(0x50000010) == "X"  # Curve data (50xx,xxxx)
    assert basic.action(0x60000010) == "K"  # Overlay Rows: not in the table
    assert basic.action(0x00280010) == "K"  # Rows: not in the table


def test_private_tags_follow_the_private_row() -> None:
    assert ActionTable(load_table(), []).action(0x00191010) == "X"
    assert ActionTable(load_table(), []).action(0x00090010) == "X"
    assert ActionTable(load_table(), ["retain_safe_private"]).action(0x00191010) == "C"
    assert ActionTable(load_table(), ["retain_safe_private"]).private == "C"


@pytest.mark.parametrize(
    ("options", "tag", "expected"),
    [
        (["retain_uids"], 0x00080018, "K"),
        (["retain_uids"], 0x00081140, "K"),  # Referenced Image Sequence
        (["retain_longitudinal_modified_dates"], 0x00080020, "C"),
        (["retain_longitudinal_full_dates"], 0x00080020, "K"),
        # both date options on one row: keeping wins over cleaning
        (
            ["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"],
            0x00080020,
            "K",
        ),
        (["clean_descriptors"], 0x00081030, "C"),
        (["retain_device_identity"], 0x00081010, "K"),  # Station Name
        (["retain_device_identity"], 0x00080055, "C"),  # Station AE Title
        (["retain_institution_identity"], 0x00080080, "K"),
        (["retain_patient_characteristics"], 0x00100040, "K"),  # Patient's Sex
        (["clean_structured_content"], 0x0040A730, "C"),
        (["clean_graphics"], 0x60003000, "C"),
        (["retain_uids"], 0x00100010, "Z"),  # an option changes only its own rows
    ],
)
def test_options_override_the_basic_action(options: list[str], tag: int, expected: str) -> None:
    assert ActionTable(load_table(), options).action(tag) == expected


def test_basic_ignores_options() -> None:
    table = ActionTable(load_table(), ["retain_longitudinal_modified_dates"])
    assert table.action(0x00080020) == "C"
    assert table.basic(0x00080020) == "Z"


def test_every_policy_option_names_a_key_of_the_table() -> None:
    keys_in_table = {k for row in raw_rows() for k in row if k.endswith("Opt")}
    assert {key for key, _, _ in DEID_OPTIONS.values()} == keys_in_table
    assert option_keys(["retain_uids"]) == frozenset({"rtnUIDsOpt"})


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown de-identification option"):
        ActionTable(load_table(), ["retain_everything"])


def test_a_table_without_a_private_row_is_refused() -> None:
    rows = [r for r in raw_rows() if not r["tag"].startswith("(GGGG")]
    with pytest.raises(ValueError, match="private"):
        parse_table(rows)
