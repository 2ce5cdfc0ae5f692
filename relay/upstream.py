"""The persistent connection to ClearIP: opened at start, kept alive, re-opened with back-off.

Every address the upstream host resolves to (or the configured list) is tried in order. While
connected, a CRLFCRLF keep-alive (RFC 5626 §4.4.1) goes out every ``keepalive_interval`` and TCP
keep-alive probes detect a silent peer; when the connection is lost the proxy is told at once
so calls waiting on ClearIP fail open instead of waiting for their timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from clearip.relay.config import UpstreamConfig
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import Peer

log = logging.getLogger("clearip.upstream")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 3.0
STABLE_AFTER = 1.0  # seconds up after which a lost link is retried without waiting


class UpstreamLink:
    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        endpoint: SipEndpoint,
        on_down: Callable[[], None],
    ) -> None:
        self.name = name
        self.config = config
        self.endpoint = endpoint
        self.on_down = on_down
        self.peer: Peer | None = None
        self.state = "connecting"
        self.last_error = ""
        self.connected_since: float | None = None
        self.attempted = asyncio.Event()
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self.addresses: list[str] = []

    @property
    def up(self) -> bool:
        return self.peer is not None

    def start(self) -> None:
        if self.config.transport == "udp":
            # Datagrams need no connection: the upstream is "up" as long as it resolves.
            self._task = asyncio.create_task(self._resolve_udp())
            return
        self._task = asyncio.create_task(self._run())

    async def _resolve_udp(self) -> None:
        addresses = await self._resolve()
        self.addresses = addresses
        if addresses:
            self.peer = Peer("udp", addresses[0], self.config.port)
            self.state = "up"
        self.attempted.set()

    async def _resolve(self) -> list[str]:
        if self.config.addresses:
            return list(self.config.addresses)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.config.host, self.config.port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            self.last_error = f"cannot resolve {self.config.host}: {exc}"
            return []
        seen: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in seen:
                seen.append(address)
        return seen

    async def _run(self) -> None:
        backoff = BACKOFF_START
        retry_now = False
        while True:
            self.addresses = await self._resolve()
            for address in self.addresses:
                peer = Peer(self.config.transport, address, self.config.port)
                try:
                    connected = await self.endpoint.connect(
                        peer,
                        server_name=self.config.server_name or self.config.host,
                        context=self.endpoint.tls_client.upstream(self.config),
                        timeout=CONNECT_TIMEOUT,
                    )
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    self.last_error = f"{peer}: {exc}"
                    log.warning("ClearIP %s upstream %s: connect failed: %s", self.name, peer, exc)
                    continue
                self._connected(connected)
                backoff = BACKOFF_START
                up_since = time.monotonic()
                await self._lost.wait()
                # A link that had been up a while (ClearIP restarted, a reset): reconnect at
                # once, since every call arriving meanwhile fails open. One that drops right
                # after connecting goes through the backoff, so it cannot spin.
                retry_now = time.monotonic() - up_since >= STABLE_AFTER
                break
            self.attempted.set()
            if self.peer is None:
                self.state = "down"
                if retry_now:
                    retry_now = False
                    continue
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    def _connected(self, peer: Peer) -> None:
        self.peer = peer
        self.state = "up"
        self.connected_since = time.time()
        self.last_error = ""
        self._lost.clear()
        self.attempted.set()
        conn = self.endpoint.connections.get(peer.conn or -1)
        if conn is not None and conn.transport is not None:
            sock = conn.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("ClearIP %s upstream connected: %s", self.name, peer)
        self._keepalive = asyncio.create_task(self._ping(peer))

    async def _ping(self, peer: Peer) -> None:
        while self.peer == peer:
            await asyncio.sleep(self.config.keepalive_interval)
            conn = self.endpoint.connections.get(peer.conn or -1)
            if conn is None or not conn.write(b"\r\n\r\n"):
                return

    def connection_lost(self, peer: Peer) -> bool:
        """Called for every lost connection; True if it was ours."""
        if self.peer is None or peer.conn != self.peer.conn:
            return False
        log.warning("ClearIP %s upstream connection lost: %s", self.name, peer)
        self.peer = None
        self.state = "down"
        self.connected_since = None
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._lost.set()
        self.on_down()
        return True

    def status(self) -> dict[str, Any]:
        return {
            "uri": self.config.uri,
            "state": self.state,
            "peer": str(self.peer) if self.peer else None,
            "since": self.connected_since,
            "last_error": self.last_error,
        }

    async def close(self) -> None:
        for task in (self._task, self._keepalive):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
