"""Encryption in transit: uploads never travel over a plaintext leg.

Client -> proxy: a `store` that arrived over plaintext HTTP is refused unless its
listener is a loopback listener marked `allow_plaintext`. Proxy -> upstream: a `store` to
an `http://` upstream is refused unless the destination is marked `allow_plaintext`
(loopback test rigs), and then it is audited with a warning. Reads are not refused
here (the issue's scope); the README says so.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAINTEXT_UPSTREAM_WARNING = "plaintext_upstream"


@dataclass(frozen=True, slots=True)
class TransportVerdict:
    refusal: str | None = None  # why the request is refused (safe to show the client)
    warning: str | None = None  # audited when the request goes ahead


def check_transport(
    *,
    store: bool,
    client_tls: bool,
    listener_plaintext_ok: bool,
    upstream_scheme: str,
    destination: str,
    destination_plaintext_ok: bool,
) -> TransportVerdict:
    if not store:
        return TransportVerdict()
    if not client_tls and not listener_plaintext_ok:
        return TransportVerdict(
            refusal=(
                "uploads must be sent over TLS: this request arrived over plaintext HTTP; "
                "use the https:// address of the proxy"
            )
        )
    if upstream_scheme != "https":
        if not destination_plaintext_ok:
            return TransportVerdict(
                refusal=(
                    f"destination '{destination}' is reached over plaintext http://, so "
                    "uploads to it are refused (allow_plaintext is meant for loopback test "
                    "rigs only)"
                )
            )
        return TransportVerdict(warning=PLAINTEXT_UPSTREAM_WARNING)
    return TransportVerdict()
