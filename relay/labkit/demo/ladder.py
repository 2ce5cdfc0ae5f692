"""A compact SIP ladder of what the proxy sent and received, built from its trace hook.

It keeps the steps of one call for ``render``; or, once ``follow`` is called (the demo's
keep-running mode), writes each step at once and keeps nothing, so a long run stays small.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clearip.relay.sip.identity import attestation_of
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
    # Names by address alone, for agents whose port is not known in advance (SIPp).
    hosts: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    sink: Callable[[str], None] | None = None
    colour: bool = False

    def name_of(self, peer: Peer) -> str:
        name = self.names.get((peer.host, peer.port)) or self.hosts.get(peer.host)
        return name or f"{peer.host}:{peer.port}"

    def record(self, direction: str, message: Message, peer: Peer) -> None:
        other = self.name_of(peer)
        sender, receiver = (other, PROXY) if direction == "in" else (PROXY, other)
        step = Step(time.monotonic(), sender, receiver, _summary(message), _details(message))
        if self.sink is None:
            self.steps.append(step)
            return
        if direction == "in" and _starts_a_call(message):
            self.started = step.at
            self.sink("")
        self.sink(self._line(step, self.colour))

    def follow(self, sink: Callable[[str], None], *, colour: bool) -> None:
        """From now on each step goes to ``sink`` as it happens; a new call starts the clock."""
        self.reset()
        self.sink, self.colour = sink, colour

    def reset(self) -> None:
        self.steps = []
        self.started = time.monotonic()

    def render(self, colour: bool) -> list[str]:
        return [self._line(step, colour) for step in self.steps]

    def _line(self, step: Step, colour: bool) -> str:
        ms = (step.at - self.started) * 1000
        arrow = f"{step.sender:>10} -> {step.receiver:<10}"
        text = step.summary
        if colour:
            code = _colour_for(text)
            text = f"\033[{code}m{text}\033[0m" if code else text
        detail = f"  ({'; '.join(step.details)})" if step.details else ""
        return f"  {ms:7.1f} ms  {arrow} {text}{detail}"


def _starts_a_call(message: Message) -> bool:
    """An INVITE without a To tag (a retransmission also counts; the clock restarts)."""
    return (
        isinstance(message, Request)
        and message.method == "INVITE"
        and ";tag=" not in (message.get("to") or "")
    )


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
