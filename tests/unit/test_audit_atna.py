"""Audit records -> DICOM PS3.15 A.5 audit messages (casb/audit/atna.py).

No schema file or RELAX NG validator is available, so `check_schema` encodes the A.5.1
schema's structure: the attributes each element may carry (required ones, enumerations)
and the order and multiplicity of its children.
"""

from __future__ import annotations

import base64
import copy
import re
import xml.etree.ElementTree as ET
from datetime import datetime
from typing import Any

import pytest

from casb.audit.atna import audit_message

SOURCE_ID = "casb-test-1"

# -- the A.5.1 schema, structurally --------------------------------------------------
CODED = {"csd-code": True, "codeSystemName": True, "originalText": True, "displayName": False}
# element: (attributes {name: required}, children pattern over "Tag " tokens)
SCHEMA: dict[str, tuple[dict[str, bool], str]] = {
    "AuditMessage": (
        {},
        r"(EventIdentification )(ActiveParticipant )+(AuditSourceIdentification )"
        r"(ParticipantObjectIdentification )*",
    ),
    "EventIdentification": (
        {"EventActionCode": False, "EventDateTime": True, "EventOutcomeIndicator": True},
        r"(EventID )(EventTypeCode )*(EventOutcomeDescription )?",
    ),
    "EventID": (CODED, ""),
    "EventTypeCode": (CODED, ""),
    "RoleIDCode": (CODED, ""),
    "ParticipantObjectIDTypeCode": (CODED, ""),
    "EventOutcomeDescription": ({}, ""),
    "ActiveParticipant": (
        {
            "UserID": True,
            "AlternativeUserID": False,
            "UserName": False,
            "UserIsRequestor": True,
            "NetworkAccessPointID": False,
            "NetworkAccessPointTypeCode": False,
        },
        r"(RoleIDCode )*(MediaIdentifier )?",
    ),
    "AuditSourceIdentification": (
        {"AuditEnterpriseSiteID": False, "AuditSourceID": True},
        r"(AuditSourceTypeCode )*",
    ),
    "AuditSourceTypeCode": (
        {"csd-code": True, "codeSystemName": False, "displayName": False, "originalText": False},
        "",
    ),
    "ParticipantObjectIdentification": (
        {
            "ParticipantObjectID": True,
            "ParticipantObjectTypeCode": False,
            "ParticipantObjectTypeCodeRole": False,
            "ParticipantObjectDataLifeCycle": False,
            "ParticipantObjectSensitivity": False,
        },
        r"(ParticipantObjectIDTypeCode )((ParticipantObjectName )|(ParticipantObjectQuery ))?"
        r"(ParticipantObjectDetail )*(ParticipantObjectDescription )*",
    ),
    "ParticipantObjectQuery": ({}, ""),
    "ParticipantObjectDetail": ({"type": True, "value": True}, ""),
    "ParticipantObjectDescription": (
        {},
        r"(MPPS )*(Accession )*(SOPClass )*(ParticipantObjectContainsStudy )?(Encrypted )?"
        r"(Anonymized )?",
    ),
    "SOPClass": ({"UID": False, "NumberOfInstances": True}, r"(Instance )*"),
    "Instance": ({"UID": True}, ""),
}
ENUMS = {
    "EventActionCode": {"C", "R", "U", "D", "E"},
    "EventOutcomeIndicator": {"0", "4", "8", "12"},
    "UserIsRequestor": {"true", "false"},
    "NetworkAccessPointTypeCode": {"1", "2", "3", "4", "5"},
    "ParticipantObjectTypeCode": {"1", "2", "3", "4"},
    "ParticipantObjectTypeCodeRole": {str(n) for n in range(1, 27)},
}
XSD_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")
BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def check_schema(el: ET.Element) -> None:
    assert el.tag in SCHEMA, f"element {el.tag} is not in the A.5.1 schema"
    attrs, pattern = SCHEMA[el.tag]
    for name, value in el.attrib.items():
        assert name in attrs, f"{el.tag} has no attribute {name}"
        if name in ENUMS:
            assert value in ENUMS[name], f"{el.tag}@{name}={value!r}"
    for name, required in attrs.items():
        if required:
            assert el.attrib.get(name), f"{el.tag} lacks @{name}"
    children = "".join(f"{child.tag} " for child in el)
    assert re.fullmatch(pattern, children), f"{el.tag} children out of order: {children}"
    if el.tag == "EventIdentification":
        assert XSD_DATETIME.fullmatch(el.attrib["EventDateTime"])
    if el.tag == "ParticipantObjectDetail":
        assert BASE64.fullmatch(el.attrib["value"])
    if el.tag == "ParticipantObjectQuery":
        assert el.text and BASE64.fullmatch(el.text)
    if el.tag == "SOPClass":
        assert el.attrib["NumberOfInstances"].isdigit()
    for child in el:
        check_schema(child)


