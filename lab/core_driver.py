"""The proxy's work per call without sockets: a switch, ClearIP and a carrier simulated in process.

:class:`Driver` runs the outbound flow through the parser, ``ProxyCore.on_message``, the timer
bookkeeping the daemon does and the serialiser, and times only the proxy's side. Used by
``bench/core_calls.py`` (microseconds per call) and ``tests/test_gc_tuning.py`` (a call leaves
nothing for the garbage collector). Imports only the product, so a copy runs against an older
checkout for a before/after comparison.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

from clearip.relay.config import load_config
from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.core import ProxyCore
from clearip.relay.proxy.effects import CancelTimer, Send, StartTimer
from clearip.relay.proxy.routing import Locality
from clearip.relay.sip.parser import parse_message
from clearip.relay.transport.peer import LocalAddress, Peer

try:
    from clearip.relay import core_build
except ImportError:  # a checkout from before the compiled core, run for a comparison

    def core_build() -> str:
        return "pure"


SWITCH = Peer("udp", "127.0.0.1", 5090)
CLEARIP = Peer("udp", "127.0.0.1", 5070)
CARRIER = Peer("udp", "127.0.0.1", 5080)
IDENTITY = (
    "eyJhbGciOiJFUzI1NiIsInBwdCI6InNoYWtlbiIsInR5cCI6InBhc3Nwb3J0IiwieDV1IjoiaHR0cHM6Ly9jZXJ0"
    "LmV4YW1wbGUub3JnL3NoYWtlbi5wZW0ifQ.eyJhdHRlc3QiOiJBIiwiZGVzdCI6eyJ0biI6WyIxMjEyNTU1MDEwMCJd"
    "fSwiaWF0IjoxNzAwMDAwMDAwLCJvcmlnIjp7InRuIjoiMTQwNDU1NTAxMDAifSwib3JpZ2lkIjoiMTIzZTQ1NjctZT"
    "g5Yi0xMmQzLWE0NTYtNDI2NjE0MTc0MDAwIn0.c2lnbmF0dXJlLXBsYWNlaG9sZGVyLXNpZ25hdHVyZS1wbGFjZWhv"
    "bGRlci1zaWduYXR1cmU;info=<https://cert.example.org/shaken.pem>;alg=ES256;ppt=shaken"
)
INVITE = (
    "INVITE sip:12125550100@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK-{n}-1-0\r\n"
    "From: <sip:14045550100@127.0.0.1:5090>;tag=4242SIPpTag00{n}\r\n"
    "To: <sip:12125550100@127.0.0.1:5060>\r\n"
    "Call-ID: {n}-4242@127.0.0.1\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:switch@127.0.0.1:5090;transport=UDP>\r\n"
    "Max-Forwards: 70\r\n"
    "P-Asserted-Identity: <sip:+14045550100@127.0.0.1>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: 129\r\n\r\n"
    "v=0\r\no=switch 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)
CALL_INTERVAL = 0.002  # simulated time between calls: 500 calls/s
_LINE = re.compile(r"^(Via|From|To|Call-ID|CSeq|Record-Route): [^\r\n]*", re.M)


def _echo(sent: str) -> str:
    """The Via/From/To/Call-ID/CSeq lines of a request, as a UAS copies them."""
    return "\r\n".join(m.group(0) for m in _LINE.finditer(sent) if not m.group(0).startswith("R"))


def _response(sent: str, status: str, extra: str = "", to_tag: str = "") -> bytes:
    head = _echo(sent)
    if to_tag:
        head = re.sub(r"^(To: [^\r\n]*)", rf"\1;tag={to_tag}", head, count=1, flags=re.M)
    return f"SIP/2.0 {status}\r\n{head}\r\n{extra}Content-Length: 0\r\n\r\n".encode()


class Driver:
    def __init__(self) -> None:
        work = Path(tempfile.mkdtemp(prefix="core-calls-"))
        (work / "trust.toml").write_text('[[source]]\ncidr = "127.0.0.1/32"\nrole = "switch"\n')
        (work / "proxy.toml").write_text(
            f'[proxy]\ntrust_file = "{work / "trust.toml"}"\nstate_dir = "{work}"\n'
            'control_socket = ""\ninvite_rate_per_source = 0\n'
            '[upstream.outbound]\nuri = "sip:127.0.0.1:5070;transport=udp"\n'
        )
        config = load_config(work / "proxy.toml")
        self.now = 0.0
        local = LocalAddress("udp", "127.0.0.1", 5060)
        emergency = EmergencyNumbers(("911", "933"))  # made once, as the daemon's policy does
        self.core = ProxyCore(
            config,
            role_of=lambda host: Role.SWITCH,
            emergency=lambda: emergency,
            locality=Locality({"127.0.0.1"}, {5060}),
            local_for=lambda peer, record_route=False: local,
            upstream=lambda role: CLEARIP,
            clock=lambda: self.now,
        )
        self.timers: dict[Any, float] = {}
        self.busy = 0.0
        self.messages = 0
        self.inbox: list[tuple[bytes, Peer]] = []

    def feed(self, data: bytes, peer: Peer) -> list[tuple[str, Peer]]:
        """Proxy side (timed): parse, core, timer bookkeeping, serialise."""
        started = time.thread_time()
        effects = self.core.on_message(parse_message(data), peer)
        out = []
        timers = self.timers
        for effect in effects:
            if isinstance(effect, Send):
                out.append((effect.message.to_bytes(), effect.peer))
            elif isinstance(effect, StartTimer):
                timers[effect.key] = self.now + effect.delay
            elif isinstance(effect, CancelTimer):
                timers.pop(effect.key, None)
        self.busy += time.thread_time() - started
        self.messages += 1
        return [(b.decode(), p) for b, p in out]

    def call(self, n: int) -> None:
        sent = self.feed(INVITE.format(n=n).encode(), SWITCH)
        queue = list(sent)
        while queue:
            text, peer = queue.pop(0)
            if peer == CLEARIP and text.startswith("INVITE"):
                contact = "Contact: <sip:12125550100@127.0.0.1:5080>;q=1.0, "
                contact += "<sip:12125550100@127.0.0.1:5082>;q=0.5\r\n"
                queue += self.feed(
                    _response(text, "302 Moved Temporarily", contact + f"Identity: {IDENTITY}\r\n",
                              to_tag=f"cip{n}"), CLEARIP)  # fmt: skip
            elif peer == CARRIER and text.startswith("INVITE"):
                rr = "\r\n".join(re.findall(r"^Record-Route: [^\r\n]*", text, re.M)) + "\r\n"
                contact = "Contact: <sip:carrier@127.0.0.1:5080>\r\n"
                queue += self.feed(_response(text, "100 Trying"), CARRIER)
                queue += self.feed(_response(text, "180 Ringing", rr + contact, f"c{n}"), CARRIER)
                queue += self.feed(_response(text, "200 OK", rr + contact, f"c{n}"), CARRIER)
            elif peer == CARRIER and text.startswith("BYE"):
                queue += self.feed(_response(text, "200 OK"), CARRIER)
            elif peer == SWITCH and text.startswith("SIP/2.0 200") and "INVITE" in text:
                routes = re.findall(r"^Record-Route: ([^\r\n]*)", text, re.M)
                to = re.search(r"^To: ([^\r\n]*)", text, re.M).group(1)  # type: ignore[union-attr]
                for method, cseq, branch in (("ACK", "1 ACK", "a"), ("BYE", "2 BYE", "b")):
                    request = (
                        f"{method} sip:carrier@127.0.0.1:5080 SIP/2.0\r\n"
                        f"Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK-{n}-{branch}\r\n"
                        f"From: <sip:14045550100@127.0.0.1:5090>;tag=4242SIPpTag00{n}\r\n"
                        f"To: {to}\r\nCall-ID: {n}-4242@127.0.0.1\r\nCSeq: {cseq}\r\n"
                        + "".join(f"Route: {r}\r\n" for r in routes)
                        + "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                    )
                    queue += self.feed(request.encode(), SWITCH)
        self.now += CALL_INTERVAL
