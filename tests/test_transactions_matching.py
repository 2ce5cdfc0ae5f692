"""Transaction matching (RFC 3261 §17.1.3, §17.2.3, §9.2), the hop-by-hop ACK (§17.1.1.3),
the CANCEL builder (§9.1), the transaction table and the timer settings."""

from __future__ import annotations

import math

import pytest

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.parser import parse_message
from clearip.relay.sip.transaction import (
    TimerSettings,
    TransactionTable,
    ack_for,
    cancel_for,
    cancel_target_key,
    client_key,
    client_key_for,
    server_key,
)
from tests.test_transactions import BRANCH, ack_to, make_request, make_response


def reparse(message: Request) -> Request:
    """What the next hop receives."""
    parsed = parse_message(message.to_bytes())
    assert isinstance(parsed, Request)
    return parsed


# -- server side, RFC 3261 branch ---------------------------------------------------------------
def test_retransmitted_request_matches_its_transaction() -> None:
    assert server_key(make_request()) == server_key(make_request())
    assert server_key(make_request("BYE")) == server_key(make_request("BYE"))


def test_ack_for_a_non2xx_matches_the_invite_transaction() -> None:
    invite = make_request()
    assert server_key(ack_to(invite)) == server_key(invite)


def test_ack_for_a_2xx_is_another_transaction() -> None:
    ack = make_request("ACK", branch="z9hG4bK-new", to_tag="t-1")
    assert server_key(ack) != server_key(make_request())


@pytest.mark.parametrize(
    "other",
    [
        make_request(branch="z9hG4bK-other"),
        make_request(sent_by="192.0.2.2:5060"),
        make_request(sent_by="192.0.2.1"),  # sent-by compares host and port as written
    ],
)
def test_branch_and_sent_by_both_count(other: Request) -> None:
    assert server_key(other) != server_key(make_request())


def test_sent_by_host_compares_case_insensitively() -> None:
    upper = make_request(sent_by="PBX.Example.COM:5060")
    assert server_key(upper) == server_key(make_request(sent_by="pbx.example.com:5060"))


def test_with_a_branch_only_branch_sent_by_and_method_matter() -> None:
    # Different Call-ID, CSeq, tags and URI: the same transaction under §17.2.3's 3261 rule.
    odd = make_request(call_id="x", cseq=99, from_tag="zz", uri="sip:other@example.org")
    assert server_key(odd) == server_key(make_request())


def test_method_separates_transactions_on_the_same_branch() -> None:
    invite = make_request()
    assert server_key(make_request("CANCEL")) != server_key(invite)
    assert server_key(make_request("BYE")) != server_key(make_request("OPTIONS"))


# -- CANCEL (§9.2) ------------------------------------------------------------------------------
def test_cancel_targets_the_invite_it_copies() -> None:
    invite = make_request()
    cancel = make_request("CANCEL")
    assert cancel_target_key(cancel) == server_key(invite)
    assert server_key(cancel) != server_key(invite)  # the CANCEL is its own transaction


def test_cancel_with_another_branch_targets_nothing_of_ours() -> None:
    cancel = make_request("CANCEL", branch="z9hG4bK-other")
    assert cancel_target_key(cancel) != server_key(make_request())


@pytest.mark.parametrize("branch", [BRANCH, "rfc2543-branchless"])
def test_cancel_for_builds_a_cancel_that_matches_its_invite(branch: str) -> None:
    invite = make_request(branch=branch, routes=("<sip:p1.example.net;lr>",))
    cancel = reparse(cancel_for(invite))
    assert cancel.method == "CANCEL" and cancel.uri_text == invite.uri_text
    assert cancel.cseq == (7, "CANCEL") and cancel.get("to") == invite.get("to")
    assert cancel.get_all("route") == invite.get_all("route")
    assert cancel_target_key(cancel) == server_key(reparse(invite))


# -- server side, RFC 2543 fall-back ------------------------------------------------------------
OLD = "0a1b2c"  # a branch without the magic cookie


def test_rfc2543_retransmission_and_ack_match_the_invite() -> None:
    invite = make_request(branch=OLD)
    assert server_key(make_request(branch=OLD)) == server_key(invite)
    # The ACK carries the To tag of our response, not the (absent) tag of the INVITE.
    assert server_key(ack_to(invite, to_tag="ours")) == server_key(invite)
    assert cancel_target_key(make_request("CANCEL", branch=OLD)) == server_key(invite)


@pytest.mark.parametrize(
    "other",
    [
        make_request(branch=OLD, uri="sip:+12125550199@carrier.example.net"),
        make_request(branch=OLD, to_tag="in-dialog"),
        make_request(branch=OLD, from_tag="f-2"),
        make_request(branch=OLD, call_id="call-2@192.0.2.1"),
        make_request(branch=OLD, cseq=8),
        make_request(branch=OLD, sent_by="192.0.2.9:5060"),
        make_request(branch="0a1b2d"),
    ],
)
def test_rfc2543_every_field_counts(other: Request) -> None:
    assert server_key(other) != server_key(make_request(branch=OLD))


def test_without_the_cookie_a_shared_branch_does_not_merge_transactions() -> None:
    one = make_request(branch=OLD, call_id="a")
    two = make_request(branch=OLD, call_id="b")
    assert server_key(one) != server_key(two)


def test_rfc2543_in_dialog_invite_keys_with_its_to_tag() -> None:
    reinvite = make_request(branch=OLD, to_tag="dlg")
    assert server_key(make_request(branch=OLD, to_tag="dlg")) == server_key(reinvite)
    assert cancel_target_key(make_request("CANCEL", branch=OLD, to_tag="dlg")) == server_key(
        reinvite
    )


