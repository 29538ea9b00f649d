"""The pipeline without mitmproxy: real verifier (JWKS file), real policy, real router,
real audit log. What the edge would forward, refuse and audit."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from casb.config import ConfigError, Settings
from casb.context import Action, Principal, RequestFacts, Resource
from casb.exchange import Forward, IncomingRequest, Refusal
from casb.policy import load_policy
from casb.policy.decision import Decision
from casb.runtime import Runtime
from tests.jwks_server import TestKey, jwks_of
from tests.support.audit_keys import audit_settings

REPO = Path(__file__).resolve().parents[2]
ISS, AUD = "https://idp.test", "casb"


@pytest.fixture(scope="module")
def key() -> TestKey:
    return TestKey.generate("ES256")


def make_runtime(
    tmp_path: Path,
    key: TestKey,
    *,
    identity: dict[str, Any] | None = None,
    destinations: dict[str, Any] | None = None,
) -> Runtime:
    tmp_path.mkdir(parents=True, exist_ok=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_of(key)))
    uid_key = tmp_path / "uid.key"
    uid_key.write_text("0123456789abcdef0123456789abcdef")
    settings = Settings(
        environment="production",
        destinations=destinations
        or {
            "pacs": {"upstream": "https://pacs.example.org:8443/dicom-web"},
            "research": {
                "upstream": "http://research.example.org/dw",
                "upstream_auth": {"type": "passthrough"},
            },
        },
        identity={"issuer": ISS, "audience": [AUD], "jwks_file": str(jwks), **(identity or {})},
        policy={"paths": [str(REPO / "policies" / "hospital.yaml")]},
        audit=audit_settings(tmp_path),
        dlp={"uid_key_file": str(uid_key)},
    )
    return Runtime.build(settings)


def token(key: TestKey, roles: list[str], *, sub: str = "u1", mfa: bool = False) -> str:
    now = int(time.time())
    return key.sign(
        {
            "iss": ISS,
            "aud": AUD,
            "sub": sub,
            "iat": now,
            "exp": now + 300,
            "roles": roles,
            "amr": ["pwd", "mfa"] if mfa else ["pwd"],
        }
    )


def request(
    target: str, tok: str | None = None, method: str = "GET", **extra_headers: str
) -> IncomingRequest:
    headers = [("Authorization", f"Bearer {tok}")] if tok else []
    headers += list(extra_headers.items())
    # a client on TLS: the transport checks have tests of their own
    return IncomingRequest(
        method=method, target=target, headers=headers, client_ip="10.1.2.3", client_tls=True
    )


async def test_allowed_request_is_rewritten_to_what_was_classified(
    tmp_path: Path, key: TestKey
) -> None:
    rt = make_runtime(tmp_path, key)
    tx = await rt.pipeline.decide(
        request("/pacs//studies/%31.2.3/series/?limit=5", token(key, ["radiologist"]))
    )
    assert isinstance(tx.outcome, Forward), tx.reasons
    fwd = tx.outcome
    assert (fwd.scheme, fwd.host, fwd.port) == ("https", "pacs.example.org", 8443)
    assert fwd.target == "/dicom-web/studies/1.2.3/series?limit=5"
    assert ("Host", "pacs.example.org:8443") in fwd.set_headers
    assert "Authorization" in fwd.remove_headers  # default: the client's token stays here
    assert "Upgrade" in fwd.remove_headers  # no WebSocket/h2c tunnel past the checks
    assert tx.action is Action.SEARCH and tx.resource is not None
    assert tx.resource.study_uid == "1.2.3"
    assert tx.decision is not None and tx.decision.rule_id == "radiologist-read"


async def test_passthrough_keeps_the_client_token(tmp_path: Path, key: TestKey) -> None:
    rt = make_runtime(
        tmp_path,
        key,
        destinations={
            "pacs": {
                "upstream": "http://pacs.example.org/dw",
                "upstream_auth": {"type": "passthrough"},
            },
            "research": {"upstream": "http://research.example.org/dw"},
        },
    )
    tx = await rt.pipeline.decide(request("/pacs/studies", token(key, ["radiologist"])))
    assert isinstance(tx.outcome, Forward)
    assert "Authorization" not in tx.outcome.remove_headers
    assert tx.outcome.host == "pacs.example.org" and tx.outcome.port == 80


async def test_unenforceable_obligation_is_refused_not_forwarded(
    tmp_path: Path, key: TestKey
) -> None:
    # researcher-read masks responses; a rendered image cannot be de-identified.
    rt = make_runtime(tmp_path, key)
    tx = await rt.pipeline.decide(
        request("/research/studies/1.2/rendered", token(key, ["researcher"]))
    )
    assert isinstance(tx.outcome, Refusal)
    assert (tx.outcome.status, tx.outcome.code) == (403, "unenforceable_obligation")
    assert tx.decision is not None and tx.decision.allow  # the policy said yes ...
    rt.pipeline.finish(tx, status=403)
    rec = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert rec["decision"] == "deny"  # ... the outcome is what gets audited
    assert rec["rule_id"] == "researcher-read"
    assert rec["obligations"] == {"mask": "research-view"}
    assert "cannot be de-identified" in rec["reasons"][-1]


async def test_an_obligation_nobody_enforces_is_refused(tmp_path: Path, key: TestKey) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nroles: {staff: {}}\nrules:\n"
        "  - {id: r, effect: allow, roles: [staff], actions: [search], destinations: [pacs],"
        " obligations: {watermark: true}}\n"
    )
    rt = make_runtime(tmp_path, key)
    rt.pipeline.policy = load_policy([policy], {"pacs", "research"})
    tx = await rt.pipeline.decide(request("/pacs/studies", token(key, ["staff"])))
    assert isinstance(tx.outcome, Refusal)
    assert (tx.outcome.status, tx.outcome.code) == (403, "unenforceable_obligation")
    assert "watermark" in tx.outcome.message


async def test_masked_reads_carry_a_response_plan(tmp_path: Path, key: TestKey) -> None:
    rt = make_runtime(tmp_path, key)
    tx = await rt.pipeline.decide(request("/research/studies", token(key, ["researcher"])))
    assert isinstance(tx.outcome, Forward) and tx.outcome.dlp is not None
    assert (tx.outcome.dlp.direction, tx.outcome.dlp.profile) == ("response", "research-view")
    # the same researcher's searches on pacs are not allowed at all
    tx = await rt.pipeline.decide(request("/pacs/studies", token(key, ["researcher"])))
    assert isinstance(tx.outcome, Refusal) and tx.outcome.status == 403


STOW = 'multipart/related; type="application/dicom"; boundary=b'


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Type": STOW}, None),
        ({"Content-Type": "application/dicom"}, 415),
        ({"Content-Type": "text/plain"}, 415),
        ({}, 415),
        ({"Content-Type": STOW, "Content-Encoding": "gzip"}, 415),
    ],
)
async def test_uploads_dlp_must_inspect_need_a_readable_body(
    tmp_path: Path, key: TestKey, headers: dict[str, str], status: int | None
) -> None:
    rt = make_runtime(tmp_path, key)
    tx = await rt.pipeline.decide(
        request("/pacs/studies", token(key, ["technologist"]), "POST", **headers)
    )
    if status is None:
        assert isinstance(tx.outcome, Forward) and tx.outcome.dlp is not None
        assert (tx.outcome.dlp.direction, tx.outcome.dlp.profile) == (
            "request",
            "clinical-upload",
        )
    else:
        assert isinstance(tx.outcome, Refusal)
        assert (tx.outcome.status, tx.outcome.code) == (status, "unsupported_media_type")


async def test_a_deidentifying_policy_needs_a_uid_key_in_production(
    tmp_path: Path, key: TestKey
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_of(key)))
    settings = Settings(
        environment="production",
        destinations={
            "pacs": {"upstream": "https://p.example"},
            "research": {"upstream": "https://r.example"},
        },
        identity={"issuer": ISS, "audience": [AUD], "jwks_file": str(jwks)},
        policy={"paths": [str(REPO / "policies" / "hospital.yaml")]},
        audit=audit_settings(tmp_path),
    )
    with pytest.raises(ConfigError, match="research-deidentify, research-view de-identify"):
        Runtime.build(settings)
    Runtime.build(settings, audit=False).discard()  # policy tools still work without it


async def test_bearer_upstream_credential_replaces_the_token(
    tmp_path: Path, key: TestKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_TOKEN", "upstream-secret")
    rt = make_runtime(
        tmp_path,
        key,
        destinations={
            "pacs": {
                "upstream": "https://pacs.example.org/dw",
                "upstream_auth": {"type": "bearer", "token_env": "PACS_TOKEN"},
            },
            "research": {"upstream": "https://research.example.org/dw"},
        },
    )
    tx = await rt.pipeline.decide(request("/pacs/studies", token(key, ["radiologist"])))
    assert isinstance(tx.outcome, Forward)
    assert ("Authorization", "Bearer upstream-secret") in tx.outcome.set_headers


async def test_query_token_refused_unless_enabled_and_then_stripped(
    tmp_path: Path, key: TestKey
) -> None:
    tok = token(key, ["radiologist"])
    off = make_runtime(tmp_path / "off", key)
    tx = await off.pipeline.decide(request(f"/pacs/studies?access_token={tok}"))
    assert isinstance(tx.outcome, Refusal) and tx.outcome.status == 401
    assert "disabled" in tx.outcome.message

    on = make_runtime(tmp_path / "on", key, identity={"allow_query_token": True})
    tx = await on.pipeline.decide(
        request(
            f"/pacs/studies/1.2/series/3.4/instances/5.6/frames/1?access_token={tok}"
            "&accept=image%2Fjpeg"
        )
    )
    assert isinstance(tx.outcome, Forward), tx.reasons
    assert "access_token" not in tx.outcome.target and tok not in tx.outcome.target
    assert tx.outcome.target.endswith("/frames/1?accept=image%2Fjpeg")


async def test_refusals_carry_status_code_and_reason(tmp_path: Path, key: TestKey) -> None:
    rt = make_runtime(tmp_path, key)
    cases = [
        (request("/pacs/studies"), 401, "unauthenticated"),
        (request("/pacs/studies", "x.y.z"), 401, "unauthenticated"),
        (request("/nowhere/studies", token(key, ["radiologist"])), 403, "unknown_destination"),
        (request("/pacs/studies", token(key, ["referring_physician"]), "POST"), 403, "forbidden"),
        (request("/pacs/%zz", token(key, ["radiologist"])), 400, "bad_request"),
        (
            request(
                "/pacs/studies",
                token(key, ["radiologist"]),
                "GET",
                **{"X-HTTP-Method-Override": "DELETE"},
            ),
            400,
            "bad_request",
        ),
        (request("/pacs/studies/1.2", token(key, ["admin"]), "DELETE"), 401, "mfa_required"),
    ]
    for req, status, code in cases:
        tx = await rt.pipeline.decide(req)
        assert isinstance(tx.outcome, Refusal), req.target
        assert (tx.outcome.status, tx.outcome.code) == (status, code), req.target
        assert tx.outcome.message
    tx = await rt.pipeline.decide(request("/pacs/studies/1.2", token(key, ["admin"]), "DELETE"))
    assert isinstance(tx.outcome, Refusal)
    assert (
        'error="insufficient_user_authentication"' in dict(tx.outcome.headers)["WWW-Authenticate"]
    )
    tx = await rt.pipeline.decide(
        request("/pacs/studies/1.2", token(key, ["admin"], mfa=True), "DELETE")
    )
    assert isinstance(tx.outcome, Forward)


class _BrokenPolicy:
    version = "sha256:broken"
    rule_count = 0

    def decide(
        self, principal: Principal, action: Action, resource: Resource, facts: RequestFacts
    ) -> Decision:
        raise RuntimeError("boom")


async def test_a_check_that_raises_denies(tmp_path: Path, key: TestKey) -> None:
    rt = make_runtime(tmp_path, key)
    rt.pipeline.policy = _BrokenPolicy()  # type: ignore[assignment]
    tx = await rt.pipeline.decide(request("/pacs/studies", token(key, ["radiologist"])))
    assert isinstance(tx.outcome, Refusal)
    assert (tx.outcome.status, tx.outcome.code) == (500, "internal_error")
    assert tx.reasons == ("internal error: RuntimeError",)
    rt.pipeline.finish(tx, status=500)
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert record["decision"] == "deny" and record["status"] == 500


async def test_audit_record_has_the_contract_fields_and_no_query_values(
    tmp_path: Path, key: TestKey
) -> None:
    rt = make_runtime(tmp_path, key)
    req = request(
        "/pacs/studies?PatientName=Secret%5EName&00100020=MRN-778899",
        token(key, ["radiologist"], sub="dr-who"),
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    tx = await rt.pipeline.decide(req)
    rt.pipeline.finish(tx, status=200, bytes_in=0, bytes_out=1234)
    rt.pipeline.finish(tx, status=200)  # only ever one record per request
    raw = (tmp_path / "audit.jsonl").read_text()
    # the policy the runtime loaded, then this request's one record
    assert [json.loads(line)["type"] for line in raw.splitlines()] == ["policy_change", "request"]
    assert "Secret" not in raw and "MRN-778899" not in raw
    rec = json.loads(raw.splitlines()[-1])
    assert set(rec) >= {
        "type",
        "time",
        "request_id",
        "trace_id",
        "principal",
        "client",
        "action",
        "destination",
        "uids",
        "decision",
        "rule_id",
        "reasons",
        "dlp",
        "bytes_in",
        "bytes_out",
        "status",
        "duration_ms",
        "seq",
        "prev_hash",
        "hash",
    }
    assert rec["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert rec["principal"] == {
        "sub": "dr-who",
        "issuer": ISS,
        "roles": ["radiologist"],
        "mfa": False,
    }
    assert rec["client"] == {"ip": "10.1.2.3"}
    assert rec["query_keys"] == ["PatientID", "PatientName"]
    assert rec["bytes_out"] == 1234 and rec["decision"] == "allow"
    assert datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).tzinfo == UTC


@pytest.mark.parametrize(
    ("target", "refused"),
    [
        ("/research/studies?ModalitiesInStudy=CT&includefield=all&limit=5", None),
        ("/research/studies?StudyDate=20240101", None),  # research-view keeps full dates
        ("/research/studies?PatientID=SENT4711", "PatientID"),
        ("/research/studies?00100010=Doe*", "PatientName"),
        ("/research/studies?PatientBirthDate=19370215", "PatientBirthDate"),
        ("/research/studies?ReferringPhysicianName=X", "ReferringPhysicianName"),
        ("/research/studies?0019100A=x", "0019100A"),  # a private tag: never kept
        ("/research/studies?NotAnAttribute=x", "NotAnAttribute"),
        ("/research/studies/1.2.3/series", None),  # research-view keeps UIDs
    ],
)
async def test_masked_searches_may_only_match_on_what_the_profile_keeps(
    tmp_path: Path, key: TestKey, target: str, refused: str | None
) -> None:
    rt = make_runtime(tmp_path, key)
    tx = await rt.pipeline.decide(request(target, token(key, ["researcher"])))
    if refused is None:
        assert isinstance(tx.outcome, Forward), tx.outcome
    else:
        assert isinstance(tx.outcome, Refusal)
        assert (tx.outcome.status, tx.outcome.code) == (403, "forbidden")
        assert f"matching on {refused} is refused" in tx.outcome.message
        assert "SENT4711" not in tx.outcome.message  # names keys, never values


async def test_a_mask_that_replaces_uids_refuses_requests_naming_uids(
    tmp_path: Path, key: TestKey
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nroles: {staff: {}}\nrules:\n"
        "  - {id: r, effect: allow, roles: [staff], actions: [search, retrieve],"
        " destinations: [research], obligations: {mask: strict}}\n"
        "dlp: {profiles: {strict: {deidentify: []}}}\n"
    )
    rt = make_runtime(tmp_path, key)
    rt.pipeline.policy = load_policy([policy], {"pacs", "research"})
    tok = token(key, ["staff"])
    tx = await rt.pipeline.decide(request("/research/studies?ModalitiesInStudy=MR", tok))
    assert isinstance(tx.outcome, Forward)
    for target in ("/research/studies/1.2.3", "/research/studies/1.2.3/series"):
        tx = await rt.pipeline.decide(request(target, tok))
        assert isinstance(tx.outcome, Refusal) and "replaces UIDs" in tx.outcome.message


async def test_two_content_types_make_an_inspected_upload_ambiguous(
    tmp_path: Path, key: TestKey
) -> None:
    rt = make_runtime(tmp_path, key)
    req = IncomingRequest(
        method="POST",
        target="/pacs/studies",
        headers=[
            ("Authorization", f"Bearer {token(key, ['technologist'])}"),
            ("Content-Type", 'multipart/related; type="application/dicom"; boundary=a'),
            ("Content-Type", 'multipart/related; type="application/dicom"; boundary=b'),
        ],
        client_tls=True,
    )
    tx = await rt.pipeline.decide(req)
    assert isinstance(tx.outcome, Refusal)
    assert (tx.outcome.status, tx.outcome.code) == (400, "bad_request")


# -- encryption in transit -----------------------------------------------------------


@pytest.mark.parametrize(
    ("client_tls", "plaintext_ok", "upstream", "dest_plaintext", "expected"),
    [
        (True, False, "https://pacs.example.org/dw", False, None),
        (False, False, "https://pacs.example.org/dw", False, "arrived over plaintext HTTP"),
        (False, True, "https://pacs.example.org/dw", False, None),
        (True, False, "http://pacs.example.org/dw", False, "plaintext http://"),
        (True, False, "http://pacs.example.org/dw", True, None),
    ],
)
async def test_uploads_never_travel_over_a_plaintext_leg(
    tmp_path: Path,
    key: TestKey,
    client_tls: bool,
    plaintext_ok: bool,
    upstream: str,
    dest_plaintext: bool,
    expected: str | None,
) -> None:
    rt = make_runtime(
        tmp_path,
        key,
        destinations={
            "pacs": {"upstream": upstream, "allow_plaintext": dest_plaintext},
            "research": {"upstream": "https://research.example.org/dw"},
        },
    )
    tok = token(key, ["technologist"])
    ctype = 'multipart/related; type="application/dicom"; boundary=a'
    base = request("/pacs/studies", tok, "POST", **{"Content-Type": ctype})
    req = IncomingRequest(
        method=base.method,
        target=base.target,
        headers=base.headers,
        client_tls=client_tls,
        plaintext_ok=plaintext_ok,
    )
    tx = await rt.pipeline.decide(req)
    if expected is None:
        assert isinstance(tx.outcome, Forward)
        assert tx.warnings == (["plaintext_upstream"] if dest_plaintext else [])
    else:
        assert isinstance(tx.outcome, Refusal)
        assert (tx.outcome.status, tx.outcome.code) == (403, "insecure_transport")
        assert expected in tx.outcome.message
    # reads are not refused for the transport
    read = IncomingRequest(
        method="GET", target="/pacs/studies", headers=base.headers, client_tls=client_tls
    )
    assert isinstance((await rt.pipeline.decide(read)).outcome, Forward)
