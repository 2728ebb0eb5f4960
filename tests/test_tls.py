"""Certificate generation: a local CA, a server cert with the right names, private keys."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

from cryptography import x509
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt import tls


class EnsureCertificatesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())

    def _sans(self, path: Path) -> list[str]:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        ]

    def test_creates_ca_and_server_cert_with_names(self) -> None:
        paths = tls.ensure_certificates(self.dir, "example.test", ["192.0.2.7", "peer.example"])
        self.assertEqual(paths.ca, self.dir / "ca.pem")
        sans = self._sans(paths.cert)
        for name in ["example.test", "localhost", "127.0.0.1", "192.0.2.7", "peer.example"]:
            self.assertIn(name, sans)
        ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
        server = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        self.assertEqual(server.issuer, ca.subject)
        server.verify_directly_issued_by(ca)

    def test_private_keys_are_owner_only(self) -> None:
        paths = tls.ensure_certificates(self.dir, "example.test")
        for key in (paths.key, self.dir / "ca-key.pem"):
            self.assertEqual(stat.S_IMODE(key.stat().st_mode), 0o600)

    def test_reuses_existing_material(self) -> None:
        first = tls.ensure_certificates(self.dir, "example.test")
        cert_bytes = first.cert.read_bytes()
        ca_bytes = first.ca.read_bytes()  # type: ignore[union-attr]
        second = tls.ensure_certificates(self.dir, "example.test")
        self.assertEqual(second.cert.read_bytes(), cert_bytes)
        self.assertEqual(second.ca.read_bytes(), ca_bytes)  # type: ignore[union-attr]

    def test_new_host_reissues_server_cert_under_same_ca(self) -> None:
        first = tls.ensure_certificates(self.dir, "example.test")
        ca_bytes = first.ca.read_bytes()  # type: ignore[union-attr]
        old = first.cert.read_bytes()
        second = tls.ensure_certificates(self.dir, "example.test", ["198.51.100.1"])
        self.assertNotEqual(second.cert.read_bytes(), old)
        self.assertEqual(second.ca.read_bytes(), ca_bytes)  # type: ignore[union-attr]
        self.assertIn("198.51.100.1", self._sans(second.cert))

    def test_expired_server_cert_is_replaced(self) -> None:
        long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
        first = tls.ensure_certificates(self.dir, "example.test", now=long_ago)
        old = first.cert.read_bytes()
        second = tls.ensure_certificates(self.dir, "example.test")
        self.assertNotEqual(second.cert.read_bytes(), old)

    def test_expired_ca_is_replaced_with_its_server_cert(self) -> None:
        long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
        first = tls.ensure_certificates(self.dir, "example.test", now=long_ago)
        old_ca = first.ca.read_bytes()  # type: ignore[union-attr]
        second = tls.ensure_certificates(self.dir, "example.test")
        self.assertNotEqual(second.ca.read_bytes(), old_ca)  # type: ignore[union-attr]
        ca = x509.load_pem_x509_certificate(second.ca.read_bytes())  # type: ignore[union-attr]
        x509.load_pem_x509_certificate(second.cert.read_bytes()).verify_directly_issued_by(ca)

    def test_fingerprint_format(self) -> None:
        paths = tls.ensure_certificates(self.dir, "example.test")
        fp = tls.fingerprint(paths.ca)  # type: ignore[arg-type]
        self.assertEqual(len(fp.split(":")), 32)

    def test_server_options_load(self) -> None:
        paths = tls.ensure_certificates(self.dir, "example.test")
        options = tls.server_options(paths)
        self.assertIsNotNone(options.getContext())

    def _negotiated_group(self, options: object) -> str:
        """Handshake over memory BIOs against a default client; the group the server picked."""
        from OpenSSL import SSL

        server = SSL.Connection(options.getContext())  # type: ignore[attr-defined]
        server.set_accept_state()
        client = SSL.Connection(SSL.Context(SSL.TLS_METHOD))
        client.set_connect_state()
        for _ in range(10):
            for conn in (client, server):
                try:
                    conn.do_handshake()
                except SSL.WantReadError:
                    pass
            for a, b in ((client, server), (server, client)):
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    pass
        return server.get_group_name()

    def test_server_options_groups(self) -> None:
        paths = tls.ensure_certificates(self.dir, "example.test")
        self.assertEqual(self._negotiated_group(tls.server_options(paths, groups="X25519:P-256")), "x25519")
        self.assertEqual(self._negotiated_group(tls.server_options(paths, groups="P-256")), "secp256r1")
        self.assertRaises(ValueError, tls.server_options, paths, groups="no-such-group")


class _Hello(Protocol):
    """Says one line once TLS is up; records how the connection ended."""

    def __init__(self) -> None:
        self.done: defer.Deferred[bool] = defer.Deferred()
        self.shook = False

    def connectionMade(self) -> None:
        self.transport.write(b"hello\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.shook = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.done.callback(self.shook)


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class CipherTests(unittest.TestCase):
    """TLS 1.2 offers AEAD suites only, on a real socket (issue 13)."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        paths = tls.ensure_certificates(self.dir, "example.test")
        factory = TLSMemoryBIOFactory(tls.server_options(paths), False, Factory.forProtocol(_Echo))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)

    def _connect(self, ciphers: str) -> defer.Deferred[bool]:
        options = ssl.CertificateOptions(
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers),
        )
        proto = _Hello()
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port))
        return connectProtocol(endpoint, proto).addCallback(lambda _: proto.done)

    @defer.inlineCallbacks
    def test_cbc_sha_only_client_is_refused(self):  # type: ignore[no-untyped-def]
        shook = yield self._connect("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256")
        self.assertFalse(shook)

    @defer.inlineCallbacks
    def test_aead_tls12_client_is_served(self):  # type: ignore[no-untyped-def]
        shook = yield self._connect("ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertTrue(shook)
