"""Loading policy files: YAML, validation, cross-file checks, errors, the JSON Schema."""

from __future__ import annotations

import hashlib
import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import jsonschema
import pytest
import yaml

from casb.context import Action, Principal, RequestFacts, Resource
from casb.policy import (
    CompiledPolicy,
    PolicyDocument,
    PolicyLoadError,
    compile_policy,
    load_policy,
    parse_policy,
    policy_json_schema,
)
from casb.policy.model import ActionName

REPO = Path(__file__).resolve().parents[2]
HOSPITAL = REPO / "policies" / "hospital.yaml"
SCHEMA = REPO / "policies" / "schema.json"

ROLES = """\
version: 1
roles:
  staff: {}
  radiologist: {inherits: [staff]}
"""
READ_RULE = (
    "  - {id: read, effect: allow, roles: [staff], actions: [search], destinations: [pacs]}\n"
)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(*paths: Path, known: set[str] | None = None) -> str:
    with pytest.raises(PolicyLoadError) as info:
        load_policy(list(paths), known)
    return str(info.value)


def allowed(policy: CompiledPolicy, role: str, action: Action, destination: str) -> bool:
    principal = Principal(subject="s", issuer="i", roles=frozenset({role}))
    facts = RequestFacts(time=datetime(2024, 1, 1, 12, tzinfo=UTC))
    return policy.decide(principal, action, Resource(destination), facts).allow


# -- loading ----------------------------------------------------------------------------


def test_load_the_hospital_example() -> None:
    policy = load_policy([HOSPITAL], known_destinations={"pacs", "research"})
    assert policy.rule_count == 9
    assert policy.sources == (str(HOSPITAL),)
    assert policy.version == "sha256:" + hashlib.sha256(HOSPITAL.read_bytes()).hexdigest()
    assert {"staff", "radiologist", "admin", "teleradiologist"} <= policy.roles


def test_directory_loads_yaml_files_sorted_and_merges_them(tmp_path: Path) -> None:
    write(tmp_path, "20-rules.yml", "version: 1\nrules:\n" + READ_RULE)
    write(tmp_path, "10-roles.yaml", ROLES)
    write(tmp_path, "notes.txt", "not a policy")
    write(tmp_path, ".30-editor-backup.yaml", "garbage: [")
    (tmp_path / "sub.yaml").mkdir()
    policy = load_policy([tmp_path])
    assert policy.sources == (str(tmp_path / "10-roles.yaml"), str(tmp_path / "20-rules.yml"))
    joined = (tmp_path / "10-roles.yaml").read_bytes() + (tmp_path / "20-rules.yml").read_bytes()
    assert policy.version == "sha256:" + hashlib.sha256(joined).hexdigest()
    assert allowed(policy, "radiologist", Action.SEARCH, "pacs")  # role from the other file


def test_files_and_directories_load_in_the_order_given(tmp_path: Path) -> None:
    rules = write(tmp_path, "rules.yaml", "version: 1\nrules:\n" + READ_RULE)
    roles_dir = tmp_path / "roles"
    roles_dir.mkdir()
    write(roles_dir, "roles.yaml", ROLES)
    policy = load_policy([rules, roles_dir])
    assert policy.sources == (str(rules), str(roles_dir / "roles.yaml"))


def test_a_file_with_only_a_version_is_an_empty_policy(tmp_path: Path) -> None:
    policy = load_policy([write(tmp_path, "p.yaml", "version: 1\n")])
    assert policy.rule_count == 0
    assert not allowed(policy, "staff", Action.SEARCH, "pacs")


def test_compile_policy_version_hashes_the_documents() -> None:
    one = parse_policy(ROLES + "rules:\n" + READ_RULE)
    two = parse_policy(ROLES)
    a = compile_policy([("a", one)])
    assert a.version == compile_policy([("b", one)]).version  # independent of the name
    assert a.version != compile_policy([("a", two)]).version
    assert compile_policy([("a", one)], version="v7").version == "v7"


# -- errors name the file and the location ----------------------------------------------


def test_no_paths(tmp_path: Path) -> None:
    assert "no policy files given" in load_error()
    assert str(tmp_path) in load_error(tmp_path)
    assert "no *.yaml or *.yml policy files" in load_error(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "absent.yaml")
    assert message.startswith(f"{tmp_path / 'absent.yaml'}: cannot read")


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "version: 1\nrules:\n  - id: x\n    effect: [allow\n")
    message = load_error(path)
    assert message.startswith(f"{path}: line ")
    assert "not valid YAML" in message


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dup.yaml",
        """\
        version: 1
        rules:
          - id: r
            effect: allow
            roles: [x]
            actions: [search]
            destinations: [pacs]
            roles: ['*']
        """,
    )
    message = load_error(path)
    assert message.startswith(f"{path}: line 8, column 5")
    assert "duplicate key 'roles'" in message


