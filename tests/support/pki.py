"""A throwaway test PKI built with `cryptography` alone: CAs, server certificates with
DNS and IP subject alternative names, client certificates, written as PEM files.

EC P-256 keys because they are generated in well under a millisecond (RSA-2048 takes
tens of them) and every TLS stack under test (OpenSSL via Python, Node for Azurite,
mitmproxy) accepts them. Certificates are valid from one hour ago (clock skew) for a
day: long enough for any test run, short enough that a leaked file is worthless."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=1)
BACKDATE = dt.timedelta(hours=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "casb tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class CA:
    """A self-signed certificate authority that issues leaf certificates."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def _issue(
        self,
        cn: str,
        eku: x509.ObjectIdentifier,
        san: list[x509.GeneralName] | None = None,
    ) -> tuple[bytes, bytes]:
        key = _key()
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def issue_server(self, hostnames: list[str], ips: list[str]) -> tuple[bytes, bytes]:
        """(cert_pem, key_pem) for a TLS server answering to `hostnames` and `ips`."""
        if not hostnames and not ips:
            raise ValueError("a server certificate needs at least one name or address")
        san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cn = hostnames[0] if hostnames else ips[0]
        return self._issue(cn, ExtendedKeyUsageOID.SERVER_AUTH, san)

    def issue_client(self, cn: str) -> tuple[bytes, bytes]:
        """(cert_pem, key_pem) for a TLS client identifying as `cn` (also put in the
        subjectAltName as a DNS name: strict verifiers, like cryptography's
        ClientVerifier, require a SAN on every leaf)."""
        return self._issue(cn, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(cn)])


def make_ca(name: str) -> CA:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    subject = _name(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(name=name, key=key, cert=cert)


def write_pem(directory: Path, name: str, *pems: bytes) -> Path:
    """Write the concatenated PEM blocks to directory/name (0600: it may hold a key)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(b"".join(pems))
    return path


SERVER_HOSTNAMES = ["localhost", "*.localhost"]
SERVER_IPS = ["127.0.0.1", "::1"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS tests.

    * ca_pem: the "test-ca" that issued server_cert (for 127.0.0.1, ::1, localhost and
      *.localhost, so virtual-hosted bucket names like b.localhost also verify).
    * client_cert/client_key: issued by a second CA, "client-ca" (client_ca_pem), so a
      test can show that server trust and client trust are configured separately.
    * rogue_ca_pem: an unrelated CA that issued nothing here: trusting only it must make
      verification fail.
    """

    ca_pem: Path
    server_cert: Path
    server_key: Path
    client_ca_pem: Path
    client_cert: Path
    client_key: Path
    rogue_ca_pem: Path

    @property
    def server(self) -> tuple[Path, Path]:
        """(cert, key), the shape start_moto/start_azurite take as `tls=`."""
        return self.server_cert, self.server_key


def tls_files(directory: Path) -> TlsFiles:
    ca = make_ca("casb test-ca")
    client_ca = make_ca("casb client-ca")
    rogue = make_ca("casb rogue-ca")
    server_cert, server_key = ca.issue_server(SERVER_HOSTNAMES, SERVER_IPS)
    client_cert, client_key = client_ca.issue_client("casb-test-client")
    return TlsFiles(
        ca_pem=write_pem(directory, "ca.pem", ca.cert_pem),
        server_cert=write_pem(directory, "server.pem", server_cert),
        server_key=write_pem(directory, "server-key.pem", server_key),
        client_ca_pem=write_pem(directory, "client-ca.pem", client_ca.cert_pem),
        client_cert=write_pem(directory, "client.pem", client_cert),
        client_key=write_pem(directory, "client-key.pem", client_key),
        rogue_ca_pem=write_pem(directory, "rogue-ca.pem", rogue.cert_pem),
    )
