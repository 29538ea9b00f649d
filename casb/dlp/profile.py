"""The DLP section of a policy file: named profiles and detector settings (pydantic).

A policy file may carry::

    dlp:
      profiles:
        clinical-guard:
          block: [private_tag, burned_in_annotation.yes]   # findings that stop an instance
        research-basic:
          deidentify: [retain_longitudinal_modified_dates, clean_descriptors]
          block: [burned_in_annotation]                    # pixels cannot be cleaned
        audit-only: {}                                      # alert: audit findings only
      mrn_patterns: ['\\bMRN[:#\\s]*\\d{5,}\\b']
      safe_private: [{creator: "GEMS_ACQU_01", tag: "0019,xx0C"}]
      burned_in_modalities: [US, SC, OT, XA, ES]

Rules reference a profile by name in an obligation: ``dlp: research-basic`` inspects
(and blocks / de-identifies) uploaded instances; ``mask: research-view`` de-identifies
what the upstream returns (QIDO-RS / WADO-RS metadata, WADO-RS instances).

Every detector always runs and every finding is audited ("alert"); ``block`` lists the
rule ids or families whose findings stop the instance; ``deidentify`` (a list of
profile options, ``[]`` for the basic profile alone) rewrites the header of every
instance that is not blocked.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Option names as written in policies -> the key of that option in PS3.15 Table E.1-1
# (casb/dlp/data/ps3.15-table-e1-1.json) -> DICOM code (CID 7050) for
# De-identification Method Code Sequence.
DEID_OPTIONS: dict[str, tuple[str, str, str]] = {
    "retain_safe_private": ("rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
    "retain_uids": ("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain_device_identity": ("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain_institution_identity": (
        "rtnInstIdOpt",
        "113112",
        "Retain Institution Identity Option",
    ),
    "retain_patient_characteristics": (
        "rtnPatCharsOpt",
        "113108",
        "Retain Patient Characteristics Option",
    ),
    "retain_longitudinal_full_dates": (
        "rtnLongFullDatesOpt",
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain_longitudinal_modified_dates": (
        "rtnLongModifDatesOpt",
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "clean_descriptors": ("cleanDescOpt", "113105", "Clean Descriptors Option"),
    "clean_structured_content": (
        "cleanStructContOpt",
        "113104",
        "Clean Structured Content Option",
    ),
    "clean_graphics": ("cleanGraphOpt", "113103", "Clean Graphics Option"),
}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")

DeidOption = Literal[
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]

# Every rule id a finding can carry. A profile's ``block`` entry is one of these or a
# family (the part before the dot), which matches all of the family's rules.
RULE_IDS: tuple[str, ...] = (
    "annex_e",  # an attribute the basic profile removes or empties (X/Z) has a value
    "private_tag",  # a private element not on the safe-private allow-list
    "free_text.ssn",
    "free_text.phone",
    "free_text.email",
    "free_text.date_of_birth",
    "free_text.mrn",
    "free_text.patient_name",  # the instance's own patient name inside other text
    "free_text.patient_id",  # the instance's own patient ID inside other text
    "burned_in_annotation.yes",  # Burned In Annotation (0028,0301) = YES
    "burned_in_annotation.unknown",  # absent, for a modality that often burns in text
    "identity_removed_contradicted",  # Patient Identity Removed = YES, yet PHI present
    "trailing_data",  # elements after Pixel Data: always stripped, audited, never blocks
)
RULE_FAMILIES: frozenset[str] = frozenset(r.split(".", 1)[0] for r in RULE_IDS)


def rule_matches(selector: str, rule: str) -> bool:
    """A ``block`` entry matches a rule id exactly, or every rule of its family."""
    return selector == rule or rule.startswith(selector + ".")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_rule(value: str) -> str:
    if value not in RULE_IDS and value not in RULE_FAMILIES:
        raise ValueError(f"unknown DLP rule '{value}' (known: {', '.join(RULE_IDS)})")
    return value


class DlpProfile(_Model):
    """What to do with an instance, given its findings."""

    description: str = ""
    block: list[str] = []
    deidentify: list[DeidOption] | None = None

    @field_validator("block")
    @classmethod
    def _known_rules(cls, values: list[str]) -> list[str]:
        for v in values:
            if v == "trailing_data":
                raise ValueError(
                    "trailing_data cannot block: it is found after the instance's header and "
                    "pixels went upstream, so it is always stripped (and audited) instead"
                )
        return [_known_rule(v) for v in values]


_PRIVATE_TAG = re.compile(r"^[0-9A-Fa-f]{4},xx[0-9A-Fa-f]{2}$")


class SafePrivate(_Model):
    """A private attribute known to carry no identifying information."""

    creator: Annotated[str, Field(min_length=1, max_length=64)]
    tag: Annotated[str, Field(pattern=_PRIVATE_TAG.pattern, description="e.g. 0019,xx0C")]

    @field_validator("tag")
    @classmethod
    def _odd_group(cls, value: str) -> str:
        if int(value[:4], 16) % 2 == 0:
            raise ValueError("a private tag has an odd group number")
        return value


DEFAULT_MRN_PATTERNS = (r"\bMRN[:#\s]*\d{5,}\b",)
DEFAULT_BURNED_IN_MODALITIES = ("US", "SC", "OT", "XA", "ES")


class DlpSettings(_Model):
    """The ``dlp`` section of a policy file."""

    profiles: dict[Annotated[str, Field(min_length=1, max_length=200)], DlpProfile] = {}
    mrn_patterns: list[str] = list(DEFAULT_MRN_PATTERNS)
    safe_private: list[SafePrivate] = []
    burned_in_modalities: list[str] = list(DEFAULT_BURNED_IN_MODALITIES)

    @field_validator("mrn_patterns")
    @classmethod
    def _compiles(cls, values: list[str]) -> list[str]:
        for v in values:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"mrn pattern {v!r} does not compile: {exc}") from None
        return values
