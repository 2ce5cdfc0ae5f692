"""One bound UDP socket, read in batches: the first steps of every datagram, compiled.

Why a module of its own: every message of a call over UDP goes through here twice (read, and
written by :meth:`UdpSocket.sendto`), so this code is compiled by mypyc with the SIP core
(``relay/coresources.py``), unlike the rest of the asyncio shell.

Rules of this module:

- It reads, checks the source, parses and hands over; nothing else. The endpoint owns the
  sockets' lifecycle (bind, steering, close) and everything rare: a malformed datagram goes
  back to it (``parse_failed``), as does a parse error found later by the handler.
- The endpoint is reached through the small :class:`Endpoint` protocol, so this module does
  not import the endpoint (which imports it).
- A datagram the kernel marked DSCP EF (an emergency INVITE, see ``bpf/xdp_filter.c``) is
  handled first within its batch; a worker's emergency socket (steering) is read before each
  batch and again after every :data:`EMERGENCY_EVERY` datagrams of it.
- The queue delay of a batch's oldest datagram (its kernel arrival time) is the overload
  signal the core sheds new INVITEs by.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Final, Protocol

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.parser import Limits, parse_message
from clearip.relay.sip.peer import LocalAddress, Peer

log = logging.getLogger("clearip.transport")

DSCP_EF: Final = 46
IPV6_TCLASS: Final = 67
# SO_TIMESTAMPNS (the "old" option, struct timespec): the kernel's arrival time of a datagram.
SO_TIMESTAMPNS: Final = 35
CMSG_SPACE: Final = socket.CMSG_SPACE(4) * 2 + socket.CMSG_SPACE(16)
UDP_BATCH: Final = 64
# With an emergency socket (steering), it is looked at again after every few normal datagrams.
EMERGENCY_EVERY: Final = 4
_CRLF: Final = (13, 10)  # a keep-alive (RFC 5626 §4.4.1) is CRLFs only

_SOL_SOCKET: Final = socket.SOL_SOCKET
_IPPROTO_IP: Final = socket.IPPROTO_IP
_IPPROTO_IPV6: Final = socket.IPPROTO_IPV6
_IP_TOS: Final = socket.IP_TOS


class Endpoint(Protocol):
    """What a :class:`UdpSocket` needs of the endpoint that owns it."""

    counters: Counter[str]
    limits: Limits
    is_trusted: Callable[[str], bool] | None
    tracer: Callable[[str, Message, Peer], None] | None
    handler: Callable[[Request | Response, Peer], None]
    queue_delay: float

    def parse_failed(self, data: bytes, peer: Peer, exc: SipParseError) -> None: ...

    def handler_failed(
        self, data: bytes, message: Request | Response, peer: Peer, exc: SipParseError
    ) -> None: ...


def dscp(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The DSCP of a datagram from its IP_TOS / IPV6_TCLASS control message (0 if absent)."""
    for level, kind, value in ancdata:
        if level == _IPPROTO_IP and kind == _IP_TOS and value:
            return value[0] >> 2
        if level == _IPPROTO_IPV6 and kind == IPV6_TCLASS and value:
            return int.from_bytes(value[:4], sys.byteorder) >> 2  # a native int
    return 0


def queue_delay(ancdata: list[tuple[int, int, bytes]]) -> float:
    """Seconds a datagram waited in the socket queue, from its kernel timestamp (0 if none)."""
    for level, kind, value in ancdata:
        if level == _SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
            seconds, nanoseconds = struct.unpack_from("@qq", value)
            return max(0.0, time.time() - float(seconds) - float(nanoseconds) * 1e-9)
    return 0.0


class UdpSocket:
    """One bound UDP socket of an endpoint; see the module docstring."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket, local: LocalAddress) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.local = local
        self.family: int = int(sock.family)
        self.v6 = self.family == socket.AF_INET6
        # A worker's emergency socket on the same address (steering): read before each batch.
        self.emergency: UdpSocket | None = None
        name = sock.getsockname()
        self.bound: tuple[str, int] = (str(name[0]), int(name[1]))  # ``local`` may advertise

    def on_readable(self) -> None:
        emergency = self.emergency
        if emergency is not None:
            emergency.on_emergency_readable()
        endpoint = self.endpoint
        sock = self.sock
        batch: list[tuple[bytes, Peer]] = []
        marked: list[tuple[bytes, Peer]] = []  # emergency first, each list in arrival order
        for index in range(UDP_BATCH):
            try:
                data, ancdata, _flags, address = sock.recvmsg(65535, CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                endpoint.counters["udp_recv_error"] += 1
                log.debug("UDP receive error: %s", exc)
                break
            if index == 0:  # the oldest datagram waiting: how far behind we are
                endpoint.queue_delay = queue_delay(ancdata)
            peer = Peer("udp", address[0], address[1])
            if ancdata and dscp(ancdata) == DSCP_EF:
                marked.append((data, peer))
            else:
                batch.append((data, peer))
        if marked:
            endpoint.counters["udp_dscp_ef_received"] += 1
            batch = marked + batch
        for index, (data, peer) in enumerate(batch):
            if emergency is not None and index and not index % EMERGENCY_EVERY:
                # A 911 that arrived while this batch runs waits for a few datagrams only.
                emergency.on_emergency_readable()
            self.receive(data, peer)

    def on_emergency_readable(self) -> None:
        """The emergency socket: everything on it is first in line (as if marked DSCP EF),
        each handled as soon as read; its wait is not the overload signal (queue_delay)."""
        endpoint = self.endpoint
        sock = self.sock
        for _ in range(UDP_BATCH):
            try:
                data, address = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                endpoint.counters["udp_recv_error"] += 1
                log.debug("UDP receive error: %s", exc)
                break
            endpoint.counters["udp_emergency_received"] += 1
            self.receive(data, Peer("udp", address[0], address[1]))

    def receive(self, data: bytes, peer: Peer) -> None:
        """One datagram: the source check, keep-alives, parse, then the endpoint's handler."""
        endpoint = self.endpoint
        is_trusted = endpoint.is_trusted
        if is_trusted is not None and not is_trusted(peer.host):
            endpoint.counters["untrusted_dropped"] += 1
            return
        if (not data or data[0] in _CRLF) and data.strip(b"\r\n") == b"":
            endpoint.counters["udp_keepalive"] += 1
            return
        try:
            message = parse_message(data, limits=endpoint.limits, datagram=True)
        except SipParseError as exc:
            endpoint.parse_failed(data, peer, exc)
            return
        tracer = endpoint.tracer
        if tracer is not None:
            tracer("in", message, peer)
        try:
            endpoint.handler(message, peer)
        except SipParseError as exc:
            # A lazily parsed header turned out malformed deep in the handler.
            endpoint.handler_failed(data, message, peer, exc)

    def sendto(self, data: bytes, host: str, port: int) -> None:
        self.sock.sendto(data, (host, port))