def test_not_a_mapping_and_not_utf8(tmp_path: Path) -> None:
    listing = write(tmp_path, "list.yaml", "- version: 1\n")
    assert load_error(listing) == f"{listing}: expected a mapping at the top level"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: 1\ndescription: \xff\n")
    assert load_error(binary).startswith(f"{binary}: not UTF-8")


def test_empty_file_needs_a_version(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.yaml", "")
    assert load_error(path) == f"{path}: version: Field required"
    wrong = write(tmp_path, "v2.yaml", "version: 2\n")
    assert load_error(wrong).startswith(f"{wrong}: version: Input should be 1")


def test_unknown_field_names_its_location(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "typo.yaml",
        ROLES
        + "rules:\n"
        + READ_RULE
        + "  - {id: w, effect: allow, roles: [staff], actions: [store], destinations: [pacs],"
        " when: {claims: {dept: x}, querry: {a: b}}}\n",
    )
    message = load_error(path)
    assert message == f"{path}: rules[1].when.querry: Extra inputs are not permitted"


def test_bad_timezone(tmp_path: Path) -> None:
    rules = "".join(
        f"  - {{id: r{n}, effect: allow, roles: [staff], actions: [search], "
        f"destinations: [pacs]}}\n"
        for n in range(3)
    )
    path = write(
        tmp_path,
        "x.yaml",
        ROLES
        + "rules:\n"
        + rules
        + "  - {id: night, effect: allow, roles: [staff], actions: [search], destinations: [pacs],"
        " when: {time: {after: '19:00', before: '07:00', timezone: Europe/Berln}}}\n",
    )
    assert load_error(path) == (
        f"{path}: rules[3].when.time.timezone: unknown time zone 'Europe/Berln'"
    )


def test_duplicate_rule_ids_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", ROLES + "rules:\n" + READ_RULE)
    second = write(tmp_path, "b.yaml", "version: 1\nrules:\n" + READ_RULE.replace("pacs", "x"))
    assert load_error(first, second) == (
        f"{second}: rules[0].id: duplicate rule id 'read' (first defined in {first} rules[0])"
    )


def test_unknown_destination(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "d.yaml",
        ROLES + "rules:\n" + "  - {id: r, effect: allow, roles: [staff], actions: [search],"
        " destinations: [pacs, resarch]}\n"
        + "  - {id: s, effect: allow, roles: [staff], actions: [search], destinations: ['*']}\n",
    )
    assert load_error(path, known={"pacs", "research"}) == (
        f"{path}: rules[0].destinations[1]: unknown destination 'resarch' (known: pacs, research)"
    )
    assert load_policy([path]).rule_count == 2  # without the list, any name is accepted


def test_undefined_roles(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        ROLES
        + "  admin: {inherits: [radiolgist]}\n"
        + "rules:\n"
        + "  - {id: r, effect: allow, roles: [staff, radiolgist], actions: [search],"
        " destinations: [pacs]}\n",
    )
    problems = load_error(path).splitlines()
    assert problems == [
        f"{path}: roles.admin.inherits[0]: undefined role 'radiolgist'",
        f"{path}: rules[0].roles[1]: undefined role 'radiolgist'",
    ]


def test_inheritance_cycles_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        """\
        version: 1
        roles:
          base: {}
          a: {inherits: [base, c]}
          b: {inherits: [a]}
          c: {inherits: [b]}
          tail: {inherits: [a]}
          self: {inherits: [self]}
        """,
    )
    problems = load_error(path).splitlines()
    assert problems == [
        f"{path}: roles.a.inherits: inheritance cycle a -> c -> b -> a",
        f"{path}: roles.self.inherits: inheritance cycle self -> self",
    ]


