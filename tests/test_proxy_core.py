"""The proxy core without sockets: messages in, effects out, time injected."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.core import ProxyCore
from clearip.relay.proxy.effects import CallFinished, Effect, Send, StartTimer
from clearip.relay.proxy.routing import Locality
from clearip.relay.proxy.timerkeys import UPSTREAM, CallTimerKey
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.parser import parse_message
from clearip.relay.transport.peer import LocalAddress, Peer

SWITCH = Peer("udp", "192.0.2.10", 5060)
CLEARIP = Peer("tls", "198.51.100.1", 5061, conn=1)
US = LocalAddress("udp", "203.0.113.5", 5060)


@dataclass
class World:
    core: ProxyCore
    now: list[float] = field(default_factory=lambda: [0.0])
    upstream_up: list[bool] = field(default_factory=lambda: [True])

    def send(self, message: Request | Response, peer: Peer = SWITCH) -> list[Effect]:
        return self.core.on_message(message, peer)


@pytest.fixture
def world() -> Iterator[World]:
    yield make_world()


def make_world() -> World:
    """A core as a worker process starts with: no calls."""
    w: World

    def upstream(role: Role) -> Peer | None:
        return CLEARIP if w.upstream_up[0] else None

    core = ProxyCore(
        ProxyConfig(),
        role_of=lambda ip: Role.SWITCH if ip.startswith("192.0.2.") else Role.PROVIDER,
        emergency=lambda: EmergencyNumbers(["911", "933"]),
        locality=Locality(hosts={"203.0.113.5"}, ports={5060}),
        local_for=lambda peer, record_route=False: LocalAddress(
            peer.transport, "203.0.113.5", 5060
        ),
        upstream=upstream,
        clock=lambda: w.now[0],
    )
    w = World(core)
    return w


def invite(
    number: str = "12125550100",
    *,
    max_forwards: str = "70",
    extra: str = "",
    branch: str = "z9hG4bKsw1",
    uri: str | None = None,
) -> Request:
    ruri = uri or f"sip:{number}@203.0.113.5"
    msg = parse_message(
        (
            f"INVITE {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch={branch}\r\n"
            f"{extra}"
            f"Max-Forwards: {max_forwards}\r\n"
            "From: <sip:14045550100@192.0.2.10>;tag=sw\r\n"
            f"To: <sip:{number}@203.0.113.5>\r\n"
            "Call-ID: core-1@192.0.2.10\r\nCSeq: 1 INVITE\r\n"
            "Contact: <sip:sw@192.0.2.10>\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(msg, Request)
    return msg


def sent(effects: list[Effect]) -> list[tuple[Request | Response, Peer]]:
    return [(e.message, e.peer) for e in effects if isinstance(e, Send)]  # type: ignore[misc]


def statuses(effects: list[Effect]) -> list[int]:
    return [m.status for m, _ in sent(effects) if isinstance(m, Response)]


def reply_to(request: Request, status: int, *, extra: str = "") -> Response:
    via = "\r\n".join(f"Via: {v}" for v in request.get_all("via"))
    msg = parse_message(
        (
            f"SIP/2.0 {status} X\r\n{via}\r\n"
            f"From: {request.get('from')}\r\nTo: {request.get('to')};tag=up\r\n"
            f"Call-ID: {request.call_id}\r\nCSeq: {request.get('cseq')}\r\n{extra}"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(msg, Response)
    return msg


def test_invite_gets_100_and_goes_to_clearip_with_our_via(world: World) -> None:
    effects = world.send(invite())
    out = sent(effects)
    assert statuses(effects) == [100]
    upstream = [m for m, p in out if isinstance(m, Request) and p == CLEARIP]
    assert len(upstream) == 1
    relayed = upstream[0]
    assert relayed.top_via.host == "203.0.113.5"
    assert relayed.get("max-forwards") == "69"
    call = next(iter(world.core.calls.values()))
    assert any(
        isinstance(e, StartTimer) and e.key == CallTimerKey(call.id, UPSTREAM) for e in effects
    )


def test_302_contacts_in_q_order_with_identity_copied(world: World) -> None:
    effects = world.send(invite(extra="Identity: old-token\r\n"))
    relayed = next(m for m, p in sent(effects) if p == CLEARIP)
    assert isinstance(relayed, Request)
    contacts = (
        "Contact: <sip:a@198.51.100.20;transport=tcp>;q=0.5, <sip:b@198.51.100.21>;q=1.0, "
        "<tel:+12125550100>, <sip:c@198.51.100.22>;q=0.5\r\n"
        "Identity: eyJhbGciOiJFUzI1NiJ9.eyJhdHRlc3QiOiJCIn0.sig;info=<https://x/c.pem>\r\n"
    )
    effects = world.send(reply_to(relayed, 302, extra=contacts), CLEARIP)
    out = sent(effects)
    ack = next(m for m, p in out if isinstance(m, Request) and m.method == "ACK")
    assert ack.uri_text == relayed.uri_text  # hop-by-hop ACK to ClearIP
    branch = next((m, p) for m, p in out if isinstance(m, Request) and m.method == "INVITE")
    request, peer = branch
    assert isinstance(request, Request)
    # q=1.0 first; ties keep their order; the tel: Contact is skipped.
    assert request.uri_text == "sip:b@198.51.100.21"
    assert peer == Peer("udp", "198.51.100.21", 5060)
    assert request.get_all("identity") == [
        "eyJhbGciOiJFUzI1NiJ9.eyJhdHRlc3QiOiJCIn0.sig;info=<https://x/c.pem>"
    ]
    assert request.get("record-route") == "<sip:203.0.113.5:5060;lr>"
    call = next(iter(world.core.calls.values()))
    assert [t.uri_text for t in call.targets] == [
        "sip:b@198.51.100.21",
        "sip:a@198.51.100.20;transport=tcp",
        "sip:c@198.51.100.22",
    ]
    assert call.attestation == "B"


def test_302_pointing_at_us_or_without_sip_contacts_is_relayed(world: World) -> None:
    relayed = next(m for m, p in sent(world.send(invite())) if p == CLEARIP)
    assert isinstance(relayed, Request)
    effects = world.send(
        reply_to(relayed, 302, extra="Contact: <sip:x@203.0.113.5:5060>, <mailto:a@b>\r\n"),
        CLEARIP,
    )
    assert statuses(effects) == [302]
    assert world.core.active_calls == 0


@pytest.mark.parametrize("code", [403, 404, 503, 603])
def test_clearip_final_relayed_unchanged_but_our_via(world: World, code: int) -> None:
    relayed = next(m for m, p in sent(world.send(invite())) if p == CLEARIP)
    assert isinstance(relayed, Request)
    extra = 'Reason: SIP;cause=603;text="Robocall"\r\nCall-Info: <https://redress>;purpose=jwt\r\n'
    effects = world.send(reply_to(relayed, code, extra=extra), CLEARIP)
    final = next(m for m, p in sent(effects) if p == SWITCH)
    assert isinstance(final, Response) and final.status == code
    assert [v.host for v in final.vias()] == ["192.0.2.10"]
    assert final.get("reason") == 'SIP;cause=603;text="Robocall"'
    assert final.get("call-info") == "<https://redress>;purpose=jwt"
    summary = next(e for e in effects if isinstance(e, CallFinished)).summary()
    assert summary["clearip_status"] == code and summary["final"] == code


def test_upstream_timeout_fails_open_with_reason(world: World) -> None:
    world.send(invite())
    call = next(iter(world.core.calls.values()))
    world.now[0] = 5.0
    effects = world.core.on_timer(CallTimerKey(call.id, UPSTREAM))
    final = next(m for m, _ in sent(effects))
    assert isinstance(final, Response) and final.status == 503
    assert "fail-open" in (final.get("reason") or "")
    assert world.core.active_calls == 0


def test_upstream_down_answers_503_at_once(world: World) -> None:
    world.upstream_up[0] = False
    effects = world.send(invite())
    assert statuses(effects) == [100, 503]


def test_connection_loss_fails_open_pending_calls(world: World) -> None:
    world.send(invite())
    effects = world.core.on_upstream_down(Role.SWITCH)
    assert statuses(effects) == [503]


@pytest.mark.parametrize(
    "uri",
    ["sip:911@203.0.113.5", "sip:9-1-1;phone-context=x@203.0.113.5", "tel:933", "sip:+911@h"],
)
def test_emergency_never_goes_to_clearip(world: World, uri: str) -> None:
    effects = world.send(invite(uri=uri))
    assert all(p != CLEARIP for _, p in sent(effects))
    assert statuses(effects) == [100, 503]
    assert world.core.counters["emergency"] == 1


def test_emergency_route_when_configured(world: World) -> None:
    world.core.config = ProxyConfig(emergency_route="sip:psap@198.51.100.99:5070")
    world.upstream_up[0] = False
    effects = world.send(invite("911"))
    out = [(m, p) for m, p in sent(effects) if isinstance(m, Request)]
    assert out and out[0][1] == Peer("udp", "198.51.100.99", 5070)


def test_max_forwards_zero_is_483(world: World) -> None:
    assert statuses(world.send(invite(max_forwards="0"))) == [483]


def test_loop_is_482(world: World) -> None:
    first = next(m for m, p in sent(world.send(invite())) if p == CLEARIP)
    assert isinstance(first, Request)
    # The same request comes back to us with our Via in it: a loop.
    looped = parse_message(first.to_bytes().replace(b"branch=z9hG4bKsw1", b"branch=z9hG4bKsw2", 1))
    assert isinstance(looped, Request)
    looped.prepend("Via", "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKagain")
    assert statuses(world.send(looped)) == [482]


def test_options_to_the_proxy_reflects_clearip_state(world: World) -> None:
    options = invite().copy()
    options.method = "OPTIONS"
    options.set("CSeq", "1 OPTIONS")
    assert statuses(world.send(options)) == [200]
    world.upstream_up[0] = False
    assert statuses(world.send(options)) == [503]


def test_other_out_of_dialog_requests_get_405_with_allow(world: World) -> None:
    message = invite().copy()
    message.method = "MESSAGE"
    message.set("CSeq", "1 MESSAGE")
    effects = world.send(message)
    reply = next(m for m, _ in sent(effects))
    assert isinstance(reply, Response) and reply.status == 405
    assert "INVITE" in (reply.get("allow") or "")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: r.remove("call-id"), "Missing Call-Id"),
        (lambda r: r.append("To", "<sip:x@y>"), "Multiple To"),
        (lambda r: r.append("Content-Length", "5"), "Conflicting Content-Length"),
    ],
)
def test_requests_missing_or_doubling_headers_get_400(world: World, mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    request = invite()
    mutate(request)
    effects = world.send(request)
    reply = next(m for m, _ in sent(effects))
    assert isinstance(reply, Response) and reply.status == 400
    assert reply.reason.startswith(reason)


def test_in_dialog_bye_routed_by_route_header_without_state(world: World) -> None:
    bye = parse_message(
        b"BYE sip:callee@198.51.100.20:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKbye1\r\n"
        b"Route: <sip:203.0.113.5:5060;lr>, <sip:198.51.100.30;lr>\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:a@192.0.2.10>;tag=sw\r\n"
        b"To: <sip:b@198.51.100.20>;tag=callee\r\nCall-ID: dlg-1\r\nCSeq: 2 BYE\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert isinstance(bye, Request)
    effects = world.send(bye)
    (message, peer) = sent(effects)[0]
    assert isinstance(message, Request)
    assert peer == Peer("udp", "198.51.100.30", 5060)  # the next Route, ours popped
    assert message.get_all("route") == ["<sip:198.51.100.30;lr>"]
    assert message.top_via.branch and message.top_via.branch.startswith("z9hG4bKcis")
    assert world.core.active_transactions == 0
    # Counted by method, in lower case: clearip_in_dialog_requests_total{method="bye"}.
    assert world.core.counters["in_dialog_bye"] == 1
    # Its response comes back through us to the switch, by Via alone.
    ok = reply_to(message, 200)
    back = sent(world.send(ok, Peer("udp", "198.51.100.30", 5060)))
    assert back and back[0][1] == Peer("udp", "192.0.2.10", 5060)


def test_double_record_route_when_transport_changes(world: World) -> None:
    relayed = next(m for m, p in sent(world.send(invite())) if p == CLEARIP)
    assert isinstance(relayed, Request)
    contact = "Contact: <sip:b@198.51.100.21:5060;transport=tcp>\r\n"
    effects = world.send(reply_to(relayed, 302, extra=contact), CLEARIP)
    branch = next(m for m, p in sent(effects) if isinstance(m, Request) and m.method == "INVITE")
    assert isinstance(branch, Request)
    # Outgoing side (TCP, towards the callee) on top, incoming side (UDP) below it.
    assert branch.get_all("record-route") == [
        "<sip:203.0.113.5:5060;transport=tcp;lr>",
        "<sip:203.0.113.5:5060;lr>",
    ]


def test_per_source_rate_limit_answers_503_but_never_for_emergencies(world: World) -> None:
    world.core.config = ProxyConfig(invite_rate_per_source=3)
    world.core.limiter = type(world.core.limiter)(3)
    codes = []
    for n in range(5):
        effects = world.send(invite(branch=f"z9hG4bKrl{n}"))
        codes.append(statuses(effects)[0])
    assert codes == [100, 100, 100, 503, 503]
    limited = world.send(invite(branch="z9hG4bKrl9"))
    reply = next(m for m, _ in sent(limited))
    assert isinstance(reply, Response) and reply.get("retry-after") == "1"
    assert statuses(world.send(invite("911", branch="z9hG4bKsos"))) == [
        100,
        503,
    ]  # bypass, not limited
    world.now[0] = 1.0  # a second later the bucket has refilled
    assert statuses(world.send(invite(branch="z9hG4bKrl10")))[0] == 100
    assert world.core.counters["rate_limited"] == 3


def test_too_many_pending_calls_get_503_except_emergencies(world: World) -> None:
    world.core.config = ProxyConfig(max_transactions=2)
    assert statuses(world.send(invite(branch="z9hG4bKm1")))[0] == 100
    assert statuses(world.send(invite(branch="z9hG4bKm2")))[0] == 100
    assert statuses(world.send(invite(branch="z9hG4bKm3"))) == [503]
    assert statuses(world.send(invite("933", branch="z9hG4bKm4"))) == [100, 503]
    assert world.core.counters["overload_rejected"] == 1


def test_backlog_sheds_new_invites_with_503_but_never_emergencies(world: World) -> None:
    delay = [0.0]
    world.core.queue_delay = lambda: delay[0]
    assert statuses(world.send(invite(branch="z9hG4bKq1")))[0] == 100
    delay[0] = 0.2  # what we read now waited 200 ms in the socket queue (default limit 50 ms)
    shed = world.send(invite(branch="z9hG4bKq2"))
    reply = next(m for m, _ in sent(shed))
    assert isinstance(reply, Response)
    assert (reply.status, reply.reason, reply.get("retry-after")) == (503, "Overloaded", "1")
    assert world.core.active_calls == 1  # no state for the shed call
    assert statuses(world.send(invite("911", branch="z9hG4bKq3"))) == [100, 503]  # bypass
    world.core.config = ProxyConfig(overload_queue_delay=0)  # 0: never shed
    assert statuses(world.send(invite(branch="z9hG4bKq4")))[0] == 100
    assert world.core.counters["overload_shed"] == 1


def test_request_missing_from_to_and_call_id_still_gets_its_400(world: World) -> None:
    """RFC 4475 §3.3.1 (TC_INSUF_I): the reply is built from what the request has."""
    request = parse_message(
        b"INVITE sip:user@203.0.113.5 SIP/2.0\r\nCSeq: 193942 INVITE\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKkdj.insuf\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(request, Request)
    reply = next(m for m, _ in sent(world.send(request)))
    assert isinstance(reply, Response)
    assert (reply.status, reply.reason) == (400, "Missing From, To, Call-Id")


# -- answers for calls a restarted worker no longer has ------------------------------------------


def _relayed_invite(world: World) -> Request:
    relayed = next(m for m, p in sent(world.send(invite())) if p == CLEARIP)
    assert isinstance(relayed, Request)
    return relayed


def test_a_redirect_for_a_lost_call_gives_the_switch_a_fail_open_503_and_is_acked(
    world: World,
) -> None:
    relayed = _relayed_invite(world)
    restarted = make_world()  # the call's worker died; its successor has no state
    contact = "Contact: <sip:b@198.51.100.21:5060>\r\n"
    effects = restarted.send(reply_to(relayed, 302, extra=contact), CLEARIP)
    out = sent(effects)
    (ack, ack_peer), (answer, answer_peer) = out
    assert isinstance(ack, Request) and ack.method == "ACK" and ack_peer == CLEARIP
    assert ack.get_all("via") == relayed.get_all("via")[:1]  # matches ClearIP's transaction
    assert ack.to_tag == "up" and ack.cseq == (1, "ACK")
    assert isinstance(answer, Response) and answer.status == 503 and answer_peer == SWITCH
    assert answer.get_all("via") == invite().get_all("via")  # the switch's own Via set
    assert "fail-open" in (answer.get("reason") or "")
    assert restarted.core.counters["orphan_response_fail_open"] == 1
    assert restarted.core.active_calls == restarted.core.active_transactions == 0


def test_other_answers_for_a_lost_call_reach_the_switch(world: World) -> None:
    relayed = _relayed_invite(world)
    restarted = make_world()
    assert sent(restarted.send(reply_to(relayed, 100), CLEARIP)) == []
    busy = sent(restarted.send(reply_to(relayed, 486), CLEARIP))
    assert [(type(m).__name__, p) for m, p in busy] == [("Request", CLEARIP), ("Response", SWITCH)]
    forwarded = busy[1][0]
    assert isinstance(forwarded, Response) and forwarded.status == 486
    assert forwarded.get_all("via") == invite().get_all("via")
    ok = sent(restarted.send(reply_to(relayed, 200), CLEARIP))
    assert len(ok) == 1 and ok[0][1] == SWITCH  # a 2xx is ACKed end to end, by the switch
    counters = restarted.core.counters
    assert (counters["orphan_response_absorbed"], counters["orphan_response_forwarded"]) == (1, 2)
    assert counters["stray_response"] == 0


def test_a_response_to_someone_elses_branch_is_still_stray(world: World) -> None:
    relayed = _relayed_invite(world)
    foreign = reply_to(relayed, 302)
    foreign.set("Via", "SIP/2.0/UDP 198.51.100.99:5060;branch=z9hG4bKcipother")
    restarted = make_world()
    assert sent(restarted.send(foreign, CLEARIP)) == []
    assert restarted.core.counters["stray_response"] == 1


def test_a_lost_calls_answer_goes_only_to_a_trusted_element() -> None:
    """Without the call, the Via below ours is all there is: a forged one naming an address
    off the trust list gets nothing from us (no reflection)."""
    restarted = make_world()
    forged = parse_message(
        b"SIP/2.0 486 Busy\r\n"
        b"Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKcip1.2\r\n"
        b"Via: SIP/2.0/UDP 198.18.0.1:5060;branch=z9hG4bKvictim\r\n"
        b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert isinstance(forged, Response)
    restarted.core.role_of = lambda ip: None if ip == "198.18.0.1" else Role.PROVIDER
    assert sent(restarted.send(forged, CLEARIP)) == []
    assert restarted.core.counters["stray_response"] == 1
