"""The policy decision point: a compiled policy and its pure ``decide``.

``decide(principal, action, resource, facts) -> Decision`` reads only its arguments
and the compiled policy: no I/O, no clock, no logging. Policies are compiled once
(:func:`casb.policy.loader.load_policy`); deciding touches only the rules indexed
under the request's action and destination for the principal's roles.

Decision
    1. Any matching **deny** rule denies (the first in load order names the decision).
    2. Else the first matching **allow** rule allows. Its obligations are merged with
       those of every other matching allow rule; earlier rules win on a key conflict.
    3. Else **default deny** (``rule_id`` None), with a reason naming the action, the
       destination and the principal's roles.
    4. Step-up: when a principal without MFA is denied (by default or by a rule such as
       ``when: {mfa: false}``) and the same request WITH MFA would be allowed, the
       decision carries ``step_up=True`` and names the allowing rule (enforcement
       answers 401 ``insufficient_user_authentication``, not 403).

    Reasons name rule ids, actions, destinations and roles, never request values
    (query values, claim values and UIDs can be PHI-adjacent).

Roles
    A principal holding role R holds R and every role R inherits from, transitively.
    Roles in a token that the policy does not define are ignored. ``roles: ["*"]``
    matches any authenticated principal, including one with no role the policy knows.

Actions and destinations
    ``actions: ["*"]`` on an allow rule means every action except ``unknown``:
    requests the classifier could not recognise are denied unless an allow rule names
    ``unknown`` explicitly. On a deny rule ``*`` means every action. ``destinations:
    ["*"]`` means every destination.

Conditions (``when``): every listed condition must hold.
    ``mfa``       the principal's ``mfa`` must equal the given boolean.
    ``claims``    dotted paths into the token's claims (``realm_access.roles``); a key
                  that itself contains dots (``https://example.org/dept``) is looked up
                  whole first.
    ``query``     QIDO-RS / WADO-URI query keys.
    ``resource``  ``study_uid``, ``series_uid``, ``instance_uid`` from the URL; for
                  object stores ``bucket`` (Azure: container) and ``key`` (blob name).
    ``time``      a window in an IANA time zone: ``after`` inclusive, ``before``
                  exclusive (HH:MM); ``after`` later than ``before`` wraps midnight
                  (19:00-07:00 is a night shift); ``days`` (mon..sun) are the weekday
                  of the request's local date, so Saturday 03:00 is a Saturday even in
                  a shift that began on Friday. A naive request time is taken as UTC.

Matchers (claims, query, resource): a bare scalar or list is shorthand for ``in``;
otherwise exactly one of ``in``, ``not_in``, ``equals``, ``prefix`` (one string or a
list), ``present`` (bool). Values are compared as strings (booleans as ``true`` /
``false``).

    Claims and resource UIDs: a list-valued claim matches ``in`` / ``equals`` /
    ``prefix`` when ANY element matches; ``not_in`` holds when NO element is in the
    list. A missing (or null) fact fails ``in`` / ``equals`` / ``prefix``, satisfies
    ``not_in``, and satisfies ``present: false``.

    Object-store ``bucket`` and ``key`` fail closed when the request does not name
    them. An allow rule's ``in`` / ``equals`` / ``prefix`` / ``not_in`` never holds
    for a missing bucket or key: a bucket-level request (listing, browser POST upload,
    DeleteObjects) names no key, so it passes a rule with a ``key`` condition only if
    another rule allows it (condition listings on ``bucket``). A deny rule's ``key``
    condition applies to every request on a bucket that names no key (it could touch
    the keys the rule protects); one naming neither bucket nor key (DICOMweb, listing
    the buckets) touches no object and is not caught by ``bucket`` / ``key``
    conditions. ``present`` reads the field as it is.

    Query keys can carry several values (a repeated key, or a comma- or
    backslash-separated list, which is split). A query condition must hold for what
    the query could return, so the answer depends on the rule's effect:

    * allow rules need EVERY value to match ``in`` / ``equals`` / ``prefix`` (a search
      that omits ``ModalitiesInStudy`` does not pass ``{in: [CT]}``: an unrestricted
      search must not pass a restricted rule), and ``not_in`` needs no value in the
      list;
    * deny rules apply when ANY value matches (a search for ``CT,MG`` is caught by a
      deny on ``{in: [MG]}``), and ``not_in`` when any value is outside the list.

    A value that is empty or holds a QIDO wildcard (``*``, ``?``) can stand for values
    the rule does not list: it never satisfies ``in`` / ``equals`` / ``not_in`` of an
    allow rule and always satisfies them in a deny rule. ``prefix`` compares the
    literal text (in a deny rule, the text before the first wildcard). A missing key
    fails ``in`` / ``equals`` / ``prefix`` and satisfies ``not_in`` and
    ``present: false``, whatever the effect: pair ``not_in`` in an allow rule with a
    rule that requires the key if an omitted key must not pass.

How ``decide`` stays in microseconds
    At load, rules are indexed by action -> destination -> role (wildcards expanded).
    The first request of a role set builds its view (defined roles, inheritance
    expanded) and, per (action, destination), a plan: the candidate deny and allow
    rules in load order, cut after the first rule without conditions, and the
    pre-built default-deny decision. A plan whose answer no condition can change is
    a constant. Each rule's decisions are built once; conditions are closures over
    frozensets and tuples. The hot path is two dict lookups, then only the candidate
    rules' condition closures; it allocates nothing but the cache key (and a dict
    when obligations of several rules must be merged, itself cached). Caches are
    bounded and only speed things up: they never change an answer.
"""