# -- client side (§17.1.3) ----------------------------------------------------------------------
def test_client_key_matches_responses_by_branch_and_cseq_method() -> None:
    invite, cancel = make_request(), make_request("CANCEL")
    assert client_key(make_response(180, invite)) == client_key_for(invite)
    assert client_key(make_response(200, cancel)) == client_key_for(cancel)
    assert client_key(make_response(200, cancel)) != client_key_for(invite)
    other = make_request(branch="z9hG4bK-other")
    assert client_key(make_response(200, other)) != client_key_for(invite)


def test_client_key_for_an_ack_is_its_invite_transaction() -> None:
    invite = make_request()
    assert client_key_for(ack_for(invite, make_response(486, invite))) == client_key_for(invite)


def test_keys_need_a_via_and_cseq() -> None:
    bare = parse_message(b"OPTIONS sip:a@example.com SIP/2.0\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(bare, Request)
    for key in (server_key, cancel_target_key, client_key_for):
        with pytest.raises(SipParseError):
            key(bare)
    response = parse_message(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(response, Response)
    with pytest.raises(SipParseError):
        client_key(response)


# -- the hop-by-hop ACK (§17.1.1.3) -------------------------------------------------------------
def test_ack_for_follows_17_1_1_3() -> None:
    invite = make_request(
        lower_vias=("SIP/2.0/TCP 198.51.100.7:5060;branch=z9hG4bK-upstream",),
        routes=("<sip:p1.example.net;lr>", "<sip:p2.example.net;lr>"),
        extra=(
            "Contact: <sip:proxy@192.0.2.1:5060>",
            "Content-Type: application/sdp",
            "Identity: abc;info=<https://cert.example/x.pem>;alg=ES256;ppt=shaken",
        ),
        body=b"v=0\r\n",
    )
    response = make_response(486, invite, to_tag="b2c3")
    ack = reparse(ack_for(invite, response))
    assert ack.method == "ACK"
    assert ack.uri_text == invite.uri_text  # same Request-URI
    assert ack.call_id == invite.call_id
    assert ack.get("from") == invite.get("from") and ack.from_tag == "f-1"
    assert ack.cseq == (7, "ACK")  # the INVITE's number, method ACK
    assert ack.get("to") == response.get("to") and ack.to_tag == "b2c3"
    assert ack.get_all("via") == [invite.get_all("via")[0]]  # only the top Via
    assert ack.get_all("route") == invite.get_all("route")  # in order
    assert ack.get("max-forwards") == "70"
    assert ack.get("content-length") == "0" and ack.body == b""
    names = [h[1] for h in ack.headers]
    assert sorted(names) == sorted(
        ["via", "route", "route", "max-forwards", "from", "to", "call-id", "cseq", "content-length"]
    )
    # The next hop's server transaction takes it as the ACK of its INVITE.
    assert server_key(ack) == server_key(reparse(invite))


def test_ack_for_keeps_the_response_to_tag_even_for_a_tagged_invite() -> None:
    reinvite = make_request(to_tag="dlg")
    ack = ack_for(reinvite, make_response(491, reinvite))
    assert ack.to_tag == "dlg" and ack.get("to") == reinvite.get("to")


# -- the table ----------------------------------------------------------------------------------
def test_transaction_table_add_get_remove_len() -> None:
    table: TransactionTable[str] = TransactionTable()
    key, other = server_key(make_request()), server_key(make_request("BYE"))
    assert len(table) == 0 and table.get(key) is None and key not in table
    table.add(key, "invite")
    table.add(other, "bye")
    assert len(table) == 2 and table.get(key) == "invite" and key in table
    assert set(table) == {key, other} and sorted(table.values()) == ["bye", "invite"]
    table.add(key, "replaced")
    assert table.get(key) == "replaced" and len(table) == 2
    assert table.remove(key) == "replaced" and table.remove(key) is None
    assert len(table) == 1 and table.get(key) is None


def test_keys_are_hashable_values() -> None:
    assert len({server_key(make_request()), server_key(make_request())}) == 1


# -- timer settings -----------------------------------------------------------------------------
def test_timer_defaults_follow_rfc3261_table_4_and_rfc6026() -> None:
    t = TimerSettings()
    assert (t.t1, t.t2, t.t4) == (0.5, 4.0, 5.0)
    assert t.timer_a == t.timer_e == t.timer_g == 0.5
    assert t.timer_b == t.timer_f == t.timer_h == t.timer_j == t.timer_l == t.timer_m == 32
    assert t.timer_d == 32 and t.timer_i == t.timer_k == 5
    assert t.timeout == 32


@pytest.mark.parametrize("t1", [0.1, 0.5, 2.0])
def test_timers_derive_from_t1(t1: float) -> None:
    t = TimerSettings(t1=t1)
    assert t.timer_b == t.timer_f == t.timer_h == t.timer_j == t.timer_l == t.timer_m == 64 * t1
    assert t.timer_d == max(32, 64 * t1)  # "> 32 s", and never shorter than the peer's H


def test_backoff_doubles_up_to_t2() -> None:
    t = TimerSettings(t1=0.5, t2=4.0)
    assert [t.backoff(x) for x in (0.5, 1, 2, 4)] == [1, 2, 4, 4]


@pytest.mark.parametrize("bad", [0, -0.5, math.nan, math.inf])
@pytest.mark.parametrize("name", ["t1", "t2", "t4"])
def test_timer_settings_reject_non_positive_values(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=name):
        TimerSettings(**{name: bad})
