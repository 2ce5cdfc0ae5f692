"""Property tests of the transaction machines: whatever arrives in whatever order, a machine
never raises, keeps the caller's contract (checked by :class:`Driver`), reports at most one
Timeout and one Terminated, delivers responses in an order the RFC allows, and ends Terminated
once time passes and the party it waits for (the TU or the peer) has answered."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from clearip.relay.sip.transaction import (
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    Terminated,
    Timeout,
    TimerSettings,
)
from tests.test_transactions import Driver, Machine, ack_to, make_request, make_response

STATUSES = [100, 180, 183, 200, 202, 302, 404, 486, 503, 603]
TIMER_NAMES = list("ABDEFGHIJKLMZ")

events = st.one_of(
    st.tuples(st.just("message"), st.sampled_from(STATUSES)),
    st.tuples(st.just("request"), st.just(0)),
    st.tuples(st.just("ack"), st.just(0)),
    st.tuples(st.just("wait"), st.integers(min_value=0, max_value=4000)),  # in ms * 10
    st.tuples(st.just("stale-timer"), st.integers(0, len(TIMER_NAMES) - 1)),
    st.tuples(st.just("error"), st.just(0)),
)
timer_settings = st.builds(
    TimerSettings,
    t1=st.sampled_from([0.05, 0.5, 1.0]),
    t2=st.sampled_from([0.5, 4.0]),
    t4=st.sampled_from([0.1, 5.0]),
)
CLIENTS = (ClientInviteTransaction, ClientNonInviteTransaction)
SERVERS = (ServerInviteTransaction, ServerNonInviteTransaction)
KINDS: dict[str, tuple[type[Machine], str]] = {
    "ict": (ClientInviteTransaction, "INVITE"),
    "nict": (ClientNonInviteTransaction, "BYE"),
    "ist": (ServerInviteTransaction, "INVITE"),
    "nist": (ServerNonInviteTransaction, "OPTIONS"),
}


def play(d: Driver[Machine], event: tuple[str, int]) -> None:
    machine, (what, value) = d.machine, event
    req = machine.request
    if what == "message":
        if isinstance(machine, CLIENTS):
            d.apply(machine.on_response(make_response(value, req)))
        else:
            d.apply(machine.send_response(make_response(value, req)))
    elif what == "request" and isinstance(
        machine, ServerInviteTransaction | ServerNonInviteTransaction
    ):
        d.apply(machine.on_request(req))
    elif what == "ack" and isinstance(machine, ServerInviteTransaction):
        d.apply(machine.on_request(ack_to(req)))
    elif what == "wait":
        d.advance(value / 100)
    elif what == "stale-timer":
        name = TIMER_NAMES[value]
        if name not in d.timers:  # the caller's late callback for a stopped timer
            assert machine.on_timer(name) == []
    elif what == "error":
        d.apply(machine.on_transport_error())


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    reliable=st.booleans(),
    timers=timer_settings,
    script=st.lists(events, max_size=25),
)
def test_any_event_sequence_keeps_the_contract_and_ends_terminated(
    kind: str, reliable: bool, timers: TimerSettings, script: list[tuple[str, int]]
) -> None:
    cls, method = KINDS[kind]
    machine: Machine = cls(make_request(method), reliable=reliable, timers=timers)
    d = Driver(machine)
    if isinstance(machine, CLIENTS):
        d.apply(machine.start())
    for event in script:
        play(d, event)

    # Responses go up in an order the RFC allows: provisionals, then either 2xx (INVITE:
    # any number, RFC 6026) or exactly one final.
    delivered = d.delivered
    finals = [s for s in delivered if s >= 200]
    assert all(s >= 200 for s in delivered[len(delivered) - len(finals) :])
    if kind == "ict" and finals and finals[0] < 300:
        assert all(200 <= s < 300 for s in finals)
    else:
        assert len(finals) <= 1

    # With time, a machine ends or waits for the party it depends on; give it that answer.
    d.run_out()
    if not d.terminated:
        waiting = {"ict": "PROCEEDING", "ist": "PROCEEDING", "nist": "TRYING PROCEEDING"}
        assert machine.state.name in waiting.get(kind, "").split(), machine.state
        play(d, ("message", 486))
        if kind == "ist":
            play(d, ("ack", 0))
        d.run_out()
    assert d.terminated and machine.state.name == "TERMINATED"
    assert d.count(Terminated) == 1 and d.count(Timeout) <= 1


@settings(max_examples=100, deadline=None)
@given(
    t1=st.floats(min_value=0.01, max_value=2.0),
    t2=st.floats(min_value=0.01, max_value=8.0),
)
def test_udp_retransmission_intervals_for_any_t1_and_t2(t1: float, t2: float) -> None:
    timers = TimerSettings(t1=t1, t2=t2)
    ict = ClientInviteTransaction(make_request(), reliable=False, timers=timers)
    nict = ClientNonInviteTransaction(make_request("BYE"), reliable=False, timers=timers)
    invite, other = Driver(ict), Driver(nict)
    invite.apply(ict.start())
    other.apply(nict.start())
    invite.run_out()
    other.run_out()
    a, e = invite.delays("A"), other.delays("E")
    assert a == [t1 * 2**k for k in range(len(a))]  # no cap: Timer B ends it
    expected_e = [t1]
    while len(expected_e) < len(e):
        expected_e.append(min(2 * expected_e[-1], t2))
    assert e == expected_e
    # Timer A fires until B: the last retransmission is the one before 64*T1.
    assert sum(a[:-1]) < 64 * t1 <= sum(a)
    assert invite.of(Timeout)[0][0] == other.of(Timeout)[0][0] == 64 * t1