# ruff: noqa: SIM110  (explicit loops: any()/all() over a generator cost more per call)
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Final

from casb.context import Action, Principal, RequestFacts, Resource
from casb.dlp.profile import DlpSettings
from casb.policy.decision import EMPTY_OBLIGATIONS, Decision
from casb.policy.model import DAYS, Matcher, Rule, TimeWindow

__all__ = ["CompiledPolicy", "CompiledRule", "LocalClock", "compile_rule"]

Check = Callable[[Principal, Resource, RequestFacts], bool]

ANY: Final = "*"
# Index key for action strings that are not Action values: only deny-"*" rules apply.
_OTHER_ACTION: Final = "\x00other"
_ALLOW_ACTIONS: Final = frozenset(a.value for a in Action if a is not Action.UNKNOWN)
_ALL_ACTIONS: Final = frozenset(a.value for a in Action)

_MISSING: Final[Any] = object()
_MAX_VIEWS: Final = 4096  # distinct role sets cached
_MAX_PLANS: Final = 512  # (action, destination) pairs cached per role set
_MAX_MERGES: Final = 1024  # merged-obligation decisions cached


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """A rule reduced to what ``decide`` needs. Built once by :func:`compile_rule`."""

    id: str
    allow: bool
    source: str
    description: str
    roles: frozenset[str] | None  # None: any principal
    actions: frozenset[str]  # wildcards already expanded
    destinations: frozenset[str] | None  # None: any destination
    mfa: bool | None
    checks: tuple[Check, ...]
    condition_kinds: tuple[str, ...]  # e.g. ("mfa", "claims.department"), for explain
    obligations: Mapping[str, Any]
    obligation_keys: frozenset[str]
    decision: Decision  # what a match of this rule decides

    def holds(self, principal: Principal, resource: Resource, facts: RequestFacts) -> bool:
        """Whether every condition of the rule holds (``mfa`` included)."""
        if self.mfa is not None and self.mfa != principal.mfa:
            return False
        return _all(self.checks, principal, resource, facts)


def _all(
    checks: tuple[Check, ...], principal: Principal, resource: Resource, facts: RequestFacts
) -> bool:
    for check in checks:
        if not check(principal, resource, facts):
            return False
    return True


@dataclass(frozen=True, slots=True)
class _Plan:
    """The candidate rules for one (role set, action, destination), in load order."""

    denies: tuple[CompiledRule, ...]
    # Each allow rule with the later allow candidates that carry obligations: after
    # the first match only those can change the result.
    allows: tuple[tuple[CompiledRule, tuple[CompiledRule, ...]], ...]
    default: Decision
    constant: Decision | None  # the answer, when no condition can change it


def _unconditional(rule: CompiledRule) -> bool:
    return rule.mfa is None and not rule.checks


