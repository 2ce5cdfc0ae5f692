"""Copies of the messages the endpoint sends and receives: live traces and HEP export.

Rules: the endpoint calls one tracer, installed only while someone consumes it (a live trace
subscriber or a HEP exporter), so with neither a message costs nothing extra; a trace record is
made once per message whatever the number of subscribers; a slow subscriber loses records
(counted on it), it never slows the relay.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from clearip.relay.config import HepConfig
from clearip.relay.service.hep_export import HepExporter
from clearip.relay.service.trace import Subscriber
from clearip.relay.service.trace import record as trace_record
from clearip.relay.sip.message import Message
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import Peer


class MessageTaps:
    """The endpoint's tracer and who consumes it."""

    def __init__(self, endpoint: SipEndpoint) -> None:
        self.endpoint = endpoint
        self.subscribers: list[Subscriber] = []
        self.hep: HepExporter | None = None

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Start tracing for one client; the returned function stops it."""
        self.subscribers.append(subscriber)
        self._update()

        def unsubscribe() -> None:
            if subscriber in self.subscribers:
                self.subscribers.remove(subscriber)
            self._update()

        return unsubscribe

    def start_hep(self, config: HepConfig, counters: Counter[str]) -> None:
        """Start (or, after a reload, replace or stop) the HEP exporter for ``[hep]``."""
        if self.hep is not None:
            self.hep.stop()
            self.hep = None
        if config.address:
            self.hep = HepExporter(config, counters)
            self.hep.start()
        self._update()

    async def close(self) -> None:
        if self.hep is not None:
            await self.hep.close()

    def _update(self) -> None:
        wanted = bool(self.subscribers) or self.hep is not None
        self.endpoint.tracer = self._trace if wanted else None

    def _trace(self, direction: str, message: Message, peer: Peer) -> None:
        local = self.endpoint.local_address(peer)
        if self.hep is not None:
            self.hep.offer(direction, message, peer.transport, local, (peer.host, peer.port))
        item = None
        for subscriber in self.subscribers:
            if not subscriber.wants(message):
                continue
            if item is None:
                item = trace_record(
                    direction, message, peer.transport, local, (peer.host, peer.port)
                )
            try:
                subscriber.queue.put_nowait(item)
            except asyncio.QueueFull:
                subscriber.lost += 1
