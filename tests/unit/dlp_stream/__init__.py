"""Tests of casb.dlp streaming (boundary walker, instance stream, multipart, STOW-RS answers).

Shared pieces: DICOM instance builders (pydicom, at test time; no patient data is real),
chunkers, a multipart builder/parser, and a stand-in inspector used alongside the real
casb.dlp.inspector.Inspector (when it exists). Both block an instance whose Burned In
Annotation (0028,0301) is "YES" and forward the rest unchanged.
"""

from __future__ import annotations

import importlib.util
import io
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from python_multipart.multipart import MultipartParser

from casb.dlp.findings import Finding, InstanceError, Verdict
from casb.dlp.profile import DlpProfile, DlpSettings

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BOUNDARY = b"casb-test-boundary-42"
CHUNKINGS = ("one", "bytes", "random")


# -- DICOM instances ------------------------------------------------------------------------


def base_dataset(*, burned: str = "NO", name: str = "Doe^Jane") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = "PID-0001"
    ds.BurnedInAnnotation = burned
    ds.Rows = 4
    ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def undefined_length_sequence(ds: Dataset) -> None:
    """A nested, undefined-length sequence with undefined-length items."""
    inner = Dataset()
    inner.CodeValue = "X1"
    inner.CodingSchemeDesignator = "99TEST"
    inner.is_undefined_length_sequence_item = True
    item = Dataset()
    item.ReferencedSOPClassUID = SECONDARY_CAPTURE
    item.ReferencedSOPInstanceUID = generate_uid()
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = Sequence([item, item])
    ds["ReferencedImageSequence"].is_undefined_length = True


def encode(
    ds: Dataset,
    syntax: str = ExplicitVRLittleEndian,
    *,
    preamble: bool = True,
    meta: bool = True,
) -> bytes:
    """``ds`` written in ``syntax``: with preamble + meta, meta only, or a raw dataset."""
    buf = io.BytesIO()
    if meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        return data if preamble else data[132:]
    pydicom.dcmwrite(
        buf,
        ds,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=syntax != ExplicitVRBigEndian,
    )
    return buf.getvalue()


