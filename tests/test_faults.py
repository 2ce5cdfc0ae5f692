"""Faults on the ClearIP leg: the switch always gets a final response, late answers are absorbed.

ClearIP is played by a small TCP server in the test that misbehaves on purpose: it resets the
connection in the middle of a transaction, answers garbage, or answers after the timeout.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from clearip.relay.sip.framing import StreamFramer
from clearip.relay.sip.message import Request
from clearip.relay.sip.parser import parse_message
from lab.proxy_harness import (
    SWITCH_IP,
    ThreadedProxy,
    threaded_proxy,
    wait_for,
    write_config,
)
from lab.sipp import free_port, start_sipp, uac_scenario

pytestmark = [pytest.mark.sipp, pytest.mark.slow]

Behaviour = Callable[[socket.socket, bytes, "FakeClearIP"], None]


class FakeClearIP:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.proxy_port = 0
        self.received: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        framer = StreamFramer()
        conn.settimeout(0.2)
        while not self._stop:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            for item in framer.feed(chunk):
                if not isinstance(item, bytes):
                    continue  # keep-alive ping
                self.received.append(item)
                try:
                    self.behaviour(conn, item, self)
                except OSError:
                    return

    def __enter__(self) -> FakeClearIP:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(2)
        self.server.close()


def reply(request_bytes: bytes, status: int, reason: str, extra: str = "") -> bytes:
    request = parse_message(request_bytes, datagram=False)
    assert isinstance(request, Request)
    vias = "".join(f"Via: {v}\r\n" for v in request.get_all("via"))
    return (
        f"SIP/2.0 {status} {reason}\r\n{vias}From: {request.get('from')}\r\n"
        f"To: {request.get('to')};tag=fake\r\nCall-ID: {request.call_id}\r\n"
        f"CSeq: {request.get('cseq')}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


@contextmanager
def proxy_with(tmp_path: Path, clearip: FakeClearIP) -> Iterator[tuple[int, ThreadedProxy]]:
    port = free_port()
    config = write_config(
        tmp_path, port=port, upstream=f"sip:127.0.0.1:{clearip.port};transport=tcp"
    )
    with threaded_proxy(config) as proxy:
        yield port, proxy


def _switch(tmp_path: Path, port: int, expect: int) -> float:
    started = time.monotonic()
    switch = start_sipp(
        tmp_path,
        f"switch-{expect}-{time.monotonic_ns()}",
        uac_scenario(expect),
        local=(SWITCH_IP, free_port()),
        remote=("127.0.0.1", port),
        service="12125550100",
    )
    assert switch.wait(30) == 0, switch.messages[-3000:]
    return time.monotonic() - started


def test_connection_reset_mid_transaction_fails_open_at_once_and_reconnects(tmp_path: Path) -> None:
    def reset(conn: socket.socket, data: bytes, fake: FakeClearIP) -> None:
        if data.startswith(b"INVITE"):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST while the INVITE waits for its answer

    with FakeClearIP(reset) as fake, proxy_with(tmp_path, fake) as (port, proxy):
        elapsed = _switch(tmp_path, port, 503)
        assert elapsed < 1.4, f"fail-open took {elapsed:.2f} s (upstream_timeout is 1.5 s)"
        wait_for(lambda: fake.connections >= 2, 10, "the proxy to reconnect")
        counters = proxy.counters()
        assert counters["call:switch:503:fail-open"] == 1


def test_a_link_that_was_up_reconnects_at_once_after_a_reset(tmp_path: Path) -> None:
    """Calls arriving while the link is down fail open: a stable link is retried without the
    reconnect backoff (0.5 s at first), so few calls bypass ClearIP after a reset."""

    def reset(conn: socket.socket, data: bytes, fake: FakeClearIP) -> None:
        if data.startswith(b"INVITE"):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    with FakeClearIP(reset) as fake, proxy_with(tmp_path, fake) as (port, proxy):
        time.sleep(1.2)  # the link has been up for more than a second
        _switch(tmp_path, port, 503)
        started = time.monotonic()
        wait_for(lambda: fake.connections >= 2, 5, "the proxy to reconnect")
        assert time.monotonic() - started < 0.3
        assert proxy.counters()["call:switch:503:fail-open"] == 1


def test_garbage_from_clearip_fails_open(tmp_path: Path) -> None:
    def garbage(conn: socket.socket, data: bytes, fake: FakeClearIP) -> None:
        if data.startswith(b"INVITE"):
            conn.sendall(b"\x00\xffTHIS IS NOT SIP\r\n\r\n" * 3)

    with FakeClearIP(garbage) as fake, proxy_with(tmp_path, fake) as (port, proxy):
        _switch(tmp_path, port, 503)
        assert proxy.wait_idle(15)[0] == 0


def test_late_answer_is_absorbed_not_relayed(tmp_path: Path) -> None:
    def late(conn: socket.socket, data: bytes, fake: FakeClearIP) -> None:
        if data.startswith(b"INVITE"):
            conn.sendall(reply(data, 100, "Trying"))
            time.sleep(2.0)  # upstream_timeout is 1.5 s
            conn.sendall(reply(data, 302, "Moved Temporarily", "Contact: <sip:x@127.0.0.2:9>\r\n"))

    with FakeClearIP(late) as fake, proxy_with(tmp_path, fake) as (port, proxy):
        _switch(tmp_path, port, 503)
        wait_for(lambda: proxy.counters().get("clearip_late_response", 0) == 1, 10, "late 302")
        # The proxy CANCELled the pending INVITE at fail-open and ACKed the late 302.
        methods = [head.split(b" ", 1)[0] for head in fake.received]
        assert b"CANCEL" in methods and b"ACK" in methods
        assert proxy.counters().get("call:switch:302:relayed", 0) == 0


def test_hostile_302_contacts_are_capped_and_filtered(tmp_path: Path) -> None:
    contacts = ", ".join(
        ["<mailto:x@y>", "<sip:loop@127.0.0.1:{port}>"]
        + [f"<sip:c{i}@127.0.0.2:{9000 + i}>" for i in range(300)]
    )

    def hostile(conn: socket.socket, data: bytes, fake: FakeClearIP) -> None:
        if data.startswith(b"INVITE"):
            text = contacts.replace("{port}", str(fake.proxy_port))
            conn.sendall(reply(data, 302, "Moved Temporarily", f"Contact: {text}\r\n"))

    with FakeClearIP(hostile) as fake, proxy_with(tmp_path, fake) as (port, proxy):
        fake.proxy_port = port
        # Nothing answers on the contacts: each is skipped after provider_timeout (1 s);
        # max_contacts (10) bounds the attempts, so the switch gets its final in ~10 s.
        elapsed = _switch(tmp_path, port, 408)
        assert elapsed < 20
        counters = proxy.counters()
        assert counters["provider_timeout"] == 10