def _upto_unconditional(rules: list[CompiledRule]) -> tuple[CompiledRule, ...]:
    """Rules in order up to the first that always matches: later ones never decide."""
    for n, rule in enumerate(rules):
        if _unconditional(rule):
            return tuple(rules[: n + 1])
    return tuple(rules)


@dataclass(slots=True)
class _View:
    """A principal's role set as the policy sees it."""

    held: tuple[str, ...]  # the defined roles the principal holds, sorted (for reasons)
    effective: frozenset[str]  # held roles plus everything they inherit
    plans: dict[tuple[str, str], _Plan] = field(default_factory=dict)


class CompiledPolicy:
    """A loaded policy, ready to decide. Immutable apart from its internal caches."""

    __slots__ = (
        "_closure",
        "_index",
        "_merges",
        "_uses_mfa",
        "_views",
        "_views_by_held",
        "dlp",
        "rule_count",
        "rules",
        "sources",
        "version",
    )

    version: str
    rule_count: int
    sources: tuple[str, ...]
    rules: tuple[CompiledRule, ...]

    def __init__(
        self,
        rules: Sequence[CompiledRule],
        role_closure: Mapping[str, frozenset[str]],
        *,
        version: str,
        sources: Sequence[str],
        dlp: DlpSettings | None = None,
    ) -> None:
        self.version = version
        self.dlp = dlp if dlp is not None else DlpSettings()
        self.sources = tuple(sources)
        self.rules = tuple(rules)
        self.rule_count = len(self.rules)
        self._closure: dict[str, frozenset[str]] = dict(role_closure)
        self._index = _build_index(self.rules)
        self._views: dict[frozenset[str], _View] = {}
        self._views_by_held: dict[frozenset[str], _View] = {}
        self._merges: dict[tuple[CompiledRule, ...], Decision] = {}
        self._uses_mfa = any(rule.mfa is not None for rule in self.rules)

    @property
    def roles(self) -> frozenset[str]:
        """The role names the policy defines."""
        return frozenset(self._closure)

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(rule.id for rule in self.rules)

    def effective_roles(self, roles: Iterable[str]) -> frozenset[str]:
        """The defined roles a holder of ``roles`` has, inheritance included."""
        out: set[str] = set()
        for role in roles:
            out |= self._closure.get(role, frozenset())
        return frozenset(out)

    def decide(
        self, principal: Principal, action: Action, resource: Resource, facts: RequestFacts
    ) -> Decision:
        """Allow or deny one request. Pure: the same arguments give the same answer."""
        decision = self._evaluate(principal, action, resource, facts)
        if decision.allow or principal.mfa or not self._uses_mfa:
            return decision
        # Step-up: denied now, but the same request with MFA would be allowed.
        with_mfa = self._evaluate(replace(principal, mfa=True), action, resource, facts)
        if not with_mfa.allow:
            return decision
        return Decision(
            allow=False,
            rule_id=decision.rule_id,
            reasons=(
                *(decision.reasons if decision.rule_id is not None else ()),
                f"rule '{with_mfa.rule_id}' requires multi-factor authentication",
            ),
            step_up=True,
        )

    def _evaluate(
        self, principal: Principal, action: Action, resource: Resource, facts: RequestFacts
    ) -> Decision:
        try:
            plan = self._views[principal.roles].plans[(action, resource.destination)]
        except KeyError:
            plan = self._plan(principal.roles, action, resource.destination)
        if plan.constant is not None:
            return plan.constant
        mfa = principal.mfa
        for rule in plan.denies:
            if rule.mfa is not None and rule.mfa != mfa:
                continue
            for check in rule.checks:
                if not check(principal, resource, facts):
                    break
            else:
                return rule.decision
        for rule, tail in plan.allows:
            if rule.mfa is not None and rule.mfa != mfa:
                continue
            for check in rule.checks:
                if not check(principal, resource, facts):
                    break
            else:
                if tail:
                    return self._merge(rule, tail, principal, resource, facts)
                return rule.decision
        return plan.default

    # -- slow paths: first sight of a role set / (action, destination), merges ----------

    def _view(self, roles: frozenset[str]) -> _View:
        view = self._views.get(roles)
        if view is None:
            held = frozenset(role for role in roles if role in self._closure)
            view = self._views_by_held.get(held)
            if view is None:
                view = _View(held=tuple(sorted(held)), effective=self.effective_roles(held))
                if len(self._views_by_held) >= _MAX_VIEWS:
                    self._views_by_held.clear()
                self._views_by_held[held] = view
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            self._views[roles] = view
        return view

    def _plan(self, roles: frozenset[str], action: str, destination: str) -> _Plan:
        view = self._view(roles)
        plan = view.plans.get((action, destination))
        if plan is not None:
            return plan
        by_dest = self._index.get(action) or self._index[_OTHER_ACTION]
        by_role = by_dest.get(destination) or by_dest.get(ANY) or {}
        picked: set[int] = set(by_role.get(ANY, ()))
        for role in view.effective:
            picked.update(by_role.get(role, ()))
        candidates = [self.rules[i] for i in sorted(picked)]
        denies = _upto_unconditional([rule for rule in candidates if not rule.allow])
        allow_rules = _upto_unconditional([rule for rule in candidates if rule.allow])
        if denies and _unconditional(denies[-1]):
            allow_rules = ()  # a deny always matches: no allow rule can win
        all_allows = [rule for rule in candidates if rule.allow]
        allows = tuple(
            (
                rule,
                tuple(  # later rules that could add obligations to this one's
                    later
                    for later in all_allows[all_allows.index(rule) + 1 :]
                    if not later.obligation_keys <= rule.obligation_keys
                ),
            )
            for rule in allow_rules
        )
        roles_text = ", ".join(view.held)
        reasons: tuple[str, ...] = (
            f"no allow rule for action '{action}' on destination '{destination}' "
            f"for roles [{roles_text}]",
        )
        if not view.held:
            reasons += ("none of the principal's roles is defined by the policy",)
        default = Decision(allow=False, rule_id=None, reasons=reasons)
        constant: Decision | None = None
        if denies:
            if len(denies) == 1 and _unconditional(denies[0]):
                constant = denies[0].decision
        elif not allows:
            constant = default
        elif _unconditional(allows[0][0]) and not allows[0][1]:
            constant = allows[0][0].decision
        plan = _Plan(denies=denies, allows=allows, default=default, constant=constant)
        if len(view.plans) >= _MAX_PLANS:
            view.plans.clear()
        view.plans[(action, destination)] = plan
        return plan

    def _merge(
        self,
        first: CompiledRule,
        tail: tuple[CompiledRule, ...],
        principal: Principal,
        resource: Resource,
        facts: RequestFacts,
    ) -> Decision:
        covered = first.obligation_keys
        matched: list[CompiledRule] = []
        for rule in tail:  # only rules that would add a key can change the result
            if (
                not rule.obligation_keys <= covered
                and (rule.mfa is None or rule.mfa == principal.mfa)
                and _all(rule.checks, principal, resource, facts)
            ):
                matched.append(rule)
                covered = covered | rule.obligation_keys
        if not matched:
            return first.decision
        key = (first, *matched)  # rules hash by identity
        decision = self._merges.get(key)
        if decision is None:
            merged = dict(first.obligations)
            for rule in matched:
                for name, value in rule.obligations.items():
                    merged.setdefault(name, value)
            also = ", ".join(f"'{rule.id}'" for rule in matched)
            decision = Decision(
                allow=True,
                rule_id=first.id,
                reasons=(*first.decision.reasons, f"obligations also from rules {also}"),
                obligations=MappingProxyType(merged),
            )
            if len(self._merges) >= _MAX_MERGES:
                self._merges.clear()
            self._merges[key] = decision
        return decision


