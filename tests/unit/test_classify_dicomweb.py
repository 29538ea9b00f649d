"""classify_dicomweb: every PS3.18 route, and the evasions that must not reach one."""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple

import pytest

from casb.classify import (
    Classification,
    MalformedTarget,
    classify_dicomweb,
    effective_method,
    encode_target,
    normalize_target,
)
from casb.context import Action, Resource

S, SE, IN = "1.2.840.113619.2.55", "1.2.840.113619.2.55.3", "1.2.840.113619.2.55.3.4"
INST = f"/studies/{S}/series/{SE}/instances/{IN}"
INST_ROUTE = "/studies/{study}/series/{series}/instances/{instance}"
WS = "1.2.840.10008.5.1.4.34.5"  # UPS global subscription instance
DEST = "pacs"


def classify(
    raw: str, method: str = "GET", headers: tuple[tuple[str, str], ...] = ()
) -> Classification:
    """What the pipeline does: normalize, read the method, classify."""
    target = normalize_target(raw)
    return classify_dicomweb(
        effective_method(method, headers, target.query), target.segments, target.query, DEST
    )


class Row(NamedTuple):
    method: str
    raw: str
    action: Action
    route: str
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    frames: tuple[int, ...] = ()


A = Action
SR = "/studies/{study}/series/{series}"  # series route
IR = INST_ROUTE
FR = IR + "/frames/{frames}"
WR = "/wado?requestType=WADO"
WADO = f"requestType=WADO&studyUID={S}&seriesUID={SE}&objectUID={IN}"
SUB = "/workitems/{workitem}/subscribers/{aetitle}"

