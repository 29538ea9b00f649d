"""RFC 5424 syslog messages and RFC 6587 octet-counted framing (casb/audit/syslog.py)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from casb.audit.chain import record_hash, sealed_line
from casb.audit.syslog import octet_frame, rfc5424_message, sd_escape

# RFC 5424 section 6 ABNF as a regex (PRINTUSASCII = %d33-126; SD-NAME excludes '=', SP,
# ']' and '"'; PARAM-VALUE escapes '"', '\' and ']').
SD_NAME = r"[!#-<>-\\^-~]{1,32}"
PARAM_VALUE = r'(?:[^"\\\]]|\\.)*'
SD_ELEMENT = rf'\[{SD_NAME}(?: {SD_NAME}="{PARAM_VALUE}")*\]'
SYSLOG_MSG = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) "
    rb"(?P<timestamp>-|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    rb"(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})) "
    rb"(?P<hostname>-|[!-~]{1,255}) (?P<app>-|[!-~]{1,48}) (?P<procid>-|[!-~]{1,128}) "
    rb"(?P<msgid>-|[!-~]{1,32}) "
    rb"(?P<sd>-|(?:" + SD_ELEMENT.encode() + rb")+)"
    rb"(?: (?P<msg>.*))?",
    re.DOTALL,
)
BOM = b"\xef\xbb\xbf"


def sealed(record: dict[str, Any], seq: int = 5) -> dict[str, Any]:
    line, _ = sealed_line(record, seq, "e" * 64)
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def request(**changes: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "type": "request",
        "time": "2025-03-01T10:15:30.250Z",
        "request_id": "9b1f0c2d3e4a5b6c7d8e9f0a1b2c3d4e",
        "principal": {"sub": "dr.house", "issuer": "https://idp.test", "roles": ["radiologist"]},
        "client": {"ip": "10.0.0.9"},
        "method": "GET",
        "action": "retrieve",
        "destination": "pacs",
        "route": "/pacs/studies/{study}",
        "uids": {"study": "1.2.3", "series": None, "instance": None},
        "query_keys": [],
        "decision": "allow",
        "reasons": [],
        "error": None,
        "status": 200,
    }
    rec.update(changes)
    return sealed(rec)


def parse(msg: bytes) -> re.Match[bytes]:
    assert b"\n" not in msg and b"\r" not in msg
    m = SYSLOG_MSG.fullmatch(msg)
    assert m is not None, msg[:200]
    assert int(m["pri"]) <= 191
    return m


def sd_params(sd: bytes) -> dict[str, str]:
    text = sd.decode("utf-8")
    return {
        k: re.sub(r"\\(.)", r"\1", v)
        for k, v in re.findall(r' ([^ =\]"]+)="((?:[^"\\\]]|\\.)*)"', text)
    }


def atna(record: dict[str, Any], **kw: Any) -> bytes:
    msg = rfc5424_message(record, fmt="atna", source_id="casb-a", hostname="proxy-1.example", **kw)
    assert msg is not None
    return msg


def test_atna_message_header_and_payload() -> None:
    rec = request()
    m = parse(atna(rec))
    assert m["pri"] == b"85"  # facility 10 (security/authorization), severity 5 (notice)
    assert m["version"] == b"1"
    assert m["timestamp"] == b"2025-03-01T10:15:30.250Z"  # the record's time
    assert m["hostname"] == b"proxy-1.example"
    assert m["app"] == b"casb" and m["procid"] == b"-"
    assert m["msgid"] == b"IHE+DICOM"
    assert m["sd"].startswith(b"[casb@32473 ")
    assert sd_params(m["sd"]) == {"seq": "5", "id": rec["request_id"], "hash": rec["hash"]}
    payload = m["msg"]
    assert payload.startswith(BOM)
    root = ET.fromstring(payload[len(BOM) :])
    assert root.tag == "AuditMessage"
    src = root.find("AuditSourceIdentification")
    assert src is not None and src.get("AuditSourceID") == "casb-a"


def test_failures_are_warnings() -> None:
    m = parse(atna(request(decision="deny", error="forbidden", status=403)))
    assert m["pri"] == b"84"  # severity 4 (warning)
    m = parse(atna(request(status=502)))
    assert m["pri"] == b"84"


def test_app_name_and_procid() -> None:
    m = parse(atna(request(), app_name="casb-proxy", procid="4242"))
    assert m["app"] == b"casb-proxy" and m["procid"] == b"4242"


def test_jsonl_message_carries_the_record_for_rehashing() -> None:
    rec = request(decision="deny", error="dlp_blocked")
    msg = rfc5424_message(rec, fmt="jsonl", source_id="casb-a", hostname="h")
    assert msg is not None
    m = parse(msg)
    assert m["msgid"] == b"casb-audit" and m["pri"] == b"84"
    payload = m["msg"]
    assert payload.startswith(BOM)
    body = json.loads(payload[len(BOM) :])
    assert body == rec
    assert record_hash(body) == rec["hash"]  # a collector can re-verify it


def test_checkpoint_has_no_atna_message_but_a_jsonl_one() -> None:
    cp = sealed({"type": "checkpoint", "time": "2025-03-01T10:00:00.000Z", "checkpoint": {}})
    assert rfc5424_message(cp, fmt="atna", source_id="s", hostname="h") is None
    msg = rfc5424_message(cp, fmt="jsonl", source_id="s", hostname="h")
    assert msg is not None
    m = parse(msg)
    assert sd_params(m["sd"]) == {"seq": "5", "hash": cp["hash"]}  # no request id


def test_jsonl_record_without_time_has_nil_timestamp() -> None:
    msg = rfc5424_message({"seq": 1, "decision": "allow"}, fmt="jsonl", source_id="s", hostname="h")
    assert msg is not None and parse(msg)["timestamp"] == b"-"


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ('a"b', 'a\\"b'),
        ("a\\b", "a\\\\b"),
        ("a]b", "a\\]b"),
        ('"\\]', '\\"\\\\\\]'),
        ("plain-id_1", "plain-id_1"),
        ("ünï", "ünï"),
    ],
)
def test_sd_param_escaping(value: str, escaped: str) -> None:
    assert sd_escape(value) == escaped
    m = parse(atna(request(request_id=value)))
    assert sd_params(m["sd"])["id"] == value


def test_sd_param_with_control_character_is_refused() -> None:
    with pytest.raises(ValueError, match="control character"):
        atna(request(request_id="abc\ndef"))


@pytest.mark.parametrize(
    "kw",
    [
        {"hostname": "two words"},
        {"hostname": "h" * 256},
        {"hostname": ""},
        {"hostname": "höst"},
        {"app_name": "a" * 49},
        {"procid": "p" * 129},
    ],
)
def test_header_fields_outside_the_grammar_are_refused(kw: dict[str, str]) -> None:
    args: dict[str, Any] = {"fmt": "atna", "source_id": "s", "hostname": "h", **kw}
    with pytest.raises(ValueError, match="printable US-ASCII"):
        rfc5424_message(request(), **args)


def test_longest_valid_header_fields_are_accepted() -> None:
    msg = rfc5424_message(
        request(),
        fmt="atna",
        source_id="s",
        hostname="h" * 255,
        app_name="a" * 48,
        procid="p" * 128,
    )
    assert msg is not None
    parse(msg)


def test_octet_counting_frames_concatenate_and_split() -> None:
    msgs = [atna(request(request_id=f"r{i}", principal={"sub": "ü" * i})) for i in range(3)]
    stream = b"".join(octet_frame(m) for m in msgs)
    out, rest = [], stream
    while rest:  # RFC 6587 3.4.1: MSG-LEN SP SYSLOG-MSG, MSG-LEN counts octets
        length, _, rest = rest.partition(b" ")
        assert re.fullmatch(rb"[1-9][0-9]*", length)
        out.append(rest[: int(length)])
        rest = rest[int(length) :]
    assert out == msgs
    assert octet_frame(b"hello") == b"5 hello"
    assert octet_frame("é".encode()) == b"2 \xc3\xa9"  # octets, not characters


def test_empty_message_cannot_be_framed() -> None:
    with pytest.raises(ValueError):
        octet_frame(b"")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError):
        rfc5424_message(request(), fmt="csv", source_id="s", hostname="h")  # type: ignore[arg-type]