def _build_index(
    rules: tuple[CompiledRule, ...],
) -> dict[str, dict[str, dict[str, tuple[int, ...]]]]:
    """action -> destination (or ANY) -> role (or ANY) -> rule positions, load order.

    A rule for every destination is filed under each named destination as well as
    under ANY, so one lookup finds all candidates for a destination.
    """
    named = {d for rule in rules if rule.destinations is not None for d in rule.destinations}
    index: dict[str, dict[str, dict[str, list[int]]]] = {
        action: {} for action in (*_ALL_ACTIONS, _OTHER_ACTION)
    }
    for pos, rule in enumerate(rules):
        actions = set(rule.actions)
        if not rule.allow and rule.actions >= _ALL_ACTIONS:
            actions.add(_OTHER_ACTION)
        dests = (*sorted(named), ANY) if rule.destinations is None else rule.destinations
        roles = (ANY,) if rule.roles is None else rule.roles
        for action in actions:
            for dest in dests:
                by_role = index[action].setdefault(dest, {})
                for role in roles:
                    by_role.setdefault(role, []).append(pos)
    return {
        action: {
            dest: {role: tuple(positions) for role, positions in by_role.items()}
            for dest, by_role in by_dest.items()
        }
        for action, by_dest in index.items()
    }


# -- compiling one rule ------------------------------------------------------------------


