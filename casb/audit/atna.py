"""Audit record -> DICOM audit message (PS3.15 Annex A.5), the XML IHE ATNA repositories take.

Followed:
* PS3.15 A.5.1 "DICOM Audit Message Schema" (Relax NG): element order AuditMessage =
  EventIdentification, ActiveParticipant+, AuditSourceIdentification,
  ParticipantObjectIdentification*; EventIdentification = EventID, EventTypeCode*,
  EventOutcomeDescription?; ActiveParticipant = RoleIDCode*; ParticipantObjectIdentification
  = ParticipantObjectIDTypeCode, (ParticipantObjectName | ParticipantObjectQuery)?,
  ParticipantObjectDetail* (type + base64 value), ParticipantObjectDescription*
  (SOPClass { Instance* , @UID?, @NumberOfInstances }). Coded values carry csd-code,
  codeSystemName, originalText. No namespace.
* PS3.15 A.5.2: EventDateTime unambiguous as to time zone (the record's ISO 8601 time,
  which carries Z or an offset); EventOutcomeIndicator 0 success, 4 minor failure,
  8 serious failure, 12 major failure (function made unavailable).
* PS3.15 A.5.3 messages, chosen per record (see `build_event`):
    - A.5.3.10 Query (110112, E): search, list, capabilities, worklist. The issuing
      principal has RoleIDCode 110153 "Source Role ID", the destination 110152
      "Destination Role ID". The "query" participant object (type 2, role 24 Query, as
      IHE RESTful queries and dcm4chee's QIDO audit do) carries the route template and
      the query KEYS only: casb never records query values (they can be PHI).
    - A.5.3.7 DICOM Instances Transferred (110104): retrieve, retrieve_metadata (R: the
      destination is the source, the principal the receiver) and store (C: the other way).
    - A.5.3.6 DICOM Instances Accessed (110103): delete (D); also any other action a
      policy allowed (R/U/D by HTTP method).
    - A.5.3.11 Security Alert (110113, E) for a request refused for security reasons
      (policy, DLP, encryption, transport, integrity): EventTypeCode (110132, DCM, "Use of
      Restricted Function") from DCID 403 -- the principal attempted something policy
      restricts; "Node Authentication" (110126) is about TLS peers and "Security Roles
      Changed" (110136) about role definitions, neither fits a blocked request. A refusal
      because the audit log could not be written is (110133, "Audit Recording Stopped").
      A private EventTypeCode (99CASB) names the exact refusal code. The refused request
      is the "Alert Subject" participant object, with the mandatory "Alert Description"
      detail.
    - A.5.3.12 User Authentication (110114, E, EventTypeCode 110122 "Login") for a request
      without a valid token (failure), or when signing keys were unavailable (major).
    - policy_change records: Security Alert with (110129, DCM, "Security Configuration")
      from DCID 403: the policy IS the proxy's security configuration; the new policy
      version is the alert subject (type 2, role 13 Security Resource).
    - checkpoint records have no ATNA message (they are the log's own integrity seals).
* Studies (A.5.3.6/A.5.3.7 "Studies" participant object): type 2, role 3, ID type
  (110180, DCM, "Study Instance UID"). A.5 has no series participant object, so the
  series UID is a ParticipantObjectDetail "SeriesInstanceUID"; an instance UID is listed
  as SOPClass/Instance (SOP Class UID left out: casb does not know it).
* IHE ITI TF-2 XUA convention for the user: UserName "<subject@issuer>".
* Private codes use the coding scheme designator "99CASB" (PS3.16: private designators
  start with "99").

Deviations (to state in a conformance statement): A.5.3.6/A.5.3.7 require a Patient
participant object; audit records never hold a patient ID (no PHI), so there is none.
A record with some instances stored and some blocked (202) is one message with outcome 4,
not a success and a failure message.

Every value in a message comes from the record, or is a code or enumeration of the
standard, or source_id; nothing else.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value: csd-code, codeSystemName, originalText (the DICOM Code Meaning)."""

    code: str
    system: str
    meaning: str


DCM: Final = "DCM"
CASB: Final = "99CASB"

