"""PS3.15 Annex E, Table E.1-1 as data: which action the Basic Application Level
Confidentiality Profile (and its options) takes on each attribute.

The table ships as ``casb/dlp/data/ps3.15-table-e1-1.json`` (innolitics/dicom-standard,
see ``casb/dlp/data/README.md``); it is loaded once and never hand-edited. Each row has
a ``basicProfile`` action and, for the options that change it, one key per option
(``rtnUIDsOpt: K``, ``cleanDescOpt: C``...). Actions:

* ``X`` remove, ``Z`` empty (or dummy) value, ``D`` dummy value, ``U`` replace UIDs
  consistently, ``K`` keep, ``C`` clean (keep what is not identifying).

Composite basic actions leave the choice to the implementation ("X/Z": remove, or empty
if the IOD needs the attribute). We resolve each to one action, privacy first but
keeping type-2 attributes present so de-identified instances stay valid:

* ``X/Z`` -> ``Z``, ``Z/D`` -> ``Z``, ``X/Z/D`` -> ``Z``: an empty value is as private as
  a removal and keeps the attribute for IODs where it is type 2 (Z is allowed where D is
  "only if type 1"; we choose not to invent values).
* ``X/D`` -> ``X``: removal needs no made-up value.
* ``X/Z/U*`` -> ``U``: the reference sequences (Referenced Image, Source Image) stay, with
  their UIDs replaced, so references between de-identified instances still resolve.

Attributes not in the table are kept, except private attributes (odd groups), which
follow the table's private-attributes row (remove; "C" with the Retain Safe Private
Option: keep only those on the safe list).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Final, Literal, cast

from casb.dlp.profile import DEID_OPTIONS

Action = Literal["X", "Z", "D", "U", "K", "C"]

TABLE_RESOURCE: Final = "ps3.15-table-e1-1.json"
BASIC_ACTIONS: Final[frozenset[str]] = frozenset({"X", "Z", "D", "U", "K", "C"})
COMPOSITE_ACTIONS: Final[Mapping[str, Action]] = {
    "X/Z": "Z",
    "X/D": "X",
    "Z/D": "Z",
    "X/Z/D": "Z",
    "X/Z/U*": "U",
}
OPTION_KEYS: Final[frozenset[str]] = frozenset(key for key, _, _ in DEID_OPTIONS.values())
PRIVATE_ROW_ID: Final = "ggggeeee-where-gggg-is-odd"


@dataclass(frozen=True, slots=True)
class Row:
    """One row of Table E.1-1."""

    tag: str  # as the table writes it: "(0010,0010)", "(50XX,XXXX)"
    name: str
    basic: str  # as written, e.g. "X/Z/D"
    action: Action  # the basic action resolved to one
    options: Mapping[str, str] = field(default_factory=dict)  # option key -> "K" | "C"

    @property
    def descriptor(self) -> bool:
        """A free-text descriptor (the Clean Descriptors Option applies to it)."""
        return "cleanDescOpt" in self.options


@dataclass(frozen=True, slots=True)
class TagPattern:
    """A row that covers a family of tags, e.g. ``(60XX,3000)``: tag & mask == value."""

    mask: int
    value: int
    row: Row

    def matches(self, tag: int) -> bool:
        return tag & self.mask == self.value


@dataclass(frozen=True, slots=True)
class RuleTable:
    """The loaded table: rows by integer tag, the pattern rows, the private row."""

    rows: Mapping[int, Row]
    patterns: tuple[TagPattern, ...]
    private: Row
    row_count: int

    def row_for(self, tag: int) -> Row | None:
        """The row for a public tag (exact rows first, then the group patterns)."""
        row = self.rows.get(tag)
        if row is not None:
            return row
        for pattern in self.patterns:
            if pattern.matches(tag):
                return pattern.row
        return None


def resolve_basic(code: str) -> Action:
    """One action for a basic-profile code (composites resolved as the module says)."""
    if code in BASIC_ACTIONS:
        return cast(Action, code)
    try:
        return COMPOSITE_ACTIONS[code]
    except KeyError:
        raise ValueError(f"unknown basic profile action {code!r}") from None


def resolve(row: Row, option_keys: frozenset[str]) -> Action:
    """The action for a row with the enabled options (table keys, e.g. "rtnUIDsOpt").

    An enabled option overrides the basic action when the row names it; when several
    enabled options apply, keeping (K) wins over cleaning (C).
    """
    overrides = {row.options[k] for k in option_keys if k in row.options}
    if not overrides:
        return row.action
    return "K" if "K" in overrides else "C"


def _parse_tag(text: str) -> tuple[int, int]:
    """``(0010,0010)`` -> (tag, full mask); ``(60XX,3000)`` -> (0x60003000, 0xFF00FFFF)."""
    digits = text.strip().strip("()").replace(",", "")
    if len(digits) != 8:
        raise ValueError(f"unexpected tag {text!r} in {TABLE_RESOURCE}")
    value = mask = 0
    for char in digits:
        value <<= 4
        mask <<= 4
        if char in "Xx":
            continue
        value |= int(char, 16)
        mask |= 0xF
    return value, mask


def _row(raw: Mapping[str, object]) -> Row:
    basic = str(raw["basicProfile"])
    options = {k: str(v) for k, v in raw.items() if k in OPTION_KEYS}
    for key, value in options.items():
        if value not in ("K", "C"):
            raise ValueError(f"unexpected option action {value!r} for {key} in {TABLE_RESOURCE}")
    return Row(
        tag=str(raw["tag"]),
        name=str(raw["name"]),
        basic=basic,
        action=resolve_basic(basic),
        options=options,
    )


def parse_table(rows: Iterable[Mapping[str, object]]) -> RuleTable:
    """Build the lookup from the table's JSON rows."""
    exact: dict[int, Row] = {}
    patterns: list[TagPattern] = []
    private: Row | None = None
    count = 0
    for raw in rows:
        count += 1
        row = _row(raw)
        if raw.get("id") == PRIVATE_ROW_ID:
            private = row
            continue
        value, mask = _parse_tag(row.tag)
        if mask == 0xFFFFFFFF:
            exact[value] = row
        else:
            patterns.append(TagPattern(mask=mask, value=value, row=row))
    if private is None:
        raise ValueError(f"{TABLE_RESOURCE} has no private-attributes row")
    return RuleTable(rows=exact, patterns=tuple(patterns), private=private, row_count=count)


