"""What DLP reports and decides about one instance. Findings never carry values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason an instance may carry PHI: which rule, which attribute, where.

    ``keyword`` is the DICOM keyword ("PatientName"), or "" for private and unknown
    attributes; ``tag`` is "(0010,0010)" (private: "(0019,xx10)" plus the creator is not
    recorded — creators can be free text); ``path`` locates it inside sequences, e.g.
    "ReferencedStudySequence[0].StudyDescription"; top-level attributes have their
    keyword (or tag) as path. Never the value.
    """

    rule: str
    keyword: str
    tag: str
    path: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "keyword": self.keyword, "tag": self.tag, "path": self.path}


class InstanceError(Exception):
    """The bytes are not an instance DLP can read (truncated, garbage, header too large).

    ``reason`` is safe to show and audit: it never quotes the input.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one instance.

    ``header``: the bytes to forward in place of the inspected bytes (the original bytes
    when nothing changed). ``sop_class_uid`` / ``sop_instance_uid`` are the *original*
    UIDs, for the STOW-RS Failed SOP Sequence when the instance is blocked.
    """

    action: Literal["forward", "block", "deidentified"]
    findings: tuple[Finding, ...]
    header: bytes
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    blocked_by: tuple[str, ...] = field(default=())  # rule ids that caused a block