def compile_rule(
    rule: Rule,
    *,
    source: str,
    clock: LocalClock | None = None,
) -> CompiledRule:
    """Compile a validated rule. ``clock`` converts into its ``when.time.timezone``
    (resolved by the loader; share one clock per zone across rules)."""
    allow = rule.effect == "allow"
    if ANY in rule.actions:
        actions = _ALLOW_ACTIONS if allow else _ALL_ACTIONS
    else:
        actions = frozenset(rule.actions)
    when = rule.when
    checks: list[Check] = []
    kinds: list[str] = ["mfa"] if when.mfa is not None else []
    for name in ("study_uid", "series_uid", "instance_uid", "bucket", "key"):
        matcher: Matcher | None = getattr(when.resource, name)
        if matcher is not None:
            if name in ("bucket", "key"):
                checks.append(_object_check(name, matcher, allow=allow))
            else:
                checks.append(_resource_check(name, matcher))
            kinds.append(f"resource.{name}")
    for path, matcher in when.claims.items():
        checks.append(_claim_check(path, matcher))
        kinds.append(f"claims.{path}")
    for key, matcher in when.query.items():
        checks.append(_query_check(key, matcher, allow=allow))
        kinds.append(f"query.{key}")
    if when.time is not None:
        if clock is None:
            raise ValueError("a time condition needs the clock of its time zone")
        checks.append(_time_check(when.time, clock))
        kinds.append("time")
    obligations: Mapping[str, Any] = (
        MappingProxyType(
            {
                name: tuple(value) if isinstance(value, list) else value
                for name, value in rule.obligations.items()
            }
        )
        if rule.obligations
        else EMPTY_OBLIGATIONS
    )
    verb = "allowed" if allow else "denied"
    reasons = (f"{verb} by rule '{rule.id}'", *((rule.description,) if rule.description else ()))
    return CompiledRule(
        id=rule.id,
        allow=allow,
        source=source,
        description=rule.description,
        roles=None if ANY in rule.roles else frozenset(rule.roles),
        actions=actions,
        destinations=None if ANY in rule.destinations else frozenset(rule.destinations),
        mfa=when.mfa,
        checks=tuple(checks),
        condition_kinds=tuple(kinds),
        obligations=obligations,
        obligation_keys=frozenset(obligations),
        decision=Decision(allow=allow, rule_id=rule.id, reasons=reasons, obligations=obligations),
    )


def _text(value: object) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def _operands(matcher: Matcher) -> tuple[str, frozenset[str], tuple[str, ...], bool]:
    """(operator, set for in/not_in/equals, prefixes, present flag); equals becomes in."""
    op = matcher.operator
    values: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    present = False
    if op == "in":
        values = frozenset(_text(v) for v in matcher.in_ or ())
    elif op == "not_in":
        values = frozenset(_text(v) for v in matcher.not_in or ())
    elif op == "equals":
        op = "in"
        values = frozenset({_text(matcher.equals)})
    elif op == "prefix":
        prefix = matcher.prefix
        prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix or ())
    else:
        present = bool(matcher.present)
    return op, values, prefixes, present


# claims: ANY element of a list-valued claim


def _scalar_text(value: Any) -> str | None:
    """A claim scalar as text; None for a missing, null or structured value."""
    if type(value) is str:
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return str(value)
    return None


def _claim_getter(path: str) -> Callable[[Mapping[str, Any]], Any]:
    keys = tuple(path.split("."))
    if len(keys) == 1:
        return lambda claims: claims.get(path, _MISSING)

    def get(claims: Mapping[str, Any]) -> Any:
        value: Any = claims.get(path, _MISSING)  # a key that itself contains dots
        if value is not _MISSING:
            return value
        value = claims
        for key in keys:
            if not isinstance(value, Mapping):
                return _MISSING
            value = value.get(key, _MISSING)
            if value is _MISSING:
                return value
        return value

    return get


