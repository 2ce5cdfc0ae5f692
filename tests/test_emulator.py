"""The ClearIP emulator without SIPp: rules, responses, configuration, and the server in-process.

SIPp (UDP/TCP), TLS and the command line as a subprocess are in test_emulator_sipp.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from clearip.relay.labkit.emulator import (
    DEFAULT_RULES,
    Emulator,
    EmulatorConfig,
    RulesError,
    load_config,
    load_rules,
    rules_from_data,
    run_emulator,
    start_emulator,
)
from clearip.relay.labkit.emulator.passport import Signer, verify_identity
from clearip.relay.labkit.emulator.responses import build_response, q_value, trying
from clearip.relay.labkit.emulator.server import print_counters, signer_for
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.parser import parse_message
from clearip.relay.sip.transaction.timers import TimerSettings
from clearip.relay.sip.uri import SipUri
from clearip.relay.transport.peer import ListenerSpec

X5U = "https://cert.test/shaken.pem"


def invite(
    number: str = "12125550100",
    caller: str = "14045550100",
    *,
    pai: str | None = None,
    uri: str | None = None,
    branch: str = "z9hG4bKt1",
    via: str = "SIP/2.0/UDP 127.0.0.1:5999;rport",  # answered at the source port (RFC 3581)
    method: str = "INVITE",
    extra: str = "",
) -> bytes:
    lines = [
        f"{method} {uri or f'sip:{number}@127.0.0.1'} SIP/2.0",
        f"Via: {via};branch={branch}",
        "Via: SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bKupstream",
        "Max-Forwards: 70",
        f"From: <sip:{caller}@127.0.0.1>;tag=from1",
        f"To: <sip:{number}@127.0.0.1>",
        "Call-ID: call-1@test",
        f"CSeq: 7 {method}",
    ]
    if pai:
        lines.append(f"P-Asserted-Identity: {pai}")
    if extra:
        lines.append(extra)
    return ("\r\n".join([*lines, "Content-Length: 0", "", ""])).encode()


def request(data: bytes) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


# -- rules ---------------------------------------------------------------------------------------
RULES: dict[str, Any] = {
    "signing": {"x5u": X5U, "attest": "B"},
    "rule": [
        {"name": "sbc blocked", "source": ["10.0.0.0/8", "2001:db8::/32"],
         "calling": ["1800555????", "re:^1888"], "action": "block"},
        {"name": "sbc", "source": ["10.0.0.0/8", "2001:db8::/32"], "dialled": "1212*",
         "action": "route", "contacts": ["sip:{dialled}@192.0.2.20"]},
        {"name": "tollfree", "dialled": "re:^18(00|88)", "action": "divert",
         "target": "sip:captcha@192.0.2.40"},
        {"name": "one digit", "dialled": "1?00", "action": "pass"},
        {"name": "anything else", "action": "unknown-source", "code": 403},
    ],
}  # fmt: skip


def decide(number: str, source: str = "10.1.2.3", **kwargs: Any) -> str:
    rules = rules_from_data(RULES, "test.toml")
    return rules.decide(request(invite(number, **kwargs)), source).rule.name


def test_first_match_wins_on_source_dialled_and_calling() -> None:
    assert decide("12125550100") == "sbc"
    assert decide("12125550100", caller="18005550199") == "sbc blocked"
    assert decide("12125550100", caller="18885550100") == "sbc blocked"  # re: is searched
    assert decide("12125550100", caller="180055501999") == "sbc"  # ? is exactly one digit
    assert decide("12125550100", source="192.0.2.1") == "anything else"
    assert decide("12125550100", source="2001:db8::5") == "sbc"
    assert decide("12125550100", source="::ffff:10.9.9.9") == "sbc"  # v4-mapped
    assert decide("12125550100", source="not-an-address") == "anything else"
    assert decide("18005550100", source="192.0.2.1") == "tollfree"
    assert decide("1000", source="192.0.2.1") == "one digit"
    assert decide("10000", source="192.0.2.1") == "anything else"  # wildcards match the whole


def test_numbers_come_from_tel_uris_pai_and_visual_separators() -> None:
    rules = rules_from_data(RULES, "test.toml")
    tel = request(invite(uri="tel:+1-212-555-0100;phone-context=+1"))
    assert rules.decide(tel, "10.0.0.1").dialled == "12125550100"
    # P-Asserted-Identity wins over From for the calling number...
    pai = request(invite("12125550100", pai="<sip:+1-800-555-0199@carrier;user=phone>"))
    decision = rules.decide(pai, "10.0.0.1")
    assert (decision.calling, decision.rule.name) == ("18005550199", "sbc blocked")
    # ...unless it holds no number; then From counts.
    anonymous = request(invite("12125550100", pai="<sip:anonymous@anonymous.invalid>"))
    assert rules.decide(anonymous, "10.0.0.1").calling == "14045550100"
    assert rules.decide(request(invite(uri="sip:alice@example.com")), "1.2.3.4").dialled == ""


def test_the_default_rules_give_the_seed_behaviour() -> None:
    rules = load_rules(DEFAULT_RULES)
    routed = rules.decide(request(invite("12125550100")), "127.0.0.1")
    assert routed.action == "route" and routed.rule.attest == "A"
    assert rules.decide(request(invite("12125550100")), "192.168.1.20").action == "route"
    blocked = rules.decide(request(invite("12125550100", "18005550199")), "127.0.0.1")
    assert blocked.action == "block"
    unknown = rules.decide(request(invite("12125550100")), "203.0.113.9")
    assert unknown.action == "unknown-source" and unknown.rule.code == 404
    # A blocked caller from an unknown source is still an unknown source.
    stranger = rules.decide(request(invite("12125550100", "18005550199")), "203.0.113.9")
    assert stranger.action == "unknown-source"
    assert load_config(DEFAULT_RULES).listeners == ()


def test_signing_attest_is_the_default_and_delay_takes_the_fields_of_then() -> None:
    rules = rules_from_data(
        {
            "signing": {"attest": "C"},
            "rule": [
                {"dialled": "1", "action": "route", "contacts": ["sip:a@192.0.2.1"]},
                {"dialled": "2", "action": "delay", "delay_ms": 50, "then": "verify",
                 "contacts": ["sip:switch@192.0.2.2"], "cnam": "ACME",
                 "verstat": "No-TN-Validation"},
                {"dialled": "3", "action": "delay", "delay_ms": 0, "contacts": ["sip:b@192.0.2.3"]},
                {"dialled": "4", "action": "divert", "contacts": ["sip:captcha@192.0.2.4"]},
            ],
        },
        "x",
    )  # fmt: skip
    first, second, third, fourth = rules.rules
    assert first.attest == "C"
    assert (second.answer, second.cnam, second.verstat) == ("verify", "ACME", "No-TN-Validation")
    assert (third.answer, third.attest) == ("route", "C")
    assert fourth.target == "sip:captcha@192.0.2.4"


BAD_RULES: list[tuple[dict[str, Any], str]] = [
    ({"action": "teleport"}, "unknown action 'teleport'; fix: use one of route, verify"),
    ({"name": "x"}, "missing action; fix: add action ="),
    ({"action": "route"}, "route needs contacts; fix: add contacts ="),
    ({"action": "verify", "cnam": "A"}, "verify needs contacts"),
    ({"action": "pass", "dialled": "12a*"}, "bad pattern '12a*'; fix: use digits with *"),
    ({"action": "pass", "calling": "re:("}, "bad regular expression 're:('"),
    ({"action": "pass", "dialled": []}, "dialled is an empty list; fix: remove dialled"),
    ({"action": "pass", "dialled": 1212}, "a pattern must be a non-empty string"),
    ({"action": "pass", "source": "300.0.0.0/8"}, "bad source '300.0.0.0/8'; fix: use an"),
    ({"action": "pass", "source": [10]}, "bad source 10"),
    ({"action": "route", "contacts": ["http://x"]}, "'http://x' is not a sip: or sips: URI"),
    ({"action": "route", "contacts": ["sip:a b@c"]}, "bad URI"),
    ({"action": "route", "contacts": ["sip:a@b"], "attest": "D"}, "attest = 'D' is not allowed"),
    ({"action": "verify", "contacts": ["sip:a@b"], "verstat": "ok"}, "verstat = 'ok'"),
    ({"action": "verify", "contacts": ["sip:a@b"], "cnam": 'A"B'}, "double quote"),
    ({"action": "delay"}, "delay needs delay_ms; fix: add delay_ms"),
    ({"action": "delay", "delay_ms": -1}, "delay_ms = -1; fix: use whole milliseconds"),
    ({"action": "delay", "delay_ms": 5, "then": "silent"}, "then = 'silent' is not an answer"),
    ({"action": "pass", "colour": "red"}, "field(s) ['colour'] not used by action 'pass'"),
    ({"action": "block", "attest": "A"}, "field(s) ['attest'] not used by action 'block'"),
    ({"action": "divert"}, "divert needs exactly one of target and contacts"),
    ({"action": "divert", "contacts": ["sip:a@b", "sip:c@d"]}, "divert goes to a single target"),
    ({"action": "block", "redress": "http://x"}, "redress url 'http://x' is not https"),
    ({"action": "block", "redress": {"note": "x"}}, "redress: unknown key(s) ['note']"),
    ({"action": "block", "redress": {"location": "TN"}}, "redress gives no url, tel or email"),
    ({"action": "block", "redress": {"tel": "1 800"}}, "must be a string without spaces"),
    ({"action": "unknown-source", "code": 500}, "code = 500; fix: unknown-source answers"),
    ({"action": "pass", "name": 5}, "name must be a string"),
]


@pytest.mark.parametrize(("rule", "needle"), BAD_RULES)
def test_bad_rules_name_the_file_the_rule_and_the_fix(rule: dict[str, Any], needle: str) -> None:
    rule_name = rule.get("name") if isinstance(rule.get("name"), str) else "rule 2"
    with pytest.raises(RulesError) as info:
        rules_from_data({"rule": [{"action": "pass"}, rule]}, "lab.toml")
    text = str(info.value)
    assert text.startswith(f"lab.toml: rule #2 ({rule_name!r}): "), text
    assert needle in text, text
    assert info.value.fix and "; fix: " in text
    assert info.value.rule == f"rule #2 ({rule_name!r})"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"rules": []}, "unknown table(s) ['rules']; fix: use [signing]"),
        ({"rule": {"action": "pass"}}, "rules must be [[rule]] tables"),
        ({"rule": ["pass"]}, "rule #1: each rule must be a table"),
        ({"signing": {"x5u": "ftp://x"}}, "[signing] x5u = 'ftp://x'"),
        ({"signing": {"attest": "E"}}, "[signing] attest = 'E'"),
        ({"signing": {"key": "x"}}, "[signing]: unknown key(s) ['key']"),
        ({"listen": [{"transport": "sctp"}]}, "[[listen]] #1: transport = 'sctp'"),
        ({"listen": [{"transport": "udp", "port": 70000}]}, "port = 70000"),
        ({"listen": [{"transport": "tls", "certificate": "a.pem"}]}, "go together"),
        ({"tls": {"lab": "x"}}, "[tls]: unknown key(s) ['lab']"),
    ],
)
def test_bad_tables_name_the_file_and_the_fix(data: dict[str, Any], needle: str) -> None:
    from clearip.relay.labkit.emulator.config import config_from_data

    with pytest.raises(RulesError) as info:
        config_from_data(data, "lab.toml")
    assert str(info.value).startswith("lab.toml: ") and needle in str(info.value)
    assert "fix: " in str(info.value)


def test_files_toml_errors_and_relative_paths(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(RulesError, match=r"missing\.toml: rules file not found"):
        load_rules(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[[rule]\n")
    with pytest.raises(RulesError, match=r"broken\.toml: cannot read the rules.*fix: correct"):
        load_rules(broken)
    Signer.generate(X5U).save_key(tmp_path / "signing.key")
    good = tmp_path / "lab.toml"
    good.write_text(
        '[signing]\nkey_file = "signing.key"\n'
        '[[listen]]\ntransport = "udp"\nport = 0\n'
        '[[listen]]\ntransport = "tls"\naddress = "::1"\n'
        '[tls]\nlab_dir = "lab"\nnames = ["emulator.lab"]\n'
        '[[rule]]\naction = "pass"\n'
    )
    config = load_config(good)
    assert config.rules.signing.key_file == str(tmp_path / "signing.key")
    assert config.listeners == (
        ListenerSpec("udp", "127.0.0.1", 0),
        ListenerSpec("tls", "::1", 5061),
    )
    assert (config.lab_dir, config.lab_names) == (str(tmp_path / "lab"), ("emulator.lab",))
    signer = signer_for(config.rules.signing, str(good))
    assert (
        signer.public_pem()
        == Signer.from_pem((tmp_path / "signing.key").read_bytes(), X5U).public_pem()
    )
    (tmp_path / "signing.key").write_text("junk")
    with pytest.raises(RulesError, match=r"lab\.toml: \[signing\] key_file .*fix: give a PEM"):
        signer_for(config.rules.signing, str(good))


# -- responses -----------------------------------------------------------------------------------
def test_q_values_descend_by_hundredths_like_clearip() -> None:
    assert [q_value(i) for i in range(4)] == ["1.0", "0.99", "0.98", "0.97"]
    assert q_value(10) == "0.90" and q_value(99) == "0.01" and q_value(150) == "0.01"


def _answer(rule: dict[str, Any], data: bytes | None = None) -> tuple[Response, Signer]:
    rules = rules_from_data({"signing": {"x5u": X5U}, "rule": [rule]}, "x")
    req = request(data or invite())
    signer = Signer.generate(X5U)
    response = build_response(rules.decide(req, "127.0.0.1"), req, signer)
    # What goes on the wire parses back to the same thing.
    parsed = parse_message(response.to_bytes())
    assert isinstance(parsed, Response)
    return parsed, signer


def test_route_302_contacts_identity_and_reason() -> None:
    contacts = [f"sip:{{dialled}}@192.0.2.{n}:5060" for n in range(20, 32)]
    response, signer = _answer({"action": "route", "attest": "B", "contacts": contacts})
    assert (response.status, response.reason) == (302, "Moved Temporarily")
    addresses = response.addresses("contact")
    assert [a.uri_text for a in addresses] == [
        c.replace("{dialled}", "12125550100") for c in contacts
    ]
    assert [a.param("q") for a in addresses][:3] == ["1.0", "0.99", "0.98"]
    qs = [a.q for a in addresses]
    assert qs == sorted(qs, reverse=True) and len(set(qs)) == len(qs)
    claims = verify_identity(response.get("identity") or "", signer.public_key)
    assert claims["attest"] == "B"
    assert claims["orig"] == {"tn": "14045550100"} and claims["dest"] == {"tn": ["12125550100"]}
    assert response.get("reason") == 'SIP;cause=302;text="Routed by ClearIP, attestation B"'


def test_responses_copy_via_from_to_call_id_cseq_and_add_a_to_tag() -> None:
    req = request(invite())
    response, _ = _answer({"action": "pass"})
    assert response.get_all("via") == req.get_all("via")  # both, in order
    assert response.get("from") == req.get("from")
    assert response.call_id == req.call_id and response.cseq == (7, "INVITE")
    assert response.to_addr.uri_text == req.to_addr.uri_text and response.to_tag
    again, _ = _answer({"action": "pass"})
    assert again.to_tag == response.to_tag  # the same for a retransmitted request
    hundred = trying(request(invite(extra="Timestamp: 54.2")))
    assert hundred.status == 100 and hundred.to_tag is None
    assert hundred.get("timestamp") == "54.2"


def test_verify_divert_pass_block_and_unknown_source() -> None:
    verify, _ = _answer(
        {"action": "verify", "cnam": "ACME PHARMA", "verstat": "TN-Validation-Failed",
         "contacts": ["sip:switch@192.0.2.30", "sip:switch@192.0.2.31"]},
        invite(pai="<sip:+14045550100@carrier.example;user=phone>"),
    )  # fmt: skip
    assert verify.status == 302 and verify.get("identity") is None
    (pai,) = verify.addresses("p-asserted-identity")
    assert pai.display == '"ACME PHARMA"'
    uri = pai.uri
    assert isinstance(uri, SipUri) and uri.param("user") == "phone"
    assert uri.user == "+14045550100;verstat=TN-Validation-Failed"
    assert [a.q for a in verify.addresses("contact")] == [1.0, 0.99]
    divert, _ = _answer({"action": "divert", "target": "sip:captcha@192.0.2.40"})
    assert [a.uri_text for a in divert.addresses("contact")] == ["sip:captcha@192.0.2.40"]
    assert 'text="Diverted by ClearIP"' in (divert.get("reason") or "")
    passed, _ = _answer({"action": "pass"})
    assert (passed.status, passed.reason) == (503, "Service Unavailable")
    assert passed.get("contact") is None and passed.get("reason") is None
    blocked, _ = _answer({"action": "block", "reason": "Robocall"})
    assert (blocked.status, blocked.reason) == (603, "Decline")
    assert blocked.get("reason") == 'SIP;cause=603;text="Robocall"'
    plus, _ = _answer(
        {"action": "block", "redress": {"url": "https://redress.test/form", "tel": "+18005550100"}}
    )
    assert (plus.status, plus.reason) == (603, "Network Blocked")
    assert plus.get("reason") == (
        'SIP;cause=603;text="v=clearip;url=https://redress.test/form;tel=+18005550100";location=TN'
    )
    assert _answer({"action": "unknown-source"})[0].status == 404
    forbidden, _ = _answer({"action": "unknown-source", "code": 403, "reason": "not an SBC"})
    assert (forbidden.status, forbidden.reason) == (403, "Forbidden")
    assert forbidden.get("reason") == 'SIP;cause=403;text="not an SBC"'


# -- the server, in-process ------------------------------------------------------------------------
FAST = TimerSettings(t1=0.05, t2=0.2, t4=0.1)
SERVER_RULES: dict[str, Any] = {
    "signing": {"x5u": X5U},
    "rule": [
        {"dialled": "1000", "action": "route", "contacts": ["sip:{dialled}@192.0.2.20"]},
        {"dialled": "1003", "action": "pass"},
        {"dialled": "1006", "action": "silent"},
        {"dialled": "1007", "action": "delay", "delay_ms": 300, "then": "block"},
        {"dialled": "1008", "action": "drop-connection"},
    ],
}


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Response | Request] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        message = parse_message(data)
        assert isinstance(message, Request | Response)
        self.queue.put_nowait(message)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    async def next(self, timeout: float = 2.0) -> Response:
        message = await asyncio.wait_for(self.queue.get(), timeout)
        assert isinstance(message, Response)
        return message

    async def nothing(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.queue.get(), seconds)


@asynccontextmanager
async def running(timers: TimerSettings = FAST) -> AsyncIterator[tuple[Emulator, Client]]:
    emulator = await start_emulator(
        EmulatorConfig(
            rules=rules_from_data(SERVER_RULES, "server rules"),
            listeners=(ListenerSpec("udp", "127.0.0.1", 0), ListenerSpec("tcp", "127.0.0.1", 0)),
            timers=timers,
        )
    )
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(
        Client, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", emulator.ports["udp"])
    )
    try:
        async with emulator:
            yield emulator, client
    finally:
        assert client.transport is not None
        client.transport.close()


def ack(response: Response, branch: str = "z9hG4bKt1") -> bytes:
    to = response.get("to") or ""
    return invite("1000", method="ACK", branch=branch).replace(
        b"To: <sip:1000@127.0.0.1>", f"To: {to}".encode()
    )


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def test_udp_transaction_retransmits_the_302_until_the_ack() -> None:
    async def scenario() -> None:
        async with running() as (emulator, client):
            client.send(invite("1000"))
            assert (await client.next()).status == 100
            final = await client.next()
            assert final.status == 302
            # No ACK yet: Timer G resends the very same 302.
            again = await client.next(1.0)
            assert again.status == 302 and again.to_tag == final.to_tag
            assert again.get("identity") == final.get("identity")
            # A retransmitted INVITE is answered from the transaction, not decided again.
            client.send(invite("1000"))
            assert (await client.next()).status == 302
            client.send(ack(final))
            await asyncio.sleep(0.05)
            while not client.queue.empty():  # anything already on its way
                client.queue.get_nowait()
            await client.nothing(0.6)  # the ACK stopped the retransmissions
            stats = emulator.stats()
            assert stats["invites"] == 1 and stats["route"] == 1 and stats["answered_302"] == 1
            assert stats["acks"] == 1 and stats["retransmissions"] == 1
            await asyncio.sleep(0.3)  # Timer I (T4) ends the transaction
            assert emulator.pending() == 0

    run(scenario)


def test_cancel_during_a_delay_gets_200_and_487() -> None:
    async def scenario() -> None:
        async with running() as (emulator, client):
            client.send(invite("1007", branch="z9hG4bKdelay"))
            assert (await client.next()).status == 100
            client.send(invite("1007", method="CANCEL", branch="z9hG4bKdelay"))
            first, second = await client.next(), await client.next()
            assert (first.status, first.cseq) == (200, (7, "CANCEL"))
            assert (second.status, second.cseq) == (487, (7, "INVITE"))
            client.send(ack(second, "z9hG4bKdelay"))
            await client.nothing(0.5)  # the delayed 603 never comes
            stats = emulator.stats()
            assert stats["cancelled"] == 1 and stats.get("answered_603", 0) == 0
            client.send(invite("1007", method="CANCEL", branch="z9hG4bKnone"))
            assert (await client.next()).status == 481

    run(scenario)


def test_delay_answers_after_delay_ms() -> None:
    async def scenario() -> None:
        async with running() as (_, client):
            started = time.monotonic()
            client.send(invite("1007", branch="z9hG4bKlate"))
            assert (await client.next()).status == 100
            final = await client.next()
            assert final.status == 603 and time.monotonic() - started >= 0.3

    run(scenario)


def test_silent_absorbs_retransmissions_and_is_forgotten_later() -> None:
    async def scenario() -> None:
        async with running() as (emulator, client):
            client.send(invite("1006", branch="z9hG4bKquiet"))
            client.send(invite("1006", branch="z9hG4bKquiet"))
            await client.nothing(0.5)
            assert emulator.stats()["retransmissions"] == 1 and emulator.pending() == 1
            await asyncio.sleep(64 * FAST.t1 + FAST.t4)
            assert emulator.pending() == 0

    run(scenario)


def test_options_get_200_other_methods_405_and_responses_are_ignored() -> None:
    async def scenario() -> None:
        async with running() as (emulator, client):
            client.send(invite(method="OPTIONS", branch="z9hG4bKo"))
            ok = await client.next()
            assert ok.status == 200 and "INVITE" in (ok.get("allow") or "")
            client.send(invite(method="MESSAGE", branch="z9hG4bKm"))
            refused = await client.next()
            assert refused.status == 405 and refused.get("allow")
            client.send(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx\r\n"
                        b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\n"
                        b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")  # fmt: skip
            await client.nothing(0.2)
            assert emulator.stats()["options"] == 1 and emulator.stats()["other_methods"] == 1

    run(scenario)


def test_drop_connection_closes_the_tcp_connection_at_once() -> None:
    async def scenario() -> None:
        async with running() as (emulator, client):
            port = emulator.ports["tcp"]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(invite("1008", via="SIP/2.0/TCP 127.0.0.1:5999"))
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 2) == b""  # EOF, no response
            assert time.monotonic() - started < 1
            writer.close()
            # The same rule over UDP is silent.
            client.send(invite("1008", branch="z9hG4bKdropudp"))
            await client.nothing(0.3)
            assert emulator.stats()["drop-connection"] == 2

    run(scenario)


def test_run_emulator_until_stopped_writes_ready_and_stats_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        config = EmulatorConfig(
            rules=rules_from_data(SERVER_RULES, "server rules"),
            listeners=(ListenerSpec("udp", "127.0.0.1", 0), ListenerSpec("tls", "127.0.0.1", 0)),
            lab_dir=str(tmp_path / "lab"),
            ready_file=str(tmp_path / "ready.json"),
            stats_file=str(tmp_path / "stats.json"),
            public_key_out=str(tmp_path / "signing.pem"),
        )
        task = asyncio.create_task(run_emulator(config, stop))
        while not (tmp_path / "ready.json").exists():
            await asyncio.sleep(0.01)
        ports = json.loads((tmp_path / "ready.json").read_text())
        assert set(ports) == {"udp", "tls"} and (tmp_path / "lab" / "ca.pem").exists()
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_datagram_endpoint(
            Client, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", ports["udp"][0])
        )
        client.send(invite("1003"))
        assert (await client.next()).status == 100
        assert (await client.next()).status == 503
        transport.close()
        stop.set()
        await task

    run(scenario)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["invites"] == 1 and stats["pass"] == 1 and stats["answered_503"] == 1
    out = capsys.readouterr().out
    assert "ClearIP emulator counters" in out and "pass" in out
    assert (tmp_path / "signing.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY")


def test_start_emulator_refuses_tls_without_certificate_and_empty_listeners() -> None:
    async def scenario() -> None:
        rules = rules_from_data(SERVER_RULES, "server rules")
        with pytest.raises(RulesError, match="no listeners"):
            await start_emulator(EmulatorConfig(rules=rules))
        with pytest.raises(RulesError, match=r"TLS listener has no certificate.*--lab-tls"):
            await start_emulator(
                EmulatorConfig(rules=rules, listeners=(ListenerSpec("tls", "127.0.0.1", 0),))
            )

    run(scenario)


def test_counter_table() -> None:
    import io

    out = io.StringIO()
    print_counters({"invites": 3, "route": 2, "pass": 1, "answered_302": 2}, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "ClearIP emulator counters"
    assert lines[1].split() == ["INVITEs", "3"]
    assert lines[2].split() == ["route", "2"] and ["silent", "0"] in [ln.split() for ln in lines]
    assert lines[-1].split() == ["answered_302", "2"]


# -- the command line ----------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clearip.relay.labkit.emulator", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_refuses_bad_rules_and_missing_tls_material(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "oops"\naction = "nope"\n')
    result = _cli("--rules", str(bad), "--udp", "127.0.0.1:0")
    assert result.returncode == 2
    expected = f"error: {bad}: rule #1 ('oops'): unknown action 'nope'; fix: use one of"
    assert expected in result.stderr
    result = _cli("--tls", "127.0.0.1:0")
    assert result.returncode == 2 and "--lab-tls" in result.stderr
    result = _cli("--udp", "nonsense")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr
    shown = _cli("--show-default-rules")
    assert shown.returncode == 0 and shown.stdout == DEFAULT_RULES.read_text()
