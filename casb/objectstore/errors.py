"""Refusals rendered in the error format each client surfaces.

A refusal only helps the person behind the SDK if the SDK shows its message: boto3 reads
S3's XML ``<Error>``, azure-storage-blob Azure's XML ``<Error>`` (and the
``x-ms-error-code`` header), the Google client libraries the JSON API's ``{"error": ...}``.
:func:`render_error` renders one refusal (status, casb error code, message, request id) in
any of those styles, or in casb's own JSON format (``casb.responses``, DESIGN.md).

Service error codes are chosen from the status so that no policy refusal is retried:
boto3 retries 5xx, 429, and a few codes whatever the status (RequestTimeout, BadDigest,
throttling codes such as SlowDown); azure-storage-blob retries 408 and 5xx but 501 / 505.
Every 4xx but 429 therefore maps to a code no SDK retries, and 404 maps to an access
denial too (a refusal never confirms that an object exists). The casb code rides along
(``CasbError`` element in the XML styles) so logs on the client side can be matched with
the audit record. All text is escaped for its format; characters XML 1.0 cannot carry are
replaced.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Final, Literal
from xml.sax.saxutils import escape

from casb.exchange import Refusal
from casb.responses import error_body

Style = Literal["json", "s3", "azure", "gcs"]
STYLES: Final = ("json", "s3", "azure", "gcs")

S3_CODES: Final[dict[int, str]] = {
    400: "InvalidRequest",
    401: "AccessDenied",
    403: "AccessDenied",
    404: "AccessDenied",
    405: "MethodNotAllowed",
    409: "OperationAborted",
    411: "MissingContentLength",
    413: "EntityTooLarge",
    415: "InvalidRequest",
    416: "InvalidRange",
    429: "SlowDown",
    500: "InternalError",
    501: "NotImplemented",
    502: "InternalError",
    503: "ServiceUnavailable",
    504: "RequestTimeout",
}
AZURE_CODES: Final[dict[int, str]] = {
    400: "InvalidInput",
    401: "AuthenticationFailed",
    403: "AuthorizationFailure",
    404: "AuthorizationFailure",
    405: "UnsupportedHttpVerb",
    409: "OperationNotAllowedInCurrentState",
    411: "MissingContentLengthHeader",
    413: "RequestBodyTooLarge",
    415: "UnsupportedHeader",
    416: "InvalidRange",
    429: "ServerBusy",
    500: "InternalError",
    501: "NotImplemented",
    502: "InternalError",
    503: "ServerBusy",
    504: "OperationTimedOut",
}
GCS_REASONS: Final[dict[int, str]] = {
    400: "invalid",
    401: "required",
    403: "forbidden",
    404: "forbidden",
    405: "methodNotAllowed",
    409: "conflict",
    411: "required",
    413: "uploadTooLarge",
    415: "invalid",
    416: "requestedRangeNotSatisfiable",
    429: "rateLimitExceeded",
    500: "backendError",
    501: "notImplemented",
    502: "backendError",
    503: "backendError",
    504: "backendError",
}
# Statuses outside the tables: any other 4xx is a bad request, any other status a failure.
_FALLBACK: Final = {
    "s3": ("InvalidRequest", "InternalError"),
    "azure": ("InvalidInput", "InternalError"),
    "gcs": ("invalid", "backendError"),
}
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_XML_DECL: Final = '<?xml version="1.0" encoding="UTF-8"?>'


def _service_code(style: Literal["s3", "azure", "gcs"], status: int) -> str:
    table = {"s3": S3_CODES, "azure": AZURE_CODES, "gcs": GCS_REASONS}[style]
    if status in table:
        return table[status]
    client, server = _FALLBACK[style]
    return client if 400 <= status < 500 else server


def _xml(text: str) -> str:
    return escape(_XML_INVALID.sub("\ufffd", text), {'"': "&quot;", "'": "&apos;"})


def _element(name: str, text: str) -> str:
    return f"<{name}>{_xml(text)}</{name}>"


def _azure_time(now: datetime) -> str:
    # Azure's own format: seven fractional digits.
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def render_error(
    style: Style,
    status: int,
    code: str,
    message: str,
    request_id: str,
    resource: str | None = None,
    *,
    now: datetime | None = None,
) -> tuple[bytes, list[tuple[str, str]]]:
    """(body, headers) of a refusal in ``style``. Headers carry Content-Type, Cache-Control
    and the store's own request-id header; the edge adds X-Request-Id as for any response.
    ``resource`` (a path the client named, never an object's content) appears only where
    the format has a place for it (S3's ``<Resource>``). ``now`` stamps Azure's message
    (default: the current time). ValueError for an unknown style or a non-error status.
    """
    if style not in STYLES:
        raise ValueError("unknown error style")
    if not 400 <= status <= 599:
        raise ValueError("error status must be 4xx or 5xx")
    headers = [("Cache-Control", "no-store")]
    if style == "json":
        body = error_body(Refusal(status=status, code=code, message=message), request_id)
        return body, [("Content-Type", "application/json"), *headers]
    if style == "s3":
        parts = [
            _element("Code", _service_code("s3", status)),
            _element("Message", message),
        ]
        if resource is not None:
            parts.append(_element("Resource", resource))
        parts += [_element("RequestId", request_id), _element("CasbError", code)]
        text = f"{_XML_DECL}<Error>{''.join(parts)}</Error>"
        headers += [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
        return text.encode("utf-8"), headers
    if style == "azure":
        az_code = _service_code("azure", status)
        stamp = _azure_time(now if now is not None else datetime.now(UTC))
        full = f"{message}\nRequestId:{request_id}\nTime:{stamp}"
        text = (
            f"{_XML_DECL}<Error>{_element('Code', az_code)}{_element('Message', full)}"
            f"{_element('CasbError', code)}</Error>"
        )
        headers += [
            ("Content-Type", "application/xml"),
            ("x-ms-error-code", az_code),
            ("x-ms-request-id", request_id),
        ]
        return text.encode("utf-8"), headers
    reason = _service_code("gcs", status)
    document = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }
    headers.append(("Content-Type", "application/json; charset=UTF-8"))
    return json.dumps(document).encode("utf-8"), headers
