"""The form fields of an S3 browser POST upload (PostObject), read before anything moves.

A PostObject body is multipart/form-data: the fields (``key``, ``policy``,
``x-amz-server-side-encryption``, ``Content-Type``, ``x-amz-meta-*``...) come first, then
the ``file`` part; S3 ignores parts after it. What the upload does (which key, which
encryption) is therefore known once the ``file`` part's headers have been read, and the
proxy must decide before a single byte reaches the bucket.

:class:`PostObjectFields` is push-based: it holds every byte until the ``file`` part's
headers are parsed (at most :data:`MAX_FIELD_BYTES` of fields), then calls ``on_fields``
with the fields and only after it returns hands the held bytes back; from then on data
passes straight through, unparsed. The bytes handed out are exactly the bytes received:
nothing is re-serialised, so what the bucket parses is what was inspected.

Where a parser mismatch could let the bucket see a field the proxy did not, the form is
refused (:class:`FormUploadError`, reasons never quote the body): a repeated field
(names compared case-insensitively), a part without a form-data Content-Disposition and a
name, repeated or RFC 2231 (``name*=``) parameters, backslash escapes in quoted
parameters, a field named like ``file`` in another case, fields or a key that are not
UTF-8, no ``key`` field before the file, no ``file`` part before the body ends.

``key`` is the object key S3 will use: the ``key`` field with ``${filename}`` replaced by
the file part's filename (a filename holding a path separator is refused there, since
S3's handling of it is not documented).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Final, Literal

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

MAX_FIELD_BYTES: Final = 64 * 1024
_MAX_PART_HEADERS: Final = 16
_FILE: Final = "file"
_FILENAME_VAR: Final = "${filename}"
# RFC 2046 5.1.1 boundary characters.
_BCHARS: Final = frozenset(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
)
_TYPE = re.compile(r"\s*multipart/form-data\s*(?:;(.*))?", re.IGNORECASE | re.DOTALL)
_DISPOSITION = re.compile(r"\s*form-data\s*(?:;(.*))?", re.IGNORECASE | re.DOTALL)
_PARAM = re.compile(
    r'\s*([A-Za-z0-9_\-]+)\s*=\s*(?:"([^"\\\r\n]*)"|([^\s;"\\]+))\s*(?:;|$)', re.DOTALL
)

# python-multipart logs parse errors quoting a byte of the input: keep it quiet.
_QUIET = logging.getLogger("casb.objectstore.form_upload.parser")
_QUIET.disabled = True


class FormUploadError(Exception):
    """The POST form cannot be read safely; ``reason`` is safe to show a client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Released(Exception):
    """Raised from the parser callback once the file part's headers are known."""


def _params(text: str, what: str) -> dict[str, str]:
    """Parameters of a Content-Type / Content-Disposition value (lower-cased names);
    FormUploadError on anything a stricter or laxer parser could read differently:
    repeated names, ``name*=`` (RFC 2231) forms, backslash escapes, stray characters."""
    params: dict[str, str] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _PARAM.match(text, pos)
        if match is None or match.end() == pos:
            raise FormUploadError(f"malformed {what} parameters")
        name = match.group(1).lower()
        if name in params:
            raise FormUploadError(f"repeated {what} parameter")
        params[name] = match.group(2) if match.group(2) is not None else match.group(3)
        pos = match.end()
    return params