def test_role_defined_twice_or_named_star(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", ROLES)
    second = write(tmp_path, "b.yaml", "version: 1\nroles:\n  staff: {}\n  '*': {}\n")
    assert load_error(first, second).splitlines() == [
        f"{second}: roles.staff: role already defined in {first}",
        f"{second}: roles.*: '*' is reserved for 'any role'",
    ]


@pytest.mark.parametrize(
    ("rule", "location", "message"),
    [
        (
            "{id: Bad_Id, effect: allow, roles: [staff], actions: [search], destinations: [p]}",
            "rules[0].id",
            "String should match pattern",
        ),
        (
            "{id: r, effect: permit, roles: [staff], actions: [search], destinations: [p]}",
            "rules[0].effect",
            "Input should be 'allow' or 'deny'",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [serach], destinations: [p]}",
            "rules[0].actions[0]",
            "Input should be '*', 'search'",
        ),
        (
            "{id: r, effect: allow, roles: [], actions: [search], destinations: [p]}",
            "rules[0].roles",
            "at least 1 item",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: ['*', search], destinations: [p]}",
            "rules[0].actions",
            "'*' must be the only entry",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search]}",
            "rules[0].destinations",
            "Field required",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {claims: {d: {in: [a], equals: b}}}}",
            "rules[0].when.claims.d",
            "exactly one operator",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {claims: {d: {contains: a}}}}",
            "rules[0].when.claims.d.contains",
            "Extra inputs are not permitted",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {query: {d: {in: [{x: 1}]}}}}",
            "rules[0].when.query.d.in[0]",
            "expected a string, number or boolean",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {query: {d: {prefix: ''}}}}",
            "rules[0].when.query.d.prefix",
            "non-empty string",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {resource: {patient_id: x}}}",
            "rules[0].when.resource.patient_id",
            "Extra inputs are not permitted",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {time: {after: 19:00, timezone: UTC}}}",
            "rules[0].when.time.after",
            "write times as quoted strings",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {time: {after: '25:00', timezone: UTC}}}",
            "rules[0].when.time.after",
            "String should match pattern",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {time: {after: '08:00', before: '08:00', timezone: UTC}}}",
            "rules[0].when.time",
            "the window would be empty",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {time: {timezone: UTC}}}",
            "rules[0].when.time",
            "at least one of after, before or days",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {time: {days: [monday], timezone: UTC}}}",
            "rules[0].when.time.days[0]",
            "Input should be 'mon'",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " when: {time: {after: '08:00'}}}",
            "rules[0].when.time.timezone",
            "Field required",
        ),
        (
            "{id: r, effect: deny, roles: [staff], actions: [search], destinations: [p],"
            " obligations: {deidentify: basic}}",
            "rules[0]",
            "only allow rules carry obligations",
        ),
        (
            "{id: r, effect: allow, roles: [staff], actions: [search], destinations: [p],"
            " obligations: {deidentify: {profile: basic}}}",
            "rules[0].obligations.deidentify",
            "expected a string, boolean, integer or list",
        ),
    ],
)
def test_validation_errors(tmp_path: Path, rule: str, location: str, message: str) -> None:
    path = write(tmp_path, "v.yaml", ROLES + "rules:\n  - " + rule + "\n")
    problems = load_error(path).splitlines()
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {location}: "), problems[0]
    assert message in problems[0]


def test_all_problems_of_all_files_are_reported(tmp_path: Path) -> None:
    one = write(tmp_path, "1.yaml", "version: 1\nrules: [{id: a}]\n")
    two = write(tmp_path, "2.yaml", "version: 1\nroles: {x: {inherit: [y]}}\n")
    problems = load_error(one, two).splitlines()
    assert f"{one}: rules[0].effect: Field required" in problems
    assert f"{two}: roles.x.inherit: Extra inputs are not permitted" in problems


def test_the_format_names_every_action() -> None:
    assert set(get_args(ActionName)) == {"*"} | {action.value for action in Action}


def test_matcher_shorthands_parse_to_in() -> None:
    doc = parse_policy(
        ROLES + "rules:\n  - {id: r, effect: allow, roles: [staff], actions: [search],"
        " destinations: [p], when: {claims: {a: x, b: [1, true], c: {equals: 2}}}}\n"
    )
    claims = doc.rules[0].when.claims
    assert claims["a"].operator == "in" and claims["a"].in_ == ["x"]
    assert claims["b"].in_ == [1, True]
    assert claims["c"].operator == "equals"


# -- the JSON Schema --------------------------------------------------------------------


def test_committed_schema_matches_the_model() -> None:
    generated = json.dumps(policy_json_schema(), indent=2, sort_keys=True) + "\n"
    assert SCHEMA.read_text(encoding="utf-8") == generated, (
        "policies/schema.json is stale; regenerate it with: .venv/bin/python -c "
        '"import json; from casb.policy import policy_json_schema as s; '
        "open('policies/schema.json', 'w').write(json.dumps(s(), indent=2, sort_keys=True) + "
        "'\\n')\""
    )