# fmt: off
ROUTES: list[Row] = [
    # QIDO-RS
    Row("GET", "/studies", A.SEARCH, "/studies"),
    Row("GET", "/studies?PatientID=123&limit=10", A.SEARCH, "/studies"),
    Row("GET", f"/studies/{S}/series", A.SEARCH, "/studies/{study}/series", S),
    Row("GET", f"/studies/{S}/series/{SE}/instances", A.SEARCH, SR + "/instances", S, SE),
    Row("GET", f"/studies/{S}/instances", A.SEARCH, "/studies/{study}/instances", S),
    Row("GET", "/series", A.SEARCH, "/series"),
    Row("GET", "/instances", A.SEARCH, "/instances"),
    # WADO-RS
    Row("GET", f"/studies/{S}", A.RETRIEVE, "/studies/{study}", S),
    Row("GET", f"/studies/{S}/series/{SE}", A.RETRIEVE, SR, S, SE),
    Row("GET", INST, A.RETRIEVE, IR, S, SE, IN),
    Row("GET", INST + "/frames/1", A.RETRIEVE, FR, S, SE, IN, (1,)),
    Row("GET", INST + "/frames/1,2,30", A.RETRIEVE, FR, S, SE, IN, (1, 2, 30)),
    Row("GET", INST + "/frames/3,1,3", A.RETRIEVE, FR, S, SE, IN, (3, 1, 3)),
    Row("GET", f"/studies/{S}/rendered", A.RETRIEVE, "/studies/{study}/rendered", S),
    Row("GET", f"/studies/{S}/thumbnail", A.RETRIEVE, "/studies/{study}/thumbnail", S),
    Row("GET", f"/studies/{S}/series/{SE}/rendered", A.RETRIEVE, SR + "/rendered", S, SE),
    Row("GET", f"/studies/{S}/series/{SE}/thumbnail", A.RETRIEVE, SR + "/thumbnail", S, SE),
    Row("GET", INST + "/rendered", A.RETRIEVE, IR + "/rendered", S, SE, IN),
    Row("GET", INST + "/thumbnail", A.RETRIEVE, IR + "/thumbnail", S, SE, IN),
    Row("GET", INST + "/frames/2/rendered", A.RETRIEVE, FR + "/rendered", S, SE, IN, (2,)),
    Row("GET", INST + "/frames/2,4/thumbnail", A.RETRIEVE, FR + "/thumbnail", S, SE, IN, (2, 4)),
    Row("GET", INST + "/bulk/7fe00010", A.RETRIEVE, IR + "/bulk/{tags}", S, SE, IN),
    Row("GET", INST + "/bulk/00081199/0/7FE00010", A.RETRIEVE, IR + "/bulk/{tags}", S, SE, IN),
    Row("GET", INST + "/bulk/0040A730/12/0040a160", A.RETRIEVE, IR + "/bulk/{tags}", S, SE, IN),
    Row("GET", "/bulkdata/abc-123_x.y", A.RETRIEVE, "/bulkdata/{path}"),
    Row("GET", "/bulkdata/a/B/9", A.RETRIEVE, "/bulkdata/{path}"),
    Row("GET", "/bulkdata/...", A.RETRIEVE, "/bulkdata/{path}"),
    # WADO-RS metadata
    Row("GET", f"/studies/{S}/metadata", A.RETRIEVE_METADATA, "/studies/{study}/metadata", S),
    Row("GET", f"/studies/{S}/series/{SE}/metadata", A.RETRIEVE_METADATA, SR + "/metadata",
        S, SE),
    Row("GET", INST + "/metadata", A.RETRIEVE_METADATA, IR + "/metadata", S, SE, IN),
    # WADO-URI
    Row("GET", f"/?{WADO}", A.RETRIEVE, WR, S, SE, IN),
    Row("GET", f"/wado?{WADO}&contentType=application%2Fdicom&frameNumber=2", A.RETRIEVE, WR,
        S, SE, IN),
    Row("GET", f"/wado?objectUID={IN}&seriesUID={SE}&studyUID={S}&requestType=WADO",
        A.RETRIEVE, WR, S, SE, IN),
    # STOW-RS
    Row("POST", "/studies", A.STORE, "/studies"),
    Row("POST", f"/studies/{S}", A.STORE, "/studies/{study}", S),
    # delete
    Row("DELETE", f"/studies/{S}", A.DELETE, "/studies/{study}", S),
    Row("DELETE", f"/studies/{S}/series/{SE}", A.DELETE, SR, S, SE),
    Row("DELETE", INST, A.DELETE, IR, S, SE, IN),
    # UPS-RS (the workitem UID is reported as the instance UID)
    Row("GET", "/workitems", A.WORKLIST, "/workitems"),
    Row("GET", "/workitems?ProcedureStepState=SCHEDULED", A.WORKLIST, "/workitems"),
    Row("POST", "/workitems", A.WORKLIST, "/workitems"),
    Row("POST", f"/workitems?{IN}", A.WORKLIST, "/workitems"),
    Row("GET", f"/workitems/{IN}", A.WORKLIST, "/workitems/{workitem}", instance=IN),
    Row("POST", f"/workitems/{IN}", A.WORKLIST, "/workitems/{workitem}", instance=IN),
    Row("PUT", f"/workitems/{IN}", A.WORKLIST, "/workitems/{workitem}", instance=IN),
    Row("PUT", f"/workitems/{IN}/state", A.WORKLIST, "/workitems/{workitem}/state",
        instance=IN),
    Row("POST", f"/workitems/{IN}/cancelrequest", A.WORKLIST,
        "/workitems/{workitem}/cancelrequest", instance=IN),
    Row("POST", f"/workitems/{IN}/subscribers/VIEWER_1", A.WORKLIST, SUB, instance=IN),
    Row("DELETE", f"/workitems/{IN}/subscribers/VIEWER_1", A.WORKLIST, SUB, instance=IN),
    Row("POST", f"/workitems/{WS}/subscribers/MY%20AE", A.WORKLIST, SUB, instance=WS),
    Row("POST", f"/workitems/{WS}.1/subscribers/ABCDEFGHIJKLMNOP", A.WORKLIST, SUB,
        instance=WS + ".1"),
    Row("POST", f"/workitems/{WS}/subscribers/AE/suspend", A.WORKLIST, SUB + "/suspend",
        instance=WS),
    # capabilities
    Row("OPTIONS", "/", A.CAPABILITIES, "/"),
    Row("OPTIONS", "/studies", A.CAPABILITIES, "/studies"),
    Row("OPTIONS", f"/studies/{S}/series", A.CAPABILITIES, "/studies/{study}/series", S),
    Row("OPTIONS", INST + "/frames/5", A.CAPABILITIES, FR, S, SE, IN, (5,)),
    Row("OPTIONS", f"/workitems/{IN}/state", A.CAPABILITIES, "/workitems/{workitem}/state",
        instance=IN),
    Row("OPTIONS", f"/wado?{WADO}", A.CAPABILITIES, WR, S, SE, IN),
    # HEAD is read as GET
    Row("HEAD", f"/studies/{S}", A.RETRIEVE, "/studies/{study}", S),
    Row("HEAD", "/studies", A.SEARCH, "/studies"),
    Row("get", f"/studies/{S}/metadata", A.RETRIEVE_METADATA, "/studies/{study}/metadata", S),
    # UID and frame edge cases that are valid
    Row("GET", "/studies/0", A.RETRIEVE, "/studies/{study}", "0"),
    Row("GET", "/studies/0.0.10", A.RETRIEVE, "/studies/{study}", "0.0.10"),
    Row("GET", "/studies/" + "1." * 31 + "99", A.RETRIEVE, "/studies/{study}",
        "1." * 31 + "99"),  # 64 characters
    Row("GET", INST + "/frames/" + ",".join(["7"] * 1000), A.RETRIEVE, FR, S, SE, IN,
        (7,) * 1000),
    Row("GET", INST + "/frames/4294967295", A.RETRIEVE, FR, S, SE, IN, (4294967295,)),
    # evasive spellings that normalize to a real route (and are forwarded normalized)
    Row("GET", "/%73tudies", A.SEARCH, "/studies"),
    Row("GET", "/%73%74%75%64%69%65%73/" + S.replace(".", "%2E"), A.RETRIEVE,
        "/studies/{study}", S),
    Row("GET", f"/studies%2F{S}", A.RETRIEVE, "/studies/{study}", S),
    Row("DELETE", f"/studies%2f{S}%2Fseries%2F{SE}", A.DELETE, SR, S, SE),
    Row("GET", "/x/%2e%2e/studies", A.SEARCH, "/studies"),
    Row("GET", f"/studies/{S}/x/../series", A.SEARCH, "/studies/{study}/series", S),
    Row("GET", f"//studies///{S}//series/", A.SEARCH, "/studies/{study}/series", S),
    Row("GET", f"/studies/{S}/", A.RETRIEVE, "/studies/{study}", S),
    Row("GET", f"/./studies/./{S}/.", A.RETRIEVE, "/studies/{study}", S),
]
# fmt: on


