"""A new INVITE: its checks, its server transaction and call record, then ClearIP or the
emergency route.

Rules, in order:

- A retransmission (its server transaction exists) is the transaction's: it resends what it
  last sent.
- The caller's role is its trust-list entry (a switch when it has none: the trust list is
  checked before the core). An emergency call (the dialled number, ``emergency``) passes no
  load check and never goes to ClearIP.
- :mod:`admission` decides before any state is made: load (503 + Retry-After), then, once the
  sender's Via is stamped (received, rport), hops (483) and loops (482). Each refusal is
  answered statelessly and counted, also as ``call:<role>:<status>:<reason>``.
- Then the INVITE server transaction (responses go where the Via says, §18.2.2), the call
  record (with the config as it is now: a reload never changes a call halfway), and 100 Trying.
- An emergency call goes to ``emergency_route`` (``EMERGENCY``: ROUTING at once), or, without
  one, gets our 503 so that the switch routes it directly. Any other goes to ClearIP; without
  a ClearIP link, fail-open at once (503).
"""

from __future__ import annotations

import logging
from typing import Final

from clearip.relay.policy.trust import Role
from clearip.relay.proxy.admission import Refusal, hops_refusal, overloaded
from clearip.relay.proxy.branches import try_next
from clearip.relay.proxy.call import EMERGENCY, ProxyCall
from clearip.relay.proxy.clearip_leg import fail_open, send_upstream
from clearip.relay.proxy.effects import Effect
from clearip.relay.proxy.finish import finish_with_own
from clearip.relay.proxy.redirect import Target
from clearip.relay.proxy.replies import make_reply, reply_stateless
from clearip.relay.proxy.routing import loop_hash, stamp_received
from clearip.relay.proxy.state import CoreState, reliable
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request
from clearip.relay.sip.peer import Peer, response_peer
from clearip.relay.sip.transaction import ServerInviteTransaction
from clearip.relay.sip.transaction.matching import server_key
from clearip.relay.sip.uri import SipUri, parse_uri, uri_user_number

log = logging.getLogger("clearip.proxy")

_SWITCH: Final = Role.SWITCH


def on_invite(core: CoreState, request: Request, peer: Peer) -> list[Effect]:
    """An INVITE outside a dialog from ``peer`` (see the module docstring)."""
    try:
        key = server_key(request)
    except SipParseError as exc:
        return reply_stateless(request, peer, 400, exc.reason)
    server = core.server_txns.get(key)
    if server is not None:  # retransmission: the transaction answers it
        txn, speer = server
        core.counters["invite_retransmission"] += 1
        return core.server_effects(key, txn.on_request(request), speer)
    role = core.role_of(peer.host) or _SWITCH
    number = _dialled(request)
    emergency = (number or "") in core.emergency()
    if not emergency:
        # Protection comes before any state: an overloaded proxy or a flooding source gets a
        # clear 503 with Retry-After, never emergency calls.
        refusal = overloaded(
            core.config,
            queue_delay=core.queue_delay,
            transactions=len(core.server_txns),
            limiter=core.limiter,
            source=peer.host,
            clock=core.clock,
        )
        if refusal is not None:
            return _refuse(core, request, peer, role, refusal)
    stamp_received(request, peer)
    loop = loop_hash(request)
    refusal = hops_refusal(request, loop, core.locality)
    if refusal is not None:
        return _refuse(core, request, peer, role, refusal)

    txn = ServerInviteTransaction(
        request, reliable=reliable(peer), timers=core.config.timers, key=key
    )
    # Responses go where the Via says (§18.2.2), not to the datagram's source port.
    core.server_txns[key] = (txn, response_peer(request, peer))
    call = ProxyCall(
        id=next(core.ids),
        request=request,
        source=peer,
        role=role,
        started=core.clock(),
        server_key=key,
        config=core.config,
        loop=loop,
    )
    core.calls[call.id] = call
    core.by_server_key[key] = call
    core.counters[core.invite_names.name(role)] += 1
    effects = core.respond(call, make_reply(request, 100, "Trying", add_to_tag=False))
    if emergency:
        return effects + _emergency(core, call, number)
    upstream = core.upstream(role)
    if upstream is None:
        core.counters["clearip_down_fail_open"] += 1
        return effects + fail_open(core, call, "ClearIP unreachable")
    return effects + send_upstream(core, call, upstream)


def _refuse(
    core: CoreState, request: Request, peer: Peer, role: Role, refusal: Refusal
) -> list[Effect]:
    counters = core.counters
    counters[refusal.counter] += 1
    counters[f"call:{role.value}:{refusal.status}:{refusal.label}"] += 1
    extra = [("Retry-After", refusal.retry_after)] if refusal.retry_after else None
    return reply_stateless(request, peer, refusal.status, refusal.reason, extra=extra)


def _emergency(core: CoreState, call: ProxyCall, number: str | None) -> list[Effect]:
    call.emergency = True
    core.counters["emergency"] += 1
    log.warning(
        "emergency call %s to %s: bypassing ClearIP (Call-ID %s)",
        number,
        call.config.emergency_route or "the switch's direct route (503)",
        call.request.call_id,
    )
    if not call.config.emergency_route:
        call.note = "emergency: switch routes directly"
        return finish_with_own(
            core,
            call,
            503,
            "Service Unavailable",
            reason_text="Emergency call: route directly",
            why="emergency",
        )
    route = parse_uri(call.config.emergency_route)
    assert isinstance(route, SipUri)
    call.targets = [Target(route, 1.0)]
    call.advance(EMERGENCY)
    return try_next(core, call)


def _dialled(request: Request) -> str | None:
    try:
        return uri_user_number(request.uri)
    except SipParseError:
        return None
