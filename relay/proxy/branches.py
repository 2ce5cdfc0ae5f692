"""The destinations of a call: one branch at a time, in q order, until one answers.

Like Kamailio's ``tm`` serial forking after ``uac_redirect``. ClearIP's 302 gave the targets
(:mod:`redirect`); :func:`try_next` sends the INVITE to the next one in its own client
transaction. Rules:

- Each branch gets Record-Route (twice when the transport changes, RFC 5658), our stateful Via
  with the call's loop hash, Max-Forwards minus one and the headers copied from the 302.
- Two deadlines per branch: ``provider_timeout`` for a first answer (not for emergency calls:
  :func:`provider_silent` moves on), and Timer C for ringing (§16.6 step 11, reset by
  101-199; :func:`timer_c` CANCELs it and moves on).
- Route advance: a final in ``route_advance_codes`` (before anything reached the switch and
  while targets remain), a silent destination, or a failed transaction
  (:func:`branch_failed`) tries the next target; otherwise the best final goes to the switch
  (``finish.relay_best``).
- A 1xx other than 100 goes to the switch; the first 2xx is the call's final, and every
  branch still ringing is CANCELled (§16.7 step 10); a further 2xx (forking downstream) is
  passed on. A branch abandoned (skipped, timed out) that rings is CANCELled; a late 2xx
  from one is counted and logged.
"""

from __future__ import annotations

import logging
from typing import Final

from clearip.relay.proxy.call import Branch, Phase, ProxyCall
from clearip.relay.proxy.effects import CancelTimer, Effect, StartTimer
from clearip.relay.proxy.finish import finish_with_own, forward_response, relay_best, relay_final
from clearip.relay.proxy.routing import (
    decrement_max_forwards,
    peer_for_uri,
    pop_own_routes,
    record_route_value,
    stateful_branch,
    via_value,
)
from clearip.relay.proxy.state import CoreState, reliable
from clearip.relay.proxy.timerkeys import PROVIDER, TIMER_C, CallTimerKey
from clearip.relay.sip.message import Response
from clearip.relay.sip.transaction import ClientInviteTransaction

log = logging.getLogger("clearip.proxy")

# §16.6 step 11 / §16.8: a branch that rings longer than this is cancelled (Timer C > 3 min).
TIMER_C_DELAY = 181.0
_DONE: Final = Phase.DONE


def try_next(core: CoreState, call: ProxyCall) -> list[Effect]:
    """Send the INVITE to the next target, or relay the best final when none is left."""
    index = len(call.branches)
    if index >= len(call.targets):
        return relay_best(core, call)
    target = call.targets[index]
    out = call.request.copy()
    pop_own_routes(out, core.locality)
    out.set_uri(target.uri_text)
    for name, _ in call.copied:
        out.remove(name.lower())
    for name, value in call.copied:
        out.append(name, value)
    decrement_max_forwards(out)
    dest = peer_for_uri(target.uri)
    incoming = core.local_for(call.source, record_route=True)
    outgoing = core.local_for(dest, record_route=True)
    if incoming is not outgoing and incoming != outgoing:
        out.prepend("Record-Route", record_route_value(incoming))
    out.prepend("Record-Route", record_route_value(outgoing))
    via = outgoing if outgoing.transport == dest.transport else core.local_for(dest)
    via_branch = stateful_branch(call.request, call.loop)
    out.prepend("Via", via_value(via, via_branch))
    key = ("client", via_branch, "INVITE")  # client_key_for(out), without parsing our Via
    txn = ClientInviteTransaction(out, reliable=reliable(dest), timers=call.config.timers, key=key)
    call.branches.append(Branch(target=target, request=out, peer=dest, txn_key=key))
    effects: list[Effect] = [StartTimer(CallTimerKey(call.id, TIMER_C, index), TIMER_C_DELAY)]
    if not call.emergency:
        effects.append(
            StartTimer(CallTimerKey(call.id, PROVIDER, index), call.config.provider_timeout)
        )
    return effects + core.start_client(key, txn, dest, call)