def _claim_check(path: str, matcher: Matcher) -> Check:
    get = _claim_getter(path)
    op, values, prefixes, present = _operands(matcher)

    if op == "present":

        def check_present(p: Principal, r: Resource, f: RequestFacts) -> bool:
            value = get(p.claims)
            return (value is not _MISSING and value is not None) is present

        return check_present

    if op == "in":

        def check_in(p: Principal, r: Resource, f: RequestFacts) -> bool:
            value = get(p.claims)
            if type(value) is str:
                return value in values
            if isinstance(value, list | tuple):
                for item in value:
                    if _scalar_text(item) in values:
                        return True
                return False
            return _scalar_text(value) in values

        return check_in

    if op == "not_in":

        def check_not_in(p: Principal, r: Resource, f: RequestFacts) -> bool:
            value = get(p.claims)
            if type(value) is str:
                return value not in values
            if isinstance(value, list | tuple):
                for item in value:
                    if _scalar_text(item) in values:
                        return False
                return True
            return _scalar_text(value) not in values

        return check_not_in

    def check_prefix(p: Principal, r: Resource, f: RequestFacts) -> bool:
        value = get(p.claims)
        if type(value) is str:
            return value.startswith(prefixes)
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            text = _scalar_text(item)
            if text is not None and text.startswith(prefixes):
                return True
        return False

    return check_prefix


# resource UIDs: one optional value each


def _resource_check(name: str, matcher: Matcher) -> Check:
    op, values, prefixes, present = _operands(matcher)
    get: Callable[[Resource], str | None] = attrgetter(name)
    if op == "in":
        return lambda p, r, f: get(r) in values
    if op == "not_in":
        return lambda p, r, f: get(r) not in values
    if op == "prefix":

        def check_prefix(p: Principal, r: Resource, f: RequestFacts) -> bool:
            uid = get(r)
            return uid is not None and uid.startswith(prefixes)

        return check_prefix
    return lambda p, r, f: (get(r) is not None) is present


# object-store bucket / key: a missing field fails closed (see the module docstring)


def _never(r: Resource) -> bool:
    return False


def _names_bucket(r: Resource) -> bool:
    return r.bucket is not None


def _object_check(name: str, matcher: Matcher, *, allow: bool) -> Check:
    op, values, prefixes, present = _operands(matcher)
    get: Callable[[Resource], str | None] = attrgetter(name)
    if op == "present":
        return lambda p, r, f: (get(r) is not None) is present
    # What a missing value answers: allow rules never match; a deny on keys catches
    # requests on a bucket that name no key.
    missing = _names_bucket if name == "key" and not allow else _never
    if op == "in":

        def check_in(p: Principal, r: Resource, f: RequestFacts) -> bool:
            value = get(r)
            return missing(r) if value is None else value in values

        return check_in
    if op == "not_in":

        def check_not_in(p: Principal, r: Resource, f: RequestFacts) -> bool:
            value = get(r)
            return missing(r) if value is None else value not in values

        return check_not_in

    def check_prefix(p: Principal, r: Resource, f: RequestFacts) -> bool:
        value = get(r)
        return missing(r) if value is None else value.startswith(prefixes)

    return check_prefix


# query: several values; allow rules need every value, deny rules any value


def _parts(raw: tuple[str, ...] | str) -> list[str]:
    """The individual values of a query key: repeated keys, comma or backslash lists."""
    if isinstance(raw, str):  # be lenient with a caller that passed one bare value
        raw = (raw,)
    out: list[str] = []
    for value in raw:
        if "," in value or "\\" in value:
            out.extend(part.strip() for part in value.replace("\\", ",").split(","))
        else:
            out.append(value.strip())
    return out


def _wild(value: str) -> bool:
    """An empty value (universal match) or one with a QIDO wildcard."""
    return not value or "*" in value or "?" in value


def _literal_head(value: str) -> str:
    cut = len(value)
    for char in "*?":
        pos = value.find(char)
        if pos != -1:
            cut = min(cut, pos)
    return value[:cut]


