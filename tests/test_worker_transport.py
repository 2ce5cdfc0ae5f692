"""Worker transport (issue #16): several SipEndpoints as sibling workers on one port.

Real sockets on loopback, in one test process: each endpoint has its own WorkerRole (one run
directory for all) and binds the same UDP and TCP port with SO_REUSEPORT; the test loads the
Call-ID steering program as the supervisor would. UDP datagrams must land on the owner of
their Call-ID, an emergency INVITE on its owner's emergency socket ahead of the queue; the
messages of ONE TCP (or TLS) connection must each be handled by their owner, and every reply
must come back on that one connection. Also: replies after the connection has gone, a
stopped sibling, and the hand-off packet format (hypothesis).
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from clearip.bpf.reuseport import ReuseportSteering, SteeringUnavailable, remove_pins
from clearip.bpf.steering import find_call_id, worker_for
from clearip.relay.proxy.routing import STATELESS_PREFIX, Locality, response_next_hop, via_value
from clearip.relay.service.worker_role import WorkerRole
from clearip.relay.sip.framing import StreamFramer
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.parser import parse_message
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.handoff_packets import (
    HandoffError,
    Kind,
    Packet,
    call_id_of,
    decode,
    encode,
    remote_conn,
    split_conn,
)
from clearip.relay.transport.peer import ListenerSpec, LocalAddress, Peer, response_peer
from lab.netns import unique_tag

EMERGENCY = ("911",)
HOST = "127.0.0.1"


# -- the hand-off format, no sockets -----------------------------------------------------------

packets = st.builds(
    Packet,
    kind=st.sampled_from([Kind.MESSAGE, Kind.WRITE]),
    worker=st.integers(0, 127),
    conn=st.integers(0, 2**32 - 1),
    transport=st.sampled_from(["tcp", "tls"]),
    host=st.one_of(st.ip_addresses().map(str), st.text(max_size=63)),
    port=st.integers(0, 65535),
    data=st.binary(min_size=1, max_size=2000),
) | st.builds(
    Packet,
    kind=st.just(Kind.CLOSED),
    worker=st.integers(0, 127),
    conn=st.integers(0, 2**32 - 1),
    transport=st.sampled_from(["tcp", "tls"]),
    host=st.ip_addresses().map(str),
    port=st.integers(0, 65535),
)


@given(packets)
def test_packets_round_trip(packet: Packet) -> None:
    assert decode(encode(packet)) == packet


@given(st.binary(max_size=64))
def test_decode_takes_only_what_encode_makes(raw: bytes) -> None:
    try:
        packet = decode(raw)
    except HandoffError:
        return
    assert encode(packet) == raw


def test_encode_refuses_what_the_format_cannot_carry() -> None:
    good = Packet(Kind.MESSAGE, 1, 7, "tcp", HOST, 5060, b"x")
    for bad in (
        Packet(Kind.MESSAGE, 1, 7, "udp", HOST, 5060, b"x"),
        Packet(Kind.MESSAGE, 128, 7, "tcp", HOST, 5060, b"x"),
        Packet(Kind.MESSAGE, 1, 2**32, "tcp", HOST, 5060, b"x"),
        Packet(Kind.MESSAGE, 1, 7, "tcp", HOST, 5060, b""),
        Packet(Kind.CLOSED, 1, 7, "tcp", HOST, 5060, b"x"),
        Packet(Kind.MESSAGE, 1, 7, "tcp", "h" * 256, 5060, b"x"),
    ):
        with pytest.raises(ValueError):
            encode(bad)
    raw = encode(good)
    for broken in (raw[:5], b"\x00" + raw[1:], raw[:1] + b"\x09" + raw[2:], raw[:12]):
        with pytest.raises(HandoffError):
            decode(broken)


@given(st.integers(0, 127), st.integers(0, 2**32 - 1))
def test_remote_conn_round_trips_and_is_never_a_local_id(worker: int, conn: int) -> None:
    encoded = remote_conn(worker, conn)
    assert encoded >= 2**32
    assert split_conn(encoded) == (worker, conn)
    assert split_conn(conn) is None


def test_remote_conn_survives_the_via_cid_of_stateless_routing() -> None:
    """A request handed over by worker 5 and forwarded statelessly: its response comes back
    with our Via's cid, which must name worker 5's connection again."""
    conn = remote_conn(5, 3_000_000_000)
    ours = via_value(LocalAddress("tcp", "192.0.2.1", 5060), STATELESS_PREFIX + "abc", conn)
    response = parse_message(
        f"SIP/2.0 200 OK\r\nVia: {ours}\r\nVia: SIP/2.0/TCP 198.51.100.7:5060;branch=z9hG4bKs\r\n"
        "Call-ID: x@h\r\nCSeq: 1 BYE\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    assert isinstance(response, Response)
    hop = response_next_hop(response, Locality(hosts={"192.0.2.1"}, ports={5060}))
    assert hop is not None
    assert hop[1] == Peer("tcp", "198.51.100.7", 5060, conn)


@pytest.mark.parametrize(
    "header",
    ["Call-ID: a1@h", "call-id:a1@h", "i: a1@h", "I :\ta1@h", "CALL-ID:  a1@h  "],
)
def test_stream_owner_reads_the_call_id_the_kernel_reads(header: str) -> None:
    message = (
        f"OPTIONS sip:x@h SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\n{header}\r\n"
        "Content-Length: 19\r\n\r\nCall-ID: in-the-body"
    ).encode()
    assert call_id_of(message) == find_call_id(message) == b"a1@h"
    parsed = parse_message(message, datagram=False)
    assert worker_for(parsed.call_id, 7) == worker_for(b"a1@h", 7)


def test_no_call_id_no_owner() -> None:
    assert call_id_of(b"OPTIONS sip:x@h SIP/2.0\r\nVia: x\r\n\r\nCall-ID: body") is None
    assert call_id_of(b"OPTIONS sip:x@h SIP/2.0\r\nCall-ID:\r\n\r\n") is None


# -- the rig: workers on one port, steering loaded as by the supervisor --------------------------


@dataclass
class Rig:
    port: int  # free on UDP and TCP
    pin_root: str  # WorkerRole.steering_pin_dir
    steering: ReuseportSteering


def free_port() -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free on both UDP and TCP")


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    root = f"/sys/fs/bpf/cip-test-{unique_tag()}-workers"
    port = free_port()
    pin_dir = WorkerRole(0, 1, "", root).steering_dir(ListenerSpec("udp", HOST, port))
    try:
        steering = ReuseportSteering.load(workers=2, emergency=EMERGENCY, pin_dir=pin_dir)
        try:
            yield Rig(port, root, steering)
        finally:
            steering.close()
    finally:
        remove_pins(root)


class Worker:
    """One endpoint as worker ``index`` of ``count``, with what its handler saw; with
    ``reply``, every request gets 200 sent to the Peer it came from (response_peer)."""

    def __init__(self, index: int, count: int, run_dir: str, rig: Rig, *, reply: bool) -> None:
        self.index = index
        self.role = WorkerRole(index, count, run_dir, rig.pin_root)
        self.seen: list[tuple[Request | Response, Peer]] = []
        self.send_errors: list[tuple[Message, Peer, str]] = []
        self.reply = reply
        self.endpoint = SipEndpoint(
            self.on_message,
            worker=self.role,
            on_send_error=lambda m, p, r: self.send_errors.append((m, p, r)),
        )
        self.counters = self.endpoint.counters

    def on_message(self, message: Request | Response, peer: Peer) -> None:
        self.seen.append((message, peer))
        if self.reply and isinstance(message, Request):
            self.endpoint.send(ok(message), response_peer(message, peer))

    def call_ids(self) -> list[str]:
        return [m.call_id for m, _ in self.seen]


async def start(
    count: int,
    run_dir: Path,
    rig: Rig,
    *,
    reply: bool = True,
    stream: str | None = "tcp",
    certificate: str | None = None,
) -> list[Worker]:
    rig.steering.set_workers(count)
    workers = [Worker(i, count, str(run_dir), rig, reply=reply) for i in range(count)]
    for worker in workers:
        await worker.endpoint.listen(ListenerSpec("udp", HOST, rig.port))
        if stream is not None:
            await worker.endpoint.listen(
                ListenerSpec(
                    stream, HOST, rig.port, certificate=certificate, private_key=certificate
                )
            )
    return workers


async def stop(workers: list[Worker]) -> None:
    for worker in workers:
        await worker.endpoint.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.005)


def call_ids(count: int, seed: int, prefix: str = "") -> list[str]:
    rng = random.Random(seed)
    return [f"{prefix}{rng.getrandbits(64):016x}-{i}@switch.example" for i in range(count)]


def owned_by(worker: int, count: int, how_many: int, seed: int, prefix: str = "") -> list[str]:
    ids = [c for c in call_ids(50 * how_many, seed, prefix) if worker_for(c, count) == worker]
    return ids[:how_many]


def request(
    call_id: str | None,
    n: int,
    *,
    transport: str = "TCP",
    via_port: int = 9,
    method: str = "OPTIONS",
    uri: str = "sip:proxy@127.0.0.1",
) -> bytes:
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{via_port};branch=z9hG4bK{n}\r\n"
        + ("" if call_id is None else f"Call-ID: {call_id}\r\n")
        + f"CSeq: 1 {method}\r\nFrom: <sip:a@b>;tag={n}\r\n"
        "To: <sip:b@c>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def ok(message: Request) -> Response:
    return Response(200, "OK", [h for h in message.headers if h[1] != "max-forwards"])


class Replies:
    """Frames what arrives on one client stream connection; counts the 200s by Call-ID."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.framer = StreamFramer()
        self.by_call_id: Counter[str] = Counter()

    async def wait_for(self, total: int, timeout: float = 20.0) -> None:
        async def read() -> None:
            while sum(self.by_call_id.values()) < total:
                chunk = await self.reader.read(65536)
                assert chunk, "the proxy closed the client's connection"
                for item in self.framer.feed(chunk):
                    if isinstance(item, bytes):
                        message = parse_message(item, datagram=False)
                        assert isinstance(message, Response) and message.status == 200
                        self.by_call_id[message.call_id] += 1

        await asyncio.wait_for(read(), timeout)


