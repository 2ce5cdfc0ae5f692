"""What the proxy relays without a transaction or a call: in-dialog requests, their responses,
and answers to INVITEs whose call is gone (RFC 3261 §16.4-§16.7, §16.12).

Like Kamailio's ``rr`` with stateless forwarding. Rules:

- An in-dialog request (a To tag, or an ACK for a 2xx) is loose-routed by its Route headers
  alone (:func:`route_in_dialog`): Max-Forwards 0 is 483 (not for an ACK, which gets no
  response), a Request-URI naming us means the previous hop was a strict router (the last
  Route is the target), our own Route entries are popped, and it goes to the next Route or the
  Request-URI with our stateless Via (a hash of the request: a retransmission gets the same
  branch). One naming only us gets 404 (an ACK is dropped). Counted per method.
- A response whose top Via is ours with a stateless branch (:func:`route_response`) answers one
  of those: our Via is popped and it goes where the next Via says.
- A response with our stateful INVITE branch but no transaction here answers a call this
  process no longer has (a worker restart, :mod:`orphans`): the switch still gets a final,
  only if the Via below ours names an element on the trust list (no reflection).
- Anything else is a stray: dropped and counted.
"""

from __future__ import annotations

from clearip.relay.proxy.admission import hops_exhausted
from clearip.relay.proxy.effects import Effect, Send
from clearip.relay.proxy.orphans import orphan_answer
from clearip.relay.proxy.replies import reply_stateless
from clearip.relay.proxy.routing import (
    STATEFUL_PREFIX,
    decrement_max_forwards,
    next_hop,
    peer_for_uri,
    pop_own_routes,
    response_next_hop,
    stamp_received,
    stateless_branch,
    via_return_peer,
    via_value,
)
from clearip.relay.proxy.state import CoreState, reliable
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.peer import Peer
from clearip.relay.sip.uri import SipUri


def route_in_dialog(core: CoreState, request: Request, peer: Peer) -> list[Effect]:
    """Stateless loose routing (§16.4, §16.6, §16.12)."""
    if request.method != "ACK" and hops_exhausted(request):
        return reply_stateless(request, peer, 483, "Too Many Hops")
    stamp_received(request, peer)
    out = request
    try:
        ruri = out.uri
    except SipParseError as exc:
        return reply_stateless(request, peer, 400, exc.reason)
    locality = core.locality
    if isinstance(ruri, SipUri) and locality.is_us(ruri):
        # The previous hop was a strict router: the real target is the last Route.
        routes = out.get_all("route")
        if routes:
            last = out.addresses("route")[-1]
            out.set_uri(last.uri_text)
            remaining = routes[:-1]
            out.remove("route")
            for value in remaining:
                out.append("Route", value)
    pop_own_routes(out, locality)
    target = next_hop(out)
    if target is None or locality.is_us(target):
        if out.method == "ACK":
            return []
        return reply_stateless(request, peer, 404, "Not Here")
    decrement_max_forwards(out)
    dest = peer_for_uri(target)
    local = core.local_for(dest)
    out.prepend(
        "Via",
        via_value(local, stateless_branch(request), peer.conn if reliable(peer) else None),
    )
    core.counters[core.in_dialog_names.name(out.method)] += 1
    return [Send(out, dest)]


def route_response(core: CoreState, response: Response, peer: Peer) -> list[Effect]:
    """A response that matches none of our transactions (see the module docstring)."""
    forwarded = response_next_hop(response, core.locality)
    if forwarded is not None:
        return [Send(forwarded[0], forwarded[1])]
    if _is_our_invite_branch(core, response):
        return _orphan_response(core, response, peer)
    core.counters["stray_response"] += 1
    return []


def _is_our_invite_branch(core: CoreState, response: Response) -> bool:
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
        and core.locality.via_host_is_us(top)
    )


def _orphan_response(core: CoreState, response: Response, peer: Peer) -> list[Effect]:
    """An answer to an INVITE whose call this process does not have (its worker was
    restarted, say): the switch still gets a final (:mod:`orphans`)."""
    outcome, onward, ack = orphan_answer(response)
    dest: Peer | None = None
    if onward is not None:
        try:
            dest = via_return_peer(onward.top_via)
        except SipParseError:
            dest = None
        if dest is None or core.role_of(dest.host) is None:
            # Without the call we cannot vouch for the Via below ours: only an element on
            # the trust list (the switch that sent the INVITE) is answered this way.
            core.counters["stray_response"] += 1
            return []
    core.counters[f"orphan_response_{outcome}"] += 1
    effects: list[Effect] = []
    if ack is not None:
        effects.append(Send(ack, peer))
    if onward is not None and dest is not None:
        effects.append(Send(onward, dest))
    return effects
