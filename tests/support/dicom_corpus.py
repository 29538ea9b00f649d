"""DICOM test instances, generated with pydicom at test time (no real patient data).

Reusable by any test: ``ct_dataset()`` builds a realistic CT image header (about
2.8 KB encoded) around a small pixel array; ``add_nested_phi`` / ``add_private`` add
the hard cases; ``encode_instance`` writes a dataset in any framing and transfer
syntax; ``split_at_pixel_data`` returns (header bytes, pixel data element bytes) --
what the proxy's stream hands the inspector and what it forwards after the header.
"""

from __future__ import annotations

import struct
import warnings
from io import BytesIO
from pathlib import Path
from typing import Literal

from pydicom import dcmread, dcmwrite
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

Framing = Literal["file", "meta", "bare"]  # preamble + meta / meta only / dataset only

PATIENT_NAME = "SENTINEL^PHI"
PATIENT_ID = "PID-884422"
BIRTH_DATE = "19610704"
STUDY_UID = "1.2.826.0.1.3680043.8.498.10001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.10002"
INSTANCE_UID = "1.2.826.0.1.3680043.8.498.10003"
FRAME_UID = "1.2.826.0.1.3680043.8.498.10004"
REFERENCED_UID = "1.2.826.0.1.3680043.8.498.10005"
PRIVATE_CREATOR = "CASB TEST 1.0"
PIXEL_BYTES = bytes(range(256)) * 2  # 16 x 16, 16-bit


def ct_dataset(
    *,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
    charset: str = "ISO_IR 100",
    pixels: bytes = PIXEL_BYTES,
) -> Dataset:
    """A CT Image Storage instance with the attributes a scanner typically writes."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240311"
    ds.InstanceCreationTime = "101500"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = INSTANCE_UID
    ds.StudyDate = "20240311"
    ds.SeriesDate = "20240311"
    ds.AcquisitionDate = "20240311"
    ds.ContentDate = "20240311"
    ds.StudyTime = "101010"
    ds.SeriesTime = "101212"
    ds.AcquisitionTime = "101313.250000"
    ds.ContentTime = "101414"
    ds.AccessionNumber = "ACC20240311"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME Medical"
    ds.InstitutionName = "St. Example Hospital"
    ds.InstitutionAddress = "1 Example Road, Springfield"
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.StationName = "CTSCAN01"
    ds.StudyDescription = "CT CHEST W/O CONTRAST"
    ds.SeriesDescription = "AXIAL 1.25MM"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.PhysiciansOfRecord = "WELBY^MARCUS"
    ds.PerformingPhysicianName = "QUINN^MICHAELA"
    ds.NameOfPhysiciansReadingStudy = "GREY^MEREDITH"
    ds.OperatorsName = "TECH^TERRY"
    ds.AdmittingDiagnosesDescription = "R91.1 solitary pulmonary nodule"
    ds.ManufacturerModelName = "Example CT 64"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = REFERENCED_UID
    ds.ReferencedImageSequence = Sequence([ref])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.10007"
    ds.ReferencedStudySequence = Sequence([study_ref])
    ds.ProcedureCodeSequence = Sequence([_code("71250", "CPT4", "CT THORAX W/O DYE")])
    ds.AnatomicRegionSequence = Sequence([_code("T-D3000", "SRT", "Chest")])
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.PatientAge = "062Y"
    ds.PatientWeight = "71.5"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "SN-445566"
    ds.SoftwareVersions = "VA20"
    ds.ProtocolName = "CHEST ROUTINE"
    ds.ReconstructionDiameter = "360"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "220"
    ds.Exposure = "110"
    ds.FilterType = "BODY"
    ds.GeneratorPower = "26"
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "B30f"
    ds.ScanOptions = "HELICAL_CT"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.TableSpeed = 80.0
    ds.TableFeedPerRotation = 40.0
    ds.SpiralPitchFactor = 1.0
    ds.DataCollectionCenterPatient = [0.0, -160.0, -52.5]
    ds.ReconstructionTargetCenterPatient = [0.0, -160.0, -52.5]
    ds.ExposureModulationType = "XYZ_EC"
    ds.CTDIvol = 9.81
    ds.CTDIPhantomTypeCodeSequence = Sequence(
        [_code("113691", "DCM", "IEC Body Dosimetry Phantom")]
    )
    ds.IrradiationEventUID = "1.2.826.0.1.3680043.8.498.10006"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyID = "4711"
    ds.SeriesNumber = "3"
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = "42"
    ds.ImagePositionPatient = ["-180.0", "-180.0", "-52.5"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = FRAME_UID
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "-52.5"
    ds.ImageComments = "Scanned without incident"
    ds.RequestingPhysician = "HOUSE^GREGORY"
    ds.RequestedProcedureDescription = "CT CHEST"
    ds.PerformedProcedureStepStartDate = "20240311"
    ds.PerformedProcedureStepStartTime = "100900"
    ds.PerformedProcedureStepID = "PPS-99812"
    ds.PerformedProcedureStepDescription = "CT CHEST W/O CONTRAST"
    ds.PerformedProtocolCodeSequence = Sequence([_code("P5-08000", "SRT", "CT chest protocol")])
    ds.AdditionalPatientHistory = "Follow-up of pulmonary nodule"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.PixelSpacing = ["0.703125", "0.703125"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def add_nested_phi(ds: Dataset) -> Dataset:
    """PHI two sequence levels deep: OtherPatientIDsSequence[0].PatientID and
    OtherPatientIDsSequence[0].IssuerOfPatientIDQualifiersSequence[0].AssigningFacility...
    plus a Requested Procedure comment with the patient's own name in it."""
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "MRN 1234567"
    qualifiers.UniversalEntityIDType = "ISO"
    other = Dataset()
    other.PatientID = "OTHER-778899"
    other.TypeOfPatientID = "TEXT"
    other.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureDescription = "CT chest"
    inner = Dataset()
    inner.PatientName = "NESTED^SECRET"
    request.ReferencedPatientSequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([request])
    return ds


