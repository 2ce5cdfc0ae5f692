"""A call's phases are a checked transition table (relay/proxy/call.py), and the core's timers
are keyed by typed values (relay/proxy/timerkeys.py)."""

from __future__ import annotations

import pytest

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.call import (
    EMERGENCY,
    FINAL,
    PHASE_TABLE,
    REDIRECTED,
    Phase,
    PhaseError,
    ProxyCall,
    compile_phase_table,
)
from clearip.relay.proxy.timerkeys import (
    PROVIDER,
    TIMER_C,
    UPSTREAM,
    CallTimerKey,
    ReapTimerKey,
    TxTimerKey,
)
from clearip.relay.sip.peer import Peer
from tests.test_proxy_core import invite


def _call() -> ProxyCall:
    return ProxyCall(
        id=1,
        request=invite(),
        source=Peer("udp", "192.0.2.10", 5060),
        role=Role.SWITCH,
        started=0.0,
        server_key=("3261", "z9hG4bKsw1", "192.0.2.10:5060", "INVITE"),
        config=ProxyConfig(),
    )


@pytest.mark.parametrize(
    ("events", "phases"),
    [
        ([REDIRECTED, FINAL], [Phase.ROUTING, Phase.DONE]),
        ([EMERGENCY, FINAL], [Phase.ROUTING, Phase.DONE]),
        ([FINAL], [Phase.DONE]),
    ],
)
def test_every_life_in_the_table(events: list[int], phases: list[Phase]) -> None:
    call = _call()
    assert call.phase is Phase.CLEARIP
    seen = []
    for event in events:
        call.advance(event)
        seen.append(call.phase)
    assert seen == phases


@pytest.mark.parametrize(
    "events",
    [[FINAL, FINAL], [FINAL, REDIRECTED], [REDIRECTED, REDIRECTED], [REDIRECTED, EMERGENCY], [6]],
)
def test_a_move_the_table_lacks_raises_and_leaves_the_phase(events: list[int]) -> None:
    call = _call()
    for event in events[:-1]:
        call.advance(event)
    before = call.phase
    with pytest.raises(PhaseError):
        call.advance(events[-1])
    assert call.phase is before


def test_the_phase_is_changed_only_by_advance() -> None:
    call = _call()
    with pytest.raises(AttributeError):
        call.phase = Phase.DONE  # type: ignore[misc]
    assert call.phase is Phase.CLEARIP


def test_the_table_is_checked_when_compiled() -> None:
    assert len(compile_phase_table(PHASE_TABLE)) == len(PHASE_TABLE)
    with pytest.raises(TypeError, match="unknown event"):
        compile_phase_table({**PHASE_TABLE, (Phase.ROUTING, "redirect"): Phase.ROUTING})
    with pytest.raises(TypeError, match="never leaves DONE"):
        compile_phase_table({**PHASE_TABLE, (Phase.DONE, "final"): Phase.DONE})
    without_end = {k: v for k, v in PHASE_TABLE.items() if k != (Phase.ROUTING, "final")}
    with pytest.raises(TypeError, match="cannot end"):
        compile_phase_table(without_end)


def test_timer_keys_are_values() -> None:
    txn = ("client", "z9hG4bKcip1", "INVITE")
    assert TxTimerKey(txn, "A") == TxTimerKey(("client", "z9hG4bKcip1", "INVITE"), "A")
    assert hash(TxTimerKey(txn, "A")) == hash(TxTimerKey(tuple(list(txn)), "A"))
    assert TxTimerKey(txn, "A") != TxTimerKey(txn, "B")
    assert TxTimerKey(txn, "A") != ReapTimerKey(txn)
    assert CallTimerKey(3, PROVIDER, 1) == CallTimerKey(3, PROVIDER, 1)
    assert len({CallTimerKey(3, PROVIDER, 1), CallTimerKey(3, TIMER_C, 1)}) == 2
    assert CallTimerKey(3, UPSTREAM) != CallTimerKey(4, UPSTREAM)
    assert CallTimerKey(3, UPSTREAM) != (3, UPSTREAM)
    assert repr(CallTimerKey(3, TIMER_C, 0)) == "CallTimerKey(3, timer-c, 0)"
    # A key made again cancels the timer started with another (what the timer wheel relies on).
    timers = {CallTimerKey(3, PROVIDER, 0): 1.0, TxTimerKey(txn, "B"): 2.0}
    assert timers.pop(CallTimerKey(3, PROVIDER, 0)) == 1.0
    assert timers.pop(TxTimerKey(("client", "z9hG4bKcip1", "INVITE"), "B")) == 2.0