def cancel_branch(core: CoreState, call: ProxyCall, branch: Branch) -> list[Effect]:
    """Give up on ``branch``: CANCEL it if it rang (§9.1: not before a provisional), or mark
    it abandoned so that a later provisional is CANCELled then."""
    if branch.cancelled or not branch.provisional:
        branch.abandoned = True
        return []
    branch.cancelled = True
    return core.send_cancel(branch.request, branch.peer, call)


def on_branch_response(
    core: CoreState, call: ProxyCall, index: int, branch: Branch, response: Response
) -> list[Effect]:
    """A response from the destination of ``branch`` (the ``index``-th)."""
    status = response.status
    effects: list[Effect] = [CancelTimer(CallTimerKey(call.id, PROVIDER, index))]
    if branch.abandoned:
        if status < 200 and not branch.cancelled:
            return effects + cancel_branch(core, call, branch)
        if 200 <= status < 300:
            core.counters["late_2xx_abandoned_branch"] += 1
            log.warning(
                "Call-ID %s: %s answered after being skipped", call.request.call_id, branch.peer
            )
        return effects
    if status < 200:
        branch.provisional = True
        if status == 100:
            return effects
        # §16.7 step 2: a provisional response from 101 to 199 resets Timer C.
        effects.append(StartTimer(CallTimerKey(call.id, TIMER_C, index), TIMER_C_DELAY))
        if call.phase is _DONE:
            return effects
        call.early_sent = True
        return effects + forward_response(core, call, response)
    branch.status = status
    branch.outcome = str(status)
    if 200 <= status < 300:
        if call.phase is _DONE:  # a further 2xx (forking downstream): pass it on
            return effects + forward_response(core, call, response)
        # §16.7 step 10: the call is answered; CANCEL whatever else is still ringing.
        for other in call.branches:
            if other.status is None and not other.cancelled:
                effects += cancel_branch(core, call, other)
        return effects + relay_final(core, call, response)
    if call.phase is _DONE:
        return effects
    call.finals.append(response)
    if call.cancelled:
        return effects + relay_final(core, call, response)
    if (
        status in call.config.route_advance_codes
        and not call.early_sent
        and len(call.branches) < len(call.targets)
    ):
        core.counters["route_advance"] += 1
        return effects + try_next(core, call)
    return effects + relay_best(core, call)


def provider_silent(core: CoreState, call: ProxyCall, index: int) -> list[Effect]:
    """``provider_timeout`` passed without a word from the ``index``-th destination."""
    branch = call.branches[index]
    if branch.provisional or branch.status is not None:
        return []
    branch.abandoned = True
    branch.outcome = "no answer"
    core.counters["provider_timeout"] += 1
    if len(call.branches) < len(call.targets) and not call.cancelled:
        core.counters["route_advance"] += 1
        return try_next(core, call)
    if call.finals:
        return relay_best(core, call)
    return finish_with_own(
        core, call, 408, "Request Timeout", reason_text="No destination answered", why="timeout"
    )


def timer_c(core: CoreState, call: ProxyCall, index: int) -> list[Effect]:
    """The ``index``-th destination rang past Timer C: CANCEL it and move on."""
    branch = call.branches[index]
    if branch.status is not None or branch.abandoned:
        return []
    core.counters["timer_c"] += 1
    effects = cancel_branch(core, call, branch)
    branch.abandoned = True
    return effects + branch_failed(core, call, branch, "timeout")


def branch_failed(core: CoreState, call: ProxyCall, branch: Branch, why: str) -> list[Effect]:
    """No final will come from ``branch`` (``why``: timeout, unreachable)."""
    branch.status = branch.status or 503
    branch.outcome = why
    index = call.branches.index(branch)
    effects: list[Effect] = [CancelTimer(CallTimerKey(call.id, PROVIDER, index))]
    if call.phase is _DONE or branch.abandoned:
        return effects
    if len(call.branches) < len(call.targets) and not call.cancelled and not call.early_sent:
        core.counters["route_advance"] += 1
        return effects + try_next(core, call)
    if call.finals:
        return effects + relay_best(core, call)
    status = 408 if why == "timeout" else 503
    return effects + finish_with_own(
        core,
        call,
        status,
        "Request Timeout" if status == 408 else "Service Unavailable",
        reason_text=f"Destination {why}",
        why=why,
    )