def parse(xml: bytes) -> ET.Element:
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
    assert b"\n" not in xml and b"\r" not in xml  # one syslog line
    root = ET.fromstring(xml)
    check_schema(root)
    return root


# -- records --------------------------------------------------------------------------
def request(**changes: Any) -> dict[str, Any]:
    """A request record as casb/audit/record.py builds it, sealed into the chain."""
    rec: dict[str, Any] = {
        "type": "request",
        "time": "2025-03-01T10:15:30.250Z",
        "request_id": "3f2a9c0e5b7d4e1f8a6b2c9d0e1f2a3b",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "principal": {
            "sub": "dr.house",
            "issuer": "https://idp.hospital.test",
            "roles": ["radiologist", "staff"],
            "mfa": True,
        },
        "client": {"ip": "10.20.30.40"},
        "method": "GET",
        "action": "retrieve",
        "destination": "cloud-pacs",
        "route": "/pacs/studies/{study}/series/{series}/instances/{instance}",
        "uids": {"study": "1.2.826.0.1.7", "series": "1.2.826.0.1.7.8", "instance": "1.2.9"},
        "query_keys": [],
        "decision": "allow",
        "rule_id": "radiologists-read",
        "reasons": [],
        "obligations": {},
        "error": None,
        "object": None,
        "dlp": None,
        "envelope": None,
        "warnings": [],
        "bytes_in": 0,
        "bytes_out": 52431,
        "status": 200,
        "duration_ms": 12.5,
        "policy_version": "sha256:9f1c",
        "seq": 41,
        "prev_hash": "a" * 64,
        "hash": "b" * 64,
    }
    rec.update(changes)
    return rec


def msg(record: dict[str, Any]) -> ET.Element:
    xml = audit_message(record, source_id=SOURCE_ID)
    assert xml is not None
    return parse(xml)


def event(root: ET.Element) -> tuple[str, str, str]:
    ev = root.find("EventIdentification")
    assert ev is not None
    event_id = ev.find("EventID")
    assert event_id is not None
    return (
        event_id.get("csd-code", ""),
        ev.get("EventActionCode", ""),
        ev.get("EventOutcomeIndicator", ""),
    )


def type_codes(root: ET.Element) -> list[tuple[str, str]]:
    return [
        (c.get("csd-code", ""), c.get("codeSystemName", ""))
        for c in root.iterfind("EventIdentification/EventTypeCode")
    ]


def participants(root: ET.Element) -> dict[str, ET.Element]:
    return {ap.get("UserID", ""): ap for ap in root.iterfind("ActiveParticipant")}


def dcm_roles(ap: ET.Element) -> list[str]:
    return [
        r.get("csd-code", "") for r in ap.iterfind("RoleIDCode") if r.get("codeSystemName") == "DCM"
    ]


def objects(root: ET.Element) -> dict[str, ET.Element]:
    return {
        po.get("ParticipantObjectID", ""): po
        for po in root.iterfind("ParticipantObjectIdentification")
    }


def id_type(po: ET.Element) -> str:
    code = po.find("ParticipantObjectIDTypeCode")
    assert code is not None
    return code.get("csd-code", "")


def details(po: ET.Element) -> dict[str, str]:
    return {
        d.get("type", ""): base64.b64decode(d.get("value", "")).decode()
        for d in po.iterfind("ParticipantObjectDetail")
    }


