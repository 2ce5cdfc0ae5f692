"""The proxy core: every message and event in, a list of effects out. No I/O, no clock.

Theory of operation
-------------------
``on_message`` classifies what arrived:

1. Responses: to one of our client transactions (ClearIP leg or a destination branch) → that
   transaction, then the call; otherwise, if our Via is on top with a stateless branch, it
   answers an in-dialog request we forwarded → pop our Via and pass it on. Anything else is a
   stray and is dropped (counted).
2. Requests with a To tag (in dialog), and ACKs for 2xx: loose-routed statelessly by their
   Route headers (see :mod:`routing`).
3. CANCEL: answered 200 at once; cancels the pending INVITE (ClearIP leg or ringing branch).
4. ACK for a non-2xx final we sent: absorbed by the INVITE server transaction.
5. A new INVITE: Max-Forwards (483), loop (482), emergency bypass, then the ClearIP leg.
6. Other out-of-dialog requests: OPTIONS answered 200 (503 while ClearIP is unreachable, so
   switches can route around us), the rest 405 with ``Allow``.

Transactions (RFC 3261 §17) do retransmissions and hop-by-hop ACKs; their actions are
translated into effects here. Timers are keyed ``("tx", id, name)`` for transactions and
``("call", id, what)`` for the proxy's own timers (upstream_timeout, provider_timeout).

Promise: every INVITE from a trusted source gets a final response — relayed, or our own 503
(fail-open) when ClearIP is slow or unreachable, or when anything unexpected happens.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, Protocol, final

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.call import (
    Branch,
    Phase,
    ProxyCall,
    best_response,
)
from clearip.relay.proxy.effects import CallFinished, CancelTimer, Effect, Send, StartTimer
from clearip.relay.proxy.latency import LatencyHistogram
from clearip.relay.proxy.orphans import orphan_answer
from clearip.relay.proxy.ratelimit import RateLimiter
from clearip.relay.proxy.redirect import Target, read_redirect
from clearip.relay.proxy.replies import make_reply
from clearip.relay.proxy.routing import (
    STATEFUL_PREFIX,
    Locality,
    decrement_max_forwards,
    loop_hash,
    next_hop,
    peer_for_uri,
    pop_own_routes,
    record_route_value,
    response_next_hop,
    stamp_received,
    stateful_branch,
    stateless_branch,
    via_return_peer,
    via_value,
)
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Message, Request, Response, select_headers
from clearip.relay.sip.parser import content_length_conflict
from clearip.relay.sip.peer import STREAM_TRANSPORTS, LocalAddress, Peer, response_peer
from clearip.relay.sip.transaction import (
    ClientInviteState,
    ClientInviteTransaction,
    ClientNonInviteState,
    ClientNonInviteTransaction,
    ServerInviteState,
    ServerInviteTransaction,
)
from clearip.relay.sip.transaction.ack import cancel_for
from clearip.relay.sip.transaction.actions import (
    Action,
    DeliverResponse,
    SendMessage,
    Terminated,
    Timeout,
    TransportError,
)
from clearip.relay.sip.transaction.actions import StartTimer as TxStartTimer
from clearip.relay.sip.transaction.actions import StopTimer as TxStopTimer
from clearip.relay.sip.transaction.matching import (
    TransactionKey,
    cancel_target_key,
    client_key,
    client_key_for,
    server_key,
)
from clearip.relay.sip.uri import SipUri, parse_uri, uri_user_number
from clearip.relay.sip.via import parse_via

log = logging.getLogger("clearip.proxy")

# §16.6 step 11 / §16.8: a branch that rings longer than this is cancelled (Timer C > 3 min).
TIMER_C = 181.0
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, INFO, NOTIFY, REFER, MESSAGE"
Transaction = ClientInviteTransaction | ClientNonInviteTransaction
# States of our client transactions still waiting for a final response (compared by identity).
_AWAITING_FINAL = (
    ClientInviteState.CALLING,
    ClientInviteState.PROCEEDING,
    ClientNonInviteState.TRYING,
    ClientNonInviteState.PROCEEDING,
)
# States in which an INVITE server transaction absorbs the ACK of its 300-699.
_ACK_ABSORBED = (ServerInviteState.COMPLETED, ServerInviteState.CONFIRMED)
_COUNTED = frozenset(("via", "from", "to", "call-id", "cseq", "content-length"))
# Enum members as constants: reading one from its class costs ~0.1 us (EnumType lookups).
_CLEARIP: Final = Phase.CLEARIP
_ROUTING: Final = Phase.ROUTING
_DONE: Final = Phase.DONE
_SWITCH: Final = Role.SWITCH
_NAMES_LIMIT: Final = 256


@final
class _CounterNames:
    """Counter names with a variable part (a role, a status, a method), each formatted once
    rather than per message; bounded, since a peer chooses methods and statuses."""

    __slots__ = ("_lower", "_made", "_template")

    def __init__(self, template: str, *, lower: bool = False) -> None:
        self._template = template
        self._lower = lower  # names in lower case (a method: in_dialog_bye)
        self._made: dict[str | int, str] = {}

    def name(self, value: str | int) -> str:
        made = self._made.get(value)
        if made is None:
            made = self._template.format(
                value.lower() if self._lower and isinstance(value, str) else value
            )
            if len(self._made) < _NAMES_LIMIT:
                self._made[value] = made
        return made


class LocalFor(Protocol):
    """Our address towards a peer: for a Via (the transport the message goes on) or, with
    ``record_route``, for a Record-Route (a listener the peer can send new requests to)."""

    def __call__(self, peer: Peer, *, record_route: bool = False) -> LocalAddress: ...


class ProxyCore:
    """See the module docstring."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        role_of: Callable[[str], Role | None],
        emergency: Callable[[], EmergencyNumbers],
        locality: Locality,
        local_for: LocalFor,
        upstream: Callable[[Role], Peer | None],
        clock: Callable[[], float],
        counters: Counter[str] | None = None,
        queue_delay: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.config = config
        self.role_of = role_of
        self.emergency = emergency
        self.locality = locality
        self.local_for = local_for
        self.upstream = upstream
        self.clock = clock
        self.queue_delay = queue_delay  # how long what we read now waited to be read
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.calls: dict[int, ProxyCall] = {}
        self.by_server_key: dict[TransactionKey, ProxyCall] = {}
        self.client_txns: dict[TransactionKey, tuple[Transaction, Peer, ProxyCall | None]] = {}
        self.server_txns: dict[TransactionKey, tuple[ServerInviteTransaction, Peer]] = {}
        self._ids = itertools.count(1)
        self.latency = LatencyHistogram()
        self.limiter = RateLimiter(config.invite_rate_per_source)
        self._invite_names = _CounterNames("invite_{}")
        self._in_dialog_names = _CounterNames("in_dialog_{}", lower=True)
        self._clearip_names = _CounterNames("clearip_response_{}")
        self._call_names: dict[tuple[Role, str], _CounterNames] = {}

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

    def on_timer(self, key: tuple[Any, ...]) -> list[Effect]:
        kind = key[0]
        if kind == "tx":
            _, txn_key, name = key
            entry = self.client_txns.get(txn_key)
            if entry is not None:
                txn, peer, call = entry
                return self._client_actions(txn_key, txn.on_timer(name), peer, call)
            server = self.server_txns.get(txn_key)
            if server is not None:
                stxn, speer = server
                return self._server_actions(txn_key, stxn.on_timer(name), speer)
            return []
        if kind == "call":
            _, call_id, what = key[:3]
            call = self.calls.get(call_id)
            if call is None or call.phase is _DONE:
                return []
            if what == "upstream":
                self.counters["clearip_timeout"] += 1
                return self._fail_open(call, "ClearIP did not answer in time")
            if what == "provider":
                index = key[3]
                return self._provider_silent(call, index)
            if what == "cancel-guard":
                return self._finish_with_own(call, 487, "Request Terminated", why="cancelled")
            if what == "timer-c":
                return self._timer_c(call, key[3])
            return []
        if kind == "reap":
            # A client transaction of a finished call that never got a final (a destination
            # that rang and then ignored our CANCEL): forget it.
            entry = self.client_txns.get(key[1])
            if entry is not None and entry[0].state in _AWAITING_FINAL:
                self.client_txns.pop(key[1], None)
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
        return self._client_actions(key, txn.on_transport_error(), tpeer, call)

    def on_upstream_down(self, role: Role) -> list[Effect]:
        """The ClearIP connection for ``role`` is gone: fail open every call waiting on it."""
        effects: list[Effect] = []
        for call in list(self.calls.values()):
            if call.phase is _CLEARIP and call.role is role:
                effects += self._fail_open(call, "connection to ClearIP lost")
        return effects

    # ------------------------------------------------------------------------------------
    # Requests
    def _on_request(self, request: Request, peer: Peer) -> list[Effect]:
        method = request.method
        if method == "ACK":
            return self._on_ack(request, peer)
        if method == "CANCEL":
            return self._on_cancel(request, peer)
        seen: dict[str, int] = {}  # one pass over the headers for the checks below
        for header in request.headers:
            key = header[1]
            if key in _COUNTED:
                seen[key] = seen.get(key, 0) + 1
        missing = [h for h in ("via", "from", "to", "call-id", "cseq") if h not in seen]
        if missing:
            self.counters["bad_request"] += 1
            return self._reply_stateless(
                request, peer, 400, f"Missing {', '.join(missing).title()}"
            )
        for key in ("from", "to", "call-id", "cseq"):
            if seen[key] > 1:
                self.counters["bad_request"] += 1
                return self._reply_stateless(request, peer, 400, f"Multiple {key.title()} values")
        if seen.get("content-length", 0) > 1 and content_length_conflict(request):
            self.counters["bad_request"] += 1
            return self._reply_stateless(request, peer, 400, "Conflicting Content-Length")
        if request.to_tag:
            return self._route_in_dialog(request, peer)
        if method == "INVITE":
            return self._on_invite(request, peer)
        if method == "OPTIONS":
            up = self.upstream(_SWITCH) is not None
            if up or self.config.options_when_upstream_down == 200:
                return self._reply_stateless(
                    request,
                    peer,
                    200,
                    "OK",
                    extra=[("Allow", ALLOW), ("Accept", "application/sdp")],
                )
            return self._reply_stateless(request, peer, 503, "ClearIP Unreachable")
        self.counters["method_not_allowed"] += 1
        return self._reply_stateless(
            request, peer, 405, "Method Not Allowed", extra=[("Allow", ALLOW)]
        )

    def _reply_stateless(
        self,
        request: Request,
        peer: Peer,
        status: int,
        reason: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> list[Effect]:
        reply = make_reply(request, status, reason, extra=extra)
        return [Send(reply, response_peer(request, peer))]

    def _on_ack(self, request: Request, peer: Peer) -> list[Effect]:
        try:
            key = server_key(request)
        except SipParseError:
            return []
        server = self.server_txns.get(key)
        if server is not None and server[0].state in _ACK_ABSORBED:
            txn, speer = server
            return self._server_actions(key, txn.on_request(request), speer)
        if request.has("route") or request.to_tag:
            return self._route_in_dialog(request, peer)
        self.counters["stray_ack"] += 1
        return []

    def _on_cancel(self, request: Request, peer: Peer) -> list[Effect]:
        try:
            key = cancel_target_key(request)
        except SipParseError:
            return []
        call = self.by_server_key.get(key)
        effects = (
            self._reply_stateless(request, peer, 200, "OK")
            if call or key in self.server_txns
            else []
        )
        if call is None:
            if not effects:
                return self._reply_stateless(request, peer, 481, "Call/Transaction Does Not Exist")
            return effects
        if call.phase is _DONE or call.cancelled:
            return effects
        call.cancelled = True
        call.note = "cancelled by caller"
        self.counters["cancelled"] += 1
        if call.phase is _CLEARIP:
            effects += self._cancel_upstream(call)
            return effects + self._finish_with_own(call, 487, "Request Terminated", why="cancelled")
        # ROUTING: cancel the live branch and relay its final (487) when it comes; guard
        # against a destination that never answers the CANCEL.
        live = [b for b in call.branches if b.status is None and not b.abandoned]
        if not live:
            return effects + self._finish_with_own(call, 487, "Request Terminated", why="cancelled")
        for branch in live:
            effects += self._cancel_branch(call, branch)
        effects.append(StartTimer(("call", call.id, "cancel-guard"), 64 * call.config.timers.t1))
        return effects

    # -- new INVITE --------------------------------------------------------------------------
    def _on_invite(self, request: Request, peer: Peer) -> list[Effect]:
        try:
            key = server_key(request)
        except SipParseError as exc:
            return self._reply_stateless(request, peer, 400, exc.reason)
        server = self.server_txns.get(key)
        if server is not None:  # retransmission: the transaction answers it
            txn, speer = server
            self.counters["invite_retransmission"] += 1
            return self._server_actions(key, txn.on_request(request), speer)
        role = self.role_of(peer.host) or _SWITCH
        number = _dialled(request)
        emergency = (number or "") in self.emergency()
        if not emergency:
            # Protection comes before any state: an overloaded proxy or a flooding source
            # gets a clear 503 with Retry-After, never emergency calls.
            shed_after = self.config.overload_queue_delay
            if shed_after and self.queue_delay() > shed_after:
                # Behind on reading: a quick 503 lets the switch route this call directly
                # instead of every call timing out in our queue (no congestion collapse).
                self.counters["overload_shed"] += 1
                self.counters[f"call:{role.value}:503:overload"] += 1
                return self._reply_stateless(
                    request, peer, 503, "Overloaded", extra=[("Retry-After", "1")]
                )
            if len(self.server_txns) >= self.config.max_transactions:
                self.counters["overload_rejected"] += 1
                self.counters[f"call:{role.value}:503:max-transactions"] += 1
                return self._reply_stateless(
                    request, peer, 503, "Overloaded", extra=[("Retry-After", "5")]
                )
            if not self.limiter.allow(peer.host, self.clock()):
                self.counters["rate_limited"] += 1
                self.counters[f"call:{role.value}:503:rate-limit"] += 1
                return self._reply_stateless(
                    request, peer, 503, "Rate Limit Exceeded", extra=[("Retry-After", "1")]
                )
        stamp_received(request, peer)
        max_forwards = request.get("max-forwards")
        if max_forwards is not None and max_forwards.strip() == "0":
            self.counters["too_many_hops"] += 1
            self.counters[f"call:{role.value}:483:too-many-hops"] += 1
            return self._reply_stateless(request, peer, 483, "Too Many Hops")
        loop = loop_hash(request)
        if self._is_loop(request, loop):
            self.counters["loop_detected"] += 1
            self.counters[f"call:{role.value}:482:loop"] += 1
            return self._reply_stateless(request, peer, 482, "Loop Detected")

        txn = ServerInviteTransaction(
            request, reliable=_reliable(peer), timers=self.config.timers, key=key
        )
        # Responses go where the Via says (§18.2.2), not to the datagram's source port.
        self.server_txns[key] = (txn, response_peer(request, peer))
        call = ProxyCall(
            id=next(self._ids),
            request=request,
            source=peer,
            role=role,
            started=self.clock(),
            server_key=key,
            config=self.config,
            loop=loop,
        )
        self.calls[call.id] = call
        self.by_server_key[key] = call
        self.counters[self._invite_names.name(role)] += 1
        effects = self._respond(call, make_reply(request, 100, "Trying", add_to_tag=False))

        if emergency:
            call.emergency = True
            self.counters["emergency"] += 1
            log.warning(
                "emergency call %s to %s: bypassing ClearIP (Call-ID %s)",
                number,
                call.config.emergency_route or "the switch's direct route (503)",
                request.call_id,
            )
            if not call.config.emergency_route:
                call.note = "emergency: switch routes directly"
                return effects + self._finish_with_own(
                    call,
                    503,
                    "Service Unavailable",
                    reason_text="Emergency call: route directly",
                    why="emergency",
                )
            route = parse_uri(call.config.emergency_route)
            assert isinstance(route, SipUri)
            call.targets = [Target(route, 1.0)]
            call.phase = _ROUTING
            return effects + self._try_next(call)

        upstream = self.upstream(role)
        if upstream is None:
            self.counters["clearip_down_fail_open"] += 1
            return effects + self._fail_open(call, "ClearIP unreachable")
        return effects + self._send_upstream(call, upstream)

    def _is_loop(self, request: Request, expected: str) -> bool:
        """Whether one of our Vias below the top carries ``expected``, the request's
        :func:`loop_hash` (§16.3 step 4). Only Vias with our branch prefix are parsed."""
        for value in request.get_all("via")[1:]:
            if STATEFUL_PREFIX not in value:
                continue
            via = parse_via(value)
            branch = via.branch or ""
            if branch.startswith(STATEFUL_PREFIX) and self.locality.via_is_us(via):
                if branch[len(STATEFUL_PREFIX) :].split(".", 1)[0] == expected:
                    return True
        return False

    def _send_upstream(self, call: ProxyCall, upstream: Peer) -> list[Effect]:
        out = call.request.copy()
        pop_own_routes(out, self.locality)
        decrement_max_forwards(out)
        local = self.local_for(upstream)
        branch = stateful_branch(call.request, call.loop)
        out.prepend("Via", via_value(local, branch))
        call.upstream_peer = upstream
        key = ("client", branch, "INVITE")  # client_key_for(out), without parsing our Via
        txn = ClientInviteTransaction(
            out, reliable=_reliable(upstream), timers=call.config.timers, key=key
        )
        call.upstream_key = key
        self.client_txns[key] = (txn, upstream, call)
        effects: list[Effect] = [
            StartTimer(("call", call.id, "upstream"), call.config.upstream_timeout)
        ]
        return effects + self._client_actions(key, txn.start(), upstream, call)

    # -- in-dialog ---------------------------------------------------------------------------
    def _route_in_dialog(self, request: Request, peer: Peer) -> list[Effect]:
        """Stateless loose routing (§16.4, §16.6, §16.12)."""
        if request.method != "ACK":
            mf = request.get("max-forwards")
            if mf is not None and mf.strip() == "0":
                return self._reply_stateless(request, peer, 483, "Too Many Hops")
        stamp_received(request, peer)
        out = request
        try:
            ruri = out.uri
        except SipParseError as exc:
            return self._reply_stateless(request, peer, 400, exc.reason)
        if isinstance(ruri, SipUri) and self.locality.is_us(ruri):
            # The previous hop was a strict router: the real target is the last Route.
            routes = out.get_all("route")
            if routes:
                last = out.addresses("route")[-1]
                out.set_uri(last.uri_text)
                remaining = routes[:-1]
                out.remove("route")
                for value in remaining:
                    out.append("Route", value)
        pop_own_routes(out, self.locality)
        target = next_hop(out)
        if target is None or self.locality.is_us(target):
            if out.method == "ACK":
                return []
            return self._reply_stateless(request, peer, 404, "Not Here")
        decrement_max_forwards(out)
        dest = peer_for_uri(target)
        local = self.local_for(dest)
        out.prepend(
            "Via",
            via_value(local, stateless_branch(request), peer.conn if _reliable(peer) else None),
        )
        self.counters[self._in_dialog_names.name(out.method)] += 1
        return [Send(out, dest)]

    # -- responses ---------------------------------------------------------------------------
    def _on_response(self, response: Response, peer: Peer) -> list[Effect]:
        try:
            key = client_key(response)
        except SipParseError:
            self.counters["stray_response"] += 1
            return []
        entry = self.client_txns.get(key)
        if entry is not None:
            txn, tpeer, call = entry
            if response.call_id != txn.request.call_id:
                # Our branch with another Call-ID: forged or broken, never the call's answer.
                self.counters["stray_response"] += 1
                return []
            return self._client_actions(key, txn.on_response(response), tpeer, call)
        forwarded = response_next_hop(response, self.locality)
        if forwarded is not None:
            return [Send(forwarded[0], forwarded[1])]
        if self._is_our_invite_branch(response):
            return self._orphan_response(response, peer)
        self.counters["stray_response"] += 1
        return []

    def _is_our_invite_branch(self, response: Response) -> bool:
        """A response to an INVITE we relayed statefully (our branch, our address)."""
        try:
            top = response.top_via
            method = response.cseq[1]
        except SipParseError:
            return False
        branch = top.branch or ""
        return (
            method == "INVITE"
            and branch.startswith(STATEFUL_PREFIX)
            and self.locality.via_host_is_us(top)
        )

    def _orphan_response(self, response: Response, peer: Peer) -> list[Effect]:
        """An answer to an INVITE whose call this process does not have (its worker was
        restarted, say): the switch still gets a final (:mod:`orphans`)."""
        outcome, onward, ack = orphan_answer(response)
        dest: Peer | None = None
        if onward is not None:
            try:
                dest = via_return_peer(onward.top_via)
            except SipParseError:
                dest = None
            if dest is None or self.role_of(dest.host) is None:
                # Without the call we cannot vouch for the Via below ours: only an element on
                # the trust list (the switch that sent the INVITE) is answered this way.
                self.counters["stray_response"] += 1
                return []
        self.counters[f"orphan_response_{outcome}"] += 1
        effects: list[Effect] = []
        if ack is not None:
            effects.append(Send(ack, peer))
        if onward is not None and dest is not None:
            effects.append(Send(onward, dest))
        return effects

    def _call_response(
        self, key: TransactionKey, call: ProxyCall, response: Response
    ) -> list[Effect]:
        if key == call.upstream_key:
            return self._clearip_response(call, response)
        for index, branch in enumerate(call.branches):
            if branch.txn_key == key:
                return self._branch_response(call, index, branch, response)
        return []

    def _clearip_response(self, call: ProxyCall, response: Response) -> list[Effect]:
        status = response.status
        if status < 200:
            call.upstream_provisional = True
            return []
        if call.phase is not _CLEARIP:
            self.counters["clearip_late_response"] += 1
            return []  # late: absorbed (the client transaction ACKs a late non-2xx)
        call.clearip_status = status
        call.clearip_latency = self.clock() - call.started
        self.latency.observe(call.clearip_latency)
        self.counters[self._clearip_names.name(status)] += 1
        effects: list[Effect] = [CancelTimer(("call", call.id, "upstream"))]
        if status == 302:
            redirect = read_redirect(
                response, self.locality, call.config.copy_headers, call.config.max_contacts
            )
            for contact, why in redirect.skipped:
                log.info("Call-ID %s: Contact %s skipped: %s", call.request.call_id, contact, why)
            if redirect.targets:
                call.targets = list(redirect.targets)
                call.copied = redirect.copied
                for name, value in redirect.copied:
                    if name.lower() == "identity":
                        call.identity = value  # decoded for the call's log line only
                call.phase = _ROUTING
                return effects + self._try_next(call)
            call.note = "302 without usable Contacts"
        return effects + self._relay_final(call, response)

    def _branch_response(
        self, call: ProxyCall, index: int, branch: Branch, response: Response
    ) -> list[Effect]:
        status = response.status
        effects: list[Effect] = [CancelTimer(("call", call.id, "provider", index))]
        if branch.abandoned:
            if status < 200 and not branch.cancelled:
                return effects + self._cancel_branch(call, branch)
            if 200 <= status < 300:
                self.counters["late_2xx_abandoned_branch"] += 1
                log.warning(
                    "Call-ID %s: %s answered after being skipped", call.request.call_id, branch.peer
                )
            return effects
        if status < 200:
            branch.provisional = True
            if status == 100:
                return effects
            # §16.7 step 2: a provisional response from 101 to 199 resets Timer C.
            effects.append(StartTimer(("call", call.id, "timer-c", index), TIMER_C))
            if call.phase is _DONE:
                return effects
            call.early_sent = True
            return effects + self._forward_response(call, response)
        branch.status = status
        branch.outcome = str(status)
        if 200 <= status < 300:
            if call.phase is _DONE:  # a further 2xx (forking downstream): pass it on
                return effects + self._forward_response(call, response)
            return effects + self._relay_final(call, response)
        if call.phase is _DONE:
            return effects
        call.finals.append(response)
        if call.cancelled:
            return effects + self._relay_final(call, response)
        if (
            status in call.config.route_advance_codes
            and not call.early_sent
            and len(call.branches) < len(call.targets)
        ):
            self.counters["route_advance"] += 1
            return effects + self._try_next(call)
        return effects + self._relay_best(call)

    def _provider_silent(self, call: ProxyCall, index: int) -> list[Effect]:
        branch = call.branches[index]
        if branch.provisional or branch.status is not None:
            return []
        branch.abandoned = True
        branch.outcome = "no answer"
        self.counters["provider_timeout"] += 1
        if len(call.branches) < len(call.targets) and not call.cancelled:
            self.counters["route_advance"] += 1
            return self._try_next(call)
        if call.finals:
            return self._relay_best(call)
        return self._finish_with_own(
            call, 408, "Request Timeout", reason_text="No destination answered", why="timeout"
        )

    def _timer_c(self, call: ProxyCall, index: int) -> list[Effect]:
        branch = call.branches[index]
        if branch.status is not None or branch.abandoned:
            return []
        self.counters["timer_c"] += 1
        effects = self._cancel_branch(call, branch)
        branch.abandoned = True
        return effects + self._branch_failed(call, branch, "timeout")

    def _branch_failed(self, call: ProxyCall, branch: Branch, why: str) -> list[Effect]:
        branch.status = branch.status or 503
        branch.outcome = why
        index = call.branches.index(branch)
        effects: list[Effect] = [CancelTimer(("call", call.id, "provider", index))]
        if call.phase is _DONE or branch.abandoned:
            return effects
        if len(call.branches) < len(call.targets) and not call.cancelled and not call.early_sent:
            self.counters["route_advance"] += 1
            return effects + self._try_next(call)
        if call.finals:
            return effects + self._relay_best(call)
        status = 408 if why == "timeout" else 503
        return effects + self._finish_with_own(
            call,
            status,
            "Request Timeout" if status == 408 else "Service Unavailable",
            reason_text=f"Destination {why}",
            why=why,
        )

    # -- destinations ------------------------------------------------------------------------
    def _try_next(self, call: ProxyCall) -> list[Effect]:
        index = len(call.branches)
        if index >= len(call.targets):
            return self._relay_best(call)
        target = call.targets[index]
        out = call.request.copy()
        pop_own_routes(out, self.locality)
        out.set_uri(target.uri_text)
        for name, _ in call.copied:
            out.remove(name.lower())
        for name, value in call.copied:
            out.append(name, value)
        decrement_max_forwards(out)
        dest = peer_for_uri(target.uri)
        incoming = self.local_for(call.source, record_route=True)
        outgoing = self.local_for(dest, record_route=True)
        if incoming is not outgoing and incoming != outgoing:
            out.prepend("Record-Route", record_route_value(incoming))
        out.prepend("Record-Route", record_route_value(outgoing))
        via = outgoing if outgoing.transport == dest.transport else self.local_for(dest)
        via_branch = stateful_branch(call.request, call.loop)
        out.prepend("Via", via_value(via, via_branch))
        key = ("client", via_branch, "INVITE")  # client_key_for(out), without parsing our Via
        txn = ClientInviteTransaction(
            out, reliable=_reliable(dest), timers=call.config.timers, key=key
        )
        branch = Branch(target=target, request=out, peer=dest, txn_key=key)
        call.branches.append(branch)
        self.client_txns[key] = (txn, dest, call)
        effects: list[Effect] = [StartTimer(("call", call.id, "timer-c", index), TIMER_C)]
        if not call.emergency:
            effects.append(
                StartTimer(("call", call.id, "provider", index), call.config.provider_timeout)
            )
        return effects + self._client_actions(key, txn.start(), dest, call)

    def _cancel_branch(self, call: ProxyCall, branch: Branch) -> list[Effect]:
        if branch.cancelled or not branch.provisional:
            branch.abandoned = True
            return []
        branch.cancelled = True
        return self._send_cancel(branch.request, branch.peer, call)

    def _cancel_upstream(self, call: ProxyCall) -> list[Effect]:
        if call.upstream_key is None:
            return []
        entry = self.client_txns.get(call.upstream_key)
        if entry is None or not call.upstream_provisional or call.upstream_peer is None:
            return []
        return self._send_cancel(entry[0].request, call.upstream_peer, call)

    def _send_cancel(self, invite: Request, peer: Peer, call: ProxyCall) -> list[Effect]:
        """CANCEL a pending INVITE we sent (§9.1) in its own non-INVITE client transaction."""
        cancel = cancel_for(invite)
        txn = ClientNonInviteTransaction(
            cancel, reliable=_reliable(peer), timers=call.config.timers
        )
        key = client_key_for(cancel)
        self.client_txns[key] = (txn, peer, None)
        return self._client_actions(key, txn.start(), peer, None)

    # -- finishing ---------------------------------------------------------------------------
    def _fail_open(self, call: ProxyCall, why: str) -> list[Effect]:
        call.note = f"fail-open: {why}"
        effects = self._cancel_upstream(call)
        return effects + self._finish_with_own(
            call, 503, "Service Unavailable", reason_text=f"{why} (fail-open)", why="fail-open"
        )

    def _finish_with_own(
        self,
        call: ProxyCall,
        status: int,
        reason: str,
        *,
        why: str,
        reason_text: str | None = None,
    ) -> list[Effect]:
        """Our own final for the switch; ``why`` is the ``reason`` label of clearip_calls."""
        if call.phase is _DONE:
            return []
        extra = []
        if reason_text:
            extra.append(("Reason", f'SIP;cause={status};text="{reason_text}"'))
        reply = make_reply(call.request, status, reason, extra=extra)
        return self._relay_final(call, reply, own=why)

    def _relay_best(self, call: ProxyCall) -> list[Effect]:
        best = best_response(call.finals)
        if best is None:
            return self._finish_with_own(
                call,
                503,
                "Service Unavailable",
                reason_text="No usable destination",
                why="unreachable",
            )
        if best.status == 503:  # §16.7 step 6: a downstream 503 becomes 500 upstream
            best = best.copy()
            best.status, best.reason = 500, "Server Internal Error"
        return self._relay_final(call, best)

    def _relay_final(self, call: ProxyCall, response: Response, *, own: str = "") -> list[Effect]:
        """The call's final to the switch: a destination's or ClearIP's (``own`` = "") or our
        own (``own`` says why: fail-open, emergency, timeout, unreachable, cancelled)."""
        call.phase = _DONE
        call.final_status = response.status
        effects: list[Effect] = [CancelTimer(("call", call.id, "upstream"))]
        for index in range(len(call.branches)):
            effects.append(CancelTimer(("call", call.id, "provider", index)))
            effects.append(CancelTimer(("call", call.id, "timer-c", index)))
        effects.append(CancelTimer(("call", call.id, "cancel-guard")))
        # A client transaction still waiting for its final may never get one (a destination
        # that rang and ignores our CANCEL): forget it later. The others end by their own
        # timers (D, M), so they need no second one.
        reap_after = 64 * call.config.timers.t1 + 1.0
        for key in [call.upstream_key, *(b.txn_key for b in call.branches)]:
            entry = self.client_txns.get(key) if key is not None else None
            if entry is not None and entry[0].state in _AWAITING_FINAL:
                effects.append(StartTimer(("reap", key), reap_after))
        # Abandon whatever else is still ringing: CANCEL it.
        for branch in call.branches:
            if branch.status is None and not branch.cancelled and response.status >= 200:
                if 200 <= response.status < 300:
                    effects += self._cancel_branch(call, branch)
        effects += self._respond(call, response) if own else self._forward_response(call, response)
        effects.append(CallFinished(functools.partial(call.summary, self.clock())))
        why = own or "relayed"
        names = self._call_names.get((call.role, why))
        if names is None:
            names = _CounterNames(f"call:{call.role.value}:{{}}:{why}")
            self._call_names[(call.role, why)] = names
        self.counters[names.name(response.status)] += 1
        self._forget(call)
        return effects

    def _forward_response(self, call: ProxyCall, response: Response) -> list[Effect]:
        out = response.copy()
        out.pop_first_value("via")
        if not _via_set_leads_back(out, call.request):
            out = self._repaired(call, response, out)
        return self._respond(call, out)

    def _repaired(self, call: ProxyCall, response: Response, out: Response) -> Response:
        """A destination's response whose Vias below ours are not the switch's (§16.7 step 3
        would drop it; the switch would then wait for a final it can never match). As a
        transaction-stateful proxy we answer the switch ourselves: a final >= 300 becomes our
        own response with that status, the switch's Via set, the destination's To tag and
        Reason; a provisional or 2xx keeps its body and dialog headers with the Via set
        replaced, so the dialog still forms."""
        self.counters["response_via_repaired"] += 1
        log.warning(
            "Call-ID %s: %d from %s lost the switch's Via set: answering with the switch's own",
            call.request.call_id,
            response.status,
            response.source[1] if response.source else "destination",
        )
        request_vias = select_headers(call.request.headers, ("via",), keep=True)
        if response.status >= 300:
            extra = [("Reason", value) for value in response.get_all("reason")]
            reply = make_reply(call.request, response.status, response.reason, extra=extra)
            tag = _to_tag(response)
            if tag:
                reply.set("To", f"{call.request.get('to') or ''};tag={tag}")
            return reply
        out.remove("via")
        out.headers = request_vias + out.headers
        return out

    def _respond(self, call: ProxyCall, response: Response) -> list[Effect]:
        server = self.server_txns.get(call.server_key)
        if server is None:
            return []
        txn, peer = server
        return self._server_actions(call.server_key, txn.send_response(response), peer)

    def _forget(self, call: ProxyCall) -> None:
        self.calls.pop(call.id, None)
        self.by_server_key.pop(call.server_key, None)

    # -- transaction actions -----------------------------------------------------------------
    def _client_actions(
        self, key: TransactionKey, actions: list[Action], peer: Peer, call: ProxyCall | None
    ) -> list[Effect]:
        effects: list[Effect] = []
        for action in actions:
            io = _io_effect(key, action, peer)
            if io is not None:
                effects.append(io)
            elif isinstance(action, DeliverResponse):
                if call is not None:
                    effects += self._call_response(key, call, action.response)
            elif isinstance(action, Timeout | TransportError):
                if call is not None:
                    effects += self._client_failed(key, call, action)
            elif isinstance(action, Terminated):
                self.client_txns.pop(key, None)
        return effects

    def _client_failed(
        self, key: TransactionKey, call: ProxyCall, action: Timeout | TransportError
    ) -> list[Effect]:
        why = "timeout" if isinstance(action, Timeout) else "unreachable"
        if key == call.upstream_key:
            if call.phase is _CLEARIP:
                self.counters[f"clearip_{why}"] += 1
                return self._fail_open(call, f"ClearIP {why}")
            return []
        for branch in call.branches:
            if branch.txn_key == key:
                return self._branch_failed(call, branch, why)
        return []

    def _server_actions(
        self, key: TransactionKey, actions: list[Action], peer: Peer
    ) -> list[Effect]:
        effects: list[Effect] = []
        for action in actions:
            io = _io_effect(key, action, peer)
            if io is not None:
                effects.append(io)
            elif isinstance(action, Terminated):
                self.server_txns.pop(key, None)
                call = self.by_server_key.get(key)
                if call is not None and call.phase is not _DONE:
                    # The switch's side is gone (transport error / timer H): nothing more to do.
                    self._forget(call)
        return effects


def _io_effect(key: TransactionKey, action: Action, peer: Peer) -> Effect | None:
    """A transaction's send/timer action as the shell's effect (None for the others)."""
    if isinstance(action, SendMessage):
        return Send(action.message, peer)
    if isinstance(action, TxStartTimer):
        return StartTimer(("tx", key, action.name), action.delay)
    if isinstance(action, TxStopTimer):
        return CancelTimer(("tx", key, action.name))
    return None


def _reliable(peer: Peer) -> bool:
    """``peer.reliable``, without calling the interpreted property."""
    return peer.transport in STREAM_TRANSPORTS


def _via_set_leads_back(response: Response, request: Request) -> bool:
    """True when the response's Vias are the request's, as the switch sent them (branch and
    sent-by of each): what the switch's transaction matches on (§17.1.3)."""
    if response.get_all("via") == request.get_all("via"):
        return True  # the usual case, a copy: no parsing on the per-response path
    try:
        got = [(v.branch, v.sent_by.lower()) for v in response.vias()]
        want = [(v.branch, v.sent_by.lower()) for v in request.vias()]
    except SipParseError:
        return False
    return got == want


def _to_tag(response: Response) -> str | None:
    try:
        return response.to_tag
    except SipParseError:
        return None


def _dialled(request: Request) -> str | None:
    try:
        return uri_user_number(request.uri)
    except SipParseError:
        return None
