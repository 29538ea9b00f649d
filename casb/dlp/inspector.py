"""The DLP engine's face: one Inspector per profile, built once, used per instance.

``inspect(data, complete)``: parse (casb.dlp.instance) -> detect (casb.dlp.detect) ->
block when a finding's rule matches the profile's ``block`` list -> else de-identify
(casb.dlp.deidentify) and re-encode in the input's transfer syntax when the profile
de-identifies -> else forward the bytes unchanged. Explicit VR little endian instances
take a fast path with the same result (casb.dlp.explicit_le: the same steps on the raw
bytes); everything it does not handle takes the pydicom path described here.
``inspect_json`` / ``mask_json`` do the same for DICOM JSON datasets (STOW-RS
JSON+bulkdata, QIDO-RS, WADO-RS metadata).

Anything that goes wrong on the way is an ``InstanceError`` (fail closed); its reason
never quotes the input. pydicom's own warnings and log records are silenced while the
engine runs (they can quote values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from casb.dlp.deidentify import Deidentifier
from casb.dlp.detect import Detector, decoded_text
from casb.dlp.dicom_json import dataset_from_json, dataset_to_json
from casb.dlp.explicit_le import ExplicitLittleEndian
from casb.dlp.findings import Finding, InstanceError, Verdict
from casb.dlp.instance import encode, quiet_pydicom, read_header, transfer_syntax_of
from casb.dlp.profile import RULE_IDS, DlpProfile, DlpSettings, rule_matches
from casb.dlp.rules import load_table

_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_MEDIA_SOP_CLASS = 0x00020002
_MEDIA_SOP_INSTANCE = 0x00020003

T = TypeVar("T")


class Inspector:
    """Inspects (and blocks / de-identifies) instances for one DLP profile."""

    def __init__(self, profile: DlpProfile, settings: DlpSettings, *, uid_key: bytes) -> None:
        if not isinstance(uid_key, bytes):
            raise TypeError("uid_key must be bytes")
        self.profile = profile
        self.settings = settings
        table = load_table()
        self._detector = Detector(settings, table)
        self._block = tuple(profile.block)
        self._blocks: dict[str, bool] = {}  # rule id -> whether the profile blocks it
        self._deid: Deidentifier | None = None
        self._mask: Deidentifier | None = None
        if uid_key:
            if profile.deidentify is not None:
                self._deid = Deidentifier(
                    profile.deidentify, table, self._detector, uid_key=uid_key
                )
            # mask_json always returns de-identified copies: the basic profile when the
            # profile names no options
            self._mask = self._deid or Deidentifier([], table, self._detector, uid_key=uid_key)
        self._retain_uids = "retain_uids" in (profile.deidentify or [])
        self._fast = ExplicitLittleEndian(self._detector, self._deid)

    # public -----------------------------------------------------------------------

    def inspect(self, data: bytes, complete: bool) -> Verdict:
        """Inspect one instance's header bytes (complete=False: everything before the
        top-level Pixel Data element) or a whole instance (complete=True)."""
        return self._guarded(lambda: self._inspect(data, complete))

    def inspect_json(self, dataset: dict[str, Any]) -> tuple[dict[str, Any] | None, Verdict]:
        """One DICOM JSON dataset: (the dataset to forward, or None when blocked;
        the verdict, with header b"")."""
        return self._guarded(lambda: self._inspect_json(dataset, self._deid, mask=False))

    def mask_json(
        self, datasets: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], tuple[Finding, ...]]:
        """De-identified copies of DICOM JSON datasets (QIDO-RS results, WADO-RS
        metadata); blocked datasets are left out. Returns (masked, all findings)."""
        return self._guarded(lambda: self._mask_json(datasets))

    # steps ------------------------------------------------------------------------

    @staticmethod
    def _guarded(step: Callable[[], T]) -> T:
        with quiet_pydicom():
            try:
                return step()
            except InstanceError:
                raise
            except Exception as exc:  # any other failure: refuse, never pass through
                raise InstanceError(
                    f"the instance cannot be inspected ({type(exc).__name__})"
                ) from None

    def _inspect(self, data: bytes, complete: bool) -> Verdict:
        if self.profile.deidentify is not None and self._deid is None:
            raise InstanceError("de-identification needs a UID key and none is configured")
        verdict = self._inspect_fast(data, complete)
        return verdict if verdict is not None else self._inspect_with_pydicom(data, complete)

    def _inspect_fast(self, data: bytes, complete: bool) -> Verdict | None:
        """The fast path's verdict; None when the instance is not one it handles."""
        header = self._fast.read(data, complete)
        if header is None:
            return None
        findings = header.findings
        sop_class, sop_instance = header.sop_class_uid, header.sop_instance_uid
        blocked_by = self._blocked_by(findings)
        if blocked_by:
            return Verdict("block", findings, b"", sop_class, sop_instance, blocked_by)
        if self._deid is None:
            return Verdict("forward", findings, bytes(data), sop_class, sop_instance)
        rewritten = header.deidentified()
        if rewritten is None:
            return None
        return Verdict("deidentified", findings, rewritten, sop_class, sop_instance)

    def _inspect_with_pydicom(self, data: bytes, complete: bool) -> Verdict:
        """The general path (every transfer syntax): the reference for the fast one."""
        if self.profile.deidentify is not None and self._deid is None:
            raise InstanceError("de-identification needs a UID key and none is configured")
        ds = read_header(data, complete=complete)
        sop_class, sop_instance = _original_uids(ds)
        scanner = self._detector.scanner_for(ds)
        findings = tuple(self._detector.findings(ds, scanner))
        blocked_by = self._blocked_by(findings)
        if blocked_by:
            return Verdict("block", findings, b"", sop_class, sop_instance, blocked_by)
        if self._deid is None:
            return Verdict("forward", findings, bytes(data), sop_class, sop_instance)
        self._deid.apply(ds, scanner)
        header = encode(ds, transfer_syntax_of(ds))
        return Verdict("deidentified", findings, header, sop_class, sop_instance)

    def _inspect_json(
        self, dataset: dict[str, Any], deid: Deidentifier | None, *, mask: bool
    ) -> tuple[dict[str, Any] | None, Verdict]:
        if self.profile.deidentify is not None and deid is None:
            raise InstanceError("de-identification needs a UID key and none is configured")
        ds, bulk = dataset_from_json(dataset)
        sop_class, sop_instance = _original_uids(ds)
        scanner = self._detector.scanner_for(ds)
        findings = tuple(self._detector.findings(ds, scanner))
        blocked_by = self._blocked_by(findings)
        if blocked_by:
            verdict = Verdict("block", findings, b"", sop_class, sop_instance, blocked_by)
            return None, verdict
        if deid is None:
            return dataset, Verdict("forward", findings, b"", sop_class, sop_instance)
        deid.apply(ds, scanner)
        out = dataset_to_json(
            ds, bulk, drop_bulk=mask, drop_retrieve=mask and not self._retain_uids
        )
        return out, Verdict("deidentified", findings, b"", sop_class, sop_instance)

    def _mask_json(
        self, datasets: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], tuple[Finding, ...]]:
        if not isinstance(datasets, list):
            raise InstanceError("expected a list of DICOM JSON datasets")
        if self._mask is None:
            raise InstanceError("masking needs a UID key and none is configured")
        masked: list[dict[str, Any]] = []
        findings: list[Finding] = []
        for dataset in datasets:
            out, verdict = self._inspect_json(dataset, self._mask, mask=True)
            findings.extend(verdict.findings)
            if out is not None:
                masked.append(out)
        return masked, tuple(findings)

    def _blocked_by(self, findings: tuple[Finding, ...]) -> tuple[str, ...]:
        rules: list[str] = []
        blocks = self._blocks
        for finding in findings:
            rule = finding.rule
            blocking = blocks.get(rule)
            if blocking is None:
                blocking = any(rule_matches(selector, rule) for selector in self._block)
                if rule in RULE_IDS:  # the cache holds known rule ids only
                    blocks[rule] = blocking
            if blocking and rule not in rules:
                rules.append(rule)
        return tuple(rules)


def _original_uids(ds: Dataset) -> tuple[str, str]:
    """SOP Class / Instance UID as received (the dataset's, else the file meta's)."""
    meta = getattr(ds, "file_meta", None)
    return _uid(ds, meta, _SOP_CLASS, _MEDIA_SOP_CLASS), _uid(
        ds, meta, _SOP_INSTANCE, _MEDIA_SOP_INSTANCE
    )


def _uid(ds: Dataset, meta: Dataset | None, tag: int, meta_tag: int) -> str:
    for source, key in ((ds, tag), (meta, meta_tag)):
        if source is not None and key in source:
            values = decoded_text(source.get_item(key), ["ascii"])
            text = "\\".join(values).strip(" \x00")
            if text:
                return text
    return ""
