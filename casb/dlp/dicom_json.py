"""DICOM JSON (PS3.18 Annex F) datasets in and out of pydicom, checked for shape.

``dataset_from_json`` checks the structure before pydicom sees it (an object of
8-hex-digit tags -> {"vr": ..., "Value": [...] | "BulkDataURI" | "InlineBinary"},
sequences nested at most 64 levels) and sets bulk data references aside: pydicom would
otherwise try to resolve them. ``dataset_to_json`` writes the (de-identified) dataset
back with pydicom, restores the references of top-level elements that are still there
unchanged (a STOW-RS JSON+bulkdata upload needs its Pixel Data reference), or -- for
responses -- drops bulk data (it cannot be inspected here, and its URIs name the
original UIDs) and Retrieve URL / URI.
"""

from __future__ import annotations

import re
from typing import Any, Final

from pydicom.dataset import Dataset

from casb.dlp.findings import InstanceError
from casb.dlp.instance import MAX_DEPTH

RETRIEVE_KEYS: Final = frozenset({"00081190", "0040E010"})  # Retrieve URL, Retrieve URI
_TAG_KEY = re.compile(r"[0-9A-Fa-f]{8}")
_VR = re.compile(r"[A-Z]{2}")
_VALUE_KEYS: Final = frozenset({"Value", "BulkDataURI", "InlineBinary"})


def dataset_from_json(obj: Any) -> tuple[Dataset, dict[str, str]]:
    """(pydicom Dataset, {tag key: BulkDataURI} of the top-level bulk data references)."""
    bulk: dict[str, str] = {}
    cleaned = _checked_dataset(obj, 0, bulk)
    try:
        ds = Dataset.from_json(cleaned)
    except Exception as exc:  # pydicom raises many types on odd values (fail closed)
        raise InstanceError(
            f"the DICOM JSON dataset cannot be read ({type(exc).__name__})"
        ) from None
    return ds, bulk


def dataset_to_json(
    ds: Dataset, bulk: dict[str, str], *, drop_bulk: bool, drop_retrieve: bool
) -> dict[str, Any]:
    """The dataset as DICOM JSON, with bulk data handled as the module docstring says."""
    out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=2**62)
    if drop_bulk or drop_retrieve:
        _drop(out, drop_bulk=drop_bulk, drop_retrieve=drop_retrieve, depth=0)
    if not drop_bulk:
        for key, uri in bulk.items():
            element = out.get(key)
            if isinstance(element, dict) and not (_VALUE_KEYS & element.keys()):
                element["BulkDataURI"] = uri
    return out


def _checked_dataset(obj: Any, depth: int, bulk: dict[str, str] | None) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise InstanceError(f"sequences nested deeper than {MAX_DEPTH} levels")
    if not isinstance(obj, dict):
        raise InstanceError("a DICOM JSON dataset must be an object")
    out: dict[str, Any] = {}
    for key, element in obj.items():
        if not isinstance(key, str) or not _TAG_KEY.fullmatch(key):
            raise InstanceError("a DICOM JSON dataset key is not an 8-digit hex tag")
        if not isinstance(element, dict):
            raise InstanceError("a DICOM JSON element must be an object")
        vr = element.get("vr")
        if not isinstance(vr, str) or not _VR.fullmatch(vr):
            raise InstanceError("a DICOM JSON element has no valid 'vr'")
        present = _VALUE_KEYS & element.keys()
        if len(present) > 1:
            raise InstanceError("a DICOM JSON element has more than one kind of value")
        if "BulkDataURI" in present:
            uri = element["BulkDataURI"]
            if not isinstance(uri, str):
                raise InstanceError("a DICOM JSON BulkDataURI must be a string")
            if bulk is not None:
                bulk[key.upper()] = uri
            out[key] = {"vr": vr}  # the value stays out of reach; restored on output
            continue
        if "InlineBinary" in present and not isinstance(element["InlineBinary"], str):
            raise InstanceError("a DICOM JSON InlineBinary must be a string")
        if "Value" in present:
            value = element["Value"]
            if not isinstance(value, list):
                raise InstanceError("a DICOM JSON Value must be an array")
            if vr == "SQ":
                items = [_checked_dataset(item, depth + 1, None) for item in value]
                out[key] = {"vr": vr, "Value": items}
                continue
            for item in value:
                if isinstance(item, dict | list) and vr != "PN":
                    raise InstanceError("a DICOM JSON value has an unexpected structure")
        out[key] = element
    return out


def _drop(dataset: dict[str, Any], *, drop_bulk: bool, drop_retrieve: bool, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InstanceError(f"sequences nested deeper than {MAX_DEPTH} levels")
    for key in list(dataset):
        element = dataset[key]
        if drop_retrieve and key.upper() in RETRIEVE_KEYS:
            del dataset[key]
            continue
        if not isinstance(element, dict):
            continue
        if drop_bulk:
            element.pop("BulkDataURI", None)
            element.pop("InlineBinary", None)
        if element.get("vr") == "SQ":
            for item in element.get("Value") or []:
                if isinstance(item, dict):
                    _drop(item, drop_bulk=drop_bulk, drop_retrieve=drop_retrieve, depth=depth + 1)
