"""normalize_target / encode_target / effective_method: one canonical reading or a refusal."""

from __future__ import annotations

import pytest

from casb.classify import MalformedTarget, Target, effective_method, encode_target, normalize_target

# raw request-target -> (canonical path, query pairs)
VALID: list[tuple[str, str, tuple[tuple[str, str], ...]]] = [
    ("/", "/", ()),
    ("/studies", "/studies", ()),
    ("/%73tudies", "/studies", ()),
    ("/%53TUDIES", "/STUDIES", ()),
    ("/studies%2F1.2.3", "/studies/1.2.3", ()),
    ("/studies%2f1.2.3%2Fseries", "/studies/1.2.3/series", ()),
    ("/x/%2e%2e/studies", "/studies", ()),
    ("/x/%2E%2E/studies", "/studies", ()),
    ("/x/%2e/studies", "/x/studies", ()),
    ("/pacs/x/../studies", "/pacs/studies", ()),
    ("/pacs/a/b/../../studies", "/pacs/studies", ()),
    ("/./studies/.", "/studies", ()),
    ("/studies/1.2/..", "/studies", ()),
    ("/..x/...", "/..x/...", ()),
    ("//studies///1.2//series/", "/studies/1.2/series", ()),
    ("/studies/", "/studies", ()),
    ("///", "/", ()),
    ("/a//../b", "/b", ()),  # empty segments go before dot segments are resolved
    ("/studies;jsessionid=x", "/studies;jsessionid=x", ()),
    ("/a%20b", "/a b", ()),
    ("/%C3%A9tudes", "/\u00e9tudes", ()),
    ("/\u00e9tudes", "/\u00e9tudes", ()),
    ("/studies?", "/studies", ()),
    ("/studies?&&", "/studies", ()),
    ("/studies?a=1&&b=&c&=d", "/studies", (("a", "1"), ("b", ""), ("c", ""), ("", "d"))),
    ("/studies?PatientName=Doe%5EJohn+Q", "/studies", (("PatientName", "Doe^John Q"),)),
    ("/studies?x=a%2Bb", "/studies", (("x", "a+b"),)),
    ("/studies?x=a=b", "/studies", (("x", "a=b"),)),
    ("/studies?x=%25", "/studies", (("x", "%"),)),
    ("/studies?x=a%5Cb,c", "/studies", (("x", "a\\b,c"),)),
    ("/studies?x=1&x=2", "/studies", (("x", "1"), ("x", "2"))),
    ("/studies?q=a/b?c", "/studies", (("q", "a/b?c"),)),
    ("/studies?%C3%A9=%C3%A9", "/studies", (("\u00e9", "\u00e9"),)),
]


@pytest.mark.parametrize(("raw", "path", "query"), VALID, ids=[r for r, _, _ in VALID])
def test_valid_targets(raw: str, path: str, query: tuple[tuple[str, str], ...]) -> None:
    target = normalize_target(raw)
    assert target.path == path
    assert target.segments == tuple(s for s in path.split("/") if s)
    assert target.query == query


@pytest.mark.parametrize("raw", [r for r, _, _ in VALID])
def test_encode_round_trip(raw: str) -> None:
    target = normalize_target(raw)
    encoded = encode_target(target.segments, target.query)
    assert normalize_target(encoded) == target
    assert encoded.isascii()
    # canonical means stable: encoding the re-read target gives the same text
    assert encode_target(*_parts(normalize_target(encoded))) == encoded


def _parts(t: Target) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    return t.segments, t.query


MALFORMED: list[tuple[str, str]] = [
    ("", "starting with '/'"),
    ("studies", "starting with '/'"),
    ("http://pacs/studies", "starting with '/'"),
    ("*", "starting with '/'"),
    ("/studies#frag", "fragment"),
    ("/studies?x=1#frag", "fragment"),
    ("/stu dies", "control character, space or backslash"),
    ("/studies\x00", "control character, space or backslash"),
    ("/studies\t", "control character, space or backslash"),
    ("/studies\r\n", "control character, space or backslash"),
    ("/studies\x7f", "control character, space or backslash"),
    ("/stu\\dies", "control character, space or backslash"),
    ("/..\\studies", "control character, space or backslash"),
    ("/x/%252e%252e/studies", "double-encoded"),
    ("/studies%252F1.2", "double-encoded"),
    ("/%2525", "double-encoded"),
    ("/%25", "double-encoded"),
    ("/%zz", "invalid percent-escape"),
    ("/%4", "invalid percent-escape"),
    ("/studies%", "invalid percent-escape"),
    ("/%4g", "invalid percent-escape"),
    ("/%%41", "invalid percent-escape"),
    ("/%00", "control character"),
    ("/a%0Ab", "control character"),
    ("/a%7F", "control character"),
    ("/a%C2%85", "control character"),  # C1 NEL
    ("/a%5Cb", "backslash"),
    ("/a%5c..%5cb", "backslash"),
    ("/%C3%28", "not valid UTF-8"),
    ("/%FF", "not valid UTF-8"),
    ("/%C0%AE%C0%AE/x", "not valid UTF-8"),  # overlong-encoded '.'
    ("/\udcff", "not valid UTF-8"),  # a raw non-UTF-8 byte, as surrogateescape gives it
    ("/..", "above the root"),
    ("/../studies", "above the root"),
    ("/pacs/../../research", "above the root"),
    ("/%2e%2e/x", "above the root"),
    ("/x/..%2F..%2Fy", "above the root"),
    ("/x/%2E%2E%2f%2e%2e/y", "above the root"),
    ("/studies?a=%zz", "invalid percent-escape in the query"),
    ("/studies?%zz=a", "invalid percent-escape in the query"),
    ("/studies?a=%00", "control character"),
    ("/studies?a=%0A", "control character"),
    ("/studies?a b", "control character or space"),
    ("/studies?a=\x01", "control character or space"),
    ("/studies?a=%FF", "not valid UTF-8"),
]


