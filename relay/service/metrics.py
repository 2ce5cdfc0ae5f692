"""Prometheus metrics, read from the daemon's counters at scrape time.

Nothing is updated per message for metrics' sake: the relay already counts into plain
``Counter`` objects, and a collector turns them into Prometheus families when scraped. The
HTTP endpoint is served from the event loop itself, so a scrape sees a consistent snapshot
(no thread reads while the loop writes). Names are prefixed ``clearip_``, counters end in
``_total``, times are in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from clearip.relay.proxy.latency import LatencyHistogram
from clearip.relay.service.counters import COUNTERS, spec_for


class RelayCollector(Collector):
    """Turns the daemon's live state into metric families on each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        state = self.snapshot()
        counters: Counter[str] = state["counters"]
        yield from counter_families(counters)
        histogram: LatencyHistogram = state["latency"]
        yield HistogramMetricFamily(
            "clearip_upstream_response_seconds",
            "Time from relaying an INVITE to ClearIP until its final response",
            buckets=histogram.buckets(),
            sum_value=histogram.total,
        )
        for name, text in (
            ("active_calls", "Calls being set up"),
            ("active_transactions", "Live SIP transactions"),
            ("connections", "Open TCP/TLS connections"),
            ("trust_entries", "Entries in the trust list"),
        ):
            yield GaugeMetricFamily(f"clearip_{name}", text, value=state[name])
        up = GaugeMetricFamily(
            "clearip_upstream_up",
            "1 while the ClearIP connection is up",
            labels=["upstream", "uri"],
        )
        for upstream, status in state["upstreams"].items():
            up.add_metric([upstream, status["uri"]], 1.0 if status["state"] == "up" else 0.0)
        yield up
        yield from _kernel_families(state.get("kernel"))
        if "per_worker" in state:
            yield from _worker_families(state)


def _worker_families(state: dict[str, Any]) -> Iterable[Metric]:
    """The supervisor's view: one series per worker (label ``worker``) next to the sums
    above, which stay unlabelled so that existing queries and alerts keep their meaning."""
    workers = state.get("workers", {})
    yield GaugeMetricFamily(
        "clearip_workers_configured", "Worker processes configured", value=workers["configured"]
    )
    yield GaugeMetricFamily(
        "clearip_workers_running", "Worker processes up and serving", value=workers["running"]
    )
    up = GaugeMetricFamily("clearip_worker_up", "1 while the worker serves", labels=["worker"])
    restarts = CounterMetricFamily(
        "clearip_worker_restarts", "Times the supervisor restarted the worker", labels=["worker"]
    )
    calls = CounterMetricFamily(
        "clearip_worker_calls",
        "INVITEs finished by each worker since it started, by role and final status",
        labels=["worker", "role", "status"],
    )
    active = GaugeMetricFamily(
        "clearip_worker_active_calls", "Calls being set up, by worker", labels=["worker"]
    )
    transactions = GaugeMetricFamily(
        "clearip_worker_active_transactions", "Live SIP transactions, by worker", labels=["worker"]
    )
    for index, view in sorted(state["per_worker"].items(), key=lambda item: int(item[0])):
        worker = str(index)
        up.add_metric([worker], 1.0 if view.get("up") else 0.0)
        restarts.add_metric([worker], view.get("restarts", 0))
        by_status: Counter[tuple[str, str]] = Counter()  # summed over the reason label
        for key, value in (view.get("counters") or {}).items():
            if key.startswith("call:"):
                role, status = [*key.split(":", 3)[1:], ""][:2]
                by_status[role, status] += value
        for (role, status), value in sorted(by_status.items()):
            calls.add_metric([worker, role, status], value)
        active.add_metric([worker], view.get("active_calls", 0))
        transactions.add_metric([worker], view.get("active_transactions", 0))
    yield from (up, restarts, calls, active, transactions)
    steering = CounterMetricFamily(
        "clearip_steering_datagrams",
        "Datagrams the kernel's Call-ID steering program handled, by listener and outcome",
        labels=["listener", "outcome"],
    )
    for listener, counters in (state.get("steering") or {}).items():
        for outcome, value in counters.items():
            steering.add_metric([listener, outcome], value)
    yield steering


def counter_families(counters: Counter[str]) -> Iterator[Metric]:
    """Every declared counter (relay/service/counters.py), zero until it counts; a family's missing
    trailing label values (an older key) read as ""."""
    families = {
        spec.key: CounterMetricFamily(spec.metric, spec.help, labels=list(spec.labels) or None)
        for spec in COUNTERS
    }
    for spec in COUNTERS:
        if not spec.labels:
            families[spec.key].add_metric([], counters.get(spec.key, 0))
    for key, value in counters.items():
        found = spec_for(key)
        if found is None or not found[0].labels:
            continue
        spec, values = found
        padded = list(values) + [""] * (len(spec.labels) - len(values))
        families[spec.key].add_metric(padded, value)
    yield from families.values()


def _kernel_families(kernel: dict[str, Any] | None) -> Iterable[Metric]:
    attached = GaugeMetricFamily(
        "clearip_xdp_attached",
        "1 per interface where the XDP filter is attached, by mode",
        labels=["interface", "mode"],
    )
    packets = CounterMetricFamily(
        "clearip_xdp_packets", "Packets seen by the XDP filter, by outcome", labels=["outcome"]
    )
    if kernel:
        for iface, status in kernel.get("interfaces", {}).items():
            attached.add_metric(
                [iface, str(status.get("mode", ""))], 1.0 if status.get("attached") else 0.0
            )
        for outcome, value in kernel.get("counters", {}).items():
            packets.add_metric([outcome], value)
    per_interface = CounterMetricFamily(
        "clearip_xdp_interface_packets",
        "Packets seen by the XDP filter, by receiving interface and outcome",
        labels=["interface", "outcome"],
    )
    if kernel:
        for iface, counts in kernel.get("per_interface", {}).items():
            for outcome, value in counts.items():
                per_interface.add_metric([iface, outcome], value)
    yield attached
    yield packets
    yield per_interface


def registry_for(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(snapshot))
    return registry


class MetricsServer:
    """A minimal HTTP/1.0 server on the event loop answering ``GET /metrics``.

    ``before_scrape`` runs (awaited) before each scrape: the supervisor gathers its workers'
    snapshots there, and its collector reads what was gathered."""

    def __init__(
        self,
        registry: CollectorRegistry,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.before_scrape = before_scrape
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                if self.before_scrape is not None:
                    await self.before_scrape()
                body = generate_latest(self.registry)
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body = b"see /metrics\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
