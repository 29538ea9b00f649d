"""Where an instance's header ends: an incremental walker over DICOM element framing.

Fed successive chunks of ONE instance, :class:`PixelDataBoundary` finds the offset of the
first byte of the top-level Pixel Data element (7FE0,0010) — everything before it is the
"header" DLP inspects — and keeps walking over the pixel data and whatever follows it, so
the caller learns whether elements other than Data Set Trailing Padding (FFFC,FFFC) follow
Pixel Data ("trailing data", a way to smuggle private groups such as (7FE1,xxxx) past an
inspector that stops at the pixels).

Why hand-written: pydicom's reader pulls from a blocking file object, so it cannot be fed
chunks as they arrive on mitmproxy's event loop. This walker reads only tags, VRs and
lengths (never a value, except the Transfer Syntax UID in the file meta group); pydicom
parses the header bytes afterwards (casb.dlp.inspector). Where pydicom guesses (no file meta,
explicit/implicit VR switches at the start of a dataset or an item), the walker makes the
same guess so both agree on where elements start; where pydicom is lenient (unknown VRs, a
stray item delimiter at the top level, undefined lengths on ordinary elements) the walker
refuses the instance instead (fail closed).

Handled: 128-byte preamble + "DICM" + file meta group (explicit VR little endian; its
Transfer Syntax UID (0002,0010) selects the dataset encoding), meta without preamble,
neither (raw dataset: implicit vs explicit VR and byte order guessed from the first element
as pydicom does); explicit VR little/big endian, implicit VR little endian and every
encapsulated syntax pydicom knows. Deflated datasets and unknown transfer syntaxes cannot be
walked without inflating/guessing: :attr:`whole` is set and the whole instance is the
header (the caller buffers it, up to its cap, and pydicom reads it).

Nested content: defined-length sequences and items are skipped by their length (pydicom
checks them when it parses the header); undefined-length sequences, items and UN elements
(implicit VR little endian inside, PS3.5 6.2.2) are walked via the item / delimiter tags,
at most :data:`MAX_DEPTH` levels deep. In implicit VR an undefined length means a sequence.
Pixel data: a defined length is counted, never kept; encapsulated (undefined length) pixel
data is walked fragment by fragment to its sequence delimiter.

Every error is an :class:`~casb.dlp.findings.InstanceError` whose reason names offsets and
tags only, never a value. Work is O(bytes fed): no chunk is ever rescanned, and the only
bytes kept are the partial element header (at most 12 bytes), the first 132 bytes while
looking for the preamble, and the Transfer Syntax UID value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPIPHTJ2KReferencedDeflate
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from casb.dlp.findings import InstanceError

MAX_DEPTH: Final = 64
MAX_TRAILING_TAGS: Final = 32  # trailing elements recorded (the rest are only counted)

PIXEL_DATA: Final = 0x7FE00010
TRAILING_PADDING: Final = 0xFFFCFFFC
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_TS_TAG: Final = 0x00020010
_MAX_TS_LENGTH: Final = 256
_PREAMBLE_SIZE: Final = 132  # 128-byte preamble + "DICM"

_VRS: Final = frozenset(v.value.encode("ascii") for v in VR if len(v.value) == 2)
_LONG_VRS: Final = frozenset(v.value.encode("ascii") for v in EXPLICIT_VR_LENGTH_32)
# Datasets deflated as a whole: the walker cannot see their elements.
_DEFLATED: Final = frozenset(
    {DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95", JPIPHTJ2KReferencedDeflate}
)

_TAG = {True: struct.Struct("<HH"), False: struct.Struct(">HH")}
_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_U32 = {True: struct.Struct("<L"), False: struct.Struct(">L")}

# Walker states: what the next bytes are.
_PREAMBLE: Final = 0  # up to 132 bytes: preamble + "DICM", or the dataset itself
_META: Final = 1  # an element header (8 bytes) in the file meta group
_META_EXT: Final = 2  # the 4-byte length of a meta element with a long VR
_TS_VALUE: Final = 3  # the Transfer Syntax UID value
_ELEMENT: Final = 4  # an element or item header (8 bytes) in the dataset
_ELEMENT_EXT: Final = 5  # the 4-byte length of an element with a long VR
_WHOLE: Final = 6  # unwalkable syntax: count bytes only
_SWALLOW: Final = 7  # unparseable trailing data: count bytes only

# Kinds of open containers (all of undefined length: defined ones are skipped).
_SEQUENCE: Final = 0  # items or a sequence delimiter follow
_ITEM_DATASET: Final = 1  # elements or an item delimiter follow
_FRAGMENTS: Final = 2  # encapsulated pixel data: fragment items or a sequence delimiter


def _looks_explicit(vr: bytes) -> bool:
    """pydicom's test for an explicit VR: two characters in the range A-Z."""
    return 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(slots=True)
