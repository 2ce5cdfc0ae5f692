"""The four transaction machines, driven through every state and timer on a virtual clock.

:class:`Driver` plays the caller: it executes actions, keeps the pending timers, advances a
virtual clock firing due timers in order, and checks the contract every caller relies on
(timers started with a positive delay, only running timers stopped, ``Terminated`` last, once,
with no timer left running, nothing after it). Messages are real parsed SIP.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import pytest

from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.parser import parse_message
from clearip.relay.sip.transaction import (
    Action,
    ClientInviteState,
    ClientInviteTransaction,
    ClientNonInviteState,
    ClientNonInviteTransaction,
    DeliverRequest,
    DeliverResponse,
    SendMessage,
    ServerInviteState,
    ServerInviteTransaction,
    ServerNonInviteState,
    ServerNonInviteTransaction,
    StartTimer,
    StopTimer,
    Terminated,
    Timeout,
    TimerSettings,
    TransportError,
    client_key,
    server_key,
)

Machine = (
    ClientInviteTransaction
    | ClientNonInviteTransaction
    | ServerInviteTransaction
    | ServerNonInviteTransaction
)

BRANCH = "z9hG4bK-7f3a"
A = TypeVar("A")
M = TypeVar("M", bound=Machine)


# -- messages ----------------------------------------------------------------------------------
def make_request(
    method: str = "INVITE",
    *,
    branch: str = BRANCH,
    sent_by: str = "192.0.2.1:5060",
    uri: str = "sip:+12125550100@carrier.example.net",
    to_tag: str | None = None,
    from_tag: str = "f-1",
    call_id: str = "call-1@192.0.2.1",
    cseq: int = 7,
    lower_vias: tuple[str, ...] = (),
    routes: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    body: bytes = b"",
) -> Request:
    to = "<sip:+12125550100@carrier.example.net>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP {sent_by};branch={branch}",
        *(f"Via: {via}" for via in lower_vias),
        *(f"Route: {route}" for route in routes),
        "Max-Forwards: 69",
        f"From: <sip:+13035550123@switch.example.com>;tag={from_tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *extra,
        f"Content-Length: {len(body)}",
    ]
    message = parse_message("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    assert isinstance(message, Request)
    return message


def make_response(status: int, request: Request, *, to_tag: str | None = "t-1") -> Response:
    """A response to ``request`` as its server would build it (§8.2.6)."""
    to = request.get("to") or ""
    if to_tag and request.to_tag is None:
        to += f";tag={to_tag}"
    lines = [
        f"SIP/2.0 {status} Reason",
        *(f"Via: {via}" for via in request.get_all("via")),
        f"From: {request.get('from')}",
        f"To: {to}",
        f"Call-ID: {request.call_id}",
        f"CSeq: {request.get('cseq')}",
        "Content-Length: 0",
    ]
    message = parse_message("\r\n".join(lines).encode() + b"\r\n\r\n")
    assert isinstance(message, Response)
    return message


def ack_to(invite: Request, to_tag: str = "t-1") -> Request:
    """The ACK a UAC sends for a 300-699 (same branch, To tag of the response)."""
    return make_request("ACK", branch=invite.top_via.branch or "", to_tag=to_tag)


# -- the caller --------------------------------------------------------------------------------
@dataclass
class Driver(Generic[M]):
    """Executes a transaction's actions against a virtual clock and records what it did."""

    machine: M
    now: float = 0.0
    timers: dict[str, tuple[float, int]] = field(default_factory=dict)  # name -> (due, order)
    log: list[tuple[float, Action]] = field(default_factory=list)
    terminated: bool = False
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def apply(self, actions: list[Action]) -> list[Action]:
        if self.terminated:
            assert actions == [], f"actions after Terminated: {actions}"
        for index, action in enumerate(actions):
            self.log.append((self.now, action))
            if isinstance(action, StartTimer):
                assert action.delay > 0, f"zero timer started: {action}"
                self.timers[action.name] = (self.now + action.delay, next(self._order))
            elif isinstance(action, StopTimer):
                assert action.name in self.timers, f"{action} for a timer not running"
                del self.timers[action.name]
            elif isinstance(action, Terminated):
                assert index == len(actions) - 1, "Terminated is not the last action"
                assert not self.timers, f"timers left running at Terminated: {self.timers}"
                self.terminated = True
        return actions

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, firing due timers in time order (ties: start order)."""
        until = self.now + seconds
        while self.timers:
            name, (due, _) = min(self.timers.items(), key=lambda item: item[1])
            if due > until + 1e-9:
                break
            del self.timers[name]
            self.now = due
            self.apply(self.machine.on_timer(name))
        self.now = until

    def run_out(self) -> None:
        """Fire every pending timer, however far away."""
        self.advance(10_000)

    # What happened, by kind.
    def of(self, kind: type[A]) -> list[tuple[float, A]]:
        return [(at, action) for at, action in self.log if isinstance(action, kind)]

    @property
    def sent(self) -> list[Message]:
        return [action.message for _, action in self.of(SendMessage)]

    @property
    def sent_statuses(self) -> list[int]:
        return [m.status for m in self.sent if isinstance(m, Response)]

    @property
    def send_times(self) -> list[float]:
        return [round(at, 6) for at, _ in self.of(SendMessage)]

    @property
    def delivered(self) -> list[int]:
        return [action.response.status for _, action in self.of(DeliverResponse)]

    def delays(self, name: str) -> list[float]:
        return [action.delay for _, action in self.of(StartTimer) if action.name == name]

    def count(self, kind: type) -> int:
        return len(self.of(kind))


C = TypeVar("C", ClientInviteTransaction, ClientNonInviteTransaction)


def client(machine: C) -> Driver[C]:
    driver = Driver(machine)
    driver.apply(machine.start())
    return driver


def ict(
    reliable: bool = False, timers: TimerSettings | None = None
) -> Driver[ClientInviteTransaction]:
    return client(ClientInviteTransaction(make_request(), reliable=reliable, timers=timers or T))


def nict(
    method: str = "BYE", reliable: bool = False, timers: TimerSettings | None = None
) -> Driver[ClientNonInviteTransaction]:
    txn = ClientNonInviteTransaction(make_request(method), reliable=reliable, timers=timers or T)
    return client(txn)


def ist(
    reliable: bool = False, timers: TimerSettings | None = None
) -> Driver[ServerInviteTransaction]:
    return Driver(ServerInviteTransaction(make_request(), reliable=reliable, timers=timers or T))


def nist(method: str = "BYE", reliable: bool = False) -> Driver[ServerNonInviteTransaction]:
    return Driver(ServerNonInviteTransaction(make_request(method), reliable=reliable))


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


T = TimerSettings()


# -- client INVITE -----------------------------------------------------------------------------
def test_ict_start_sends_and_starts_a_and_b_over_udp() -> None:
    req = make_request()
    txn = ClientInviteTransaction(req, reliable=False)
    assert txn.state is ClientInviteState.CALLING and txn.request is req
    assert txn.start() == [SendMessage(req), StartTimer("A", 0.5), StartTimer("B", 32.0)]
    assert txn.start() == []  # only once


def test_ict_start_on_reliable_transport_has_no_timer_a() -> None:
    req = make_request()
    txn = ClientInviteTransaction(req, reliable=True)
    assert txn.start() == [SendMessage(req), StartTimer("B", 32.0)]


def test_ict_timer_a_doubles_until_timer_b_times_out_once() -> None:
    d = ict()
    d.advance(31.9)
    assert d.send_times == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert d.delays("A") == [0.5, 1, 2, 4, 8, 16, 32]  # doubling, no T2 cap for INVITE
    assert d.count(Timeout) == 0
    d.advance(0.1)  # Timer B at 64*T1 = 32 s
    assert d.machine.state is ClientInviteState.TERMINATED
    assert [type(a) for _, a in d.log[-3:]] == [StopTimer, Timeout, Terminated]
    d.run_out()
    assert d.count(Timeout) == 1 and d.count(Terminated) == 1


def test_ict_timer_a_is_not_capped_by_t2() -> None:
    d = ict(timers=TimerSettings(t1=1.0, t2=2.0))
    d.run_out()
    assert d.delays("A") == [1, 2, 4, 8, 16, 32, 64]
    assert d.of(Timeout)[0][0] == 64  # B = 64*T1


def test_ict_reliable_sends_once_and_times_out_with_b() -> None:
    d = ict(reliable=True)
    d.run_out()
    assert d.send_times == [0]
    assert d.of(Timeout)[0][0] == 32 and d.count(Terminated) == 1


def test_ict_provisional_moves_to_proceeding_and_stops_a_and_b() -> None:
    d = ict()
    req = d.machine.request
    ringing = make_response(180, req)
    d.advance(0.7)  # one retransmission already
    actions = d.apply(d.machine.on_response(ringing))
    assert actions == [StopTimer("A"), StopTimer("B"), DeliverResponse(ringing)]
    assert d.machine.state is ClientInviteState.PROCEEDING
    d.apply(d.machine.on_response(make_response(183, req)))
    d.advance(300)  # Proceeding waits for the TU (Timer C in a proxy), not for Timer B
    assert d.send_times == [0, 0.5] and d.delivered == [180, 183]
    assert d.count(Timeout) == 0 and not d.terminated


@pytest.mark.parametrize("provisional", [False, True])
def test_ict_non2xx_is_acked_delivered_once_and_completed_for_timer_d(provisional: bool) -> None:
    d = ict()
    req = d.machine.request
    if provisional:
        d.apply(d.machine.on_response(make_response(100, req)))
    d.advance(2)
    busy = make_response(486, req)
    actions = d.apply(d.machine.on_response(busy))
    assert d.machine.state is ClientInviteState.COMPLETED
    ack = d.sent[-1]
    assert isinstance(ack, Request) and ack.method == "ACK" and actions[-3] == SendMessage(ack)
    assert actions[-2:] == [DeliverResponse(busy), StartTimer("D", 32.0)]
    # Retransmissions of the final: the same ACK again, never delivered again.
    for _ in range(3):
        assert d.apply(d.machine.on_response(busy)) == [SendMessage(ack)]
    assert d.delivered == ([100, 486] if provisional else [486])
    d.apply(d.machine.on_response(make_response(180, req)))  # late provisional: ignored
    d.advance(31.9)
    assert not d.terminated
    d.advance(0.1)
    assert d.terminated and d.log[-1] == (34.0, Terminated())


def test_ict_timer_d_respects_a_larger_t1() -> None:
    d = ict(timers=TimerSettings(t1=1.0))
    d.apply(d.machine.on_response(make_response(503, d.machine.request)))
    assert d.delays("D") == [64]


def test_ict_non2xx_on_reliable_transport_terminates_at_once() -> None:
    d = ict(reliable=True)
    req = d.machine.request
    d.apply(d.machine.on_response(make_response(180, req)))
    busy = make_response(603, req)
    actions = d.apply(d.machine.on_response(busy))
    ack = d.sent[-1]
    assert actions == [SendMessage(ack), DeliverResponse(busy), Terminated()]
    assert d.machine.state is ClientInviteState.TERMINATED
    assert d.apply(d.machine.on_response(busy)) == []  # no ACK once terminated


def test_ict_non2xx_straight_from_calling_on_reliable_transport() -> None:
    d = ict(reliable=True)
    busy = make_response(404, d.machine.request)
    actions = d.apply(d.machine.on_response(busy))
    assert [type(a) for a in actions] == [StopTimer, SendMessage, DeliverResponse, Terminated]


@pytest.mark.parametrize("provisional", [False, True])
def test_ict_2xx_is_accepted_and_every_2xx_goes_up_until_timer_m(provisional: bool) -> None:
    d = ict()
    req = d.machine.request
    if provisional:
        d.apply(d.machine.on_response(make_response(180, req)))
    ok = make_response(200, req)
    actions = d.apply(d.machine.on_response(ok))
    assert d.machine.state is ClientInviteState.ACCEPTED
    assert actions[-2:] == [DeliverResponse(ok), StartTimer("M", 32.0)]
    d.advance(10)
    d.apply(d.machine.on_response(ok))  # retransmitted 2xx: up again (RFC 6026)
    d.apply(d.machine.on_response(make_response(200, req, to_tag="fork-2")))  # another fork
    d.apply(d.machine.on_response(make_response(486, req)))  # ignored in Accepted
    d.apply(d.machine.on_response(make_response(183, req)))  # ignored in Accepted
    assert d.delivered == ([180] if provisional else []) + [200, 200, 200]
    assert d.send_times == [0]  # never an ACK for a 2xx: that is end to end, the TU's
    assert d.apply(d.machine.on_transport_error()) == []  # nothing is sent in Accepted
    d.advance(21.9)
    assert not d.terminated
    d.advance(0.1)
    assert d.terminated and d.count(Timeout) == 0
    assert d.apply(d.machine.on_response(ok)) == []


def test_ict_accepted_also_on_reliable_transports() -> None:
    d = ict(reliable=True)
    d.apply(d.machine.on_response(make_response(200, d.machine.request)))
    assert d.delays("M") == [32]


@pytest.mark.parametrize("state", ["calling", "proceeding", "completed"])
def test_ict_transport_error_tells_the_tu_and_terminates(state: str) -> None:
    d = ict()
    req = d.machine.request
    if state == "proceeding":
        d.apply(d.machine.on_response(make_response(180, req)))
    elif state == "completed":
        d.apply(d.machine.on_response(make_response(486, req)))
    actions = d.apply(d.machine.on_transport_error())
    assert actions[-2:] == [TransportError(), Terminated()]
    assert d.machine.state is ClientInviteState.TERMINATED
    d.run_out()
    assert d.count(Timeout) == 0 and d.count(TransportError) == 1


def test_ict_ignores_stale_and_unknown_timers() -> None:
    d = ict()
    d.apply(d.machine.on_response(make_response(180, d.machine.request)))
    for name in ("A", "B", "D", "M", "Z", ""):
        assert d.machine.on_timer(name) == []
    assert d.machine.state is ClientInviteState.PROCEEDING


def test_ict_terminated_ignores_everything() -> None:
    d = ict(reliable=True)
    d.run_out()
    txn = d.machine
    assert isinstance(txn, ClientInviteTransaction) and txn.terminated
    req = txn.request
    for status in (100, 180, 200, 486):
        assert txn.on_response(make_response(status, req)) == []
    assert txn.on_timer("B") == [] and txn.on_transport_error() == [] and txn.start() == []


def test_ict_key_matches_its_responses() -> None:
    txn = ClientInviteTransaction(make_request(), reliable=False)
    assert txn.key == client_key(make_response(180, txn.request))


# -- client non-INVITE -------------------------------------------------------------------------
def test_nict_start() -> None:
    req = make_request("OPTIONS")
    txn = ClientNonInviteTransaction(req, reliable=False)
    assert txn.state is ClientNonInviteState.TRYING
    assert txn.start() == [SendMessage(req), StartTimer("E", 0.5), StartTimer("F", 32.0)]
    reliable = ClientNonInviteTransaction(req, reliable=True)
    assert reliable.start() == [SendMessage(req), StartTimer("F", 32.0)]


def test_nict_timer_e_doubles_to_t2_then_timer_f_times_out_once() -> None:
    d = nict()
    d.run_out()
    assert d.delays("E")[:5] == [0.5, 1, 2, 4, 4] and set(d.delays("E")[3:]) == {4}
    assert d.send_times == [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert d.of(Timeout)[0][0] == 32 and d.count(Timeout) == 1
    assert d.machine.state is ClientNonInviteState.TERMINATED


def test_nict_timer_e_cap_follows_t2() -> None:
    d = nict(timers=TimerSettings(t1=0.5, t2=1.5))
    d.advance(5)
    assert d.delays("E")[:4] == [0.5, 1, 1.5, 1.5]


def test_nict_reliable_never_retransmits_and_times_out_with_f() -> None:
    d = nict(reliable=True)
    d.run_out()
    assert d.send_times == [0] and d.of(Timeout)[0][0] == 32


def test_nict_proceeding_retransmits_every_t2() -> None:
    d = nict()
    req = d.machine.request
    d.advance(0.2)
    d.apply(d.machine.on_response(make_response(100, req)))
    assert d.machine.state is ClientNonInviteState.PROCEEDING
    d.advance(12)  # E keeps its due time (0.5), then restarts with T2 each time
    assert d.send_times == [0, 0.5, 4.5, 8.5]
    assert d.delays("E") == [0.5, 4, 4, 4]
    d.apply(d.machine.on_response(make_response(180, req)))
    assert d.delivered == [100, 180]


def test_nict_timer_f_in_proceeding_times_out() -> None:
    d = nict()
    d.apply(d.machine.on_response(make_response(100, d.machine.request)))
    d.run_out()
    assert d.of(Timeout)[0][0] == 32 and d.count(Terminated) == 1


@pytest.mark.parametrize("status", [200, 202, 302, 481, 503, 603])
def test_nict_final_completes_absorbs_retransmissions_for_timer_k(status: int) -> None:
    d = nict()
    req = d.machine.request
    d.advance(1)
    final = make_response(status, req)
    actions = d.apply(d.machine.on_response(final))
    assert actions == [StopTimer("E"), StopTimer("F"), DeliverResponse(final), StartTimer("K", 5.0)]
    assert d.machine.state is ClientNonInviteState.COMPLETED
    for late in (final, make_response(200, req), make_response(100, req)):
        assert d.apply(d.machine.on_response(late)) == []
    assert d.apply(d.machine.on_transport_error()) == []  # nothing sent in Completed
    d.advance(4.9)
    assert not d.terminated
    d.advance(0.1)
    assert d.terminated and d.log[-1] == (6.0, Terminated())
    assert d.delivered == [status] and d.send_times == [0, 0.5]


def test_nict_final_on_reliable_transport_terminates_at_once() -> None:
    d = nict("OPTIONS", reliable=True)
    req = d.machine.request
    d.apply(d.machine.on_response(make_response(100, req)))
    ok = make_response(200, req)
    assert d.apply(d.machine.on_response(ok)) == [StopTimer("F"), DeliverResponse(ok), Terminated()]


@pytest.mark.parametrize("proceeding", [False, True])
def test_nict_transport_error(proceeding: bool) -> None:
    d = nict()
    if proceeding:
        d.apply(d.machine.on_response(make_response(100, d.machine.request)))
    actions = d.apply(d.machine.on_transport_error())
    assert actions == [StopTimer("E"), StopTimer("F"), TransportError(), Terminated()]
    d.run_out()
    assert d.count(Timeout) == 0


# -- server INVITE -----------------------------------------------------------------------------
def test_ist_is_created_proceeding_and_sends_nothing_by_itself() -> None:
    d = ist()
    assert d.machine.state is ServerInviteState.PROCEEDING
    assert d.machine.key == server_key(d.machine.request)
    assert d.machine.on_request(d.machine.request) == []  # nothing to repeat yet
    d.run_out()
    assert d.log == []  # no automatic 100 Trying: the TU sends it


def test_ist_retransmitted_invite_gets_the_latest_provisional() -> None:
    d = ist()
    req = d.machine.request
    trying, ringing = make_response(100, req, to_tag=None), make_response(180, req)
    assert d.apply(d.machine.send_response(trying)) == [SendMessage(trying)]
    assert d.apply(d.machine.on_request(req)) == [SendMessage(trying)]
    d.apply(d.machine.send_response(ringing))
    assert d.apply(d.machine.on_request(make_request())) == [SendMessage(ringing)]
    assert d.apply(d.machine.on_request(ack_to(req))) == []  # an ACK before any final
    assert d.machine.state is ServerInviteState.PROCEEDING


def test_ist_final_is_retransmitted_by_timer_g_capped_at_t2_until_timer_h() -> None:
    d = ist()
    req = d.machine.request
    final = make_response(486, req)
    actions = d.apply(d.machine.send_response(final))
    assert actions == [SendMessage(final), StartTimer("G", 0.5), StartTimer("H", 32.0)]
    assert d.machine.state is ServerInviteState.COMPLETED
    d.advance(31.9)
    assert d.send_times == [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(message is final for message in d.sent)
    assert d.delays("G") == [0.5, 1, 2, 4, 4, 4, 4, 4, 4, 4, 4]
    d.advance(0.1)  # Timer H: the ACK never came
    assert d.log[-3:] == [(32.0, StopTimer("G")), (32.0, Timeout()), (32.0, Terminated())]
    assert d.machine.state is ServerInviteState.TERMINATED
    d.apply(d.machine.on_request(ack_to(req)))
    d.run_out()
    assert d.count(Timeout) == 1


def test_ist_timer_g_cap_follows_t2() -> None:
    d = ist(timers=TimerSettings(t1=0.25, t2=1.0))
    d.apply(d.machine.send_response(make_response(500, d.machine.request)))
    d.advance(5)
    assert d.delays("G")[:5] == [0.25, 0.5, 1, 1, 1]
    assert d.delays("H") == [16]


def test_ist_retransmitted_invite_in_completed_gets_the_final_again() -> None:
    d = ist()
    req = d.machine.request
    final = make_response(603, req)
    d.apply(d.machine.send_response(final))
    d.advance(0.2)
    assert d.apply(d.machine.on_request(req)) == [SendMessage(final)]
    assert d.timers["G"][0] == 0.5  # Timer G keeps its schedule


def test_ist_ack_confirms_stops_retransmissions_and_waits_timer_i() -> None:
    d = ist()
    req = d.machine.request
    d.apply(d.machine.send_response(make_response(100, req, to_tag=None)))
    d.apply(d.machine.send_response(make_response(404, req)))
    d.advance(4)
    actions = d.apply(d.machine.on_request(ack_to(req)))
    assert actions == [StopTimer("G"), StopTimer("H"), StartTimer("I", 5.0)]
    assert d.machine.state is ServerInviteState.CONFIRMED
    sent = len(d.sent)
    for late in (ack_to(req), req):  # ACK and INVITE retransmissions: absorbed
        assert d.apply(d.machine.on_request(late)) == []
    d.apply(d.machine.send_response(make_response(500, req)))  # the TU again: dropped
    assert d.apply(d.machine.on_transport_error()) == []
    d.advance(4.9)
    assert len(d.sent) == sent and not d.terminated
    d.advance(0.1)
    assert d.terminated and d.log[-1] == (9.0, Terminated()) and d.count(Timeout) == 0


def test_ist_reliable_final_has_no_timer_g_and_ack_terminates_at_once() -> None:
    d = ist(reliable=True)
    req = d.machine.request
    final = make_response(487, req)
    assert d.apply(d.machine.send_response(final)) == [SendMessage(final), StartTimer("H", 32.0)]
    assert d.apply(d.machine.on_request(req)) == [SendMessage(final)]
    assert d.apply(d.machine.on_request(ack_to(req))) == [StopTimer("H"), Terminated()]


def test_ist_reliable_timer_h_without_ack() -> None:
    d = ist(reliable=True)
    d.apply(d.machine.send_response(make_response(503, d.machine.request)))
    d.run_out()
    assert d.log[-2:] == [(32.0, Timeout()), (32.0, Terminated())]


def test_ist_2xx_is_accepted_passes_further_2xx_and_acks_up_until_timer_l() -> None:
    d = ist()
    req = d.machine.request
    ok = make_response(200, req)
    assert d.apply(d.machine.send_response(ok)) == [SendMessage(ok), StartTimer("L", 32.0)]
    assert d.machine.state is ServerInviteState.ACCEPTED
    d.advance(0.5)
    assert d.apply(d.machine.send_response(ok)) == [SendMessage(ok)]  # TU's retransmission
    fork = make_response(200, req, to_tag="fork-2")
    assert d.apply(d.machine.send_response(fork)) == [SendMessage(fork)]
    assert d.apply(d.machine.on_request(req)) == []  # retransmitted INVITE: absorbed
    for wrong in (make_response(180, req), make_response(486, req)):
        assert d.apply(d.machine.send_response(wrong)) == []
    ack = make_request("ACK", branch="z9hG4bK-2xx-ack", to_tag="t-1")
    assert d.apply(d.machine.on_request(ack)) == [DeliverRequest(ack)]  # RFC 6026: to the TU
    d.advance(31.4)
    assert not d.terminated
    d.advance(0.1)
    assert d.terminated and d.count(Timeout) == 0
    assert d.sent_statuses == [200, 200, 200]


@pytest.mark.parametrize("state", ["proceeding", "completed", "accepted"])
def test_ist_transport_error_tells_the_tu_and_terminates(state: str) -> None:
    d = ist()
    req = d.machine.request
    if state == "completed":
        d.apply(d.machine.send_response(make_response(480, req)))
    elif state == "accepted":
        d.apply(d.machine.send_response(make_response(200, req)))
    actions = d.apply(d.machine.on_transport_error())
    assert actions[-2:] == [TransportError(), Terminated()]
    d.run_out()
    assert d.count(Timeout) == 0


def test_ist_rfc2543_ack_must_carry_the_tag_of_the_final() -> None:
    invite = make_request(branch="1234")  # no magic cookie: RFC 2543 peer
    d = Driver(ServerInviteTransaction(invite, reliable=False))
    d.apply(d.machine.send_response(make_response(486, invite, to_tag="ours")))
    stray = make_request("ACK", branch="1234", to_tag="someone-else")
    assert server_key(stray) == d.machine.key  # the key cannot tell...
    assert d.apply(d.machine.on_request(stray)) == []  # ...the transaction can
    assert d.machine.state is ServerInviteState.COMPLETED
    ack = make_request("ACK", branch="1234", to_tag="ours")
    assert d.apply(d.machine.on_request(ack))[-1] == StartTimer("I", 5.0)


def test_ist_rfc3261_ack_is_matched_by_branch_alone() -> None:
    d = ist()
    d.apply(d.machine.send_response(make_response(486, d.machine.request, to_tag="ours")))
    d.apply(d.machine.on_request(make_request("ACK", to_tag="whatever")))
    assert d.machine.state is ServerInviteState.CONFIRMED


def test_ist_ignores_other_methods_and_stale_timers() -> None:
    d = ist()
    req = d.machine.request
    assert d.machine.on_request(make_request("CANCEL")) == []
    d.apply(d.machine.send_response(make_response(486, req)))
    d.apply(d.machine.on_request(ack_to(req)))
    for name in ("G", "H", "L", "X"):
        assert d.machine.on_timer(name) == []
    assert d.machine.state is ServerInviteState.CONFIRMED


# -- server non-INVITE -------------------------------------------------------------------------
def test_nist_trying_absorbs_retransmissions() -> None:
    d = nist()
    assert d.machine.state is ServerNonInviteState.TRYING
    assert d.machine.key == server_key(d.machine.request)
    assert d.apply(d.machine.on_request(d.machine.request)) == []
    d.run_out()
    assert d.log == []


def test_nist_answers_retransmissions_with_the_latest_response_and_lingers_for_j() -> None:
    d = nist()
    req = d.machine.request
    trying, ok = make_response(100, req, to_tag=None), make_response(200, req)
    assert d.apply(d.machine.send_response(trying)) == [SendMessage(trying)]
    assert d.machine.state is ServerNonInviteState.PROCEEDING
    assert d.apply(d.machine.on_request(req)) == [SendMessage(trying)]
    d.advance(1)
    assert d.apply(d.machine.send_response(ok)) == [SendMessage(ok), StartTimer("J", 32.0)]
    assert d.machine.state is ServerNonInviteState.COMPLETED
    assert d.apply(d.machine.on_request(req)) == [SendMessage(ok)]
    for late in (make_response(500, req), make_response(180, req), ok):
        assert d.apply(d.machine.send_response(late)) == []  # the TU again: dropped
    d.advance(31.9)
    assert not d.terminated
    d.advance(0.1)
    assert d.terminated and d.log[-1] == (33.0, Terminated())


def test_nist_final_straight_from_trying() -> None:
    d = nist("OPTIONS")
    final = make_response(405, d.machine.request)
    assert d.apply(d.machine.send_response(final)) == [SendMessage(final), StartTimer("J", 32.0)]


def test_nist_reliable_final_terminates_at_once() -> None:
    d = nist("OPTIONS", reliable=True)
    ok = make_response(200, d.machine.request)
    assert d.apply(d.machine.send_response(ok)) == [SendMessage(ok), Terminated()]


@pytest.mark.parametrize("state", ["trying", "proceeding", "completed"])
def test_nist_transport_error(state: str) -> None:
    d = nist()
    req = d.machine.request
    if state in ("proceeding", "completed"):
        d.apply(d.machine.send_response(make_response(100, req, to_tag=None)))
    if state == "completed":
        d.apply(d.machine.send_response(make_response(200, req)))
    actions = d.apply(d.machine.on_transport_error())
    assert actions[-2:] == [TransportError(), Terminated()]
    assert d.machine.state is ServerNonInviteState.TERMINATED


def test_nist_ignores_requests_of_another_method() -> None:
    d = nist()
    d.apply(d.machine.send_response(make_response(100, d.machine.request, to_tag=None)))
    assert d.machine.on_request(make_request("ACK")) == []