# -- allowed requests -----------------------------------------------------------------
def test_retrieve_is_instances_transferred_read() -> None:
    root = msg(request())
    assert event(root) == ("110104", "R", "0")
    ev = root.find("EventIdentification")
    assert ev is not None and ev.get("EventDateTime") == "2025-03-01T10:15:30.250Z"
    assert ev.find("EventOutcomeDescription") is None
    aps = participants(root)
    assert list(aps) == ["dr.house", "cloud-pacs", SOURCE_ID]
    user = aps["dr.house"]
    assert user.get("UserIsRequestor") == "true"
    assert user.get("UserName") == "<dr.house@https://idp.hospital.test>"
    assert user.get("NetworkAccessPointID") == "10.20.30.40"
    assert user.get("NetworkAccessPointTypeCode") == "2"
    # The data moves from the destination (source role) to the principal (destination).
    assert dcm_roles(user) == ["110152"]
    assert dcm_roles(aps["cloud-pacs"]) == ["110153"]
    assert aps["cloud-pacs"].get("UserIsRequestor") == "false"
    assert [r.get("csd-code") for r in user.iterfind("RoleIDCode")][1:] == [
        "radiologist",
        "staff",
    ]
    assert dcm_roles(aps[SOURCE_ID]) == ["110150"]
    src = root.find("AuditSourceIdentification")
    assert src is not None and src.get("AuditSourceID") == SOURCE_ID
    study = objects(root)["1.2.826.0.1.7"]
    assert id_type(study) == "110180"
    assert study.get("ParticipantObjectTypeCode") == "2"
    assert study.get("ParticipantObjectTypeCodeRole") == "3"
    assert details(study) == {"SeriesInstanceUID": "1.2.826.0.1.7.8"}
    instances = [
        i.get("UID") for i in study.iterfind("ParticipantObjectDescription/SOPClass/Instance")
    ]
    assert instances == ["1.2.9"]
    # No Patient participant object: records hold no patient ID.
    assert all(po.get("ParticipantObjectTypeCodeRole") != "1" for po in objects(root).values())


def test_retrieve_metadata_is_a_read_transfer() -> None:
    root = msg(
        request(
            action="retrieve_metadata", uids={"study": "1.2.3", "series": None, "instance": None}
        )
    )
    assert event(root) == ("110104", "R", "0")
    study = objects(root)["1.2.3"]
    assert details(study) == {} and study.find("ParticipantObjectDescription") is None


def test_store_is_instances_transferred_create() -> None:
    root = msg(
        request(
            method="POST",
            action="store",
            route="/pacs/studies/{study}",
            uids={"study": "1.2.3.4", "series": None, "instance": None},
            status=200,
        )
    )
    assert event(root) == ("110104", "C", "0")
    aps = participants(root)
    assert dcm_roles(aps["dr.house"]) == ["110153"]  # the principal sends
    assert dcm_roles(aps["cloud-pacs"]) == ["110152"]
    assert ("store", "99CASB") in type_codes(root)


def test_store_with_instances_blocked_by_dlp_is_a_minor_failure() -> None:
    dlp = {"instances": 3, "forwarded": 2, "blocked": 1, "failed": 0, "rules": ["patient-name"]}
    root = msg(request(method="POST", action="store", status=202, dlp=dlp))
    assert event(root) == ("110104", "C", "4")


def test_delete_is_instances_accessed_delete() -> None:
    root = msg(request(method="DELETE", action="delete"))
    assert event(root) == ("110103", "D", "0")
    aps = participants(root)
    assert dcm_roles(aps["dr.house"]) == [] and dcm_roles(aps["cloud-pacs"]) == []


@pytest.mark.parametrize("action", ["search", "list", "capabilities", "worklist"])
def test_queries_are_query_execute(action: str) -> None:
    root = msg(
        request(
            action=action,
            route="/pacs/studies",
            uids={"study": None, "series": None, "instance": None},
            query_keys=["PatientName", "StudyDate"],
        )
    )
    assert event(root) == ("110112", "E", "0")
    aps = participants(root)
    assert dcm_roles(aps["dr.house"]) == ["110153"]
    assert dcm_roles(aps["cloud-pacs"]) == ["110152"]
    query = objects(root)["/pacs/studies"]
    assert query.get("ParticipantObjectTypeCodeRole") == "24"
    text = query.findtext("ParticipantObjectQuery")
    assert text is not None
    # The query keys, never their values (records do not hold values).
    assert base64.b64decode(text).decode() == "/pacs/studies?PatientName&StudyDate"


