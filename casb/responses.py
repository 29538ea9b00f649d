"""Error responses in the one format clients and tests rely on (DESIGN.md):
JSON {"error": code, "message": ..., "request_id": ...} with the right status."""

from __future__ import annotations

import json

from casb.exchange import Refusal

REQUEST_ID_HEADER = "X-Request-Id"


def error_body(refusal: Refusal, request_id: str) -> bytes:
    return json.dumps(
        {"error": refusal.code, "message": refusal.message, "request_id": request_id}
    ).encode()


def error_headers(refusal: Refusal, request_id: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", "application/json"),
        ("Cache-Control", "no-store"),
        (REQUEST_ID_HEADER, request_id),
        *refusal.headers,
    ]