@pytest.mark.parametrize("row", ROUTES, ids=[f"{r.method} {r.raw[:90]}" for r in ROUTES])
def test_routes(row: Row) -> None:
    result = classify(row.raw, row.method)
    assert result.reason == ""
    assert result.action is row.action
    resource = result.resource
    assert resource.destination == DEST
    assert resource.route == row.route
    assert (resource.study_uid, resource.series_uid, resource.instance_uid) == (
        row.study,
        row.series,
        row.instance,
    )
    assert resource.frames == row.frames
    assert all(type(n) is int for n in resource.frames)


class Bad(NamedTuple):
    method: str
    raw: str
    why: str  # a piece of the reason


# fmt: off
UNKNOWN: list[Bad] = [
    # methods no DICOMweb route takes
    *(Bad(m, f"/studies/{S}", "method not supported")
      for m in ("PATCH", "TRACE", "PROPFIND", "CONNECT", "MKCOL", "FOO", "")),
    Bad("PUT", f"/studies/{S}", "method not allowed on /studies/{study}"),
    Bad("PUT", "/studies", "method not allowed on /studies"),
    # wrong method for a route
    Bad("POST", f"/studies/{S}/series", "method not allowed on /studies/{study}/series"),
    Bad("DELETE", "/studies", "method not allowed on /studies"),
    Bad("POST", f"/studies/{S}/series/{SE}", "method not allowed"),
    Bad("POST", INST, "method not allowed"),
    Bad("DELETE", f"/studies/{S}/metadata", "method not allowed"),
    Bad("DELETE", INST + "/frames/1", "method not allowed"),
    Bad("POST", "/series", "method not allowed on /series"),
    Bad("DELETE", "/instances", "method not allowed on /instances"),
    Bad("POST", "/bulkdata/x", "method not allowed on /bulkdata/{path}"),
    Bad("GET", "/", "WADO-URI needs exactly one requestType"),
    Bad("POST", "/", "WADO-URI needs exactly one requestType"),
    Bad("GET", "/wado", "WADO-URI needs exactly one requestType"),
    Bad("OPTIONS", "/wado", "WADO-URI needs exactly one requestType"),
    # upper-case or unknown resource names
    Bad("GET", "/STUDIES", "no DICOMweb route"),
    Bad("GET", "/Studies", "no DICOMweb route"),
    Bad("GET", "/%53TUDIES", "no DICOMweb route"),
    Bad("GET", f"/studies/{S}/SERIES", "no DICOMweb route"),
    Bad("GET", f"/studies/{S}/Metadata", "no DICOMweb route"),
    Bad("GET", "/patients", "no DICOMweb route"),
    Bad("GET", "/studies;x", "no DICOMweb route"),
    Bad("GET", "/\uff53tudies", "no DICOMweb route"),  # fullwidth 's'
    Bad("GET", "/WADO?requestType=WADO", "no DICOMweb route"),
    Bad("GET", "/workitems/1.2/STATE", "no DICOMweb route"),
    Bad("GET", "/workitems/1.2/unknown", "no DICOMweb route"),
    Bad("GET", "/frames/1", "no DICOMweb route"),
    Bad("OPTIONS", "/patients", "no DICOMweb route"),
    # extra or missing trailing segments
    Bad("GET", f"/studies/{S}/metadata/x", "no DICOMweb route"),
    Bad("GET", f"/studies/{S}/rendered/1", "no DICOMweb route"),
    Bad("GET", INST + "/extra", "no DICOMweb route"),
    Bad("GET", INST + "/frames/1/rendered/x", "no DICOMweb route"),
    Bad("GET", INST + "/frames", "no DICOMweb route"),
    Bad("GET", INST + "/metadata/rendered", "no DICOMweb route"),
    Bad("GET", f"/studies/{S}/metadata/thumbnail", "no DICOMweb route"),
    Bad("GET", f"/studies/{S}/frames/1", "no DICOMweb route"),
    Bad("GET", f"/studies/{S}/series/{SE}/frames/1", "no DICOMweb route"),
    Bad("GET", "/series/1.2", "no DICOMweb route"),
    Bad("GET", "/instances/1.2", "no DICOMweb route"),
    Bad("GET", INST + "/bulk", "no DICOMweb route"),
    Bad("GET", "/bulkdata", "no DICOMweb route"),
    Bad("GET", f"/workitems/{IN}/subscribers", "no DICOMweb route"),
    Bad("GET", f"/workitems/{IN}/subscribers/AE/suspend/x", "no DICOMweb route"),
    Bad("GET", f"/workitems/{IN}/state/x", "no DICOMweb route"),
    # bad UIDs
    Bad("GET", "/studies/*", "invalid study UID"),
    Bad("GET", "/studies/1.2.3;x", "invalid study UID"),
    Bad("GET", "/studies/1.2.3%3Bx", "invalid study UID"),
    Bad("GET", "/studies/series", "invalid study UID"),
    Bad("GET", "/studies/1.02.3", "invalid study UID"),  # leading zero in a component
    Bad("GET", "/studies/01.2", "invalid study UID"),
    Bad("GET", "/studies/1..2", "invalid study UID"),
    Bad("GET", "/studies/1.2.", "invalid study UID"),
    Bad("GET", "/studies/.1.2", "invalid study UID"),
    Bad("GET", "/studies/1.2a", "invalid study UID"),
    Bad("GET", "/studies/-1", "invalid study UID"),
    Bad("GET", "/studies/1%202", "invalid study UID"),
    Bad("GET", "/studies/\uff11.\uff12", "invalid study UID"),  # fullwidth digits
    Bad("GET", "/studies/\u0661.\u0662", "invalid study UID"),  # Arabic-Indic digits
    Bad("GET", "/studies/" + "1." * 32 + "1", "invalid study UID"),  # 65 characters
    Bad("GET", f"/studies/{S}/series/x", "invalid series UID"),
    Bad("DELETE", f"/studies/{S}/series/{SE}/instances/00", "invalid instance UID"),
    Bad("GET", "/workitems/*", "invalid workitem UID"),
    Bad("POST", "/workitems/1.02/subscribers/AE", "invalid workitem UID"),
    # bad frame lists
    Bad("GET", INST + "/frames/0", "invalid frame list"),
    Bad("GET", INST + "/frames/1,,2", "invalid frame list"),
    Bad("GET", INST + "/frames/01", "invalid frame list"),
    Bad("GET", INST + "/frames/1,", "invalid frame list"),
    Bad("GET", INST + "/frames/,1", "invalid frame list"),
    Bad("GET", INST + "/frames/-1", "invalid frame list"),
    Bad("GET", INST + "/frames/1-3", "invalid frame list"),
    Bad("GET", INST + "/frames/1%202", "invalid frame list"),
    Bad("GET", INST + "/frames/12345678901", "invalid frame list"),  # 11 digits
    Bad("GET", INST + "/frames/" + ",".join(["7"] * 1001), "invalid frame list"),
    Bad("GET", INST + "/frames/\u0661", "invalid frame list"),
    # bad bulkdata paths and AE titles
    Bad("GET", INST + "/bulk/7fe0001", "invalid bulkdata tag path"),
    Bad("GET", INST + "/bulk/7fe00010x", "invalid bulkdata tag path"),
    Bad("GET", INST + "/bulk/00081199/01/7fe00010", "invalid bulkdata tag path"),
    Bad("GET", INST + "/bulk/PixelData", "invalid bulkdata tag path"),
    Bad("GET", "/bulkdata/a%20b", "invalid bulkdata path"),
    Bad("GET", "/bulkdata/a;b", "invalid bulkdata path"),
    Bad("GET", "/bulkdata/ok/\u00e9", "invalid bulkdata path"),
    Bad("POST", f"/workitems/{IN}/subscribers/ABCDEFGHIJKLMNOPQ", "invalid AE title"),
    Bad("POST", f"/workitems/{IN}/subscribers/%20%20", "invalid AE title"),
    Bad("POST", f"/workitems/{IN}/subscribers/%C3%84E", "invalid AE title"),
    # WADO-URI that is not exactly right
    Bad("GET", f"/wado?{WADO}&requestType=WADO", "exactly one requestType"),
    Bad("GET", f"/wado?{WADO.replace('=WADO', '=wado')}", "requestType must be WADO"),
    Bad("GET", f"/wado?{WADO.replace('=WADO', '=WADO+')}", "requestType must be WADO"),
    Bad("GET", f"/wado?{WADO.replace('requestType', 'RequestType')}", "wrong case"),
    Bad("GET", f"/wado?{WADO}&ObjectUID=9.9", "wrong case"),
    Bad("GET", f"/wado?requestType=WADO&studyUID={S}&seriesUID={SE}", "exactly one objectUID"),
    Bad("GET", f"/wado?{WADO}&studyUID=9.9", "exactly one studyUID"),
    Bad("GET", f"/wado?{WADO.replace(f'={SE}', '=01.2')}", "seriesUID is not a valid UID"),
    Bad("GET", f"/wado?{WADO.replace(f'={S}&', '=&')}", "studyUID is not a valid UID"),
    Bad("POST", f"/wado?{WADO}", "method not allowed on /wado?requestType=WADO"),
    Bad("GET", f"/wado/x?{WADO}", "no DICOMweb route"),
]
# fmt: on


