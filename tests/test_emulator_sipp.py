"""The ClearIP emulator end to end: started by its command line, driven by SIPp over UDP and TCP
(scenarios in tests/sipp/emulator_*.xml) and by a client of our own over TLS that verifies the
lab certificate. Every action; response codes, headers, and PASSporTs verified with the key."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clearip.relay.labkit.emulator.passport import parse_identity, verify_identity
from clearip.relay.sip.message import Response
from clearip.relay.sip.parser import parse_message
from lab.sipp import Sipp, free_port, start_sipp

SCENARIOS = Path(__file__).with_name("sipp")
X5U = "https://cert.test/shaken.pem"
CALLER = "14045550100"
STRANGER = "127.0.0.9"  # the test suite's untrusted host

RULES = f"""
[signing]
x5u = "{X5U}"

[[rule]]
name = "not an SBC"
source = "{STRANGER}/32"
action = "unknown-source"

[[rule]]
name = "route B"
dialled = "1000"
action = "route"
attest = "B"
contacts = ["sip:{{dialled}}@192.0.2.20:5060", "sip:{{dialled}}@192.0.2.21:5060;transport=tcp",
            "sip:{{dialled}}@192.0.2.22"]

[[rule]]
dialled = "1001"
action = "verify"
cnam = "ACME PHARMA"
verstat = "TN-Validation-Failed"
contacts = ["sip:switch@192.0.2.30"]

[[rule]]
dialled = "1002"
action = "divert"
target = "sip:captcha@192.0.2.40"

[[rule]]
dialled = "1003"
action = "pass"

[[rule]]
dialled = "1004"
action = "block"
reason = "Robocall"
redress = "https://redress.test/603plus"

[[rule]]
dialled = "1005"
action = "unknown-source"
code = 403

[[rule]]
dialled = "1006"
action = "silent"

[[rule]]
dialled = "1007"
action = "delay"
delay_ms = 300
then = "pass"

[[rule]]
dialled = "1008"
action = "drop-connection"

[[rule]]
dialled = "1009"
action = "delay"
delay_ms = 5000
then = "pass"

[[rule]]
name = "robocaller"
dialled = "1010"
calling = "1800555*"
action = "block"

