"""At-rest encryption rule: every store's headers, every rule option, and messages that
name the header (or query parameter) without ever quoting a request value."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from casb.config import AtRest
from casb.encryption.at_rest import check_at_rest

SECRET = "c2VjcmV0LWtleS1ET0UtSkFORS0xOTcwMDEwMQ=="  # never in a message
SECRET_HASH = "aGFzaC1vZi10aGUta2V5LURPRS1KQU5F"
Headers = Sequence[tuple[str, str]]

DEFAULT = AtRest()
NO_CUSTOMER = AtRest(customer_keys=False)
KMS_ONLY = AtRest(s3_sse=["aws:kms"], customer_keys=False)
KEYS = AtRest(kms_keys=["arn:aws:kms:eu-west-1:111122223333:key/k1", "alias/phi"])

SSE = "x-amz-server-side-encryption"
KMS_ID = "x-amz-server-side-encryption-aws-kms-key-id"
SSE_C = (
    ("x-amz-server-side-encryption-customer-algorithm", "AES256"),
    ("x-amz-server-side-encryption-customer-key", SECRET),
    ("x-amz-server-side-encryption-customer-key-MD5", SECRET_HASH),
)
CSEK = (
    ("x-goog-encryption-algorithm", "AES256"),
    ("x-goog-encryption-key", SECRET),
    ("x-goog-encryption-key-sha256", SECRET_HASH),
)
CPK = (
    ("x-ms-encryption-key", SECRET),
    ("x-ms-encryption-key-sha256", SECRET_HASH),
    ("x-ms-encryption-algorithm", "AES256"),
)

S3_CREATES = ("PutObject", "CopyObject", "CreateMultipartUpload")
GCS_CREATES = ("InsertObject:media", "InsertObject:multipart", "InsertObject:resumable")
AZURE_CREATES = ("PutBlob", "PutBlock", "PutBlockList", "CopyBlob")


def check(
    kind: str,
    operation: str,
    headers: Headers = (),
    rule: AtRest = DEFAULT,
    query: Sequence[tuple[str, str]] = (),
) -> str | None:
    message = check_at_rest(kind, operation, headers, query, rule)
    if message is not None:
        assert SECRET not in message and SECRET_HASH not in message
        assert "DOE" not in message
    return message


def refused(
    kind: str,
    operation: str,
    headers: Headers = (),
    rule: AtRest = DEFAULT,
    query: Sequence[tuple[str, str]] = (),
) -> str:
    message = check(kind, operation, headers, rule, query)
    assert message is not None
    return message


# -- when the rule applies ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "operation"),
    [("s3", "PutObject"), ("gcs", "XmlPutObject"), ("azure_blob", "PutBlob")],
)
def test_rule_off_or_default_encryption_verified_needs_nothing(kind: str, operation: str) -> None:
    assert check(kind, operation) is not None  # the default rule applies
    assert check(kind, operation, rule=AtRest(required=False)) is None
    assert check(kind, operation, rule=AtRest(default_encryption_verified=True)) is None
    # Even a partial customer-key set is the store's business when the rule is off.
    assert check(kind, operation, SSE_C[:1], rule=AtRest(required=False)) is None


def test_other_kinds() -> None:
    assert check("dicomweb", "") is None
    assert "cannot be checked" in refused("ftp", "PutObject")


@pytest.mark.parametrize(
    ("kind", "operation"),
    [
        ("s3", "GetObject"),
        ("s3", "ListObjectsV2"),
        ("s3", "DeleteObject"),
        ("s3", "CompleteMultipartUpload"),
        ("s3", "AbortMultipartUpload"),
        ("s3", "PostObject"),  # the form fields are checked where the body is read
        ("gcs", "GetObject"),
        ("gcs", "XmlGetObject"),
        ("gcs", "DeleteObject"),
        ("azure_blob", "GetBlob"),
        ("azure_blob", "ListBlobs"),
        ("azure_blob", "DeleteBlob"),
    ],
)
def test_operations_that_create_no_data_need_nothing(kind: str, operation: str) -> None:
    assert check(kind, operation) is None
    assert check(kind, operation, ((SSE, "AES256"), (SSE, "AES256"))) is None


# -- S3 --------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", S3_CREATES)
def test_s3_missing_sse_names_the_header_and_the_accepted_values(operation: str) -> None:
    message = refused("s3", operation)
    assert message == (
        "uploads to this destination must ask the store to encrypt at rest: the "
        "x-amz-server-side-encryption header is missing (accepted: aws:kms, aws:kms:dsse, "
        "AES256) or use SSE-C (x-amz-server-side-encryption-customer-algorithm: AES256, "
        "x-amz-server-side-encryption-customer-key, "
        "x-amz-server-side-encryption-customer-key-MD5)"
    )
    narrow = refused("s3", operation, rule=KMS_ONLY)
    assert "x-amz-server-side-encryption header is missing (accepted: aws:kms)" in narrow
    assert "SSE-C" not in narrow


@pytest.mark.parametrize("operation", S3_CREATES)
@pytest.mark.parametrize("value", ["aws:kms", "aws:kms:dsse", "AES256", " AES256 "])
def test_s3_accepted_sse_values(operation: str, value: str) -> None:
    assert check("s3", operation, ((SSE, value),)) is None
    assert check("s3", operation, (("X-Amz-Server-Side-Encryption", value),)) is None


@pytest.mark.parametrize("value", ["AES256", "aws:kms:dsse", "aes256", "AWS:KMS", "none"])
def test_s3_sse_value_outside_the_rule_is_refused(value: str) -> None:
    message = refused("s3", "PutObject", ((SSE, value),), rule=KMS_ONLY)
    assert "x-amz-server-side-encryption header value is not accepted" in message
    assert message.endswith("(accepted: aws:kms)")


def test_s3_sse_value_is_never_quoted() -> None:
    message = refused("s3", "PutObject", ((SSE, SECRET),))
    assert "not accepted" in message


def test_s3_empty_sse_header_is_missing() -> None:
    assert "header is missing" in refused("s3", "PutObject", ((SSE, ""),))
    assert "header is missing" in refused("s3", "PutObject", ((SSE, "  "),))


def test_s3_kms_key_ids_when_listed() -> None:
    listed = "arn:aws:kms:eu-west-1:111122223333:key/k1, alias/phi"
    missing = refused("s3", "PutObject", ((SSE, "aws:kms"),), rule=KEYS)
    assert f"the {KMS_ID} header is missing (accepted: {listed})" in missing
    wrong = refused("s3", "PutObject", ((SSE, "aws:kms:dsse"), (KMS_ID, SECRET)), rule=KEYS)
    assert f"the {KMS_ID} header value is not accepted" in wrong and listed in wrong
    assert check("s3", "PutObject", ((SSE, "aws:kms"), (KMS_ID, "alias/phi")), rule=KEYS) is None
    assert check("s3", "CopyObject", ((SSE, "aws:kms:dsse"), (KMS_ID, "alias/phi")), KEYS) is None
    # AES256 (SSE-S3) names no KMS key: the key list does not apply.
    assert check("s3", "PutObject", ((SSE, "AES256"),), rule=KEYS) is None


def test_s3_any_kms_key_when_none_listed() -> None:
    assert check("s3", "PutObject", ((SSE, "aws:kms"),)) is None
    assert check("s3", "PutObject", ((SSE, "aws:kms"), (KMS_ID, "anything"))) is None


@pytest.mark.parametrize("operation", S3_CREATES)
def test_s3_sse_c(operation: str) -> None:
    assert check("s3", operation, SSE_C) is None
    not_allowed = refused("s3", operation, SSE_C, rule=NO_CUSTOMER)
    assert "customer-provided keys (SSE-C) are not accepted" in not_allowed
    both = refused("s3", operation, ((SSE, "AES256"), *SSE_C))
    assert "either the x-amz-server-side-encryption header or the SSE-C headers" in both


@pytest.mark.parametrize("operation", [*S3_CREATES, "UploadPart", "UploadPartCopy"])
@pytest.mark.parametrize("drop", [0, 1, 2])
def test_s3_partial_sse_c_is_always_refused(operation: str, drop: int) -> None:
    partial = tuple(pair for i, pair in enumerate(SSE_C) if i != drop)
    message = refused("s3", operation, partial)
    assert f"{SSE_C[drop][0]} is missing" in message
    assert message.startswith("incomplete SSE-C headers")
    # Even when the other headers would satisfy the rule.
    assert refused("s3", operation, ((SSE, "AES256"), *partial)).startswith("incomplete")
    # And whatever the rule accepts.
    assert refused("s3", operation, partial, rule=NO_CUSTOMER).startswith("incomplete")


def test_s3_sse_c_algorithm_must_be_aes256() -> None:
    headers = (("x-amz-server-side-encryption-customer-algorithm", "AES128"), *SSE_C[1:])
    message = refused("s3", "PutObject", headers)
    assert message == (
        "the x-amz-server-side-encryption-customer-algorithm header value is not accepted "
        "(accepted: AES256)"
    )
    assert "AES128" not in message


@pytest.mark.parametrize("operation", ["UploadPart", "UploadPartCopy"])
def test_s3_parts_inherit_the_uploads_encryption(operation: str) -> None:
    assert check("s3", operation) is None
    assert check("s3", operation, rule=KEYS) is None
    assert check("s3", operation, SSE_C) is None


@pytest.mark.parametrize(
    "headers",
    [
        ((SSE, "AES256"), (SSE, "AES256")),
        ((SSE, "AES256"), ("X-AMZ-SERVER-SIDE-ENCRYPTION", "aws:kms")),
        ((SSE, "aws:kms"), (KMS_ID, "a"), (KMS_ID, "b")),
        (*SSE_C, SSE_C[1]),
    ],
)
def test_s3_repeated_headers_are_refused(headers: Headers) -> None:
    message = refused("s3", "PutObject", headers)
    assert "is given more than once" in message
    assert "UploadPart" not in message
    assert refused("s3", "UploadPart", headers).endswith("is given more than once")


def test_s3_sse_hoisted_into_the_query_is_refused() -> None:
    # A presigned URL can carry x-amz-* headers as query parameters; the edge strips them,
    # so the store would never see them.
    for name in (SSE, "X-Amz-Server-Side-Encryption-Customer-Key"):
        message = refused("s3", "PutObject", ((SSE, "AES256"),), query=((name, SECRET),))
        assert "x-amz-server-side-encryption* as request headers" in message


# -- GCS --------------------------------------------------------------------------------

KMS_NAME = "projects/p/locations/us/keyRings/r/cryptoKeys/k"
GCS_KEYS = AtRest(kms_keys=[KMS_NAME])


@pytest.mark.parametrize("operation", GCS_CREATES)
def test_gcs_json_uploads(operation: str) -> None:
    missing = refused("gcs", operation)
    assert missing == (
        "uploads to this destination must ask the store to encrypt at rest: the kmsKeyName "
        "query parameter is missing (accepted: any Cloud KMS key) or use customer-supplied "
        "keys (x-goog-encryption-algorithm: AES256, x-goog-encryption-key, "
        "x-goog-encryption-key-sha256)"
    )
    assert check("gcs", operation, query=(("kmsKeyName", KMS_NAME),)) is None
    assert check("gcs", operation, CSEK) is None
    assert "kmsKeyName query parameter is missing" in refused(
        "gcs", operation, query=(("kmsKeyName", ""),)
    )
    # The JSON API reads kmsKeyName from the query only (names are case-sensitive).
    assert refused("gcs", operation, query=(("kmskeyname", KMS_NAME),))
    assert refused("gcs", operation, (("x-goog-encryption-kms-key-name", KMS_NAME),))


def test_gcs_listed_keys() -> None:
    wrong = refused("gcs", "InsertObject:media", query=(("kmsKeyName", SECRET),), rule=GCS_KEYS)
    assert wrong == (
        f"the kmsKeyName query parameter value is not accepted by this destination "
        f"(accepted: {KMS_NAME})"
    )
    xml_wrong = refused(
        "gcs", "XmlPutObject", (("x-goog-encryption-kms-key-name", SECRET),), rule=GCS_KEYS
    )
    assert "x-goog-encryption-kms-key-name header value is not accepted" in xml_wrong
    ok = (("x-goog-encryption-kms-key-name", KMS_NAME),)
    assert check("gcs", "XmlPutObject", ok, rule=GCS_KEYS) is None


def test_gcs_xml_upload() -> None:
    missing = refused("gcs", "XmlPutObject", rule=NO_CUSTOMER)
    assert missing == (
        "uploads to this destination must ask the store to encrypt at rest: the "
        "x-goog-encryption-kms-key-name header is missing (accepted: any Cloud KMS key)"
    )
    assert check("gcs", "XmlPutObject", (("X-Goog-Encryption-Kms-Key-Name", KMS_NAME),)) is None
    assert check("gcs", "XmlPutObject", CSEK) is None
    # The query parameter is the JSON API's, not the XML API's.
    assert refused("gcs", "XmlPutObject", query=(("kmsKeyName", KMS_NAME),))


@pytest.mark.parametrize("operation", [*GCS_CREATES, "XmlPutObject", "ResumableUpload"])
def test_gcs_partial_or_wrong_csek_is_refused(operation: str) -> None:
    for drop in range(3):
        partial = tuple(pair for i, pair in enumerate(CSEK) if i != drop)
        assert f"{CSEK[drop][0]} is missing" in refused("gcs", operation, partial)
    wrong = (("x-goog-encryption-algorithm", "AES128"), *CSEK[1:])
    assert "x-goog-encryption-algorithm header value is not accepted (accepted: AES256)" in (
        refused("gcs", operation, wrong)
    )


def test_gcs_csek_not_allowed_or_both_at_once() -> None:
    assert "(CSEK) are not accepted" in refused("gcs", "XmlPutObject", CSEK, rule=NO_CUSTOMER)
    both = refused("gcs", "InsertObject:media", CSEK, query=(("kmsKeyName", KMS_NAME),))
    assert "either the kmsKeyName query parameter or the CSEK headers" in both
    xml_both = refused("gcs", "XmlPutObject", (*CSEK, ("x-goog-encryption-kms-key-name", "k")))
    assert "either the x-goog-encryption-kms-key-name header or the CSEK headers" in xml_both


def test_gcs_repeated_key_name_is_refused() -> None:
    query = (("kmsKeyName", KMS_NAME), ("kmsKeyName", KMS_NAME))
    assert refused("gcs", "InsertObject:media", query=query) == (
        "the kmsKeyName query parameter is given more than once"
    )
    headers = (("x-goog-encryption-kms-key-name", "a"), ("x-goog-encryption-kms-key-name", "b"))
    assert "header is given more than once" in refused("gcs", "XmlPutObject", headers)


def test_gcs_resumable_chunks_need_nothing_else() -> None:
    assert check("gcs", "ResumableUpload") is None
    assert check("gcs", "ResumableUpload", CSEK) is None
    assert check("gcs", "ResumableUpload", rule=GCS_KEYS) is None


# -- Azure Blob -------------------------------------------------------------------------


@pytest.mark.parametrize("operation", AZURE_CREATES)
def test_azure_creates(operation: str) -> None:
    missing = refused("azure_blob", operation)
    assert missing == (
        "uploads to this destination must ask the store to encrypt at rest: the "
        "x-ms-encryption-scope header is missing (accepted: any encryption scope) or use a "
        "customer-provided key (x-ms-encryption-key, x-ms-encryption-key-sha256, "
        "x-ms-encryption-algorithm: AES256)"
    )
    assert check("azure_blob", operation, (("x-ms-encryption-scope", "phi-scope"),)) is None
    assert check("azure_blob", operation, CPK) is None
    assert "x-ms-encryption-scope header is missing" in refused(
        "azure_blob", operation, (("x-ms-encryption-scope", ""),)
    )


def test_azure_listed_scopes() -> None:
    rule = AtRest(encryption_scopes=["phi-scope", "research"], customer_keys=False)
    assert check("azure_blob", "PutBlob", (("X-MS-Encryption-Scope", "research"),), rule) is None
    wrong = refused("azure_blob", "PutBlob", (("x-ms-encryption-scope", SECRET),), rule)
    assert wrong == (
        "the x-ms-encryption-scope header value is not accepted by this destination "
        "(accepted: phi-scope, research)"
    )
    missing = refused("azure_blob", "PutBlock", rule=rule)
    assert "(accepted: phi-scope, research)" in missing and "customer-provided" not in missing


@pytest.mark.parametrize("operation", AZURE_CREATES)
def test_azure_cpk_rules(operation: str) -> None:
    for drop in range(3):
        partial = tuple(pair for i, pair in enumerate(CPK) if i != drop)
        message = refused("azure_blob", operation, partial)
        assert message.startswith("incomplete customer-provided key headers")
        assert f"{CPK[drop][0]} is missing" in message
    wrong = (*CPK[:2], ("x-ms-encryption-algorithm", "AES128"))
    assert "x-ms-encryption-algorithm header value is not accepted (accepted: AES256)" in (
        refused("azure_blob", operation, wrong)
    )
    assert "not accepted by this destination" in refused(
        "azure_blob", operation, CPK, rule=NO_CUSTOMER
    )
    both = refused("azure_blob", operation, (*CPK, ("x-ms-encryption-scope", "s")))
    assert "either the x-ms-encryption-scope header or a customer-provided key" in both
    twice = (("x-ms-encryption-scope", "s"), ("x-ms-encryption-scope", "s"))
    assert refused("azure_blob", operation, twice) == (
        "the x-ms-encryption-scope header is given more than once"
    )


# -- nothing can satisfy the rule ------------------------------------------------------------


def test_s3_rule_with_nothing_accepted() -> None:
    rule = AtRest(s3_sse=[], customer_keys=False)
    assert "no request header can satisfy" in refused("s3", "PutObject", rule=rule)
    only_sse_c = AtRest(s3_sse=[])
    message = refused("s3", "PutObject", rule=only_sse_c)
    assert "SSE-C headers are missing" in message
    assert "(accepted: none)" in refused("s3", "PutObject", ((SSE, "AES256"),), rule=only_sse_c)
    assert check("s3", "PutObject", SSE_C, rule=only_sse_c) is None