async def origin_of(workers: list[Worker]) -> tuple[Worker, list[Worker]]:
    """The worker that accepted the (one) client connection, and the others."""
    await until(lambda: any(w.endpoint.connections for w in workers), what="the accept")
    holding = [w for w in workers if w.endpoint.connections]
    assert len(holding) == 1
    return holding[0], [w for w in workers if w is not holding[0]]


# -- UDP: steering and the emergency socket -----------------------------------------------------


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.root
@pytest.mark.xdp
def test_udp_requests_land_on_their_owner(rig: Rig, tmp_path: Path, count: int) -> None:
    async def main() -> None:
        workers = await start(count, tmp_path, rig, reply=False, stream=None)
        senders = []
        for _ in range(50):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.bind((HOST, 0))
            senders.append(sender)
        ids = call_ids(500, seed=count)
        before = rig.steering.counters()
        try:
            for i, call_id in enumerate(ids):
                senders[i % 50].sendto(request(call_id, i, transport="UDP"), (HOST, rig.port))
            await until(lambda: sum(len(w.seen) for w in workers) >= 500, what="500 requests")
            await asyncio.sleep(0.05)
            for worker in workers:
                wrong = [c for c in worker.call_ids() if worker_for(c, count) != worker.index]
                assert not wrong, f"worker {worker.index} got {len(wrong)} calls of others"
                assert worker.seen, f"worker {worker.index} got nothing"
            assert sorted(c for w in workers for c in w.call_ids()) == sorted(ids)
            after = rig.steering.counters()
            assert after["steered"] - before["steered"] == 500
            assert all(w.counters["udp_emergency_received"] == 0 for w in workers)
        finally:
            for sender in senders:
                sender.close()
            await stop(workers)

    asyncio.run(main())


