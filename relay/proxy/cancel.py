"""The caller's CANCEL (RFC 3261 §9.2, §16.10): answered at once, then the pending INVITE is
given up.

Rules:

- The CANCEL is answered 200 hop by hop when it matches an INVITE we have (a call being set
  up, or a server transaction still answering), 481 otherwise; it is never forwarded as such:
  we send our own CANCELs (§16.10).
- A call waiting for ClearIP: its ClearIP leg is CANCELled if it rang, and the switch gets our
  487 at once.
- A call trying destinations: every live branch is CANCELled (one that has not rung yet is
  abandoned, and CANCELled when it does) and its final, normally 487, is relayed when it
  comes. A guard (64*T1, :data:`timerkeys.CANCEL_GUARD`) answers 487 ourselves if no branch
  ever does (:func:`cancel_guard_expired`).
- A call already answered, or already cancelled: the 200 only.
"""

from __future__ import annotations

from typing import Final

from clearip.relay.proxy.branches import cancel_branch
from clearip.relay.proxy.call import Phase, ProxyCall
from clearip.relay.proxy.clearip_leg import cancel_upstream
from clearip.relay.proxy.effects import Effect, StartTimer
from clearip.relay.proxy.finish import finish_with_own
from clearip.relay.proxy.replies import reply_stateless
from clearip.relay.proxy.state import CoreState
from clearip.relay.proxy.timerkeys import CANCEL_GUARD, CallTimerKey
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request
from clearip.relay.sip.peer import Peer
from clearip.relay.sip.transaction.matching import cancel_target_key

_CLEARIP: Final = Phase.CLEARIP
_DONE: Final = Phase.DONE


def on_cancel(core: CoreState, request: Request, peer: Peer) -> list[Effect]:
    """A CANCEL from ``peer`` (see the module docstring)."""
    try:
        key = cancel_target_key(request)
    except SipParseError:
        return []
    call = core.by_server_key.get(key)
    if call is None:
        if key in core.server_txns:
            return reply_stateless(request, peer, 200, "OK")
        return reply_stateless(request, peer, 481, "Call/Transaction Does Not Exist")
    effects = reply_stateless(request, peer, 200, "OK")
    if call.phase is _DONE or call.cancelled:
        return effects
    call.cancelled = True
    call.note = "cancelled by caller"
    core.counters["cancelled"] += 1
    if call.phase is _CLEARIP:
        effects += cancel_upstream(core, call)
        return effects + _cancelled(core, call)
    # ROUTING: cancel the live branches and relay their final (487) when it comes; guard
    # against a destination that never answers the CANCEL.
    live = [b for b in call.branches if b.status is None and not b.abandoned]
    if not live:
        return effects + _cancelled(core, call)
    for branch in live:
        effects += cancel_branch(core, call, branch)
    effects.append(StartTimer(CallTimerKey(call.id, CANCEL_GUARD), 64 * call.config.timers.t1))
    return effects


def cancel_guard_expired(core: CoreState, call: ProxyCall) -> list[Effect]:
    """No branch answered our CANCELs in time: the switch gets our own 487."""
    return _cancelled(core, call)


def _cancelled(core: CoreState, call: ProxyCall) -> list[Effect]:
    return finish_with_own(core, call, 487, "Request Terminated", why="cancelled")
