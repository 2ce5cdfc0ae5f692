"""HEP export: a copy of every SIP message in and out, for Homer, never on the call path.

The daemon's tracer hands each message to :meth:`HepExporter.offer`, which only stamps the
time, takes the bytes and appends them to a bounded queue: no I/O, nothing that can fail or
wait. A sender task empties the queue into the collector (see :mod:`clearip.relay.service.hep` for
the packet):

- UDP: one datagram per message from a non-blocking socket; a failed send loses that message.
- TCP: one connection, HEP3 packets back to back. When it cannot be opened, or is lost, the
  sender retries with back-off (0.5 s doubling to 30 s) and messages are dropped meanwhile
  (the queue with them): a collector that is down costs no memory. A collector that stops
  reading fills the socket and the queue, then new messages are dropped; after 10 s without
  progress the connection is closed and a new one opened (a vanished host is noticed then).

Calls never wait for any of it. Counted in the daemon's counters: ``hep_sent`` (handed to
the socket), ``hep_dropped`` (queue full, collector unreachable, or a message HEP cannot
carry), ``hep_send_errors`` (the send itself failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import cast

from clearip.relay.config import HepConfig
from clearip.relay.service.hep import HepError, encode, record_for
from clearip.relay.sip.message import Message

log = logging.getLogger("clearip.hep")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 5.0
STALL_TIMEOUT = 10.0
BATCH = 200  # messages sent before the sender lets the event loop run calls again

# time, direction, transport, local, remote, bytes, Call-ID
Item = tuple[float, str, str, tuple[str, int], tuple[str, int], bytes, str]


class HepExporter:
    """One collector, one bounded queue, one sender task (see the module docstring)."""

    def __init__(self, config: HepConfig, counters: Counter[str]) -> None:
        self.config = config
        self.counters = counters
        self.host, self.port = config.host, config.port
        self.password = config.password.encode("utf-8")
        self.queue: deque[Item] = deque()
        self.limit = config.queue_limit
        # False while the collector is known to be unreachable: messages are dropped at once.
        self.accepting = True
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._stream: _Stream | None = None
        self._outage = False
        for key in ("hep_sent", "hep_dropped", "hep_send_errors"):
            counters[key] += 0  # shown by clearipctl stats from the start

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.config.transport}:{host}:{self.port}"

    @property
    def paused(self) -> bool:
        """True while a TCP collector is not taking what is sent (its socket is full)."""
        return self._stream is not None and self._stream.paused

    # -- the call path ---------------------------------------------------------------------
    def offer(
        self,
        direction: str,
        message: Message,
        transport: str,
        local: tuple[str, int],
        remote: tuple[str, int],
    ) -> None:
        """Queue one message (bytes taken now: the relay may change the object later)."""
        if not self.accepting or len(self.queue) >= self.limit:
            self.counters["hep_dropped"] += 1
            return
        when = time.time()
        self.queue.append(
            (when, direction, transport, local, remote, message.to_bytes(), message.call_id)
        )
        self._wake.set()

    # -- the sender --------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        """Stop sending now (a reload replaces the exporter); what is queued is dropped."""
        if self._task is not None:
            self._task.cancel()
        self._close_socket()
        self.accepting = False
        self.queue.clear()

    async def close(self) -> None:
        task = self._task
        self.stop()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN
        while True:
            try:
                send = await self._open()
            except (OSError, TimeoutError) as exc:
                self._unreachable(str(exc) or type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                self.accepting = True  # the next attempt may succeed: keep what comes meanwhile
                continue
            self.accepting = True
            if self._outage:
                log.warning("HEP collector %s reachable again", self.target)
                self._outage = False
            else:
                log.info("HEP: copying SIP to %s (capture id %d)", self.target,
                         self.config.capture_id)  # fmt: skip
            opened = loop.time()
            await self._pump(send)
            self._close_socket()
            if loop.time() - opened >= BACKOFF_MAX:  # it had worked for a while: retry soon
                backoff = BACKOFF_MIN
            log.info("HEP connection to %s lost: reconnecting in %.1f s", self.target, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _open(self) -> Callable[[bytes], bool]:
        """Open the socket; returns the function that sends one packet (False: not sent)."""
        loop = asyncio.get_running_loop()
        if self.config.transport == "udp":
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            return self._send_datagram
        _, stream = await asyncio.wait_for(
            loop.create_connection(lambda: _Stream(self._wake), self.host, self.port),
            CONNECT_TIMEOUT,
        )
        self._stream = stream
        return stream.send

    def _send_datagram(self, data: bytes) -> bool:
        assert self._sock is not None
        try:
            self._sock.send(data)
        except OSError:  # ICMP unreachable from an earlier datagram, a full buffer, too big
            return False
        return True

    async def _pump(self, send: Callable[[bytes], bool]) -> None:
        """Send until the connection is gone (TCP); UDP has no end."""
        stream = self._stream
        while stream is None or stream.usable:
            if not self.queue or (stream is not None and stream.paused):
                self._wake.clear()
                await self._wake.wait()
                continue
            for _ in range(min(BATCH, len(self.queue))):
                if stream is not None and not stream.usable:
                    return
                when, direction, transport, local, remote, payload, call_id = self.queue.popleft()
                try:
                    record = record_for(
                        direction,
                        transport,
                        local,
                        remote,
                        when,
                        payload=payload,
                        correlation_id=call_id,
                        capture_id=self.config.capture_id,
                        password=self.password,
                    )
                    data = encode(record)
                except HepError as exc:
                    self.counters["hep_dropped"] += 1
                    log.debug("HEP: message not exported: %s", exc)
                    continue
                if send(data):
                    self.counters["hep_sent"] += 1
                else:
                    self.counters["hep_send_errors"] += 1
            await asyncio.sleep(0)  # let calls run between batches

    def _unreachable(self, reason: str) -> None:
        """The collector cannot be reached: drop what waits, and what comes until a retry."""
        self.counters["hep_dropped"] += len(self.queue)
        self.queue.clear()
        self.accepting = False
        if not self._outage:
            log.warning("HEP collector %s unreachable (%s): SIP copies are dropped and counted "
                        "(hep_dropped) until it is back", self.target, reason)  # fmt: skip
            self._outage = True

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class _Stream(asyncio.Protocol):
    """The TCP connection: writes while the kernel takes them, notices loss and stalls."""

    def __init__(self, wake: asyncio.Event) -> None:
        self.wake = wake
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.lost = False
        self._stall: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return not self.lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        pass  # a collector has nothing to say

    def send(self, data: bytes) -> bool:
        if self.transport is None or self.lost or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def pause_writing(self) -> None:
        self.paused = True
        loop = asyncio.get_running_loop()
        self._stall = loop.call_later(STALL_TIMEOUT, self._stalled)

    def resume_writing(self) -> None:
        self.paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.wake.set()

    def _stalled(self) -> None:
        log.warning("HEP collector stopped reading for %.0f s: reconnecting", STALL_TIMEOUT)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._stall is not None:
            self._stall.cancel()
        self.wake.set()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()
        self.lost = True
        self.wake.set()