def _query_check(key: str, matcher: Matcher, *, allow: bool) -> Check:
    op, values, prefixes, present = _operands(matcher)
    if op == "present":
        return lambda p, r, f: (key in r.query) is present
    if allow:
        return _query_allow(key, op, values, prefixes)
    return _query_deny(key, op, values, prefixes)


def _query_allow(key: str, op: str, values: frozenset[str], prefixes: tuple[str, ...]) -> Check:
    """What the query could return must certainly match: every value, no wildcards."""
    if op == "in":
        literal = frozenset(v for v in values if not _wild(v))

        def check_in(p: Principal, r: Resource, f: RequestFacts) -> bool:
            raw = r.query.get(key)
            if not raw:  # missing, or present without a value (universal match)
                return False
            for value in raw:  # (a bare str instead of a tuple fails closed here)
                if value in literal and "," not in value and "\\" not in value:
                    continue
                for part in _parts(value):
                    if part not in literal:
                        return False
            return True

        return check_in

    if op == "not_in":

        def check_not_in(p: Principal, r: Resource, f: RequestFacts) -> bool:
            raw = r.query.get(key)
            if raw is None:
                return True
            if not raw:
                return False
            for part in _parts(raw):
                if part in values or _wild(part):
                    return False
            return True

        return check_not_in

    def check_prefix(p: Principal, r: Resource, f: RequestFacts) -> bool:
        raw = r.query.get(key)
        if not raw:
            return False
        for part in _parts(raw):
            if not part.startswith(prefixes):
                return False
        return True

    return check_prefix


def _query_deny(key: str, op: str, values: frozenset[str], prefixes: tuple[str, ...]) -> Check:
    """What the query could return possibly matches: any value; wildcards count."""
    if op == "in":

        def check_in(p: Principal, r: Resource, f: RequestFacts) -> bool:
            raw = r.query.get(key)
            if raw is None:
                return False
            if not raw:
                return True
            for part in _parts(raw):
                if part in values or _wild(part):
                    return True
            return False

        return check_in

    if op == "not_in":

        def check_not_in(p: Principal, r: Resource, f: RequestFacts) -> bool:
            raw = r.query.get(key)
            if not raw:
                return True
            for part in _parts(raw):
                if part not in values or _wild(part):
                    return True
            return False

        return check_not_in

    def check_prefix(p: Principal, r: Resource, f: RequestFacts) -> bool:
        raw = r.query.get(key)
        if raw is None:
            return False
        if not raw:
            return True
        for part in _parts(raw):
            if part.startswith(prefixes):
                return True
            if _wild(part):
                head = _literal_head(part)
                for prefix in prefixes:
                    if prefix.startswith(head) or head.startswith(prefix):
                        return True
        return False

    return check_prefix


# time


class LocalClock:
    """Converts request times into one time zone: (minute of the day, weekday).

    Remembers the last conversion, so the time rules of one decision that share a zone
    convert the request time once (same datetime object: same answer).
    """

    __slots__ = ("_last", "zone")

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        self._last: tuple[datetime | None, int, int] = (None, 0, 0)

    def local(self, when: datetime) -> tuple[int, int]:
        last = self._last
        if last[0] is when:
            return last[1], last[2]
        aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        local = aware.astimezone(self.zone)
        minute, weekday = local.hour * 60 + local.minute, local.weekday()
        self._last = (when, minute, weekday)
        return minute, weekday


def _minutes(hhmm: str | None) -> int | None:
    if hhmm is None:
        return None
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _time_check(window: TimeWindow, clock: LocalClock) -> Check:
    after, before = _minutes(window.after), _minutes(window.before)
    days = frozenset(DAYS.index(day) for day in window.days) if window.days else None
    start = 0 if after is None else after
    end = 24 * 60 if before is None else before
    local = clock.local

    if start > end:  # wraps midnight: a night shift 19:00-07:00

        def check_wrapped(p: Principal, r: Resource, f: RequestFacts) -> bool:
            minute, weekday = local(f.time)
            if days is not None and weekday not in days:
                return False
            return minute >= start or minute < end

        return check_wrapped

    def check(p: Principal, r: Resource, f: RequestFacts) -> bool:
        minute, weekday = local(f.time)
        if days is not None and weekday not in days:
            return False
        return start <= minute < end

    return check