def test_hospital_example_validates_against_the_schema() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    document = yaml.safe_load(HOSPITAL.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(document)


@pytest.mark.parametrize(
    "document",
    [
        {
            "version": 1,
            "rules": [
                {
                    "id": "r",
                    "effect": "allow",
                    "roles": ["a"],
                    "actions": ["search"],
                    "destinations": ["p"],
                    "when": {
                        "claims": {
                            "d": "x",
                            "e": ["x", 1],
                            "f": {"prefix": ["a", "b"]},
                            "g": {"present": False},
                        }
                    },
                }
            ],
        },
        {"version": 1, "roles": {"a": {"inherits": []}}},
    ],
)
def test_schema_and_model_agree_on_valid_documents(document: dict[str, object]) -> None:
    jsonschema.validate(document, policy_json_schema(), cls=jsonschema.Draft202012Validator)
    PolicyDocument.model_validate(document)


@pytest.mark.parametrize(
    "document",
    [
        {"version": 2},
        {"version": 1, "extra": True},
        {
            "version": 1,
            "rules": [
                {
                    "id": "r",
                    "effect": "allow",
                    "roles": ["a"],
                    "actions": ["search"],
                    "destinations": ["p"],
                    "when": {"claims": {"d": {"in": ["x"], "equals": "y"}}},
                }
            ],
        },
        {
            "version": 1,
            "rules": [
                {
                    "id": "r",
                    "effect": "allow",
                    "roles": ["a"],
                    "actions": ["search"],
                    "destinations": ["p"],
                    "when": {"claims": {"d": {"equals": None}}},
                }
            ],
        },
        {
            "version": 1,
            "rules": [
                {
                    "id": "R",
                    "effect": "allow",
                    "roles": ["a"],
                    "actions": ["search"],
                    "destinations": ["p"],
                }
            ],
        },
    ],
)
def test_schema_and_model_agree_on_invalid_documents(document: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, policy_json_schema(), cls=jsonschema.Draft202012Validator)
    with pytest.raises(ValueError):
        PolicyDocument.model_validate(document)


# -- the dlp section --------------------------------------------------------------------

DLP_BASE = """
version: 1
roles: {staff: {}}
rules:
  - {id: up, effect: allow, roles: [staff], actions: [store], destinations: [pacs],
     obligations: {dlp: PROFILE}}
  - {id: read, effect: allow, roles: [staff], actions: [search], destinations: [pacs],
     obligations: {mask: MASK}}
dlp:
  profiles:
    guard: {block: [private_tag, free_text.ssn]}
    clean: {deidentify: [clean_descriptors]}
"""


def dlp_policy(tmp_path: Path, profile: str = "guard", mask: str = "clean") -> Path:
    return write(tmp_path, "p.yaml", DLP_BASE.replace("PROFILE", profile).replace("MASK", mask))


def test_dlp_profiles_load_and_are_merged_across_files(tmp_path: Path) -> None:
    extra = write(
        tmp_path,
        "q.yaml",
        "version: 1\ndlp:\n  profiles: {other: {}}\n  mrn_patterns: ['MRN\\d+']\n",
    )
    policy = load_policy([dlp_policy(tmp_path), extra])
    assert sorted(policy.dlp.profiles) == ["clean", "guard", "other"]
    assert policy.dlp.profiles["guard"].block == ["private_tag", "free_text.ssn"]
    assert policy.dlp.mrn_patterns == ["MRN\\d+"]
    assert policy.dlp.burned_in_modalities == ["US", "SC", "OT", "XA", "ES"]  # default


@pytest.mark.parametrize(
    ("profile", "mask", "expected"),
    [
        ("nope", "clean", "rules[0].obligations.dlp: unknown DLP profile 'nope'"),
        ("guard", "guard", "obligations.mask: profile 'guard' does not de-identify"),
        ("guard", "missing", "rules[1].obligations.mask: unknown DLP profile 'missing'"),
    ],
)
def test_dlp_obligations_must_name_a_usable_profile(
    tmp_path: Path, profile: str, mask: str, expected: str
) -> None:
    assert expected in load_error(dlp_policy(tmp_path, profile, mask))


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("profiles: {x: {block: [private_tags]}}", "unknown DLP rule 'private_tags'"),
        ("profiles: {x: {deidentify: [retain_everything]}}", "dlp.profiles.x.deidentify"),
        ("profiles: {x: {blok: []}}", "dlp.profiles.x.blok"),
        ("mrn_patterns: ['(']", "does not compile"),
        ("safe_private: [{creator: A, tag: '0018,xx10'}]", "odd group"),
    ],
)
def test_dlp_section_errors_name_the_field(tmp_path: Path, section: str, expected: str) -> None:
    path = write(tmp_path, "p.yaml", f"version: 1\ndlp:\n  {section}\n")
    assert expected in load_error(path)


def test_dlp_profile_and_settings_defined_twice_are_errors(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "version: 1\ndlp: {profiles: {x: {}}, mrn_patterns: []}\n")
    b = write(tmp_path, "b.yaml", "version: 1\ndlp: {profiles: {x: {}}, mrn_patterns: []}\n")
    error = load_error(a, b)
    assert "dlp.profiles.x: profile already defined in" in error
    assert "dlp.mrn_patterns: already set in" in error
