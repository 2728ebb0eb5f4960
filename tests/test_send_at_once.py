"""Accepted connections whose writes go out at once (kerjostunt.tcp.send_at_once), on real loopback sockets."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest

from kerjostunt.tcp import send_at_once

reactor: Any = global_reactor


class Writer(Protocol):
    """Writes ``payloads`` from ``connectionMade`` and notes what the transport held after each."""

    def __init__(self, payloads: list[bytes], made: Deferred[Writer]) -> None:
        self.payloads, self.made = payloads, made
        self.queued_after: list[int] = []
        self.watched_for_writing: list[bool] = []

    def connectionMade(self) -> None:
        send_at_once(self.transport)
        for payload in self.payloads:
            self.transport.write(payload)  # type: ignore[union-attr]
            t: Any = self.transport
            self.queued_after.append(len(t.dataBuffer) - t.offset + t._tempDataLen)
            self.watched_for_writing.append(t in reactor.getWriters())
        self.made.callback(self)


class SendAtOnceTests(unittest.TestCase):
    def serve(self, payloads: list[bytes]) -> tuple[Deferred[Writer], socket.socket]:
        made: Deferred[Writer] = Deferred()
        factory = Factory.forProtocol(lambda: Writer(payloads, made))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        made.addCallback(self._close_later)
        return made, client

    def _close_later(self, writer: Writer) -> Writer:
        self.addCleanup(writer.transport.abortConnection)  # type: ignore[union-attr]
        return writer

    def read_all(self, client: socket.socket, size: int) -> Deferred[bytes]:
        """Read ``size`` bytes without blocking the reactor: the reactor must run to send the rest."""
        client.setblocking(False)
        got = bytearray()
        done: Deferred[bytes] = Deferred()

        def poll() -> None:
            try:
                while len(got) < size:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    got.extend(chunk)
            except BlockingIOError:
                pass
            if len(got) >= size:
                done.callback(bytes(got))
            else:
                reactor.callLater(0, poll)

        poll()
        return done

    async def test_small_write_is_sent_in_write(self) -> None:
        made, client = self.serve([b"INVITE sip:bob SIP/2.0\r\n\r\n"])
        writer = await made
        self.assertIsInstance(writer.transport, tcp.Server)
        self.assertEqual(writer.queued_after, [0])
        self.assertEqual(writer.watched_for_writing, [False])
        self.assertEqual(await self.read_all(client, 26), b"INVITE sip:bob SIP/2.0\r\n\r\n")

    async def test_what_the_kernel_refuses_is_buffered_and_follows_in_order(self) -> None:
        big = bytes(range(256)) * 40_000  # 10 MB, far beyond the socket buffers
        tail = b"the end"
        made, client = self.serve([big, tail])
        writer = await made
        self.assertGreater(writer.queued_after[0], 0)
        self.assertTrue(writer.watched_for_writing[0])
        self.assertEqual(writer.queued_after[1], writer.queued_after[0] + len(tail))  # queued behind
        self.assertEqual(await self.read_all(client, len(big) + len(tail)), big + tail)

    def test_other_transports_are_left_alone(self) -> None:
        transport = StringTransport()
        send_at_once(transport)
        self.assertIs(type(transport), StringTransport)