def test_bucket_listing_names_the_bucket() -> None:
    root = msg(
        request(
            action="list",
            route="/{bucket}",
            uids=None,
            object={"bucket": "scans", "operation": "ListObjectsV2", "key_sha256": None},
        )
    )
    assert event(root) == ("110112", "E", "0")
    bucket = objects(root)["scans"]
    assert id_type(bucket) == "bucket" and bucket.get("ParticipantObjectTypeCodeRole") == "17"
    assert details(bucket) == {"operation": "ListObjectsV2"}


def test_object_store_object_is_identified_by_key_hash_only() -> None:
    digest = "c" * 64
    root = msg(
        request(
            action="retrieve",
            route="/{bucket}/{key}",
            uids=None,
            object={"bucket": "scans", "operation": "GetObject", "key_sha256": digest},
        )
    )
    po = objects(root)[digest]
    assert id_type(po) == "key_sha256"
    assert details(po) == {"bucket": "scans", "operation": "GetObject"}


@pytest.mark.parametrize(("status", "outcome"), [(404, "4"), (502, "8"), (503, "8")])
def test_upstream_failures(status: int, outcome: str) -> None:
    root = msg(request(status=status))
    assert event(root) == ("110104", "R", outcome)
    assert root.find("EventIdentification/EventOutcomeDescription") is None  # no error code


def test_transfer_broken_midway_is_a_minor_failure_with_its_code() -> None:
    root = msg(request(status=200, error="client_disconnected"))
    assert event(root) == ("110104", "R", "4")
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "client_disconnected"


def test_unknown_action_allowed_by_policy_is_accessed_by_method() -> None:
    root = msg(request(action="unknown", method="PUT"))
    assert event(root) == ("110103", "U", "0")


# -- refused requests -----------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        "forbidden",
        "dlp_blocked",
        "encryption_required",
        "insecure_transport",
        "unknown_destination",
    ],
)
def test_security_refusals_are_security_alerts(error: str) -> None:
    reasons = ["rule deny-students denies role student", "the study is restricted"]
    root = msg(request(decision="deny", error=error, status=403, reasons=reasons))
    assert event(root) == ("110113", "E", "8")
    assert type_codes(root)[0] == ("110132", "DCM")  # Use of Restricted Function
    assert (error, "99CASB") in type_codes(root)
    description = "; ".join([error, *reasons])
    assert root.findtext("EventIdentification/EventOutcomeDescription") == description
    aps = participants(root)
    assert aps["dr.house"].get("UserIsRequestor") == "true"
    assert aps["cloud-pacs"].get("UserIsRequestor") == "false"  # performing: shall be false
    subject = objects(root)["3f2a9c0e5b7d4e1f8a6b2c9d0e1f2a3b"]
    assert id_type(subject) == "request_id"
    assert details(subject) == {"Alert Description": description}
    assert "1.2.826.0.1.7" in objects(root)  # what was attempted


def test_policy_deny_without_error_code_is_a_security_alert() -> None:
    root = msg(request(decision="deny", error=None, status=403, reasons=["no rule matched"]))
    assert event(root) == ("110113", "E", "8")
    subject = objects(root)["3f2a9c0e5b7d4e1f8a6b2c9d0e1f2a3b"]
    assert details(subject) == {"Alert Description": "no rule matched"}


def test_response_blocked_after_forwarding_is_a_security_alert() -> None:
    # Forwarded (decision allow), but DLP refused the response.
    root = msg(request(decision="allow", error="response_blocked", status=502))
    assert event(root)[0] == "110113"


def test_audit_unavailable_is_audit_recording_stopped() -> None:
    root = msg(request(decision="deny", error="audit_unavailable", status=503))
    assert event(root) == ("110113", "E", "12")
    assert type_codes(root)[0] == ("110133", "DCM")


def test_unauthenticated_is_a_failed_login() -> None:
    root = msg(
        request(decision="deny", error="unauthenticated", status=401, principal=None, uids=None)
    )
    assert event(root) == ("110114", "E", "8")
    assert type_codes(root)[0] == ("110122", "DCM")
    aps = participants(root)
    # No principal: the client address is the only identity the record holds.
    user = aps["10.20.30.40"]
    assert user.get("UserIsRequestor") == "true" and user.get("UserName") is None
    assert list(aps) == ["10.20.30.40", SOURCE_ID]
    assert objects(root) == {}


