"""The policy decision point: semantics of rules, roles, matchers, time, obligations."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from casb.context import Action, Principal, RequestFacts, Resource
from casb.policy import (
    CompiledPolicy,
    Decision,
    PolicyLoadError,
    compile_policy,
    load_policy,
    parse_policy,
)

REPO = Path(__file__).resolve().parents[2]
WEDNESDAY_NOON = datetime(2024, 6, 5, 12, 0, tzinfo=UTC)


def make_policy(text: str, known: set[str] | None = None) -> CompiledPolicy:
    source = "test.yaml"
    return compile_policy([(source, parse_policy(textwrap.dedent(text), source))], known)


def who(*roles: str, mfa: bool = False, claims: Mapping[str, Any] | None = None) -> Principal:
    return Principal(
        subject="user-1",
        issuer="https://idp.example",
        roles=frozenset(roles),
        mfa=mfa,
        claims=claims or {},
    )


def ask(
    policy: CompiledPolicy,
    principal: Principal,
    action: Action | str,
    destination: str = "pacs",
    *,
    query: Mapping[str, tuple[str, ...]] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    when: datetime = WEDNESDAY_NOON,
) -> Decision:
    resource = Resource(
        destination=destination,
        study_uid=study_uid,
        series_uid=series_uid,
        query=query or {},
    )
    return policy.decide(principal, Action(action), resource, RequestFacts(time=when))


ROLES = """
version: 1
roles:
  staff: {}
  radiologist: {inherits: [staff]}
  referring_physician: {inherits: [staff]}
