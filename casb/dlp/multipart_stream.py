"""DLP on multipart/related bodies (STOW-RS uploads, WADO-RS retrievals) as they stream.

:class:`MultipartDicomStream` is the function mitmproxy calls per body chunk
(``flow.request.stream = stream`` / ``flow.response.stream = stream``; called with ``b""``
once at the end). It parses the incoming multipart incrementally with python-multipart and
re-emits a well-formed multipart with the SAME boundary, so the message's Content-Type
header stays valid:

* each kept part: its original part headers (minus Content-Length, as the body may change),
  then what DLP forwards. A part's headers go out only once its verdict is known, so a
  refused part leaves no trace in the output;
* then the close delimiter (alone when no part was kept).

Which parts are inspected:

* ``type="application/dicom"`` (or no type; STOW-RS instances, WADO-RS retrieval): EVERY
  part is read as a DICOM instance, whatever its Content-Type label says (a mislabelled part
  is still inspected); a part DLP cannot read is dropped, the others continue.
* ``type="application/dicom+json"`` (STOW-RS JSON + bulk data): parts labelled
  application/dicom+json are JSON arrays of datasets, buffered (``max_json_bytes``) and
  passed to ``inspector.inspect_json`` one dataset at a time; kept datasets are forwarded
  re-serialised, refused ones are reported. Parts labelled application/dicom are inspected
  as instances. Other parts (bulk data) pass through unchanged, except that (a) a part that
  starts like a DICOM file (preamble + "DICM") is inspected as an instance whatever its
  label, and (b) a bulk part whose Content-Location is a BulkDataURI of a dataset refused
  earlier in the body is dropped (bulk parts sent before their JSON cannot be recalled).

``mode`` ("request" / "response") does not change the machinery: refused or unreadable
parts are dropped from what the other side receives.

Outcome, after the end: :attr:`~MultipartDicomStream.results` (one :class:`PartResult` per
instance part / JSON dataset / bulk part), :attr:`~MultipartDicomStream.fatal` (framing
broken or an internal error: the reason, never quoting data), ``open_part_forwarded``
(bytes were sent on before the fatal error, so the output lacks its close delimiter: the
edge must cut the connection so the other side never sees a complete message),
``bytes_in``, ``bytes_out``, ``findings``, ``forwarded_count``, ``failed_count``.

Memory: one part at a time, bounded by ``max_header_bytes`` (or ``max_json_bytes``) plus
the chunk being handled, whatever the body size.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from casb.dlp.findings import Finding, InstanceError, Verdict
from casb.dlp.instance_stream import InstanceStream, cap_text
from casb.dlp.stow_response import FAILURE_BLOCKED, FAILURE_TOO_LARGE, FAILURE_UNREADABLE

MAX_PART_HEADER_BYTES: Final = 16 * 1024
_MAX_PART_HEADERS: Final = 64
_DICOM: Final = "application/dicom"
_DICOM_JSON: Final = "application/dicom+json"
# RFC 2046 5.1.1 boundary characters.
_BCHARS: Final = frozenset(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
)
_SNIFF: Final = 132  # preamble + "DICM"

# python-multipart logs parse errors with a quoted byte of the input: keep it quiet.
_QUIET = logging.getLogger("casb.dlp.multipart_stream.parser")
_QUIET.disabled = True

PartKind = Literal["dicom", "json", "bulk"]


class DicomInspector(Protocol):
    """The part of casb.dlp.inspector.Inspector this module uses."""

    def inspect(self, data: bytes, *, complete: bool) -> Verdict: ...

    def inspect_json(self, dataset: dict[str, Any]) -> tuple[dict[str, Any] | None, Verdict]: ...


@dataclass(slots=True)
class PartResult:
    """What happened to one instance (a DICOM part or one dataset of a JSON part), or to
    one bulk data part. ``failure_code`` (casb.dlp.stow_response) is set when an instance
    was not forwarded: blocked, unreadable or too large."""

    index: int  # the part's position in the body, from 0
    kind: PartKind
    verdict: Verdict | None = None
    error: str | None = None
    findings: tuple[Finding, ...] = ()
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    failure_code: int | None = None
    item: int | None = None  # the dataset's position in a JSON part

    @property
    def forwarded(self) -> bool:
        """An instance that went on (possibly de-identified)."""
        return (
            self.kind != "bulk"
            and self.failure_code is None
            and self.error is None
            and self.verdict is not None
            and self.verdict.action != "block"
        )


class _Fatal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _json_uid(dataset: dict[str, Any], tag: str) -> str:
    element = dataset.get(tag)
    if isinstance(element, dict):
        value = element.get("Value")
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0][:64]
    return ""


def _bulk_uris(dataset: dict[str, Any]) -> set[str]:
    """Every BulkDataURI in a DICOM JSON dataset (iterative: hostile nesting is fine)."""
    uris: set[str] = set()
    stack: list[Any] = [dataset]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            uri = node.get("BulkDataURI")
            if isinstance(uri, str):
                uris.add(uri)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return uris


class _Part:
    """One part's DLP handler: feed / finish return the bytes to send on."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.results: list[PartResult] = []

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        raise NotImplementedError

    def finish(self) -> list[bytes]:
        raise NotImplementedError

    def late_error(self) -> str | None:
        """A failure after bytes were emitted (cannot be hidden by dropping the part)."""
        return None