@pytest.mark.parametrize(("raw", "why"), MALFORMED, ids=[repr(r) for r, _ in MALFORMED])
def test_malformed_targets(raw: str, why: str) -> None:
    with pytest.raises(MalformedTarget) as info:
        normalize_target(raw)
    assert why in info.value.reason
    assert str(info.value) == info.value.reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "raw",
    [
        "/studies/DOE%5EJOHN%zz",
        "/studies?PatientName=DOE%5EJOHN%zz",
        "/DOE^JOHN/../../x",
        "/studies?PatientName=DOE^JOHN#x",
        "/studies/DOE^JOHN%00",
        "/studies?PatientName=DOE%5EJOHN%FF",
        "/DOE^JOHN" + "x" * 9000,
    ],
)
def test_reason_never_quotes_the_input(raw: str) -> None:
    with pytest.raises(MalformedTarget) as info:
        normalize_target(raw)
    assert "DOE" not in info.value.reason
    assert "JOHN" not in str(info.value)


def test_length_limit_counts_bytes() -> None:
    at_limit = "/" + "a" * 8191
    assert normalize_target(at_limit).path == at_limit
    with pytest.raises(MalformedTarget, match="longer than 8192 bytes"):
        normalize_target(at_limit + "a")
    with pytest.raises(MalformedTarget, match="longer than 8192 bytes"):
        normalize_target("/" + "\u00e9" * 4096)  # 4097 characters, 8193 bytes
    with pytest.raises(MalformedTarget, match="longer than 10 bytes"):
        normalize_target("/studies/1.2", max_bytes=10)
    assert normalize_target("/studies/1", max_bytes=10).segments == ("studies", "1")


def test_target_is_immutable() -> None:
    target = normalize_target("/studies")
    with pytest.raises(AttributeError):
        target.path = "/other"  # type: ignore[misc]


def test_encode_target_escapes_everything_ambiguous() -> None:
    assert encode_target((), ()) == "/"
    assert encode_target(("studies", "1.2"), ()) == "/studies/1.2"
    assert encode_target(("a;b", "c+d", "e f", "g%h", "~x_y-z.", "1,2"), ()) == (
        "/a%3Bb/c%2Bd/e%20f/g%25h/~x_y-z./1,2"
    )
    assert encode_target(("studies",), [("a b", "c&d=e+f"), ("x", ""), ("", "y")]) == (
        "/studies?a+b=c%26d%3De%2Bf&x=&=y"
    )
    assert encode_target(["\u00e9"], [("k", "\\#?/")]) == "/%C3%A9?k=%5C%23%3F%2F"


@pytest.mark.parametrize("segment", ["", ".", "..", "a/b", "/"])
def test_encode_target_refuses_segments_without_one_encoding(segment: str) -> None:
    with pytest.raises(ValueError, match="path segment"):
        encode_target(("studies", segment), ())


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("GET", "GET"),
        ("get", "GET"),
        ("HEAD", "GET"),
        ("head", "GET"),
        ("POST", "POST"),
        ("Delete", "DELETE"),
        ("OPTIONS", "OPTIONS"),
        ("PATCH", "PATCH"),
    ],
)
def test_effective_method(method: str, expected: str) -> None:
    assert effective_method(method, [("Accept", "application/dicom+json")], ()) == expected


@pytest.mark.parametrize(
    "header",
    [
        "X-HTTP-Method-Override",
        "x-http-method-override",
        "X-HTTP-Method",
        "X-Method-Override",
        "X-METHOD-OVERRIDE",
    ],
)
def test_override_headers_are_refused(header: str) -> None:
    with pytest.raises(MalformedTarget) as info:
        effective_method("POST", [("Accept", "*/*"), (header, "DELETE")], ())
    assert info.value.reason == (
        "method override headers are not accepted; send the real HTTP method"
    )


@pytest.mark.parametrize("name", ["_method", "_METHOD", "_Method"])
def test_method_query_parameter_is_refused(name: str) -> None:
    target = normalize_target(f"/studies/1.2?{name}=DELETE")
    with pytest.raises(MalformedTarget, match="method override"):
        effective_method("GET", (), target.query)


def test_similar_names_are_not_overrides() -> None:
    query = normalize_target("/studies?method=x&_methods=y&x-http-method=z").query
    assert effective_method("get", [("X-HTTP-Method-Overrides", "x")], query) == "GET"