def test_identity_unavailable_is_a_major_login_failure() -> None:
    root = msg(request(decision="deny", error="identity_unavailable", status=503, principal=None))
    assert event(root) == ("110114", "E", "12")


def test_operational_refusal_keeps_the_event_with_a_failure() -> None:
    root = msg(request(decision="deny", error="bad_request", status=400, action="search"))
    assert event(root) == ("110112", "E", "8")
    root = msg(request(decision="deny", error="dlp_unavailable", status=503, action="store"))
    assert event(root) == ("110104", "C", "12")


def test_unclassified_refused_request_is_a_security_alert() -> None:
    root = msg(
        request(
            decision="deny",
            error="bad_request",
            status=400,
            action=None,
            destination=None,
            route=None,
            uids=None,
            principal=None,
            client={"ip": None},
        )
    )
    assert event(root) == ("110113", "E", "8")
    aps = participants(root)
    assert list(aps) == ["unknown", SOURCE_ID]  # UserID is mandatory
    assert aps["unknown"].get("NetworkAccessPointID") is None


# -- other record types ---------------------------------------------------------------
def test_policy_change_is_a_security_configuration_alert() -> None:
    rec = {  # as runtime.policy_record writes it
        "type": "policy_change",
        "time": "2025-03-01T11:00:00.000+01:00",
        "event": "loaded",
        "policy_version": "sha256:77aa",
        "rules": 12,
        "files": ["hospital.yaml", "research.yaml"],
        "seq": 9,
    }
    root = msg(rec)
    assert event(root) == ("110113", "E", "0")
    assert type_codes(root)[0] == ("110129", "DCM")
    aps = participants(root)
    assert list(aps) == [SOURCE_ID] and aps[SOURCE_ID].get("UserIsRequestor") == "true"
    policy = objects(root)["sha256:77aa"]
    assert policy.get("ParticipantObjectTypeCodeRole") == "13"
    description = "loaded; hospital.yaml; research.yaml"
    assert details(policy) == {"Alert Description": description}
    assert root.findtext("EventIdentification/EventOutcomeDescription") == description
    rejected = dict(
        rec,
        event="rejected",
        error="policy_invalid",
        principal={"sub": "admin1", "roles": ["admin"]},
        client={"ip": "192.0.2.7"},
    )
    root = msg(rejected)
    assert event(root) == ("110113", "E", "4")
    assert list(participants(root)) == ["admin1", SOURCE_ID]


def test_checkpoints_have_no_atna_message() -> None:
    rec = {"type": "checkpoint", "time": "2025-03-01T10:00:00.000Z", "checkpoint": {}}
    assert audit_message(rec, source_id=SOURCE_ID) is None


def test_record_without_type_is_a_request() -> None:
    rec = request()
    del rec["type"]
    assert event(msg(rec)) == ("110104", "R", "0")


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "surprise"},
        {"time": None},
        {"time": "2025-03-01T10:15:30"},  # no zone: ambiguous
        {"time": "2025-02-30T10:15:30Z"},
        {"time": "yesterday"},
    ],
)
def test_records_that_cannot_be_expressed_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        audit_message(request(**bad), source_id=SOURCE_ID)


def test_offset_time_is_kept_unambiguous() -> None:
    root = msg(request(time="2025-03-01T11:15:30.250+01:00"))
    ev = root.find("EventIdentification")
    assert ev is not None
    assert datetime.fromisoformat(ev.get("EventDateTime", "")) == datetime.fromisoformat(
        "2025-03-01T10:15:30.250+00:00"
    )


def test_markup_and_control_characters_stay_data() -> None:
    reasons = ['rule "x" <b>&</b>\nsecond line\x00']
    root = msg(request(decision="deny", error="forbidden", reasons=reasons))
    text = root.findtext("EventIdentification/EventOutcomeDescription")
    assert text == 'forbidden; rule "x" <b>&</b>\ufffdsecond line\ufffd'


