"""The four transaction machines, driven through every state and timer with a fake clock."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.parser import parse_message
from clearip.relay.sip.transaction import (
    ClientInviteState,
    ClientInviteTransaction,
    ClientNonInviteState,
    ClientNonInviteTransaction,
    ServerInviteState,
    ServerInviteTransaction,
    ServerNonInviteState,
    ServerNonInviteTransaction,
    TimerSettings,
)
from clearip.relay.sip.transaction.ack import ack_for
from clearip.relay.sip.transaction.actions import (
    Action,
    DeliverResponse,
    SendMessage,
    StartTimer,
    StopTimer,
    Terminated,
    Timeout,
    TransportError,
)
from clearip.relay.sip.transaction.matching import (
    cancel_target_key,
    client_key,
    client_key_for,
    server_key,
)

Machine = (
    ClientInviteTransaction
    | ClientNonInviteTransaction
    | ServerInviteTransaction
    | ServerNonInviteTransaction
)


def request(method: str = "INVITE", branch: str = "z9hG4bKabc", cseq_method: str = "") -> Request:
    msg = parse_message(
        (
            f"{method} sip:bob@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\n"
            "Route: <sip:p1.example.com;lr>\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=f1\r\n"
            "To: <sip:bob@example.com>\r\nCall-ID: call-1\r\n"
            f"CSeq: 7 {cseq_method or method}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(msg, Request)
    return msg


def response(status: int, req: Request, to_tag: str = "t1") -> Response:
    copied = [h for h in req.copy().headers if h.key in ("via", "from", "call-id", "cseq")]
    reply = Response(status, "X", copied)
    reply.append("To", f"{req.get('to')};tag={to_tag}")
    return reply


@dataclass
class Driver:
    """Executes actions against a virtual clock and records what the transaction did."""

    machine: Machine
    now: float = 0.0
    timers: dict[str, float] = field(default_factory=dict)
    sent: list[tuple[float, object]] = field(default_factory=list)
    delivered: list[Response] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendMessage):
                self.sent.append((self.now, action.message))
            elif isinstance(action, StartTimer):
                self.timers[action.name] = self.now + action.delay
            elif isinstance(action, StopTimer):
                self.timers.pop(action.name, None)
            elif isinstance(action, DeliverResponse):
                self.delivered.append(action.response)
            elif isinstance(action, Timeout):
                self.events.append("timeout")
            elif isinstance(action, TransportError):
                self.events.append("transport-error")
            elif isinstance(action, Terminated):
                self.events.append("terminated")
                self.timers.clear()

    def advance(self, until: float) -> None:
        """Fire due timers in time order up to ``until``."""
        while True:
            due = [(at, name) for name, at in self.timers.items() if at <= until]
            if not due:
                break
            at, name = heapq.nsmallest(1, due)[0]
            self.now = at
            del self.timers[name]
            self.apply(self.machine.on_timer(name))
        self.now = until

    @property
    def send_times(self) -> list[float]:
        return [round(t, 3) for t, _ in self.sent]


T = TimerSettings()


# -- client INVITE ---------------------------------------------------------------------------
def test_ict_udp_retransmits_with_timer_a_until_timer_b() -> None:
    txn = ClientInviteTransaction(request(), reliable=False)
    d = Driver(txn)
    d.apply(txn.start())
    d.advance(40)
    # Timer A: 0.5, 1, 2, 4, 8, 16 doubling; Timer B fires at 32 s.
    assert d.send_times == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert d.events == ["timeout", "terminated"]
    assert txn.state is ClientInviteState.TERMINATED


def test_ict_reliable_sends_once() -> None:
    txn = ClientInviteTransaction(request(), reliable=True)
    d = Driver(txn)
    d.apply(txn.start())
    assert "A" not in d.timers and d.timers["B"] == 32
    d.advance(40)
    assert d.send_times == [0]
    assert d.events == ["timeout", "terminated"]


def test_ict_provisional_then_non2xx_acks_and_absorbs() -> None:
    req = request()
    txn = ClientInviteTransaction(req, reliable=False)
    d = Driver(txn)
    d.apply(txn.start())
    d.apply(txn.on_response(response(180, req)))
    assert txn.state is ClientInviteState.PROCEEDING
    d.advance(60)  # no retransmission and no Timer B once proceeding
    assert d.send_times == [0] and d.events == []
    final = response(486, req)
    d.apply(txn.on_response(final))
    assert txn.state is ClientInviteState.COMPLETED
    ack = d.sent[-1][1]
    assert isinstance(ack, Request) and ack.method == "ACK"
    assert [r.status for r in d.delivered] == [180, 486]
    d.apply(txn.on_response(final))  # retransmitted final: ACK again, not delivered
    assert isinstance(d.sent[-1][1], Request) and len(d.delivered) == 2
    d.advance(d.now + 32)
    assert d.events == ["terminated"]


def test_ict_non2xx_on_reliable_terminates_at_once() -> None:
    req = request()
    txn = ClientInviteTransaction(req, reliable=True)
    d = Driver(txn)
    d.apply(txn.start())
    d.apply(txn.on_response(response(503, req)))
    assert d.events == ["terminated"]
    assert txn.state is ClientInviteState.TERMINATED


def test_ict_2xx_accepted_forwards_retransmissions_until_timer_m() -> None:
    req = request()
    txn = ClientInviteTransaction(req, reliable=False)
    d = Driver(txn)
    d.apply(txn.start())
    ok = response(200, req)
    d.apply(txn.on_response(ok))
    assert txn.state is ClientInviteState.ACCEPTED
    d.apply(txn.on_response(ok))
    assert [r.status for r in d.delivered] == [200, 200]
    assert d.send_times == [0]  # no ACK for 2xx here: that is the TU's end-to-end ACK
    d.advance(33)
    assert d.events == ["terminated"]


def test_ict_transport_error() -> None:
    txn = ClientInviteTransaction(request(), reliable=True)
    d = Driver(txn)
    d.apply(txn.start())
    d.apply(txn.on_transport_error())
    assert d.events == ["transport-error", "terminated"]


def test_ack_for_non2xx_follows_17_1_1_3() -> None:
    req = request()
    ack = ack_for(req, response(404, req, to_tag="abc"))
    assert ack.method == "ACK" and ack.uri_text == req.uri_text
    assert ack.get_all("via") == [req.get_all("via")[0]]
    assert ack.get("route") == req.get("route")
    assert ack.get("from") == req.get("from") and ack.call_id == req.call_id
    assert ack.cseq == (7, "ACK")
    assert ack.to_tag == "abc"


# -- client non-INVITE -----------------------------------------------------------------------
def test_nict_timer_e_caps_at_t2_and_timer_f_times_out() -> None:
    txn = ClientNonInviteTransaction(request("BYE"), reliable=False)
    d = Driver(txn)
    d.apply(txn.start())
    d.advance(40)
    gaps = [round(b - a, 3) for a, b in zip(d.send_times, d.send_times[1:], strict=False)]
    assert gaps[:4] == [0.5, 1, 2, 4] and set(gaps[4:]) == {4}
    assert d.events == ["timeout", "terminated"]


def test_nict_proceeding_retransmits_every_t2_then_completes_with_timer_k() -> None:
    req = request("BYE")
    txn = ClientNonInviteTransaction(req, reliable=False)
    d = Driver(txn)
    d.apply(txn.start())
    d.apply(txn.on_response(response(100, req)))
    assert txn.state is ClientNonInviteState.PROCEEDING
    d.advance(9)
    assert d.send_times == [0, 0.5, 4.5, 8.5]
    d.apply(txn.on_response(response(200, req)))
    assert txn.state is ClientNonInviteState.COMPLETED
    d.apply(txn.on_response(response(200, req)))  # absorbed
    assert [r.status for r in d.delivered] == [100, 200]
    d.advance(9 + 5)
    assert d.events == ["terminated"]


def test_nict_reliable_completes_at_once() -> None:
    req = request("OPTIONS")
    txn = ClientNonInviteTransaction(req, reliable=True)
    d = Driver(txn)
    d.apply(txn.start())
    assert "E" not in d.timers
    d.apply(txn.on_response(response(200, req)))
    assert d.events == ["terminated"]


def test_nict_transport_error() -> None:
    txn = ClientNonInviteTransaction(request("BYE"), reliable=False)
    d = Driver(txn)
    d.apply(txn.start())
    d.apply(txn.on_transport_error())
    assert d.events == ["transport-error", "terminated"]


# -- server INVITE ---------------------------------------------------------------------------
def test_ist_retransmitted_invite_gets_last_provisional() -> None:
    req = request()
    txn = ServerInviteTransaction(req, reliable=False)
    d = Driver(txn)
    d.apply(txn.on_request(req))  # nothing sent yet: nothing to resend
    assert d.sent == []
    d.apply(txn.send_response(response(100, req)))
    d.apply(txn.on_request(req))
    assert [m.status for _, m in d.sent] == [100, 100]  # type: ignore[attr-defined]


def test_ist_final_retransmitted_by_timer_g_until_ack_then_timer_i() -> None:
    req = request()
    txn = ServerInviteTransaction(req, reliable=False)
    d = Driver(txn)
    d.apply(txn.send_response(response(486, req)))
    assert txn.state is ServerInviteState.COMPLETED
    d.advance(4)
    assert d.send_times == [0, 0.5, 1.5, 3.5]
    d.apply(txn.on_request(request("ACK", cseq_method="ACK")))
    assert txn.state is ServerInviteState.CONFIRMED
    d.advance(8)
    assert d.send_times == [0, 0.5, 1.5, 3.5]  # G stopped
    d.advance(9.1)  # Timer I = T4 = 5 s after the ACK at 4 s
    assert d.events == ["terminated"]


def test_ist_timer_g_caps_at_t2_and_timer_h_gives_up() -> None:
    req = request()
    txn = ServerInviteTransaction(req, reliable=False)
    d = Driver(txn)
    d.apply(txn.send_response(response(500, req)))
    d.advance(40)
    gaps = [round(b - a, 3) for a, b in zip(d.send_times, d.send_times[1:], strict=False)]
    assert gaps[:3] == [0.5, 1, 2] and set(gaps[3:]) == {4}
    assert d.events == ["timeout", "terminated"]


def test_ist_completed_resends_final_on_retransmitted_invite() -> None:
    req = request()
    txn = ServerInviteTransaction(req, reliable=True)
    d = Driver(txn)
    d.apply(txn.send_response(response(603, req)))
    assert "G" not in d.timers and d.timers["H"] == 32
    d.apply(txn.on_request(req))
    assert len(d.sent) == 2
    d.apply(txn.on_request(request("ACK", cseq_method="ACK")))
    assert d.events == ["terminated"]  # Timer I is zero on reliable transports


def test_ist_2xx_accepted_passes_further_2xx_until_timer_l() -> None:
    req = request()
    txn = ServerInviteTransaction(req, reliable=False)
    d = Driver(txn)
    d.apply(txn.send_response(response(200, req)))
    assert txn.state is ServerInviteState.ACCEPTED
    d.apply(txn.send_response(response(200, req)))
    d.apply(txn.on_request(req))  # retransmitted INVITE absorbed
    assert len(d.sent) == 2
    d.advance(33)
    assert d.events == ["terminated"]


def test_ist_transport_error() -> None:
    req = request()
    txn = ServerInviteTransaction(req, reliable=True)
    d = Driver(txn)
    d.apply(txn.on_transport_error())
    assert d.events == ["transport-error", "terminated"]


# -- server non-INVITE -----------------------------------------------------------------------
def test_nist_absorbs_then_answers_and_lingers_for_timer_j() -> None:
    req = request("BYE")
    txn = ServerNonInviteTransaction(req, reliable=False)
    d = Driver(txn)
    d.apply(txn.on_request(req))
    assert d.sent == []  # Trying: absorbed
    d.apply(txn.send_response(response(100, req)))
    assert txn.state is ServerNonInviteState.PROCEEDING
    d.apply(txn.on_request(req))
    d.apply(txn.send_response(response(200, req)))
    assert txn.state is ServerNonInviteState.COMPLETED
    d.apply(txn.on_request(req))
    assert [m.status for _, m in d.sent] == [100, 100, 200, 200]  # type: ignore[attr-defined]
    d.advance(33)
    assert d.events == ["terminated"]


def test_nist_reliable_terminates_with_the_final() -> None:
    req = request("OPTIONS")
    txn = ServerNonInviteTransaction(req, reliable=True)
    d = Driver(txn)
    d.apply(txn.send_response(response(200, req)))
    assert d.events == ["terminated"]


def test_nist_transport_error() -> None:
    txn = ServerNonInviteTransaction(request("BYE"), reliable=False)
    d = Driver(txn)
    d.apply(txn.on_transport_error())
    assert d.events == ["transport-error", "terminated"]


# -- matching --------------------------------------------------------------------------------
def test_server_matching_by_branch_ack_and_cancel() -> None:
    invite = request()
    assert server_key(request("ACK", cseq_method="ACK")) == server_key(invite)
    cancel = request("CANCEL", cseq_method="CANCEL")
    assert cancel_target_key(cancel) == server_key(invite)
    assert server_key(cancel) != server_key(invite)
    assert cancel_target_key(request("CANCEL", branch="z9hG4bKother")) != server_key(invite)


def test_server_matching_rfc2543_fallback() -> None:
    invite = request(branch="old-style-1")
    ack = request("ACK", branch="old-style-1", cseq_method="ACK")
    assert server_key(ack) == server_key(invite)
    assert server_key(request(branch="old-style-2")) != server_key(invite)


def test_client_matching_by_branch_and_method() -> None:
    invite = request()
    assert client_key(response(180, invite)) == client_key_for(invite)
    bye = request("BYE")
    assert client_key(response(200, bye)) != client_key_for(invite)


# -- robustness ------------------------------------------------------------------------------
EVENTS = ["1xx", "2xx", "4xx", "timer", "error", "request", "ack"]


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["ict", "nict", "ist", "nist"]),
    reliable=st.booleans(),
    events=st.lists(st.sampled_from(EVENTS), max_size=12),
)
def test_any_event_sequence_never_raises_and_ends_terminated(
    kind: str, reliable: bool, events: list[str]
) -> None:
    method = "INVITE" if kind in ("ict", "ist") else "BYE"
    req = request(method)
    machine: Machine
    if kind == "ict":
        machine = ClientInviteTransaction(req, reliable=reliable)
    elif kind == "nict":
        machine = ClientNonInviteTransaction(req, reliable=reliable)
    elif kind == "ist":
        machine = ServerInviteTransaction(req, reliable=reliable)
    else:
        machine = ServerNonInviteTransaction(req, reliable=reliable)
    d = Driver(machine)
    if isinstance(machine, ClientInviteTransaction | ClientNonInviteTransaction):
        d.apply(machine.start())
    codes = {"1xx": 180, "2xx": 200, "4xx": 486}
    for event in events:
        if event in codes:
            if isinstance(machine, ClientInviteTransaction | ClientNonInviteTransaction):
                d.apply(machine.on_response(response(codes[event], req)))
            else:
                d.apply(machine.send_response(response(codes[event], req)))
        elif event == "timer":
            d.advance(d.now + 1)
        elif event == "error":
            d.apply(machine.on_transport_error())
        elif isinstance(machine, ServerInviteTransaction | ServerNonInviteTransaction):
            d.apply(
                machine.on_request(request("ACK", cseq_method="ACK") if event == "ack" else req)
            )
    # Finish whatever is pending: a final if none came, then let every timer run out.
    if isinstance(machine, ServerInviteTransaction | ServerNonInviteTransaction):
        d.apply(machine.send_response(response(486, req)))
    elif machine.state.name in ("PROCEEDING",):
        d.apply(machine.on_response(response(486, req)))
    d.advance(d.now + 200)
    assert machine.state.name == "TERMINATED"
    assert d.events.count("terminated") == 1


@pytest.mark.parametrize("t1", [0.1, 0.5])
def test_timer_settings_derive_from_t1(t1: float) -> None:
    timers = TimerSettings(t1=t1)
    assert timers.timeout == 64 * t1
    assert timers.timer_b == timers.timer_h == timers.timer_j == 64 * t1
    assert timers.timer_d == max(32, 64 * t1)
