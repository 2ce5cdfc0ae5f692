"""Resource limits of the real relay, each reached on purpose: answered cleanly and counted.

- Inbound TCP connections per source and in total (``[proxy] max_connections_per_source``,
  default 64, and ``max_connections``, 4096; lowered here to reach them with few sockets): the
  connection over the limit is closed at once, the others keep working.
- Pending transactions (``[proxy] max_transactions``): the INVITE over it gets
  ``503 Overloaded`` with ``Retry-After`` at once; an emergency call is still served.
- Message size (``[proxy] max_message_size``, 64 KiB): over TCP the connection is closed; a UDP
  datagram cannot exceed it over IPv4 (65,507 bytes of payload at most), so over UDP the
  limit met is the header line length (8 KiB), answered 400.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearip.relay.sip.message import Response
from clearip.relay.sip.parser import parse_message
from lab.proxy_harness import (
    PROVIDER_A_IP,
    PROVIDER_B_IP,
    SWITCH_IP,
    ThreadedProxy,
    threaded_proxy,
    wait_for,
    write_config,
)
from lab.reliability import emulator
from lab.sipp import free_port

pytestmark = [pytest.mark.slow]

SILENT_CLEARIP = '[[rule]]\nname = "hold every call"\naction = "silent"\n'


@contextlib.contextmanager
def relay(tmp_path: Path, proxy_lines: str = "") -> Iterator[tuple[int, ThreadedProxy]]:
    """The relay in front of an emulator that never answers (calls stay pending)."""
    with emulator(tmp_path, SILENT_CLEARIP) as ports:
        port = free_port()
        config = write_config(
            tmp_path, port=port, upstream=f"sip:127.0.0.1:{ports['tcp']};transport=tcp"
        )
        config.write_text(config.read_text().replace("[proxy]\n", f"[proxy]\n{proxy_lines}", 1))
        with threaded_proxy(config) as proxy:
            yield port, proxy


def _invite(number: str, sock: socket.socket, transport: str = "UDP", pad: str = "") -> bytes:
    host, port = sock.getsockname()[:2]
    tag = time.monotonic_ns()
    return (
        f"INVITE sip:{number}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {host}:{port};branch=z9hG4bK-lim-{tag}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:14045550100@{host}>;tag=lim{tag}\r\n"
        f"To: <sip:{number}@127.0.0.1>\r\n"
        f"Call-ID: lim-{tag}@{host}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:switch@{host}:{port}>\r\n"
        f"{pad}Content-Length: 0\r\n\r\n"
    ).encode()


def _final(sock: socket.socket, timeout: float = 3.0) -> Response:
    """The first final response on ``sock`` (provisional ones skipped)."""
    sock.settimeout(timeout)
    while True:
        message = parse_message(sock.recv(65535))
        assert isinstance(message, Response)
        if message.status >= 200:
            return message


def _ack(sock: socket.socket, invite: bytes, final: Response, port: int) -> None:
    """ACK a non-2xx final hop by hop (same branch), so its transaction ends."""
    head = invite.split(b"\r\n\r\n", 1)[0].decode().replace("INVITE sip:", "ACK sip:", 1)
    lines = [ln for ln in head.split("\r\n") if not ln.startswith(("To:", "CSeq:", "Contact:"))]
    lines += [f"To: {final.get('to')}", "CSeq: 1 ACK", "Content-Length: 0"]
    sock.sendto(("\r\n".join(ln for ln in lines if ln) + "\r\n\r\n").encode(), ("127.0.0.1", port))


def _udp(host: str = SWITCH_IP) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


def _is_closed(sock: socket.socket, timeout: float = 2.0) -> bool:
    """Whether the relay closed (or reset) this accepted connection."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _options(sock: socket.socket) -> bytes:
    host, port = sock.getsockname()[:2]
    tag = time.monotonic_ns()
    return (
        "OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP {host}:{port};branch=z9hG4bK-opt-{tag}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:ping@{host}>;tag=o{tag}\r\nTo: <sip:127.0.0.1>\r\n"
        f"Call-ID: opt-{tag}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _inbound(proxy: ThreadedProxy) -> int:
    return proxy.call(lambda d: sum(c.inbound for c in d.endpoint.connections.values()))


def _connect(port: int, host: str = SWITCH_IP) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(host, 0))
    return sock


def test_connections_per_source_and_in_total(tmp_path: Path) -> None:
    limits = "max_connections = 12\nmax_connections_per_source = 8\n"
    with relay(tmp_path, limits) as (port, proxy), contextlib.ExitStack() as stack:
        assert proxy.call(lambda d: d.endpoint.max_connections_per_source) == 8
        conns = [stack.enter_context(_connect(port, PROVIDER_B_IP)) for _ in range(8)]
        wait_for(lambda: _inbound(proxy) == 8, 5, "8 connections")
        over = stack.enter_context(_connect(port, PROVIDER_B_IP))
        assert _is_closed(over), "connection 9 from one source was kept"
        assert proxy.counters()["connection_per_source_limit_closed"] == 1
        # The ones within the limit still work, and another source is not affected (nor by
        # the relay's own connection to ClearIP on 127.0.0.1, which no limit counts).
        conns[-1].sendall(_options(conns[-1]))
        assert conns[-1].recv(4000).startswith(b"SIP/2.0 200")
        other = stack.enter_context(_connect(port, SWITCH_IP))
        other.sendall(_options(other))
        assert other.recv(4000).startswith(b"SIP/2.0 200")
        # The total of inbound connections: 8 + 1 from the switch + 3 more = 12.
        more = [stack.enter_context(_connect(port, PROVIDER_A_IP)) for _ in range(3)]
        wait_for(lambda: _inbound(proxy) == 12, 5, "12 connections")
        refused = stack.enter_context(_connect(port, PROVIDER_A_IP))
        assert _is_closed(refused), "connection over the total limit was kept"
        assert proxy.counters()["connection_limit_closed"] == 1
        assert not _is_closed(more[0], 0.3)


