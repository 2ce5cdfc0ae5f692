"""The ClearIP leg of a call: the INVITE to ClearIP, its deadline, and reading its answer.

Rules:

- The INVITE goes to the ClearIP link of the caller's role with our stateful Via (the call's
  loop hash) and Max-Forwards minus one, in its own client transaction; ``upstream_timeout``
  (the call's config) bounds the wait for a final.
- A 302 with usable Contacts (:mod:`redirect`: sip/sips, not us, q order, at most
  ``max_contacts``) starts the destinations (``REDIRECTED``, :mod:`branches`), carrying the
  configured headers (Identity...). Any other final, or a 302 without usable Contacts, is
  relayed to the switch as it is (403, 404, 503, 603 mean what they mean). A final after the
  call moved on is late and absorbed (the transaction ACKs a non-2xx).
- Fail-open (:func:`fail_open`): when ClearIP is slow (the deadline), unreachable (no link, a
  transport error, Timer B) or the link is lost, the switch gets our 503 with a Reason and
  routes the call itself. A ClearIP leg that rang is CANCELled first.
"""

from __future__ import annotations

import logging
from typing import Final

from clearip.relay.proxy.branches import try_next
from clearip.relay.proxy.call import REDIRECTED, Phase, ProxyCall
from clearip.relay.proxy.effects import CancelTimer, Effect, StartTimer
from clearip.relay.proxy.finish import finish_with_own, relay_final
from clearip.relay.proxy.redirect import read_redirect
from clearip.relay.proxy.routing import (
    decrement_max_forwards,
    pop_own_routes,
    stateful_branch,
    via_value,
)
from clearip.relay.proxy.state import CoreState, reliable
from clearip.relay.proxy.timerkeys import UPSTREAM, CallTimerKey
from clearip.relay.sip.message import Response
from clearip.relay.sip.peer import Peer
from clearip.relay.sip.transaction import ClientInviteTransaction

log = logging.getLogger("clearip.proxy")

_CLEARIP: Final = Phase.CLEARIP


def send_upstream(core: CoreState, call: ProxyCall, upstream: Peer) -> list[Effect]:
    """Send the call's INVITE to ClearIP at ``upstream`` and start its deadline."""
    out = call.request.copy()
    pop_own_routes(out, core.locality)
    decrement_max_forwards(out)
    local = core.local_for(upstream)
    branch = stateful_branch(call.request, call.loop)
    out.prepend("Via", via_value(local, branch))
    call.upstream_peer = upstream
    key = ("client", branch, "INVITE")  # client_key_for(out), without parsing our Via
    txn = ClientInviteTransaction(
        out, reliable=reliable(upstream), timers=call.config.timers, key=key
    )
    call.upstream_key = key
    effects: list[Effect] = [
        StartTimer(CallTimerKey(call.id, UPSTREAM), call.config.upstream_timeout)
    ]
    return effects + core.start_client(key, txn, upstream, call)


def on_clearip_response(core: CoreState, call: ProxyCall, response: Response) -> list[Effect]:
    """A response from ClearIP for ``call``."""
    status = response.status
    if status < 200:
        call.upstream_provisional = True
        return []
    if call.phase is not _CLEARIP:
        core.counters["clearip_late_response"] += 1
        return []  # late: absorbed (the client transaction ACKs a late non-2xx)
    call.clearip_status = status
    call.clearip_latency = core.clock() - call.started
    core.latency.observe(call.clearip_latency)
    core.counters[core.clearip_names.name(status)] += 1
    effects: list[Effect] = [CancelTimer(CallTimerKey(call.id, UPSTREAM))]
    if status == 302:
        redirect = read_redirect(
            response, core.locality, call.config.copy_headers, call.config.max_contacts
        )
        for contact, why in redirect.skipped:
            log.info("Call-ID %s: Contact %s skipped: %s", call.request.call_id, contact, why)
        if redirect.targets:
            call.targets = list(redirect.targets)
            call.copied = redirect.copied
            for name, value in redirect.copied:
                if name.lower() == "identity":
                    call.identity = value  # decoded for the call's log line only
            call.advance(REDIRECTED)
            return effects + try_next(core, call)
        call.note = "302 without usable Contacts"
    return effects + relay_final(core, call, response)


def clearip_failed(core: CoreState, call: ProxyCall, why: str) -> list[Effect]:
    """ClearIP's transaction ended without a final (``why``: timeout, unreachable)."""
    if call.phase is not _CLEARIP:
        return []
    core.counters[f"clearip_{why}"] += 1
    return fail_open(core, call, f"ClearIP {why}")


def clearip_timeout(core: CoreState, call: ProxyCall) -> list[Effect]:
    """``upstream_timeout`` passed without ClearIP's final."""
    core.counters["clearip_timeout"] += 1
    return fail_open(core, call, "ClearIP did not answer in time")


def cancel_upstream(core: CoreState, call: ProxyCall) -> list[Effect]:
    """CANCEL the INVITE to ClearIP if it rang (§9.1: not before a provisional)."""
    if call.upstream_key is None:
        return []
    entry = core.client_txns.get(call.upstream_key)
    if entry is None or not call.upstream_provisional or call.upstream_peer is None:
        return []
    return core.send_cancel(entry[0].request, call.upstream_peer, call)


def fail_open(core: CoreState, call: ProxyCall, why: str) -> list[Effect]:
    """Give the switch our 503 (``why`` in its Reason) so it routes the call itself."""
    call.note = f"fail-open: {why}"
    effects = cancel_upstream(core, call)
    return effects + finish_with_own(
        core, call, 503, "Service Unavailable", reason_text=f"{why} (fail-open)", why="fail-open"
    )
