"""The facts every decider shares: who asks (Principal), what for (Action),
on what (Resource), and when/from where (RequestFacts).

Plain immutable values, no I/O: the classifier produces Action + Resource, identity
produces Principal, the edge produces RequestFacts, and the policy engine reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class Action(StrEnum):
    """What a request does, independent of the protocol that carries it (DESIGN.md)."""

    SEARCH = "search"  # QIDO-RS
    RETRIEVE = "retrieve"  # WADO-RS/URI instances, frames, rendered, thumbnail, bulkdata
    RETRIEVE_METADATA = "retrieve_metadata"  # WADO-RS .../metadata
    STORE = "store"  # STOW-RS, object uploads
    DELETE = "delete"
    LIST = "list"  # bucket listing
    WORKLIST = "worklist"  # UPS-RS
    CAPABILITIES = "capabilities"
    UNKNOWN = "unknown"  # always denied unless a policy names it explicitly


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. Built by identity from a verified token."""

    subject: str
    issuer: str
    roles: frozenset[str]
    mfa: bool = False
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    expires_at: float | None = None  # epoch seconds (the token's exp)
    token_id: str | None = None  # jti, when the token has one
    # epoch seconds (the token's iat), when it has one: `casb token revoke --sub` revokes
    # the subject's tokens issued before a time
    issued_at: float | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    """What a request touches. Fields the URL does not carry stay None/empty."""

    destination: str
    route: str = ""  # the matched route template, e.g. "/studies/{study}/series"; never raw
    study_uid: str | None = None
    series_uid: str | None = None
    instance_uid: str | None = None
    frames: tuple[int, ...] = ()
    # QIDO-RS / WADO-URI query keys (DICOM keywords where the key names an attribute)
    # mapped to every value given. Values can be PHI: never log them.
    query: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)
    # Object stores (S3, GCS, Azure Blob): the bucket (container) and object key (blob
    # name) the URL names, and the store operation, e.g. "PutObject", "UploadPart",
    # "PutBlock". Keys can be PHI (file names): audit records carry them only hashed.
    bucket: str | None = None
    key: str | None = None
    operation: str = ""
    # CopyObject / UploadPartCopy: the (bucket, key) read from; authorized as a retrieve.
    copy_source: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the edge knows about the request itself, apart from its URL."""

    time: datetime  # timezone-aware
    method: str = "GET"
    client_ip: str = ""