@pytest.mark.parametrize("bad", UNKNOWN, ids=[f"{b.method} {b.raw[:90]}" for b in UNKNOWN])
def test_unknown(bad: Bad) -> None:
    result = classify(bad.raw, bad.method)
    assert result.action is Action.UNKNOWN
    assert bad.why in result.reason
    assert result.resource == Resource(destination=DEST)


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("GET", "/studies/DOE^JOHN"),
        ("GET", "/DOE^JOHN"),
        ("GET", f"/studies/{S}/series/DOE^JOHN"),
        ("GET", INST + "/frames/DOE^JOHN"),
        ("PATCH", "/studies?PatientName=DOE^JOHN"),
        ("GET", "/wado?requestType=WADO&studyUID=DOE^JOHN&seriesUID=1&objectUID=2"),
        ("DOE^JOHN", "/studies"),
    ],
)
def test_reason_never_quotes_the_request(method: str, raw: str) -> None:
    result = classify(raw, method)
    assert result.action is Action.UNKNOWN
    assert result.reason
    assert "DOE" not in result.reason


def test_upper_case_method_needed_without_effective_method() -> None:
    # classify_dicomweb trusts its caller to pass the effective method
    assert classify_dicomweb("get", ("studies",), (), DEST).action is Action.UNKNOWN
    assert classify_dicomweb("HEAD", ("studies",), (), DEST).action is Action.UNKNOWN