def pixel_bytes(size: int = 64, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Built:
    data: bytes  # the whole instance
    split: int | None  # where the Pixel Data tag starts


def instance(
    syntax: str = ExplicitVRLittleEndian,
    *,
    preamble: bool = True,
    meta: bool = True,
    burned: str = "NO",
    pixels: bytes | None = None,
    fragments: list[bytes] | None = None,
    nested: bool = False,
    after: Callable[[Dataset], None] | None = None,
) -> Built:
    """An instance plus the offset of its Pixel Data tag (the length of the same instance
    written without pixel data). ``after`` may add elements after Pixel Data only."""
    ds = base_dataset(burned=burned)
    if nested:
        undefined_length_sequence(ds)
    header = encode(ds, syntax, preamble=preamble, meta=meta)
    if fragments is not None:
        ds.PixelData = encapsulate(fragments)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = pixels if pixels is not None else pixel_bytes()
        ds["PixelData"].VR = "OW"
    if after is not None:
        after(ds)
    data = encode(ds, syntax, preamble=preamble, meta=meta)
    if syntax == DeflatedExplicitVRLittleEndian:
        return Built(data, None)
    assert data.startswith(header)
    return Built(data, len(header))


def jpeg_instance(**kwargs: Any) -> Built:
    return instance(
        JPEGBaseline8Bit, fragments=[b"\xff\xd8frame-1\xff\xd9", b"\xff\xd8f2\xff\xd9"], **kwargs
    )


# -- chunking -------------------------------------------------------------------------------


def chunks(data: bytes, how: str, seed: int = 1234) -> Iterator[bytes]:
    if how == "one":
        yield data
    elif how == "bytes":
        for i in range(len(data)):
            yield data[i : i + 1]
    else:
        rng = random.Random(seed)
        i = 0
        while i < len(data):
            size = rng.choice((1, 2, 3, 5, 7, 8, 11, 13, 64, 131, 1000, 4096))
            yield data[i : i + size]
            i += size


# -- inspectors -----------------------------------------------------------------------------


def _burned_finding() -> Finding:
    return Finding(
        rule="burned_in_annotation.yes",
        keyword="BurnedInAnnotation",
        tag="(0028,0301)",
        path="BurnedInAnnotation",
    )


@dataclass
class StandInInspector:
    """Same methods as casb.dlp.inspector.Inspector: blocks Burned In Annotation = YES."""

    calls: list[tuple[int, bool]] = field(default_factory=list)

    def inspect(self, data: bytes, *, complete: bool) -> Verdict:
        self.calls.append((len(data), complete))
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            burned = ds.get("BurnedInAnnotation")
            sop_class = str(ds.get("SOPClassUID", ""))
            sop_instance = str(ds.get("SOPInstanceUID", ""))
        except Exception as exc:
            raise InstanceError(f"unreadable header ({type(exc).__name__})") from None
        if not sop_instance:
            raise InstanceError("no SOP Instance UID")
        if burned == "YES":
            return Verdict(
                "block",
                (_burned_finding(),),
                b"",
                sop_class,
                sop_instance,
                ("burned_in_annotation.yes",),
            )
        return Verdict("forward", (), data, sop_class, sop_instance)

    def inspect_json(self, dataset: dict[str, Any]) -> tuple[dict[str, Any] | None, Verdict]:
        def value(tag: str) -> Any:
            return (dataset.get(tag) or {}).get("Value", [None])[0]

        if value("00080018") is None:
            raise InstanceError("no SOP Instance UID")
        uids = (str(value("00080016") or ""), str(value("00080018")))
        if value("00280301") == "YES":
            verdict = Verdict("block", (_burned_finding(),), b"", *uids)
            return None, verdict
        return dataset, Verdict("forward", (), b"", *uids)


def inspector_names() -> list[str]:
    names = ["stand-in"]
    if importlib.util.find_spec("casb.dlp.inspector") is not None:
        names.append("real")
    return names


def make_inspector(name: str) -> Any:
    if name == "stand-in":
        return StandInInspector()
    from casb.dlp.inspector import Inspector  # type: ignore[import-not-found,unused-ignore]

    profile = DlpProfile(block=["burned_in_annotation.yes"])
    return Inspector(profile, DlpSettings(), uid_key=b"casb-test-uid-key-0123456789abcdef")


# -- multipart ------------------------------------------------------------------------------


def multipart(
    parts: Iterable[tuple[list[tuple[str, str]], bytes]], boundary: bytes = BOUNDARY
) -> bytes:
    out = []
    for headers, body in parts:
        out.append(b"--" + boundary + b"\r\n")
        out.extend(f"{k}: {v}\r\n".encode() for k, v in headers)
        out.append(b"\r\n" + body + b"\r\n")
    out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out)


def dicom_part(
    data: bytes, label: str = "application/dicom"
) -> tuple[list[tuple[str, str]], bytes]:
    return [("Content-Type", label)], data


@dataclass
class ParsedPart:
    headers: list[tuple[bytes, bytes]]
    body: bytes


def parse_multipart(body: bytes, boundary: bytes = BOUNDARY) -> list[ParsedPart]:
    """Parse a whole multipart body back (python-multipart); asserts it is complete."""
    parts: list[ParsedPart] = []
    state: dict[str, Any] = {"field": b"", "value": b"", "ended": False}

    def on_part_begin() -> None:
        parts.append(ParsedPart([], b""))

    def on_header_field(d: bytes, s: int, e: int) -> None:
        state["field"] += d[s:e]

    def on_header_value(d: bytes, s: int, e: int) -> None:
        state["value"] += d[s:e]

    def on_header_end() -> None:
        parts[-1].headers.append((state["field"], state["value"]))
        state["field"] = state["value"] = b""

    def on_part_data(d: bytes, s: int, e: int) -> None:
        parts[-1].body += d[s:e]

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_end": on_end,
        },
        max_header_size=1 << 20,
    )
    parser.write(body)
    assert state["ended"], "multipart output lacks its close delimiter"
    return parts


def run_stream(stream: Callable[[bytes], list[bytes]], body: bytes, how: str) -> bytes:
    """Drive a mitmproxy-style stream function and return everything it sent on."""
    out: list[bytes] = []
    for chunk in chunks(body, how):
        sent = stream(chunk)
        assert all(isinstance(b, bytes) and b for b in sent)
        out.extend(sent)
    out.extend(stream(b""))
    return b"".join(out)