def test_max_transactions_answers_503_overloaded_but_never_emergencies(tmp_path: Path) -> None:
    with relay(tmp_path, "max_transactions = 3\n") as (port, proxy):
        socks = [_udp() for _ in range(5)]
        try:
            invites = []
            for sock in socks[:3]:  # ClearIP holds these: three pending INVITEs
                invites.append(_invite("12125550100", sock))
                sock.sendto(invites[-1], ("127.0.0.1", port))
            wait_for(lambda: proxy.call(lambda d: len(d.core.server_txns)) == 3, 5)
            started = time.monotonic()
            over = _invite("12125550100", socks[3])
            socks[3].sendto(over, ("127.0.0.1", port))
            final = _final(socks[3])
            assert time.monotonic() - started < 0.5
            assert (final.status, final.reason) == (503, "Overloaded")
            assert final.get("retry-after") == "5"
            assert proxy.counters()["overload_rejected"] == 1
            # An emergency call at the limit is still handled (routed directly: 503 with the
            # emergency Reason, not Overloaded).
            emergency_invite = _invite("911", socks[4])
            socks[4].sendto(emergency_invite, ("127.0.0.1", port))
            emergency = _final(socks[4])
            _ack(socks[4], emergency_invite, emergency, port)
            assert emergency.reason != "Overloaded" and "Emergency" in (
                emergency.get("reason") or ""
            )
            assert proxy.counters()["emergency"] == 1
            # The held calls fail open after upstream_timeout; then new calls pass again.
            for sock, invite in zip(socks[:3], invites, strict=True):
                held = _final(sock, 5)
                assert held.status == 503 and held.reason != "Overloaded"
                _ack(sock, invite, held, port)
            # Their server transactions absorb ACK retransmissions for Timer I (T4, 5 s).
            wait_for(lambda: proxy.call(lambda d: len(d.core.server_txns)) == 0, 10)
            again = _invite("12125550100", socks[3])
            socks[3].sendto(again, ("127.0.0.1", port))
            assert _final(socks[3], 5).reason != "Overloaded"
            assert proxy.counters()["overload_rejected"] == 1
        finally:
            for sock in socks:
                sock.close()


def test_oversized_message_closes_tcp_and_overlong_line_gets_400_over_udp(tmp_path: Path) -> None:
    with relay(tmp_path) as (port, proxy):
        with _connect(port) as conn:
            big = _invite("12125550100", conn, "TCP").replace(
                b"Content-Length: 0", b"Content-Length: 70000"
            )
            conn.sendall(big + b"x" * 70000)
            assert _is_closed(conn), "a 70 KB message did not close the connection"
        assert proxy.counters()["stream_closed_too-large"] == 1
        with _udp() as sock:
            sock.sendto(
                _invite("12125550100", sock, pad=f"X-Pad: {'a' * 9000}\r\n"), ("127.0.0.1", port)
            )
            final = _final(sock)
            assert final.status == 400, final
        counters = proxy.counters()
        assert counters["bad_request_sent"] == 1
        assert sum(v for k, v in counters.items() if k.startswith("parse_error_")) == 1
        # Nothing of either reached ClearIP or stayed behind, and the relay still answers.
        assert proxy.wait_idle(5) == (0, 0)
        with _connect(port) as conn:
            conn.sendall(_options(conn))
            assert conn.recv(4000).startswith(b"SIP/2.0 200")


@contextlib.contextmanager
def _deaf_server() -> Iterator[int]:
    """A TCP 'ClearIP' that accepts connections and never reads: its window closes."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        server.close()


def test_clearip_that_stops_reading_is_given_up_and_nothing_else_waits(tmp_path: Path) -> None:
    with _deaf_server() as deaf:
        port = free_port()
        config = write_config(tmp_path, port=port, upstream=f"sip:127.0.0.1:{deaf};transport=tcp")
        with threaded_proxy(config) as proxy:
            proxy.call(lambda d: setattr(d.endpoint, "max_write_buffer", 64 * 1024))
            sock = _udp()
            pad = "".join(f"X-Pad-{n}: {'x' * 8000}\r\n" for n in range(7))  # ~56 KB each
            call_ids = set()
            for _ in range(120):  # far more than the kernel's socket buffers hold
                invite = _invite("12125550100", sock, pad=pad)
                call_ids.add(parse_message(invite).call_id)
                sock.sendto(invite, ("127.0.0.1", port))
                time.sleep(0.005)
            wait_for(lambda: proxy.counters().get("stream_write_stalled", 0), 10, "the stall")
            # The event loop is not held up by the blocked connection: OPTIONS answered at once.
            probe = _udp()
            started = time.monotonic()
            probe.sendto(_options(probe).replace(b"/TCP", b"/UDP"), ("127.0.0.1", port))
            assert _final(probe, 2.0).status in (200, 503)
            assert time.monotonic() - started < 0.5
            probe.close()
            # Every INVITE got a final (fail-open 503), none waits on the deaf connection.
            finals: dict[str, int] = {}
            sock.settimeout(5.0)
            deadline = time.monotonic() + 10
            while set(finals) != call_ids and time.monotonic() < deadline:
                message = parse_message(sock.recv(65535))
                if isinstance(message, Response) and message.status >= 200:
                    finals[message.call_id] = message.status
            sock.close()
            assert set(finals) == call_ids
            assert set(finals.values()) == {503}
