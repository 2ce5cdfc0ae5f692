"""The proxy core: every message and event in, a list of effects out. No I/O, no clock.

Theory of operation
-------------------
``on_message`` classifies what arrived and hands it to the module whose concept it is:

1. Responses: to one of our client transactions (ClearIP leg or a destination branch) → that
   transaction, then the call (:mod:`clearip_leg`, :mod:`branches`); otherwise
   :mod:`stateless`: an answer to an in-dialog request we forwarded goes on by its Via, an
   answer to an INVITE of a call this process lost still gives the switch a final, anything
   else is a stray, dropped and counted.
2. Requests but ACK and CANCEL are checked first (:mod:`admission`: 400 when malformed).
3. Requests with a To tag (in dialog), and ACKs for 2xx: loose-routed statelessly by their
   Route headers (:mod:`stateless`).
4. CANCEL: answered 200 at once; cancels the pending INVITE (:mod:`cancel`).
5. ACK for a non-2xx final we sent: absorbed by the INVITE server transaction.
6. A new INVITE: admission, emergency bypass, then the ClearIP leg (:mod:`invite`).
7. Other out-of-dialog requests: OPTIONS answered 200 (503 while ClearIP is unreachable, so
   switches can route around us), the rest 405 with ``Allow`` (:mod:`replies`).

``on_timer`` does the same for timers (:mod:`timerkeys`): a transaction's timer goes to the
transaction, a call's to the module that started it, a reap forgets a client transaction of a
finished call that never got its final. :meth:`ProxyCore.on_call_event` is the wiring the
other way: what a call's client transaction delivers goes to its ClearIP leg or its branch.

Transactions (RFC 3261 §17) do retransmissions and hop-by-hop ACKs; their actions are
translated into effects in one place (:mod:`state`). A call changes phase only through the
checked table of :mod:`call`.

Promise: every INVITE from a trusted source gets a final response — relayed, or our own 503
(fail-open) when ClearIP is slow or unreachable, or when anything unexpected happens.
"""

from __future__ import annotations

from typing import Final

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.admission import malformed
from clearip.relay.proxy.branches import branch_failed, on_branch_response, provider_silent, timer_c
from clearip.relay.proxy.call import Phase, ProxyCall
from clearip.relay.proxy.cancel import cancel_guard_expired, on_cancel
from clearip.relay.proxy.clearip_leg import (
    clearip_failed,
    clearip_timeout,
    fail_open,
    on_clearip_response,
)
from clearip.relay.proxy.effects import Effect
from clearip.relay.proxy.invite import on_invite
from clearip.relay.proxy.replies import method_not_allowed, options_reply, reply_stateless
from clearip.relay.proxy.state import AWAITING_FINAL, CoreState
from clearip.relay.proxy.stateless import route_in_dialog, route_response
from clearip.relay.proxy.timerkeys import (
    CANCEL_GUARD,
    PROVIDER,
    TIMER_C,
    UPSTREAM,
    CallTimerKey,
    TimerKey,
    TxTimerKey,
)
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.peer import Peer
from clearip.relay.sip.transaction import ServerInviteState
from clearip.relay.sip.transaction.actions import Action, DeliverResponse, Timeout, TransportError
from clearip.relay.sip.transaction.matching import (
    TransactionKey,
    client_key,
    client_key_for,
    server_key,
)

# States in which an INVITE server transaction absorbs the ACK of its 300-699.
_ACK_ABSORBED: Final = (ServerInviteState.COMPLETED, ServerInviteState.CONFIRMED)
# Enum members as constants: reading one from its class costs ~0.1 us (EnumType lookups).
_CLEARIP: Final = Phase.CLEARIP
_DONE: Final = Phase.DONE
_SWITCH: Final = Role.SWITCH


