"""casb.objectstore.errors: each style's body, and what the real SDKs (boto3,
azure-storage-blob) surface from it, talking to a local http.server that answers with it."""

from __future__ import annotations

import json
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any, ClassVar

import boto3
import botocore.endpoint
import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
)
from azure.storage.blob import BlobClient, LinearRetry
from botocore.config import Config
from botocore.exceptions import ClientError

from casb.exchange import Refusal
from casb.objectstore.errors import AZURE_CODES, GCS_REASONS, S3_CODES, render_error
from casb.responses import error_body

MESSAGE = "the x-amz-server-side-encryption header is missing"
RID = "4f1c2b7e-req"
NOW = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)


# -- bodies -----------------------------------------------------------------------------


def test_json_style_is_exactly_the_casb_body() -> None:
    body, headers = render_error("json", 403, "forbidden", "denied by rule r1", RID)
    assert body == error_body(Refusal(403, "forbidden", "denied by rule r1"), RID)
    assert json.loads(body) == {
        "error": "forbidden",
        "message": "denied by rule r1",
        "request_id": RID,
    }
    assert ("Content-Type", "application/json") in headers


def test_s3_style_body() -> None:
    body, headers = render_error("s3", 403, "encryption_required", MESSAGE, RID, "/b/k.dcm")
    assert body.decode() == (
        '<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
        f"<Message>{MESSAGE}</Message><Resource>/b/k.dcm</Resource>"
        f"<RequestId>{RID}</RequestId><CasbError>encryption_required</CasbError></Error>"
    )
    assert dict(headers) == {
        "Content-Type": "application/xml",
        "Cache-Control": "no-store",
        "x-amz-request-id": RID,
    }


def test_everything_is_escaped_and_stays_well_formed() -> None:
    hostile = "</Message><Code>OK</Code>&amp; \"'\x00\x1b\ufffe \U0001f600 ü"
    for style in ("s3", "azure"):
        body, _ = render_error(style, 400, "bad<code>", hostile, "r&id", hostile, now=NOW)
        root = ET.fromstring(body)
        assert root.tag == "Error"
        assert [child.tag for child in root].count("Code") == 1
        message = root.findtext("Message") or ""
        assert message.startswith("</Message><Code>OK</Code>&amp; \"'\ufffd\ufffd\ufffd")
        assert "\U0001f600 ü" in message
        assert root.findtext("CasbError") == "bad<code>"
    body, _ = render_error("gcs", 400, "x", hostile, RID)
    assert json.loads(body)["error"]["message"] == hostile


def test_azure_style_body_and_headers() -> None:
    body, headers = render_error("azure", 403, "encryption_required", MESSAGE, RID, now=NOW)
    root = ET.fromstring(body)
    assert root.findtext("Code") == "AuthorizationFailure"
    assert root.findtext("Message") == (
        f"{MESSAGE}\nRequestId:{RID}\nTime:2024-05-01T12:30:45.1234560Z"
    )
    assert dict(headers)["x-ms-error-code"] == "AuthorizationFailure"
    assert dict(headers)["x-ms-request-id"] == RID
    assert dict(headers)["Content-Type"] == "application/xml"


def test_gcs_style_body() -> None:
    body, headers = render_error("gcs", 403, "encryption_required", MESSAGE, RID)
    assert json.loads(body) == {
        "error": {
            "code": 403,
            "message": MESSAGE,
            "errors": [{"message": MESSAGE, "domain": "global", "reason": "forbidden"}],
        }
    }
    assert dict(headers)["Content-Type"] == "application/json; charset=UTF-8"


def test_404_never_confirms_existence_and_unknown_statuses_fall_back() -> None:
    assert S3_CODES[404] == "AccessDenied"
    assert AZURE_CODES[404] == "AuthorizationFailure"
    assert GCS_REASONS[404] == "forbidden"
    body, _ = render_error("s3", 418, "x", "m", RID)
    assert ET.fromstring(body).findtext("Code") == "InvalidRequest"
    body, _ = render_error("s3", 507, "x", "m", RID)
    assert ET.fromstring(body).findtext("Code") == "InternalError"
    body, _ = render_error("gcs", 418, "x", "m", RID)
    assert json.loads(body)["error"]["errors"][0]["reason"] == "invalid"


