"""ClearIP's 302: Contacts in q order, cut to max_contacts after sorting (issue #15)."""

from __future__ import annotations

from clearip.relay.proxy.redirect import read_redirect
from clearip.relay.proxy.routing import Locality
from clearip.relay.sip.message import Response
from clearip.relay.sip.parser import parse_message


def _redirect(contacts: list[str]) -> Response:
    text = (
        "SIP/2.0 302 Moved Temporarily\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
        "From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>;tag=2\r\nCall-ID: rd1\r\nCSeq: 1 INVITE\r\n"
        f"Contact: {', '.join(contacts)}\r\nContent-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Response)
    return message


def test_the_best_contacts_survive_max_contacts() -> None:
    # Twelve Contacts, worst first: the two with the highest q come last in the header.
    contacts = [f"<sip:1@198.51.100.{i}>;q=0.{i}" for i in range(1, 10)]
    contacts += ["<sip:1@198.51.100.10>;q=0.1", "<sip:1@203.0.113.1>;q=1.0"]
    contacts += ["<sip:1@203.0.113.2>;q=0.95"]
    redirect = read_redirect(_redirect(contacts), Locality(set(), set()), (), max_contacts=3)
    assert [t.uri.host_bare for t in redirect.targets] == [
        "203.0.113.1",
        "203.0.113.2",
        "198.51.100.9",
    ]
    assert any("beyond max_contacts = 3" in why for _, why in redirect.skipped)


def test_ties_keep_the_order_given() -> None:
    contacts = ["<sip:1@198.51.100.1>;q=0.5", "<sip:1@198.51.100.2>;q=0.5", "<sip:1@x.test>"]
    redirect = read_redirect(_redirect(contacts), Locality(set(), set()), (), max_contacts=10)
    assert [t.uri.host_bare for t in redirect.targets] == [
        "x.test",
        "198.51.100.1",
        "198.51.100.2",
    ]