class _DicomPart(_Part):
    def __init__(self, index: int, inspector: DicomInspector, cap: int) -> None:
        super().__init__(index)
        self.stream = InstanceStream(
            lambda data, complete: inspector.inspect(data, complete=complete),
            max_header_bytes=cap,
        )

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        return self.stream.feed(data)

    def finish(self) -> list[bytes]:
        out = self.stream.finish()
        s = self.stream
        verdict = s.verdict
        findings = (verdict.findings if verdict is not None else ()) + tuple(s.findings)
        result = PartResult(
            index=self.index,
            kind="dicom",
            verdict=verdict,
            error=s.error,
            findings=findings,
            sop_class_uid=verdict.sop_class_uid if verdict is not None else "",
            sop_instance_uid=verdict.sop_instance_uid if verdict is not None else "",
        )
        if s.error is not None:
            too_large = s.error_kind == "too_large"
            result.failure_code = FAILURE_TOO_LARGE if too_large else FAILURE_UNREADABLE
        elif verdict is None or verdict.action == "block":
            result.failure_code = FAILURE_BLOCKED
        self.results.append(result)
        return out

    def late_error(self) -> str | None:
        return self.stream.error if self.stream.started else None


class _JsonPart(_Part):
    def __init__(
        self, index: int, inspector: DicomInspector, cap: int, refused_uris: set[str]
    ) -> None:
        super().__init__(index)
        self._inspector = inspector
        self._cap = cap
        self._buffer: bytearray | None = bytearray()
        self._refused_uris = refused_uris

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        if self._buffer is None:
            return []
        if len(self._buffer) + len(data) > self._cap:
            self._buffer = None
            self._fail(f"DICOM JSON part exceeds the {cap_text(self._cap)} cap", FAILURE_TOO_LARGE)
            return []
        self._buffer += data
        return []

    def _fail(self, reason: str, code: int) -> None:
        self.results.append(
            PartResult(index=self.index, kind="json", error=reason, failure_code=code)
        )

    def finish(self) -> list[bytes]:
        if self._buffer is None:
            return []
        raw = bytes(self._buffer)
        self._buffer = None
        try:
            datasets = json.loads(raw)
        except (ValueError, RecursionError):
            self._fail("DICOM JSON part is not valid JSON", FAILURE_UNREADABLE)
            return []
        if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
            self._fail("DICOM JSON part is not an array of datasets", FAILURE_UNREADABLE)
            return []
        kept: list[dict[str, Any]] = []
        for item, dataset in enumerate(datasets):
            result = PartResult(
                index=self.index,
                kind="json",
                item=item,
                sop_class_uid=_json_uid(dataset, "00080016"),
                sop_instance_uid=_json_uid(dataset, "00080018"),
            )
            try:
                forward, verdict = self._inspector.inspect_json(dataset)
            except InstanceError as exc:
                result.error = exc.reason
                result.failure_code = FAILURE_UNREADABLE
            else:
                result.verdict = verdict
                result.findings = verdict.findings
                result.sop_class_uid = verdict.sop_class_uid or result.sop_class_uid
                result.sop_instance_uid = verdict.sop_instance_uid or result.sop_instance_uid
                if forward is None or verdict.action == "block":
                    result.failure_code = FAILURE_BLOCKED
                else:
                    kept.append(forward)
            if result.failure_code is not None:
                self._refused_uris.update(_bulk_uris(dataset))
            self.results.append(result)
        if not kept:
            return []
        return [json.dumps(kept, separators=(",", ":")).encode("ascii")]


