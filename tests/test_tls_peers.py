"""TLS trust per peer: each ClearIP upstream with its own CA and server name, carriers reached
through TLS Contacts with ``[tls] peers_ca_file``, never with ClearIP's CA; failed handshakes
logged once per peer and reason.

Real TLS everywhere, certificates made at test time with trustme. The ClearIP side is the
ClearIP emulator over TLS; SIPp here is built without TLS, so a TLS carrier (and the ClearIP
stand-in that records the SNI it is asked for) is :class:`TlsStandIn`, a small asyncio UAS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from clearip.relay.config import ConfigError
from clearip.relay.config_toml import config_from_data
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import Peer
from clearip.relay.transport.tls import ClientTls, FailureLog, failure_reason
from lab.proxy_harness import PROVIDER_A_IP, SWITCH_IP, ThreadedProxy, threaded_proxy, wait_for
from lab.proxy_harness import write_config as harness_config
from lab.sipp import free_port, sipp_uas, start_sipp, uac_scenario, uas_scenario
from tests.test_proxy_tls import _emulator

DIALLED = "12125550100"
CARRIER_IP = PROVIDER_A_IP  # a carrier reached through a TLS Contact: 127.0.0.2
UNTRUSTED_ISSUER = "certificate verify failed: unable to get local issuer certificate"

emulator = contextlib.contextmanager(_emulator)


def _server_files(directory: Path, ca: trustme.CA, *names: str) -> Path:
    """``server.pem`` (chain) and ``server.key`` for ``names``, issued by ``ca``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(*names)
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    (directory / "server.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    return directory


def _ca_file(directory: Path, ca: trustme.CA, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


class TlsStandIn:
    """A SIP UAS over TLS in its own thread: INVITE gets 100 and ``answer`` (a 200 carries
    Contact and Record-Route), BYE/OPTIONS/CANCEL get 200, ACK nothing. It records every
    request's head and the server name (SNI) of every handshake."""

    def __init__(self, host: str, cert_dir: Path, *, answer: int = 200, port: int = 0) -> None:
        self.host = host
        self.answer = answer
        self.port = port
        self.requests: list[str] = []
        self.server_names: list[str | None] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_dir / "server.pem", cert_dir / "server.key")
        self.context.sni_callback = lambda _obj, name, _ctx: self.server_names.append(name)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> TlsStandIn:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, self.host, self.port, ssl=self.context), self.loop
        ).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *_: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def methods(self) -> list[str]:
        return [head.split(" ", 1)[0] for head in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while data := await reader.read(65536):
                buffer += data
                while True:
                    buffer = buffer.lstrip(b"\r\n")  # keep-alive pings (RFC 5626)
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = buffer[:end].decode()
                    length = next(
                        (
                            int(line.split(":", 1)[1])
                            for line in head.split("\r\n")
                            if line.lower().startswith(("content-length:", "l:"))
                        ),
                        0,
                    )
                    if len(buffer) < end + 4 + length:
                        break
                    buffer = buffer[end + 4 + length :]
                    for reply in self._answers(head):
                        writer.write(reply)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def _answers(self, head: str) -> list[bytes]:
        first, *lines = head.split("\r\n")
        if first.startswith("SIP/2.0"):
            return []
        self.requests.append(head)
        method = first.split(" ", 1)[0]
        headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]

        def reply(code: int, reason: str, *, dialog: bool = False) -> bytes:
            out = [f"SIP/2.0 {code} {reason}"]
            for name, value in headers:
                key = name.lower()
                if key in ("via", "v", "from", "f", "call-id", "i", "cseq"):
                    out.append(f"{name}: {value}")
                elif key in ("to", "t"):
                    tag = "" if code == 100 or ";tag=" in value else ";tag=standin"
                    out.append(f"{name}: {value}{tag}")
                elif key == "record-route" and dialog:
                    out.append(f"{name}: {value}")
            if dialog:
                out.append(f"Contact: <sip:carrier@{self.host}:{self.port};transport=tls>")
            out.append("Content-Length: 0")
            return ("\r\n".join(out) + "\r\n\r\n").encode()

        if method == "INVITE":
            final = "OK" if self.answer == 200 else "Decline"
            return [reply(100, "Trying"), reply(self.answer, final, dialog=self.answer == 200)]
        if method == "ACK":
            return []
        return [reply(200, "OK")]


