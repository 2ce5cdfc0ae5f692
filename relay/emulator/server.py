"""The emulator's server: a SIP redirect server on the project's own stack.

Every INVITE gets an INVITE server transaction (retransmissions, the ACK for its final, and
CANCEL are handled the RFC 3261 way), then the first matching rule decides the answer. OPTIONS
(the proxy's health check) is answered 200; other methods 405.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from pathlib import Path

from clearip.relay.emulator.passport import Signer
from clearip.relay.emulator.responses import build_response
from clearip.relay.emulator.rules import Rule, RuleSet
from clearip.relay.proxy.replies import make_reply
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction import ServerInviteTransaction
from clearip.relay.sip.transaction.actions import (
    Action,
    SendMessage,
    StartTimer,
    StopTimer,
    Terminated,
)
from clearip.relay.sip.transaction.matching import TransactionKey, cancel_target_key, server_key
from clearip.relay.transport.endpoint import SipEndpoint, response_peer
from clearip.relay.transport.peer import ListenerSpec, Peer
from clearip.relay.transport.tls import server_context

log = logging.getLogger("clearip.emulator")


class Emulator:
    def __init__(self, rules: RuleSet, signer: Signer | None = None) -> None:
        self.rules = rules
        self.signer = signer or _signer_for(rules)
        self.counters: Counter[str] = Counter()
        self.endpoint = SipEndpoint(self._on_message, counters=Counter())
        self._txns: dict[TransactionKey, tuple[ServerInviteTransaction, Peer]] = {}
        self._timers: dict[tuple[TransactionKey, str], asyncio.TimerHandle] = {}
        self._delayed: dict[TransactionKey, asyncio.TimerHandle] = {}
        self.ports: dict[str, int] = {}

    async def listen(self, spec: ListenerSpec, tls: ssl.SSLContext | None = None) -> int:
        if spec.transport == "tls" and tls is not None:
            self.endpoint.tls_server = tls
        _, port = await self.endpoint.listen(spec)
        self.ports[spec.transport] = port
        return port

    # -- messages ----------------------------------------------------------------------------
    def _on_message(self, message: Request | Response, peer: Peer) -> None:
        if isinstance(message, Response):
            return
        method = message.method
        if method == "INVITE":
            self._invite(message, peer)
        elif method == "ACK":
            entry = self._txns.get(server_key(message))
            if entry is not None:
                self._run(entry[0], entry[0].on_request(message), entry[1])
        elif method == "CANCEL":
            self._cancel(message, peer)
        elif method == "OPTIONS":
            self.endpoint.send(make_reply(message, 200, "OK"), response_peer(message, peer))
        else:
            reply = make_reply(message, 405, "Method Not Allowed", extra=[("Allow", "INVITE")])
            self.endpoint.send(reply, response_peer(message, peer))

    def _invite(self, request: Request, peer: Peer) -> None:
        try:
            key = server_key(request)
        except SipParseError:
            return
        existing = self._txns.get(key)
        if existing is not None:
            self._run(existing[0], existing[0].on_request(request), existing[1])
            return
        self.counters["invites"] += 1
        rule = self.rules.decide(request, peer.host)
        self.counters[rule.action] += 1
        txn = ServerInviteTransaction(request, reliable=peer.reliable)
        reply_peer = response_peer(request, peer)
        self._txns[key] = (txn, reply_peer)
        log.debug(
            "INVITE %s from %s: rule %r -> %s", request.uri_text, peer, rule.name, rule.action
        )
        if rule.action == "silent":
            return
        if rule.action == "drop-connection":
            conn = self.endpoint.connections.get(peer.conn or -1)
            if conn is not None:
                conn.close()
            return
        self._run(
            txn, txn.send_response(make_reply(request, 100, "Trying", add_to_tag=False)), reply_peer
        )
        if rule.action == "delay":
            loop = asyncio.get_running_loop()
            self._delayed[key] = loop.call_later(rule.delay_ms / 1000, self._answer, key, rule)
            return
        self._answer(key, rule)

    def _answer(self, key: TransactionKey, rule: Rule) -> None:
        self._delayed.pop(key, None)
        entry = self._txns.get(key)
        if entry is None:
            return
        txn, reply_peer = entry
        response = build_response(rule, txn.request, self.signer)
        self.counters[f"answered_{response.status}"] += 1
        self._run(txn, txn.send_response(response), reply_peer)

    def _cancel(self, cancel: Request, peer: Peer) -> None:
        key = cancel_target_key(cancel)
        entry = self._txns.get(key)
        reply_peer = response_peer(cancel, peer)
        if entry is None:
            self.endpoint.send(
                make_reply(cancel, 481, "Call/Transaction Does Not Exist"), reply_peer
            )
            return
        self.endpoint.send(make_reply(cancel, 200, "OK"), reply_peer)
        txn, invite_peer = entry
        if txn.state.name == "PROCEEDING":
            handle = self._delayed.pop(key, None)
            if handle is not None:
                handle.cancel()
            self.counters["cancelled"] += 1
            terminated = make_reply(txn.request, 487, "Request Terminated")
            self._run(txn, txn.send_response(terminated), invite_peer)

    # -- transaction actions -----------------------------------------------------------------
    def _run(self, txn: ServerInviteTransaction, actions: list[Action], peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        for action in actions:
            if isinstance(action, SendMessage):
                self.endpoint.send(action.message, peer)
            elif isinstance(action, StartTimer):
                old = self._timers.pop((txn.key, action.name), None)
                if old is not None:
                    old.cancel()
                self._timers[(txn.key, action.name)] = loop.call_later(
                    action.delay, self._fire, txn, action.name, peer
                )
            elif isinstance(action, StopTimer):
                handle = self._timers.pop((txn.key, action.name), None)
                if handle is not None:
                    handle.cancel()
            elif isinstance(action, Terminated):
                self._txns.pop(txn.key, None)
                for name in "GHIL":
                    handle = self._timers.pop((txn.key, name), None)
                    if handle is not None:
                        handle.cancel()

    def _fire(self, txn: ServerInviteTransaction, name: str, peer: Peer) -> None:
        self._timers.pop((txn.key, name), None)
        self._run(txn, txn.on_timer(name), peer)

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    async def close(self) -> None:
        for handle in [*self._timers.values(), *self._delayed.values()]:
            handle.cancel()
        self._timers.clear()
        self._delayed.clear()
        await self.endpoint.close()


def _signer_for(rules: RuleSet) -> Signer:
    if rules.signing.key_file:
        return Signer.from_pem(Path(rules.signing.key_file).read_bytes(), rules.signing.x5u)
    return Signer.generate(rules.signing.x5u)


def tls_context(certificate: str, private_key: str) -> ssl.SSLContext:
    return server_context(certificate, private_key)