@pytest.mark.root
@pytest.mark.xdp
def test_emergency_invite_goes_ahead_of_the_queue(rig: Rig, tmp_path: Path) -> None:
    async def main() -> None:
        workers = await start(2, tmp_path, rig, reply=False, stream=None)
        owner = workers[1]
        normal = owned_by(1, 2, 200, seed=11)
        emergency_call = owned_by(1, 2, 1, seed=12, prefix="e911-")[0]
        invite = request(emergency_call, 999, transport="UDP", method="INVITE", uri="sip:911@h")
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # All queued before the worker reads anything (no await in between): the normal
            # requests first, the emergency INVITE last.
            for i, call_id in enumerate(normal):
                sender.sendto(request(call_id, i, transport="UDP"), (HOST, rig.port))
            sender.sendto(invite, (HOST, rig.port))
            await until(lambda: len(owner.seen) == 201, what="201 messages")
            first = owner.seen[0][0]
            assert isinstance(first, Request) and first.method == "INVITE", [
                m.call_id for m, _ in owner.seen[:3]
            ]
            assert first.call_id == emergency_call
            assert owner.counters["udp_emergency_received"] == 1
            assert workers[0].seen == []
        finally:
            sender.close()
            await stop(workers)

    asyncio.run(main())


@pytest.mark.root
@pytest.mark.xdp
def test_a_worker_that_cannot_join_steering_says_why(rig: Rig, tmp_path: Path) -> None:
    """The process side turns this error into the degraded mode; the port is left free."""

    async def main() -> None:
        rig.steering.set_workers(2)
        spec = ListenerSpec("udp", HOST, rig.port)
        cases = [
            (WorkerRole(0, 2, str(tmp_path), str(tmp_path / "none")), "no steering program"),
            (WorkerRole(2, 3, str(tmp_path), rig.pin_root), "workers = the worker count"),
        ]
        for role, why in cases:
            endpoint = SipEndpoint(lambda message, peer: None, worker=role)
            with pytest.raises(SteeringUnavailable, match=why) as error:
                await endpoint.listen(spec)
            assert f"UDP listener {HOST}:{rig.port} (worker {role.index}" in str(error.value)
            await endpoint.close()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((HOST, rig.port))  # nothing of the failed worker holds it

    asyncio.run(main())


