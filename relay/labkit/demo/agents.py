"""Stand-in switch and carriers for the demo: minimal SIP user agents on loopback.

They speak just enough SIP for a readable demo on a loss-free loopback: a UAC that places one
call and hangs up, and a UAS that answers, fails or stays silent. They are not the product (the
proxy and the emulator are); the end-to-end tests use real SIPp processes instead.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.uri import SipUri, parse_uri
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import ListenerSpec, Peer, response_peer

SDP = (
    b"v=0\r\no=demo 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def _branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


@dataclass
class CallResult:
    final: int | None = None
    final_response: Response | None = None
    provisional: list[int] = field(default_factory=list)
    bye_status: int | None = None


class Uac:
    """A switch (or a carrier, for inbound calls) that places calls through the proxy."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.endpoint = SipEndpoint(self._on_message)
        self.port = 0
        self._waiters: dict[tuple[str, str], asyncio.Queue[Response]] = {}

    async def start(self) -> None:
        _, self.port = await self.endpoint.listen(ListenerSpec("udp", self.host, 0))

    def _on_message(self, message: Request | Response, peer: Peer) -> None:
        if isinstance(message, Response):
            queue = self._waiters.get((message.call_id, message.cseq[1]))
            if queue is not None:
                queue.put_nowait(message)

    async def call(
        self,
        proxy: Peer,
        number: str,
        caller: str,
        *,
        timeout: float = 15.0,
        hold: float = 0.2,
    ) -> CallResult:
        call_id = secrets.token_hex(8) + "@demo"
        tag = secrets.token_hex(4)
        ruri = f"sip:{number}@{proxy.host}:{proxy.port}"
        invite = self._request("INVITE", ruri, call_id, tag, 1, to=f"<sip:{number}@{proxy.host}>")
        invite.append("Contact", f"<sip:{caller}@{self.host}:{self.port}>")
        invite.append("P-Asserted-Identity", f"<sip:+{caller}@{self.host}>")
        invite.append("Content-Type", "application/sdp")
        invite.append("Content-Length", str(len(SDP)))
        invite.body = SDP
        result = CallResult()
        queue: asyncio.Queue[Response] = asyncio.Queue()
        self._waiters[(call_id, "INVITE")] = queue
        self.endpoint.send(invite, proxy)
        try:
            while True:
                response = await asyncio.wait_for(queue.get(), timeout)
                if response.status < 200:
                    result.provisional.append(response.status)
                    continue
                break
        except TimeoutError:
            return result
        finally:
            self._waiters.pop((call_id, "INVITE"), None)
        result.final = response.status
        result.final_response = response
        if response.status >= 300:
            ack = self._request("ACK", ruri, call_id, tag, 1, to=response.get("to") or "")
            ack.headers[0] = ("Via", "via", invite.get_all("via")[0], None)
            self.endpoint.send(ack, proxy)
            return result
        # 2xx: ACK and BYE follow the route set the proxy recorded (reversed Record-Route).
        routes = [str(a) for a in reversed(response.addresses("record-route"))]
        contact = response.addresses("contact")
        target = contact[0].uri_text if contact else ruri
        next_hop = proxy
        if routes:
            first = parse_uri(response.addresses("record-route")[-1].uri_text)
            if isinstance(first, SipUri):
                next_hop = Peer("udp", first.host_bare, first.port or 5060)
        to = response.get("to") or ""
        ack = self._request("ACK", target, call_id, tag, 1, to=to, routes=routes)
        self.endpoint.send(ack, next_hop)
        await asyncio.sleep(hold)
        bye = self._request("BYE", target, call_id, tag, 2, to=to, routes=routes)
        queue = asyncio.Queue()
        self._waiters[(call_id, "BYE")] = queue
        self.endpoint.send(bye, next_hop)
        try:
            result.bye_status = (await asyncio.wait_for(queue.get(), timeout)).status
        except TimeoutError:
            pass
        finally:
            self._waiters.pop((call_id, "BYE"), None)
        return result

    def _request(
        self,
        method: str,
        ruri: str,
        call_id: str,
        tag: str,
        cseq: int,
        *,
        to: str,
        routes: list[str] | None = None,
    ) -> Request:
        request = Request(method, ruri)
        request.append("Via", f"SIP/2.0/UDP {self.host}:{self.port};branch={_branch()};rport")
        for route in routes or []:
            request.append("Route", route)
        request.append("Max-Forwards", "70")
        request.append("From", f"<sip:demo@{self.host}>;tag={tag}")
        request.append("To", to)
        request.append("Call-ID", call_id)
        request.append("CSeq", f"{cseq} {method}")
        return request

    async def close(self) -> None:
        await self.endpoint.close()


class Uas:
    """A carrier (or the switch, for inbound calls): answers, fails, or stays silent."""

    def __init__(self, host: str, answer: int = 200) -> None:
        self.host = host
        self.answer = answer
        self.endpoint = SipEndpoint(self._on_message)
        self.port = 0
        self.invites: list[Request] = []
        self._tags: dict[str, str] = {}

    async def start(self) -> None:
        _, self.port = await self.endpoint.listen(ListenerSpec("udp", self.host, 0))

    @property
    def peer(self) -> Peer:
        return Peer("udp", self.host, self.port)

    def _reply(self, request: Request, peer: Peer, status: int, reason: str) -> None:
        headers = [
            h for h in request.headers if h[1] in ("via", "record-route", "from", "call-id", "cseq")
        ]
        to = request.get("to") or ""
        if ";tag=" not in to:
            tag = self._tags.setdefault(request.call_id, secrets.token_hex(4))
            to += ";tag=" + tag
        response = Response(status, reason, headers)
        response.append("To", to)
        response.append("Contact", f"<sip:carrier@{self.host}:{self.port}>")
        if status == 200 and request.method == "INVITE":
            response.append("Content-Type", "application/sdp")
            response.body = SDP
        self.endpoint.send(response, response_peer(request, peer))

    def _on_message(self, message: Request | Response, peer: Peer) -> None:
        if not isinstance(message, Request):
            return
        if message.method == "INVITE":
            self.invites.append(message)
            if self.answer == 0:
                return
            self._reply(message, peer, 100, "Trying")
            if self.answer == 200:
                self._reply(message, peer, 180, "Ringing")
                self._reply(message, peer, 200, "OK")
            else:
                self._reply(message, peer, self.answer, "Service Unavailable")
        elif message.method in ("BYE", "CANCEL", "OPTIONS"):
            self._reply(message, peer, 200, "OK")

    async def close(self) -> None:
        await self.endpoint.close()