class _BulkPart(_Part):
    """Bulk data passes through; a part that starts like a DICOM file is inspected."""

    def __init__(self, index: int, make_dicom: Callable[[], _DicomPart], drop: bool) -> None:
        super().__init__(index)
        self._make_dicom = make_dicom
        self._head: bytearray | None = bytearray()  # first bytes, until sniffed
        self._dicom: _DicomPart | None = None
        self._drop = drop

    def _sniff(self, at_end: bool) -> list[bytes]:
        head = self._head
        assert head is not None
        if len(head) < _SNIFF and not at_end:
            return []
        self._head = None
        if len(head) >= _SNIFF and head[128:132] == b"DICM":
            self._dicom = self._make_dicom()
            return self._dicom.feed(bytes(head))
        return self._pass(bytes(head))

    def _pass(self, data: bytes) -> list[bytes]:
        if self._drop or not data:
            return []
        return [data]

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        if self._dicom is not None:
            return self._dicom.feed(data)
        if self._head is None:
            return self._pass(data if isinstance(data, bytes) else bytes(data))
        self._head += data
        return self._sniff(at_end=False)

    def finish(self) -> list[bytes]:
        out = self._sniff(at_end=True) if self._head is not None else []
        if self._dicom is not None:
            out += self._dicom.finish()
            self.results = self._dicom.results
            return out
        error = "bulk data of a refused instance" if self._drop else None
        self.results.append(PartResult(index=self.index, kind="bulk", error=error))
        return out

    def late_error(self) -> str | None:
        return self._dicom.late_error() if self._dicom is not None else None


def _header_value_ok(value: bytes) -> bool:
    return all(b == 0x09 or 0x20 <= b != 0x7F for b in value)


