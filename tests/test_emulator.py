"""The ClearIP emulator: PASSporTs, rules, and every action over UDP/TCP (SIPp) and TLS."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clearip.relay.emulator.passport import Signer, verify
from clearip.relay.emulator.responses import q_value
from clearip.relay.emulator.rules import DEFAULT_RULES, RulesError, load_rules, rules_from_data
from clearip.relay.shaken import PassportError, decode, parse_identity
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.parser import parse_message
from tests.sipp import free_port, start_sipp, uac_scenario

RULES = """
[signing]
x5u = "https://cert.test/shaken.pem"

[[rule]]
name = "route B"
dialled = "1000"
action = "route"
attest = "B"
contacts = ["sip:{dialled}@192.0.2.20:5060", "sip:{dialled}@192.0.2.21:5060;transport=tcp",
            "sip:{dialled}@192.0.2.22"]

[[rule]]
dialled = "1001"
action = "verify"
cnam = "ACME PHARMA"
verstat = "TN-Validation-Failed"
contacts = ["sip:{dialled}@192.0.2.30"]

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
then = "block"

[[rule]]
dialled = "1008"
action = "drop-connection"

[[rule]]
dialled = "1009"
calling = "re:^1800.*"
action = "block"

[[rule]]
dialled = "1009"
action = "pass"
"""


# -- PASSporT ----------------------------------------------------------------------------------
def test_passport_signs_and_verifies_with_the_claims_of_the_call() -> None:
    signer = Signer.generate("https://cert.test/a.pem")
    jwt = signer.sign(orig_tn="14045550100", dest_tns=["12125550100"], attest="A")
    header, claims = decode(jwt)
    assert header == {
        "alg": "ES256",
        "ppt": "shaken",
        "typ": "passport",
        "x5u": "https://cert.test/a.pem",
    }
    assert verify(jwt, signer.public_key) == claims
    assert claims["attest"] == "A"
    assert claims["orig"] == {"tn": "14045550100"}
    assert claims["dest"] == {"tn": ["12125550100"]}
    assert abs(claims["iat"] - time.time()) < 5
    assert uuid.UUID(claims["origid"])
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(PassportError):
        verify(jwt, other)
    tampered = jwt.replace(jwt.split(".")[1], jwt.split(".")[1][:-2] + "AA")
    with pytest.raises(PassportError):
        verify(tampered, signer.public_key)


def test_identity_header_follows_rfc8224() -> None:
    signer = Signer.generate("https://cert.test/a.pem")
    header = signer.identity_header(signer.sign(orig_tn="1", dest_tns=["2"], attest="C"))
    jwt, info, params = parse_identity(header)
    assert info == "https://cert.test/a.pem"
    assert params == {"alg": "ES256", "ppt": "shaken"}
    with pytest.raises(PassportError):
        parse_identity("not-a-jwt;info=<https://x>")
    with pytest.raises(PassportError):
        parse_identity(jwt + ";info=https://no-angle-brackets")


def test_q_values_descend_by_hundredths() -> None:
    assert [q_value(i) for i in range(4)] == ["1.0", "0.99", "0.98", "0.97"]


# -- rules -------------------------------------------------------------------------------------
def _invite(number: str, caller: str = "14045550100") -> Request:
    message = parse_message(
        (
            f"INVITE sip:{number}@127.0.0.1 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n"
            f"From: <sip:{caller}@127.0.0.1>;tag=1\r\nTo: <sip:{number}@127.0.0.1>\r\n"
            "Call-ID: r1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(message, Request)
    return message


def test_first_match_wins_and_patterns(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    rules = load_rules(path)
    assert rules.decide(_invite("1009", "18005550199"), "127.0.0.1").action == "block"
    assert rules.decide(_invite("1009"), "127.0.0.1").action == "pass"
    assert rules.decide(_invite("+1-999"), "127.0.0.1").action == "unknown-source"
    wild = rules_from_data(
        {"rule": [{"dialled": "1212555*", "source": "10.0.0.0/8", "action": "pass"}]}, "x"
    )
    assert wild.decide(_invite("12125550100"), "10.1.2.3").action == "pass"
    assert wild.decide(_invite("12125550100"), "192.0.2.1").action == "unknown-source"


def test_default_rules_give_the_seed_behaviour() -> None:
    rules = load_rules(DEFAULT_RULES)
    assert rules.decide(_invite("12125550100"), "127.0.0.1").action == "route"
    assert rules.decide(_invite("12125550100"), "127.0.0.1").attest == "A"
    assert rules.decide(_invite("12125550100", "18005550199"), "127.0.0.1").action == "block"
    unknown = rules.decide(_invite("12125550100"), "203.0.113.9")
    assert unknown.action == "unknown-source" and unknown.code == 404


@pytest.mark.parametrize(
    ("rule", "needles"),
    [
        ({"action": "teleport"}, ["unknown action 'teleport'", "route"]),
        ({"name": "x"}, ["missing action"]),
        ({"action": "route"}, ["contacts"]),
        ({"action": "pass", "dialled": "12a*"}, ["bad pattern", "digits"]),
        ({"action": "pass", "dialled": "re:("}, ["bad regular expression"]),
        ({"action": "pass", "source": "300.0.0.0/8"}, ["bad source"]),
        ({"action": "route", "contacts": ["http://x"]}, ["sip:"]),
        ({"action": "route", "contacts": ["sip:a@b"], "attest": "D"}, ["attest"]),
        ({"action": "delay"}, ["delay_ms"]),
        ({"action": "pass", "colour": "red"}, ["unknown field", "colour"]),
    ],
)
def test_bad_rules_name_file_rule_and_fix(rule: dict[str, object], needles: list[str]) -> None:
    with pytest.raises(RulesError) as info:
        rules_from_data({"rule": [{"action": "pass"}, rule]}, "lab.toml")
    text = str(info.value)
    assert "lab.toml: rule #2" in text
    for needle in needles:
        assert needle in text


def test_cli_refuses_bad_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[rule]]\naction = "nope"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clearip.relay.emulator",
            "--rules",
            str(path),
            "--udp",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{path}: rule #1" in result.stderr and "unknown action" in result.stderr


# -- the running emulator --------------------------------------------------------------------------
@dataclass
class Running:
    dir: Path
    udp: int
    tcp: int
    tls: int
    public_key: ec.EllipticCurvePublicKey
    process: subprocess.Popen[bytes]

    @property
    def ca_file(self) -> Path:
        return self.dir / "lab" / "ca.pem"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("emulator")
    (directory / "rules.toml").write_text(RULES)
    ready = directory / "ready.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clearip.relay.emulator",
            "--rules",
            str(directory / "rules.toml"),
            "--udp",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--tls",
            "127.0.0.1:0",
            "--lab-tls",
            str(directory / "lab"),
            "--public-key-out",
            str(directory / "signing.pem"),
            "--ready-file",
            str(ready),
            "--stats-file",
            str(directory / "stats.json"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "emulator did not start"
        time.sleep(0.05)
    ports = json.loads(ready.read_text())
    key = serialization.load_pem_public_key((directory / "signing.pem").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    yield Running(directory, ports["udp"][0], ports["tcp"][0], ports["tls"][0], key, process)
    process.send_signal(signal.SIGTERM)
    process.wait(10)


def _via_sipp(emulator: Running, number: str, code: int, transport: str) -> str:
    port = emulator.udp if transport == "u1" else emulator.tcp
    name = f"uac-{number}-{transport}"
    sipp = start_sipp(
        emulator.dir,
        name,
        uac_scenario(code),
        local=("127.0.0.1", free_port("udp" if transport == "u1" else "tcp")),
        remote=("127.0.0.1", port),
        transport=transport,
        service=number,
    )
    assert sipp.wait(30) == 0, sipp.messages[-2000:]
    return sipp.received(f"SIP/2.0 {code}")[0]


@pytest.mark.sipp
@pytest.mark.parametrize("transport", ["u1", "t1"])
@pytest.mark.parametrize(
    ("number", "code"),
    [("1000", 302), ("1001", 302), ("1002", 302), ("1003", 503), ("1004", 603), ("1005", 403),
     ("1007", 603)],
)  # fmt: skip
def test_every_answering_action_over_sipp(
    emulator: Running, transport: str, number: str, code: int
) -> None:
    final = _via_sipp(emulator, number, code, transport)
    response = parse_message(final.replace("\n", "\r\n").encode())
    assert isinstance(response, Response) and response.status == code
    if number == "1000":
        contacts = response.addresses("contact")
        assert [c.q for c in contacts] == [1.0, 0.99, 0.98]
        assert contacts[0].uri_text == "sip:1000@192.0.2.20:5060"
        jwt, _, _ = parse_identity(response.get("identity") or "")
        claims = verify(jwt, emulator.public_key)
        assert claims["attest"] == "B" and claims["dest"] == {"tn": ["1000"]}
        assert claims["orig"] == {"tn": "14045550100"}
        assert "cause=302" in (response.get("reason") or "")
    elif number == "1001":
        pai = response.get("p-asserted-identity") or ""
        assert '"ACME PHARMA"' in pai and "verstat=TN-Validation-Failed" in pai
    elif number == "1002":
        assert [c.uri_text for c in response.addresses("contact")] == ["sip:captcha@192.0.2.40"]
    elif number == "1004":
        assert response.get("reason") == 'SIP;cause=603;text="Robocall"'
        assert response.get("call-info") == "<https://redress.test/603plus>;purpose=jwt"


async def _tls_exchange(emulator: Running, number: str, wait: float = 5.0) -> list[bytes]:
    context = ssl.create_default_context(cafile=str(emulator.ca_file))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", emulator.tls, ssl=context, server_hostname="localhost"
    )
    local = writer.get_extra_info("sockname")
    writer.write(
        (
            f"INVITE sip:{number}@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/TLS 127.0.0.1:{local[1]};branch=z9hG4bKtls{number}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:14045550100@127.0.0.1>;tag=t\r\n"
            f"To: <sip:{number}@127.0.0.1>\r\nCall-ID: tls-{number}\r\nCSeq: 1 INVITE\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    out: list[bytes] = []
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
            out.append(head)
            if not head.startswith(b"SIP/2.0 1"):
                break
    except (TimeoutError, asyncio.IncompleteReadError):
        pass
    writer.close()
    return out


def test_route_over_tls_with_verified_certificate(emulator: Running) -> None:
    messages = asyncio.run(_tls_exchange(emulator, "1000"))
    assert messages[0].startswith(b"SIP/2.0 100")
    final = parse_message(messages[-1])
    assert isinstance(final, Response) and final.status == 302
    jwt, info, params = parse_identity(final.get("identity") or "")
    assert info == "https://cert.test/shaken.pem" and params["ppt"] == "shaken"
    assert verify(jwt, emulator.public_key)["attest"] == "B"


def test_silent_and_drop_connection_over_tls(emulator: Running) -> None:
    silent = asyncio.run(_tls_exchange(emulator, "1006", wait=1.0))
    assert silent == []
    dropped = asyncio.run(_tls_exchange(emulator, "1008", wait=5.0))
    assert dropped == []


def test_counters_per_action(emulator: Running) -> None:
    asyncio.run(_tls_exchange(emulator, "1003"))
    emulator.process.send_signal(signal.SIGTERM)
    emulator.process.wait(10)
    stats = json.loads((emulator.dir / "stats.json").read_text())
    assert stats["pass"] >= 1 and stats["route"] >= 1 and stats["silent"] >= 1
    assert stats["invites"] == sum(
        stats.get(a, 0)
        for a in ("route", "verify", "divert", "pass", "block", "unknown-source", "silent",
                  "delay", "drop-connection")
    )  # fmt: skip
