"""The seven demo calls: what each shows, the ClearIP answers behind it, how it is judged.

Rules: each :class:`Scenario` is placed once, as the switch (or, inbound, as a carrier); the
emulator's rules (:func:`demo_rules`) decide what ClearIP answers for its dialled number, and
:func:`judge` says what was observed and whether that is what the scenario expects. The
addresses are loopback ones the proxy's trust list names: the switch on 127.0.0.1 and the two
providers on 127.0.0.2 and 127.0.0.3 (:mod:`run` sets them up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clearip.relay.labkit.demo.agents import CallResult, Uas
from clearip.relay.sip.identity import attestation_of
from clearip.relay.transport.peer import Peer

SWITCH = "127.0.0.1"
PROVIDER_A = "127.0.0.2"
PROVIDER_B = "127.0.0.3"
CALLER = "14045550100"


@dataclass
class Scenario:
    """One demo call: its title, the outcome it expects, and the number dialled by ``caller``
    (the switch places it, or a carrier when ``inbound``)."""

    name: str
    expected: str
    number: str
    caller: str = CALLER
    inbound: bool = False


SCENARIOS = [
    Scenario(
        "1 outbound, A-attested, provider A answers", "200 via provider A, attest A", "12125550100"
    ),
    Scenario("2 provider A fails 503, advance to B", "200 via provider B", "12125550101"),
    Scenario(
        "3 robocall blocked by ClearIP", "603 to the switch", "12125550102", caller="18005550199"
    ),
    Scenario("4 ClearIP lets the call pass", "503 (switch routes directly)", "12125550103"),
    Scenario("5 emergency 911 bypasses ClearIP", "503 at once, ClearIP untouched", "911"),
    Scenario("6 ClearIP does not answer", "503 fail-open after timeout", "12125550104"),
    Scenario(
        "7 inbound call verified by ClearIP",
        "200 at the switch, PAI verstat",
        "12125550105",
        caller="13125550177",
        inbound=True,
    ),
]


def demo_rules(
    *, provider_a: Peer, provider_b: Peer, provider_a_fail: Peer, switch_in: Peer
) -> dict[str, Any]:
    """The emulator's rules for the seven demo calls (first match wins)."""

    def at(peer: Peer) -> str:
        return f"sip:{{dialled}}@{peer.host}:{peer.port}"

    return {
        "signing": {"x5u": "https://cert.clearip-lab.example/shaken.pem"},
        "rule": [
            {"name": "robocaller", "calling": "18005550199", "action": "block",
             "reason": "Robocall: caller on the block list"},
            {"name": "routed", "dialled": "12125550100", "action": "route", "attest": "A",
             "contacts": [at(provider_a), at(provider_b)]},
            {"name": "A fails", "dialled": "12125550101", "action": "route", "attest": "A",
             "contacts": [at(provider_a_fail), at(provider_b)]},
            {"name": "pass", "dialled": "12125550103", "action": "pass"},
            {"name": "no answer", "dialled": "12125550104", "action": "silent"},
            {"name": "inbound", "dialled": "12125550105", "action": "verify",
             "cnam": "ACME PHARMA", "verstat": "TN-Validation-Passed",
             "contacts": [at(switch_in)]},
        ],
    }  # fmt: skip


def judge(
    scenario: Scenario,
    result: CallResult,
    summary: dict[str, Any],
    *,
    clearip_invites: int,
    answered_by: dict[str, list[Any]],
    switch_in: Uas,
) -> tuple[str, bool]:
    """(what was observed, whether it is what ``scenario`` expects) for one placed call."""
    final = result.final
    if final is None:
        return "no final response", False
    number = scenario.number
    if number == "12125550100":
        attest = (
            attestation_of(answered_by["provider A"][0].get("identity"))
            if answered_by["provider A"]
            else None
        )
        return (
            f"{final} via provider A, attest {attest}",
            final == 200 and attest == "A" and result.bye_status == 200,
        )
    if number == "12125550101":
        ok = final == 200 and bool(answered_by["provider B"]) and not answered_by["provider A"]
        return f"{final} via {'provider B' if answered_by['provider B'] else '?'}", ok
    if number == "12125550102":
        return f"{final} to the switch", final == 603
    if number == "12125550103":
        return f"{final} (pass)", final == 503 and summary.get("clearip_status") == 503
    if number == "911":
        return (
            f"{final}, ClearIP saw {clearip_invites} INVITE(s)",
            final == 503 and clearip_invites == 0,
        )
    if number == "12125550104":
        return (
            f"{final} after {summary.get('total_ms')} ms",
            final == 503 and "fail-open" in summary.get("note", ""),
        )
    if scenario.inbound:
        pai = switch_in.invites[-1].get("p-asserted-identity") if switch_in.invites else ""
        return f"{final}, PAI {pai}", final == 200 and "verstat=TN-Validation-Passed" in (pai or "")
    return str(final), False
