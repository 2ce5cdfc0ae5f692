"""Messages: compact forms, multi-value headers, URIs, editing keeps untouched bytes, limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearip.relay.sip.errors import LimitExceeded, SipParseError
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.parser import Limits, parse_message
from clearip.relay.sip.uri import SipUri, TelUri, parse_uri

INVITE = (
    b"INVITE sip:+12125550100@198.51.100.7:5060;user=phone SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-1;rport,"
    b" SIP/2.0/TCP [2001:db8::1];branch=z9hG4bK-0\r\n"
    b"Max-Forwards: 70\r\n"
    b'f: "Acme, Corp" <sip:+14045550100@192.0.2.10>;tag=8a7b\r\n'
    b"t: <tel:+1-212-555-0100;phone-context=example.com>\r\n"
    b"i: abc@192.0.2.10\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"m: <sip:sw@192.0.2.10;transport=udp>;q=0.5, <sips:alt@[2001:db8::2]:5061>;q=0.9\r\n"
    b"Route: <sip:p1.example.com;lr>,\r\n <sip:p2.example.com;lr>\r\n"
    b"X-Custom:   keep   me  \r\n"
    b"l: 4\r\n"
    b"\r\n"
    b"abcd"
)


def test_compact_forms_and_values() -> None:
    msg = parse_message(INVITE)
    assert isinstance(msg, Request)
    assert msg.call_id == "abc@192.0.2.10"
    assert msg.from_addr.display == '"Acme, Corp"'
    assert msg.from_tag == "8a7b"
    assert isinstance(msg.to_addr.uri, TelUri)
    assert [v.transport for v in msg.vias()] == ["UDP", "TCP"]
    assert msg.top_via.branch == "z9hG4bK-1"
    assert msg.top_via.param("rport") == ""
    assert [str(a.uri) for a in msg.addresses("route")] == [
        "sip:p1.example.com;lr",
        "sip:p2.example.com;lr",
    ]
    contacts = msg.addresses("contact")
    assert [c.q for c in contacts] == [0.5, 0.9]
    assert msg.body == b"abcd"


def test_untouched_headers_pass_byte_exact_and_edits_are_rebuilt() -> None:
    msg = parse_message(INVITE)
    msg.prepend("Via", "SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKproxy")
    msg.set("Max-Forwards", "69")
    out = msg.to_bytes()
    assert b"X-Custom:   keep   me  \r\n" in out
    assert b"Route: <sip:p1.example.com;lr>,\r\n <sip:p2.example.com;lr>\r\n" in out
    assert out.index(b"Via: SIP/2.0/UDP 203.0.113.5") < out.index(b"v: SIP/2.0/UDP 192.0.2.10")
    assert b"Max-Forwards: 69\r\n" in out
    again = parse_message(out)
    assert again.top_via.branch == "z9hG4bKproxy"
    assert again.body == b"abcd"


def test_pop_top_via_from_a_combined_line() -> None:
    msg = parse_message(INVITE)
    assert msg.pop_first_value("via") is not None
    assert msg.top_via.transport == "TCP"
    assert msg.top_via.host == "[2001:db8::1]"


def test_sip_uri_fields() -> None:
    uri = parse_uri("sips:alice:secret@[2001:db8::9]:5061;transport=tls;lr?subject=x")
    assert isinstance(uri, SipUri)
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port) == (
        "sips",
        "alice",
        "secret",
        "[2001:db8::9]",
        5061,
    )
    assert uri.has_param("lr")
    assert uri.transport == "tls"
    assert uri.headers == "subject=x"
    assert str(uri) == "sips:alice:secret@[2001:db8::9]:5061;transport=tls;lr?subject=x"


@pytest.mark.parametrize(
    "text", ["sip:", "sip:user@", "sip:host:99999", "sip:a b@host", "tel:", "sip:host;;lr"]
)
def test_bad_uris_raise_typed_errors(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_response_and_missing_content_length_on_udp() -> None:
    msg = parse_message(
        b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nCall-ID: a\r\n"
        b"CSeq: 1 INVITE\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>;tag=2\r\n\r\n"
    )
    assert isinstance(msg, Response)
    assert (msg.status, msg.reason) == (180, "Ringing")
    assert b"Content-Length: 0\r\n" in msg.to_bytes()


def test_limits() -> None:
    with pytest.raises(LimitExceeded):
        parse_message(INVITE, limits=Limits(max_message_size=100))
    with pytest.raises(LimitExceeded):
        parse_message(INVITE, limits=Limits(max_headers=5))
    with pytest.raises(LimitExceeded):
        parse_message(INVITE, limits=Limits(max_uri_length=20))
    with pytest.raises(LimitExceeded):
        parse_message(INVITE, limits=Limits(max_line_length=60))


def test_stream_messages_need_content_length() -> None:
    without = INVITE.replace(b"l: 4\r\n", b"")
    with pytest.raises(SipParseError, match="Content-Length"):
        parse_message(without, datagram=False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_typed_errors(data: bytes) -> None:
    try:
        parse_message(data)
    except SipParseError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(INVITE) - 1), st.binary(min_size=1, max_size=8))
def test_mutated_invites_raise_only_typed_errors(position: int, junk: bytes) -> None:
    data = INVITE[:position] + junk + INVITE[position + len(junk) :]
    try:
        parse_message(data)
    except SipParseError:
        pass


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.!%*_+`'~", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    user=_token,
    tag=_token,
    extra=st.lists(st.tuples(_token.map(lambda s: "X-" + s), _token), max_size=5),
    body=st.binary(max_size=200),
)
def test_serialise_parse_round_trip(
    user: str, tag: str, extra: list[tuple[str, str]], body: bytes
) -> None:
    lines = [
        f"INVITE sip:{user}@example.com SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1",
        f"From: <sip:{user}@example.net>;tag={tag}",
        "To: <sip:x@example.com>",
        "Call-ID: c1",
        "CSeq: 1 INVITE",
        *[f"{name}: {value}" for name, value in extra],
        f"Content-Length: {len(body)}",
        "",
        "",
    ]
    data = "\r\n".join(lines).encode() + body
    message = parse_message(data)
    assert message.to_bytes() == data
    assert parse_message(message.to_bytes()).to_bytes() == data
