"""Token extraction (RFC 6750 §2.1 header, §2.3 query) and WWW-Authenticate formatting."""

from __future__ import annotations

import pytest

from casb.identity import AuthenticationError, extract_token, strip_query_token

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"


def extract(
    headers: list[tuple[str, str]] | None = None,
    query: list[tuple[str, str]] | None = None,
    *,
    allow_query: bool = False,
    max_bytes: int = 8192,
) -> tuple[str, str]:
    return extract_token(headers or [], query or [], allow_query=allow_query, max_bytes=max_bytes)


def error_of(*args: object, **kwargs: object) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        extract(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


# -- header ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION"])
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_header(name: str, scheme: str) -> None:
    assert extract([(name, f"{scheme} {TOKEN}")]) == (TOKEN, "header")


def test_bearer_header_tolerates_extra_whitespace() -> None:
    assert extract([("Authorization", f"  Bearer   {TOKEN}  ")]) == (TOKEN, "header")


def test_other_headers_ignored() -> None:
    headers = [("Host", "pacs"), ("Authorization", f"Bearer {TOKEN}"), ("Accept", "*/*")]
    assert extract(headers) == (TOKEN, "header")


def test_no_credentials_has_no_error_code() -> None:
    err = error_of([("Host", "pacs")])
    assert err.code == ""
    assert err.www_authenticate() == 'Bearer realm="casb"'


def test_two_authorization_headers() -> None:
    err = error_of([("Authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")])
    assert err.code == "invalid_request"


@pytest.mark.parametrize(
    "value", ["Basic dXNlcjpwYXNz", "Digest username=x", "Token abc", f"Bearer-ish {TOKEN}", TOKEN]
)
def test_non_bearer_scheme(value: str) -> None:
    err = error_of([("Authorization", value)])
    assert (err.code, err.description) == ("invalid_request", "expected a Bearer token")


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "bearer    ", "", "   "])
def test_empty_token(value: str) -> None:
    assert error_of([("Authorization", value)]).code == "invalid_request"


# -- query -----------------------------------------------------------------------------


def test_query_token_when_allowed() -> None:
    query = [("includefield", "00100010"), ("access_token", TOKEN)]
    assert extract(query=query, allow_query=True) == (TOKEN, "query")


def test_query_token_when_disabled() -> None:
    err = error_of(query=[("access_token", TOKEN)])
    assert (err.code, err.description) == (
        "invalid_request",
        "access_token query parameter is disabled",
    )
    # ...even when a header is also present: the URL carries a token we will not take.
    err = error_of([("Authorization", f"Bearer {TOKEN}")], [("access_token", TOKEN)])
    assert err.description == "access_token query parameter is disabled"


def test_query_token_repeated() -> None:
    err = error_of(query=[("access_token", TOKEN), ("access_token", TOKEN)], allow_query=True)
    assert err.code == "invalid_request"


def test_header_and_query_both() -> None:
    err = error_of(
        [("Authorization", f"Bearer {TOKEN}")], [("access_token", TOKEN)], allow_query=True
    )
    assert err.code == "invalid_request"
    assert "not both" in err.description


def test_empty_query_token() -> None:
    assert error_of(query=[("access_token", "")], allow_query=True).code == "invalid_request"


def test_query_parameter_name_is_exact() -> None:
    # RFC 6750 names the parameter `access_token`; other spellings are just query data.
    err = error_of(query=[("Access_Token", TOKEN)], allow_query=True)
    assert err.code == ""


def test_strip_query_token() -> None:
    query = [
        ("limit", "10"),
        ("access_token", TOKEN),
        ("PatientID", "x"),
        ("access_token", "again"),
    ]
    assert strip_query_token(query) == (("limit", "10"), ("PatientID", "x"))
    assert strip_query_token([]) == ()


# -- shape and size --------------------------------------------------------------------


def test_token_too_large() -> None:
    big = "a" * 300 + "." + "b" * 300 + "." + "c" * 300
    err = error_of([("Authorization", f"Bearer {big}")], max_bytes=256)
    assert (err.code, err.description) == ("invalid_token", "token too large")
    assert extract([("Authorization", f"Bearer {big}")], max_bytes=len(big))[0] == big


def test_token_too_large_in_query() -> None:
    big = "a" * 300 + ".b.c"
    err = error_of(query=[("access_token", big)], allow_query=True, max_bytes=256)
    assert err.description == "token too large"


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c.d",
        "a..c",
        ".b.c",
        "a b.c.d",
        "a.b.c d",
        "ä.b.c",
        "a+b.c.d",
        "a/b.c.d",
        "a.b.c===",
        "a.b.c\x00",
        "a.b\n.c",
        '{"alg":"none"}.x.y',
    ],
)
def test_malformed_tokens(token: str) -> None:
    err = error_of([("Authorization", f"Bearer {token}")])
    assert err.code in ("invalid_token", "invalid_request")
    if err.code == "invalid_token":
        assert err.description == "malformed token"


@pytest.mark.parametrize("token", ["a.b.c", "a.b.", "a=.b==.c", TOKEN])
def test_compact_jws_shape_accepted(token: str) -> None:
    assert extract([("Authorization", f"Bearer {token}")])[0] == token


def test_description_never_echoes_the_token() -> None:
    sentinel = "SENTINELsecretVALUE"
    for token in (
        f"{sentinel}",
        f"{sentinel}.x",
        f"{sentinel}.{sentinel}.{sentinel}!",
        sentinel * 1000,
    ):
        err = error_of([("Authorization", f"Bearer {token}")], max_bytes=1024)
        assert sentinel not in err.description
        assert sentinel not in err.www_authenticate()
        assert sentinel not in str(err)


# -- WWW-Authenticate ------------------------------------------------------------------


def test_www_authenticate_formatting() -> None:
    err = AuthenticationError("invalid_token", "token expired")
    assert err.www_authenticate() == (
        'Bearer realm="casb", error="invalid_token", error_description="token expired"'
    )
    assert err.www_authenticate(realm="pacs") == (
        'Bearer realm="pacs", error="invalid_token", error_description="token expired"'
    )
    assert str(err) == "token expired"


def test_www_authenticate_invalid_request() -> None:
    err = AuthenticationError("invalid_request", "expected a Bearer token")
    assert err.www_authenticate() == (
        'Bearer realm="casb", error="invalid_request", error_description="expected a Bearer token"'
    )


def test_www_authenticate_quotes_are_safe() -> None:
    err = AuthenticationError("invalid_token", 'missing required claim "x"\\\n')
    value = err.www_authenticate(realm='a"b')
    assert value == (
        'Bearer realm="a\'b", error="invalid_token", '
        "error_description=\"missing required claim 'x'??\""
    )