# -- TCP/TLS: one connection, every worker --------------------------------------------------------


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.root
@pytest.mark.xdp
def test_one_tcp_connection_is_served_by_every_worker(rig: Rig, tmp_path: Path, count: int) -> None:
    async def main() -> None:
        workers = await start(count, tmp_path, rig)
        reader, writer = await asyncio.open_connection(HOST, rig.port)
        ids = call_ids(400, seed=100 + count)
        try:
            payload = b"".join(request(c, i) for i, c in enumerate(ids))
            for at in range(0, len(payload), 7000):  # pipelined, cut anywhere
                writer.write(payload[at : at + 7000])
            await writer.drain()
            replies = Replies(reader)
            await replies.wait_for(400)
            assert replies.by_call_id == Counter(ids)  # each once, all on the one connection
            origin, others = await origin_of(workers)
            for worker in workers:
                wrong = [c for c in worker.call_ids() if worker_for(c, count) != worker.index]
                assert not wrong, f"worker {worker.index} handled {len(wrong)} calls of others"
            for worker in others:
                for _, peer in worker.seen:
                    assert peer.conn is not None
                    assert split_conn(peer.conn) == (origin.index, peer.conn & 0xFFFFFFFF)
            handed = 400 - len(origin.seen)
            assert origin.counters["handoff_sent"] == handed > 0
            assert sum(w.counters["handoff_received"] for w in others) == handed
            assert sum(w.counters["handoff_write_sent"] for w in others) == handed
            assert origin.counters["handoff_write_received"] == handed
            for worker in workers:
                assert worker.counters["handoff_fallback_local"] == 0
                assert worker.counters["handoff_write_no_connection"] == 0
            if count == 2:
                mean = 400 / count
                for worker in workers:
                    assert abs(len(worker.seen) - mean) <= 0.15 * mean, [
                        len(w.seen) for w in workers
                    ]
            # Keep-alives, and a message without a Call-ID, are the connection's own worker's.
            writer.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
            writer.write(request(None, 401))
            await replies.wait_for(401)
            assert origin.call_ids().count("") == 1 and replies.by_call_id[""] == 1
            assert origin.counters["handoff_sent"] == handed
        finally:
            writer.close()
            await stop(workers)

    asyncio.run(main())


