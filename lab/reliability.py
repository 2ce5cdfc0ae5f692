"""Shared pieces of the reliability tests (tests/test_reliability_*.py) and bench/faults.py.

- :class:`UdpPeer`: a provider played by Python over UDP, misbehaving on purpose (wrong branch,
  wrong Call-ID, answers after a delay); SIPp cannot send a response it did not get a request for.
- :func:`answer`: a response to a raw request, with the fields a test wants to break.
- :func:`emulator`: the ClearIP emulator as a process (optionally inside a network namespace).
- :func:`outcomes`: what a SIPp switch saw, call by call, from its message log: which INVITEs it
  sent and the first final response of each, so "every INVITE got a final" is checked per call.
- :func:`any_final_uac`: a switch scenario that accepts every final the relay may give, ACKs it,
  and hangs up answered calls (load runs mix outcomes; a fixed expected code cannot).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from clearip.relay.service.daemon import Daemon
from clearip.relay.sip.message import Request
from clearip.relay.sip.parser import parse_message
from lab.proxy_harness import ThreadedProxy, stop_process
from lab.sipp import _INVITE, SDP, Sipp

UdpBehaviour = Callable[[socket.socket, bytes, tuple[str, int], "UdpPeer"], None]


class UdpPeer:
    """A SIP peer on ``host``:random port that runs ``behaviour`` for every datagram."""

    def __init__(self, host: str, behaviour: UdpBehaviour) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.received: list[bytes] = []
        self.errors: list[BaseException] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, address = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append(data)
            try:
                self.behaviour(self.sock, data, address, self)
            except Exception as exc:  # shown by the test, never kills the peer silently
                self.errors.append(exc)

    def requests(self, method: str) -> list[bytes]:
        return [d for d in self.received if d.startswith(method.encode() + b" ")]

    def __enter__(self) -> UdpPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def answer(
    request_bytes: bytes,
    status: int,
    reason: str,
    *,
    tag: str = "peer1",
    call_id: str | None = None,
    branch: str | None = None,
    extra: str = "",
    body: str = "",
) -> bytes:
    """A response to ``request_bytes``; ``call_id``/``branch`` replace the request's to forge
    a response that belongs to no transaction."""
    request = parse_message(request_bytes)
    assert isinstance(request, Request)
    vias = request.get_all("via")
    if branch is not None:
        vias[0] = re.sub(r"branch=[^;,\s]+", f"branch={branch}", vias[0])
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in vias]
    lines += [f"Record-Route: {v}" for v in request.get_all("record-route")]
    to = request.get("to") or ""
    if status > 100 and ";tag=" not in to:
        to += f";tag={tag}"
    lines += [
        f"From: {request.get('from')}",
        f"To: {to}",
        f"Call-ID: {call_id or request.call_id}",
        f"CSeq: {request.get('cseq')}",
    ]
    if extra:
        lines += extra.rstrip("\r\n").split("\r\n")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def sdp(ip: str) -> str:
    """A minimal SDP body for Python peers (SIPp's template with its keywords filled)."""
    text = SDP.replace("[local_ip]", ip).replace("[media_port]", "6000")
    return text.replace("\n", "\r\n")


@contextlib.contextmanager
def emulator(
    directory: Path,
    rules: str,
    *,
    listen: tuple[str, ...] = ("--tcp", "127.0.0.1:0"),
    prefix: list[str] | None = None,
) -> Iterator[dict[str, int]]:
    """The ClearIP emulator (``python -m clearip.relay.labkit.emulator``) with ``rules``; yields its
    ports by transport. Its counters land in ``directory/emulator-stats.json`` on exit."""
    (directory / "rules.toml").write_text(rules)
    ready = directory / "emulator-ready.json"
    ready.unlink(missing_ok=True)
    log = (directory / "emulator.log").open("ab")
    process = subprocess.Popen(
        [
            *(prefix or []),
            sys.executable, "-m", "clearip.relay.labkit.emulator",
            "--rules", str(directory / "rules.toml"), *listen, "--ready-file", str(ready),
            "--stats-file", str(directory / "emulator-stats.json"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"emulator did not start:\n{(directory / 'emulator.log').read_text()}"
                )
            time.sleep(0.05)
        time.sleep(0.05)  # the ready file is written in one go, but be safe with a reader
        yield {k: int(v[0]) for k, v in json.loads(ready.read_text()).items()}
    finally:
        stop_process(process)
        log.close()


def emulator_stats(directory: Path) -> dict[str, int]:
    path = directory / "emulator-stats.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


@dataclass
class Outcomes:
    """Per call (Call-ID) of a SIPp switch: INVITEs sent and the first final received."""

    invites: set[str] = field(default_factory=set)
    finals: dict[str, int] = field(default_factory=dict)
    bye_ok: set[str] = field(default_factory=set)
    sent_at: dict[str, float] = field(default_factory=dict)  # first INVITE, Unix time

    @property
    def unanswered(self) -> set[str]:
        return self.invites - set(self.finals)

    def by_status(self) -> dict[int, int]:
        return dict(sorted(Counter(self.finals.values()).items()))


_BLOCK = re.compile(r"\n(?=-{10,} )")
_CALL_ID = re.compile(r"^(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", re.MULTILINE | re.IGNORECASE)
_CSEQ = re.compile(r"^CSeq[ \t]*:[ \t]*\d+[ \t]+(\w+)", re.MULTILINE | re.IGNORECASE)


def outcomes(*switches: Sipp) -> Outcomes:
    """Read the switches' message logs (``-trace_msg``); retransmissions count once."""
    out = Outcomes()
    for switch in switches:
        for block in _BLOCK.split(switch.messages):
            stamp, _, rest = block.strip().partition("\n")
            head, _, message = rest.partition("\n")
            message = message.lstrip()
            call = _CALL_ID.search(message)
            cseq = _CSEQ.search(message)
            if call is None or cseq is None:
                continue
            call_id, method = call.group(1), cseq.group(1).upper()
            if "sent" in head and message.startswith("INVITE ") and method == "INVITE":
                out.invites.add(call_id)
                with contextlib.suppress(ValueError):
                    text = stamp.lstrip("- ").strip()
                    when = datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()
                    out.sent_at.setdefault(call_id, when)
            elif "received" in head and message.startswith("SIP/2.0 "):
                status = int(message[8:11])
                if method == "INVITE" and status >= 200:
                    out.finals.setdefault(call_id, status)
                elif method == "BYE" and status == 200:
                    out.bye_ok.add(call_id)
    return out


# Every final a relay in front of ClearIP and carriers can answer; each is ACKed.
FINALS = (403, 404, 408, 480, 482, 483, 486, 487, 500, 502, 503, 504, 600, 603)


def any_final_uac(
    *, number: str = "[service]", hold_ms: int = 100, caller: str = "14045550100"
) -> str:
    """A switch: INVITE to ``number`` (``[field0]`` for an injection file); any final is
    accepted and ACKed; a 200 is ACKed and hung up after ``hold_ms``."""
    uri = f"sip:{number}@[remote_ip]:[remote_port]"
    common = (
        f"From: <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]\nTo: <{uri}>"
    )
    xml = '<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="switch-any-final">\n'
    xml += _INVITE.format(caller=caller, sdp=SDP).replace("sip:[service]@", f"sip:{number}@")
    for code in FINALS:
        xml += f'  <recv response="{code}" optional="true" next="failed"/>\n'
    xml += f"""  <recv response="200" rrs="true"/>
  <send>
    <![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{common}[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
[routes]
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <pause milliseconds="{hold_ms}"/>
  <send retrans="500">
    <![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{common}[peer_tag_param]
Call-ID: [call_id]
CSeq: 2 BYE
[routes]
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <recv response="200" next="done"/>
  <label id="failed"/>
  <send>
    <![CDATA[
ACK {uri} SIP/2.0
[last_Via:]
{common}[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <label id="done"/>
</scenario>
"""
    return xml


def uas_any_call(*, answer_code: int = 200, ring: bool = True) -> str:
    """A provider for load runs: answers every INVITE ``answer_code`` (a failure is ACKed by
    the relay hop by hop; a 200 waits for ACK and BYE)."""
    reason = {200: "OK", 500: "Server Internal Error", 503: "Service Unavailable"}.get(
        answer_code, "Failure"
    )
    reply = """  <send{retrans}>
    <![CDATA[
SIP/2.0 {code} {reason}
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
[last_Record-Route:]
Contact: <sip:carrier@[local_ip]:[local_port];transport=[transport]>
{body_headers}
{body}
    ]]>
  </send>
"""
    xml = '<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="uas-any">\n'
    xml += '  <recv request="INVITE" crlf="true"/>\n'
    no_body = {"body_headers": "Content-Length: 0", "body": "", "retrans": ""}
    xml += reply.format(code=100, reason="Trying", **no_body)
    if answer_code >= 300:
        # Retransmitted until the ACK (Timer G): over UDP a lost final is otherwise never
        # repeated, and the relay (which has the 100) waits for it up to Timer C.
        xml += reply.format(
            code=answer_code, reason=reason, **{**no_body, "retrans": ' retrans="500"'}
        )
        xml += '  <recv request="ACK"/>\n</scenario>\n'
        return xml
    if ring:
        xml += reply.format(code=180, reason="Ringing", **no_body)
    xml += reply.format(
        code=200,
        reason="OK",
        retrans=' retrans="500"',
        body_headers="Content-Type: application/sdp\nContent-Length: [len]",
        body=SDP,
    )
    xml += '  <recv request="ACK" crlf="true"/>\n  <recv request="BYE"/>\n'
    xml += reply.format(code=200, reason="OK", **no_body).replace(
        ";tag=[pid]SIPpTag01[call_number]", ""
    )
    return xml + "</scenario>\n"


def settled(proxy: ThreadedProxy, timeout: float = 15.0) -> dict[str, int]:
    """Wait until no call and no server transaction is left and every client transaction
    only waits out its Timer D (Completed: absorbing retransmitted 3xx-6xx, 32 s on UDP);
    returns what is left by kind and state, e.g. ``{"client:COMPLETED": 3}`` or ``{}``."""

    def state(d: Daemon) -> tuple[int, dict[str, int]]:
        left: Counter[str] = Counter()
        for txn, _peer, _call in d.core.client_txns.values():
            left[f"client:{txn.state.name}"] += 1
        for stxn, _peer in d.core.server_txns.values():
            left[f"server:{stxn.state.name}"] += 1
        return d.core.active_calls, dict(left)

    deadline = time.monotonic() + timeout
    calls, left = proxy.call(state)
    while time.monotonic() < deadline:
        calls, left = proxy.call(state)
        if calls == 0 and set(left) <= {"client:COMPLETED"}:
            break
        time.sleep(0.1)
    return {"calls": calls, **left} if calls else left
