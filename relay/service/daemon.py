"""The daemon: wires the sans-IO proxy core to sockets, timers, ClearIP links and signals.

Everything that decides lives in :mod:`clearip.relay.proxy`; this module only performs the
effects the core returns (send, start/cancel timers, log a call) and feeds it events.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clearip.relay.config import ConfigError, ProxyConfig
from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.sources import PolicyError, SourcePolicy
from clearip.relay.policy.trust import Role, TrustError, TrustList
from clearip.relay.proxy.core import ProxyCore
from clearip.relay.proxy.effects import CallFinished
from clearip.relay.proxy.routing import Locality
from clearip.relay.service.control import ControlServer, serve_worker_commands
from clearip.relay.service.dispatch import Dispatcher
from clearip.relay.service.gc_tuning import run_policy, start_policy
from clearip.relay.service.hep_export import HepExporter
from clearip.relay.service.kernel_filter import start_kernel_filter
from clearip.relay.service.locality import learn_locality
from clearip.relay.service.logs import apply_logging, calls_log, log_call
from clearip.relay.service.metrics import MetricsServer, registry_for
from clearip.relay.service.reload import log_changes, read_reload
from clearip.relay.service.sdnotify import Notifier, watchdog, watchdog_interval
from clearip.relay.service.taps import MessageTaps
from clearip.relay.service.trace import Subscriber
from clearip.relay.service.upstream import PROBE_PREFIX, UpstreamLink
from clearip.relay.service.worker_role import WorkerRole
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.parser import Limits
from clearip.relay.transport.addresses import is_ip
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import LocalAddress, Peer
from clearip.relay.transport.tls import ClientTls

log = logging.getLogger("clearip.daemon")
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


class Daemon:
    def __init__(
        self,
        config: ProxyConfig,
        trust: TrustList | None = None,
        *,
        config_path: str | Path | None = None,
        role: WorkerRole | None = None,
        workers: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        # A worker of a supervisor (issue #16): SO_REUSEPORT listeners joined to the kernel's
        # Call-ID steering, a private control socket, and no kernel filter, metrics or
        # sd_notify (the supervisor has those). None: the relay is this one process.
        self.role = role
        # Shown in status when workers were configured but this process runs alone (degraded).
        self.workers = workers
        # Where ``config`` came from: a reload re-reads it (without one, only the trust list).
        self.config_path = Path(config_path) if config_path is not None else None
        if trust is None:
            self.policy = SourcePolicy.load(
                config.trust_file, config.emergency_numbers, config.state_dir
            )
        else:
            self.policy = SourcePolicy(
                trust, config.trust_file, EmergencyNumbers(config.emergency_numbers)
            )
        self.trust = self.policy.trust
        self.control: ControlServer | None = None
        self.counters: Counter[str] = Counter()
        self.started = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()
        # Called with each call's summary (the demo and tests listen here).
        self.call_listeners: list[Callable[[dict[str, Any]], None]] = []
        # Each upstream trusts its own CA, carriers reached by TLS Contacts [tls] peers_ca_file.
        # The contexts are made now, so a bad CA file stops the start, not the first call.
        tls = ClientTls(config.tls.peers_ca_file, config.tls.peers_verify)
        tls.upstream(config.outbound)
        tls.upstream(config.inbound)
        tls.peers()
        # The worker's place among its siblings: SO_REUSEPORT, steering, stream hand-off.
        placement: dict[str, Any] = {"worker": role} if role is not None else {}
        self.endpoint = SipEndpoint(
            self._on_message,  # until the dispatcher below exists
            counters=self.counters,
            is_trusted=self._is_trusted,
            on_send_error=self._on_send_error,
            on_connection_lost=self._on_connection_lost,
            limits=Limits(max_message_size=config.max_message_size),
            max_connections=config.max_connections,
            max_connections_per_source=config.max_connections_per_source,
            tls_client=tls,
            **placement,
        )
        # Copies of every message for live traces and HEP ([hep]: started by start()).
        self.taps = MessageTaps(self.endpoint)
        self.links: dict[Role, UpstreamLink] = {}
        outbound = UpstreamLink(
            "outbound", config.outbound, self.endpoint, lambda: self._upstream_down(Role.SWITCH)
        )
        self.links[Role.SWITCH] = outbound
        if config.inbound == config.outbound:
            self.links[Role.PROVIDER] = outbound
        else:
            self.links[Role.PROVIDER] = UpstreamLink(
                "inbound",
                config.inbound,
                self.endpoint,
                lambda: self._upstream_down(Role.PROVIDER),
            )
        self.locality = Locality(hosts=set(), ports=set())
        self.metrics: MetricsServer | None = None
        self.notifier = Notifier() if role is None else Notifier("")
        self._watchdog: asyncio.Task[None] | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self.kernel_status: Callable[[], dict[str, Any] | None] = self.policy.kernel_status
        self.core = ProxyCore(
            config,
            role_of=self.trust.role_of,
            emergency=lambda: self.policy.emergency,
            locality=self.locality,
            local_for=self._local_for,
            upstream=self._upstream_peer,
            clock=time.monotonic,
            counters=self.counters,
            queue_delay=lambda: self.endpoint.queue_delay,
        )
        # The one interpreter of the core's effects, with the core's timers (compiled).
        self.dispatch = Dispatcher(
            self.core,
            self.endpoint,
            is_ip=is_ip,
            probe_prefix=PROBE_PREFIX,
            on_probe=self._probe_answered,
            on_call=self._call_finished,
        )
        self.endpoint.handler = self.dispatch.on_message

    # -- wiring --------------------------------------------------------------------------------
    def _is_trusted(self, host: str) -> bool:
        if self.trust.role_of(host) is not None:
            return True
        return any(link.sends_from(host) for link in self.links.values())

    def _local_for(self, peer: Peer, *, record_route: bool = False) -> LocalAddress:
        return self.endpoint.local_for(
            peer.transport, peer.host, peer.conn, record_route=record_route
        )

    def _upstream_peer(self, role: Role) -> Peer | None:
        link = self.links[role]
        peer = link.peer
        if peer is None:
            link.kick()  # a call needs ClearIP: try to reconnect now rather than after back-off
        return peer

    def _on_message(self, message: Request | Response, peer: Peer) -> None:
        self.dispatch.on_message(message, peer)

    def _probe_answered(self, response: Response, peer: Peer) -> None:
        """A response to a UDP link's OPTIONS probe: the link's business, not the core's."""
        if not any(link.probe_answered(response, peer) for link in set(self.links.values())):
            self.counters["stray_response"] += 1

    def _on_send_error(self, message: Message, peer: Peer, reason: str) -> None:
        self.dispatch.apply(self.core.on_send_error(message, peer, reason))

    def _on_connection_lost(self, peer: Peer) -> None:
        for link in set(self.links.values()):
            link.connection_lost(peer)

    def _upstream_down(self, role: Role) -> None:
        effects = self.core.on_upstream_down(role)
        if self.links[Role.SWITCH] is self.links[Role.PROVIDER]:
            other = Role.PROVIDER if role is Role.SWITCH else Role.SWITCH
            effects += self.core.on_upstream_down(other)
        self.dispatch.apply(effects)

    def _call_finished(self, effect: CallFinished) -> None:
        if self.call_listeners or calls_log.isEnabledFor(logging.INFO):
            summary = effect.summary()
            for listener in self.call_listeners:
                listener(summary)
            log_call(summary, self.config.log_format)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.dispatch.attach(self.loop)
        self.taps.start_hep(self.config.hep, self.counters)
        for spec in self.config.listeners:
            try:
                host, port = await self.endpoint.listen(spec)
            except OSError as exc:
                if spec.address == "::" and exc.errno in _NO_IPV6:
                    log.warning(
                        "no IPv6 on this host: skipping %s [::]:%d", spec.transport, spec.port
                    )
                    continue
                raise OSError(
                    exc.errno,
                    f"cannot listen on {spec.transport} {spec.address}:{spec.port}: "
                    f"{exc.strerror} (check [[listen]] in the config)",
                ) from None
            log.info("listening on %s %s:%d", spec.transport, host, port)
        learn_locality(self.locality, self.endpoint.locals, self.config.listeners)
        for link in set(self.links.values()):
            link.start()
        for link in set(self.links.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.attempted.wait(), 10)
        await self._start_kernel_filter()
        # Over UDP, ClearIP's answers come back to the SIP port: let them through the kernel
        # filter without putting ClearIP in the trust list.
        self.policy.set_upstreams(
            {a for link in set(self.links.values()) for a in link.addresses}
            | {link.peer.host for link in self.links.values() if link.peer is not None}
        )
        control_path = self.config.control_socket if self.role is None else self.role.control_path()
        if control_path:
            self.control = ControlServer(
                control_path,
                self.policy,
                self.status,
                self.stats,
                subscribe=self.subscribe_trace,
                reload=self.reload_config,
            )
            if self.role is not None:
                serve_worker_commands(self.control, self.policy, self.export_snapshot)
            try:
                await self.control.start()
            except OSError as exc:
                log.error("control socket %s unavailable: %s", control_path, exc)
                self.control = None
        if self.config.metrics_enabled and self.role is None:
            self.metrics = MetricsServer(registry_for(self.snapshot))
            port = await self.metrics.start(self.config.metrics_address, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_address, port)
        self.notifier.ready(self.one_line_status())
        interval = watchdog_interval() if self.role is None else None
        if interval is not None:
            self._watchdog = asyncio.create_task(
                watchdog(self.notifier, interval, self.one_line_status)
            )

    async def _start_kernel_filter(self) -> None:
        if self.role is not None:
            self.policy.attach_kernel(None, "the supervisor's (see clearipctl status)")
            return
        await start_kernel_filter(self.config, self.policy)

    def reload(self) -> None:
        """SIGHUP: :meth:`reload_config`; a refusal is logged and changes nothing."""
        with contextlib.suppress(ConfigError, TrustError, PolicyError):
            self.reload_config()

    def reload_config(self) -> dict[str, Any]:
        """Re-read the config file and the trust list, and apply every setting that needs no
        new socket (see :mod:`clearip.relay.service.reload`), all or nothing; calls being set up
        keep the config they started with. Returns the report ``clearip-proxy reload`` prints; a
        bad file or a kernel refusal is logged and raised, and every running setting is kept.
        """
        before = [(e.cidr, e.role, e.note) for e in self.trust]
        plan = read_reload(self.config, self.config_path, self.policy)
        # Nothing below can fail: one synchronous step on the event loop, so no message is
        # handled with half the new settings.
        config = plan.config
        self.config = config
        self.core.use_config(config)
        self.endpoint.set_limits(
            max_message_size=config.max_message_size,
            max_connections=config.max_connections,
            max_connections_per_source=config.max_connections_per_source,
        )
        if plan.changes("log"):
            apply_logging(config.log_level, config.log_format)
        if plan.changes("hep"):
            self.taps.start_hep(self.config.hep, self.counters)
        trust_after = [(e.cidr, e.role, e.note) for e in self.trust]
        live = log_changes(plan, before, trust_after)
        return {
            "config": str(self.config_path) if self.config_path is not None else None,
            "live": [c.as_dict() for c in live],
            "restart": [c.as_dict() for c in plan.restart],
        }

    def status(self) -> dict[str, Any]:
        status = {
            "uptime_s": round(time.time() - self.started, 1),
            "listeners": [f"{a.transport}:{a.hostport()}" for a in self.endpoint.locals],
            "upstreams": {role.value: link.status() for role, link in self.links.items()},
            "active_calls": self.core.active_calls,
            "active_transactions": self.core.active_transactions,
            "connections": len(self.endpoint.connections),
            "trust_entries": len(self.trust),
            "kernel_filter": self.policy.describe_kernel(),
            "emergency_numbers": self.policy.emergency.numbers(),
        }
        if self.workers is not None:
            status["workers"] = self.workers
        if self.role is not None:
            status["worker"] = {"index": self.role.index, "count": self.role.count}
        return status

    def subscribe_trace(self, subscriber: Subscriber) -> Callable[[], None]:
        """Start tracing for one client; the returned function stops it."""
        return self.taps.subscribe(subscriber)

    @property
    def hep(self) -> HepExporter | None:
        """The running HEP exporter (``[hep]``), if any."""
        return self.taps.hep

    def stats(self) -> dict[str, Any]:
        return {"relay": dict(sorted(self.counters.items())), "kernel": self.policy.kernel_status()}

    def snapshot(self) -> dict[str, Any]:
        """Everything the metrics collector reads, taken on the event loop."""
        return {
            "counters": self.counters,
            "latency": self.core.latency,
            "active_calls": self.core.active_calls,
            "active_transactions": self.core.active_transactions,
            "connections": len(self.endpoint.connections),
            "trust_entries": len(self.trust),
            "upstreams": {role.value: link.status() for role, link in self.links.items()},
            "kernel": self.kernel_status(),
        }

    def export_snapshot(self) -> dict[str, Any]:
        """:meth:`snapshot` as JSON, for the supervisor (the ``snapshot`` control command),
        with the upstreams' addresses, which the supervisor's kernel filter lets in."""
        state = self.snapshot()
        state["counters"] = dict(state["counters"])
        state["latency"] = state["latency"].as_dict()
        state["upstream_addresses"] = sorted(
            {a for link in set(self.links.values()) for a in link.addresses}
            | {link.peer.host for link in self.links.values() if link.peer is not None}
        )
        return state

    def one_line_status(self) -> str:
        ups = ", ".join(f"ClearIP {role.value} {link.state}" for role, link in self.links.items())
        return f"{ups}; {self.core.active_calls} calls in setup; {len(self.trust)} trusted sources"

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """The daemon process: start, then serve until SIGTERM/SIGINT (owns the interpreter, so
        it also sets the garbage-collector policy, see :mod:`gc_tuning`). ``on_ready`` is
        called once serving (a worker tells its supervisor)."""
        await self.start()
        start_policy()
        self._gc_task = asyncio.create_task(run_policy(self.counters))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.role is None:
            log.info("clearip-proxy ready")
        else:
            log.info("worker %d of %d ready", self.role.index, self.role.count)
        if on_ready is not None:
            on_ready()
        await self._stopping.wait()
        await self.close()

    async def close(self) -> None:
        self.notifier.stopping()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._gc_task is not None:
            self._gc_task.cancel()
        if self.metrics is not None:
            await self.metrics.close()
        if self.control is not None:
            await self.control.close()
        self.policy.release_kernel()
        self.dispatch.close()
        for link in set(self.links.values()):
            await link.close()
        await self.endpoint.close()
        await self.taps.close()
