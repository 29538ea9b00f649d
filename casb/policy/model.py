"""The policy file format, as pydantic models (the source of ``policies/schema.json``).

A policy file::

    version: 1
    description: free text
    roles:
      staff: {description: "any hospital employee"}
      radiologist: {inherits: [staff]}
    rules:
      - id: radiologist-read
        effect: allow                       # allow | deny
        roles: [radiologist]                # or ["*"]: any authenticated principal
        actions: [search, retrieve]         # Action values, or ["*"]
        destinations: [pacs]                # destination names, or ["*"]
        when: {mfa: true, claims: {...}, query: {...}, resource: {...}, time: {...}}
        obligations: {dlp: research-basic}  # see casb.dlp.profile (the `dlp:` section)

Every model forbids unknown fields, so a typo fails the load instead of silently
widening a rule. These models only describe and validate the *shape*; cross-file
checks (unique rule ids, defined roles, inheritance cycles, known destinations, time
zones) and compilation happen in :mod:`casb.policy.loader`. The semantics of the
conditions are documented in :mod:`casb.policy.engine`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    PlainValidator,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from casb.dlp.profile import DlpSettings

WILDCARD = "*"

Name = Annotated[str, Field(min_length=1, max_length=200)]
NonEmpty = Annotated[str, Field(min_length=1)]

ActionName = Literal[
    "*",
    "search",
    "retrieve",
    "retrieve_metadata",
    "store",
    "delete",
    "list",
    "worklist",
    "capabilities",
    "unknown",
]
DayName = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

RULE_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
_HHMM_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


def _scalar(value: object) -> str | bool | int | float:
    if isinstance(value, str | bool | int | float):
        return value
    raise ValueError("expected a string, number or boolean")


def _obligation_value(value: object) -> str | bool | int | list[str]:
    if isinstance(value, str | bool | int):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("expected a string, boolean, integer or list of strings")


def _prefix(value: object) -> str | list[str]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise ValueError("expected a non-empty string or a non-empty list of non-empty strings")


# One validator each (instead of a pydantic union) keeps error messages to one line.
Scalar = Annotated[
    str | bool | int | float,
    PlainValidator(_scalar, json_schema_input_type=str | bool | int | float),
]
Prefix = Annotated[
    str | list[str],
    PlainValidator(
        _prefix,
        json_schema_input_type=NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)],
    ),
]
ObligationValue = Annotated[
    str | bool | int | list[str],
    PlainValidator(_obligation_value, json_schema_input_type=str | bool | int | list[str]),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleDef(_Model):
    """A role. Holding it also grants every role it inherits, transitively."""

    description: str = ""
    inherits: list[Name] = []


class Matcher(_Model):
    """One comparison against a fact: exactly one operator.

    A bare scalar or list is shorthand for ``{in: [...]}``.
    """

    in_: list[Scalar] | None = Field(default=None, alias="in", min_length=1)
    not_in: list[Scalar] | None = Field(default=None, min_length=1)
    equals: Scalar | None = None
    prefix: Prefix | None = None
    present: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, list):
            return {"in": data}
        if isinstance(data, str | bool | int | float):
            return {"in": [data]}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> Matcher:
        given = [name for name in self.model_fields_set if getattr(self, name) is not None]
        if len(given) != 1 or len(self.model_fields_set) != 1:
            raise ValueError(
                "a matcher needs exactly one operator (in, not_in, equals, prefix or "
                "present) with a value"
            )
        return self

    @property
    def operator(self) -> str:
        """The operator's name as written in the file (``in``, ``not_in``, ...)."""
        (name,) = self.model_fields_set
        return "in" if name == "in_" else name

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        obj = handler.resolve_ref_schema(schema)
        for prop in obj["properties"].values():  # null is not a valid operator value
            prop.pop("default", None)
            options = [o for o in prop.pop("anyOf") if o != {"type": "null"}]
            if len(options) == 1:
                prop.update(options[0])
            else:
                prop["anyOf"] = options
        obj["minProperties"] = 1
        obj["maxProperties"] = 1
        scalar: dict[str, Any] = {"type": ["string", "boolean", "integer", "number"]}
        return {
            "anyOf": [
                scalar,
                {"type": "array", "items": scalar, "minItems": 1},
                obj,
            ],
            "description": "A scalar or list (shorthand for {in: [...]}), or a mapping "
            "with exactly one operator.",
        }


class ResourceConditions(_Model):
    """Conditions on what the request URL names: DICOM UIDs, and for object stores the
    bucket (Azure: container) and object key (blob name), e.g. ``key: {prefix: research/}``.
    """

    study_uid: Matcher | None = None
    series_uid: Matcher | None = None
    instance_uid: Matcher | None = None
    bucket: Matcher | None = None
    key: Matcher | None = None


class TimeWindow(_Model):
    """When a rule applies, in a given IANA time zone.

    ``after`` is inclusive, ``before`` exclusive (HH:MM, 24 h). A window whose ``after``
    is later than its ``before`` wraps midnight (a night shift 19:00-07:00). ``days``
    are the weekdays of the request's local date.
    """

    after: Annotated[str, Field(pattern=_HHMM_PATTERN)] | None = None
    before: Annotated[str, Field(pattern=_HHMM_PATTERN)] | None = None
    days: list[DayName] | None = Field(default=None, min_length=1)
    timezone: Annotated[str, Field(min_length=1, max_length=100)]

    @field_validator("after", "before", mode="before")
    @classmethod
    def _quoted_time(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(
                'write times as quoted strings such as "19:00" '
                "(unquoted, YAML reads 19:00 as a number)"
            )
        return value

    @model_validator(mode="after")
    def _something_to_check(self) -> TimeWindow:
        if self.after is None and self.before is None and self.days is None:
            raise ValueError("a time condition needs at least one of after, before or days")
        if self.after is not None and self.after == self.before:
            raise ValueError("after and before are equal: the window would be empty")
        return self


class Conditions(_Model):
    """The optional ``when`` of a rule: every listed condition must hold."""

    mfa: bool | None = None
    claims: dict[Name, Matcher] = {}
    query: dict[Name, Matcher] = {}
    resource: ResourceConditions = ResourceConditions()
    time: TimeWindow | None = None


def _lone_wildcard(values: list[str]) -> list[str]:
    if WILDCARD in values and len(values) > 1:
        raise ValueError("'*' must be the only entry when it is used")
    return values


class Rule(_Model):
    """One allow or deny rule."""

    id: Annotated[str, Field(pattern=RULE_ID_PATTERN, max_length=128)]
    description: str = ""
    effect: Literal["allow", "deny"]
    roles: list[Name] = Field(min_length=1)
    actions: list[ActionName] = Field(min_length=1)
    destinations: list[Name] = Field(min_length=1)
    when: Conditions = Conditions()
    obligations: dict[Name, ObligationValue] = {}

    @field_validator("roles", "actions", "destinations")
    @classmethod
    def _check_wildcards(cls, values: list[str]) -> list[str]:
        return _lone_wildcard(values)

    @model_validator(mode="after")
    def _deny_has_no_obligations(self) -> Rule:
        if self.effect == "deny" and self.obligations:
            raise ValueError("obligations: only allow rules carry obligations")
        return self


class PolicyDocument(_Model):
    """One policy file. Several files are merged in load order."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="casb policy",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    version: Literal[1]
    description: str = ""
    roles: dict[Name, RoleDef] = {}
    rules: list[Rule] = []
    dlp: DlpSettings | None = None