[[rule]]
dialled = "1010"
action = "route"
contacts = ["sip:{{dialled}}@192.0.2.20"]
"""


@dataclass
class Running:
    dir: Path
    ports: dict[str, int]
    public_key: ec.EllipticCurvePublicKey
    process: subprocess.Popen[bytes]

    @property
    def ca_file(self) -> Path:
        return self.dir / "lab" / "ca.pem"

    def stop(self) -> dict[str, int]:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(10) == 0
        stats = json.loads((self.dir / "stats.json").read_text())
        assert isinstance(stats, dict)
        return stats


def _start(directory: Path) -> Running:
    (directory / "rules.toml").write_text(RULES)
    ready = directory / "ready.json"
    log = (directory / "emulator.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "clearip.relay.labkit.emulator",
            "--rules", str(directory / "rules.toml"),
            "--udp", "127.0.0.1:0", "--tcp", "127.0.0.1:0", "--tls", "127.0.0.1:0",
            "--lab-tls", str(directory / "lab"), "--public-key-out", str(directory / "key.pem"),
            "--ready-file", str(ready), "--stats-file", str(directory / "stats.json"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert process.poll() is None, (directory / "emulator.log").read_text()
        assert time.monotonic() < deadline, "emulator did not start"
        time.sleep(0.05)
    ports = {k: v[0] for k, v in json.loads(ready.read_text()).items()}
    key = serialization.load_pem_public_key((directory / "key.pem").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return Running(directory, ports, key, process)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = _start(tmp_path_factory.mktemp("emulator"))
    yield running
    if running.process.poll() is None:
        running.stop()


# -- SIPp over UDP and TCP -----------------------------------------------------------------------
@dataclass
class Outcome:
    code: int
    sipp: Sipp
    seconds: float

    def final(self, code: int) -> Response:
        texts = self.sipp.received(f"SIP/2.0 {code}")
        assert texts, self.sipp.messages[-2000:]
        response = parse_message(texts[-1].replace("\n", "\r\n").encode())
        assert isinstance(response, Response) and response.status == code
        return response


def sipp(
    emulator: Running,
    scenario: str,
    number: str,
    transport: str,
    *,
    caller: str = CALLER,
    source: str = "127.0.0.1",
) -> Outcome:
    t = "u1" if transport == "udp" else "t1"
    name = f"{scenario}-{number}-{transport}-{source}-{caller}"
    started = time.monotonic()
    run = start_sipp(
        emulator.dir,
        name,
        (SCENARIOS / f"emulator_{scenario}.xml").read_text(),
        local=(source, free_port(transport, source)),
        remote=("127.0.0.1", emulator.ports[transport]),
        transport=t,
        service=number,
        extra=["-key", "calling", caller],
    )
    code = run.wait(30)
    return Outcome(code, run, time.monotonic() - started)


def passes(outcome: Outcome) -> Outcome:
    assert outcome.code == 0, outcome.sipp.messages[-3000:]
    return outcome


TRANSPORTS = pytest.mark.parametrize("transport", ["udp", "tcp"])


@pytest.mark.sipp
@TRANSPORTS
def test_route_302_with_contacts_in_q_order_and_a_verified_passport(
    emulator: Running, transport: str
) -> None:
    response = passes(sipp(emulator, "route", "1000", transport)).final(302)
    contacts = response.addresses("contact")
    assert [c.uri_text for c in contacts] == [
        "sip:1000@192.0.2.20:5060", "sip:1000@192.0.2.21:5060;transport=tcp", "sip:1000@192.0.2.22"
    ]  # fmt: skip
    assert [c.param("q") for c in contacts] == ["1.0", "0.99", "0.98"]
    claims = verify_identity(response.get("identity") or "", emulator.public_key)
    assert claims["attest"] == "B"
    assert claims["orig"] == {"tn": CALLER} and claims["dest"] == {"tn": ["1000"]}
    assert abs(claims["iat"] - time.time()) < 30
    assert response.get("reason") == 'SIP;cause=302;text="Routed by ClearIP, attestation B"'


@pytest.mark.sipp
@TRANSPORTS
def test_verify_302_with_cnam_and_verstat(emulator: Running, transport: str) -> None:
    response = passes(sipp(emulator, "verify", "1001", transport)).final(302)
    pai = response.get("p-asserted-identity") or ""
    assert pai.startswith('"ACME PHARMA" <sip:+14045550100;verstat=TN-Validation-Failed@')
    assert [c.uri_text for c in response.addresses("contact")] == ["sip:switch@192.0.2.30"]
    assert response.get("identity") is None


@pytest.mark.sipp
@TRANSPORTS
def test_divert_pass_block_and_403(emulator: Running, transport: str) -> None:
    divert = passes(sipp(emulator, "divert", "1002", transport)).final(302)
    assert [c.uri_text for c in divert.addresses("contact")] == ["sip:captcha@192.0.2.40"]
    passes(sipp(emulator, "pass", "1003", transport)).final(503)
    block = passes(sipp(emulator, "block", "1004", transport)).final(603)
    assert block.reason == "Network Blocked"
    assert block.get("reason") == (
        'SIP;cause=603;text="v=clearip;url=https://redress.test/603plus";location=TN'
    )
    passes(sipp(emulator, "forbidden", "1005", transport)).final(403)


@pytest.mark.sipp
@TRANSPORTS
def test_unknown_source_by_address_and_block_by_calling_number(
    emulator: Running, transport: str
) -> None:
    passes(sipp(emulator, "unknown_source", "1000", transport, source=STRANGER)).final(404)
    robocall = passes(sipp(emulator, "block", "1010", transport, caller="18005550123"))
    assert robocall.final(603).reason == "Decline"
    passes(sipp(emulator, "route", "1010", transport))


@pytest.mark.sipp
@TRANSPORTS
def test_a_scenario_expecting_another_code_fails(emulator: Running, transport: str) -> None:
    """The scenarios really check the code: a 503 does not satisfy the route scenario."""
    assert sipp(emulator, "route", "1003", transport).code != 0


@pytest.mark.sipp
@pytest.mark.slow
@TRANSPORTS
def test_silent_never_answers_even_a_retransmission(emulator: Running, transport: str) -> None:
    passes(sipp(emulator, "silent", "1006", transport))
    assert sipp(emulator, "silent", "1003", transport).code != 0  # an answer fails it


@pytest.mark.sipp
@TRANSPORTS
def test_delay_answers_late_and_a_cancel_meanwhile_gets_200_and_487(
    emulator: Running, transport: str
) -> None:
    late = passes(sipp(emulator, "pass", "1007", transport))
    assert late.seconds >= 0.3
    cancelled = passes(sipp(emulator, "delay_cancel", "1009", transport))
    assert cancelled.seconds < 3  # the 5 s delay was cut short
    cancelled.final(487)


@pytest.mark.sipp
def test_drop_connection_closes_tcp_and_is_silent_on_udp(emulator: Running) -> None:
    dropped = sipp(emulator, "drop_connection", "1008", "tcp")
    assert dropped.code != 0 and dropped.seconds < 3  # not the scenario's 5 s timeout
    assert not dropped.sipp.received("SIP/2.0")
    passes(sipp(emulator, "silent", "1008", "udp"))


@pytest.mark.sipp
@TRANSPORTS
def test_options_keepalive(emulator: Running, transport: str) -> None:
    passes(sipp(emulator, "options", "0", transport)).final(200)


# -- our own client over TLS ---------------------------------------------------------------------
async def tls_exchange(
    emulator: Running, number: str, *, wait: float = 5.0, server_name: str = "localhost"
) -> list[Response]:
    """INVITE over TLS (certificate verified against the lab CA), responses until a final one;
    then the ACK for it."""
    context = ssl.create_default_context(cafile=str(emulator.ca_file))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", emulator.ports["tls"], ssl=context, server_hostname=server_name
    )
    port = writer.get_extra_info("sockname")[1]
    head = (
        f"sip:{number}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TLS 127.0.0.1:{port};branch=z9hG4bKtls{number}{port}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{CALLER}@127.0.0.1>;tag=t\r\n"
    )
    tail = f"Call-ID: tls-{number}-{port}\r\n"
    writer.write(
        f"INVITE {head}To: <sip:{number}@127.0.0.1>\r\n{tail}CSeq: 1 INVITE\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    out: list[Response] = []
    try:
        while True:
            data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
            response = parse_message(data, datagram=False)
            assert isinstance(response, Response)
            out.append(response)
            if response.status >= 200:
                writer.write(
                    f"ACK {head}To: {response.get('to')}\r\n{tail}CSeq: 1 ACK\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
                await writer.drain()
                break
    except (TimeoutError, asyncio.IncompleteReadError):
        pass
    writer.close()
    return out


def test_tls_route_verify_block_and_unknown_source(emulator: Running) -> None:
    route = asyncio.run(tls_exchange(emulator, "1000"))
    assert [r.status for r in route] == [100, 302]
    final = route[-1]
    _, info, params = parse_identity(final.get("identity") or "")
    assert info == X5U and params == {"alg": "ES256", "ppt": "shaken"}
    claims = verify_identity(final.get("identity") or "", emulator.public_key)
    assert claims["attest"] == "B" and claims["orig"] == {"tn": CALLER}
    assert [c.q for c in final.addresses("contact")] == [1.0, 0.99, 0.98]
    verify = asyncio.run(tls_exchange(emulator, "1001", server_name="127.0.0.1"))[-1]
    assert verify.status == 302 and "verstat=TN-Validation-Failed" in (
        verify.get("p-asserted-identity") or ""
    )
    assert asyncio.run(tls_exchange(emulator, "1002"))[-1].status == 302
    assert asyncio.run(tls_exchange(emulator, "1003"))[-1].status == 503
    assert asyncio.run(tls_exchange(emulator, "1004"))[-1].status == 603
    assert asyncio.run(tls_exchange(emulator, "1005"))[-1].status == 403


def test_tls_silent_and_drop_connection(emulator: Running) -> None:
    assert asyncio.run(tls_exchange(emulator, "1006", wait=1.0)) == []
    started = time.monotonic()
    assert asyncio.run(tls_exchange(emulator, "1008", wait=5.0)) == []
    assert time.monotonic() - started < 3  # closed by the emulator, not our timeout


def test_tls_refuses_a_client_that_does_not_trust_the_lab_ca(emulator: Running) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(
            asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1",
                    emulator.ports["tls"],
                    ssl=ssl.create_default_context(),
                    server_hostname="localhost",
                ),
                5,
            )
        )


# -- counters, on a fresh emulator -----------------------------------------------------------------
@pytest.mark.sipp
@pytest.mark.slow
def test_counters_per_action_are_written_on_exit(tmp_path: Path) -> None:
    running = _start(tmp_path)
    try:
        passes(sipp(running, "route", "1000", "udp"))
        passes(sipp(running, "pass", "1003", "tcp"))
        passes(sipp(running, "silent", "1006", "udp"))
        assert [r.status for r in asyncio.run(tls_exchange(running, "1004"))] == [100, 603]
    finally:
        stats = running.stop()
    assert stats["invites"] == 4
    assert (stats["route"], stats["pass"], stats["silent"], stats["block"]) == (1, 1, 1, 1)
    assert stats["retransmissions"] == 1  # the silent scenario's second INVITE
    assert stats["acks"] == 3  # SIPp's two and ours: each matched its transaction
    assert (stats["answered_302"], stats["answered_503"], stats["answered_603"]) == (1, 1, 1)
    log = (tmp_path / "emulator.log").read_text()
    assert "ClearIP emulator counters" in log and "INVITEs" in log