def test_ae_title_with_backslash_is_unknown() -> None:
    # normalize_target already refuses a backslash; the classifier refuses it too
    result = classify_dicomweb("POST", ("workitems", IN, "subscribers", "A\\E"), (), DEST)
    assert result.action is Action.UNKNOWN
    assert "invalid AE title" in result.reason


@pytest.mark.parametrize(
    "raw",
    [
        "/x/%252e%252e/studies",
        "/studies/%252e%252e/1.2",
        "/..",
        "/pacs/../../research/studies",
        "/%2e%2e/studies",
        "/studies\\1.2",
        "/studies/1.2%5C..",
        "/studies/1.2%00",
        "/studies/1.2\x00",
        "/studies/" + "1" * 8200,
        "/studies#x",
    ],
)
def test_evasions_are_malformed(raw: str) -> None:
    with pytest.raises(MalformedTarget):
        classify(raw)


@pytest.mark.parametrize(
    ("headers", "raw"),
    [
        ((("X-HTTP-Method-Override", "DELETE"),), f"/studies/{S}"),
        ((("x-http-method", "DELETE"),), f"/studies/{S}"),
        ((("X-Method-Override", "GET"),), "/studies"),
        ((), f"/studies/{S}?_method=DELETE"),
        ((), f"/studies/{S}?a=1&_method=DELETE"),
    ],
)
def test_method_overrides_are_malformed(headers: tuple[tuple[str, str], ...], raw: str) -> None:
    with pytest.raises(MalformedTarget, match="method override"):
        classify(raw, "POST", headers)