"""


def rule_policy(rules: str, roles: str = ROLES) -> CompiledPolicy:
    return make_policy(
        textwrap.dedent(roles) + "rules:\n" + textwrap.indent(textwrap.dedent(rules), "  ")
    )


# -- roles ------------------------------------------------------------------------------


def test_inheritance_is_transitive() -> None:
    policy = make_policy(
        """
        version: 1
        roles:
          a: {}
          b: {inherits: [a]}
          c: {inherits: [b]}
        rules:
          - {id: for-a, effect: allow, roles: [a], actions: [search], destinations: [pacs]}
        """
    )
    assert ask(policy, who("c"), Action.SEARCH).allow
    assert ask(policy, who("c"), Action.SEARCH).rule_id == "for-a"
    assert policy.effective_roles({"c"}) == {"a", "b", "c"}
    assert policy.effective_roles({"a"}) == {"a"}


def test_diamond_inheritance() -> None:
    policy = make_policy(
        """
        version: 1
        roles:
          base: {}
          left: {inherits: [base]}
          right: {inherits: [base]}
          both: {inherits: [left, right]}
        rules:
          - {id: base-read, effect: allow, roles: [base], actions: [search], destinations: [pacs]}
          - {id: right-store, effect: allow, roles: [right], actions: [store], destinations: [pacs]}
        """
    )
    assert policy.effective_roles({"both"}) == {"both", "left", "right", "base"}
    assert ask(policy, who("both"), Action.SEARCH).rule_id == "base-read"
    assert ask(policy, who("both"), Action.STORE).rule_id == "right-store"
    assert not ask(policy, who("left"), Action.STORE).allow


def test_inheritance_does_not_flow_downwards() -> None:
    policy = rule_policy(
        "- {id: rad, effect: allow, roles: [radiologist], actions: [store], destinations: [pacs]}"
    )
    assert ask(policy, who("radiologist"), Action.STORE).allow
    assert not ask(policy, who("staff"), Action.STORE).allow


def test_roles_the_policy_does_not_define_are_ignored() -> None:
    policy = rule_policy(
        "- {id: rad, effect: allow, roles: [radiologist], actions: [search], destinations: [pacs]}"
    )
    assert ask(policy, who("radiologist", "offline_access", "uma_authorization"), "search").allow
    decision = ask(policy, who("offline_access"), Action.SEARCH)
    assert not decision.allow
    assert decision.reasons == (
        "no allow rule for action 'search' on destination 'pacs' for roles []",
        "none of the principal's roles is defined by the policy",
    )


def test_any_role_matches_a_principal_without_known_roles() -> None:
    policy = rule_policy(
        "- {id: caps, effect: allow, roles: ['*'], actions: [capabilities], destinations: [pacs]}"
    )
    assert ask(policy, who(), Action.CAPABILITIES).allow
    assert ask(policy, who("stranger"), Action.CAPABILITIES).allow
    assert not ask(policy, who("radiologist"), Action.SEARCH).allow


# -- decision order ---------------------------------------------------------------------


def test_deny_overrides_an_earlier_allow() -> None:
    policy = rule_policy(
        """
        - {id: rad-all, effect: allow, roles: [radiologist], actions: ['*'], destinations: [pacs]}
        - id: no-delete
          description: Nobody deletes here.
          effect: deny
          roles: ['*']
          actions: [delete]
          destinations: [pacs]
        """
    )
    assert ask(policy, who("radiologist"), Action.SEARCH).allow
    decision = ask(policy, who("radiologist"), Action.DELETE)
    assert not decision.allow
    assert decision.rule_id == "no-delete"
    assert decision.reasons == ("denied by rule 'no-delete'", "Nobody deletes here.")
    assert decision.step_up is False


def test_first_matching_deny_names_the_decision() -> None:
    policy = rule_policy(
        """
        - {id: deny-one, effect: deny, roles: [staff], actions: [store], destinations: [pacs]}
        - {id: deny-two, effect: deny, roles: [radiologist], actions: [store], destinations: ['*']}
        """
    )
    assert ask(policy, who("radiologist"), Action.STORE).rule_id == "deny-one"
    assert ask(policy, who("radiologist"), Action.STORE, "research").rule_id == "deny-two"


def test_first_matching_allow_names_the_decision() -> None:
    policy = rule_policy(
        """
        - {id: rad, effect: allow, roles: [radiologist], actions: [search], destinations: [pacs]}
        - {id: staff, effect: allow, roles: [staff], actions: [search], destinations: [pacs]}
        """
    )
    assert ask(policy, who("radiologist"), Action.SEARCH).rule_id == "rad"
    assert ask(policy, who("staff"), Action.SEARCH).rule_id == "staff"
    assert ask(policy, who("staff", "radiologist"), Action.SEARCH).rule_id == "rad"


def test_conditional_and_unconditional_denies_keep_load_order() -> None:
    policy = rule_policy(
        """
        - {id: allow-all, effect: allow, roles: [staff], actions: [store], destinations: [pacs]}
        - {id: deny-cardio, effect: deny, roles: [staff], actions: [store], destinations: [pacs],
           when: {claims: {department: cardiology}}}
        - {id: deny-refs, effect: deny, roles: [referring_physician], actions: [store],
           destinations: [pacs]}
        - {id: deny-late, effect: deny, roles: [staff], actions: [store], destinations: [pacs],
           when: {claims: {department: oncology}}}
        """
    )
    cardio, onco = {"department": "cardiology"}, {"department": "oncology"}
    assert ask(policy, who("staff"), Action.STORE).rule_id == "allow-all"
    assert ask(policy, who("staff", claims=cardio), Action.STORE).rule_id == "deny-cardio"
    assert ask(policy, who("staff", claims=onco), Action.STORE).rule_id == "deny-late"
    assert ask(policy, who("referring_physician"), Action.STORE).rule_id == "deny-refs"
    referrer = who("referring_physician", claims=cardio)
    assert ask(policy, referrer, Action.STORE).rule_id == "deny-cardio"
    assert ask(policy, who("referring_physician", claims=onco), "store").rule_id == "deny-refs"


def test_a_deny_whose_condition_fails_lets_the_allow_through() -> None:
    policy = rule_policy(
        """
        - {id: guard, effect: deny, roles: ['*'], actions: [delete], destinations: ['*'],
           when: {mfa: false}}
        - {id: rad-delete, effect: allow, roles: [radiologist], actions: [delete],
           destinations: [pacs]}
        """
    )
    assert ask(policy, who("radiologist", mfa=True), Action.DELETE).rule_id == "rad-delete"
    assert ask(policy, who("radiologist"), Action.DELETE).rule_id == "guard"


def test_default_deny_names_action_destination_and_roles() -> None:
    policy = rule_policy(
        "- {id: read, effect: allow, roles: [referring_physician], actions: [search], "
        "destinations: [pacs]}"
    )
    decision = ask(policy, who("referring_physician"), Action.STORE)
    assert decision == Decision(
        allow=False,
        rule_id=None,
        reasons=(
            "no allow rule for action 'store' on destination 'pacs' "
            "for roles [referring_physician]",
        ),
        obligations={},
    )
    two = ask(policy, who("staff", "radiologist", "extra"), Action.DELETE, "research")
    assert two.reasons == (
        "no allow rule for action 'delete' on destination 'research' "
        "for roles [radiologist, staff]",
    )


def test_an_empty_policy_denies_everything() -> None:
    policy = make_policy("version: 1")
    assert policy.rule_count == 0
    for action in Action:
        assert not ask(policy, who("anyone"), action).allow


# -- wildcards --------------------------------------------------------------------------


def test_star_actions_on_allow_excludes_unknown() -> None:
    policy = rule_policy(
        "- {id: all, effect: allow, roles: [staff], actions: ['*'], destinations: [pacs]}"
    )
    for action in Action:
        assert ask(policy, who("staff"), action).allow is (action is not Action.UNKNOWN)


def test_unknown_is_allowed_only_when_named() -> None:
    policy = rule_policy(
        "- {id: odd, effect: allow, roles: [staff], actions: [unknown], destinations: [pacs]}"
    )
    assert ask(policy, who("staff"), Action.UNKNOWN).rule_id == "odd"


def test_star_actions_on_deny_includes_unknown() -> None:
    policy = rule_policy(
        """
        - {id: odd, effect: allow, roles: [staff], actions: [unknown, search], destinations: [pacs]}
        - {id: lockdown, effect: deny, roles: [referring_physician], actions: ['*'],
           destinations: ['*']}
        """
    )
    assert ask(policy, who("staff"), Action.UNKNOWN).allow
    assert ask(policy, who("referring_physician"), Action.UNKNOWN).rule_id == "lockdown"
    assert ask(policy, who("referring_physician"), Action.SEARCH).rule_id == "lockdown"


def test_star_destination_covers_destinations_named_nowhere() -> None:
    policy = rule_policy(
        """
        - {id: any-dest, effect: allow, roles: [staff], actions: [search], destinations: ['*']}
        - {id: pacs-store, effect: allow, roles: [staff], actions: [store], destinations: [pacs]}
        """
    )
    assert ask(policy, who("staff"), Action.SEARCH, "pacs").rule_id == "any-dest"
    assert ask(policy, who("staff"), Action.SEARCH, "brand-new-bucket").rule_id == "any-dest"
    assert not ask(policy, who("staff"), Action.STORE, "brand-new-bucket").allow


def test_an_action_outside_the_enum_meets_only_blanket_denies() -> None:
    policy = rule_policy(
        """
        - {id: all, effect: allow, roles: [staff], actions: ['*'], destinations: ['*']}
        - {id: block, effect: deny, roles: [radiologist], actions: ['*'], destinations: ['*']}
        """
    )
    resource, facts = Resource("pacs"), RequestFacts(time=WEDNESDAY_NOON)
    odd = "teleport"  # a caller passing a plain string that is no Action
    assert not policy.decide(who("staff"), odd, resource, facts).allow  # type: ignore[arg-type]
    blocked = policy.decide(who("radiologist"), odd, resource, facts)  # type: ignore[arg-type]
    assert blocked.rule_id == "block"


# -- matchers: claims -------------------------------------------------------------------


def claim_policy(matcher: str, path: str = "department") -> CompiledPolicy:
    return rule_policy(
        f"""
        - id: cond
          effect: allow
          roles: [staff]
          actions: [search]
          destinations: [pacs]
          when: {{claims: {{{path}: {matcher}}}}}
        """
    )


MISSING = object()

CLAIM_CASES: list[tuple[str, object, bool]] = [
    # in
    ("{in: [radiology, nuclear]}", "radiology", True),
    ("{in: [radiology, nuclear]}", "cardiology", False),
    ("{in: [radiology, nuclear]}", ["cardiology", "nuclear"], True),
    ("{in: [radiology, nuclear]}", ["cardiology"], False),
    ("{in: [radiology, nuclear]}", [], False),
    ("{in: [radiology, nuclear]}", MISSING, False),
    ("{in: [radiology, nuclear]}", None, False),
    ("[radiology, nuclear]", "nuclear", True),  # shorthand
    ("radiology", "radiology", True),  # scalar shorthand
    ("radiology", "radiology-2", False),
    # not_in
    ("{not_in: [radiology]}", "cardiology", True),
    ("{not_in: [radiology]}", "radiology", False),
    ("{not_in: [radiology]}", ["cardiology", "radiology"], False),
    ("{not_in: [radiology]}", ["cardiology", "oncology"], True),
    ("{not_in: [radiology]}", MISSING, True),
    # equals
    ("{equals: radiology}", "radiology", True),
    ("{equals: radiology}", "Radiology", False),
    ("{equals: radiology}", ["x", "radiology"], True),
    ("{equals: radiology}", MISSING, False),
    # prefix
    ("{prefix: '1.2.826'}", "1.2.826.0.1", True),
    ("{prefix: '1.2.826'}", "1.2.8", False),
    ("{prefix: ['9.', '1.2.']}", "1.2.3", True),
    ("{prefix: ['9.', '1.2.']}", ["5", "9.1"], True),
    ("{prefix: ['9.', '1.2.']}", ["5", "6"], False),
    ("{prefix: '1.2.826'}", MISSING, False),
    # present
    ("{present: true}", "anything", True),
    ("{present: true}", [], True),
    ("{present: true}", MISSING, False),
    ("{present: true}", None, False),
    ("{present: false}", MISSING, True),
    ("{present: false}", "anything", False),
    # scalars compare as strings; booleans as true / false
    ("{in: [42]}", 42, True),
    ("{in: ['42']}", 42, True),
    ("{equals: 42}", "42", True),
    ("{equals: true}", True, True),
    ("{equals: 'true'}", True, True),
    ("{equals: true}", "True", False),
    ("{in: [1.5]}", 1.5, True),
    # a structured claim value is present but equals nothing
    ("{in: [x]}", {"x": 1}, False),
    ("{not_in: [x]}", {"x": 1}, True),
]


@pytest.mark.parametrize(("matcher", "value", "expected"), CLAIM_CASES)
def test_claim_matchers(matcher: str, value: object, expected: bool) -> None:
    policy = claim_policy(matcher)
    claims = {} if value is MISSING else {"department": value}
    decision = ask(policy, who("staff", claims=claims), Action.SEARCH)
    assert decision.allow is expected


def test_claim_paths_are_dotted_and_keys_with_dots_are_looked_up_whole() -> None:
    nested = claim_policy("{in: [radiology]}", path="org.unit.name")
    deep = {"org": {"unit": {"name": "radiology"}}}
    assert ask(nested, who("staff", claims=deep), Action.SEARCH).allow
    whole = {"org.unit.name": "radiology"}
    assert ask(nested, who("staff", claims=whole), Action.SEARCH).allow
    broken = {"org": ["unit"]}
    assert not ask(nested, who("staff", claims=broken), Action.SEARCH).allow
    uri = claim_policy("{in: [radiology]}", path="'https://example.org/dept'")
    claims = {"https://example.org/dept": ["radiology"]}
    assert ask(uri, who("staff", claims=claims), Action.SEARCH).allow


# -- matchers: resource UIDs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("matcher", "uid", "expected"),
    [
        ("{prefix: '1.2.826.0.1.3680043'}", "1.2.826.0.1.3680043.8.1", True),
        ("{prefix: '1.2.826.0.1.3680043'}", "1.2.840.1", False),
        ("{prefix: '1.2.826.0.1.3680043'}", None, False),
        ("{in: ['1.2.3', '1.2.4']}", "1.2.4", True),
        ("{in: ['1.2.3', '1.2.4']}", "1.2.5", False),
        ("{in: ['1.2.3']}", None, False),
        ("{equals: '1.2.3'}", "1.2.3", True),
        ("{not_in: ['1.2.3']}", "1.2.3", False),
        ("{not_in: ['1.2.3']}", "1.2.4", True),
        ("{not_in: ['1.2.3']}", None, True),
        ("{present: true}", "1.2.3", True),
        ("{present: true}", None, False),
        ("{present: false}", None, True),
    ],
)
def test_resource_matchers(matcher: str, uid: str | None, expected: bool) -> None:
    policy = rule_policy(
        f"""
        - id: cond
          effect: allow
          roles: [staff]
          actions: [retrieve]
          destinations: [pacs]
          when: {{resource: {{study_uid: {matcher}}}}}
        """
    )
    assert ask(policy, who("staff"), Action.RETRIEVE, study_uid=uid).allow is expected


def test_each_resource_field_is_checked() -> None:
    policy = rule_policy(
        """
        - id: cond
          effect: allow
          roles: [staff]
          actions: [retrieve]
          destinations: [pacs]
          when: {resource: {study_uid: {present: true}, series_uid: {prefix: '2.'}}}
        """
    )
    assert ask(policy, who("staff"), "retrieve", study_uid="1.1", series_uid="2.5").allow
    assert not ask(policy, who("staff"), "retrieve", study_uid="1.1", series_uid="3.5").allow
    assert not ask(policy, who("staff"), "retrieve", series_uid="2.5").allow


# -- matchers: object-store bucket and key ----------------------------------------------


def ask_object(
    policy: CompiledPolicy,
    action: Action,
    bucket: str | None,
    key: str | None,
    *,
    roles: tuple[str, ...] = ("staff",),
    destination: str = "images",
) -> Decision:
    resource = Resource(destination=destination, bucket=bucket, key=key, operation="Op")
    return policy.decide(who(*roles), action, resource, RequestFacts(time=WEDNESDAY_NOON))


def object_policy(condition: str, effect: str = "allow") -> CompiledPolicy:
    rules = (
        f"- {{id: cond, effect: {effect}, roles: [staff], actions: [retrieve, store, list], "
        f"destinations: [images], when: {{resource: {condition}}}}}\n"
    )
    if effect == "deny":
        rules += (
            "- {id: base, effect: allow, roles: [staff], actions: [retrieve, store, list], "
            "destinations: [images]}\n"
        )
    return rule_policy(rules)


@pytest.mark.parametrize(
    ("condition", "bucket", "key", "expected"),
    [
        ("{key: {prefix: research/}}", "scans", "research/ct/1.dcm", True),
        ("{key: {prefix: research/}}", "scans", "researchers/1.dcm", False),
        ("{key: {prefix: research/}}", "scans", "clinical/research/1.dcm", False),
        ("{key: {prefix: [a/, b/]}}", "scans", "b/1.dcm", True),
        ("{key: {in: [x.dcm]}}", "scans", "x.dcm", True),
        ("{key: {equals: x.dcm}}", "scans", "y.dcm", False),
        ("{key: {not_in: [x.dcm]}}", "scans", "y.dcm", True),
        ("{key: {not_in: [x.dcm]}}", "scans", "x.dcm", False),
        ("{bucket: {in: [scans, archive]}}", "archive", "a.dcm", True),
        ("{bucket: {in: [scans]}}", "other", "a.dcm", False),
        ("{bucket: {prefix: research-}}", "research-ct", None, True),
        ("{bucket: {not_in: [secret]}}", "scans", None, True),
        # A field the request does not name: allow rules fail closed, even not_in.
        ("{key: {prefix: research/}}", "scans", None, False),
        ("{key: {in: [x.dcm]}}", "scans", None, False),
        ("{key: {not_in: [x.dcm]}}", "scans", None, False),
        ("{bucket: {not_in: [secret]}}", None, None, False),
        ("{bucket: {in: [scans]}}", None, None, False),
        # present reads the field as it is.
        ("{key: {present: true}}", "scans", "a", True),
        ("{key: {present: true}}", "scans", None, False),
        ("{key: {present: false}}", "scans", None, True),
        ("{bucket: {in: [scans]}, key: {prefix: research/}}", "scans", "research/a", True),
        ("{bucket: {in: [scans]}, key: {prefix: research/}}", "other", "research/a", False),
    ],
)
def test_object_matchers_in_allow_rules(
    condition: str, bucket: str | None, key: str | None, expected: bool
) -> None:
    policy = object_policy(condition)
    decision = ask_object(policy, Action.RETRIEVE, bucket, key)
    assert decision.allow is expected
    assert decision.rule_id == ("cond" if expected else None)


@pytest.mark.parametrize(
    ("condition", "bucket", "key", "denied"),
    [
        ("{key: {prefix: vip/}}", "scans", "vip/a.dcm", True),
        ("{key: {prefix: vip/}}", "scans", "public/a.dcm", False),
        ("{key: {in: [x.dcm]}}", "scans", "x.dcm", True),
        ("{key: {not_in: [x.dcm]}}", "scans", "x.dcm", False),
        ("{key: {not_in: [x.dcm]}}", "scans", "y.dcm", True),
        ("{bucket: {in: [secret]}}", "secret", None, True),
        ("{bucket: {in: [secret]}}", "scans", "a", False),
        # A bucket-level request (listing, browser POST, DeleteObjects) names no key but
        # can touch the protected keys: the deny applies.
        ("{key: {prefix: vip/}}", "scans", None, True),
        ("{key: {in: [x.dcm]}}", "scans", None, True),
        ("{key: {not_in: [x.dcm]}}", "scans", None, True),
        # Neither bucket nor key (DICOMweb, listing buckets): no object is touched.
        ("{key: {prefix: vip/}}", None, None, False),
        ("{bucket: {in: [secret]}}", None, None, False),
        ("{key: {present: false}}", "scans", None, True),
        ("{key: {present: false}}", "scans", "a", False),
    ],
)
def test_object_matchers_in_deny_rules(
    condition: str, bucket: str | None, key: str | None, denied: bool
) -> None:
    policy = object_policy(condition, effect="deny")
    decision = ask_object(policy, Action.LIST if key is None else Action.RETRIEVE, bucket, key)
    assert decision.allow is not denied
    assert decision.rule_id == ("cond" if denied else "base")


def test_key_conditions_guard_research_prefix_per_action() -> None:
    policy = rule_policy(
        """
        - id: research-read
          effect: allow
          roles: [staff]
          actions: [retrieve, list]
          destinations: [images]
          when: {resource: {bucket: [scans], key: {prefix: research/}}}
        - id: research-list
          effect: allow
          roles: [staff]
          actions: [list]
          destinations: [images]
          when: {resource: {bucket: [scans]}}
        - id: no-vip
          effect: deny
          roles: ['*']
          actions: ['*']
          destinations: [images]
          when: {resource: {key: {prefix: vip/}}}
        """
    )
    assert ask_object(policy, Action.RETRIEVE, "scans", "research/1.dcm").rule_id == (
        "research-read"
    )
    assert not ask_object(policy, Action.RETRIEVE, "scans", "clinical/1.dcm").allow
    assert not ask_object(policy, Action.RETRIEVE, "other", "research/1.dcm").allow
    assert not ask_object(policy, Action.STORE, "scans", "research/1.dcm").allow
    # A listing names no key: the prefix rule does not match it, the bucket rule does
    # -- but the deny on vip/ keys catches every bucket-level request.
    listing = ask_object(policy, Action.LIST, "scans", None)
    assert not listing.allow and listing.rule_id == "no-vip"
    vip = ask_object(policy, Action.RETRIEVE, "scans", "vip/research/1.dcm")
    assert not vip.allow and vip.rule_id == "no-vip"
    # The same deny leaves requests that name no object alone (another destination
    # kind, or listing the buckets).
    assert ask_object(policy, Action.LIST, None, None).rule_id is None


def test_object_conditions_are_listed_for_explain() -> None:
    policy = object_policy("{bucket: [scans], key: {prefix: research/}}")
    (rule,) = policy.rules
    assert rule.condition_kinds == ("resource.bucket", "resource.key")


def test_unknown_resource_condition_fields_are_refused() -> None:
    with pytest.raises(PolicyLoadError, match=r"resource\.objectkey"):
        object_policy("{objectkey: {prefix: research/}}")


def test_object_conditions_never_leak_keys_into_reasons() -> None:
    policy = object_policy("{key: {prefix: research/}}")
    for key in (SENTINEL, "research/" + SENTINEL):
        text = json.dumps(ask_object(policy, Action.RETRIEVE, SENTINEL, key).to_json())
        assert SENTINEL not in text


# -- matchers: query --------------------------------------------------------------------


def query_policy(matcher: str, effect: str = "allow") -> CompiledPolicy:
    rules = (
        f"- {{id: cond, effect: {effect}, roles: [staff], actions: [search], "
        f"destinations: [pacs], when: {{query: {{ModalitiesInStudy: {matcher}}}}}}}\n"
    )
    if effect == "deny":
        rules += (
            "- {id: base, effect: allow, roles: [staff], actions: [search], destinations: [pacs]}\n"
        )
    return rule_policy(rules)


Q = "ModalitiesInStudy"
QUERY_ALLOW_CASES: list[tuple[str, tuple[str, ...] | None, bool]] = [
    ("{in: [CT, MR]}", ("CT",), True),
    ("{in: [CT, MR]}", ("CT", "MR"), True),  # repeated key: every value matches
    ("{in: [CT, MR]}", ("CT", "MG"), False),  # one value outside: not restricted enough
    ("{in: [CT, MR]}", ("CT,MR",), True),  # comma-separated list is split
    ("{in: [CT, MR]}", ("CT,MG",), False),
    ("{in: [CT, MR]}", ("CT\\MG",), False),  # backslash-separated too
    ("{in: [CT, MR]}", None, False),  # unrestricted search must not pass
    ("{in: [CT, MR]}", ("",), False),  # empty value = universal match
    ("{in: [CT, MR]}", (), False),
    ("{in: [CT, MR]}", ("C*",), False),  # a wildcard can stand for anything
    ("{in: [CT, MR]}", ("?T",), False),
    ("[CT, MR]", ("MR",), True),
    ("{equals: CT}", ("CT",), True),
    ("{equals: CT}", ("CT", "CT"), True),
    ("{equals: CT}", ("CT", "MR"), False),
    ("{equals: CT}", None, False),
    ("{prefix: C}", ("CT", "CR"), True),
    ("{prefix: C}", ("CT", "MR"), False),
    ("{prefix: C}", ("C*",), True),  # the literal prefix precedes the wildcard
    ("{prefix: C}", ("*",), False),
    ("{prefix: C}", None, False),
    ("{not_in: [MG]}", ("CT",), True),
    ("{not_in: [MG]}", ("CT", "MG"), False),
    ("{not_in: [MG]}", ("CT,MG",), False),
    ("{not_in: [MG]}", ("M*",), False),  # might return MG
    ("{not_in: [MG]}", None, True),  # a missing fact satisfies not_in
    ("{present: true}", ("CT",), True),
    ("{present: true}", None, False),
    ("{present: false}", None, True),
    ("{present: false}", ("CT",), False),
]


@pytest.mark.parametrize(("matcher", "values", "expected"), QUERY_ALLOW_CASES)
def test_query_matchers_in_allow_rules(
    matcher: str, values: tuple[str, ...] | None, expected: bool
) -> None:
    query = {} if values is None else {Q: values}
    decision = ask(query_policy(matcher), who("staff"), Action.SEARCH, query=query)
    assert decision.allow is expected


QUERY_DENY_CASES: list[tuple[str, tuple[str, ...] | None, bool]] = [
    # True: the deny rule applies (the query could return what it names)
    ("{in: [MG]}", ("MG",), True),
    ("{in: [MG]}", ("CT", "MG"), True),  # any value is enough to deny
    ("{in: [MG]}", ("CT,MG",), True),
    ("{in: [MG]}", ("CT",), False),
    ("{in: [MG]}", ("M*",), True),  # might return MG
    ("{in: [MG]}", ("",), True),  # universal match
    ("{in: [MG]}", None, False),  # missing fact fails in
    ("{prefix: M}", ("CT", "MG"), True),
    ("{prefix: MG}", ("M*",), True),
    ("{prefix: MG}", ("C*",), False),
    ("{prefix: M}", ("CT",), False),
    ("{not_in: [CT, MR]}", ("CT", "MG"), True),
    ("{not_in: [CT, MR]}", ("CT", "MR"), False),
    ("{not_in: [CT, MR]}", ("C?",), True),
    ("{not_in: [CT, MR]}", None, True),
]


@pytest.mark.parametrize(("matcher", "values", "expected"), QUERY_DENY_CASES)
def test_query_matchers_in_deny_rules(
    matcher: str, values: tuple[str, ...] | None, expected: bool
) -> None:
    query = {} if values is None else {Q: values}
    decision = ask(query_policy(matcher, "deny"), who("staff"), Action.SEARCH, query=query)
    assert decision.rule_id == ("cond" if expected else "base")


def test_all_conditions_must_hold() -> None:
    policy = rule_policy(
        """
        - id: cond
          effect: allow
          roles: [staff]
          actions: [search]
          destinations: [pacs]
          when:
            claims: {department: radiology}
            query: {ModalitiesInStudy: [CT]}
        """
    )
    good = who("staff", claims={"department": "radiology"})
    bad = who("staff", claims={"department": "cardiology"})
    assert ask(policy, good, Action.SEARCH, query={Q: ("CT",)}).allow
    assert not ask(policy, good, Action.SEARCH, query={Q: ("MR",)}).allow
    assert not ask(policy, bad, Action.SEARCH, query={Q: ("CT",)}).allow


# -- time -------------------------------------------------------------------------------


def time_policy(window: str) -> CompiledPolicy:
    return rule_policy(
        f"""
        - id: timed
          effect: allow
          roles: [staff]
          actions: [search]
          destinations: [pacs]
          when: {{time: {window}}}
        """
    )


BERLIN_DAY = "{after: '07:00', before: '19:00', timezone: Europe/Berlin}"
BERLIN_NIGHT = "{after: '19:00', before: '07:00', timezone: Europe/Berlin}"


@pytest.mark.parametrize(
    ("window", "when", "expected"),
    [
        # Europe/Berlin is UTC+1 in January, UTC+2 in June.
        (BERLIN_DAY, datetime(2024, 1, 10, 6, 0, tzinfo=UTC), True),  # 07:00 local: inclusive
        (BERLIN_DAY, datetime(2024, 1, 10, 5, 59, tzinfo=UTC), False),  # 06:59 local
        (BERLIN_DAY, datetime(2024, 1, 10, 17, 59, tzinfo=UTC), True),  # 18:59 local
        (BERLIN_DAY, datetime(2024, 1, 10, 18, 0, tzinfo=UTC), False),  # 19:00: exclusive
        (BERLIN_DAY, datetime(2024, 6, 10, 5, 0, tzinfo=UTC), True),  # 07:00 CEST
        (BERLIN_DAY, datetime(2024, 6, 10, 17, 0, tzinfo=UTC), False),  # 19:00 CEST
        (BERLIN_NIGHT, datetime(2024, 1, 10, 18, 0, tzinfo=UTC), True),  # 19:00 local
        (BERLIN_NIGHT, datetime(2024, 1, 10, 22, 30, tzinfo=UTC), True),  # 23:30
        (BERLIN_NIGHT, datetime(2024, 1, 10, 23, 0, tzinfo=UTC), True),  # 00:00
        (BERLIN_NIGHT, datetime(2024, 1, 11, 5, 59, tzinfo=UTC), True),  # 06:59
        (BERLIN_NIGHT, datetime(2024, 1, 11, 6, 0, tzinfo=UTC), False),  # 07:00
        (BERLIN_NIGHT, datetime(2024, 1, 11, 11, 0, tzinfo=UTC), False),  # noon
        # other offsets in the request time are converted
        (BERLIN_DAY, datetime(2024, 1, 10, 8, 0, tzinfo=timezone(timedelta(hours=-5))), True),
        (BERLIN_NIGHT, datetime(2024, 1, 10, 13, 0, tzinfo=timezone(timedelta(hours=-5))), True),
        # a naive time is taken as UTC
        (BERLIN_DAY, datetime(2024, 1, 10, 6, 0), True),
        (BERLIN_DAY, datetime(2024, 1, 10, 5, 0), False),
        # only one bound
        ("{after: '20:00', timezone: UTC}", datetime(2024, 1, 10, 20, 0, tzinfo=UTC), True),
        ("{after: '20:00', timezone: UTC}", datetime(2024, 1, 10, 19, 59, tzinfo=UTC), False),
        ("{before: '06:00', timezone: UTC}", datetime(2024, 1, 10, 0, 0, tzinfo=UTC), True),
        ("{before: '06:00', timezone: UTC}", datetime(2024, 1, 10, 6, 0, tzinfo=UTC), False),
    ],
)
def test_time_windows(window: str, when: datetime, expected: bool) -> None:
    decision = ask(time_policy(window), who("staff"), Action.SEARCH, when=when)
    assert decision.allow is expected


def test_days_are_the_weekday_of_the_local_date() -> None:
    policy = time_policy("{days: [mon, tue, wed, thu, fri], timezone: Asia/Tokyo}")
    friday_utc_saturday_tokyo = datetime(2024, 1, 12, 20, 0, tzinfo=UTC)  # Sat 05:00 JST
    assert not ask(policy, who("staff"), Action.SEARCH, when=friday_utc_saturday_tokyo).allow
    sunday_utc_monday_tokyo = datetime(2024, 1, 14, 16, 0, tzinfo=UTC)  # Mon 01:00 JST
    assert ask(policy, who("staff"), Action.SEARCH, when=sunday_utc_monday_tokyo).allow


def test_night_shift_on_weekdays() -> None:
    policy = time_policy(
        "{after: '19:00', before: '07:00', days: [mon, tue, wed, thu, fri], timezone: UTC}"
    )

    def at(day: int, hour: int) -> datetime:
        return datetime(2024, 1, day, hour, 0, tzinfo=UTC)

    assert ask(policy, who("staff"), Action.SEARCH, when=at(12, 22)).allow  # Fri 22:00
    assert not ask(policy, who("staff"), Action.SEARCH, when=at(13, 2)).allow  # Sat 02:00
    assert ask(policy, who("staff"), Action.SEARCH, when=at(15, 2)).allow  # Mon 02:00
    assert not ask(policy, who("staff"), Action.SEARCH, when=at(15, 12)).allow  # Mon noon


# -- obligations ------------------------------------------------------------------------


def test_obligations_merge_over_all_matching_allow_rules() -> None:
    policy = rule_policy(
        """
        - id: first
          effect: allow
          roles: [radiologist]
          actions: [retrieve]
          destinations: [research]
          obligations: {deidentify: research-basic, watermark: true}
        - id: no-obligations
          effect: allow
          roles: [staff]
          actions: [retrieve]
          destinations: [research]
        - id: second
          effect: allow
          roles: [staff]
          actions: [retrieve]
          destinations: [research]
          obligations: {deidentify: full, mask_attributes: [PatientName, PatientID], max: 5}
        - id: not-matching
          effect: allow
          roles: [staff]
          actions: [retrieve]
          destinations: [research]
          when: {mfa: true}
          obligations: {audit_level: high}
        """
    )
    decision = ask(policy, who("radiologist"), Action.RETRIEVE, "research")
    assert decision.allow and decision.rule_id == "first"
    assert dict(decision.obligations) == {
        "deidentify": "research-basic",  # the earlier rule wins
        "watermark": True,
        "mask_attributes": ("PatientName", "PatientID"),
        "max": 5,
    }
    assert decision.reasons[-1] == "obligations also from rules 'second'"
    assert decision.to_json()["obligations"]["mask_attributes"] == ["PatientName", "PatientID"]
    # the merged decision is cached and stays the same
    assert ask(policy, who("radiologist"), Action.RETRIEVE, "research") == decision
    staff_only = ask(policy, who("staff"), Action.RETRIEVE, "research")
    assert staff_only.rule_id == "no-obligations"
    assert dict(staff_only.obligations) == {
        "deidentify": "full",
        "mask_attributes": ("PatientName", "PatientID"),
        "max": 5,
    }
    with_mfa = ask(policy, who("staff", mfa=True), Action.RETRIEVE, "research")
    assert with_mfa.obligations["audit_level"] == "high"


def test_obligations_cannot_be_changed_by_enforcement() -> None:
    policy = rule_policy(
        "- {id: r, effect: allow, roles: [staff], actions: [retrieve], destinations: [pacs], "
        "obligations: {deidentify: basic}}"
    )
    decision = ask(policy, who("staff"), Action.RETRIEVE)
    with pytest.raises(TypeError):
        decision.obligations["deidentify"] = "none"  # type: ignore[index]
    assert ask(policy, who("staff"), Action.RETRIEVE).obligations["deidentify"] == "basic"


# -- step-up ----------------------------------------------------------------------------


STEP_UP = """
- id: delete-with-mfa
  effect: allow
  roles: [radiologist]
  actions: [delete]
  destinations: [pacs]
  when: {mfa: true, claims: {department: radiology}}