class _Frame:
    kind: int
    implicit: bool
    little: bool
    top_pixels: bool = False  # the top-level encapsulated Pixel Data
    first: bool = True  # no element read yet (pydicom's implicit-VR switch check)


class PixelDataBoundary:
    """Incremental element walker for one instance; see the module docstring.

    Call :meth:`feed` with successive chunks and :meth:`finish` at the end of the input;
    both raise :class:`InstanceError` for input that is not a well-framed instance
    (except inside trailing data, which is only recorded). Offsets are absolute (from the
    first byte fed).
    """

    def __init__(self) -> None:
        self.position = 0  # bytes fed so far
        self.split: int | None = None  # offset of the top-level (7FE0,0010) tag
        self.pixel_end: int | None = None  # offset just past the Pixel Data element
        self.trailing_at: int | None = None  # offset of the first trailing element
        self.trailing_tags: list[int | None] = []  # None: unparseable trailing bytes
        self.whole = False  # deflated / unknown syntax: the whole instance is header
        self.transfer_syntax: str | None = None  # from the file meta group, if any
        self._state = _PREAMBLE
        self._need = _PREAMBLE_SIZE
        self._token = bytearray()
        self._token_start = 0
        self._skip = 0
        self._stack: list[_Frame] = []
        self._implicit = False
        self._little = True
        self._top_first = True  # first top-level element not seen yet
        self._after_pixels = False
        self._finished = False
        # an element header whose 4-byte length is still to come
        self._ext_tag = 0
        self._ext_vr = b""
        self._ext_start = 0
        self._fed_before = 0  # position at the start of the current feed()
        self._header_start = 0  # offset of the element header being interpreted

    # -- public -------------------------------------------------------------------------

    @property
    def safe_end(self) -> int:
        """Bytes before this offset are confirmed pixel data / trailing padding (or header).

        Only meaningful once :attr:`split` is known: the caller may forward bytes up to
        here. A partial element header is held back until it is understood, and nothing
        from the first trailing element on is ever safe.
        """
        if self.trailing_at is not None:
            return self.trailing_at
        if self._state == _ELEMENT_EXT:
            return self._ext_start
        if self._token:
            return self._token_start
        return self.position

    @property
    def trailing(self) -> bool:
        return self.trailing_at is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._finished:
            raise InstanceError("data after the end of the instance")
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self._fed_before = self.position
        try:
            self._walk(view)
        except InstanceError as exc:
            self._recover(exc)
            self.position = self._fed_before + len(view)

    def finish(self) -> None:
        """The input ended: raise if it ended inside the header or the pixel data."""
        if self._finished:
            return
        self._finished = True
        if self._state == _PREAMBLE:
            try:
                self._resolve_preamble()
            except InstanceError as exc:
                self._recover(exc)
        if self.position == 0:
            raise InstanceError("empty instance")
        if self._state in (_WHOLE, _SWALLOW) or self.trailing_at is not None:
            return
        if self._after_pixels and self._token and not self._stack:
            # fewer bytes than an element header after the pixel data: trailing garbage
            self._mark_trailing(self._token_start, None)
            return
        if self._token or self._skip or self._state in (_META_EXT, _TS_VALUE, _ELEMENT_EXT):
            if self.split is None:
                where = "header"
            elif self.pixel_end is None or self.position < self.pixel_end:
                where = "pixel data"
            else:
                where = "trailing padding"
            raise InstanceError(f"instance truncated inside the {where} at offset {self.position}")
        if self._stack:
            what = "encapsulated pixel data" if self._stack[0].top_pixels else "a sequence"
            raise InstanceError(f"instance ends inside {what} at offset {self.position}")

    # -- the walk -----------------------------------------------------------------------

    def _walk(self, view: memoryview) -> None:
        i = 0
        n = len(view)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                self.position += take
                continue
            if self._state >= _WHOLE:
                self.position += n - i
                return
            need = self._need - len(self._token)
            if not self._token:
                self._token_start = self.position
            if not self._token and n - i >= need:
                token = view[i : i + need].tobytes()
            else:
                take = min(need, n - i)
                self._token += view[i : i + take]
                i += take
                self.position += take
                if len(self._token) < self._need:
                    return
                token = bytes(self._token)
                self._token.clear()
                self._on_token(token)
                continue
            i += need
            self.position += need
            self._on_token(token)

    def _recover(self, exc: InstanceError) -> None:
        """A framing error is fatal before the end of the pixel data; after it, the rest
        is unparseable trailing data (stripped by the caller), recorded and counted."""
        if self.pixel_end is None:
            raise exc
        if self.trailing_at is None:
            self.trailing_at = self._header_start
        if not self.trailing_tags or self.trailing_tags[-1] is not None:
            self._record_trailing(None)
        self._state = _SWALLOW
        self._token.clear()
        self._skip = 0
        self._stack.clear()

    def _on_token(self, token: bytes) -> None:
        state = self._state
        if state == _ELEMENT:
            self._on_element_header(token)
        elif state == _ELEMENT_EXT:
            self._state = _ELEMENT
            self._need = 8
            length = _U32[self._frame_little()].unpack(token)[0]
            self._on_element(self._ext_tag, self._ext_vr, length, self._ext_start)
        elif state == _PREAMBLE:
            self._resolve_preamble(token)
        elif state == _META:
            self._on_meta_header(token)
        elif state == _META_EXT:
            self._state = _META
            self._need = 8
            self._on_meta_value(self._ext_tag, _U32[True].unpack(token)[0])
        elif state == _TS_VALUE:
            self.transfer_syntax = token.decode("ascii", "replace").rstrip("\0 ")
            self._state = _META
            self._need = 8

    # -- preamble and file meta ---------------------------------------------------------

    def _resolve_preamble(self, token: bytes | None = None) -> None:
        """132 bytes (or the whole, shorter, input) are in: preamble + "DICM", or not."""
        data = token if token is not None else bytes(self._token)
        self._token.clear()
        self._state = _META
        self._need = 8
        if len(data) == _PREAMBLE_SIZE and data[128:132] == b"DICM":
            return
        # No preamble: walk these bytes again as the start of the meta group / dataset.
        self.position -= len(data)
        self._walk(memoryview(data))

    def _on_meta_header(self, token: bytes) -> None:
        group, elem = _TAG[True].unpack_from(token)
        if group != 0x0002:
            # The meta group is over: this token is the dataset's first element header.
            self._begin_dataset(token)
            return
        tag = group << 16 | elem
        vr = token[4:6]
        if vr not in _VRS or vr == b"SQ":
            raise InstanceError(f"invalid VR in the file meta group at offset {self._token_start}")
        if vr in _LONG_VRS:
            self._ext_tag = tag
            self._state = _META_EXT
            self._need = 4
            return
        self._on_meta_value(tag, _U16[True].unpack_from(token, 6)[0])

    def _on_meta_value(self, tag: int, length: int) -> None:
        if length == _UNDEFINED:
            raise InstanceError(f"undefined length in the file meta group {_tag_text(tag)}")
        if tag == _TS_TAG:
            if length > _MAX_TS_LENGTH:
                raise InstanceError("transfer syntax UID is implausibly long")
            if length:
                self._state = _TS_VALUE
                self._need = length
            return
        self._skip = length

    def _begin_dataset(self, first_header: bytes) -> None:
        """The file meta group (if any) is over; choose the dataset encoding."""
        ts = self.transfer_syntax
        if ts is not None:
            uid = UID(ts)
            if ts in _DEFLATED or not uid.is_transfer_syntax:
                self.whole = True
                self._state = _WHOLE
                return
            self._implicit = bool(uid.is_implicit_VR)
            self._little = bool(uid.is_little_endian)
        else:
            # No transfer syntax: guess from the first element, as pydicom does.
            group = _U16[True].unpack_from(first_header)[0]
            vr = first_header[4:6]
            if vr in _VRS:
                self._implicit = False
                self._little = group < 1024
            else:
                self._implicit = True
                self._little = True
        self._state = _ELEMENT
        self._need = 8
        self._on_element_header(first_header)

    # -- dataset elements ---------------------------------------------------------------

    def _frame_little(self) -> bool:
        return self._stack[-1].little if self._stack else self._little

    def _on_element_header(self, token: bytes) -> None:
        start = self._header_start = self._token_start
        frame = self._stack[-1] if self._stack else None
        if frame is not None:
            implicit, little = frame.implicit, frame.little
        else:
            implicit, little = self._implicit, self._little
        group, elem = _TAG[little].unpack_from(token)
        tag = group << 16 | elem
        if frame is not None and frame.kind != _ITEM_DATASET:
            self._on_item_tag(frame, tag, _U32[little].unpack_from(token, 4)[0], start)
            return
        if group == 0xFFFE:
            length = _U32[little].unpack_from(token, 4)[0]
            if tag == _ITEM_END and frame is not None:
                if length != 0:
                    raise InstanceError(f"item delimiter with a non-zero length at offset {start}")
                self._stack.pop()
                return
            raise InstanceError(f"unexpected item tag {_tag_text(tag)} at offset {start}")
        implicit = self._check_vr_switch(frame, implicit, token[4:6])
        if frame is not None:
            frame.first = False
        if implicit:
            self._on_element(tag, b"", _U32[little].unpack_from(token, 4)[0], start)
            return
        vr = token[4:6]
        if vr not in _VRS:
            raise InstanceError(f"invalid VR for element {_tag_text(tag)} at offset {start}")
        if vr in _LONG_VRS:
            self._ext_tag, self._ext_vr, self._ext_start = tag, vr, start
            self._state = _ELEMENT_EXT
            self._need = 4
            return
        self._on_element(tag, vr, _U16[little].unpack_from(token, 6)[0], start)

    def _check_vr_switch(self, frame: _Frame | None, implicit: bool, vr: bytes) -> bool:
        """pydicom re-decides implicit/explicit VR on the first element of the top-level
        dataset and of each item (an implicit item may sit in an explicit sequence); the
        walker follows it so both agree on element boundaries."""
        if frame is None:
            if not self._top_first or self._after_pixels:
                return implicit
            self._top_first = False
            found_implicit = not _looks_explicit(vr)
            if found_implicit != implicit:
                self._implicit = implicit = found_implicit
            return implicit
        if frame.first and not implicit and not _looks_explicit(vr):
            frame.implicit = True
            return True
        return implicit

    def _on_element(self, tag: int, vr: bytes, length: int, start: int) -> None:
        top = not self._stack
        if top and self._after_pixels:
            if tag != TRAILING_PADDING or length == _UNDEFINED:
                self._mark_trailing(start, tag)
        elif top and tag == PIXEL_DATA:
            self.split = start
            self._after_pixels = True
            if length == _UNDEFINED:
                self._push(_Frame(_FRAGMENTS, self._implicit, self._little, top_pixels=True))
            else:
                self.pixel_end = self.position + length
                self._skip = length
            return
        if length != _UNDEFINED:
            if vr == b"SQ" and length % 2:
                raise InstanceError(f"odd sequence length for {_tag_text(tag)} at offset {start}")
            self._skip = length
            return
        frame = self._stack[-1] if self._stack else None
        implicit = frame.implicit if frame is not None else self._implicit
        little = frame.little if frame is not None else self._little
        if tag == PIXEL_DATA:  # nested (icon image) encapsulated pixel data
            self._push(_Frame(_FRAGMENTS, implicit, little))
        elif implicit or vr == b"SQ":
            self._push(_Frame(_SEQUENCE, implicit, little))
        elif vr == b"UN":
            self._push(_Frame(_SEQUENCE, True, True))  # PS3.5 6.2.2: implicit VR LE inside
        else:
            raise InstanceError(f"undefined length on element {_tag_text(tag)} at offset {start}")

    def _on_item_tag(self, frame: _Frame, tag: int, length: int, start: int) -> None:
        if tag == _SEQUENCE_END:
            if length != 0:
                raise InstanceError(f"sequence delimiter with a non-zero length at offset {start}")
            self._stack.pop()
            if frame.top_pixels:
                self.pixel_end = self.position
            return
        if tag != _ITEM:
            raise InstanceError(f"expected an item tag, found {_tag_text(tag)} at offset {start}")
        if length == _UNDEFINED:
            if frame.kind == _FRAGMENTS:
                raise InstanceError(f"pixel data fragment of undefined length at offset {start}")
            self._push(_Frame(_ITEM_DATASET, frame.implicit, frame.little))
            return
        if length % 2 and frame.kind == _SEQUENCE:
            raise InstanceError(f"odd item length at offset {start}")
        self._skip = length

    def _push(self, frame: _Frame) -> None:
        if len(self._stack) >= MAX_DEPTH:
            raise InstanceError(f"sequences nested deeper than {MAX_DEPTH} levels")
        self._stack.append(frame)

    # -- trailing data ------------------------------------------------------------------

    def _mark_trailing(self, start: int, tag: int | None) -> None:
        if self.trailing_at is None:
            self.trailing_at = start
        self._record_trailing(tag)

    def _record_trailing(self, tag: int | None) -> None:
        if len(self.trailing_tags) < MAX_TRAILING_TAGS:
            self.trailing_tags.append(tag)
