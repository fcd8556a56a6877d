"""A DNS server on 127.0.0.1 that knows no names, and a Scrapy resolver that asks only it.

Lets a test see a real DNS failure (a real query, a real NXDOMAIN answer) without a
single packet leaving the machine: the crawl is started with
``-s DNS_RESOLVER=tests.dns.LoopbackResolver`` and FETCHER_TEST_DNS_PORT in its environment.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolverSimple
from twisted.names import client
from twisted.names.error import DomainError
from zope.interface import implementer

PORT_ENV = "FETCHER_TEST_DNS_PORT"


class NXDomainServer:
    """Answers every query with NXDOMAIN and counts the queries."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> NXDomainServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            if len(packet) < 12:
                continue
            end = 12
            labels = []
            while end < len(packet) and packet[end]:
                labels.append(packet[end + 1 : end + 1 + packet[end]].decode("ascii", "replace"))
                end += packet[end] + 1
            question = packet[12 : end + 5]
            self.queries.append(".".join(labels))
            # Same id; QR, RD and RA set, RCODE 3 (NXDOMAIN); one question, no records.
            reply = packet[:2] + b"\x81\x83" + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
            self.sock.sendto(reply, peer)


@implementer(IResolverSimple)
class LoopbackResolver:
    """IResolverSimple for Scrapy's DNS_RESOLVER setting: queries the loopback server only."""

    def __init__(self, reactor: Any, port: int) -> None:
        self.reactor = reactor
        self._resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)

    @classmethod
    def from_crawler(cls, crawler: Any, reactor: Any) -> LoopbackResolver:
        return cls(reactor, int(os.environ[PORT_ENV]))

    def install_on_reactor(self) -> None:
        self.reactor.installResolver(self)

    def getHostByName(self, name: str, timeout: Any = ()) -> Any:  # noqa: N802 - Twisted's name
        d = self._resolver.getHostByName(name, (2,))

        def not_found(failure: Any) -> None:
            # What the system resolver reports too (Twisted logs any other error type loudly).
            failure.trap(DomainError)
            raise DNSLookupError(name)

        return d.addErrback(not_found)