# -- nothing but the record -----------------------------------------------------------
SCENARIOS = [
    request(),
    request(
        action="search",
        query_keys=["PatientID"],
        uids={"study": None, "series": None, "instance": None},
    ),
    request(method="POST", action="store", status=202, dlp={"blocked": 1}),
    request(method="DELETE", action="delete"),
    request(decision="deny", error="dlp_blocked", status=403, reasons=["rule phi: PatientName"]),
    request(decision="deny", error="unauthenticated", principal=None, status=401),
    request(
        action="retrieve",
        uids=None,
        object={"bucket": "scans", "operation": "GetObject", "key_sha256": "d" * 64},
    ),
    {
        "type": "policy_change",
        "time": "2025-03-01T11:00:00.000Z",
        "event": "reloaded",
        "policy_version": "v7",
        "rules": 3,
        "files": ["hospital.yaml"],
    },
]
# What the standard (and the 99CASB private codes' structure) contributes.
STANDARD = {
    "DCM",
    "99CASB",
    "true",
    "false",
    "0",
    "1",
    "2",
    "3",
    "4",
    "8",
    "12",
    "13",
    "17",
    "24",
    "C",
    "R",
    "U",
    "D",
    "E",
    "DICOM Instances Accessed",
    "DICOM Instances Transferred",
    "Query",
    "Security Alert",
    "User Authentication",
    "Login",
    "Security Configuration",
    "Use of Restricted Function",
    "Audit Recording Stopped",
    "Application",
    "Destination Role ID",
    "Source Role ID",
    "Study Instance UID",
    "Request ID",
    "Policy Version",
    "Route Template",
    "Object Store Bucket",
    "Object Key SHA-256",
    "110103",
    "110104",
    "110112",
    "110113",
    "110114",
    "110122",
    "110129",
    "110132",
    "110133",
    "110150",
    "110152",
    "110153",
    "110180",
    "request_id",
    "policy_version",
    "route",
    "bucket",
    "key_sha256",
    "SeriesInstanceUID",
    "Alert Description",
    "operation",
    "unknown",
    SOURCE_ID,
}


def leaf_strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(leaf_strings(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(leaf_strings(v) for v in value)) if value else set()
    return {str(value)} if value is not None else set()


@pytest.mark.parametrize("record", SCENARIOS)
def test_no_value_outside_the_record(record: dict[str, Any]) -> None:
    xml = audit_message(copy.deepcopy(record), source_id=SOURCE_ID)
    assert xml is not None
    root = parse(xml)
    held = leaf_strings(record) | {"policy_change"}
    values: list[str] = []
    for el in root.iter():
        for name, value in el.attrib.items():
            if name == "value" or el.tag == "ParticipantObjectQuery":
                value = base64.b64decode(value).decode()
            values.append(value)
        if el.text:
            text = el.text
            if el.tag == "ParticipantObjectQuery":
                text = base64.b64decode(text).decode()
            values.append(text)
    for value in values:
        # Composite values: "<sub@issuer>", "route?key&key", "code; reason; reason".
        parts = re.split(r"; |[?&]|^<|@(?=https?://)|>$", value)
        for part in filter(None, parts):
            assert part in STANDARD or part in held, f"{part!r} is not from the record"


def test_issue_7_refusals_map_to_login_failure_or_operational_outcomes() -> None:
    revoked = msg(request(decision="deny", error="token_revoked", status=401))
    assert revoked.find("EventIdentification/EventID").get("csd-code") == "110114"
    for code, status in (("rate_limited", 429), ("state_unavailable", 503)):
        root = msg(request(decision="deny", error=code, status=status))
        assert root.find("EventIdentification/EventID").get("csd-code") != "110113", code


def test_a_store_activation_names_who_made_the_policy_current() -> None:
    record = {
        "type": "policy_change",
        "time": "2026-11-25T10:00:00.000Z",
        "event": "activated",
        "policy_version": "sha256:" + "a" * 64,
        "author": "alice",
        "activated_by": "bob",
        "activation_comment": "rollback",
    }
    root = ET.fromstring(audit_message(record, source_id="casb") or b"")
    requestors = [
        p.get("UserID")
        for p in root.iter("ActiveParticipant")
        if p.get("UserIsRequestor") == "true"
    ]
    assert requestors == ["bob"]