# DCID 400 Audit Event ID
INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
QUERY = Code("110112", DCM, "Query")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")
# DCID 401 Audit Event Type Code / DCID 403 Security Alert Type Code
LOGIN = Code("110122", DCM, "Login")
SECURITY_CONFIGURATION = Code("110129", DCM, "Security Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = Code("110133", DCM, "Audit Recording Stopped")
# DCID 402 Audit Active Participant Role ID Code
APPLICATION = Code("110150", DCM, "Application")
DESTINATION_ROLE = Code("110152", DCM, "Destination Role ID")
SOURCE_ROLE = Code("110153", DCM, "Source Role ID")
# DCID 404 Audit Participant Object ID Type Code
STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
# Private (99CASB): identifiers casb records that DICOM has no code for
REQUEST_ID = Code("request_id", CASB, "Request ID")
POLICY_VERSION = Code("policy_version", CASB, "Policy Version")
ROUTE = Code("route", CASB, "Route Template")
BUCKET = Code("bucket", CASB, "Object Store Bucket")
KEY_SHA256 = Code("key_sha256", CASB, "Object Key SHA-256")
SERIES_UID = Code("series_uid", CASB, "Series Instance UID")
INSTANCE_UID = Code("instance_uid", CASB, "SOP Instance UID")

# EventOutcomeIndicator (A.5.1)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"
# ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole (A.5.1.2.2)
SYSTEM_OBJECT = "2"
ROLE_REPORT, ROLE_SECURITY_RESOURCE, ROLE_DATA_REPOSITORY, ROLE_QUERY = "3", "13", "17", "24"
# AuditSourceTypeCode (A.5.1.2.1): 3 = web server process tier (casb is an HTTP proxy)
AUDIT_SOURCE_TYPE = "3"
UNKNOWN_USER = "unknown"  # UserID is mandatory; a refused request may have no principal

_QUERY_ACTIONS = frozenset({"search", "list", "capabilities", "worklist"})
_RETRIEVE_ACTIONS = frozenset({"retrieve", "retrieve_metadata"})
# Refusals that are about the proxy failing, not about the request being disallowed.
# Every other refusal code (and any code added later) is reported as a Security Alert.
_OPERATIONAL_ERRORS = frozenset(
    {
        "bad_request",
        "unsupported_media_type",
        "body_too_large",
        "upstream_body_too_large",
        "upstream_unreachable",
        "transfer_failed",
        "client_disconnected",
        "internal_error",
        "dlp_unavailable",
        "envelope_unavailable",
        "rate_limited",
        "state_unavailable",
    }
)
_METHOD_ACTION = {"GET": "R", "HEAD": "R", "OPTIONS": "R", "DELETE": "D"}
# xsd:dateTime with a mandatory zone, at most microseconds (RFC 5424 TIMESTAMP is the same).
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
# Characters XML 1.0 cannot carry (and CR/LF/TAB, which would split a syslog line).
_NOT_XML = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class Participant:
    user_id: str
    requestor: bool
    roles: tuple[Code, ...] = ()
    user_name: str | None = None
    access_point: str | None = None  # an IP address or a host name


@dataclass(frozen=True, slots=True)
class ParticipantObject:
    id: str
    id_type: Code
    role: str
    type_code: str = SYSTEM_OBJECT
    query: str | None = None  # ParticipantObjectQuery (base64-encoded when rendered)
    details: tuple[tuple[str, str], ...] = ()  # (type, value), value base64-encoded
    instance_uid: str | None = None  # ParticipantObjectDescription/SOPClass/Instance


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One A.5 message, before rendering: what `build_event` decided."""

    event_id: Code
    action: str  # EventActionCode: C R U D E
    time: str
    outcome: str  # EventOutcomeIndicator
    type_codes: tuple[Code, ...] = ()
    description: str | None = None
    participants: tuple[Participant, ...] = ()
    objects: tuple[ParticipantObject, ...] = ()


# -- public ---------------------------------------------------------------------------
def audit_message(record: Mapping[str, Any], *, source_id: str) -> bytes | None:
    """The AuditMessage XML (UTF-8, one line, with an XML declaration) for `record`, or
    None for records that have no ATNA message (checkpoints). Raises ValueError for a
    record that cannot be expressed (no valid time, unknown type)."""
    event = build_event(record, source_id=source_id)
    return None if event is None else render(event, source_id=source_id)


def event_time(record: Mapping[str, Any]) -> str:
    """The record's "time", checked to be an ISO 8601 date-time with a zone (valid as
    xsd:dateTime and as an RFC 5424 TIMESTAMP)."""
    value = record.get("time")
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise ValueError(f"record time {value!r} is not an ISO 8601 date-time with a zone")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"record time {value!r} is not a valid date-time") from None
    return value


def build_event(record: Mapping[str, Any], *, source_id: str) -> AuditEvent | None:
    """Which A.5.3 message the record is, and its contents (see the module docstring)."""
    kind = record.get("type", "request")  # records from before "type" are requests
    if kind == "request":
        return _request_event(record, source_id)
    if kind == "policy_change":
        return _policy_event(record, source_id)
    if kind == "checkpoint":
        return None
    raise ValueError(f"unknown audit record type {kind!r}")


def render(event: AuditEvent, *, source_id: str) -> bytes:
    """Serialise in the element order of the A.5.1 schema, with xml.etree (escaping)."""
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": event.time,
            "EventOutcomeIndicator": event.outcome,
        },
    )
    _coded(ev, "EventID", event.event_id)
    for code in event.type_codes:
        _coded(ev, "EventTypeCode", code)
    if event.description:
        ET.SubElement(ev, "EventOutcomeDescription").text = _text(event.description)
    for p in event.participants:
        attrs = {"UserID": _text(p.user_id)}
        if p.user_name:
            attrs["UserName"] = _text(p.user_name)
        attrs["UserIsRequestor"] = "true" if p.requestor else "false"
        if p.access_point:
            attrs["NetworkAccessPointID"] = _text(p.access_point)
            attrs["NetworkAccessPointTypeCode"] = _access_point_type(p.access_point)
        ap = ET.SubElement(root, "ActiveParticipant", attrs)
        for role in p.roles:
            _coded(ap, "RoleIDCode", role)
    src = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": _text(source_id)})
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": AUDIT_SOURCE_TYPE})
    for obj in event.objects:
        po = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": _text(obj.id),
                "ParticipantObjectTypeCode": obj.type_code,
                "ParticipantObjectTypeCodeRole": obj.role,
            },
        )
        _coded(po, "ParticipantObjectIDTypeCode", obj.id_type)
        if obj.query is not None:
            ET.SubElement(po, "ParticipantObjectQuery").text = _b64(obj.query)
        for kind, value in obj.details:
            ET.SubElement(po, "ParticipantObjectDetail", {"type": kind, "value": _b64(value)})
        if obj.instance_uid is not None:
            desc = ET.SubElement(po, "ParticipantObjectDescription")
            sop = ET.SubElement(desc, "SOPClass", {"NumberOfInstances": "1"})
            ET.SubElement(sop, "Instance", {"UID": _text(obj.instance_uid)})
    body = ET.tostring(root, encoding="unicode")
    # The declaration is written here: ET's own ends with a newline, and a syslog line
    # must not contain one.
    return b'<?xml version="1.0" encoding="UTF-8"?>' + body.encode("utf-8")


# -- requests -------------------------------------------------------------------------
def _request_event(record: Mapping[str, Any], source_id: str) -> AuditEvent:
    time = event_time(record)
    error = _str(record.get("error"))
    denied = record.get("decision") != "allow"
    action = _str(record.get("action"))
    principal = _mapping(record.get("principal"))
    requestor = _requestor(principal, _mapping(record.get("client")))
    proxy = Participant(source_id, False, (APPLICATION,))
    destination = _str(record.get("destination"))

    if error in ("unauthenticated", "identity_unavailable", "token_revoked"):
        outcome = MAJOR_FAILURE if error == "identity_unavailable" else SERIOUS_FAILURE
        return AuditEvent(
            USER_AUTHENTICATION,
            "E",
            time,
            outcome,
            (LOGIN, _private(error)),
            _description(record),
            (requestor, proxy),
        )
    security = error is not None and error not in _OPERATIONAL_ERRORS
    unclassified = action is None or action == "unknown"
    if security or (denied and (error is None or unclassified)):
        return _security_alert(record, time, error, requestor, proxy, destination)

    role_of_requestor: Code | None = None
    role_of_destination: Code | None = None
    if action in _QUERY_ACTIONS:
        event_id, code = QUERY, "E"
        role_of_requestor, role_of_destination = SOURCE_ROLE, DESTINATION_ROLE
    elif action in _RETRIEVE_ACTIONS:
        event_id, code = INSTANCES_TRANSFERRED, "R"
        role_of_requestor, role_of_destination = DESTINATION_ROLE, SOURCE_ROLE
    elif action == "store":
        event_id, code = INSTANCES_TRANSFERRED, "C"
        role_of_requestor, role_of_destination = SOURCE_ROLE, DESTINATION_ROLE
    elif action == "delete":
        event_id, code = INSTANCES_ACCESSED, "D"
    else:  # an action a policy allowed explicitly (e.g. "unknown"): by HTTP method
        method = (_str(record.get("method")) or "").upper()
        event_id, code = INSTANCES_ACCESSED, _METHOD_ACTION.get(method, "U")
    if role_of_requestor is not None:
        requestor = replace(requestor, roles=(role_of_requestor, *requestor.roles))
    participants = [requestor]
    if destination is not None:
        roles = (role_of_destination,) if role_of_destination is not None else ()
        participants.append(Participant(destination, False, roles))
    participants.append(proxy)
    objects = _data_objects(record)
    if event_id == QUERY:
        objects = _query_objects(record) + objects
    outcome = _request_outcome(record, denied, error)
    return AuditEvent(
        event_id,
        code,
        time,
        outcome,
        (_private(action),) if action else (),
        _description(record) if outcome != SUCCESS else None,
        tuple(participants),
        objects,
    )


def _security_alert(
    record: Mapping[str, Any],
    time: str,
    error: str | None,
    requestor: Participant,
    proxy: Participant,
    destination: str | None,
) -> AuditEvent:
    """A.5.3.11: the principal asked, casb refused (the reporting process); the
    destination, when known, is a performing participant (UserIsRequestor false)."""
    audit_down = error == "audit_unavailable"
    types = [AUDIT_RECORDING_STOPPED if audit_down else USE_OF_RESTRICTED_FUNCTION]
    action = _str(record.get("action"))
    types.extend(_private(v) for v in (error, action) if v is not None)
    participants = [requestor]
    if destination is not None:
        participants.append(Participant(destination, False))
    participants.append(proxy)
    description = _description(record)
    objects: tuple[ParticipantObject, ...] = ()
    request_id = _str(record.get("request_id"))
    if request_id is not None:
        # The "Alert Subject": the refused request, with its mandatory "Alert Description".
        objects = (
            ParticipantObject(
                request_id,
                REQUEST_ID,
                ROLE_SECURITY_RESOURCE,
                details=(("Alert Description", description or "deny"),),
            ),
        )
    return AuditEvent(
        SECURITY_ALERT,
        "E",
        time,
        MAJOR_FAILURE if audit_down else SERIOUS_FAILURE,
        tuple(types),
        description,
        tuple(participants),
        objects + _data_objects(record),
    )


def _request_outcome(record: Mapping[str, Any], denied: bool, error: str | None) -> str:
    """Denied: serious (8), or major (12) when a casb function was unavailable. Allowed:
    the upstream's 5xx is serious, a 4xx, a broken transfer or instances DLP held back
    a minor failure (4)."""
    if denied:
        unavailable = error is not None and error.endswith("_unavailable")
        return MAJOR_FAILURE if unavailable else SERIOUS_FAILURE
    raw_status = record.get("status")
    status = raw_status if isinstance(raw_status, int) else 0
    if status >= 500:
        return SERIOUS_FAILURE
    dlp = _mapping(record.get("dlp")) or {}
    partial = any(isinstance(dlp.get(k), int) and dlp[k] > 0 for k in ("blocked", "failed"))
    if status >= 400 or error is not None or partial:
        return MINOR_FAILURE
    return SUCCESS


def _data_objects(record: Mapping[str, Any]) -> tuple[ParticipantObject, ...]:
    """What was accessed: the study (with series and instance), or the object-store
    object (bucket, key SHA-256: the key itself is never recorded)."""
    out: list[ParticipantObject] = []
    uids = _mapping(record.get("uids")) or {}
    study, series, instance = (_str(uids.get(k)) for k in ("study", "series", "instance"))
    if study is not None:
        out.append(
            ParticipantObject(
                study,
                STUDY_INSTANCE_UID,
                ROLE_REPORT,
                details=(("SeriesInstanceUID", series),) if series is not None else (),
                instance_uid=instance,
            )
        )
    else:  # a series or instance addressed without its study: private ID types
        if series is not None:
            out.append(ParticipantObject(series, SERIES_UID, ROLE_REPORT))
        if instance is not None:
            out.append(ParticipantObject(instance, INSTANCE_UID, ROLE_REPORT))
    obj = _mapping(record.get("object")) or {}
    bucket, key_sha256, operation = (
        _str(obj.get(k)) for k in ("bucket", "key_sha256", "operation")
    )
    op_detail = (("operation", operation),) if operation is not None else ()
    if key_sha256 is not None:
        bucket_detail = (("bucket", bucket),) if bucket is not None else ()
        out.append(
            ParticipantObject(
                key_sha256, KEY_SHA256, ROLE_REPORT, details=bucket_detail + op_detail
            )
        )
    elif bucket is not None:
        out.append(ParticipantObject(bucket, BUCKET, ROLE_DATA_REPOSITORY, details=op_detail))
    return tuple(out)


def _query_objects(record: Mapping[str, Any]) -> tuple[ParticipantObject, ...]:
    route = _str(record.get("route"))
    if route is None:
        return ()
    keys = [k for k in record.get("query_keys") or () if isinstance(k, str)]
    query = route + ("?" + "&".join(keys) if keys else "")
    return (ParticipantObject(route, ROUTE, ROLE_QUERY, query=query),)


# -- policy changes -------------------------------------------------------------------
def _policy_event(record: Mapping[str, Any], source_id: str) -> AuditEvent:
    """A policy load or reload (runtime.policy_record). Fields read: event ("loaded",
    "reloaded"; "rejected"/"failed"/"error" = not applied; "outcome" is read the same
    way), policy_version, files, error, reasons, principal/client when an admin made
    the change, and activated_by when a publish or rollback through the state store did."""
    time = event_time(record)
    principal = _mapping(record.get("principal"))
    client = _mapping(record.get("client"))
    not_applied = ("rejected", "failed", "error")
    failed = (
        record.get("event") in not_applied
        or record.get("outcome") in not_applied
        or bool(record.get("error"))
    )
    participants: tuple[Participant, ...]
    if principal is not None or client is not None:
        participants = (
            _requestor(principal, client),
            Participant(source_id, False, (APPLICATION,)),
        )
    elif _str(record.get("activated_by")):  # published or rolled back via the store
        participants = (
            Participant(str(record["activated_by"]), True, ()),
            Participant(source_id, False, (APPLICATION,)),
        )
    else:  # the proxy reloaded a changed policy file by itself
        participants = (Participant(source_id, True, (APPLICATION,)),)
    version = _str(record.get("policy_version"))
    files = record.get("files")
    parts = [_str(record.get("event")), _description(record)]
    if isinstance(files, list):
        parts.extend(_str(f) for f in files)
    description = "; ".join(p for p in parts if p) or None
    objects: tuple[ParticipantObject, ...] = ()
    if version is not None:
        objects = (
            ParticipantObject(
                version,
                POLICY_VERSION,
                ROLE_SECURITY_RESOURCE,
                details=(("Alert Description", description or "policy_change"),),
            ),
        )
    return AuditEvent(
        SECURITY_ALERT,
        "E",
        time,
        # Rejected: the old policy stays in force (mitigation effective), a minor failure.
        MINOR_FAILURE if failed else SUCCESS,
        (SECURITY_CONFIGURATION, _private("policy_change")),
        description,
        participants,
        objects,
    )


# -- helpers --------------------------------------------------------------------------
def _requestor(
    principal: Mapping[str, Any] | None, client: Mapping[str, Any] | None
) -> Participant:
    """The principal (UserID = subject, roles as private RoleIDCodes) from the client's
    address; without a principal the address is the only identity there is."""
    sub = _str(principal.get("sub")) if principal else None
    issuer = _str(principal.get("issuer")) if principal else None
    ip = _str(client.get("ip")) if client else None
    return Participant(
        sub or ip or UNKNOWN_USER,
        True,
        _user_roles(principal),
        user_name=f"<{sub}@{issuer}>" if sub and issuer else None,
        access_point=ip,
    )


def _user_roles(principal: Mapping[str, Any] | None) -> tuple[Code, ...]:
    roles = principal.get("roles") if principal else None
    if not isinstance(roles, list):
        return ()
    return tuple(Code(r, CASB, r) for r in roles if isinstance(r, str) and r)


def _private(value: str) -> Code:
    return Code(value, CASB, value)


def _description(record: Mapping[str, Any]) -> str | None:
    """The record's error code and reasons (reasons never carry values: DESIGN.md)."""
    parts = [_str(record.get("error"))]
    reasons = record.get("reasons")
    if isinstance(reasons, list):
        parts.extend(_str(r) for r in reasons)
    text = "; ".join(p for p in parts if p)
    return text or None


def _access_point_type(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "1"  # machine name
    return "2"  # IP address


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {
            "csd-code": _text(code.code),
            "codeSystemName": code.system,
            "originalText": _text(code.meaning),
        },
    )


def _text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _b64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8", "surrogatepass")).decode("ascii")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None
