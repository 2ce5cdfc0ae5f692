"""Real SIPp processes for end-to-end tests: scenario templates, runners and message logs.

Scenarios are generated per test (the expected final code, the dialled number, whether the
UAS answers, rings or stays silent) so that each test states exactly what it expects.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab.procs import stop_process

SDP = """v=0
o=sipp 1 1 IN IP4 [local_ip]
s=-
c=IN IP4 [local_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000
"""

_HEAD = '<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="{name}">\n'

_INVITE = """  <send retrans="500">
    <![CDATA[
INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:switch@[local_ip]:[local_port];transport=[transport]>
Max-Forwards: 70
P-Asserted-Identity: <sip:+{caller}@[local_ip]>
Content-Type: application/sdp
Content-Length: [len]

{sdp}
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
"""

_ACK_NON2XX = """  <send>
    <![CDATA[
ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch-5]
From: <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
"""

_IN_DIALOG = """  <send{retrans}>
    <![CDATA[
{method} [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: {cseq} {method}
Contact: <sip:switch@[local_ip]:[local_port];transport=[transport]>
[routes]
Max-Forwards: 70
{body_headers}
{body}
    ]]>
  </send>
"""


def uac_scenario(
    expect: int,
    *,
    caller: str = "14045550100",
    bye: bool = True,
    reinvite: bool = False,
    hold_ms: int = 200,
) -> str:
    """A switch: INVITE, expect ``expect``; on 200: ACK, optional re-INVITE, BYE."""
    xml = _HEAD.format(name=f"switch-{expect}") + _INVITE.format(caller=caller, sdp=SDP)
    if expect >= 300:
        xml += f'  <recv response="{expect}"/>\n' + _ACK_NON2XX.format(caller=caller)
        return xml + "</scenario>\n"
    xml += '  <recv response="200" rtd="true" rrs="true"/>\n'
    xml += _IN_DIALOG.format(
        retrans="", method="ACK", cseq=1, caller=caller, body_headers="Content-Length: 0", body=""
    )
    xml += f'  <pause milliseconds="{hold_ms}"/>\n'
    if reinvite:
        xml += _IN_DIALOG.format(
            retrans=' retrans="500"',
            method="INVITE",
            cseq=2,
            caller=caller,
            body_headers="Content-Type: application/sdp\nContent-Length: [len]",
            body=SDP,
        )
        xml += '  <recv response="100" optional="true"/>\n  <recv response="200"/>\n'
        xml += _IN_DIALOG.format(
            retrans="",
            method="ACK",
            cseq=2,
            caller=caller,
            body_headers="Content-Length: 0",
            body="",
        )
    if bye:
        xml += _IN_DIALOG.format(
            retrans=' retrans="500"',
            method="BYE",
            cseq=3,
            caller=caller,
            body_headers="Content-Length: 0",
            body="",
        )
        xml += '  <recv response="200" crlf="true"/>\n'
    return xml + "</scenario>\n"


_REPLY = """  <send>
    <![CDATA[
SIP/2.0 {code} {reason}
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
[last_Record-Route:]
{extra}Content-Length: 0

    ]]>
  </send>
"""

_CONTACT = "Contact: <sip:carrier@[local_ip]:[local_port];transport=[transport]>\n"

_REPLY_SDP = """  <send retrans="500">
    <![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
[last_Record-Route:]
Contact: <sip:carrier@[local_ip]:[local_port];transport=[transport]>
Content-Type: application/sdp
Content-Length: [len]

{sdp}
    ]]>
  </send>
"""

_ANSWER_IN_DIALOG = """  <recv request="{method}"/>
  <send>
    <![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:carrier@[local_ip]:[local_port];transport=[transport]>
Content-Length: 0

    ]]>
  </send>
"""


def uas_scenario(
    answer: int = 200,
    *,
    ring: bool = True,
    reinvite: bool = False,
    require: str | None = None,
    ring_ms: int = 0,
) -> str:
    """A provider (or the switch for inbound calls): answers INVITEs with ``answer``.

    ``answer=0`` never answers. ``require`` is a regular expression the INVITE must match.
    """
    xml = _HEAD.format(name=f"uas-{answer}")
    action = ""
    if require:
        action = (
            f'    <action><ereg regexp="{require}" search_in="msg" check_it="true" '
            'assign_to="dummy"/></action>\n'
        )
    xml += f'  <recv request="INVITE" crlf="true">\n{action}  </recv>\n'
    if require:
        xml += '  <Reference variables="dummy"/>\n'
    if answer == 0:
        xml += '  <pause milliseconds="60000"/>\n'
        return xml + "</scenario>\n"
    xml += _REPLY.format(code=100, reason="Trying", extra="")
    if ring:
        xml += _REPLY.format(code=180, reason="Ringing", extra=_CONTACT)
    if ring_ms:
        xml += f'  <pause milliseconds="{ring_ms}"/>\n'
    if answer >= 300:
        xml += _REPLY.format(code=answer, reason="Failure", extra=_CONTACT)
        xml += '  <recv request="ACK"/>\n'
        return xml + "</scenario>\n"
    xml += _REPLY_SDP.format(sdp=SDP)
    xml += '  <recv request="ACK" crlf="true"/>\n'
    if reinvite:
        xml += '  <recv request="INVITE"/>\n' + _REPLY_SDP.format(sdp=SDP)
        xml += '  <recv request="ACK"/>\n'
    xml += _ANSWER_IN_DIALOG.format(method="BYE")
    return xml + "</scenario>\n"


def free_port(transport: str = "udp", host: str = "127.0.0.1") -> int:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Sipp:
    process: subprocess.Popen[bytes]
    directory: Path
    name: str

    @property
    def messages(self) -> str:
        path = next(self.directory.glob(f"{self.name}*_messages.log"), None)
        return path.read_text(errors="replace") if path else ""

    def received(self, start: str) -> list[str]:
        """Messages SIPp received whose first line starts with ``start``."""
        blocks = re.split(r"\n(?=-{10,} )", self.messages)
        out = []
        for block in blocks:
            if "message received" not in block:
                continue
            body = block.split("\n", 2)[-1].lstrip()
            if body.startswith(start):
                out.append(body)
        return out

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def stop(self) -> None:
        stop_process(self.process, 5)


def start_sipp(
    directory: Path,
    name: str,
    scenario: str,
    *,
    local: tuple[str, int],
    remote: tuple[str, int] | None = None,
    transport: str = "u1",
    service: str | None = None,
    calls: int = 1,
    extra: list[str] | None = None,
    prefix: list[str] | None = None,
    timeout: int = 30,
) -> Sipp:
    """``prefix`` runs SIPp through another command (``ip netns exec NS``); ``timeout`` is
    SIPp's global timeout in seconds (it exits with an error after it)."""
    path = directory / f"{name}.xml"
    path.write_text(scenario)
    cmd = [*(prefix or []), "sipp"]
    if remote is not None:
        cmd.append(f"{remote[0]}:{remote[1]}")
    cmd += [
        "-sf", str(path), "-i", local[0], "-p", str(local[1]), "-t", transport,
        "-m", str(calls), "-nostdin", "-trace_msg", "-trace_err",
        "-message_file", str(directory / f"{name}_messages.log"),
        "-error_file", str(directory / f"{name}_errors.log"),
        "-timeout", f"{timeout}s", "-timeout_error", "-max_recv_loops", "1000",
    ]  # fmt: skip
    if service is not None:
        cmd += ["-s", service]
    cmd += extra or []
    process = subprocess.Popen(
        cmd, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return Sipp(process, directory, name)


@contextlib.contextmanager
def sipp_uas(directory: Path, name: str, scenario: str, **kwargs: object) -> Iterator[Sipp]:
    uas = start_sipp(directory, name, scenario, **kwargs)  # type: ignore[arg-type]
    time.sleep(0.3)
    try:
        yield uas
    finally:
        uas.stop()


IDENTITY = (
    "eyJhbGciOiJFUzI1NiIsInBwdCI6InNoYWtlbiIsInR5cCI6InBhc3Nwb3J0IiwieDV1IjoiaHR0cHM6Ly9jZXJ0"
    "LmV4YW1wbGUub3JnL3NoYWtlbi5wZW0ifQ.eyJhdHRlc3QiOiJBIiwiZGVzdCI6eyJ0biI6WyIxMjEyNTU1MDEwMCJd"
    "fSwiaWF0IjoxNzAwMDAwMDAwLCJvcmlnIjp7InRuIjoiMTQwNDU1NTAxMDAifSwib3JpZ2lkIjoiMTIzZTQ1NjctZTg5"
    "Yi0xMmQzLWE0NTYtNDI2NjE0MTc0MDAwIn0.c2lnbmF0dXJl;info=<https://cert.example.org/shaken.pem>"
    ";alg=ES256;ppt=shaken"
)


def clearip_scenario(
    code: int = 302,
    contacts: list[str] | None = None,
    *,
    headers: list[str] | None = None,
    calls_loop: bool = False,
) -> str:
    """A ClearIP stand-in: every INVITE gets ``code`` (302 with the given Contacts)."""
    extra = list(headers or [])
    if code == 302:
        values = [
            f"<{uri}>;q={1.0 - i / 100:.2f}".replace("q=1.00", "q=1.0")
            for i, uri in enumerate(contacts or [])
        ]
        if values:
            extra.insert(0, "Contact: " + ", ".join(values))
        if not any(h.lower().startswith(("identity:", "p-asserted-identity:")) for h in extra):
            extra.append(f"Identity: {IDENTITY}")
        extra.append('Reason: SIP;cause=302;text="Routed by ClearIP"')
    reason = {302: "Moved Temporarily", 503: "Service Unavailable", 603: "Decline"}.get(
        code, "Failure"
    )
    xml = _HEAD.format(name=f"clearip-{code}")
    xml += '  <recv request="INVITE" crlf="true"/>\n'
    xml += _REPLY.format(code=code, reason=reason, extra="".join(h + "\n" for h in extra))
    xml += '  <recv request="ACK"/>\n'
    return xml + "</scenario>\n"


def uac_cancel_scenario(*, wait_for_ringing: bool, caller: str = "14045550100") -> str:
    """A switch that cancels its INVITE (after 100, or after 180) and expects 200 + 487."""
    xml = _HEAD.format(name="switch-cancel")
    xml += _INVITE.split("  <recv", maxsplit=1)[0].format(caller=caller, sdp=SDP)
    if wait_for_ringing:
        xml += '  <recv response="100" optional="true"/>\n  <recv response="180"/>\n'
    else:
        xml += '  <recv response="100"/>\n  <pause milliseconds="300"/>\n'
    # SIPp numbers scenario elements; [branch-N] reuses the INVITE's branch (element 0).
    xml += f"""  <send>
    <![CDATA[
CANCEL sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch-3]
From: <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 CANCEL
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
  <recv response="487"/>
"""
    xml += _ACK_NON2XX.format(caller=caller).replace("[branch-5]", "[branch-6]")
    return xml + "</scenario>\n"


def uas_hangup_scenario() -> str:
    """A provider that answers and then hangs up itself (BYE from the callee side)."""
    xml = _HEAD.format(name="uas-hangup")
    xml += '  <recv request="INVITE" crlf="true"/>\n'
    xml += _REPLY.format(code=100, reason="Trying", extra="")
    xml += _REPLY_SDP.format(sdp=SDP)
    xml += '  <recv request="ACK" rrs="true"/>\n  <pause milliseconds="300"/>\n'
    xml += """  <send retrans="500">
    <![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
[last_To:]
[last_From:]
[last_Call-ID:]
CSeq: 2 BYE
[routes]
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
"""
    return xml + "</scenario>\n"


def uac_answered_then_bye_received(caller: str = "14045550100") -> str:
    """A switch whose call is answered and then hung up by the other side."""
    xml = _HEAD.format(name="switch-receives-bye") + _INVITE.format(caller=caller, sdp=SDP)
    xml += '  <recv response="200" rtd="true" rrs="true"/>\n'
    xml += _IN_DIALOG.format(
        retrans="", method="ACK", cseq=1, caller=caller, body_headers="Content-Length: 0", body=""
    )
    xml += _ANSWER_IN_DIALOG.format(method="BYE")
    return xml + "</scenario>\n"