@pytest.mark.root
@pytest.mark.xdp
def test_one_tls_connection_is_served_by_every_worker(rig: Rig, tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(str(pem))
    client = ssl.create_default_context()
    ca.configure_trust(client)

    async def main() -> None:
        workers = await start(2, tmp_path, rig, stream="tls", certificate=str(pem))
        reader, writer = await asyncio.open_connection(HOST, rig.port, ssl=client)
        ids = call_ids(100, seed=5)
        try:
            writer.write(b"".join(request(c, i, transport="TLS") for i, c in enumerate(ids)))
            await writer.drain()
            replies = Replies(reader)
            await replies.wait_for(100)
            assert replies.by_call_id == Counter(ids)
            origin, (other,) = await origin_of(workers)
            assert sorted(other.call_ids()) == sorted(
                c for c in ids if worker_for(c, 2) == 1 - origin.index
            )
            assert {p.transport for _, p in other.seen} == {"tls"}
            assert origin.counters["handoff_sent"] == len(other.seen) > 0
        finally:
            writer.close()
            await stop(workers)

    asyncio.run(main())


@pytest.mark.root
@pytest.mark.xdp
def test_reply_after_the_origin_connection_has_gone(rig: Rig, tmp_path: Path) -> None:
    async def main() -> None:
        workers = await start(2, tmp_path, rig, reply=False)
        # The switch listens here (its Via's sent-by): where a response goes on a new
        # connection when the request's connection has gone (RFC 3261 §18.2.2).
        arrived: list[bytes] = []

        async def switch_side(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            arrived.append(await r.read(65536))
            w.close()

        switch = await asyncio.start_server(switch_side, HOST, 0)
        switch_port = switch.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection(HOST, rig.port)
        try:
            origin, (owner,) = await origin_of(workers)
            call_id = owned_by(owner.index, 2, 1, seed=21)[0]
            writer.write(request(call_id, 1, via_port=switch_port))
            await writer.drain()
            await until(lambda: bool(owner.seen), what="the hand-off")
            message, peer = owner.seen[0]
            assert isinstance(message, Request)
            writer.close()
            await until(
                lambda: (
                    not origin.endpoint.connections
                    and owner.counters["handoff_closed_received"] == 1
                ),
                what="the origin's CLOSED",
            )
            # The owner knows the connection has gone: a new connection to the switch.
            owner.endpoint.send(ok(message), response_peer(message, peer))
            await until(lambda: bool(arrived), what="the response on a new connection")
            assert arrived[0].startswith(b"SIP/2.0 200 OK") and call_id.encode() in arrived[0]
            assert owner.counters["handoff_write_sent"] == 0
            assert owner.send_errors == []

            # A write that reaches the origin after its connection has gone, before the owner
            # could know (here: a cid of a connection whose messages the owner never saw).
            _, writer2 = await asyncio.open_connection(HOST, rig.port)
            await until(lambda: bool(origin.endpoint.connections or owner.endpoint.connections))
            holder = origin if origin.endpoint.connections else owner
            other = owner if holder is origin else origin
            (gone,) = holder.endpoint.connections
            writer2.close()
            await until(lambda: not holder.endpoint.connections, what="the second close")
            stale = Peer("tcp", HOST, switch_port, remote_conn(holder.index, gone))
            other.endpoint.send(ok(message), stale)
            await until(lambda: holder.counters["handoff_write_no_connection"] == 1)
            assert other.counters["handoff_write_sent"] == 1
            # A cid altered by the next hop names no connection: sent as without one.
            handoff = other.endpoint._handoff
            assert handoff is not None
            for odd in (
                Peer("tcp", "h" * 300, 5060, remote_conn(holder.index, gone)),
                Peer("sctp", HOST, 5060, remote_conn(holder.index, gone)),
                Peer("tcp", HOST, 5060, remote_conn(99, gone)),
            ):
                assert not handoff.write(odd, b"x")
            # Nothing broke: a new connection is still served by both.
            reader3, writer3 = await asyncio.open_connection(HOST, rig.port)
            for worker in workers:
                worker.reply = True
            ids = call_ids(40, seed=22)
            writer3.write(b"".join(request(c, i) for i, c in enumerate(ids)))
            replies = Replies(reader3)
            await replies.wait_for(40)
            assert replies.by_call_id == Counter(ids)
            writer3.close()
        finally:
            writer.close()
            switch.close()
            await stop(workers)

    asyncio.run(main())


@pytest.mark.root
@pytest.mark.xdp
def test_messages_for_a_stopped_worker_are_handled_locally(rig: Rig, tmp_path: Path) -> None:
    async def main() -> None:
        workers = await start(2, tmp_path, rig)
        reader, writer = await asyncio.open_connection(HOST, rig.port)
        replies = Replies(reader)
        try:
            origin, (other,) = await origin_of(workers)
            theirs = owned_by(other.index, 2, 21, seed=31)
            ours = owned_by(origin.index, 2, 20, seed=32)
            writer.write(request(theirs[0], 0))
            await replies.wait_for(1)
            assert other.call_ids() == [theirs[0]]  # handed over while it ran
            # Garbage on a hand-off socket is counted and dropped.
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as intruder:
                intruder.connect(other.role.handoff_path())
                intruder.send(b"\xc1garbage")
                await until(lambda: other.counters["handoff_bad_packet"] == 1)
            assert oct(Path(other.role.handoff_path()).stat().st_mode & 0o777) == "0o600"
            await other.endpoint.close()
            later = theirs[1:] + ours
            writer.write(b"".join(request(c, i) for i, c in enumerate(later, 1)))
            await replies.wait_for(41)
            assert replies.by_call_id == Counter(theirs + ours)
            assert sorted(origin.call_ids()) == sorted(later)
            assert origin.counters["handoff_fallback_local"] == 20
            assert origin.counters["handoff_sent"] == 1
        finally:
            writer.close()
            await stop(workers)

    asyncio.run(main())
