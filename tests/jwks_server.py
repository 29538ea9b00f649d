"""Test support: a real JWKS HTTP server on a loopback port, and real signing keys.

    with JwksServer() as server:
        key = TestKey.generate("RS256")
        server.set_keys(key)
        token = key.sign({"sub": "alice", ...})
        ... JwksUrlSource(server.url, ...) ...
        server.fail(500)      # answer 500
        server.hang()         # accept, never answer (until recover() or stop())
        server.drop()         # close the connection without answering
        server.recover()
        server.request_count  # how many JWKS requests arrived

Used by the identity unit tests and by integration tests (importable as tests.jwks_server).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

JWKS_PATH = "/.well-known/jwks.json"

Mode = Literal["ok", "error", "hang", "drop", "redirect"]


class JwksServer:
    """A JWKS endpoint in a background thread; its answers can be changed at runtime."""

    def __init__(self, jwks: dict[str, Any] | None = None, *, path: str = JWKS_PATH) -> None:
        self.path = path
        self._lock = threading.Condition()
        self._body = json.dumps(jwks if jwks is not None else {"keys": []}).encode()
        self._mode: Mode = "ok"
        self._status = 500
        self._location = ""
        self._release = threading.Event()
        self._stopping = threading.Event()
        self._requests = 0
        self.delay = 0.0  # seconds each answer is held back (to make fetches overlap)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> JwksServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="jwks-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._release.set()  # let hanging handlers go
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> JwksServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    # -- what it serves ----------------------------------------------------------------

    def set_jwks(self, jwks: Any) -> None:
        """Serve this JSON document from now on (any JSON, to test broken sets too)."""
        with self._lock:
            self._body = json.dumps(jwks).encode()

    def set_body(self, body: bytes) -> None:
        """Serve these raw bytes (e.g. not JSON at all)."""
        with self._lock:
            self._body = body

    def set_keys(self, *keys: TestKey) -> None:
        self.set_jwks(jwks_of(*keys))

    def fail(self, status: int = 500) -> None:
        with self._lock:
            self._mode, self._status = "error", status

    def hang(self) -> None:
        """Accept requests but do not answer them until recover() (then answer as
        configured at that time) or stop() (then close)."""
        with self._lock:
            self._release.clear()
            self._mode = "hang"

    def drop(self) -> None:
        """Close each connection without an answer."""
        with self._lock:
            self._mode = "drop"

    def redirect(self, location: str, status: int = 302) -> None:
        """Answer with a redirect (a JWKS client must not follow it)."""
        with self._lock:
            self._mode, self._status, self._location = "redirect", status, location

    def recover(self) -> None:
        with self._lock:
            self._mode = "ok"
            self._release.set()

    # -- what it saw -------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        with self._lock:
            return self._requests

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least `count` requests have arrived; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._requests >= count, timeout=timeout)

    # -- the handler -------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with owner._lock:
                    owner._requests += 1
                    owner._lock.notify_all()
                    mode, status, body = owner._mode, owner._status, owner._body
                    release, delay = owner._release, owner.delay
                    location = owner._location
                if delay:
                    owner._stopping.wait(delay)
                if mode == "hang":
                    release.wait()
                    with owner._lock:  # recovered: answer as the server answers now
                        mode, status, body = owner._mode, owner._status, owner._body
                        location = owner._location
                    if owner._stopping.is_set() or mode == "hang":
                        self.close_connection = True
                        return
                if mode == "drop":
                    self.close_connection = True
                    return
                if self.path.split("?", 1)[0] != owner.path:
                    status, body = 404, b'{"error": "not found"}'
                elif mode in ("error", "redirect"):
                    body = b'{"error": "server error"}'
                else:
                    status = 200
                self.send_response(status)
                if mode == "redirect":
                    self.send_header("Location", location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


# -- keys and tokens -------------------------------------------------------------------

KeyKind = Literal["RSA", "EC", "Ed25519", "Ed448"]

_EC_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}


@dataclass
class TestKey:
    """A private signing key and its public JWK."""

    __test__ = False  # not a pytest test class

    alg: str
    kid: str
    private_key: Any
    public_jwk: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def generate(
        cls,
        alg: str = "RS256",
        *,
        kid: str | None = None,
        jwk_alg: bool = True,
        use: str | None = "sig",
        curve: Literal["Ed25519", "Ed448"] = "Ed25519",
        rsa_bits: int = 2048,
    ) -> TestKey:
        """A fresh key for `alg` (RS*/PS* -> RSA, ES* -> EC on the matching curve,
        EdDSA -> Ed25519 or Ed448). `jwk_alg=False` leaves `alg` out of the JWK."""
        private_key: Any
        if alg[:2] in ("RS", "PS"):
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
            jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        elif alg in _EC_CURVES:
            private_key = ec.generate_private_key(_EC_CURVES[alg])
            jwk = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        elif alg == "EdDSA":
            private_key = (
                ed25519.Ed25519PrivateKey.generate()
                if curve == "Ed25519"
                else ed448.Ed448PrivateKey.generate()
            )
            jwk = OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        else:
            raise ValueError(f"no test key for {alg}")
        kid = kid if kid is not None else uuid.uuid4().hex[:16]
        jwk = {k: v for k, v in jwk.items() if k not in ("alg", "key_ops")}
        jwk["kid"] = kid
        if jwk_alg:
            jwk["alg"] = alg
        if use is not None:
            jwk["use"] = use
        return cls(alg=alg, kid=kid, private_key=private_key, public_jwk=jwk)

    def sign(
        self,
        claims: dict[str, Any],
        *,
        headers: dict[str, Any] | None = None,
        alg: str | None = None,
        kid: str | Literal[False] | None = None,
    ) -> str:
        """Sign `claims`. `kid=False` leaves the kid header out; another string forges it."""
        hdrs: dict[str, Any] = {}
        if kid is None:
            hdrs["kid"] = self.kid
        elif kid is not False:
            hdrs["kid"] = kid
        hdrs.update(headers or {})
        return jwt.encode(claims, self.private_key, algorithm=alg or self.alg, headers=hdrs)

    def public_pem(self) -> bytes:
        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def jwks_of(*keys: TestKey) -> dict[str, Any]:
    return {"keys": [dict(k.public_jwk) for k in keys]}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )


def unsigned_token(claims: dict[str, Any], *, kid: str | None = None) -> str:
    """An `alg: none` token, crafted by hand (pyjwt will not help make one to attack)."""
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return _segments(header, claims) + "."


def hmac_token(
    claims: dict[str, Any], secret: bytes, *, alg: str = "HS256", kid: str | None = None
) -> str:
    """An HS* token signed by hand with `secret` (for the RSA-public-key-as-HMAC-secret
    algorithm confusion attack: pyjwt itself refuses to sign with a PEM as HMAC key)."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = _segments(header, claims)
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signature = hmac.new(secret, signing_input.encode("ascii"), digest).digest()
    return signing_input + "." + b64url(signature)
