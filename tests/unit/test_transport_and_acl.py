"""Encryption in transit (casb.encryption.transport) and public-access refusal of object
uploads (casb.objectstore.acl): every branch, and what the messages may say."""

from __future__ import annotations

import pytest

from casb.encryption.transport import (
    PLAINTEXT_UPSTREAM_WARNING,
    TransportVerdict,
    check_transport,
)
from casb.objectstore.acl import public_access_refusal

# -- check_transport ------------------------------------------------------------------------


def transport(
    *,
    store: bool = True,
    client_tls: bool = True,
    listener_ok: bool = False,
    scheme: str = "https",
    dest_ok: bool = False,
) -> TransportVerdict:
    return check_transport(
        store=store,
        client_tls=client_tls,
        listener_plaintext_ok=listener_ok,
        upstream_scheme=scheme,
        destination="bucket-dest",
        destination_plaintext_ok=dest_ok,
    )


@pytest.mark.parametrize("client_tls", [False, True])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_reads_are_never_refused_nor_warned_about(client_tls: bool, scheme: str) -> None:
    assert transport(store=False, client_tls=client_tls, scheme=scheme) == TransportVerdict()


def test_a_tls_upload_to_an_https_upstream_goes_ahead_silently() -> None:
    assert transport() == TransportVerdict(refusal=None, warning=None)


def test_a_plaintext_upload_is_refused() -> None:
    verdict = transport(client_tls=False)
    assert verdict.warning is None
    assert verdict.refusal is not None
    assert "plaintext HTTP" in verdict.refusal and "https://" in verdict.refusal


def test_the_client_leg_is_checked_before_the_upstream_leg() -> None:
    verdict = transport(client_tls=False, scheme="http", dest_ok=True)
    assert verdict.refusal is not None and "arrived over plaintext" in verdict.refusal


def test_a_plaintext_listener_takes_plaintext_uploads() -> None:
    assert transport(client_tls=False, listener_ok=True) == TransportVerdict()


def test_an_http_upstream_refuses_uploads_and_names_the_destination() -> None:
    verdict = transport(scheme="http")
    assert verdict.refusal is not None and verdict.warning is None
    assert "'bucket-dest'" in verdict.refusal and "allow_plaintext" in verdict.refusal


@pytest.mark.parametrize("scheme", ["http", "ftp", ""])
def test_anything_but_https_upstream_counts_as_plaintext(scheme: str) -> None:
    assert transport(scheme=scheme).refusal is not None


def test_an_allowed_http_upstream_is_warned_about() -> None:
    verdict = transport(scheme="http", dest_ok=True)
    assert verdict == TransportVerdict(refusal=None, warning=PLAINTEXT_UPSTREAM_WARNING)
    assert PLAINTEXT_UPSTREAM_WARNING == "plaintext_upstream"


def test_both_legs_allowed_plaintext() -> None:
    verdict = transport(client_tls=False, listener_ok=True, scheme="http", dest_ok=True)
    assert verdict == TransportVerdict(warning="plaintext_upstream")


def test_a_destination_flag_does_not_excuse_a_plaintext_client() -> None:
    verdict = transport(client_tls=False, listener_ok=False, scheme="https", dest_ok=True)
    assert verdict.refusal is not None


# -- public_access_refusal ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["public-read", "public-read-write", "authenticated-read"])
@pytest.mark.parametrize(("kind", "header"), [("s3", "x-amz-acl"), ("gcs", "x-goog-acl")])
def test_open_canned_acls_are_refused(kind: str, header: str, value: str) -> None:
    reason = public_access_refusal(kind, [("Content-Type", "application/dicom"), (header, value)])
    assert reason is not None
    assert header in reason and value in reason and "private" in reason


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Amz-ACL", "PUBLIC-READ"),
        ("x-amz-acl", "  Public-Read-Write "),
        ("x-amz-acl", "authenticated-read\t"),
    ],
)
def test_acl_names_and_values_in_any_case_and_padding(header: str, value: str) -> None:
    reason = public_access_refusal("s3", [(header, value)])
    assert reason is not None
    assert value.strip().lower() in reason  # the canonical value, not the raw text


@pytest.mark.parametrize(
    "value",
    [
        "private",
        "bucket-owner-read",
        "bucket-owner-full-control",
        "aws-exec-read",
        "",
        "public-read-only",
    ],
)
def test_closed_canned_acls_pass(value: str) -> None:
    assert public_access_refusal("s3", [("x-amz-acl", value)]) is None


@pytest.mark.parametrize("value", ["project-private", "bucket-owner-full-control", "private"])
def test_closed_gcs_acls_pass(value: str) -> None:
    assert public_access_refusal("gcs", [("x-goog-acl", value)]) is None


@pytest.mark.parametrize(
    "header",
    [
        "x-amz-grant-read",
        "X-Amz-Grant-Full-Control",
        "x-amz-grant-read-acp",
        "x-amz-grant-write-acp",
        "x-amz-grant-anything",
    ],
)
def test_any_s3_grant_is_refused(header: str) -> None:
    reason = public_access_refusal("s3", [(header, 'id="0123abcd"')])
    assert reason is not None
    assert header.lower() in reason
    assert "0123abcd" not in reason  # names the header, never the grantee


def test_the_first_offending_header_is_named() -> None:
    reason = public_access_refusal(
        "s3", [("x-amz-grant-read", "uri=AllUsers"), ("x-amz-acl", "public-read")]
    )
    assert reason is not None and "x-amz-grant-read" in reason


def test_a_second_acl_header_is_checked_too() -> None:
    headers = [("x-amz-acl", "private"), ("x-amz-acl", "public-read")]
    assert public_access_refusal("s3", headers) is not None


def test_gcs_xml_reads_x_amz_acl_as_x_goog_acl() -> None:
    # The GCS XML API processes x-amz-* headers that have an x-goog-* equivalent (its
    # S3 interoperability, "simple migration"): x-amz-acl public-read opens the object
    # just as x-goog-acl does, e.g. when a gcs destination passes the client's
    # AWS-signed Authorization through.
    assert public_access_refusal("gcs", [("x-amz-acl", "public-read")]) is not None


@pytest.mark.parametrize("kind", ["azure_blob", "dicomweb", "unknown"])
def test_stores_without_object_acls_are_never_refused(kind: str) -> None:
    headers = [("x-amz-acl", "public-read"), ("x-goog-acl", "public-read")]
    headers += [("x-ms-blob-public-access", "blob"), ("x-amz-grant-read", "x")]
    assert public_access_refusal(kind, headers) is None


def test_no_acl_headers_pass() -> None:
    assert public_access_refusal("s3", []) is None
    assert public_access_refusal("gcs", [("Content-Type", "application/dicom")]) is None
