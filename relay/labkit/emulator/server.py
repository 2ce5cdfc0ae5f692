"""The emulator's server: a SIP redirect server on the project's own stack.

Every new INVITE gets an INVITE server transaction (:mod:`clearip.relay.sip.transaction`), so
retransmitted INVITEs are answered with the last response, the ACK for a 3xx-6xx is absorbed and,
over UDP, the final response is retransmitted until that ACK arrives. Then the first matching
rule decides: 100 Trying at once (except ``silent`` and ``drop-connection``), then the final
answer, now or after ``delay_ms``. A CANCEL gets 200 and, if the INVITE is still unanswered, a
487 for it. OPTIONS (the proxy's health check) gets 200, other methods 405. Transactions that
never answer (``silent``) are forgotten after 64*T1 + T4, once the sender has given up.

From another asyncio program::

    emulator = await start_emulator(EmulatorConfig(
        rules=load_rules(path),                       # or rules_from_data({...}, "my rules")
        listeners=(ListenerSpec("tls", "127.0.0.1", 0),),
        lab_dir=str(tmp / "lab"),                     # CA for clients: tmp/lab/ca.pem
    ))
    port = emulator.bound["tls"][0]
    ...
    await emulator.close()                            # or: async with emulator: ...

or ``await run_emulator(config, stop=event)`` to run until ``event`` is set (without ``stop``:
until SIGINT/SIGTERM), printing the counters and writing ``stats_file`` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import TextIO

from clearip.relay.labkit.emulator.config import EmulatorConfig
from clearip.relay.labkit.emulator.passport import PassportError, Signer
from clearip.relay.labkit.emulator.responses import build_response, reply, trying
from clearip.relay.labkit.emulator.rules import ACTIONS, Decision, RulesError, RuleSet, Signing
from clearip.relay.labkit.labca import make_lab_certificates
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction import ServerInviteState, ServerInviteTransaction
from clearip.relay.sip.transaction.actions import (
    Action,
    SendMessage,
    StartTimer,
    StopTimer,
    Terminated,
    Timeout,
)
from clearip.relay.sip.transaction.matching import TransactionKey, cancel_target_key, server_key
from clearip.relay.sip.transaction.timers import DEFAULT_TIMERS, TimerSettings
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import ListenerSpec, Peer, response_peer
from clearip.relay.transport.tls import server_context

log = logging.getLogger("clearip.emulator")

_FORGET = "forget"  # our own timer: drop a transaction that will never answer


class _Entry:
    __slots__ = ("decision", "peer", "pending", "timers", "txn")

    def __init__(self, txn: ServerInviteTransaction, peer: Peer, decision: Decision) -> None:
        self.txn = txn
        self.peer = peer  # where responses go
        self.decision = decision
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.pending: asyncio.TimerHandle | None = None  # a delayed answer

    def cancel_timers(self) -> None:
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None


class Emulator:
    """The ClearIP emulator: rules, a signer, an endpoint and the INVITE transactions.

    ``counters``: ``invites`` (new INVITEs), one per action (``route``, ``block``...),
    ``answered_<status>`` per final response sent, ``cancelled``, ``retransmissions``,
    ``acks``, ``ack_timeouts``, ``options``, ``other_methods``.
    """

    def __init__(
        self,
        rules: RuleSet,
        signer: Signer | None = None,
        *,
        timers: TimerSettings = DEFAULT_TIMERS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.rules = rules
        self.signer = signer or signer_for(rules.signing, rules.origin)
        self.timers = timers
        self.counters: Counter[str] = Counter()
        self.endpoint = SipEndpoint(self._on_message, tls_server=tls, counters=Counter())
        self.bound: dict[str, list[int]] = {}
        self._txns: dict[TransactionKey, _Entry] = {}

    @property
    def ports(self) -> dict[str, int]:
        """The first bound port of each transport."""
        return {transport: ports[0] for transport, ports in self.bound.items()}

    async def listen(self, spec: ListenerSpec, tls: ssl.SSLContext | None = None) -> int:
        """Start one listener; returns the bound port (useful with port 0)."""
        if tls is not None:
            self.endpoint.tls_server = tls
        _, port = await self.endpoint.listen(spec)
        self.bound.setdefault(spec.transport, []).append(port)
        log.info("ClearIP emulator listening on %s %s:%d", spec.transport, spec.address, port)
        return port

    def stats(self) -> dict[str, int]:
        return dict(sorted(self.counters.items()))

    def pending(self) -> int:
        """INVITE transactions still alive (answered ones wait for their ACK or timers)."""
        return len(self._txns)

    async def close(self) -> None:
        for entry in self._txns.values():
            entry.cancel_timers()
        self._txns.clear()
        await self.endpoint.close()

    async def __aenter__(self) -> Emulator:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- messages ---------------------------------------------------------------------------
    def _on_message(self, message: Request | Response, peer: Peer) -> None:
        if isinstance(message, Response):
            return  # a redirect server sends no requests, so no response is ours
        try:
            self._request(message, peer)
        except SipParseError as exc:  # a header the parser let through lazily (Via, CSeq...)
            log.info("%s from %s dropped: %s", message.method, peer, exc)

    def _request(self, request: Request, peer: Peer) -> None:
        method = request.method
        if method == "INVITE":
            self._invite(request, peer)
        elif method == "ACK":
            entry = self._txns.get(server_key(request))
            if entry is not None:  # an ACK for a 2xx would be end-to-end; we send none
                self.counters["acks"] += 1
                self._run(entry, entry.txn.on_request(request))
        elif method == "CANCEL":
            self._cancel(request, peer)
        elif method == "OPTIONS":
            self.counters["options"] += 1
            self._reply(request, peer, 200, [("Allow", "INVITE, ACK, CANCEL, OPTIONS")])
        else:
            self.counters["other_methods"] += 1
            self._reply(request, peer, 405, [("Allow", "INVITE, ACK, CANCEL, OPTIONS")])

    def _reply(
        self, request: Request, peer: Peer, status: int, extra: list[tuple[str, str]] | None = None
    ) -> None:
        self.endpoint.send(reply(request, status, extra), response_peer(request, peer))

    def _invite(self, request: Request, peer: Peer) -> None:
        key = server_key(request)
        entry = self._txns.get(key)
        if entry is not None:
            self.counters["retransmissions"] += 1
            self._run(entry, entry.txn.on_request(request))
            return
        decision = self.rules.decide(request, peer.host)
        rule = decision.rule
        self.counters["invites"] += 1
        self.counters[rule.action] += 1
        log.debug(
            "INVITE %s from %s: rule %r -> %s", request.uri_text, peer, rule.name, rule.action
        )
        if rule.action == "drop-connection" and peer.conn is not None:
            conn = self.endpoint.connections.get(peer.conn)
            if conn is not None:
                conn.close()
            return
        txn = ServerInviteTransaction(request, reliable=peer.reliable, timers=self.timers)
        entry = _Entry(txn, response_peer(request, peer), decision)
        self._txns[key] = entry
        if rule.action in ("silent", "drop-connection"):  # drop-connection on UDP: silent
            # Past the sender's Timer B (64*T1), with T4 to spare for its last retransmission.
            self._start(entry, _FORGET, self.timers.timeout + self.timers.t4)
            return
        self._run(entry, txn.send_response(trying(request)))
        if rule.action == "delay":
            loop = asyncio.get_running_loop()
            entry.pending = loop.call_later(rule.delay_ms / 1000, self._answer, key, entry)
            return
        self._answer(key, entry)

    def _answer(self, key: TransactionKey, entry: _Entry) -> None:
        entry.pending = None
        if self._txns.get(key) is not entry or entry.txn.state is not ServerInviteState.PROCEEDING:
            return
        response = build_response(entry.decision, entry.txn.request, self.signer)
        self._final(entry, response)

    def _final(self, entry: _Entry, response: Response) -> None:
        self.counters[f"answered_{response.status}"] += 1
        self._run(entry, entry.txn.send_response(response))

    def _cancel(self, cancel: Request, peer: Peer) -> None:
        entry = self._txns.get(cancel_target_key(cancel))
        if entry is None:
            self._reply(cancel, peer, 481)
            return
        self._reply(cancel, peer, 200)
        if entry.txn.state is ServerInviteState.PROCEEDING:
            self.counters["cancelled"] += 1
            entry.cancel_timers()
            self._final(entry, reply(entry.txn.request, 487))

    # -- transaction actions ----------------------------------------------------------------
    def _run(self, entry: _Entry, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                self.endpoint.send(action.message, entry.peer)
            elif isinstance(action, StartTimer):
                self._start(entry, action.name, action.delay)
            elif isinstance(action, StopTimer):
                handle = entry.timers.pop(action.name, None)
                if handle is not None:
                    handle.cancel()
            elif isinstance(action, Timeout):
                self.counters["ack_timeouts"] += 1
            elif isinstance(action, Terminated):
                self._forget(entry)

    def _start(self, entry: _Entry, name: str, delay: float) -> None:
        old = entry.timers.pop(name, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        entry.timers[name] = loop.call_later(delay, self._fire, entry, name)

    def _fire(self, entry: _Entry, name: str) -> None:
        entry.timers.pop(name, None)
        if name == _FORGET:
            self._forget(entry)
        else:
            self._run(entry, entry.txn.on_timer(name))

    def _forget(self, entry: _Entry) -> None:
        entry.cancel_timers()
        if self._txns.get(entry.txn.key) is entry:
            del self._txns[entry.txn.key]


def signer_for(signing: Signing, origin: str = "rules") -> Signer:
    """The signer ``[signing]`` asks for: its key file, or a fresh P-256 key."""
    if not signing.key_file:
        return Signer.generate(signing.x5u)
    try:
        return Signer.from_pem(Path(signing.key_file).read_bytes(), signing.x5u)
    except OSError as exc:
        problem = f"[signing] key_file {signing.key_file!r}: {exc.strerror or exc}"
    except PassportError as exc:
        problem = f"[signing] key_file {signing.key_file!r}: {exc}"
    raise RulesError(
        origin, problem, 'give a PEM EC P-256 private key, or key_file = "" for a fresh one'
    )


def _tls_context(config: EmulatorConfig) -> ssl.SSLContext | None:
    """The context for TLS listeners without their own certificate (None if there are none)."""
    if not any(s.transport == "tls" and not s.certificate for s in config.listeners):
        return None
    if config.certificate and config.private_key:
        return server_context(config.certificate, config.private_key)
    if config.lab_dir:
        certs = make_lab_certificates(config.lab_dir, config.lab_names)
        log.warning("lab TLS: clients should trust the throw-away CA %s", certs.ca_file)
        return server_context(str(certs.cert_file), str(certs.key_file))
    raise RulesError(
        config.rules.origin,
        "a TLS listener has no certificate",
        "give --certificate and --private-key ([tls] certificate/private_key), "
        "or --lab-tls DIR ([tls] lab_dir) for a throw-away CA",
    )


async def start_emulator(config: EmulatorConfig) -> Emulator:
    """An emulator listening on every listener of ``config`` (see the module docstring)."""
    if not config.listeners:
        raise RulesError(
            config.rules.origin, "no listeners", "give --udp/--tcp/--tls HOST:PORT or [[listen]]"
        )
    emulator = Emulator(config.rules, timers=config.timers, tls=_tls_context(config))
    try:
        for spec in config.listeners:
            await emulator.listen(spec)
    except BaseException:
        await emulator.close()
        raise
    if config.public_key_out:
        Path(config.public_key_out).write_bytes(emulator.signer.public_pem())
    if config.ready_file:
        _write_json(config.ready_file, emulator.bound)
    return emulator


def _write_json(path: str, data: object) -> None:
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(data))
    partial.replace(target)  # readers never see half a file


def print_counters(stats: dict[str, int], out: TextIO | None = None) -> None:
    """The counters as a small table: INVITEs, each action, then everything else."""
    out = out or sys.stdout
    rows = [("INVITEs", stats.get("invites", 0))]
    rows += [(f"  {action}", stats.get(action, 0)) for action in ACTIONS]
    rows += [(name, n) for name, n in stats.items() if name != "invites" and name not in ACTIONS]
    width = max(len(name) for name, _ in rows)
    print("ClearIP emulator counters", file=out)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>8}", file=out)
    out.flush()


async def run_emulator(config: EmulatorConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or, without one, SIGINT/SIGTERM), then report and close."""
    emulator = await start_emulator(config)
    loop = asyncio.get_running_loop()
    own_signals = stop is None
    stop = stop or asyncio.Event()
    if own_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if own_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        stats = emulator.stats()
        await emulator.close()
        if config.print_stats:
            print_counters(stats)
        if config.stats_file:
            _write_json(config.stats_file, stats)