"""


def test_step_up_when_only_mfa_is_missing() -> None:
    policy = rule_policy(STEP_UP)
    claims = {"department": "radiology"}
    decision = ask(policy, who("radiologist", claims=claims), Action.DELETE)
    assert not decision.allow
    assert decision.step_up is True
    assert decision.rule_id is None
    assert decision.reasons == ("rule 'delete-with-mfa' requires multi-factor authentication",)
    assert decision.to_json()["step_up"] is True
    assert ask(policy, who("radiologist", mfa=True, claims=claims), Action.DELETE).allow


def test_no_step_up_when_other_conditions_fail_too() -> None:
    policy = rule_policy(STEP_UP)
    decision = ask(policy, who("radiologist", claims={"department": "x"}), Action.DELETE)
    assert not decision.allow and not decision.step_up
    assert decision.reasons[0].startswith("no allow rule for action 'delete'")


def test_no_step_up_when_another_rule_allows_or_a_deny_matches() -> None:
    claims = {"department": "radiology"}
    allowed = rule_policy(
        STEP_UP + "- {id: staff-delete, effect: allow, roles: [staff], actions: [delete], "
        "destinations: [pacs]}"
    )
    decision = ask(allowed, who("radiologist", claims=claims), Action.DELETE)
    assert decision.allow and decision.rule_id == "staff-delete"
    denied = rule_policy(
        STEP_UP
        + "- {id: no-delete, effect: deny, roles: ['*'], actions: [delete], destinations: [pacs]}"
    )
    decision = ask(denied, who("radiologist", claims=claims), Action.DELETE)
    assert decision.rule_id == "no-delete" and not decision.step_up


def test_mfa_false_condition() -> None:
    policy = rule_policy(
        """
        - {id: base, effect: allow, roles: [staff], actions: [delete], destinations: [pacs]}
        - {id: needs-mfa, effect: deny, roles: ['*'], actions: [delete], destinations: ['*'],
           when: {mfa: false}}
        """
    )
    denied = ask(policy, who("staff"), Action.DELETE)
    assert denied.rule_id == "needs-mfa"
    assert denied.step_up is True  # with MFA rule `base` allows: ask for step-up
    assert "rule 'base' requires multi-factor authentication" in denied.reasons
    assert ask(policy, who("staff", mfa=True), Action.DELETE).rule_id == "base"
    # Without an allow rule, MFA would not help: a plain deny, no step-up.
    assert ask(policy, who("nobody"), Action.DELETE).step_up is False


# -- explanations never carry request values --------------------------------------------


SENTINEL = "SENTINEL-Doe^Jane-19700101"


def test_reasons_and_json_never_contain_request_values() -> None:
    policy = rule_policy(
        """
        - id: cond
          description: conditional read
          effect: allow
          roles: [staff]
          actions: [search, retrieve]
          destinations: [pacs]
          when:
            claims: {department: {in: [radiology]}}
            query: {PatientName: {prefix: Doe}}
            resource: {study_uid: {prefix: '1.2'}}
        - {id: mfa-read, effect: allow, roles: [radiologist], actions: [retrieve],
           destinations: [pacs], when: {mfa: true}}
        - {id: block, effect: deny, roles: [referring_physician], actions: ['*'],
           destinations: ['*'], when: {query: {PatientID: {present: true}}}}
        """
    )
    claims = {"department": SENTINEL, "name": SENTINEL, "nested": {"x": [SENTINEL]}}
    query = {"PatientName": (SENTINEL,), "PatientID": (SENTINEL,)}
    decisions = [
        ask(policy, who(*roles, claims=claims), action, query=query, study_uid=SENTINEL)
        for roles in [("staff",), ("radiologist",), ("referring_physician",), (SENTINEL,)]
        for action in (Action.SEARCH, Action.RETRIEVE, Action.STORE)
    ]
    kinds = {(d.allow, d.rule_id, d.step_up) for d in decisions}
    assert (False, "block", False) in kinds  # deny rule
    assert (False, None, True) in kinds  # step-up
    assert (False, None, False) in kinds  # default deny
    for decision in decisions:
        text = json.dumps(decision.to_json())
        assert SENTINEL not in text
        assert "Doe^Jane" not in text
    allowed = ask(
        policy,
        who("staff", claims={"department": "radiology", "secret": SENTINEL}),
        Action.SEARCH,
        query={"PatientName": ("Doe^" + SENTINEL,)},
        study_uid="1.2." + SENTINEL,
    )
    assert allowed.allow
    assert SENTINEL not in json.dumps(allowed.to_json())


def test_decision_json_shape() -> None:
    policy = rule_policy(
        "- {id: r, effect: allow, roles: [staff], actions: [retrieve], destinations: [pacs], "
        "obligations: {deidentify: basic}}"
    )
    assert ask(policy, who("staff"), Action.RETRIEVE).to_json() == {
        "decision": "allow",
        "rule_id": "r",
        "reasons": ["allowed by rule 'r'"],
        "obligations": {"deidentify": "basic"},
        "step_up": False,
    }
    denied = ask(policy, who("staff"), Action.STORE).to_json()
    assert denied["decision"] == "deny" and denied["rule_id"] is None
    assert json.loads(json.dumps(denied)) == denied


# -- caches -----------------------------------------------------------------------------


def test_repeated_and_varied_requests_stay_consistent() -> None:
    policy = rule_policy(
        """
        - {id: rad, effect: allow, roles: [radiologist], actions: [search], destinations: [pacs]}
        - {id: ref, effect: allow, roles: [referring_physician], actions: [retrieve],
           destinations: [pacs]}
        """
    )
    for n in range(3000):  # more distinct role sets than fit a few caches
        noise = f"group-{n}"
        assert ask(policy, who("radiologist", noise), Action.SEARCH).rule_id == "rad"
        assert not ask(policy, who("radiologist", noise), Action.RETRIEVE).allow
        assert ask(policy, who("referring_physician", noise), Action.RETRIEVE).rule_id == "ref"
        assert not ask(policy, who(noise), Action.SEARCH, f"dest-{n % 700}").allow


def test_policy_properties() -> None:
    policy = rule_policy(
        "- {id: rad, effect: allow, roles: [radiologist], actions: [search], destinations: [pacs]}"
    )
    assert policy.rule_count == 1
    assert policy.rule_ids == ("rad",)
    assert policy.roles == {"staff", "radiologist", "referring_physician"}
    assert policy.sources == ("test.yaml",)
    assert policy.version.startswith("sha256:") and len(policy.version) == 7 + 64
    assert policy.rules[0].condition_kinds == ()


# -- the shipped example: policies/hospital.yaml ----------------------------------------


@pytest.fixture(scope="module")
def hospital() -> CompiledPolicy:
    return load_policy([REPO / "policies" / "hospital.yaml"], {"pacs", "research"})


READ = (Action.SEARCH, Action.RETRIEVE, Action.RETRIEVE_METADATA)

HOSPITAL_TABLE: list[tuple[tuple[str, ...], bool, Action, str, str | None]] = [
    # (roles, mfa, action, destination, expected rule id or None for deny)
    *[(("radiologist",), False, a, "pacs", "radiologist-read") for a in READ],
    (("radiologist",), False, Action.CAPABILITIES, "pacs", "radiologist-read"),
    (("radiologist",), False, Action.STORE, "pacs", "radiologist-store"),
    (("radiologist",), False, Action.DELETE, "pacs", None),
    (("radiologist",), True, Action.DELETE, "pacs", None),
    (("radiologist",), False, Action.SEARCH, "research", None),
    (("radiologist",), False, Action.UNKNOWN, "pacs", None),
    *[(("referring_physician",), False, a, "pacs", "referring-physician-read") for a in READ],
    (("referring_physician",), False, Action.STORE, "pacs", None),
    (("referring_physician",), True, Action.DELETE, "pacs", None),
    (("referring_physician",), False, Action.CAPABILITIES, "pacs", None),
    (("referring_physician",), False, Action.SEARCH, "research", None),
    (("technologist",), False, Action.STORE, "pacs", "technologist-store"),
    (("technologist",), False, Action.SEARCH, "pacs", "technologist-store"),
    (("technologist",), False, Action.RETRIEVE, "pacs", None),
    (("technologist",), False, Action.STORE, "research", None),
    *[(("researcher",), False, a, "research", "researcher-read") for a in READ],
    (("researcher",), False, Action.SEARCH, "pacs", None),
    (("researcher",), False, Action.STORE, "research", "researcher-store"),
    (("admin",), True, Action.DELETE, "pacs", "admin-delete"),
    (("admin",), False, Action.DELETE, "pacs", None),
    (("admin",), True, Action.SEARCH, "pacs", "radiologist-read"),
    (("admin",), False, Action.STORE, "pacs", "radiologist-store"),
    (("admin",), True, Action.DELETE, "research", None),
    (("staff",), False, Action.SEARCH, "pacs", None),
    ((), False, Action.SEARCH, "pacs", None),
]


@pytest.mark.parametrize(("roles", "mfa", "action", "destination", "rule_id"), HOSPITAL_TABLE)
def test_hospital_policy_intent(
    hospital: CompiledPolicy,
    roles: tuple[str, ...],
    mfa: bool,
    action: Action,
    destination: str,
    rule_id: str | None,
) -> None:
    decision = ask(hospital, who(*roles, mfa=mfa), action, destination)
    assert decision.allow is (rule_id is not None)
    if rule_id is not None:
        assert decision.rule_id == rule_id


def test_hospital_researcher_gets_deidentified_data(hospital: CompiledPolicy) -> None:
    decision = ask(hospital, who("researcher"), Action.RETRIEVE, "research")
    assert decision.obligations == {"mask": "research-view"}
    upload = ask(hospital, who("researcher"), Action.STORE, "research")
    assert upload.obligations == {"dlp": "research-deidentify"}


def test_hospital_delete_without_mfa_names_the_guard_rule(hospital: CompiledPolicy) -> None:
    decision = ask(hospital, who("admin"), Action.DELETE)
    assert decision.rule_id == "delete-needs-mfa"
    assert decision.reasons[0] == "denied by rule 'delete-needs-mfa'"


@pytest.mark.parametrize(
    ("when", "allowed"),
    [
        (datetime(2024, 1, 10, 21, 0, tzinfo=UTC), True),  # 22:00 Berlin
        (datetime(2024, 1, 11, 5, 59, tzinfo=UTC), True),  # 06:59 Berlin
        (datetime(2024, 1, 11, 6, 0, tzinfo=UTC), False),  # 07:00 Berlin
        (datetime(2024, 1, 11, 11, 0, tzinfo=UTC), False),  # noon Berlin
        (datetime(2024, 7, 11, 17, 0, tzinfo=UTC), True),  # 19:00 CEST
        (datetime(2024, 7, 11, 16, 59, tzinfo=UTC), False),  # 18:59 CEST
    ],
)
def test_hospital_teleradiologist_reads_at_night(
    hospital: CompiledPolicy, when: datetime, allowed: bool
) -> None:
    decision = ask(hospital, who("teleradiologist"), Action.RETRIEVE, when=when)
    assert decision.allow is allowed
    assert not ask(hospital, who("teleradiologist"), Action.STORE, when=when).allow
