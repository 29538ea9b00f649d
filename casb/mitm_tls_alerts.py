"""A fatal TLS alert after the handshake closes the connection (a fix for mitmproxy 11).

With TLS 1.3 a client considers the handshake done before the server has checked the
client's certificate. An upstream that requires mTLS and gets no (or a bad) certificate
from the proxy therefore answers the proxy's *request* with a fatal alert
(`certificate required`, `bad certificate`, ...) and closes the connection.

mitmproxy 11's `TLSLayer.receive_data` logs "TLS Error" for that alert and stops; OpenSSL
meanwhile marks the session as shut down by the peer, so when the TCP close arrives
`TLSLayer.receive_close` believes the close was already passed on and swallows it. The
HTTP layer never learns that the upstream is gone: no 502, no `error` hook, no audit
record, and the clinician's request hangs until the client gives up. Whether a given
request hangs depends on whether the alert is read before the close (a race a loaded
machine loses), see tests/integration/test_upstream_tls.py.

`install()` replaces those two methods: a TLS error on an established connection is the
end of that connection (after any plaintext decrypted before it is passed on), which the
layers above handle like any other close (502 `upstream_unreachable`, audited). The
later TCP close is not passed on twice. Idempotent; call it before the proxy starts.

This is the one place that patches mitmproxy. It is written against mitmproxy 11.0.x
(pinned in pyproject.toml); `install()` refuses to patch a layer that no longer has the
methods it replaces.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from mitmproxy import connection
from mitmproxy.proxy import events
from mitmproxy.proxy.layers import tls as tls_layers
from OpenSSL import SSL

log = logging.getLogger(__name__)

_CLOSED_BY_ALERT = "_casb_closed_by_tls_error"
_INSTALLED = "_casb_tls_alert_fix"

_Commands = Generator[Any, Any, None]


def _receive_data(self: Any, data: bytes) -> _Commands:
    """mitmproxy's loop over the decrypted records, except that a TLS error ends the
    connection instead of only being logged."""
    if data:
        self.tls.bio_write(data)
    yield from self.tls_interact()

    plaintext = bytearray()
    close = False
    failure: str | None = None
    while True:
        try:
            plaintext.extend(self.tls.recv(65535))
        except SSL.WantReadError:
            break
        except SSL.ZeroReturnError:  # close_notify
            close = True
            break
        except SSL.Error as exc:  # a fatal alert from the peer, or a broken record
            failure = str(exc)
            close = True
            break
    if plaintext:
        yield from self.event_to_child(events.DataReceived(self.conn, bytes(plaintext)))
    if close:
        self.conn.state &= ~connection.ConnectionState.CAN_READ
        if failure is not None:
            setattr(self, _CLOSED_BY_ALERT, True)
            # The peer's words (alert names, OpenSSL reasons): no request data.
            log.warning("TLS error on an established connection, closing it: %s", failure)
        yield from self.event_to_child(events.ConnectionClosed(self.conn))


def _receive_close(self: Any) -> _Commands:
    if getattr(self, _CLOSED_BY_ALERT, False):
        return  # already passed on when the alert arrived
    if self.tls.get_shutdown() & SSL.RECEIVED_SHUTDOWN:
        return  # close_notify: passed on by _receive_data
    yield from super(tls_layers.TLSLayer, self).receive_close()


def install() -> None:
    layer: Any = tls_layers.TLSLayer
    if getattr(layer, _INSTALLED, False):
        return
    for name in ("receive_data", "receive_close", "tls_interact", "event_to_child"):
        if not callable(getattr(layer, name, None)):
            raise RuntimeError(
                f"mitmproxy's TLSLayer has no {name}(): casb's TLS alert fix is written "
                "for mitmproxy 11.0.x"
            )
    layer.receive_data = _receive_data
    layer.receive_close = _receive_close
    setattr(layer, _INSTALLED, True)