@pytest.mark.parametrize(
    "raw", [r.raw for r in ROUTES] + [b.raw for b in UNKNOWN], ids=lambda r: r[:90]
)
def test_round_trip(raw: str) -> None:
    target = normalize_target(raw)
    assert normalize_target(encode_target(target.segments, target.query)) == target


@pytest.mark.parametrize("row", ROUTES, ids=lambda r: f"{r.method} {r.raw[:90]}")
def test_forwarded_target_classifies_the_same(row: Row) -> None:
    target = normalize_target(row.raw)
    assert classify(encode_target(target.segments, target.query), row.method) == classify(
        row.raw, row.method
    )


def _query(raw_query: str) -> dict[str, tuple[str, ...]]:
    result = classify("/studies?" + raw_query)
    assert result.action is Action.SEARCH
    return dict(result.resource.query)


@pytest.mark.parametrize(
    ("raw_query", "expected"),
    [
        ("00080061=CT", {"ModalitiesInStudy": ("CT",)}),
        ("0020000d=1.2", {"StudyInstanceUID": ("1.2",)}),
        ("0020000D=1.2", {"StudyInstanceUID": ("1.2",)}),
        ("00100010=DOE*", {"PatientName": ("DOE*",)}),
        ("PatientName=DOE*", {"PatientName": ("DOE*",)}),
        ("00081115.0020000E=1.2", {"ReferencedSeriesSequence.SeriesInstanceUID": ("1.2",)}),
        (
            "00081115.SeriesInstanceUID=1.2",
            {"ReferencedSeriesSequence.SeriesInstanceUID": ("1.2",)},
        ),
        ("00091001=x", {"00091001": ("x",)}),  # private tag: no keyword, stays
        ("00081115.00091001=a,b", {"ReferencedSeriesSequence.00091001": ("a,b",)}),
        ("Bogus=a,b", {"Bogus": ("a,b",)}),
        ("patientname=a,b", {"patientname": ("a,b",)}),  # keywords are case-sensitive
        ("ModalitiesInStudy=CT,MR", {"ModalitiesInStudy": ("CT", "MR")}),
        ("00080061=CT%5CMR,US", {"ModalitiesInStudy": ("CT", "MR", "US")}),
        ("StudyInstanceUID=1.2,1.3&0020000D=1.4", {"StudyInstanceUID": ("1.2", "1.3", "1.4")}),
        ("ModalitiesInStudy=CT&ModalitiesInStudy=MR", {"ModalitiesInStudy": ("CT", "MR")}),
        ("PatientName=", {"PatientName": ("",)}),
        ("PatientName=A,", {"PatientName": ("A", "")}),
        (
            "includefield=00081030,00080020&includefield=all",
            {"includefield": ("00081030,00080020", "all")},
        ),
        (
            "limit=10&offset=5&fuzzymatching=true",
            {"limit": ("10",), "offset": ("5",), "fuzzymatching": ("true",)},
        ),
        ("limit=1,2", {"limit": ("1,2",)}),
        (
            "00080020=20200101-20201231&00100010=DOE%5EJ*",
            {"StudyDate": ("20200101-20201231",), "PatientName": ("DOE^J*",)},
        ),
    ],
)
def test_query_keys_and_values(raw_query: str, expected: dict[str, tuple[str, ...]]) -> None:
    assert _query(raw_query) == expected