def _config(directory: Path, proxy_port: int, upstream: str, ca_file: Path, extra: str) -> Path:
    return harness_config(
        directory, port=proxy_port, upstream=upstream, ca_file=str(ca_file), extra=extra
    )


def _state(proxy: ThreadedProxy, role: str) -> str:
    return str(proxy.call(lambda d: d.status()["upstreams"][role]["state"]))


def _tls_warnings(caplog: pytest.LogCaptureFixture, peer: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"TLS handshake with {peer} ")
    ]


def _call(directory: Path, name: str, proxy_port: int, expect: int, *, ip: str = SWITCH_IP) -> str:
    """One call from ``ip`` (the switch, or a provider); returns the final it got."""
    caller = start_sipp(
        directory,
        name,
        uac_scenario(expect),
        local=(ip, free_port(host=ip)),
        remote=("127.0.0.1", proxy_port),
        service=DIALLED,
    )
    assert caller.wait(30) == 0, caller.messages[-3000:]
    return caller.received(f"SIP/2.0 {expect}")[0]


# -- units: the policy, the failure log, the config ------------------------------------------
def test_contexts_are_shared_per_ca_file_and_verify(tmp_path: Path) -> None:
    one = _ca_file(tmp_path, trustme.CA(), "one")
    two = _ca_file(tmp_path, trustme.CA(), "two")
    tls = ClientTls(str(two))
    assert tls.context(str(one), True, "a") is tls.context(str(one), True, "b")
    assert tls.context(str(one), True, "a") is not tls.context(str(two), True, "a")
    assert tls.peers() is tls.context(str(two), True, "x")
    assert tls(Peer("tls", "192.0.2.1", 5061), "192.0.2.1") is tls.peers()
    config = config_from_data({"upstream": {"outbound": {"uri": "sip:h:5060;transport=tcp"}}})
    assert tls.upstream(config.outbound) is None  # no TLS, no context


def test_unverified_peers_are_logged_loudly_once(caplog: pytest.LogCaptureFixture) -> None:
    tls = ClientTls(peers_verify=False)
    caplog.set_level(logging.WARNING, logger="clearip.tls")
    for _ in range(3):
        assert tls.peers().verify_mode == ssl.CERT_NONE
        tls.context("", False, "carriers reached through TLS Contacts")
    warnings = [r.getMessage() for r in caplog.records if "verification is OFF" in r.getMessage()]
    assert len(warnings) == 1 and "carriers reached through TLS Contacts" in warnings[0]


def test_failure_log_once_per_peer_and_reason_rearmed_by_success() -> None:
    log = FailureLog()
    a, b = Peer("tls", "192.0.2.1", 5061, conn=3), Peer("tls", "192.0.2.2", 5061)
    assert log.first(a, "x") and not log.first(a.without_conn(), "x")
    assert log.first(a, "y") and log.first(b, "x")
    log.succeeded(a)
    assert log.first(a, "x") and not log.first(b, "x")


