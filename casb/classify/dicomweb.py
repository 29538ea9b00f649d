"""DICOMweb (PS3.18) request -> Classification: QIDO-RS, WADO-RS, WADO-URI, STOW-RS,
delete, UPS-RS and capabilities.

Input is a normalized target (see normalize.py) relative to the destination's base
URL. Every route is listed in `_ROUTES`; a path that matches none of them, a UID
or frame list that is not well formed, or a method a route does not take is
`Action.UNKNOWN` with a reason that never quotes the request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

from pydicom.datadict import keyword_for_tag, tag_for_keyword

from casb.classify import Classification
from casb.context import Action, Resource

__all__ = ["classify_dicomweb"]

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_UID_MAX = 64
_FRAMES = re.compile(r"[1-9][0-9]{0,9}(?:,[1-9][0-9]{0,9})*")  # each at most 10 digits
_FRAMES_MAX = 1000
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII, no backslash
_BULK_TAG_PART = re.compile(r"[0-9A-Fa-f]{8}|0|[1-9][0-9]{0,8}")  # tag or item index
_BULK_NAME_PART = re.compile(r"[A-Za-z0-9._-]+")
_TAG_KEY = re.compile(r"[0-9A-Fa-f]{8}")
_MULTI_VALUE = re.compile(r"[,\\]")

_NO_ROUTE = "no DICOMweb route matches this path"
_EMPTY_QUERY: Mapping[str, tuple[str, ...]] = MappingProxyType({})


def _is_uid(text: str) -> bool:
    return len(text) <= _UID_MAX and _UID.fullmatch(text) is not None


def _is_frame_list(text: str) -> bool:
    return text.count(",") < _FRAMES_MAX and _FRAMES.fullmatch(text) is not None


def _is_ae_title(text: str) -> bool:
    return _AE_TITLE.fullmatch(text) is not None and not text.isspace()


def _is_bulk_tag_part(text: str) -> bool:
    return _BULK_TAG_PART.fullmatch(text) is not None


def _is_bulk_name_part(text: str) -> bool:
    return _BULK_NAME_PART.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class _Param:
    label: str  # for reasons: "invalid <label> in the path"
    check: Callable[[str], bool]
    greedy: bool = False  # takes every remaining segment (at least one); last in a route


_PARAMS: Mapping[str, _Param] = {
    "study": _Param("study UID", _is_uid),
    "series": _Param("series UID", _is_uid),
    "instance": _Param("instance UID", _is_uid),
    "workitem": _Param("workitem UID", _is_uid),
    "frames": _Param("frame list", _is_frame_list),
    "aetitle": _Param("AE title", _is_ae_title),
    "tags": _Param("bulkdata tag path", _is_bulk_tag_part, greedy=True),
    "path": _Param("bulkdata path", _is_bulk_name_part, greedy=True),
}

_GET_SEARCH = {"GET": Action.SEARCH}
_GET_RETRIEVE = {"GET": Action.RETRIEVE}
_GET_METADATA = {"GET": Action.RETRIEVE_METADATA}
_UPS = dict.fromkeys(("GET", "POST", "PUT", "DELETE"), Action.WORKLIST)
_INSTANCE = "/studies/{study}/series/{series}/instances/{instance}"

_ROUTES: tuple[tuple[str, Mapping[str, Action]], ...] = (
    ("/studies", {"GET": Action.SEARCH, "POST": Action.STORE}),
    ("/series", _GET_SEARCH),
    ("/instances", _GET_SEARCH),
    ("/studies/{study}", {"GET": Action.RETRIEVE, "POST": Action.STORE, "DELETE": Action.DELETE}),
    ("/studies/{study}/metadata", _GET_METADATA),
    ("/studies/{study}/rendered", _GET_RETRIEVE),
    ("/studies/{study}/thumbnail", _GET_RETRIEVE),
    ("/studies/{study}/instances", _GET_SEARCH),
    ("/studies/{study}/series", _GET_SEARCH),
    ("/studies/{study}/series/{series}", {"GET": Action.RETRIEVE, "DELETE": Action.DELETE}),
    ("/studies/{study}/series/{series}/metadata", _GET_METADATA),
    ("/studies/{study}/series/{series}/rendered", _GET_RETRIEVE),
    ("/studies/{study}/series/{series}/thumbnail", _GET_RETRIEVE),
    ("/studies/{study}/series/{series}/instances", _GET_SEARCH),
    (_INSTANCE, {"GET": Action.RETRIEVE, "DELETE": Action.DELETE}),
    (_INSTANCE + "/metadata", _GET_METADATA),
    (_INSTANCE + "/rendered", _GET_RETRIEVE),
    (_INSTANCE + "/thumbnail", _GET_RETRIEVE),
    (_INSTANCE + "/frames/{frames}", _GET_RETRIEVE),
    (_INSTANCE + "/frames/{frames}/rendered", _GET_RETRIEVE),
    (_INSTANCE + "/frames/{frames}/thumbnail", _GET_RETRIEVE),
    (_INSTANCE + "/bulk/{tags}", _GET_RETRIEVE),  # Orthanc-style bulkdata URIs
    ("/bulkdata/{path}", _GET_RETRIEVE),
    ("/workitems", _UPS),
    ("/workitems/{workitem}", _UPS),
    ("/workitems/{workitem}/state", _UPS),
    ("/workitems/{workitem}/cancelrequest", _UPS),
    ("/workitems/{workitem}/subscribers/{aetitle}", _UPS),
    ("/workitems/{workitem}/subscribers/{aetitle}/suspend", _UPS),
)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    route: str
    methods: Mapping[str, Action]


@dataclass(slots=True)
class _Node:
    literals: dict[str, _Node] = field(default_factory=dict)
    param_name: str = ""
    param_child: _Node | None = None
    endpoint: _Endpoint | None = None


def _build_trie() -> _Node:
    root = _Node()
    for route, methods in _ROUTES:
        node = root
        for token in route[1:].split("/"):
            if token.startswith("{"):
                name = token[1:-1]
                assert node.param_name in ("", name), route
                node.param_name = name
                if node.param_child is None:
                    node.param_child = _Node()
                node = node.param_child
            else:
                node = node.literals.setdefault(token, _Node())
        node.endpoint = _Endpoint(route, MappingProxyType(dict(methods)))
    return root


_ROOT = _build_trie()


def _match(segments: tuple[str, ...]) -> tuple[_Endpoint, dict[str, str]] | str:
    """The endpoint and its captured segments, or why nothing matches."""
    node = _ROOT
    captures: dict[str, str] = {}
    for i, seg in enumerate(segments):
        literal = node.literals.get(seg)
        if literal is not None:
            node = literal
            continue
        if node.param_child is None:
            return _NO_ROUTE
        param = _PARAMS[node.param_name]
        rest = segments[i:] if param.greedy else (seg,)
        if not all(param.check(part) for part in rest):
            return f"invalid {param.label} in the path"
        captures[node.param_name] = "/".join(rest)
        node = node.param_child
        if param.greedy:
            break
    if node.endpoint is None:
        return _NO_ROUTE
    return node.endpoint, captures


@lru_cache(maxsize=4096)
def _query_key(name: str) -> tuple[str, bool]:
    """(key with 8-hex-digit tags read as keywords, whether it names known attributes)."""
    parts = name.split(".")
    known = True
    for i, part in enumerate(parts):
        if _TAG_KEY.fullmatch(part):
            keyword = keyword_for_tag(int(part, 16))
            if keyword:
                parts[i] = keyword
                continue
            known = False
        elif tag_for_keyword(part) is None:
            known = False
    return ".".join(parts), known


def _query_map(query: tuple[tuple[str, str], ...]) -> Mapping[str, tuple[str, ...]]:
    if not query:
        return _EMPTY_QUERY
    values: dict[str, list[str]] = {}
    for name, value in query:
        key, is_attribute = _query_key(name)
        found = values.setdefault(key, [])
        if is_attribute and ("," in value or "\\" in value):
            found.extend(_MULTI_VALUE.split(value))
        else:
            found.append(value)
    return MappingProxyType({key: tuple(found) for key, found in values.items()})


# WADO-URI (PS3.18 §9): names are case-sensitive, and each must appear exactly once.
_WADO_ROUTE = "/wado?requestType=WADO"
_WADO_UIDS = ("studyUID", "seriesUID", "objectUID")
_WADO_NAMES = {name.lower(): name for name in ("requestType", *_WADO_UIDS)}


def _wado_uri(query: tuple[tuple[str, str], ...]) -> dict[str, str] | str:
    """The WADO-URI parameters that matter, or why this is not a WADO-URI request."""
    seen: dict[str, list[str]] = {}
    for name, value in query:
        canonical = _WADO_NAMES.get(name.lower())
        if canonical is None:
            continue
        if name != canonical:  # an upstream may read names case-insensitively
            return f"WADO-URI parameter {canonical} has the wrong case"
        seen.setdefault(canonical, []).append(value)
    for name in _WADO_NAMES.values():
        if len(seen.get(name, ())) != 1:
            return f"WADO-URI needs exactly one {name}"
    if seen["requestType"][0] != "WADO":
        return "WADO-URI requestType must be WADO"
    for name in _WADO_UIDS:
        if not _is_uid(seen[name][0]):
            return f"WADO-URI {name} is not a valid UID"
    return {name: seen[name][0] for name in _WADO_UIDS}


_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "OPTIONS"})


def _unknown(destination: str, reason: str) -> Classification:
    return Classification(Action.UNKNOWN, Resource(destination=destination), reason)


def classify_dicomweb(
    method: str,
    segments: tuple[str, ...],
    query: tuple[tuple[str, str], ...],
    destination: str,
) -> Classification:
    """Classify a DICOMweb request.

    `method` is the effective method (HEAD already read as GET); `segments` and
    `query` come from a normalized target, with the destination's base path removed.
    """
    if method not in _METHODS:
        return _unknown(destination, "HTTP method not supported for DICOMweb")
    if not segments and method == "OPTIONS":
        return Classification(Action.CAPABILITIES, Resource(destination=destination, route="/"))
    if segments in ((), ("wado",)):
        wado = _wado_uri(query)
        if isinstance(wado, str):
            return _unknown(destination, wado)
        if method not in ("GET", "OPTIONS"):
            return _unknown(destination, f"method not allowed on {_WADO_ROUTE}")
        return Classification(
            Action.RETRIEVE if method == "GET" else Action.CAPABILITIES,
            Resource(
                destination=destination,
                route=_WADO_ROUTE,
                study_uid=wado["studyUID"],
                series_uid=wado["seriesUID"],
                instance_uid=wado["objectUID"],
                query=_query_map(query),
            ),
        )

    matched = _match(segments)
    if isinstance(matched, str):
        return _unknown(destination, matched)
    endpoint, captures = matched
    if method == "OPTIONS":
        action = Action.CAPABILITIES
    else:
        found = endpoint.methods.get(method)
        if found is None:
            return _unknown(destination, f"method not allowed on {endpoint.route}")
        action = found
    frames = captures.get("frames")
    return Classification(
        action,
        Resource(
            destination=destination,
            route=endpoint.route,
            study_uid=captures.get("study"),
            series_uid=captures.get("series"),
            # A UPS workitem is a SOP Instance: its UID goes where instance UIDs go.
            instance_uid=captures.get("instance") or captures.get("workitem"),
            frames=tuple(int(n) for n in frames.split(",")) if frames else (),
            query=_query_map(query),
        ),
    )
