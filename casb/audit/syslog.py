"""Audit record -> one RFC 5424 syslog message (and RFC 6587 octet-counted framing).

Followed:
* RFC 5424 section 6 (ABNF): SYSLOG-MSG = HEADER SP STRUCTURED-DATA [SP MSG];
  HEADER = PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID, VERSION 1;
  HOSTNAME/APP-NAME/PROCID/MSGID are PRINTUSASCII (%d33-126) of at most 255/48/128/32
  octets, or "-"; TIMESTAMP is RFC 3339 with a zone and at most 6 fraction digits (the
  record's own "time"); MSG = BOM UTF-8-STRING when it is UTF-8 (6.4).
* RFC 5424 6.3: SD-ELEMENT = "[" SD-ID *(SP PARAM-NAME "=" %d34 PARAM-VALUE %d34) "]";
  "casb@32473" is an enterprise SD-ID (name@<private enterprise number>; 32473 is the
  example number of RFC 5612); in PARAM-VALUE '"', '\\' and ']' are escaped with a
  backslash (6.3.3). seq and hash let a collector drop a message it already has (the
  sink replays after an outage); id is the request id, to find the request elsewhere.
* DICOM PS3.15 A.6/A.7 and IHE ITI TF-2 ITI-20 (Record Audit Event): facility 10
  (security/authorization), severity 5 (notice) normally and 4 (warning) where the
  message reports a failure: PRI <85> / <84>. MSGID "IHE+DICOM" for the DICOM-schema XML
  (atna); "casb-audit" for the record itself as JSON (jsonl).
* RFC 6587 3.4.1 / RFC 5425 4.3 octet counting: SYSLOG-FRAME = MSG-LEN SP SYSLOG-MSG,
  MSG-LEN the octet count of SYSLOG-MSG, no trailing LF.

Messages never contain CR or LF (JSON escapes them; atna.render replaces them), so
`casb audit export --format atna` can write one message per line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Literal

from casb.audit import atna
from casb.audit.chain import canonical_json

BOM: Final = b"\xef\xbb\xbf"
NILVALUE: Final = "-"
SD_ID: Final = "casb@32473"
MSGID_ATNA: Final = "IHE+DICOM"
MSGID_JSONL: Final = "casb-audit"
FACILITY_SECURITY: Final = 10  # security/authorization messages (RFC 5424 table 1)
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5

_PRINTUSASCII = re.compile(r"[\x21-\x7e]+")
_SD_ESCAPE = re.compile(r'(["\\\]])')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def rfc5424_message(
    record: Mapping[str, Any],
    *,
    fmt: Literal["atna", "jsonl"],
    source_id: str,
    hostname: str,
    app_name: str = "casb",
    procid: str = NILVALUE,
) -> bytes | None:
    """The syslog message for `record` (no framing, no newline), or None when the format
    has no message for it (atna: checkpoints). ValueError for a header field outside the
    RFC 5424 grammar or a record that cannot be expressed."""
    if fmt == "atna":
        event = atna.build_event(record, source_id=source_id)
        if event is None:
            return None
        payload = atna.render(event, source_id=source_id)
        failed = event.outcome != atna.SUCCESS
        msgid, timestamp = MSGID_ATNA, event.time
    elif fmt == "jsonl":
        payload = canonical_json(dict(record))
        failed = record.get("decision") == "deny"
        msgid = MSGID_JSONL
        timestamp = atna.event_time(record) if "time" in record else NILVALUE
    else:
        raise ValueError(f"unknown syslog format {fmt!r}")
    pri = FACILITY_SECURITY * 8 + (SEVERITY_WARNING if failed else SEVERITY_NOTICE)
    header = " ".join(
        (
            f"<{pri}>1",
            timestamp,
            header_field("HOSTNAME", hostname, 255),
            header_field("APP-NAME", app_name, 48),
            header_field("PROCID", procid, 128),
            msgid,
        )
    )
    return header.encode("ascii") + b" " + structured_data(record) + b" " + BOM + payload


def structured_data(record: Mapping[str, Any]) -> bytes:
    """[casb@32473 seq="N" id="REQUEST_ID" hash="HEX"] with the params the record has.
    seq + hash identify a record even across a replaced log (which restarts at seq 1)."""
    params = []
    seq = record.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool):
        params.append(f'seq="{seq}"')
    for name, key in (("id", "request_id"), ("hash", "hash")):
        value = record.get(key)
        if isinstance(value, str) and value:
            params.append(f'{name}="{sd_escape(value)}"')
    return ("[" + " ".join([SD_ID, *params]) + "]").encode("utf-8")


def sd_escape(value: str) -> str:
    """PARAM-VALUE escaping (RFC 5424 6.3.3). Control characters have no escape there
    and would split a line-oriented collector's record, so they are refused."""
    if _CONTROL.search(value):
        raise ValueError("a structured-data value contains a control character")
    return _SD_ESCAPE.sub(r"\\\1", value)


def octet_frame(msg: bytes) -> bytes:
    """RFC 6587 3.4.1 octet-counting frame (as RFC 5425 mandates over TLS)."""
    if not msg:
        raise ValueError("an empty syslog message cannot be framed (MSG-LEN is nonzero)")
    return str(len(msg)).encode("ascii") + b" " + msg


def header_field(name: str, value: str, limit: int) -> str:
    """`value` if it is a valid RFC 5424 header field (NILVALUE or 1-`limit` PRINTUSASCII)."""
    if value == NILVALUE or (len(value) <= limit and _PRINTUSASCII.fullmatch(value)):
        return value
    raise ValueError(
        f"syslog {name} must be 1-{limit} printable US-ASCII characters, got {value!r}"
    )