@pytest.mark.parametrize(
    ("table", "needles"),
    [
        ({"peers_ca_file": "/nonexistent.pem"}, ["tls.peers_ca_file", "not found"]),
        ({"peers_verify": "no"}, ["tls.peers_verify", "true or false"]),
        ({"peer_ca_file": ""}, ["peer_ca_file", "[tls]", "spelling"]),
    ],
)
def test_tls_table_errors_name_the_key(table: dict[str, object], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_data({"tls": table})
    for needle in needles:
        assert needle in str(info.value)


def test_tls_table_is_read(tmp_path: Path) -> None:
    ca = _ca_file(tmp_path, trustme.CA(), "peers")
    config = config_from_data({"tls": {"peers_ca_file": str(ca), "peers_verify": False}})
    assert config.tls.peers_ca_file == str(ca) and config.tls.peers_verify is False


def test_endpoint_logs_a_handshake_failure_once_until_the_peer_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real handshakes with the endpoint: counted each time, logged once per peer and reason;
    a success re-arms the log. No connection is left behind by a failure."""
    right, wrong = trustme.CA(), trustme.CA()
    right_file = _ca_file(tmp_path, right, "right")
    wrong_file = _ca_file(tmp_path, wrong, "wrong")
    caplog.set_level(logging.WARNING, logger="clearip.transport")
    with TlsStandIn(CARRIER_IP, _server_files(tmp_path / "carrier", right, CARRIER_IP)) as carrier:
        peer = Peer("tls", CARRIER_IP, carrier.port)

        async def main() -> tuple[int, int]:
            endpoint = SipEndpoint(lambda _m, _p: None, tls_client=ClientTls(str(wrong_file)))
            right_context = endpoint.tls_client.context(str(right_file), True, "test")
            for _ in range(2):  # the carriers' policy trusts the wrong CA
                with pytest.raises(ssl.SSLCertVerificationError):
                    await endpoint.connect(peer)
            with pytest.raises(ssl.SSLCertVerificationError):  # another reason: logged too
                await endpoint.connect(peer, server_name="other.test", context=right_context)
            assert endpoint.connections == {}
            ok = await endpoint.connect(peer, context=right_context)
            assert ok.conn is not None
            endpoint.connections[ok.conn].close()
            with pytest.raises(ssl.SSLCertVerificationError):
                await endpoint.connect(peer)
            await endpoint.close()
            return endpoint.counters["tls_handshake_failed"], len(endpoint.connections)

        failed, left = asyncio.run(main())
    assert failed == 4 and left == 0
    warnings = _tls_warnings(caplog, f"tls:{CARRIER_IP}:{carrier.port}")
    assert len(warnings) == 3, warnings
    assert warnings[0].endswith(f"(server name {CARRIER_IP}) failed: {UNTRUSTED_ISSUER}")
    assert "(server name other.test)" in warnings[1]
    assert "Hostname mismatch, certificate is not valid for 'other.test'" in warnings[1]
    assert warnings[2] == warnings[0]  # after the success the same failure is logged again


def test_failure_reason_drops_openssl_decoration() -> None:
    exc = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    assert failure_reason(exc) == "wrong version number"
    assert failure_reason(ssl.SSLError()) == "SSLError"


# -- end to end: the proxy, the ClearIP emulator, SIPp and TLS carriers -----------------------
@pytest.mark.sipp
@pytest.mark.slow
@pytest.mark.parametrize("inbound_ca", ["own", "outbound's"])
def test_inbound_upstream_verifies_with_its_own_ca(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, inbound_ca: str
) -> None:
    """Outbound and inbound ClearIP with certificates from different CAs. With its own CA the
    inbound link is up and a provider's call goes through it; with the outbound's CA the
    inbound link is down (logged once) while the outbound one stays up."""
    out_ca, in_ca = trustme.CA(), trustme.CA()
    out_file = _ca_file(tmp_path, out_ca, "outbound-ca")
    in_file = _ca_file(tmp_path, in_ca, "inbound-ca") if inbound_ca == "own" else out_file
    switch_port = free_port()
    inbound_rules = (
        '[[rule]]\nname = "verify"\naction = "verify"\nverstat = "TN-Validation-Passed"\n'
        f'contacts = ["sip:{{dialled}}@{SWITCH_IP}:{switch_port}"]\n'
    )
    outbound_rules = '[[rule]]\nname = "block"\naction = "block"\nreason = "Robocall"\n'
    (tmp_path / "out").mkdir()
    (tmp_path / "in").mkdir()
    caplog.set_level(logging.WARNING, logger="clearip.transport")
    proxy_port = free_port()
    with (
        emulator(
            tmp_path / "out",
            outbound_rules,
            _server_files(tmp_path / "out-cert", out_ca, "127.0.0.1"),
        ) as out_port,
        emulator(
            tmp_path / "in", inbound_rules, _server_files(tmp_path / "in-cert", in_ca, "127.0.0.1")
        ) as in_port,
    ):
        inbound = (
            f'[upstream.inbound]\nuri = "sip:127.0.0.1:{in_port};transport=tls"\n'
            f'ca_file = "{in_file}"\n'
        )
        config = _config(
            tmp_path, proxy_port, f"sip:127.0.0.1:{out_port};transport=tls", out_file, inbound
        )
        with (
            sipp_uas(tmp_path, "switch-in", uas_scenario(200), local=(SWITCH_IP, switch_port)),
            threaded_proxy(config) as proxy,
        ):
            assert _state(proxy, "switch") == "up"
            # The switch's call goes to the outbound ClearIP (which blocks it).
            assert 'text="Robocall"' in _call(tmp_path, "switch", proxy_port, 603)
            peer = f"tls:127.0.0.1:{in_port}"
            if inbound_ca == "own":
                assert _state(proxy, "provider") == "up"
                final = _call(tmp_path, "provider", proxy_port, 200, ip=PROVIDER_A_IP)
                assert "SIP/2.0 200" in final
                assert proxy.counters().get("tls_handshake_failed", 0) == 0
                assert _tls_warnings(caplog, peer) == []
            else:
                status = proxy.call(lambda d: d.status()["upstreams"]["provider"])
                assert status["state"] == "down" and "verify failed" in status["last_error"]
                # The link keeps retrying: every failure counted, one warning.
                wait_for(
                    lambda: proxy.counters().get("tls_handshake_failed", 0) >= 2, 15, "a retry"
                )
                final = _call(tmp_path, "provider", proxy_port, 503, ip=PROVIDER_A_IP)
                assert "fail-open" in final
                warnings = _tls_warnings(caplog, peer)
                assert len(warnings) == 1, warnings
                assert warnings[0].endswith(f"(server name 127.0.0.1) failed: {UNTRUSTED_ISSUER}")
                assert _state(proxy, "switch") == "up"
            assert proxy.wait_idle() == (0, 0)


@dataclass
class CarrierLab:
    """Outbound ClearIP (the emulator, with its own CA) whose 302 names one TLS Contact,
    ``sip:12125550100@127.0.0.2:carrier_port;transport=tls``."""

    dir: Path
    clearip_ca: trustme.CA
    clearip_ca_file: Path
    clearip_port: int
    carrier_port: int
    proxy_port: int

    def config(self, extra: str = "") -> Path:
        uri = f"sip:127.0.0.1:{self.clearip_port};transport=tls"
        return _config(self.dir, self.proxy_port, uri, self.clearip_ca_file, extra)

    def carrier(self, ca: trustme.CA) -> TlsStandIn:
        """The carrier, with a certificate for 127.0.0.2 issued by ``ca``."""
        certs = _server_files(self.dir / "carrier-cert", ca, CARRIER_IP)
        return TlsStandIn(CARRIER_IP, certs, port=self.carrier_port)


@pytest.fixture
def carrier_lab(tmp_path: Path) -> Iterator[CarrierLab]:
    clearip_ca = trustme.CA()
    carrier_port = free_port("tcp", host=CARRIER_IP)
    rules = (
        '[[rule]]\nname = "route"\naction = "route"\nattest = "A"\n'
        f'contacts = ["sip:{{dialled}}@{CARRIER_IP}:{carrier_port};transport=tls"]\n'
    )
    certs = _server_files(tmp_path / "clearip-cert", clearip_ca, "127.0.0.1")
    with emulator(tmp_path, rules, certs) as clearip_port:
        yield CarrierLab(
            tmp_path,
            clearip_ca,
            _ca_file(tmp_path, clearip_ca, "clearip-ca"),
            clearip_port,
            carrier_port,
            free_port(),
        )


@pytest.mark.sipp
@pytest.mark.slow
def test_tls_contact_is_verified_with_peers_ca_file(carrier_lab: CarrierLab) -> None:
    """The carrier's CA is in [tls] peers_ca_file (ClearIP's is not): the call completes."""
    lab = carrier_lab
    carrier_ca = trustme.CA()
    peers = _ca_file(lab.dir, carrier_ca, "peers-ca")
    config = lab.config(f'[tls]\npeers_ca_file = "{peers}"\n')
    with lab.carrier(carrier_ca) as carrier, threaded_proxy(config) as proxy:
        _call(lab.dir, "switch", lab.proxy_port, 200)
        assert carrier.methods() == ["INVITE", "ACK", "BYE"]
        assert carrier.server_names == [None]  # one connection; no SNI for an address
        assert "Identity: eyJ" in carrier.requests[0]
        assert proxy.counters().get("tls_handshake_failed", 0) == 0
        assert proxy.wait_idle() == (0, 0)


@pytest.mark.sipp
@pytest.mark.slow
@pytest.mark.parametrize("issuer", ["clearip's CA", "another CA"])
def test_tls_contact_is_not_verified_with_clearips_ca(
    carrier_lab: CarrierLab, caplog: pytest.LogCaptureFixture, issuer: str
) -> None:
    """Only the outbound CA configured, no peers_ca_file: a carrier whose certificate is
    issued by ClearIP's CA (or any CA not in the system store) is refused. Each call's branch
    fails and the switch gets a final answer; the failure is logged once, counted each time."""
    lab = carrier_lab
    ca = lab.clearip_ca if issuer == "clearip's CA" else trustme.CA()
    caplog.set_level(logging.WARNING, logger="clearip.transport")
    with lab.carrier(ca) as carrier, threaded_proxy(lab.config()) as proxy:
        assert _state(proxy, "switch") == "up"
        for name in ("switch-1", "switch-2"):
            _call(lab.dir, name, lab.proxy_port, 503)
        assert carrier.requests == []
        assert proxy.counters().get("tls_handshake_failed", 0) == 2
        warnings = _tls_warnings(caplog, f"tls:{CARRIER_IP}:{lab.carrier_port}")
        assert len(warnings) == 1, warnings
        assert warnings[0].endswith(f"(server name {CARRIER_IP}) failed: {UNTRUSTED_ISSUER}")
        assert proxy.wait_idle() == (0, 0)


@pytest.mark.sipp
@pytest.mark.slow
@pytest.mark.parametrize("server_name", ["clearip.test", ""])
def test_upstream_server_name_is_sni_and_the_name_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, server_name: str
) -> None:
    """ClearIP's certificate names only clearip.test and the upstream URI is 127.0.0.1: with
    server_name the link is up (and clearip.test was the SNI); without it, the name check
    fails and calls fail open."""
    ca = trustme.CA()
    ca_file = _ca_file(tmp_path, ca, "ca")
    certs = _server_files(tmp_path / "clearip-cert", ca, "clearip.test")
    caplog.set_level(logging.WARNING, logger="clearip.transport")
    proxy_port = free_port()
    with TlsStandIn("127.0.0.1", certs, answer=603) as clearip:
        uri = f"sip:127.0.0.1:{clearip.port};transport=tls"
        config = _config(tmp_path, proxy_port, uri, ca_file, "")
        if server_name:
            text = config.read_text().replace(
                f'uri = "{uri}"', f'uri = "{uri}"\nserver_name = "{server_name}"'
            )
            config.write_text(text)
        with threaded_proxy(config) as proxy:
            if server_name:
                assert _state(proxy, "switch") == "up"
                assert clearip.server_names == ["clearip.test"]
                _call(tmp_path, "switch", proxy_port, 603)
                assert clearip.methods() == ["INVITE", "ACK"]
            else:
                assert _state(proxy, "switch") == "down"
                assert set(clearip.server_names) == {None}  # no SNI for an address
                assert "fail-open" in _call(tmp_path, "switch", proxy_port, 503)
                warnings = _tls_warnings(caplog, f"tls:127.0.0.1:{clearip.port}")
                assert len(warnings) == 1, warnings
                assert (
                    "IP address mismatch, certificate is not valid for '127.0.0.1'" in (warnings[0])
                )
            assert proxy.wait_idle() == (0, 0)
