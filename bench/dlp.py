"""DLP throughput on DICOM headers: casb's inspector versus pydicom and dicognito.

Run: ``.venv/bin/python bench/dlp.py`` (``--help`` for options; ``--quick`` for a smoke
run). Writes ``bench/results/dlp.json`` and ``bench/results/dlp.md``.

Data: a CT series of ``--instances`` (default 200) instances generated here with pydicom
(explicit VR little endian, preamble + DICM + file meta): patient module (name, ID, birth
date, sex, age, other patient IDs), general study / series / equipment / frame of
reference / image plane / CT image / SOP common modules, a ReferencedStudySequence, a
ProcedureCodeSequence and a RequestAttributesSequence (nested code sequence), two private
blocks (a GE-style acquisition block and a vendor block with a free-text comment), and
``--rows`` x ``--rows`` 16-bit pixel data. The header (everything before Pixel Data
(7FE0,0010)) is about 2.8 KB, as for a typical CT slice. No real patient data: names, IDs
and dates are made up.

Variants, all on the same bytes, in memory, in ONE process pinned to one core
(``os.sched_setaffinity``):

* ``scan``: ``Inspector(DlpProfile(block=[], deidentify=None), DlpSettings(),
  uid_key=...).inspect(header, complete=False)`` -- every detector, no rewrite; ``header``
  is the instance's bytes before Pixel Data (offset found with pydicom).
* ``deid basic``: the same with ``deidentify=[]`` (PS3.15 basic profile): the rewritten
  header is produced (``Verdict.header``).
* ``deid +options``: ``deidentify=[retain_longitudinal_modified_dates,
  clean_descriptors]``.
* ``stream``: ``casb.dlp.instance_stream.InstanceStream`` with the basic profile, fed the
  WHOLE file (pixel data included) in 64 KiB chunks, all output collected: the per-
  instance path of an upload (when that module exists).
* ``pydicom dcmread``: ``pydicom.dcmread(BytesIO(file))`` of the whole file (the reference
  for ratios: a full parse of the same instance, values left lazy as pydicom does).
* ``pydicom header``: ``dcmread(BytesIO(header))`` of the header bytes only (context).
* ``dicognito``: ``dcmread`` + ``Anonymizer().anonymize(ds)`` + ``ds.save_as(BytesIO())``,
  one Anonymizer per pass over the series (it keeps series-consistent mappings).

Method: one untimed warm-up pass per variant, which also checks each variant did its job
(scan forwards the header unchanged; de-identification rewrites it and the output parses
with pydicom and no longer holds the generated patient name; dicognito changed it).
Then ``--reps`` repetitions; each repetition times one full pass over the series per
variant with ``time.perf_counter`` (the variant order rotates between repetitions, so
drift hits all alike), giving instances/s = instances / pass time. Figures are medians over
repetitions; ratios are medians of per-repetition ratios. The garbage collector stays
enabled, as in the proxy. ``--profile VARIANT`` prints a cProfile of one extra pass.
Benchmarks report; they never fail on a threshold. The issue's targets are printed next to
the figures: header scan >= 1,000 instances/s and de-identification >= 1,500 instances/s
per core.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import os
import platform
import pstats
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import pydicom  # noqa: E402
from proxy_overhead import _fmt, cpu_model, text_table  # noqa: E402  (shared report helpers)
from pydicom.dataelem import RawDataElement  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence as DicomSequence  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from casb.dlp import DlpProfile, DlpSettings, InstanceError  # noqa: E402

TARGET_SCAN_PER_S = 1000.0
TARGET_DEID_PER_S = 1500.0
CHUNK = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024  # casb's default dlp.max_header_bytes
UID_KEY = b"casb-bench-dlp-uid-key-not-a-secret-0123456789"
UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # a made-up root under a test arc
PIXEL_DATA_TAG = 0x7FE00010
DEID_OPTIONS = ["retain_longitudinal_modified_dates", "clean_descriptors"]

# Made-up identities; the warm-up checks that de-identified output no longer holds them.
PATIENT_NAME = "BENCHMARK^CTPATIENT^Q"
PATIENT_ID = "BENCH0012345"


class BenchError(Exception):
    """The rig could not be set up, or a variant did not do what it should measure."""


# -- the series ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    file: bytes  # the whole Part 10 file
    header_end: int  # offset of the Pixel Data element (7FE0,0010)

    @property
    def header(self) -> bytes:
        return self.file[: self.header_end]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def ct_dataset(index: int, total: int, study_uid: str, series_uid: str, for_uid: str) -> Dataset:
    """One CT slice of a made-up abdomen study, without its pixel data."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240305"
    ds.InstanceCreationTime = "101502"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240305"
    ds.StudyTime = "101200"
    ds.SeriesTime = "101310"
    ds.AcquisitionTime = ds.ContentTime = f"1014{index % 60:02d}"
    ds.AccessionNumber = "ACC20240305117"
    ds.Modality = "CT"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.InstitutionName = "St. Example General Hospital"
    ds.InstitutionAddress = "1 Example Road, Exampletown"
    ds.ReferringPhysicianName = "REFERRER^ROBERTA^^DR"
    ds.StationName = "CTSCAN04"
    ds.StudyDescription = "CT ABDOMEN PELVIS WITH CONTRAST"
    ds.ProcedureCodeSequence = DicomSequence(
        [_code("74177", "CPT", "CT abdomen and pelvis with contrast")]
    )
    ds.SeriesDescription = "AX 2.5mm SOFT TISSUE"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.PerformingPhysicianName = "PERFORMER^PAT"
    ds.OperatorsName = "TECH^TERRY"
    ds.ManufacturerModelName = "Revolution CT"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    ref.ReferencedSOPInstanceUID = study_uid
    ds.ReferencedStudySequence = DicomSequence([ref])
    scout = Dataset()  # the localizer this slice was planned on
    scout.ReferencedSOPClassUID = CTImageStorage
    scout.ReferencedSOPInstanceUID = generate_uid(UID_ROOT, entropy_srcs=[series_uid, "scout"])
    ds.ReferencedImageSequence = DicomSequence([scout])
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "EXAMPLEHOSP"
    ds.PatientBirthDate = "19580214"
    ds.PatientSex = "F"
    other = Dataset()
    other.PatientID = "OTHER-7781234"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    ds.PatientAge = "066Y"
    ds.PatientSize = "1.65"
    ds.PatientWeight = "71.5"
    ds.AdditionalPatientHistory = "follow-up, prior CT 2023"
    # A GE-style private block (numeric acquisition parameters).
    acq = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    acq.add_new(0x0C, "DS", "1.016600")
    acq.add_new(0x23, "DS", "39.375000")
    acq.add_new(0x27, "DS", "0.500000")
    ds.ContrastBolusAgent = "OMNIPAQUE 350"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = "2.5"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "CT04-88123"
    ds.SoftwareVersions = "revo_ct_22.10"
    ds.ProtocolName = "5.1 ABDOMEN PELVIS CONTRAST"
    ds.DateOfLastCalibration = "20240304"
    ds.ReconstructionDiameter = "380"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "625.6"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "178"
    ds.ExposureTime = "600"
    ds.XRayTubeCurrent = "280"
    ds.Exposure = "168"
    ds.FilterType = "BODY FILTER"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "117"
    ds.SeriesNumber = "3"
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = str(index + 1)
    z = -50.0 - 2.5 * index
    ds.ImagePositionPatient = ["-190.0", "-190.0", f"{z:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.1f}"
    ds.ImagesInAcquisition = str(total)
    ds.ImageComments = "contrast phase: portal venous"
    # A vendor block with a free-text field (a typical hiding place for identifiers).
    vendor = ds.private_block(0x0029, "EXAMPLE_VENDOR_01", create=True)
    vendor.add_new(0x10, "LO", "recon job 5521")
    vendor.add_new(0x11, "SL", 87)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = ["0.742188", "0.742188"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    request = Dataset()
    request.RequestedProcedureID = "RP20240305117"
    request.ScheduledProcedureStepID = "SPS20240305117"
    request.ScheduledProtocolCodeSequence = DicomSequence(
        [_code("CTAPC", "99EXAMPLE", "CT abdomen pelvis contrast")]
    )
    ds.RequestAttributesSequence = DicomSequence([request])
    ds.RequestingPhysician = "REFERRER^ROBERTA^^DR"
    ds.AdmittingDiagnosesDescription = "abdominal pain, query appendicitis"
    ds.PerformedProcedureStepStartDate = "20240305"
    ds.PerformedProcedureStepStartTime = "101150"
    ds.PerformedProcedureStepID = "PPS117"
    ds.PerformedProcedureStepDescription = "CT ABDOMEN PELVIS WITH CONTRAST"
    return ds


def pixel_data_offset(file: bytes) -> int:
    """Where the top-level Pixel Data element starts, found with pydicom."""
    ds = pydicom.dcmread(io.BytesIO(file), defer_size=256)
    raw = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.value_tell is None:
        raise BenchError("generated instance has no deferred Pixel Data element")
    # Explicit VR OW: tag (4) + VR (2) + reserved (2) + 32-bit length (4) before the value.
    offset = int(raw.value_tell) - 12
    if file[offset : offset + 4] != b"\xe0\x7f\x10\x00":
        raise BenchError("Pixel Data offset check failed")
    return offset


def make_series(count: int, rows: int) -> list[Instance]:
    """``count`` CT slices of one series as Part 10 files, with their header lengths."""
    study_uid = generate_uid(UID_ROOT)
    series_uid = generate_uid(UID_ROOT)
    for_uid = generate_uid(UID_ROOT)
    # A smooth gradient plus the slice index: real-looking enough, cheap to make.
    pixels = bytearray(rows * rows * 2)
    for r in range(rows):
        row = bytes((c * 7 + r) & 0xFF for c in range(rows * 2))
        pixels[r * rows * 2 : (r + 1) * rows * 2] = row
    series: list[Instance] = []
    for i in range(count):
        ds = ct_dataset(i, count, study_uid, series_uid, for_uid)
        ds.Rows = ds.Columns = rows
        ds.PixelData = bytes(pixels)
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        file = buf.getvalue()
        series.append(Instance(file, pixel_data_offset(file)))
    return series


# -- the variants ----------------------------------------------------------------------------

# One pass over the series: called with the whole series, returns nothing. Checks happen
# in the warm-up, on the outputs the pass collects into `Outputs`.


@dataclass
class Outputs:
    items: list[Any] = field(default_factory=list)


@dataclass
class Variant:
    name: str
    description: str
    run: Callable[[list[Instance], Outputs | None], None]
    check: Callable[[list[Instance], Outputs], None]
    group: str  # "scan" | "deid" | "stream" | "reference"


def _inspector(deidentify: list[str] | None) -> Any:
    from casb.dlp.inspector import Inspector

    profile = DlpProfile.model_validate({"block": [], "deidentify": deidentify})
    return Inspector(profile, DlpSettings(), uid_key=UID_KEY)


def inspect_variant(name: str, deidentify: list[str] | None, description: str) -> Variant:
    inspector = _inspector(deidentify)
    inspect = inspector.inspect

    def run(series: list[Instance], out: Outputs | None) -> None:
        if out is None:
            for inst in series:
                inspect(inst.header, complete=False)
        else:
            for inst in series:
                out.items.append(inspect(inst.header, complete=False))

    def check(series: list[Instance], out: Outputs) -> None:
        for inst, verdict in zip(series, out.items, strict=True):
            if deidentify is None:
                if verdict.action != "forward" or verdict.header != inst.header:
                    raise BenchError(f"{name}: expected the header forwarded unchanged")
            else:
                if verdict.action != "deidentified" or verdict.header == inst.header:
                    raise BenchError(f"{name}: expected a de-identified header")
                _check_deidentified(name, verdict.header)

    group = "scan" if deidentify is None else "deid"
    return Variant(name, description, run, check, group)


def _check_deidentified(name: str, header: bytes) -> None:
    """The output parses with pydicom and no longer carries the made-up identity."""
    try:
        ds = pydicom.dcmread(io.BytesIO(header), force=True)
        text = str(ds)  # renders every element, nested ones too
    except Exception as exc:
        raise BenchError(f"{name}: pydicom cannot read the output ({type(exc).__name__})") from None
    for marker in (PATIENT_NAME, PATIENT_ID, "19580214"):
        if marker in text:
            raise BenchError(f"{name}: the output still holds a generated identifier")


def stream_variant() -> Variant | None:
    """InstanceStream over the whole file in 64 KiB chunks (None if not available)."""
    try:
        from casb.dlp.instance_stream import InstanceStream
    except ImportError:
        return None
    inspector = _inspector([])

    def inspect(data: bytes, complete: bool) -> Any:
        return inspector.inspect(data, complete=complete)

    # The chunks are cut once (the warm-up pass) and reused: cutting them stands for the
    # network read, which is not the stream's work.
    cut: dict[int, list[bytes]] = {}

    def one(data: bytes) -> bytes:
        chunks = cut.get(id(data))
        if chunks is None:
            chunks = cut[id(data)] = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        stream = InstanceStream(inspect, max_header_bytes=MAX_HEADER_BYTES)
        parts: list[bytes] = []
        for chunk in chunks:
            parts += stream.feed(chunk)
        parts += stream.finish()
        if stream.error is not None:
            raise BenchError(f"stream: {stream.error}")
        return b"".join(parts)

    def run(series: list[Instance], out: Outputs | None) -> None:
        for inst in series:
            got = one(inst.file)
            if out is not None:
                out.items.append(got)

    def check(series: list[Instance], out: Outputs) -> None:
        for inst, got in zip(series, out.items, strict=True):
            pixels = inst.file[inst.header_end :]
            if not got.endswith(pixels) or got == inst.file:
                raise BenchError("stream: expected a rewritten header followed by the pixels")
            _check_deidentified("stream", got[: len(got) - len(pixels)])

    return Variant(
        "stream",
        "InstanceStream(Inspector basic profile), whole file fed in 64 KiB chunks, output joined",
        run,
        check,
        "stream",
    )


def dcmread_variant() -> Variant:
    def run(series: list[Instance], out: Outputs | None) -> None:
        for inst in series:
            ds = pydicom.dcmread(io.BytesIO(inst.file))
            if out is not None:
                out.items.append(ds)

    def check(series: list[Instance], out: Outputs) -> None:
        for ds in out.items:
            if str(ds.PatientName) != PATIENT_NAME or ds.Rows != ds.Columns:
                raise BenchError("pydicom dcmread: unexpected dataset")

    return Variant("pydicom dcmread", "pydicom.dcmread of the whole file", run, check, "reference")


def dcmread_header_variant() -> Variant:
    def run(series: list[Instance], out: Outputs | None) -> None:
        for inst in series:
            ds = pydicom.dcmread(io.BytesIO(inst.header))
            if out is not None:
                out.items.append(ds)

    def check(series: list[Instance], out: Outputs) -> None:
        for ds in out.items:
            if "PixelData" in ds or str(ds.PatientName) != PATIENT_NAME:
                raise BenchError("pydicom header: unexpected dataset")

    return Variant(
        "pydicom header", "pydicom.dcmread of the header bytes only", run, check, "reference"
    )


def dicognito_variant() -> Variant | None:
    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        return None

    def run(series: list[Instance], out: Outputs | None) -> None:
        anonymizer = Anonymizer()
        for inst in series:
            ds = pydicom.dcmread(io.BytesIO(inst.file))
            anonymizer.anonymize(ds)
            buf = io.BytesIO()
            ds.save_as(buf)
            if out is not None:
                out.items.append(buf.getvalue())

    def check(series: list[Instance], out: Outputs) -> None:
        for inst, got in zip(series, out.items, strict=True):
            if got == inst.file or not got.endswith(inst.file[inst.header_end + 12 :]):
                raise BenchError("dicognito: expected a rewritten instance, same pixels")
            _check_deidentified("dicognito", got)

    return Variant(
        "dicognito",
        "dcmread + dicognito Anonymizer().anonymize + save_as(BytesIO)",
        run,
        check,
        "reference",
    )


def build_variants(only: set[str] | None) -> tuple[list[Variant], list[str]]:
    """The variants that can run here, and notes on those that cannot."""
    notes: list[str] = []
    variants: list[Variant] = []
    try:
        importlib.import_module("casb.dlp.inspector")
        have_inspector = True
    except ImportError:
        have_inspector = False
        notes.append("casb/dlp/inspector.py is not there yet: scan and deid variants skipped")
    if have_inspector:
        variants += [
            inspect_variant(
                "scan",
                None,
                "Inspector.inspect(header, complete=False), block=[], deidentify=None",
            ),
            inspect_variant(
                "deid basic", [], "Inspector.inspect(header), deidentify=[] (basic profile)"
            ),
            inspect_variant(
                "deid +options",
                DEID_OPTIONS,
                "Inspector.inspect(header), deidentify=[" + ", ".join(DEID_OPTIONS) + "]",
            ),
        ]
        stream = stream_variant()
        if stream is None:
            notes.append("casb/dlp/instance_stream.py is not there yet: stream variant skipped")
        else:
            variants.append(stream)
    variants += [dcmread_variant(), dcmread_header_variant()]
    dicognito = dicognito_variant()
    if dicognito is None:
        notes.append("dicognito is not installed: its variant skipped")
    else:
        variants.append(dicognito)
    if only:
        variants = [v for v in variants if v.name in only]
    return variants, notes


# -- measuring ---------------------------------------------------------------------------------


def pin_one_core() -> int | None:
    """Pin this process to one CPU (the last one it may use); None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    return cpus[-1]


def time_pass(variant: Variant, series: list[Instance]) -> float:
    t0 = time.perf_counter()
    variant.run(series, None)
    return time.perf_counter() - t0


def measure(
    variants: Sequence[Variant], series: list[Instance], reps: int
) -> dict[str, list[float]]:
    """Seconds per pass over the series, per variant, one entry per repetition."""
    seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    for rep in range(reps):
        shift = rep % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            seconds[variant.name].append(time_pass(variant, series))
        print(
            f"rep {rep + 1}/{reps}: "
            + ", ".join(f"{name} {len(series) / s[-1]:,.0f}/s" for name, s in seconds.items()),
            file=sys.stderr,
        )
    return seconds


def paired_ratio(seconds: dict[str, list[float]], name: str, ref: str) -> float | None:
    """Median over repetitions of (rate of `name` / rate of `ref`) in the same repetition."""
    if ref not in seconds:
        return None
    return statistics.median(
        theirs / mine for mine, theirs in zip(seconds[name], seconds[ref], strict=True)
    )


def summarise(
    variants: Sequence[Variant], seconds: dict[str, list[float]], n: int
) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        per_s = [n / s for s in seconds[v.name]]
        median = statistics.median(per_s)
        target: float | None = None
        if v.group == "scan":
            target = TARGET_SCAN_PER_S
        elif v.group == "deid":
            target = TARGET_DEID_PER_S
        rows.append(
            {
                "variant": v.name,
                "description": v.description,
                "instances_per_s": median,
                "us_per_instance": 1e6 / median,
                "min_per_s": min(per_s),
                "max_per_s": max(per_s),
                "x_pydicom_dcmread": paired_ratio(seconds, v.name, "pydicom dcmread"),
                "x_dicognito": paired_ratio(seconds, v.name, "dicognito"),
                "target_per_s": target,
                "target_met": None if target is None else median >= target,
                "per_rep_per_s": per_s,
            }
        )
    return rows


HEADERS = [
    "variant",
    "instances/s",
    "us/instance",
    "x pydicom dcmread",
    "x dicognito",
    "target",
]


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        target = "-"
        if r["target_per_s"] is not None:
            met = "MET" if r["target_met"] else "MISSED"
            target = f">= {r['target_per_s']:,.0f}/s {met}"
        out.append(
            [
                r["variant"],
                _fmt(r["instances_per_s"], ",.0f"),
                _fmt(r["us_per_instance"], ",.1f"),
                _fmt(r["x_pydicom_dcmread"], ".2f"),
                _fmt(r["x_dicognito"], ".2f"),
                target,
            ]
        )
    return out


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    cfg = meta["config"]
    lines = [
        "# DLP benchmark: casb inspector vs pydicom and dicognito",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- Python {meta['python']}, pydicom {meta['pydicom']}, dicognito {meta['dicognito']}",
        f"- CPU: {meta['cpu']} ({meta['nproc']} CPUs), pinned to CPU {meta['pinned_cpu']}; "
        f"{meta['platform']}; load average at start "
        + " ".join(f"{x:.2f}" for x in meta["loadavg_at_start"]),
        f"- series: {cfg['instances']} CT instances, explicit VR LE, header "
        f"{meta['header_bytes_median']:,} bytes (median; everything before Pixel Data), "
        f"pixel data {cfg['rows']}x{cfg['rows']}x16 bit, file {meta['file_bytes_median']:,} "
        "bytes",
        f"- {cfg['reps']} repetitions of one pass over the series per variant (order "
        "rotated); median instances/s; ratios are medians of per-repetition ratios "
        "(variant rate / reference rate: above 1 is faster)",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" if i in (0, 5) else "---:" for i in range(len(HEADERS))) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(rows)),
        "",
        "Targets (issue): header scan >= 1,000 instances/s per core, de-identification "
        ">= 1,500 instances/s per core.",
        "",
        "## Variants",
        "",
        *(f"- `{r['variant']}`: {r['description']}" for r in rows),
    ]
    if meta["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in meta["notes"])]
    lines.append("")
    return "\n".join(lines)


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def profile_pass(variant: Variant, series: list[Instance], top: int = 30) -> str:
    prof = cProfile.Profile()
    prof.enable()
    variant.run(series, None)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return f"cProfile of one pass of {variant.name!r} ({len(series)} instances)\n" + buf.getvalue()


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--instances", type=int, default=None, help="instances in the series (default 200)"
    )
    parser.add_argument(
        "--rows", type=int, default=512, help="rows = columns of the pixel data (default 512)"
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="timed passes per variant (default 9; quick 3)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="VARIANT",
        help="run only this variant (repeatable)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="VARIANT",
        help="print a cProfile of one extra pass of VARIANT",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 40 instances, 3 reps; writes results only with --out",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results)"
    )
    args = parser.parse_args(argv)
    if args.instances is None:
        args.instances = 40 if args.quick else 200
    if args.reps is None:
        args.reps = 3 if args.quick else 9
    if args.instances < 1 or args.reps < 1 or args.rows < 1:
        parser.error("--instances, --reps and --rows must be positive")
    out: Path | None = args.out
    if out is None and not args.quick:
        out = REPO / "bench" / "results"
    command = " ".join(
        [
            ".venv/bin/python bench/dlp.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    ).strip()

    load_at_start = os.getloadavg()
    pinned = None if args.no_pin else pin_one_core()
    t0 = time.perf_counter()
    series = make_series(args.instances, args.rows)
    headers = sorted(len(i.header) for i in series)
    files = sorted(len(i.file) for i in series)
    print(
        f"generated {len(series)} CT instances in {time.perf_counter() - t0:.1f} s: header "
        f"{headers[len(headers) // 2]:,} bytes, file {files[len(files) // 2]:,} bytes (median)",
        file=sys.stderr,
    )
    variants, notes = build_variants(set(args.only) if args.only else None)
    if not variants:
        raise BenchError("no variant to run")
    for variant in variants:  # warm-up, and proof each variant does its job
        outputs = Outputs()
        try:
            variant.run(series, outputs)
        except InstanceError as exc:
            raise BenchError(f"{variant.name}: InstanceError: {exc.reason}") from None
        variant.check(series, outputs)
    print("warm-up done; every variant checked", file=sys.stderr)
    seconds = measure(variants, series, args.reps)
    rows = summarise(variants, seconds, len(series))
    profile_text = ""
    if args.profile:
        chosen = [v for v in variants if v.name == args.profile]
        if not chosen:
            parser.error(f"--profile: no variant {args.profile!r}")
        profile_text = profile_pass(chosen[0], series)

    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "dicognito": _dist_version("dicognito"),
        "casb": _dist_version("casb"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "pinned_cpu": pinned,
        "platform": platform.platform(),
        "loadavg_at_start": load_at_start,
        "header_bytes_median": headers[len(headers) // 2],
        "header_bytes_range": [headers[0], headers[-1]],
        "file_bytes_median": files[len(files) // 2],
        "config": {
            "instances": args.instances,
            "rows": args.rows,
            "reps": args.reps,
            "quick": args.quick,
            "chunk_bytes": CHUNK,
            "deid_options": DEID_OPTIONS,
        },
        "targets": {"scan_per_s": TARGET_SCAN_PER_S, "deid_per_s": TARGET_DEID_PER_S},
        "notes": notes,
    }

    print()
    print(
        f"DLP header throughput, {meta['cpu']} ({meta['nproc']} CPUs, pinned to "
        f"{pinned if pinned is not None else 'none'}), Python {meta['python']}, pydicom "
        f"{meta['pydicom']}, dicognito {meta['dicognito']}; {len(series)} CT instances "
        f"(header {meta['header_bytes_median']:,} B), median of {args.reps} passes"
    )
    print(text_table(HEADERS, table_rows(rows), text_last=True))
    print(
        f"targets (issue): scan >= {TARGET_SCAN_PER_S:,.0f}/s, de-identification >= "
        f"{TARGET_DEID_PER_S:,.0f}/s per core"
    )
    for note in notes:
        print(f"note: {note}")
    if profile_text:
        print()
        print(profile_text)

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "results": rows}
        (out / "dlp.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "dlp.md").write_text(markdown(rows, meta))
        print(f"\nwrote {out / 'dlp.json'} and {out / 'dlp.md'}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"dlp bench: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