def test_query_keeps_first_seen_key_order() -> None:
    assert list(_query("limit=1&00080061=CT&PatientID=2&ModalitiesInStudy=MR")) == [
        "limit",
        "ModalitiesInStudy",
        "PatientID",
    ]


def test_query_is_read_only_and_empty_without_query() -> None:
    result = classify("/studies?PatientID=1")
    assert isinstance(result.resource.query, MappingProxyType)
    with pytest.raises(TypeError):
        result.resource.query["PatientID"] = ("2",)  # type: ignore[index]
    assert dict(classify("/studies").resource.query) == {}


def test_query_reaches_retrieve_and_wado_uri() -> None:
    rendered = classify(f"/studies/{S}/rendered?viewport=64,64&quality=80")
    assert dict(rendered.resource.query) == {"viewport": ("64,64",), "quality": ("80",)}
    wado = classify(f"/?requestType=WADO&studyUID={S}&seriesUID={SE}&objectUID={IN}&anonymize=yes")
    assert wado.resource.query["anonymize"] == ("yes",)
    assert wado.resource.query["studyUID"] == (S,)


def test_classification_defaults_and_immutability() -> None:
    result = classify("/studies")
    assert result == Classification(
        Action.SEARCH, Resource(destination=DEST, route="/studies"), reason=""
    )
    with pytest.raises(AttributeError):
        result.action = Action.DELETE  # type: ignore[misc]
