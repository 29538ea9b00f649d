"""casb.dlp.stow_response: PS3.18 STOW-RS answers with DLP's failures folded in."""

from __future__ import annotations

import json
from typing import Any

from casb.dlp.multipart_stream import PartResult
from casb.dlp.stow_response import (
    FAILURE_BLOCKED,
    FAILURE_TOO_LARGE,
    FAILURE_UNREADABLE,
    merge_stow_response,
    stow_failure_body,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DICOM_JSON = "application/dicom+json"

ORTHANC_STORED = {
    "00080005": {"Value": ["ISO_IR100"], "vr": "CS"},
    "00081190": {"Value": ["http://orthanc/dicom-web/studies/1.2"], "vr": "UR"},
    "00081198": {"vr": "SQ"},
    "00081199": {
        "Value": [
            {
                "00081150": {"Value": [CT_IMAGE], "vr": "UI"},
                "00081155": {"Value": ["1.3.6.1.4.1.5962.1.1.1"], "vr": "UI"},
                "00081190": {"Value": ["http://orthanc/dicom-web/studies/1.2/x"], "vr": "UR"},
            }
        ],
        "vr": "SQ",
    },
}
ORTHANC_EMPTY = {
    "00080005": {"Value": ["ISO_IR100"], "vr": "CS"},
    "00081198": {"vr": "SQ"},
    "00081199": {"vr": "SQ"},
}


def blocked(uid: str = "1.2.3.4") -> PartResult:
    return PartResult(
        index=0,
        kind="dicom",
        sop_class_uid=CT_IMAGE,
        sop_instance_uid=uid,
        failure_code=FAILURE_BLOCKED,
    )


def unreadable() -> PartResult:
    return PartResult(index=1, kind="dicom", error="garbage", failure_code=FAILURE_UNREADABLE)


def failed_items(body: bytes) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(body)["00081198"]["Value"]
    return items


def test_codes() -> None:
    assert (FAILURE_BLOCKED, FAILURE_UNREADABLE, FAILURE_TOO_LARGE) == (292, 49152, 42752)


def test_no_failures_passes_the_upstream_answer_through() -> None:
    ok = PartResult(index=0, kind="dicom")
    body = json.dumps(ORTHANC_STORED).encode()
    assert merge_stow_response(200, body, DICOM_JSON, []) is None
    assert merge_stow_response(200, body, DICOM_JSON, [ok]) is None


def test_some_stored_gives_202_with_our_failures_appended() -> None:
    merged = merge_stow_response(
        200, json.dumps(ORTHANC_STORED).encode(), DICOM_JSON, [blocked(), unreadable()]
    )
    assert merged is not None
    status, body = merged
    assert status == 202
    answer = json.loads(body)
    assert answer["00081199"] == ORTHANC_STORED["00081199"]
    assert answer["00081190"] == ORTHANC_STORED["00081190"]
    assert answer["00081198"]["vr"] == "SQ"
    assert answer["00081198"]["Value"] == [
        {
            "00081150": {"vr": "UI", "Value": [CT_IMAGE]},
            "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
            "00081197": {"vr": "US", "Value": [292]},
        },
        {
            "00081150": {"vr": "UI"},  # unknown UIDs: values omitted
            "00081155": {"vr": "UI"},
            "00081197": {"vr": "US", "Value": [49152]},
        },
    ]


def test_nothing_stored_gives_409() -> None:
    merged = merge_stow_response(200, json.dumps(ORTHANC_EMPTY).encode(), DICOM_JSON, [blocked()])
    assert merged is not None
    status, body = merged
    assert status == 409
    assert [i["00081197"]["Value"] for i in failed_items(body)] == [[292]]
    assert json.loads(body)["00080005"] == ORTHANC_EMPTY["00080005"]


def test_upstream_failures_are_kept_and_ours_appended() -> None:
    upstream = dict(ORTHANC_STORED)
    theirs = {"00081155": {"vr": "UI", "Value": ["9.9"]}, "00081197": {"vr": "US", "Value": [272]}}
    upstream["00081198"] = {"vr": "SQ", "Value": [theirs]}
    merged = merge_stow_response(202, json.dumps(upstream).encode(), DICOM_JSON, [blocked()])
    assert merged is not None
    status, body = merged
    assert status == 202
    items = failed_items(body)
    assert items[0] == theirs
    assert items[1]["00081155"]["Value"] == ["1.2.3.4"]


def test_upstream_409_with_its_own_failures() -> None:
    upstream = dict(ORTHANC_EMPTY)
    upstream["00081198"] = {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]}
    merged = merge_stow_response(409, json.dumps(upstream).encode(), DICOM_JSON, [blocked()])
    assert merged is not None
    assert merged[0] == 409 and len(failed_items(merged[1])) == 2


def test_empty_body() -> None:
    merged = merge_stow_response(200, b"", "", [blocked()])
    assert merged is not None
    status, body = merged
    assert status == 409
    assert [i["00081155"]["Value"] for i in failed_items(body)] == [["1.2.3.4"]]


def test_non_json_body() -> None:
    for body, ctype in [
        (b"<html>oops</html>", "text/html"),
        (b"<NativeDicomModel/>", "application/dicom+xml"),
        (b"\xff\xfe garbage", DICOM_JSON),
        (b'"a string"', "application/json"),
        (b"[" * 50_000, DICOM_JSON),
    ]:
        merged = merge_stow_response(200, body, ctype, [blocked()])
        assert merged is not None
        assert merged[0] == 409
        assert len(failed_items(merged[1])) == 1


def test_json_array_with_one_dataset_is_accepted() -> None:
    body = json.dumps([ORTHANC_STORED]).encode()
    merged = merge_stow_response(200, body, "application/json", [blocked()])
    assert merged is not None and merged[0] == 202


def test_upstream_5xx_keeps_its_status() -> None:
    merged = merge_stow_response(502, b"Bad Gateway", "text/plain", [blocked()])
    assert merged is not None
    status, body = merged
    assert status == 502
    assert json.loads(body) == json.loads(stow_failure_body([blocked()]))

    upstream = dict(ORTHANC_EMPTY)
    merged = merge_stow_response(500, json.dumps(upstream).encode(), DICOM_JSON, [blocked()])
    assert merged is not None
    assert merged[0] == 500
    answer = json.loads(merged[1])
    assert answer["00080005"] == upstream["00080005"]
    assert len(answer["00081198"]["Value"]) == 1


def test_upstream_auth_errors_keep_their_status() -> None:
    merged = merge_stow_response(403, b'{"error": "forbidden"}', "application/json", [blocked()])
    assert merged is not None
    assert merged[0] == 403


def test_stow_failure_body() -> None:
    too_large = PartResult(index=2, kind="dicom", failure_code=FAILURE_TOO_LARGE)
    ok = PartResult(index=3, kind="dicom")
    body = stow_failure_body([blocked(), too_large, ok])
    answer = json.loads(body)
    assert list(answer) == ["00081198"]
    assert [i["00081197"]["Value"][0] for i in answer["00081198"]["Value"]] == [0x0124, 0xA700]