@lru_cache(maxsize=1)
def load_table() -> RuleTable:
    """The packaged table, loaded once."""
    text = resources.files("casb.dlp").joinpath("data", TABLE_RESOURCE).read_text("utf-8")
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{TABLE_RESOURCE}: expected a list of rows")
    return parse_table(data)


def option_keys(options: Iterable[str]) -> frozenset[str]:
    """Policy option names (``retain_uids``) -> the table's keys (``rtnUIDsOpt``)."""
    keys = set()
    for name in options:
        try:
            keys.add(DEID_OPTIONS[name][0])
        except KeyError:
            raise ValueError(f"unknown de-identification option {name!r}") from None
    return frozenset(keys)


class ActionTable:
    """The resolved action of every tag for one set of enabled options.

    Built once per profile; ``action(tag)`` is a dict lookup for listed tags.
    """

    def __init__(self, table: RuleTable, options: Iterable[str]) -> None:
        self.table = table
        self.option_keys = option_keys(options)
        self._exact: dict[int, Action] = {
            tag: resolve(row, self.option_keys) for tag, row in table.rows.items()
        }
        self._patterns: tuple[tuple[int, int, Action], ...] = tuple(
            (p.mask, p.value, resolve(p.row, self.option_keys)) for p in table.patterns
        )
        self.private: Action = resolve(table.private, self.option_keys)

    def action(self, tag: int) -> Action:
        """The action for a tag; private tags get the private row's action; K if unlisted."""
        if (tag >> 16) & 1:
            return self.private
        found = self._exact.get(tag)
        if found is not None:
            return found
        for mask, value, action in self._patterns:
            if tag & mask == value:
                return action
        return "K"

    def basic(self, tag: int) -> Action:
        """The action without options (what C falls back to when it cannot clean)."""
        if (tag >> 16) & 1:
            return self.table.private.action
        row = self.table.row_for(tag)
        return "K" if row is None else row.action
