"""SIGHUP re-reads the trust list without a restart; a broken file keeps the old list."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from clearip.relay.trust import Role
from tests.proxy_harness import UNTRUSTED_IP, proxy_process, write_config
from tests.sipp import free_port


def _options(port: int) -> bytes:
    return (
        f"OPTIONS sip:proxy@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {UNTRUSTED_IP}:{port};branch=z9hG4bK{time.monotonic_ns()}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:p@127.0.0.1>\r\n"
        f"Call-ID: r{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _answered(proxy_port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((UNTRUSTED_IP, 0))
        sock.settimeout(0.5)
        sock.sendto(_options(sock.getsockname()[1]), ("127.0.0.1", proxy_port))
        try:
            return sock.recv(4000).startswith(b"SIP/2.0 ")
        except TimeoutError:
            return False


def test_sighup_reloads_the_trust_list(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path, port=port, upstream="sip:127.0.0.1:9;transport=tcp",
        trust=[("127.0.0.1/32", Role.SWITCH)],
    )  # fmt: skip
    trust = tmp_path / "trust.toml"
    with proxy_process(config, tmp_path / "proxy.log") as process:
        assert not _answered(port)
        trust.write_text(
            trust.read_text() + f'\n[[source]]\ncidr = "{UNTRUSTED_IP}/32"\nrole = "switch"\n'
        )
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert _answered(port)
        trust.write_text("[[source]\nbroken")
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert _answered(port), "a broken trust file must not replace the working list"
    assert "reload refused" in (tmp_path / "proxy.log").read_text()
