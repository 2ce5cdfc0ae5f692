"""A compact SIP ladder of what the proxy sent and received, built from its trace hook."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from clearip.relay.shaken import attestation_of
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.transport.peer import Peer

PROXY = "proxy"


@dataclass
class Step:
    at: float
    sender: str
    receiver: str
    summary: str
    details: list[str]


@dataclass
class Ladder:
    names: dict[tuple[str, int], str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def name_of(self, peer: Peer) -> str:
        return self.names.get((peer.host, peer.port), f"{peer.host}:{peer.port}")

    def record(self, direction: str, message: Message, peer: Peer) -> None:
        other = self.name_of(peer)
        sender, receiver = (other, PROXY) if direction == "in" else (PROXY, other)
        self.steps.append(
            Step(time.monotonic(), sender, receiver, _summary(message), _details(message))
        )

    def reset(self) -> None:
        self.steps = []
        self.started = time.monotonic()

    def render(self, colour: bool) -> list[str]:
        lines = []
        for step in self.steps:
            ms = (step.at - self.started) * 1000
            arrow = f"{step.sender:>10} -> {step.receiver:<10}"
            text = step.summary
            if colour:
                code = _colour_for(text)
                text = f"\033[{code}m{text}\033[0m" if code else text
            detail = f"  ({'; '.join(step.details)})" if step.details else ""
            lines.append(f"  {ms:7.1f} ms  {arrow} {text}{detail}")
        return lines


def _summary(message: Message) -> str:
    if isinstance(message, Request):
        return f"{message.method} {message.uri_text.split(';')[0]}"
    assert isinstance(message, Response)
    return f"{message.status} {message.reason}"


def _details(message: Message) -> list[str]:
    out = []
    identity = message.get("identity")
    if identity:
        out.append(f"Identity attest={attestation_of(identity) or '?'}")
    pai = message.get("p-asserted-identity")
    if pai and isinstance(message, Response):
        out.append(f"PAI {pai}")
    if isinstance(message, Request) and message.method == "INVITE" and pai and "verstat" in pai:
        out.append(f"PAI {pai}")
    if isinstance(message, Response) and 300 <= message.status < 400:
        contacts = [a.uri_text for a in message.addresses("contact")]
        if contacts:
            out.append("Contact " + ", ".join(contacts))
    reason = message.get("reason")
    if reason:
        out.append(f"Reason {reason}")
    return out


def _colour_for(text: str) -> str:
    head = text.split(" ", 1)[0]
    if head.isdigit():
        code = int(head)
        if code < 200:
            return "2"
        if code < 300:
            return "32"
        if code < 400:
            return "36"
        return "31"
    return "1"