class ProxyCore(CoreState):
    """See the module docstring. Made with ``CoreState``'s arguments: ``ProxyCore(config, *,
    role_of, emergency, locality, local_for, upstream, clock, counters=None,
    queue_delay=lambda: 0.0)``."""

    def use_config(self, config: ProxyConfig) -> None:
        """A reloaded config: new INVITEs and the proxy-wide checks use it from now on; calls
        already being set up keep the one they started with (``ProxyCall.config``)."""
        self.config = config
        self.limiter.set_rate(config.invite_rate_per_source)

    # ------------------------------------------------------------------------------------
    # Introspection
    @property
    def active_transactions(self) -> int:
        return len(self.client_txns) + len(self.server_txns)

    @property
    def active_calls(self) -> int:
        return len(self.calls)

    # ------------------------------------------------------------------------------------
    # Entry points
    def on_message(self, message: Request | Response, peer: Peer) -> list[Effect]:
        if isinstance(message, Response):
            return self._on_response(message, peer)
        return self._on_request(message, peer)

    def on_timer(self, key: TimerKey) -> list[Effect]:
        if isinstance(key, TxTimerKey):
            txn_key = key.txn
            entry = self.client_txns.get(txn_key)
            if entry is not None:
                txn, peer, call = entry
                return self.client_effects(txn_key, txn.on_timer(key.name), peer, call)
            server = self.server_txns.get(txn_key)
            if server is not None:
                stxn, speer = server
                return self.server_effects(txn_key, stxn.on_timer(key.name), speer)
            return []
        if isinstance(key, CallTimerKey):
            call = self.calls.get(key.call_id)
            if call is None or call.phase is _DONE:
                return []
            what = key.what
            if what == UPSTREAM:
                return clearip_timeout(self, call)
            if what == PROVIDER:
                return provider_silent(self, call, key.index)
            if what == TIMER_C:
                return timer_c(self, call, key.index)
            if what == CANCEL_GUARD:
                return cancel_guard_expired(self, call)
            return []
        # A client transaction of a finished call that never got a final (a destination
        # that rang and then ignored our CANCEL): forget it.
        reaped = self.client_txns.get(key.txn)
        if reaped is not None and reaped[0].state in AWAITING_FINAL:
            self.client_txns.pop(key.txn, None)
            self.counters["transaction_reaped"] += 1
        return []

    def on_send_error(self, message: Message, peer: Peer, reason: str) -> list[Effect]:
        """The transport could not send ``message``; tell its client transaction."""
        if not isinstance(message, Request):
            return []
        try:
            key = client_key_for(message)
        except SipParseError:
            return []
        entry = self.client_txns.get(key)
        if entry is None:
            return []
        txn, tpeer, call = entry
        return self.client_effects(key, txn.on_transport_error(), tpeer, call)

    def on_upstream_down(self, role: Role) -> list[Effect]:
        """The ClearIP connection for ``role`` is gone: fail open every call waiting on it."""
        effects: list[Effect] = []
        for call in list(self.calls.values()):
            if call.phase is _CLEARIP and call.role is role:
                effects += fail_open(self, call, "connection to ClearIP lost")
        return effects

    # ------------------------------------------------------------------------------------
    # Classifiers
    def _on_request(self, request: Request, peer: Peer) -> list[Effect]:
        method = request.method
        if method == "ACK":
            return self._on_ack(request, peer)
        if method == "CANCEL":
            return on_cancel(self, request, peer)
        reason = malformed(request)
        if reason is not None:
            self.counters["bad_request"] += 1
            return reply_stateless(request, peer, 400, reason)
        if request.to_tag:
            return route_in_dialog(self, request, peer)
        if method == "INVITE":
            return on_invite(self, request, peer)
        if method == "OPTIONS":
            available = (
                self.upstream(_SWITCH) is not None or self.config.options_when_upstream_down == 200
            )
            return options_reply(request, peer, available=available)
        self.counters["method_not_allowed"] += 1
        return method_not_allowed(request, peer)

    def _on_ack(self, request: Request, peer: Peer) -> list[Effect]:
        try:
            key = server_key(request)
        except SipParseError:
            return []
        server = self.server_txns.get(key)
        if server is not None and server[0].state in _ACK_ABSORBED:
            txn, speer = server
            return self.server_effects(key, txn.on_request(request), speer)
        if request.has("route") or request.to_tag:
            return route_in_dialog(self, request, peer)
        self.counters["stray_ack"] += 1
        return []

    def _on_response(self, response: Response, peer: Peer) -> list[Effect]:
        try:
            key = client_key(response)
        except SipParseError:
            self.counters["stray_response"] += 1
            return []
        entry = self.client_txns.get(key)
        if entry is None:
            return route_response(self, response, peer)
        txn, tpeer, call = entry
        if response.call_id != txn.request.call_id:
            # Our branch with another Call-ID: forged or broken, never the call's answer.
            self.counters["stray_response"] += 1
            return []
        return self.client_effects(key, txn.on_response(response), tpeer, call)

    # ------------------------------------------------------------------------------------
    # Wiring: what a call's client transaction delivers goes to the leg it belongs to.
    def on_call_event(self, key: TransactionKey, call: ProxyCall, action: Action) -> list[Effect]:
        if isinstance(action, DeliverResponse):
            if key == call.upstream_key:
                return on_clearip_response(self, call, action.response)
            for index, branch in enumerate(call.branches):
                if branch.txn_key == key:
                    return on_branch_response(self, call, index, branch, action.response)
            return []
        if isinstance(action, Timeout | TransportError):
            why = "timeout" if isinstance(action, Timeout) else "unreachable"
            if key == call.upstream_key:
                return clearip_failed(self, call, why)
            for branch in call.branches:
                if branch.txn_key == key:
                    return branch_failed(self, call, branch, why)
        return []
