"""The call's final for the switch: relayed (ClearIP's, a destination's, the best of several)
or our own, and what ending a call cleans up.

Rules of this module:

- Every call ends in :func:`relay_final`, exactly once: the call moves to DONE (``FINAL``),
  its call timers are cancelled, its client transactions still waiting for a final are reaped
  later, the switch gets the final through the INVITE server transaction, one call record is
  logged (``CallFinished``), ``call:<role>:<status>:<reason>`` is counted and the call is
  forgotten.
- Our own finals (:func:`finish_with_own`) carry a ``Reason`` saying why; ``why`` is the
  ``reason`` label of ``clearip_calls`` (fail-open, emergency, timeout, unreachable,
  cancelled). Relayed ones are labelled ``relayed``.
- Which final wins when every destination failed (§16.7 step 6): :func:`relay_best`; a
  downstream 503 becomes 500 for the switch.
- A destination's response is forwarded with our Via popped; when the Vias left are not the
  switch's, the switch could never match it: :func:`forward_response` repairs it.
"""

from __future__ import annotations

import functools
import logging
from typing import Final

from clearip.relay.proxy.call import FINAL, Phase, ProxyCall, best_response
from clearip.relay.proxy.effects import CallFinished, CancelTimer, Effect, StartTimer
from clearip.relay.proxy.replies import make_reply
from clearip.relay.proxy.state import AWAITING_FINAL, CoreState, CounterNames
from clearip.relay.proxy.timerkeys import (
    CANCEL_GUARD,
    PROVIDER,
    TIMER_C,
    UPSTREAM,
    CallTimerKey,
    ReapTimerKey,
)
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request, Response, select_headers

log = logging.getLogger("clearip.proxy")

_DONE: Final = Phase.DONE


def finish_with_own(
    core: CoreState,
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
    return relay_final(core, call, reply, own=why)


def relay_best(core: CoreState, call: ProxyCall) -> list[Effect]:
    """Every destination tried: the best of their finals, or our 503 when none gave one."""
    best = best_response(call.finals)
    if best is None:
        return finish_with_own(
            core,
            call,
            503,
            "Service Unavailable",
            reason_text="No usable destination",
            why="unreachable",
        )
    if best.status == 503:  # §16.7 step 6: a downstream 503 becomes 500 upstream
        best = best.copy()
        best.status, best.reason = 500, "Server Internal Error"
    return relay_final(core, call, best)


def relay_final(
    core: CoreState, call: ProxyCall, response: Response, *, own: str = ""
) -> list[Effect]:
    """The call's final to the switch: a destination's or ClearIP's (``own`` = "") or our
    own (``own`` says why: fail-open, emergency, timeout, unreachable, cancelled)."""
    call.advance(FINAL)
    call.final_status = response.status
    call_id = call.id
    effects: list[Effect] = [CancelTimer(CallTimerKey(call_id, UPSTREAM))]
    for index in range(len(call.branches)):
        effects.append(CancelTimer(CallTimerKey(call_id, PROVIDER, index)))
        effects.append(CancelTimer(CallTimerKey(call_id, TIMER_C, index)))
    effects.append(CancelTimer(CallTimerKey(call_id, CANCEL_GUARD)))
    # A client transaction still waiting for its final may never get one (a destination
    # that rang and ignores our CANCEL): forget it later. The others end by their own
    # timers (D, M), so they need no second one.
    reap_after = 64 * call.config.timers.t1 + 1.0
    for key in [call.upstream_key, *(b.txn_key for b in call.branches)]:
        entry = core.client_txns.get(key) if key is not None else None
        if key is not None and entry is not None and entry[0].state in AWAITING_FINAL:
            effects.append(StartTimer(ReapTimerKey(key), reap_after))
    if own:
        effects += core.respond(call, response)
    else:
        effects += forward_response(core, call, response)
    effects.append(CallFinished(functools.partial(call.summary, core.clock())))
    why = own or "relayed"
    names = core.call_names.get((call.role, why))
    if names is None:
        names = CounterNames(f"call:{call.role.value}:{{}}:{why}")
        core.call_names[(call.role, why)] = names
    core.counters[names.name(response.status)] += 1
    core.forget(call)
    return effects


def forward_response(core: CoreState, call: ProxyCall, response: Response) -> list[Effect]:
    """A destination's (or ClearIP's) response to the switch, our Via popped."""
    out = response.copy()
    out.pop_first_value("via")
    if not _via_set_leads_back(out, call.request):
        out = _repaired(core, call, response, out)
    return core.respond(call, out)


def _repaired(core: CoreState, call: ProxyCall, response: Response, out: Response) -> Response:
    """A destination's response whose Vias below ours are not the switch's (§16.7 step 3
    would drop it; the switch would then wait for a final it can never match). As a
    transaction-stateful proxy we answer the switch ourselves: a final >= 300 becomes our
    own response with that status, the switch's Via set, the destination's To tag and
    Reason; a provisional or 2xx keeps its body and dialog headers with the Via set
    replaced, so the dialog still forms."""
    core.counters["response_via_repaired"] += 1
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