class MultipartDicomStream:
    """The mitmproxy stream function for a multipart/related DICOM body; see the module
    docstring. Construction raises ValueError for a Content-Type it cannot handle (not
    multipart/related, no or invalid boundary, unsupported ``type``); calls never raise."""

    def __init__(
        self,
        content_type: str,
        inspector: DicomInspector,
        *,
        max_header_bytes: int,
        max_json_bytes: int,
        mode: Literal["request", "response"],
    ) -> None:
        self.boundary, self.json_form = _parse_content_type(content_type)
        self.mode = mode
        self._inspector = inspector
        self._max_header = max_header_bytes
        self._max_json = max_json_bytes
        self._parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_count=_MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES + 1,
        )
        self._parser.logger = _QUIET
        self.results: list[PartResult] = []
        self.fatal: str | None = None
        self.open_part_forwarded = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._out: list[bytes] = []
        self._parts_seen = 0
        self._part: _Part | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._field = bytearray()
        self._value = bytearray()
        self._header_bytes = 0
        self._part_headers_sent = False
        self._any_part_sent = False
        self._in_headers = False  # reading a part's header section
        self._closed = False  # the close delimiter was emitted
        self._ended = False  # b"" received
        self._refused_uris: set[str] = set()

    # -- outcome ------------------------------------------------------------------------

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(f for r in self.results for f in r.findings)

    @property
    def ended(self) -> bool:
        """The end of the body (b"") has been seen."""
        return self._ended

    @property
    def forwarded_count(self) -> int:
        return sum(1 for r in self.results if r.forwarded)

    @property
    def failed_count(self) -> int:
        return sum(1 for r in self.results if r.failure_code is not None)

    @property
    def failures(self) -> list[PartResult]:
        """The results to report in a STOW-RS Failed SOP Sequence."""
        return [r for r in self.results if r.failure_code is not None]

    # -- the stream function ------------------------------------------------------------

    def __call__(self, data: bytes) -> list[bytes]:
        self.bytes_in += len(data)
        if self.fatal is not None or self._ended:
            self._ended = self._ended or not data
            return []
        self._out = []
        try:
            if data:
                self._parser.write(data)
            else:
                self._ended = True
                if not self._closed:
                    raise _Fatal("body ended before the closing boundary")
        except _Fatal as exc:
            return self._set_fatal(exc.reason)
        except MultipartParseError:
            return self._set_fatal(self._framing_reason())
        except Exception as exc:  # a bug: never let it escape into mitmproxy
            return self._set_fatal(f"internal error: {type(exc).__name__}")
        if not self._out:
            return []
        chunk = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out = []
        self.bytes_out += len(chunk)
        return [chunk]

    def _set_fatal(self, reason: str) -> list[bytes]:
        self.fatal = reason
        self.open_part_forwarded = self.bytes_out > 0 and not self._closed
        self._out = []
        self._part = None
        return []

    def _framing_reason(self) -> str:
        if self._parts_seen == 0:
            return "multipart body does not start with its boundary"
        if self._in_headers:
            return f"malformed or oversized headers in part {self._parts_seen - 1}"
        return f"malformed multipart framing in part {self._parts_seen - 1}"

    # -- python-multipart callbacks -----------------------------------------------------

    def _on_part_begin(self) -> None:
        self._parts_seen += 1
        self._part = None
        self._headers = []
        self._field.clear()
        self._value.clear()
        self._header_bytes = 0
        self._part_headers_sent = False
        self._in_headers = True

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise _Fatal(
                f"part {self._parts_seen - 1} header section exceeds "
                f"{MAX_PART_HEADER_BYTES // 1024} KiB"
            )

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        value = bytes(self._value).strip(b" \t")
        if not _header_value_ok(value):
            raise _Fatal(f"control characters in a header of part {self._parts_seen - 1}")
        self._headers.append((bytes(self._field), value))
        self._field.clear()
        self._value.clear()

    def _header(self, name: bytes) -> bytes | None:
        for field, value in self._headers:
            if field.lower() == name:
                return value
        return None

    def _on_headers_finished(self) -> None:
        self._in_headers = False
        index = self._parts_seen - 1
        if not self.json_form:
            self._part = self._new_dicom(index)
            return
        label = parse_options_header(self._header(b"content-type") or b"")[0]
        if label == _DICOM_JSON.encode():
            self._part = _JsonPart(index, self._inspector, self._max_json, self._refused_uris)
        elif label == _DICOM.encode():
            self._part = self._new_dicom(index)
        else:
            location = (self._header(b"content-location") or b"").decode("latin-1")
            drop = bool(location) and location in self._refused_uris
            self._part = _BulkPart(index, lambda: self._new_dicom(index), drop)

    def _new_dicom(self, index: int) -> _DicomPart:
        return _DicomPart(index, self._inspector, self._max_header)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:
            raise _Fatal(f"malformed multipart framing in part {self._parts_seen - 1}")
        chunk: bytes | memoryview = (
            data if start == 0 and end == len(data) else memoryview(data)[start:end]
        )
        self._send(part.feed(chunk))
        self._check_late(part)

    def _on_part_end(self) -> None:
        part = self._part
        if part is None:
            raise _Fatal(f"malformed multipart framing in part {self._parts_seen - 1}")
        self._send(part.finish())
        self._check_late(part)
        self.results.extend(part.results)
        self._part = None

    def _on_end(self) -> None:
        prefix = b"\r\n--" if self._any_part_sent else b"--"
        self._out.append(prefix + self.boundary + b"--\r\n")
        self._closed = True

    # -- output -------------------------------------------------------------------------

    def _check_late(self, part: _Part) -> None:
        reason = part.late_error()
        if reason is not None:
            if not part.results:
                part.finish()  # records the part's failure; its output is not sent
            self.results.extend(part.results)
            raise _Fatal(f"part {part.index}: {reason}")

    def _send(self, pieces: list[bytes]) -> None:
        if not pieces:
            return
        if not self._part_headers_sent:
            delimiter = b"\r\n--" if self._any_part_sent else b"--"
            lines = [delimiter + self.boundary + b"\r\n"]
            lines.extend(
                field + b": " + value + b"\r\n"
                for field, value in self._headers
                if field.lower() != b"content-length"
            )
            lines.append(b"\r\n")
            self._out.append(b"".join(lines))
            self._part_headers_sent = True
            self._any_part_sent = True
        self._out.extend(pieces)


def _parse_content_type(content_type: str) -> tuple[bytes, bool]:
    """(boundary, JSON+bulk data form?) from the message's Content-Type; ValueError."""
    for name in ("boundary", "type"):
        # parse_options_header keeps the last of repeated parameters; an upstream may take
        # the first and frame the body differently from what was inspected.
        if len(re.findall(rf"(?:^|;)\s*{name}\s*=", content_type, re.IGNORECASE)) > 1:
            raise ValueError(f"more than one {name} parameter in Content-Type")
    try:
        media, params = parse_options_header(content_type)
    except (AssertionError, UnicodeError) as exc:
        raise ValueError("unreadable Content-Type") from exc
    if media != b"multipart/related":
        raise ValueError("not a multipart/related body")
    lowered = {k.lower(): v for k, v in params.items()}
    boundary = lowered.get(b"boundary", b"")
    if not boundary:
        raise ValueError("multipart/related without a boundary")
    if len(boundary) > 70 or boundary.endswith(b" ") or not set(boundary) <= _BCHARS:
        raise ValueError("invalid multipart boundary")
    kind = lowered.get(b"type", b"").strip().lower()
    if kind in (b"", _DICOM.encode()):
        return boundary, False
    if kind == _DICOM_JSON.encode():
        return boundary, True
    raise ValueError("unsupported multipart/related type")