def add_private(ds: Dataset, *, creator: str = PRIVATE_CREATOR) -> Dataset:
    """A private block in group 0x0019 with text (including the patient's name), a
    number, and a private sequence holding a public Patient ID."""
    block = ds.private_block(0x0019, creator, create=True)
    block.add_new(0x10, "LO", "note for " + str(ds.get("PatientName", "")))
    block.add_new(0x11, "DS", "3.5")
    item = Dataset()
    item.PatientID = "PRIV-SEQ-ID"
    block.add_new(0x12, "SQ", Sequence([item]))
    return ds


def file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", INSTANCE_UID)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def encode_instance(
    ds: Dataset,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    framing: Framing = "file",
) -> bytes:
    """The instance as bytes: with preamble + meta ("file"), meta only, or bare."""
    ts = UID(transfer_syntax)
    if framing == "bare":
        if ts == DeflatedExplicitVRLittleEndian:
            raise ValueError("a bare dataset cannot say it is deflated")
        fp = DicomBytesIO()
        fp.is_implicit_VR = ts == ImplicitVRLittleEndian
        fp.is_little_endian = ts != ExplicitVRBigEndian
        write_dataset(fp, ds)
        return fp.getvalue()
    ds.file_meta = file_meta(ds, ts)
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    data = out.getvalue()
    return data if framing == "file" else data[132:]


def split_at_pixel_data(
    ds: Dataset,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    framing: Framing = "file",
) -> tuple[bytes, bytes]:
    """(bytes before the top-level Pixel Data element, the rest of the instance)."""
    whole = encode_instance(ds, transfer_syntax=transfer_syntax, framing=framing)
    header_ds = Dataset()
    header_ds.update(ds)
    del header_ds["PixelData"]
    if hasattr(ds, "file_meta"):
        header_ds.file_meta = ds.file_meta
    header = encode_instance(header_ds, transfer_syntax=transfer_syntax, framing=framing)
    if transfer_syntax == DeflatedExplicitVRLittleEndian or not whole.startswith(header):
        raise ValueError("this instance has no pixel data boundary to split at")
    return header, whole[len(header) :]


def nested_sequences(depth: int) -> Dataset:
    """A dataset whose ReferencedImageSequence nests ``depth`` levels deep, with a
    Patient ID at the bottom."""
    bottom = Dataset()
    bottom.PatientID = "DEEP-ID"
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([bottom])
        bottom = outer
    bottom.SOPClassUID = CTImageStorage
    bottom.SOPInstanceUID = INSTANCE_UID
    return bottom


def element(
    tag: int, vr: str, value: bytes, *, implicit: bool = False, little: bool = True
) -> bytes:
    """One hand-encoded element, for inputs pydicom would refuse to write (duplicates,
    wrong order, hostile lengths). ``value`` is written as given."""
    order = "<" if little else ">"
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack(order + "L", len(value)) + value
    if vr in ("OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV", "SV", "UV"):
        return head + vr.encode() + b"\x00\x00" + struct.pack(order + "L", len(value)) + value
    return head + vr.encode() + struct.pack(order + "H", len(value)) + value


def with_length(encoded: bytes, length: int, *, long_vr: bool = False) -> bytes:
    """An explicit VR LE element with its length field replaced (hostile lengths)."""
    if long_vr:
        return encoded[:8] + struct.pack("<L", length) + encoded[12:]
    return encoded[:6] + struct.pack("<H", length) + encoded[8:]


UID_KEY = b"unit-test-uid-key-0123456789abcdef"
OTHER_UID_KEY = b"another-uid-key-fedcba9876543210"


def bundled(name: str) -> bytes:
    """A file pydicom ships (test files or character set files), as bytes."""
    found = get_testdata_file(name)
    if found is None:
        charset = get_charset_files(name)
        found = charset[0] if charset else None
    if found is None:
        raise LookupError(f"pydicom has no bundled file {name}")
    return Path(str(found)).read_bytes()


def reread(data: bytes) -> Dataset:
    """What a lenient DICOM reader (pydicom, force=True) sees in the bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(BytesIO(data), force=True)
