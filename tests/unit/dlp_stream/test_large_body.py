"""A 200 MB STOW-RS body streams through with memory bounded by the header cap."""

from __future__ import annotations

import hashlib
import random
import struct
import tracemalloc
from collections.abc import Iterator

from casb.dlp.multipart_stream import MultipartDicomStream

from . import BOUNDARY, StandInInspector, base_dataset, encode

PIXEL_BYTES = 200 * 1024 * 1024
CHUNK = 64 * 1024
CAP = 1024 * 1024


def body_chunks(pixel_bytes: int = PIXEL_BYTES) -> Iterator[bytes]:
    """A one-instance multipart body, generated lazily (never held whole)."""
    header = encode(base_dataset())
    pixel_element = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<L", pixel_bytes)
    head = b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\n"
    yield head + header + pixel_element
    block = random.Random(5).randbytes(CHUNK)
    left = pixel_bytes
    while left:
        piece = block if left >= CHUNK else block[:left]
        left -= len(piece)
        yield piece
    yield b"\r\n--" + BOUNDARY + b"--\r\n"


def test_200_mb_body_streams_with_bounded_memory() -> None:
    stream = MultipartDicomStream(
        f"multipart/related; type=application/dicom; boundary={BOUNDARY.decode()}",
        StandInInspector(),
        max_header_bytes=CAP,
        max_json_bytes=CAP,
        mode="request",
    )
    sent_in = hashlib.sha256()
    sent_out = hashlib.sha256()
    total_in = 0
    tracemalloc.start()
    try:
        for chunk in body_chunks():
            sent_in.update(chunk)
            total_in += len(chunk)
            for piece in stream(chunk):
                sent_out.update(piece)
        for piece in stream(b""):
            sent_out.update(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stream.fatal is None
    assert stream.forwarded_count == 1
    assert stream.bytes_in == total_in > PIXEL_BYTES
    assert stream.bytes_out == total_in  # nothing to change: the same bytes
    assert sent_out.digest() == sent_in.digest()
    assert peak < CAP + 4 * 1024 * 1024, peak