def test_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="style"):
        render_error("html", 403, "x", "m", RID)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4xx or 5xx"):
        render_error("s3", 200, "x", "m", RID)


# -- what the SDKs surface --------------------------------------------------------------


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # one write per response (flushed by the handler): no Nagle stalls
    reply: ClassVar[tuple[int, bytes, list[tuple[str, str]]]] = (500, b"", [])
    hits: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle_expect_100(self) -> bool:
        self.send_response_only(100)
        self.end_headers()
        self.wfile.flush()
        return True

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.hits.append(self.command)
        status, body, headers = self.reply
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET = do_POST = do_DELETE = _answer


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """botocore's retry sleeps are recorded instead of slept."""
    delays: list[float] = []
    monkeypatch.setattr(botocore.endpoint, "time", SimpleNamespace(sleep=delays.append))
    return delays


def _answer_with(style: Any, status: int, code: str = "encryption_required") -> None:
    body, headers = render_error(style, status, code, MESSAGE, RID, now=NOW)
    _Answer.reply = (status, body, headers)
    _Answer.hits = []


def _s3(url: str, mode: str, attempts: int = 5) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="eu-west-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"mode": mode, "max_attempts": attempts},
            connect_timeout=5,
            read_timeout=5,
        ),
    )


@pytest.mark.parametrize("mode", ["legacy", "standard"])
def test_boto3_surfaces_the_message_and_does_not_retry_a_refusal(
    server: str, mode: str, no_backoff: list[float]
) -> None:
    _answer_with("s3", 403)
    with pytest.raises(ClientError) as info:
        _s3(server, mode).put_object(Bucket="b", Key="k.dcm", Body=b"DICM")
    error = info.value.response["Error"]
    assert error["Code"] == "AccessDenied"
    assert error["Message"] == MESSAGE
    assert error["CasbError"] == "encryption_required"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert info.value.response["ResponseMetadata"]["RequestId"] == RID
    assert _Answer.hits == ["PUT"]
    assert no_backoff == []


@pytest.mark.parametrize("mode", ["legacy", "standard"])
def test_boto3_retries_no_4xx_but_429(server: str, mode: str, no_backoff: list[float]) -> None:
    client = _s3(server, mode, attempts=3)
    for status in sorted(S3_CODES):
        _answer_with("s3", status)
        with pytest.raises(ClientError) as info:
            client.get_object(Bucket="b", Key="k.dcm")
        assert info.value.response["Error"]["Code"] == S3_CODES[status]
        retried = len(_Answer.hits) > 1
        # Refusals (4xx) are final; throttling (429) and upstream trouble (5xx but 501)
        # are worth a retry.
        assert retried == (status == 429 or (status >= 500 and status != 501)), status


def _blob(url: str) -> BlobClient:
    return BlobClient(
        account_url=f"{url}/devstoreaccount1",
        container_name="images",
        blob_name="study/k.dcm",
        credential="sv=2022-11-02&ss=b&srt=o&sp=rwc&sig=c2lnbmF0dXJl",
        retry_policy=LinearRetry(backoff=0, random_jitter_range=0, retry_total=2),
    )


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, HttpResponseError),
        (401, ClientAuthenticationError),
        (403, HttpResponseError),
        (409, ResourceExistsError),
        (413, HttpResponseError),
    ],
)
def test_azure_sdk_surfaces_code_and_message_without_retry(
    server: str, status: int, exception: type[HttpResponseError]
) -> None:
    _answer_with("azure", status)
    with pytest.raises(exception) as info:
        _blob(server).upload_blob(b"DICM", overwrite=True)
    assert getattr(info.value, "error_code", None) == AZURE_CODES[status]
    assert MESSAGE in str(info.value)
    assert f"RequestId:{RID}" in str(info.value)
    assert getattr(info.value, "additional_info", None) == {"casberror": "encryption_required"}
    assert _Answer.hits == ["PUT"]


def test_azure_sdk_retries_server_busy(server: str) -> None:
    _answer_with("azure", 503)
    with pytest.raises(HttpResponseError) as info:
        _blob(server).upload_blob(b"DICM", overwrite=True)
    assert getattr(info.value, "error_code", None) == "ServerBusy"
    assert _Answer.hits == ["PUT"] * 3
