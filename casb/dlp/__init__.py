"""DLP on DICOM headers: PHI rules (PS3.15 Annex E as data), detectors,
de-identification, streaming header extraction and response masking."""

from casb.dlp.findings import Finding, InstanceError, Verdict
from casb.dlp.profile import DEID_OPTIONS, RULE_IDS, DlpProfile, DlpSettings, rule_matches

__all__ = [
    "DEID_OPTIONS",
    "RULE_IDS",
    "DlpProfile",
    "DlpSettings",
    "Finding",
    "InstanceError",
    "Verdict",
    "rule_matches",
]
