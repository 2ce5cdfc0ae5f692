"""The daemon's effect interpreter: hands each message to the core and carries out its effects.

Why a module of its own: the core returns effects (``relay/proxy/effects.py``) and this is the
one place that carries them out: sends, timers, call records. It runs for every message, so it
is compiled by mypyc with the SIP core (``relay/coresources.py``) while the rest of the daemon
stays interpreted.

Rules of this module:

- One interpreter for one effect vocabulary: every effect the core returns, from a message, a
  timer, a failed send or a lost upstream, goes through :meth:`Dispatcher.apply`.
- A send over UDP to an address is written here, on the listener of the peer's family; any
  other send (streams, names to resolve, a missing listener, tracing on) is the endpoint's.
- The core's timers live in one :class:`TimerWheel`, woken by one event-loop handle: the next
  tick with something due (:meth:`Dispatcher.wake_at`). The loop is the daemon's, given by
  :meth:`Dispatcher.attach` before the first message.
- What is rare or slow goes back to the daemon by callback: answers to ClearIP link probes,
  finished calls (logs and listeners).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from clearip.relay.proxy.core import ProxyCore
from clearip.relay.proxy.effects import CallFinished, CancelTimer, Effect, Send, StartTimer
from clearip.relay.proxy.timerkeys import TimerKey
from clearip.relay.service.timerwheel import TimerWheel
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.peer import Peer
from clearip.relay.transport.udp import UdpSocket

log = logging.getLogger("clearip.transport")


class Endpoint(Protocol):
    """What the dispatcher needs of the endpoint."""

    counters: Counter[str]
    tracer: Callable[[str, Message, Peer], None] | None
    udp_sockets: list[UdpSocket]

    def send(self, message: Message, peer: Peer) -> None: ...

    def send_failed(self, message: Message, peer: Peer, reason: str) -> None: ...


class Dispatcher:
    """See the module docstring."""

    def __init__(
        self,
        core: ProxyCore,
        endpoint: Endpoint,
        *,
        is_ip: Callable[[str], bool],
        probe_prefix: str,
        on_probe: Callable[[Response, Peer], None],
        on_call: Callable[[CallFinished], None],
    ) -> None:
        self.core = core
        self.endpoint = endpoint
        self.is_ip = is_ip
        self.probe_prefix = probe_prefix
        self.on_probe = on_probe
        self.on_call = on_call
        self.timers: TimerWheel[TimerKey] = TimerWheel()
        self.loop: Any = None  # the event loop (uvloop's is not typed as asyncio's)
        self._tick: Any = None  # its handle for the next tick
        self._tick_at = math.inf

    def attach(self, loop: Any) -> None:
        """Start waking for timers on ``loop`` (the daemon's, once running)."""
        self.loop = loop
        self.wake_at(self.timers.next_tick())

    # -- messages in ---------------------------------------------------------------------------
    def on_message(self, message: Request | Response, peer: Peer) -> None:
        """The endpoint's handler: every parsed message."""
        if isinstance(message, Response) and self._answers_probe(message):
            self.on_probe(message, peer)
            return
        self.apply(self.core.on_message(message, peer))

    def _answers_probe(self, response: Response) -> bool:
        """Whether the top Via branch is a ClearIP link's OPTIONS probe (one check per
        response); a malformed Via is the core's to count."""
        try:
            branch = response.top_via.branch
        except SipParseError:
            return False
        return branch is not None and branch.startswith(self.probe_prefix)

    # -- effects out ---------------------------------------------------------------------------
    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.send(effect.message, effect.peer)
            elif isinstance(effect, StartTimer):
                now: float = self.loop.time()
                due = self.timers.start(effect.key, now + effect.delay)
                if due < self._tick_at:
                    self.wake_at(due)
            elif isinstance(effect, CancelTimer):
                self.timers.cancel(effect.key)  # its tick, if it was the next, finds nothing
            elif isinstance(effect, CallFinished):
                self.on_call(effect)

    def send(self, message: Message, peer: Peer) -> None:
        endpoint = self.endpoint
        if peer.transport == "udp" and endpoint.tracer is None and self.is_ip(peer.host):
            want_v6 = ":" in peer.host
            for udp in endpoint.udp_sockets:
                if udp.v6 == want_v6:
                    try:
                        udp.sendto(message.to_bytes(), peer.host, peer.port)
                    except OSError as exc:
                        endpoint.counters["udp_send_error"] += 1
                        log.debug("UDP send to %s failed: %s", peer, exc)
                        endpoint.send_failed(message, peer, "UDP send failed")
                    return
        endpoint.send(message, peer)

    # -- timers --------------------------------------------------------------------------------
    def wake_at(self, when: float | None) -> None:
        """Have the loop call :meth:`on_tick` once ``when`` has passed (None: no timer runs).
        The loop's clock counts milliseconds, so the wake-up is a millisecond later: a timer
        is never handed out early, and a wake-up never finds its tick not yet due."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._tick_at = math.inf
        if when is not None and self.loop is not None:
            self._tick_at = when
            self._tick = self.loop.call_at(when + 0.001, self.on_tick)

    def on_tick(self) -> None:
        """Fire every timer due, one at a time (one may cancel or restart another), then wake
        for the earliest left: timers started meanwhile do not schedule (``_tick_at``)."""
        self._tick, self._tick_at = None, -math.inf
        now: float = self.loop.time()
        timers = self.timers
        try:
            while (key := timers.pop_due(now)) is not None:
                self.apply(self.core.on_timer(key))
        finally:
            self._tick_at = math.inf
            self.wake_at(timers.next_tick())

    def close(self) -> None:
        """Forget every timer and stop waking."""
        self.timers.clear()
        self.wake_at(None)
