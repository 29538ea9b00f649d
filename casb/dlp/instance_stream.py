"""One DICOM instance, pushed through DLP chunk by chunk.

:class:`InstanceStream` buffers an instance's header (everything before the top-level
Pixel Data element, found by :class:`~casb.dlp.boundary.PixelDataBoundary`) up to a cap,
asks the inspector once for a :class:`~casb.dlp.findings.Verdict`, then emits the verdict's
header followed by the original pixel data and Data Set Trailing Padding, passed through
unchanged as it arrives. Memory: the header cap plus the chunk being handled, whatever the
size of the pixel data.

Trailing data — any element after Pixel Data other than (FFFC,FFFC) padding — is never
forwarded: it is cut from the output and reported as a ``trailing_data`` finding, whatever
the verdict. That includes "forward" (alert-only profiles): alert mode audits findings but
must not let an inspector-dodging element reach the upstream, and the instance without the
trailing elements is still a valid instance.

Outcome (read after :meth:`InstanceStream.finish`): :attr:`verdict` (None when blocked
before a verdict or failed), :attr:`error` (a reason safe to audit, never quoting data),
:attr:`error_kind` (``"unreadable"`` or ``"too_large"``), :attr:`findings` (the extra
``trailing_data`` findings; the verdict's own findings are on the verdict), :attr:`bytes_in`,
:attr:`bytes_out`. Bad input never raises out of :meth:`feed` / :meth:`finish`: it is
recorded as the error. Only a bug (an inspector raising something other than
InstanceError) propagates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydicom.datadict import keyword_for_tag

from casb.dlp.boundary import PixelDataBoundary
from casb.dlp.findings import Finding, InstanceError, Verdict

InspectFn = Callable[[bytes, bool], Verdict]
ErrorKind = Literal["unreadable", "too_large"]

_MIB = 1024 * 1024


def cap_text(limit: int) -> str:
    """ "16 MiB" for whole mebibytes, else the byte count."""
    return f"{limit // _MIB} MiB" if limit % _MIB == 0 else f"{limit} bytes"


def _trailing_finding(tag: int | None) -> Finding:
    if tag is None:
        return Finding(rule="trailing_data", keyword="", tag="", path="(after PixelData)")
    text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    keyword = ""
    if (tag >> 16) % 2 == 0:  # public tags have a keyword; private ones never do
        keyword = keyword_for_tag(tag) or ""
    return Finding(rule="trailing_data", keyword=keyword, tag=text, path=keyword or text)


class InstanceStream:
    """Push-based DLP for one instance: ``feed(chunk) -> [bytes to send]``, ``finish()``."""

    def __init__(self, inspect: InspectFn, *, max_header_bytes: int) -> None:
        self._inspect = inspect
        self._cap = max_header_bytes
        self._walker = PixelDataBoundary()
        self._header: bytearray | None = bytearray()  # None once the header is decided
        self._held = b""  # passthrough bytes received but not yet confirmed (<= 12 bytes)
        self._out_pos = 0  # absolute offset up to which the input was emitted or dropped
        self._done = False  # blocked, failed or finished: ignore further input
        self.verdict: Verdict | None = None
        self.error: str | None = None
        self.error_kind: ErrorKind | None = None
        self.findings: list[Finding] = []
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def buffered(self) -> int:
        """Bytes held in memory right now (header buffer plus held-back bytes)."""
        return (len(self._header) if self._header is not None else 0) + len(self._held)

    @property
    def started(self) -> bool:
        """Something was emitted: a later error can no longer be hidden by dropping."""
        return self.bytes_out > 0

    @property
    def forwarded(self) -> bool:
        """The instance went (or is going) on: a verdict that was not a block, no error."""
        return self.verdict is not None and self.verdict.action != "block" and not self.error

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        size = len(data)
        if not size:
            return []
        self.bytes_in += size
        if self._done:
            return []
        base = self._walker.position
        try:
            self._walker.feed(data)
        except InstanceError as exc:
            return self._fail(exc.reason, "unreadable")
        if self._header is not None:
            return self._feed_header(data, base)
        return self._passthrough(data, base)

    def finish(self) -> list[bytes]:
        if self._done:
            return []
        try:
            self._walker.finish()
        except InstanceError as exc:
            return self._fail(exc.reason, "unreadable")
        out: list[bytes] = []
        if self._header is not None:
            # No Pixel Data (or an unwalkable syntax): the whole instance is the header.
            header = bytes(self._header)
            self._header = None
            out = self._decide(header, complete=True)
        elif not self._done:
            out = self._passthrough(b"", self._walker.position)
        self._note_trailing()
        self._done = True
        return out

    # -- header phase -------------------------------------------------------------------

    def _feed_header(self, data: bytes | bytearray | memoryview, base: int) -> list[bytes]:
        header_buf = self._header
        assert header_buf is not None
        split = self._walker.split
        too_large = f"DICOM header exceeds the {cap_text(self._cap)} cap"
        if split is None:
            if len(header_buf) + len(data) > self._cap:
                return self._fail(too_large, "too_large")
            header_buf += data
            return []
        if split > self._cap:
            return self._fail(too_large, "too_large")
        self._header = None
        self._out_pos = split
        if split <= base:
            # The Pixel Data tag began in an earlier chunk (a split element header).
            header = bytes(header_buf[:split])
            self._held = bytes(header_buf[split:])
            rest: bytes | bytearray | memoryview = data
            rest_base = base
        else:
            view = memoryview(data)
            header_buf += view[: split - base]
            header = bytes(header_buf)
            rest = view[split - base :]
            rest_base = split
        del header_buf
        out = self._decide(header, complete=False)
        if self._done:
            return out
        return out + self._passthrough(rest, rest_base)

    def _decide(self, header: bytes, *, complete: bool) -> list[bytes]:
        try:
            verdict = self._inspect(header, complete)
        except InstanceError as exc:
            return self._fail(exc.reason, "unreadable")
        self.verdict = verdict
        if verdict.action == "block":
            self._done = True
            return []
        if not verdict.header:
            return []
        self.bytes_out += len(verdict.header)
        return [verdict.header]

    # -- pixel data phase ---------------------------------------------------------------

    def _passthrough(self, data: bytes | bytearray | memoryview, base: int) -> list[bytes]:
        """Emit input bytes up to the walker's confirmed point.

        ``_held`` holds the input in [``_out_pos``, ``base``) and ``data`` starts at ``base``.
        Bytes not yet confirmed (a partial element header after the pixel data, at most 12
        bytes) stay held; bytes from the first trailing element on are dropped.
        """
        end = base + len(data)
        limit = min(self._walker.safe_end, end)
        held_base = base - len(self._held)
        out: list[bytes] = []
        if limit > self._out_pos:
            if self._held:
                out.append(self._held[: limit - held_base])
            start = max(self._out_pos, base)
            if limit > start:
                if start == base and limit == end and isinstance(data, bytes):
                    out.append(data)  # the whole chunk: no copy
                else:
                    out.append(bytes(memoryview(data)[start - base : limit - base]))
            self._out_pos = limit
        if self._walker.trailing_at is not None:
            self._held = b""  # never forwarded
            self._out_pos = end
        elif self._out_pos < end:
            keep: list[bytes] = []
            if self._out_pos < base:
                keep.append(self._held[self._out_pos - held_base :])
            keep.append(bytes(memoryview(data)[max(self._out_pos, base) - base :]))
            self._held = b"".join(keep)
        else:
            self._held = b""
        self.bytes_out += sum(len(b) for b in out)
        return out

    def _note_trailing(self) -> None:
        tags = self._walker.trailing_tags
        if self._walker.trailing_at is not None and not tags:
            tags = [None]
        self.findings.extend(_trailing_finding(tag) for tag in tags)

    def _fail(self, reason: str, kind: ErrorKind) -> list[bytes]:
        self.error = reason
        self.error_kind = kind
        self._done = True
        self._header = None
        self._held = b""
        return []
