"""Real sockets on loopback: UDP, TCP and TLS (certificates made at test time)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path

import trustme

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.parser import Limits, parse_message
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import ListenerSpec, Peer, response_peer
from clearip.relay.transport.tls import client_context

OPTIONS = (
    b"OPTIONS sip:proxy@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/{t} 127.0.0.1:9;branch=z9hG4bK{n}\r\n"
    b"Call-ID: c{n}\r\nCSeq: 1 OPTIONS\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\n"
    b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


def options(transport: str, n: int) -> bytes:
    return OPTIONS.replace(b"{t}", transport.encode()).replace(b"{n}", str(n).encode())


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[Request | Response, Peer]] = []
        self.event = asyncio.Event()

    def __call__(self, message: Request | Response, peer: Peer) -> None:
        self.messages.append((message, peer))
        self.event.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async def _wait() -> None:
            while len(self.messages) < count:
                self.event.clear()
                await self.event.wait()

        await asyncio.wait_for(_wait(), timeout)


def test_udp_response_goes_to_the_via_not_the_source_port() -> None:
    """A switch that sends from an ephemeral port and listens on another (its Via's sent-by,
    no rport) is answered where it listens (RFC 3261 §18.2.2); with rport, to the source port
    (RFC 3581)."""

    async def main() -> None:
        server_rx, client_rx = Recorder(), Recorder()
        server = SipEndpoint(server_rx)
        client = SipEndpoint(client_rx)
        _, sport = await server.listen(ListenerSpec("udp", "127.0.0.1", 0))
        _, cport = await client.listen(ListenerSpec("udp", "127.0.0.1", 0))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        sender.setblocking(False)
        try:
            # No rport: the response goes to the Via's port, not the sender's.
            data = options("UDP", 1).replace(b"127.0.0.1:9;", f"127.0.0.1:{cport};".encode())
            sender.sendto(data, ("127.0.0.1", sport))
            await server_rx.wait_for(1)
            got, peer = server_rx.messages[0]
            assert isinstance(got, Request)
            assert peer == Peer("udp", "127.0.0.1", sender.getsockname()[1])
            assert response_peer(got, peer) == Peer("udp", "127.0.0.1", cport)
            reply = Response(200, "OK", [h for h in got.headers if h[1] != "max-forwards"])
            server.send(reply, response_peer(got, peer))
            await client_rx.wait_for(1)
            assert isinstance(client_rx.messages[0][0], Response)
            # rport asked for: the response goes back to the source port.
            data = options("UDP", 2).replace(b"127.0.0.1:9;", f"127.0.0.1:{cport};rport;".encode())
            sender.sendto(data, ("127.0.0.1", sport))
            await server_rx.wait_for(2)
            got, peer = server_rx.messages[1]
            assert isinstance(got, Request)
            server.send(
                Response(200, "OK", [h for h in got.headers if h[1] != "max-forwards"]),
                response_peer(got, peer),
            )
            answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sender, 4000), 5)
            assert answer.startswith(b"SIP/2.0 200 OK")
            assert len(client_rx.messages) == 1
        finally:
            sender.close()
            await client.close()
            await server.close()

    asyncio.run(main())


def test_tcp_pipelined_split_keepalive_and_oversize() -> None:
    async def main() -> None:
        rx = Recorder()
        server = SipEndpoint(rx, limits=Limits(max_message_size=1000))
        _, port = await server.listen(ListenerSpec("tcp", "127.0.0.1", 0))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = options("TCP", 1) + options("TCP", 2) + options("TCP", 3)[:50]
        writer.write(data)
        await writer.drain()
        await rx.wait_for(2)
        writer.write(options("TCP", 3)[50:] + b"\r\n\r\n")
        await writer.drain()
        await rx.wait_for(3)
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"  # pong
        assert [m.call_id for m, _ in rx.messages] == ["c1", "c2", "c3"]
        assert len({p.conn for _, p in rx.messages}) == 1
        # Oversized: the connection is closed and counted.
        writer.write(b"X" * 2000)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert server.counters["stream_closed_too-large"] == 1
        await server.close()

    asyncio.run(main())


def test_incomplete_message_is_disconnected_after_deadline() -> None:
    async def main() -> None:
        server = SipEndpoint(Recorder(), message_deadline=0.2)
        _, port = await server.listen(ListenerSpec("tcp", "127.0.0.1", 0))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(options("TCP", 1)[:40])
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert server.counters["stream_closed_incomplete"] == 1
        await server.close()

    asyncio.run(main())


def test_tls_with_verified_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "clearip.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    async def main() -> None:
        server_rx, client_rx = Recorder(), Recorder()
        server = SipEndpoint(server_rx)
        _, port = await server.listen(
            ListenerSpec(
                "tls",
                "127.0.0.1",
                0,
                certificate=str(tmp_path / "server.pem"),
                private_key=str(tmp_path / "server.pem"),
            )
        )
        client = SipEndpoint(client_rx, tls_client=client_context(str(tmp_path / "ca.pem")))
        peer = await client.connect(Peer("tls", "127.0.0.1", port), server_name="clearip.test")
        client.send(parse_message(options("TLS", 7)), peer)
        await server_rx.wait_for(1)
        got, from_peer = server_rx.messages[0]
        assert got.call_id == "c7" and from_peer.transport == "tls"
        server.send(Response(200, "OK", got.headers), from_peer)
        await client_rx.wait_for(1)
        # A wrong name is refused: no fall-back to anything unverified.
        other = SipEndpoint(Recorder(), tls_client=client_context(str(tmp_path / "ca.pem")))
        try:
            await other.connect(Peer("tls", "127.0.0.1", port), server_name="wrong.test")
        except ssl.SSLCertVerificationError:
            pass
        else:
            raise AssertionError("connection with a wrong server name was accepted")
        await client.close()
        await server.close()
        await other.close()

    asyncio.run(main())


def test_untrusted_udp_dropped_and_tcp_closed() -> None:
    async def main() -> None:
        rx = Recorder()
        server = SipEndpoint(rx, is_trusted=lambda ip: ip == "127.0.0.2")
        _, uport = await server.listen(ListenerSpec("udp", "127.0.0.1", 0))
        _, tport = await server.listen(ListenerSpec("tcp", "127.0.0.1", 0))
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            sock.sendto(options("UDP", 1), ("127.0.0.1", uport))
            try:
                await asyncio.wait_for(loop.sock_recvfrom(sock, 2000), 0.5)
            except TimeoutError:
                pass
            else:
                raise AssertionError("an untrusted source got an answer")
        reader, _ = await asyncio.open_connection("127.0.0.1", tport)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert server.counters["untrusted_dropped"] == 1
        assert server.counters["untrusted_connection_closed"] == 1
        assert rx.messages == []
        await server.close()

    asyncio.run(main())


def test_malformed_request_gets_400_naming_the_problem() -> None:
    async def main() -> None:
        server = SipEndpoint(Recorder())
        _, port = await server.listen(ListenerSpec("udp", "127.0.0.1", 0))
        bad = options("UDP", 1).replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(bad, ("127.0.0.1", port))
            answer = (await asyncio.wait_for(loop.sock_recvfrom(sock, 2000), 5))[0]
            sock.sendto(b"\x00garbage without any via", ("127.0.0.1", port))
        assert answer.startswith(b"SIP/2.0 400 CSeq method does not match")
        assert b"Call-ID: c1" in answer and b"tag=" in answer
        await asyncio.sleep(0.1)
        assert server.counters["malformed_dropped"] == 1
        await server.close()

    asyncio.run(main())


def test_ipv6_udp_and_tcp_round_trip() -> None:
    async def main() -> None:
        rx = Recorder()
        server = SipEndpoint(rx)
        _, uport = await server.listen(ListenerSpec("udp", "::1", 0))
        _, tport = await server.listen(ListenerSpec("tcp", "::1", 0))
        client = SipEndpoint(Recorder())
        await client.listen(ListenerSpec("udp", "::1", 0))
        client.send(parse_message(options("UDP", 1)), Peer("udp", "::1", uport))
        client.send(parse_message(options("TCP", 2)), Peer("tcp", "::1", tport))
        await rx.wait_for(2)
        assert {p.transport for _, p in rx.messages} == {"udp", "tcp"}
        assert all(p.host == "::1" for _, p in rx.messages)
        assert server.local_for("udp", "::1").host == "::1"
        await client.close()
        await server.close()

    asyncio.run(main())


def test_udp_queue_delay_is_how_long_the_oldest_datagram_waited() -> None:
    """The overload signal: kernel arrival time of the first datagram of a batch vs now."""

    async def main() -> None:
        rx = Recorder()
        server = SipEndpoint(rx)
        _, port = await server.listen(ListenerSpec("udp", "127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(options("UDP", 1), ("127.0.0.1", port))
            await rx.wait_for(1)
            assert server.queue_delay < 0.1
            sender.sendto(options("UDP", 2), ("127.0.0.1", port))
            time.sleep(0.3)  # the event loop is busy: the datagram waits in the kernel
            await rx.wait_for(2)
            assert 0.3 <= server.queue_delay < 2.0
        await server.close()

    asyncio.run(main())
