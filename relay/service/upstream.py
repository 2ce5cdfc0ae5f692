"""The link to ClearIP: the asyncio shell around :mod:`clearip.relay.service.liveness`.

The machine decides (when a link is up or down, when to ping, when to try again); this module
does what it says: opens the TLS/TCP connection (every address the host resolves to, or the
configured list, in order), sends CRLFCRLF pings or OPTIONS probes, runs the timers, and tells
the proxy when the link goes down so calls waiting on ClearIP fail open at once.

Proof of life: on a stream, anything ClearIP sent after the ping (the connection's
``last_received``); over UDP, a response to one of our probes, which the daemon recognises by
the branch prefix :data:`PROBE_PREFIX` and hands to :meth:`UpstreamLink.probe_answered`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from clearip.bpf.steering import worker_for
from clearip.relay.config import UpstreamConfig
from clearip.relay.proxy.routing import via_value
from clearip.relay.service.liveness import (
    ANSWER,
    OTHER,
    REFUSED,
    TIMEOUT,
    TLS,
    Action,
    Connect,
    Down,
    LinkState,
    Liveness,
    ProbeLiveness,
    SendPing,
    StartTimer,
    StopTimer,
    StreamLiveness,
    Up,
)
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.via import MAGIC_COOKIE
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import Peer
from clearip.relay.transport.stream import StreamConnection

log = logging.getLogger("clearip.upstream")

# A connect that has not completed (TCP and TLS handshakes) within this long has failed; short
# enough that, with SYNs lost to a dead ClearIP, the next attempt soon follows.
CONNECT_TIMEOUT = 2.0
#: Top Via branch of our OPTIONS probes: responses to them go to the link, not to the core.
PROBE_PREFIX = MAGIC_COOKIE + "cio"
# Why a connection attempt failed, by its exception; the first that matches wins (each of
# these is an OSError too). A failed handshake (TLS): ClearIP answers, but not to us.
_FAILURE_KINDS: tuple[tuple[type[OSError], str], ...] = (
    (ssl.SSLError, TLS),
    (ConnectionRefusedError, REFUSED),
    (TimeoutError, TIMEOUT),
)


def _failure_kind(exc: OSError) -> str:
    """REFUSED, TLS, TIMEOUT or OTHER: what :meth:`StreamLiveness.failed` is told."""
    return next((kind for cls, kind in _FAILURE_KINDS if isinstance(exc, cls)), OTHER)


class UpstreamLink:
    """One ClearIP upstream (outbound, or inbound when it differs): ``peer`` while up, else
    None (the core then fails calls open at once)."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        endpoint: SipEndpoint,
        on_down: Callable[[], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.endpoint = endpoint
        self.on_down = on_down
        self.clock = clock
        self.datagram = config.transport == "udp"
        kind = ProbeLiveness if self.datagram else StreamLiveness
        self.machine: Liveness = kind(
            interval=config.keepalive_interval, timeout=config.keepalive_timeout
        )
        self.peer: Peer | None = None
        self.last_error = ""  # the latest failure (a failed attempt, or why it went down)
        self.down_reason = ""  # why it last went down
        self.connected_since: float | None = None
        self.attempted = asyncio.Event()  # the first attempt is over (up, or known down)
        self.addresses: list[str] = []
        self._candidate: Peer | None = None  # what becomes ``peer`` on Up
        self._tasks: set[asyncio.Future[None]] = set()  # the attempt or probe in flight
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._logged_failure = ""  # the failure last logged at WARNING (repeats go to DEBUG)
        self._tag = secrets.token_hex(4)  # tells our probes from another link's or process's
        self._probe_seq = itertools.count(1)
        self._closed = False

    @property
    def up(self) -> bool:
        return self.peer is not None

    @property
    def state(self) -> str:
        return self.machine.state.value

    def start(self) -> None:
        self._apply(self.machine.start(self.clock()))

    def kick(self) -> None:
        """A call needs the link and found it down: try now (the machine limits the rate)."""
        if self.machine.state is LinkState.DOWN:
            self._apply(self.machine.kick(self.clock()))

    def sends_from(self, host: str) -> bool:
        """Whether datagrams from ``host`` are ClearIP's (answers to probes even while down)."""
        if self.peer is not None and self.peer.host == host:
            return True
        return self.datagram and host in self.addresses

    # -- the interpreter -----------------------------------------------------------------------
    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, StartTimer):
                old = self._timers.pop(action.name, None)
                if old is not None:
                    old.cancel()
                loop = asyncio.get_running_loop()
                self._timers[action.name] = loop.call_later(action.delay, self._fire, action.name)
            elif isinstance(action, StopTimer):
                handle = self._timers.pop(action.name, None)
                if handle is not None:
                    handle.cancel()
            elif isinstance(action, SendPing):
                self._send_ping()
            elif isinstance(action, Connect):
                self._spawn(self._connect())
            elif isinstance(action, Up):
                self._went_up(action)
            elif isinstance(action, Down):
                self._went_down(action)
        if self.machine.state is not LinkState.CONNECTING:
            self.attempted.set()

    def _fire(self, name: str) -> None:
        self._timers.pop(name, None)
        if self._closed:
            return
        now = self.clock()
        actions: list[Action] = []
        if name == ANSWER and not self.datagram:
            conn = self._connection()
            if conn is not None:
                actions += self.machine.proof(now, conn.last_received)
        self._apply(actions + self.machine.on_timer(name, now))

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _connection(self) -> StreamConnection | None:
        peer = self.peer
        if peer is None or peer.conn is None:
            return None
        return self.endpoint.connections.get(peer.conn)

    # -- up and down ---------------------------------------------------------------------------
    def _went_up(self, up: Up) -> None:
        self.peer = self._candidate
        self.connected_since = time.time()
        self.last_error = ""
        self._logged_failure = ""
        if up.first and up.attempts <= 1:
            log.info("ClearIP %s upstream up: %s", self.name, self.peer)
            return
        log.info(
            "ClearIP %s upstream up%s after %.1f s, %d attempt(s): %s",
            self.name,
            "" if up.first else " again",
            up.down_for,
            up.attempts,
            self.peer,
        )

    def _went_down(self, down: Down) -> None:
        was = self.peer
        self.peer = None
        self.connected_since = None
        self.last_error = self.down_reason = down.reason
        self._logged_failure = down.reason
        if down.keepalive:
            self.endpoint.counters["clearip_keepalive_timeout"] += 1
        log.warning("ClearIP %s upstream down: %s (%s)", self.name, down.reason, was or "-")
        if was is not None and was.conn is not None:
            conn = self.endpoint.connections.get(was.conn)
            if conn is not None:
                conn.close()
        self.on_down()

    def _failure(self, text: str) -> None:
        """Log a failed attempt: the first of a kind at WARNING, repeats at DEBUG."""
        self.last_error = text
        if text != self._logged_failure:
            self._logged_failure = text
            log.warning("ClearIP %s upstream: %s", self.name, text)
        else:
            log.debug("ClearIP %s upstream: %s (again)", self.name, text)

    def connection_lost(self, peer: Peer) -> bool:
        """Called for every lost connection; True if it was ours."""
        if self.peer is None or self.datagram or peer.conn != self.peer.conn:
            return False
        machine = self.machine
        assert isinstance(machine, StreamLiveness)
        self._apply(machine.lost(self.clock()))
        return True

    # -- stream links: connecting and pinging --------------------------------------------------
    async def _connect(self) -> None:
        machine = self.machine
        assert isinstance(machine, StreamLiveness)
        self.addresses = await self._resolve()
        kinds: set[str] = set()
        errors: list[str] = []
        for address in self.addresses:
            peer = Peer(self.config.transport, address, self.config.port)
            try:
                connected = await self._open(peer)
            except OSError as exc:
                kind = _failure_kind(exc)
                kinds.add(kind)
                why = f"no connection within {CONNECT_TIMEOUT:g} s" if kind == TIMEOUT else exc
                errors.append(f"{peer}: {why}")
                continue
            if self._closed:
                return
            conn = self.endpoint.connections.get(connected.conn or -1)
            if conn is None or conn.closed:
                kinds.add(OTHER)
                errors.append(f"{peer}: closed as soon as opened")
                continue
            self._candidate = connected
            self._keepalive_options(connected)
            self._apply(machine.connected(self.clock()))
            return
        if self._closed:
            return
        if not errors:
            errors.append(self.last_error or f"no address for {self.config.host}")
        kind = TLS if TLS in kinds else (kinds.pop() if len(kinds) == 1 else OTHER)
        self._failure("; ".join(errors))
        self._apply(machine.failed(self.clock(), kind))

    async def _open(self, peer: Peer) -> Peer:
        """The one place a connection to ClearIP is opened."""
        return await self.endpoint.connect(
            peer,
            server_name=self.config.server_name or self.config.host,
            context=self.endpoint.tls_client.upstream(self.config),
            timeout=CONNECT_TIMEOUT,
        )

    def _keepalive_options(self, peer: Peer) -> None:
        conn = self.endpoint.connections.get(peer.conn or -1)
        if conn is None or conn.transport is None:
            return
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send_ping(self) -> None:
        if self.datagram:
            self._spawn(self._probe())
            return
        conn = self._connection()
        if conn is not None:
            conn.ping()  # a failed write closes the connection: connection_lost follows

    # -- datagram links: probing ---------------------------------------------------------------
    async def _probe(self) -> None:
        if not self.addresses or self.machine.state is not LinkState.UP:
            addresses = await self._resolve()
            self.addresses = addresses or self.addresses
        if self._closed or not self.addresses:
            return  # nothing sent: the answer timer counts it unanswered
        host = self.addresses[0]
        self._candidate = Peer("udp", host, self.config.port)
        self.endpoint.send(self._probe_request(host), self._candidate)

    def _probe_request(self, host: str) -> Request:
        """OPTIONS to ClearIP (RFC 3261 §11), with a branch the daemon routes back to us."""
        seq = next(self._probe_seq)
        local = self.endpoint.local_for("udp", host)
        target = f"[{host}]" if ":" in host else host
        uri = f"sip:{target}:{self.config.port}"
        request = Request("OPTIONS", uri)
        request.append("Via", via_value(local, f"{PROBE_PREFIX}{self._tag}.{seq}"))
        request.append("Max-Forwards", "70")
        request.append("From", f"<sip:clearip-proxy@{local.hostport()}>;tag={self._tag}")
        request.append("To", f"<{uri}>")
        request.append("Call-ID", self._own_call_id(f"probe-{self._tag}-{seq}"))
        request.append("CSeq", f"{seq} OPTIONS")
        request.append("Content-Length", "0")
        return request

    def _own_call_id(self, base: str) -> str:
        """A Call-ID whose answers the kernel steers back to this worker (bpf/reuseport.c
        hashes the Call-ID): a suffix is tried until the hash names us (about N tries)."""
        role = self.endpoint.worker
        if role is None or role.count <= 1:
            return base
        for attempt in itertools.count():
            call_id = f"{base}.{attempt}"
            if worker_for(call_id, role.count) == role.index:
                return call_id
        raise AssertionError("unreachable")

    def probe_answered(self, response: Response, peer: Peer) -> bool:
        """A response whose top Via has :data:`PROBE_PREFIX`; True if it answers our probe
        and comes from ClearIP (any status proves it alive)."""
        branch = response.top_via.branch or ""
        if not branch.startswith(f"{PROBE_PREFIX}{self._tag}.") or peer.host not in self.addresses:
            return False
        self._apply(self.machine.proof(self.clock()))
        return True

    # -- both ----------------------------------------------------------------------------------
    async def _resolve(self) -> list[str]:
        if self.config.addresses:
            return list(self.config.addresses)
        loop = asyncio.get_running_loop()
        kind = socket.SOCK_DGRAM if self.datagram else socket.SOCK_STREAM
        try:
            infos = await loop.getaddrinfo(self.config.host, self.config.port, type=kind)
        except OSError as exc:
            self._failure(f"cannot resolve {self.config.host}: {exc}")
            return []
        seen: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in seen:
                seen.append(address)
        return seen

    def status(self) -> dict[str, Any]:
        return {
            "uri": self.config.uri,
            "state": self.state,
            "peer": str(self.peer) if self.peer else None,
            "since": self.connected_since,
            "last_error": self.last_error,
            "down_reason": self.down_reason,
            "attempts": self.machine.attempts,
        }

    async def close(self) -> None:
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