def parse_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; FormUploadError otherwise."""
    match = _TYPE.fullmatch(content_type)
    if match is None:
        raise FormUploadError("not a multipart/form-data body")
    params = _params(match.group(1) or "", "Content-Type")
    try:
        boundary = params.get("boundary", "").encode("ascii")
    except UnicodeEncodeError as exc:
        raise FormUploadError("invalid multipart boundary") from exc
    if not boundary:
        raise FormUploadError("multipart/form-data without a boundary")
    if len(boundary) > 70 or boundary.endswith(b" ") or not set(boundary) <= _BCHARS:
        raise FormUploadError("invalid multipart boundary")
    return boundary


class PostObjectFields:
    """Holds a PostObject body until its fields are known; see the module docstring.

    ``feed(data)`` returns the bytes that may be forwarded; ``feed(b"")`` (or
    :meth:`finish`) marks the end of the body. Construction raises FormUploadError for a
    Content-Type that is not multipart/form-data with one valid boundary. After an error
    (from this class or from ``on_fields``) every later call raises FormUploadError.
    """

    def __init__(
        self,
        content_type: str,
        on_fields: Callable[[dict[str, str]], None],
        *,
        max_field_bytes: int = MAX_FIELD_BYTES,
    ) -> None:
        self.boundary = parse_boundary(content_type)
        self._on_fields = on_fields
        self._cap = max_field_bytes
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
            max_header_size=max_field_bytes,
        )
        self._parser.logger = _QUIET
        self._state: Literal["holding", "passing", "failed"] = "holding"
        self._held: list[bytes] = []
        self._held_size = 0
        self._counted = 0  # field header + value bytes seen by the callbacks
        self._fields: dict[str, str] = {}
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._name: str | None = None
        self._value = bytearray()
        self._filename: str | None = None
        self._key: str | None = None

    # -- outcome ----------------------------------------------------------------------

    @property
    def released(self) -> bool:
        """The fields are known and ``on_fields`` accepted them: data passes through."""
        return self._state == "passing"

    @property
    def fields(self) -> dict[str, str]:
        """The form fields before the file part (lower-cased names); empty until known."""
        return dict(self._fields) if self._state == "passing" else {}

    @property
    def key(self) -> str | None:
        """The object key S3 will store (``${filename}`` substituted); None until known."""
        return self._key if self._state == "passing" else None

    @property
    def filename(self) -> str | None:
        """The file part's filename parameter, if it had one."""
        return self._filename

    # -- input ------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[bytes]:
        """The bytes that may be forwarded now (all held bytes at once when the fields
        become known); ``b""`` is the end of the body."""
        if self._state == "failed":
            raise FormUploadError("form upload already failed")
        if self._state == "passing":
            return [data] if data else []
        if not data:
            self._state = "failed"
            raise FormUploadError("form upload without a file field")
        self._held.append(data)
        self._held_size += len(data)
        try:
            self._parser.write(data)
        except _Released:
            return self._release()
        except FormUploadError:
            self._state = "failed"
            raise
        except MultipartParseError as exc:
            self._state = "failed"
            raise FormUploadError("malformed multipart form") from exc
        except Exception as exc:  # a parser bug: fail closed, never pass the body on
            self._state = "failed"
            raise FormUploadError(f"internal error: {type(exc).__name__}") from exc
        if self._held_size > self._cap:
            self._state = "failed"
            raise FormUploadError(f"form fields exceed {self._cap // 1024} KiB")
        return []

    def finish(self) -> list[bytes]:
        """The end of the body (same as ``feed(b"")``)."""
        return self.feed(b"")

    def _release(self) -> list[bytes]:
        self._state = "failed"  # until on_fields accepted the fields
        key = self._fields.get("key")
        if key is None:
            raise FormUploadError("no key field before the file field")
        if _FILENAME_VAR in key:
            name = self._filename
            if name is None:
                raise FormUploadError("key uses ${filename} but the file has no filename")
            if "/" in name or "\\" in name:
                raise FormUploadError("key uses ${filename} and the filename holds a path")
            key = key.replace(_FILENAME_VAR, name)
        self._key = key
        self._on_fields(dict(self._fields))
        self._state = "passing"
        held = b"".join(self._held)
        self._held = []
        return [held] if held else []

    # -- python-multipart callbacks -----------------------------------------------------

    def _count(self, size: int) -> None:
        self._counted += size
        if self._counted > self._cap:
            raise FormUploadError(f"form fields exceed {self._cap // 1024} KiB")

    def _on_part_begin(self) -> None:
        self._headers = []
        self._header_field.clear()
        self._header_value.clear()
        self._name = None
        self._value.clear()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers.append((bytes(self._header_field).lower(), bytes(self._header_value)))
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        dispositions = [v for f, v in self._headers if f == b"content-disposition"]
        if len(dispositions) != 1:
            raise FormUploadError("a form part needs exactly one Content-Disposition")
        try:
            raw = dispositions[0].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormUploadError("form part header is not UTF-8") from exc
        match = _DISPOSITION.fullmatch(raw)
        if match is None:
            raise FormUploadError("form part is not form-data")
        params = _params(match.group(1) or "", "Content-Disposition")
        name = params.get("name")
        if not name:
            raise FormUploadError("form part without a name")
        if name == _FILE:
            self._filename = params.get("filename")
            raise _Released
        lowered = name.lower()
        if lowered == _FILE:
            raise FormUploadError("form field named like file in another case")
        if lowered in self._fields:
            raise FormUploadError("form field sent twice")
        self._name = lowered

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _on_part_end(self) -> None:
        if self._name is None:
            raise FormUploadError("malformed multipart form")
        try:
            value = bytes(self._value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormUploadError("form field is not UTF-8") from exc
        self._fields[self._name] = value
        self._name = None
        self._value.clear()

    def _on_end(self) -> None:
        raise FormUploadError("form upload without a file field")
