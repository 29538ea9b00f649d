"""At-rest encryption rule for object-store uploads: does the request ask the store to
encrypt what it writes, with a key the destination accepts?

`check_at_rest` reads only the request's headers and query (never the body) and answers
None (fine) or a refusal message that names exactly the header or query parameter that
is missing or refused and the values accepted. Messages never quote a request value
(customer-provided keys are secrets; key ids and scopes come from configuration).

Per store, the operations that create object data must carry:

* S3 PutObject, CopyObject, CreateMultipartUpload: ``x-amz-server-side-encryption``
  with a value in ``s3_sse`` (for ``aws:kms`` / ``aws:kms:dsse`` with ``kms_keys`` set,
  also ``x-amz-server-side-encryption-aws-kms-key-id`` in ``kms_keys``), or, when
  ``customer_keys``, the complete SSE-C set (``-customer-algorithm: AES256``, ``-key``,
  ``-key-MD5``). UploadPart / UploadPartCopy inherit the upload's encryption: nothing is
  required, but a partial SSE-C set is refused. PostObject (browser upload) carries its
  encryption as form fields in the body: it is checked where the body is read, not here.
  SSE headers hoisted into a presigned URL's query are refused: the edge strips them.
* GCS JSON uploads (InsertObject:media|multipart|resumable): the ``kmsKeyName`` query
  parameter (in ``kms_keys`` when set), or CSEK headers (``x-goog-encryption-algorithm:
  AES256``, ``-key``, ``-key-sha256``); XmlPutObject: ``x-goog-encryption-kms-key-name``
  or the same CSEK headers. ResumableUpload chunks inherit the session's encryption; a
  partial CSEK set is refused.
* Azure PutBlob, PutBlock, PutBlockList, CopyBlob: ``x-ms-encryption-scope`` (in
  ``encryption_scopes`` when set), or customer-provided key headers
  (``x-ms-encryption-key``, ``-key-sha256``, ``-algorithm: AES256``).

A partial customer-key set is always refused (whatever the rule says), as are both a
managed key and a customer key at once, and any of these headers given twice. The rule
does not apply when ``required`` is off or ``default_encryption_verified`` is set.
Whether envelope encryption satisfies the rule is decided by the caller, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

from casb.config import AtRest

__all__ = ["check_at_rest"]

Headers = Sequence[tuple[str, str]]
Query = Sequence[tuple[str, str]]

_PREAMBLE = "uploads to this destination must ask the store to encrypt at rest: "

# S3
_SSE = "x-amz-server-side-encryption"
_SSE_KMS_KEY = "x-amz-server-side-encryption-aws-kms-key-id"
_SSE_C = (
    "x-amz-server-side-encryption-customer-algorithm",
    "x-amz-server-side-encryption-customer-key",
    "x-amz-server-side-encryption-customer-key-MD5",
)
_S3_SSE_C_TEXT = (
    "SSE-C (x-amz-server-side-encryption-customer-algorithm: AES256, "
    "x-amz-server-side-encryption-customer-key, "
    "x-amz-server-side-encryption-customer-key-MD5)"
)
_S3_NEEDS_SSE = frozenset({"PutObject", "CopyObject", "CreateMultipartUpload"})
_S3_PARTS = frozenset({"UploadPart", "UploadPartCopy"})

# GCS
_GCS_KMS_PARAM = "kmsKeyName"
_GCS_KMS_HEADER = "x-goog-encryption-kms-key-name"
_CSEK = (
    "x-goog-encryption-algorithm",
    "x-goog-encryption-key",
    "x-goog-encryption-key-sha256",
)
_CSEK_TEXT = (
    "customer-supplied keys (x-goog-encryption-algorithm: AES256, "
    "x-goog-encryption-key, x-goog-encryption-key-sha256)"
)

# Azure
_SCOPE = "x-ms-encryption-scope"
_CPK = ("x-ms-encryption-algorithm", "x-ms-encryption-key", "x-ms-encryption-key-sha256")
_CPK_TEXT = (
    "a customer-provided key (x-ms-encryption-key, x-ms-encryption-key-sha256, "
    "x-ms-encryption-algorithm: AES256)"
)
_AZURE_NEEDS = frozenset({"PutBlob", "PutBlock", "PutBlockList", "CopyBlob"})


class _Refusal(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _one(pairs: Sequence[tuple[str, str]], name: str, what: str, *, fold: bool) -> str | None:
    """The one value of `name` (case-insensitive when `fold`), stripped; None if absent
    or empty (an empty value asks for nothing). Given twice: refused, the store might
    read either value."""
    wanted = name.lower() if fold else name
    found: str | None = None
    for key, value in pairs:
        if (key.lower() if fold else key) == wanted:
            if found is not None:
                raise _Refusal(f"the {name} {what} is given more than once")
            found = value.strip()
    return found or None


def _header(headers: Headers, name: str) -> str | None:
    return _one(headers, name, "header", fold=True)


def _customer_key(
    headers: Headers, names: tuple[str, str, str], label: str, *, allowed: bool
) -> bool:
    """Whether a complete customer-key set is present (algorithm first in `names`).
    A partial set, a non-AES256 algorithm, or a set the rule does not allow is refused."""
    present = [name for name in names if _header(headers, name) is not None]
    if not present:
        return False
    missing = [name for name in names if name not in present]
    if missing:
        raise _Refusal(
            f"incomplete {label} headers: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (all of {', '.join(names)} "
            "must be sent together)"
        )
    if _header(headers, names[0]) != "AES256":
        raise _Refusal(f"the {names[0]} header value is not accepted (accepted: AES256)")
    if not allowed:
        raise _Refusal(f"customer-provided keys ({label}) are not accepted by this destination")
    return True


def _listed(accepted: Sequence[str], what: str) -> str:
    return ", ".join(accepted) if accepted else f"any {what}"


def _s3(operation: str, headers: Headers, query: Query, rule: AtRest) -> None:
    if operation not in _S3_NEEDS_SSE and operation not in _S3_PARTS:
        return  # PostObject: its encryption fields are in the body, checked there
    for name, _ in query:
        if name.lower().startswith(_SSE):
            raise _Refusal(
                "server-side encryption must be requested with headers, not query "
                f"parameters: send {_SSE}* as request headers"
            )
    for name in (_SSE, _SSE_KMS_KEY):
        _header(headers, name)  # refuses a repeated header
    if operation in _S3_PARTS:
        _customer_key(headers, _SSE_C, "SSE-C", allowed=True)
        return
    sse = _header(headers, _SSE)
    if _customer_key(headers, _SSE_C, "SSE-C", allowed=rule.customer_keys):
        if sse is not None:
            raise _Refusal(f"send either the {_SSE} header or the SSE-C headers, not both")
        return
    accepted = ", ".join(rule.s3_sse)
    if sse is None:
        if not rule.s3_sse and not rule.customer_keys:
            raise _Refusal(
                _PREAMBLE + "no request header can satisfy this destination's rule "
                "(no x-amz-server-side-encryption value and no SSE-C accepted)"
            )
        if not rule.s3_sse:
            raise _Refusal(_PREAMBLE + f"the SSE-C headers are missing: use {_S3_SSE_C_TEXT}")
        message = _PREAMBLE + f"the {_SSE} header is missing (accepted: {accepted})"
        if rule.customer_keys:
            message += f" or use {_S3_SSE_C_TEXT}"
        raise _Refusal(message)
    if sse not in rule.s3_sse:
        raise _Refusal(
            f"the {_SSE} header value is not accepted by this destination "
            f"(accepted: {accepted or 'none'})"
        )
    if sse.startswith("aws:kms") and rule.kms_keys:
        key_id = _header(headers, _SSE_KMS_KEY)
        listed = ", ".join(rule.kms_keys)
        if key_id is None:
            raise _Refusal(_PREAMBLE + f"the {_SSE_KMS_KEY} header is missing (accepted: {listed})")
        if key_id not in rule.kms_keys:
            raise _Refusal(
                f"the {_SSE_KMS_KEY} header value is not accepted by this destination "
                f"(accepted: {listed})"
            )


def _gcs(operation: str, headers: Headers, query: Query, rule: AtRest) -> None:
    if operation == "ResumableUpload":
        _customer_key(headers, _CSEK, "CSEK", allowed=True)
        return
    if operation.startswith("InsertObject:"):
        name, where = _GCS_KMS_PARAM, "query parameter"
        kms = _one(query, _GCS_KMS_PARAM, where, fold=False)
    elif operation == "XmlPutObject":
        name, where = _GCS_KMS_HEADER, "header"
        kms = _header(headers, _GCS_KMS_HEADER)
    else:
        return
    if _customer_key(headers, _CSEK, "CSEK", allowed=rule.customer_keys):
        if kms is not None:
            raise _Refusal(f"send either the {name} {where} or the CSEK headers, not both")
        return
    listed = _listed(rule.kms_keys, "Cloud KMS key")
    if kms is None:
        message = _PREAMBLE + f"the {name} {where} is missing (accepted: {listed})"
        if rule.customer_keys:
            message += f" or use {_CSEK_TEXT}"
        raise _Refusal(message)
    if rule.kms_keys and kms not in rule.kms_keys:
        raise _Refusal(
            f"the {name} {where} value is not accepted by this destination (accepted: {listed})"
        )


def _azure(operation: str, headers: Headers, rule: AtRest) -> None:
    if operation not in _AZURE_NEEDS:
        return
    scope = _header(headers, _SCOPE)
    if _customer_key(headers, _CPK, "customer-provided key", allowed=rule.customer_keys):
        if scope is not None:
            raise _Refusal(f"send either the {_SCOPE} header or a customer-provided key, not both")
        return
    listed = _listed(rule.encryption_scopes, "encryption scope")
    if scope is None:
        message = _PREAMBLE + f"the {_SCOPE} header is missing (accepted: {listed})"
        if rule.customer_keys:
            message += f" or use {_CPK_TEXT}"
        raise _Refusal(message)
    if rule.encryption_scopes and scope not in rule.encryption_scopes:
        raise _Refusal(
            f"the {_SCOPE} header value is not accepted by this destination (accepted: {listed})"
        )


def check_at_rest(
    kind: str, operation: str, headers: Headers, query: Query, rule: AtRest
) -> str | None:
    """None when the request satisfies the destination's at-rest rule, else a refusal
    message naming the missing or refused header / query parameter.

    `kind` is the destination kind ("s3", "gcs", "azure_blob"; "dicomweb" has no
    at-rest rule), `operation` the classified operation (Resource.operation), `query`
    the decoded query pairs."""
    if not rule.required or rule.default_encryption_verified:
        return None
    try:
        if kind == "s3":
            _s3(operation, headers, query, rule)
        elif kind == "gcs":
            _gcs(operation, headers, query, rule)
        elif kind == "azure_blob":
            _azure(operation, headers, rule)
        elif kind != "dicomweb":
            return "at-rest encryption cannot be checked for this kind of destination"
    except _Refusal as exc:
        return exc.message
    return None
