"""Certificates: load the server's, or make a local CA and a server certificate.

A fresh ``twistd kerjostunt`` must come up with TLS and nothing to install, so
when ``--certs`` holds no server certificate we create a small local CA and a
server certificate signed by it.  Clients then verify the server against
``ca.pem`` with service_identity, exactly as they would against a real CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger

log = Logger()

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"

CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=825)


@dataclass(frozen=True)
class CertificatePaths:
    """Where the server's TLS material lives; ``ca`` is None for a real cert."""

    cert: Path
    key: Path
    ca: Path | None


def _write_private(path: Path, data: bytes) -> None:
    """Write a key so that nobody but the owner can ever read it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 keeps handshakes cheap, which matters at thousands of REGISTERs.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _make_ca(domain: str, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kerjostunt local CA ({domain})")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    domain: str,
    hosts: Sequence[str],
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_general_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _covers(cert: x509.Certificate, hosts: Sequence[str]) -> bool:
    """Does an existing server certificate already name every wanted host?"""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(name in san for name in _general_names(hosts))


def fingerprint(cert_path: Path) -> str:
    """SHA-256 fingerprint, colon separated, as people compare them."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def server_hosts(domain: str, extra: Sequence[str] = ()) -> list[str]:
    """The names a generated server certificate is valid for."""
    return [domain, "localhost", "127.0.0.1", "::1", *extra]


def ensure_certificates(
    certs_dir: Path, domain: str, extra_hosts: Sequence[str] = (), *, now: datetime.datetime | None = None
) -> CertificatePaths:
    """Reuse the generated CA and server certificate, creating what is missing.

    The server certificate is made again (same CA) when a wanted host name is
    not in it, so adding ``--cert-host`` later just works; the CA stays, so
    clients keep trusting the same ``ca.pem``.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    certs_dir.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = certs_dir / CA_FILE, certs_dir / CA_KEY_FILE
    cert_path, key_path = certs_dir / SERVER_CERT_FILE, certs_dir / SERVER_KEY_FILE
    hosts = server_hosts(domain, extra_hosts)

    fresh_ca = False
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes()) if ca_path.exists() else None
    if ca_cert is not None and ca_key_path.exists() and ca_cert.not_valid_after_utc > now:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        if ca_cert is not None:
            log.warn("Local CA {path} expired or lost its key: making a new one", path=str(ca_path))
        ca_key, ca_cert = _make_ca(domain, now)
        _write_private(ca_key_path, _key_pem(ca_key))
        ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        fresh_ca = True
    log.info("Clients verify the server with CA {path} (SHA-256 {fp})",
             path=str(ca_path.resolve()), fp=fingerprint(ca_path))

    if cert_path.exists() and key_path.exists() and not fresh_ca:
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if _covers(existing, hosts) and existing.not_valid_after_utc > now:
            return CertificatePaths(cert_path, key_path, ca_path)

    key, cert = _make_server_cert(ca_key, ca_cert, domain, hosts, now)  # type: ignore[arg-type]
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("Created server certificate {path} for {hosts}", path=str(cert_path.resolve()), hosts=", ".join(hosts))
    return CertificatePaths(cert_path, key_path, ca_path)


def set_groups(context: object, groups: str) -> None:
    """Restrict the key-exchange groups a context offers (OpenSSL's
    ``SSL_CTX_set1_groups_list`` syntax, e.g. ``X25519MLKEM768:X25519:P-256``).

    pyOpenSSL 26 has no public call for it; its bindings expose the same
    function under its older name ``SSL_CTX_set1_curves_list`` (Twisted's
    own ECDH set-up reaches the context the same way). ValueError when the
    binding is missing or OpenSSL rejects the list.
    """
    from OpenSSL._util import lib

    setter = getattr(lib, "SSL_CTX_set1_curves_list", None)
    if setter is None:
        raise ValueError("this pyOpenSSL cannot choose TLS key-exchange groups")
    if setter(context._context, groups.encode("ascii")) != 1:  # type: ignore[attr-defined]
        raise ValueError(f"OpenSSL rejected the TLS groups {groups!r}")


# TLS 1.2 suites the listeners accept: forward secret and AEAD only (no
# CBC-SHA: Lucky13-style padding oracles and SHA-1 MACs). TLS 1.3 suites are
# configured apart in OpenSSL and are all AEAD, so they stay OpenSSL's.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_options(paths: CertificatePaths, groups: str | None = None) -> ssl.CertificateOptions:
    """TLS options for the signaling and web listeners (TLS 1.2 or later).

    TLS 1.2 is offered with the ``TLS12_CIPHERS`` AEAD suites only; a client
    that knows only CBC suites fails its handshake.

    ``groups`` None keeps OpenSSL's default key exchange (with OpenSSL 3.5+
    the post-quantum hybrid X25519MLKEM768 first); see docs/performance.rst
    for what each choice costs per connection.
    """
    pem = paths.cert.read_bytes() + b"\n" + paths.key.read_bytes()
    cert = ssl.PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call]
    options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),  # type: ignore[no-untyped-call]
    )
    if groups:
        set_groups(options.getContext(), groups)  # the context every connection uses
    return options


def client_options(ca_path: Path | str, hostname: str) -> IOpenSSLClientConnectionCreator:
    """Client TLS that verifies the server's name against ``ca_path`` (service_identity)."""
    authority = ssl.Certificate.loadPEM(Path(ca_path).read_bytes())
    return ssl.optionsForClientTLS(hostname, trustRoot=authority)
