"""HEPv3 export to Homer: the packet byte for byte, every message of a call on every leg at a
collector (UDP, TCP, sngrep), and calls untouched when the collector is down or slow.

The collector stand-ins decode HEP3 with their own code and the protocol's chunk ids, not
with clearip.relay.service.hep, so an encoder and decoder wrong in the same way cannot pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearip.relay.config import ConfigError, HepConfig, ProxyConfig
from clearip.relay.config_toml import config_from_data
from clearip.relay.service import hep_export
from clearip.relay.service.daemon import Daemon
from clearip.relay.service.hep import HepError, HepRecord, decode, encode, parse_address, record_for
from clearip.relay.service.hep_export import HepExporter
from clearip.relay.service.reload import plan_reload
from clearip.relay.sip.message import Message
from clearip.relay.sip.parser import parse_message
from clearip.relay.transport.endpoint import SipEndpoint
from clearip.relay.transport.peer import ListenerSpec, Peer
from lab.proxy_harness import (
    PROVIDER_A_IP,
    SWITCH_IP,
    ThreadedProxy,
    threaded_proxy,
    wait_for,
    write_config,
)
from lab.sipp import (
    Sipp,
    clearip_scenario,
    free_port,
    sipp_uas,
    start_sipp,
    uac_scenario,
    uas_scenario,
)

DIALLED = "12125550100"


# -- a collector's view of HEP3 (independent of clearip.relay.service.hep) ----------------------
@dataclass
class Packet:
    family: int
    protocol: int
    source: tuple[str, int]
    destination: tuple[str, int]
    time: float
    protocol_type: int
    capture_id: int
    password: bytes | None
    correlation_id: bytes | None
    payload: bytes

    @property
    def first_line(self) -> str:
        return self.payload.split(b"\r\n", 1)[0].decode()

    @property
    def kind(self) -> str:
        """The method of a request, the status code of a response."""
        words = self.first_line.split()
        return words[1] if words[0] == "SIP/2.0" else words[0]

    @property
    def call_id(self) -> str:
        match = re.search(rb"\r\n(?:Call-ID|i):\s*(\S+)", self.payload, re.IGNORECASE)
        assert match, self.payload
        return match.group(1).decode()


def parse_hep3(data: bytes) -> Packet:
    """HEP3 as a collector reads it: "HEP3", uint16 total length, then chunks of vendor id,
    type id, length (header included) and value; the ids are the HEP3 specification's."""
    assert data[:4] == b"HEP3", data[:16]
    (total,) = struct.unpack("!H", data[4:6])
    assert total == len(data)
    chunks: dict[int, bytes] = {}
    offset = 6
    while offset < total:
        vendor, kind, length = struct.unpack("!HHH", data[offset : offset + 6])
        assert vendor == 0 and length >= 6
        assert kind not in chunks, f"chunk {kind} twice"
        chunks[kind] = data[offset + 6 : offset + length]
        offset += length
    assert offset == total
    family = chunks[1][0]
    if family == 2:
        source, destination = chunks[3], chunks[4]
    else:
        assert family == 10
        source, destination = chunks[5], chunks[6]
    return Packet(
        family=family,
        protocol=chunks[2][0],
        source=(str(ipaddress.ip_address(source)), struct.unpack("!H", chunks[7])[0]),
        destination=(str(ipaddress.ip_address(destination)), struct.unpack("!H", chunks[8])[0]),
        time=struct.unpack("!I", chunks[9])[0] + struct.unpack("!I", chunks[10])[0] / 1e6,
        protocol_type=chunks[11][0],
        capture_id=struct.unpack("!I", chunks[12])[0],
        password=chunks.get(14),
        correlation_id=chunks.get(17),
        payload=chunks[15],
    )


class UdpCollector:
    """A HEP collector on UDP: one packet per datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.packets: list[Packet] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except OSError:
                return
            self.packets.append(parse_hep3(data))

    def close(self) -> None:
        self.sock.close()


class TcpCollector:
    """A HEP collector on TCP: packets back to back, framed by their length field."""

    def __init__(self, port: int = 0) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen(8)
        self.port = int(self.server.getsockname()[1])
        self.packets: list[Packet] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
                while len(buffer) >= 6:
                    (length,) = struct.unpack("!H", buffer[4:6])
                    if len(buffer) < length:
                        break
                    self.packets.append(parse_hep3(buffer[:length]))
                    buffer = buffer[length:]

    def close(self) -> None:
        self.server.close()


@contextlib.contextmanager
def collector(transport: str) -> Iterator[UdpCollector | TcpCollector]:
    stand_in = UdpCollector() if transport == "udp" else TcpCollector()
    try:
        yield stand_in
    finally:
        stand_in.close()


# -- the packet ---------------------------------------------------------------------------
def test_one_packet_byte_for_byte() -> None:
    record = HepRecord(
        source="10.0.0.1",
        source_port=5060,
        destination="192.0.2.7",
        destination_port=5061,
        protocol=6,
        seconds=0x65000000,
        microseconds=123456,
        payload=b"OPTIONS",
        capture_id=2002,
        password=b"pw",
        correlation_id=b"c1",
    )
    expected = bytes.fromhex(
        "48455033 007a"  # "HEP3", 122 bytes in all: 6 + the chunks below
        "0000 0001 0007 02"  # IP family: AF_INET
        "0000 0002 0007 06"  # IP protocol: TCP
        "0000 0003 000a 0a000001"  # IPv4 source 10.0.0.1
        "0000 0004 000a c0000207"  # IPv4 destination 192.0.2.7
        "0000 0007 0008 13c4"  # source port 5060
        "0000 0008 0008 13c5"  # destination port 5061
        "0000 0009 000a 65000000"  # seconds
        "0000 000a 000a 0001e240"  # microseconds 123456
        "0000 000b 0007 01"  # protocol type: SIP
        "0000 000c 000a 000007d2"  # capture id 2002
        "0000 0011 0008 6331"  # correlation id "c1"
        "0000 000e 0008 7077"  # auth key "pw"
        "0000 000f 000d 4f5054494f4e53"  # payload "OPTIONS"
    )
    assert len(expected) == 0x7A == 6 + 7 + 7 + 10 + 10 + 8 + 8 + 10 + 10 + 7 + 10 + 8 + 8 + 13
    assert encode(record) == expected
    assert decode(expected) == record


def test_ipv6_and_optional_chunks() -> None:
    record = record_for(
        "in",
        "udp",
        ("2001:db8::1", 5060),
        ("2001:db8::2", 5070),
        1_700_000_000.25,
        payload=b"SIP/2.0 200 OK\r\n\r\n",
        correlation_id="",
        capture_id=7,
    )
    data = encode(record)
    packet = parse_hep3(data)
    assert packet.family == 10 and packet.protocol == 17
    assert packet.source == ("2001:db8::2", 5070)  # "in": the peer sent it to us
    assert packet.destination == ("2001:db8::1", 5060)
    assert packet.time == 1_700_000_000.25
    assert packet.password is None and packet.correlation_id is None
    # IPv4 next to IPv6: both written as IPv6 (IPv4-mapped).
    mixed = parse_hep3(encode(HepRecord("10.0.0.1", 1, "::1", 2, 17, 0, 0, b"x")))
    assert mixed.family == 10
    assert ipaddress.IPv6Address(mixed.source[0]).ipv4_mapped == ipaddress.IPv4Address("10.0.0.1")


def test_record_for_directions_protocols_and_time() -> None:
    common = {"payload": b"x", "correlation_id": "abc@h", "capture_id": 1}
    out = record_for("out", "tls", ("10.0.0.1", 40000), ("10.0.0.9", 5061), 5.9999996, **common)
    assert (out.source, out.source_port) == ("10.0.0.1", 40000)
    assert (out.destination, out.destination_port) == ("10.0.0.9", 5061)
    assert out.protocol == 6  # TLS travels on TCP
    assert (out.seconds, out.microseconds) == (6, 0)  # rounded to the microsecond
    assert out.correlation_id == b"abc@h"
    inn = record_for("in", "udp", ("10.0.0.1", 5060), ("10.0.0.9", 5060), 1.5, **common)
    assert (inn.source, inn.destination, inn.protocol) == ("10.0.0.9", "10.0.0.1", 17)


@st.composite
def records(draw: st.DrawFn) -> HepRecord:
    version = draw(st.sampled_from([4, 6]))
    return HepRecord(
        source=str(draw(st.ip_addresses(v=version))),
        source_port=draw(st.integers(0, 65535)),
        destination=str(draw(st.ip_addresses(v=version))),
        destination_port=draw(st.integers(0, 65535)),
        protocol=draw(st.sampled_from([6, 17])),
        seconds=draw(st.integers(0, 2**32 - 1)),
        microseconds=draw(st.integers(0, 999_999)),
        payload=draw(st.binary(max_size=3000)),
        capture_id=draw(st.integers(0, 2**32 - 1)),
        password=draw(st.binary(max_size=40)),
        correlation_id=draw(st.binary(max_size=80)),
    )


@settings(max_examples=300, deadline=None)
@given(record=records())
def test_round_trip(record: HepRecord) -> None:
    data = encode(record)
    assert decode(data) == record
    packet = parse_hep3(data)  # and a collector reads the same
    assert packet.source == (record.source, record.source_port)
    assert packet.destination == (record.destination, record.destination_port)
    assert packet.family == (2 if "." in record.source else 10)
    assert (packet.protocol, packet.capture_id) == (record.protocol, record.capture_id)
    assert packet.time == pytest.approx(record.seconds + record.microseconds / 1e6, abs=1e-6)
    assert packet.payload == record.payload
    assert packet.password == (record.password or None)
    assert packet.correlation_id == (record.correlation_id or None)


def test_what_cannot_be_written_or_read_is_refused() -> None:
    base = HepRecord("10.0.0.1", 5060, "10.0.0.2", 5060, 17, 1, 2, b"x")
    with pytest.raises(HepError, match="65535"):
        encode(HepRecord("10.0.0.1", 5060, "10.0.0.2", 5060, 17, 1, 2, b"x" * 65535))
    with pytest.raises(HepError, match="not an IP address"):
        encode(HepRecord("proxy.example", 5060, "10.0.0.2", 5060, 17, 1, 2, b"x"))
    with pytest.raises(HepError, match="port"):
        encode(HepRecord("10.0.0.1", 70000, "10.0.0.2", 5060, 17, 1, 2, b"x"))
    data = encode(base)
    with pytest.raises(HepError, match="not HEP3"):
        decode(b"HEP2" + data[4:])
    with pytest.raises(HepError, match="header says"):
        decode(data[:-1])
    with pytest.raises(HepError, match="bad length"):
        decode(data[:6] + data[6:10] + b"\x00\x03" + data[12:])
    no_payload = data[: -(6 + 1)]
    no_payload = no_payload[:4] + struct.pack("!H", len(no_payload)) + no_payload[6:]
    with pytest.raises(HepError, match="0x0f"):
        decode(no_payload)
    # Chunks of another vendor are skipped, as HEP3 allows.
    extra = struct.pack("!HHH", 0x0003, 0x0020, 8) + b"zz"
    longer = data[:4] + struct.pack("!H", len(data) + len(extra)) + data[6:] + extra
    assert decode(longer) == base


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.0.0.5:9060", ("10.0.0.5", 9060)), ("[2001:db8::5]:9060", ("2001:db8::5", 9060)),
     ("homer.example:9061", ("homer.example", 9061))],
)  # fmt: skip
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


# -- configuration and reload -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "needles"),
    [
        ({"address": "10.0.0.5"}, ["hep.address", "host:port"]),
        ({"address": "2001:db8::5:9060"}, ["hep.address", "brackets"]),
        ({"address": "10.0.0.5:0"}, ["hep.address", "1 to 65535"]),
        ({"transport": "tls"}, ["hep.transport", "udp or tcp"]),
        ({"capture_id": -1}, ["hep.capture_id", "4294967295"]),
        ({"capture_id": 2**32}, ["hep.capture_id", "4294967295"]),
        ({"queue_limit": 0}, ["hep.queue_limit", "> 0"]),
        ({"password": 5}, ["hep.password"]),
        ({"adress": "x"}, ["adress", "[hep]"]),
    ],
)
def test_config_errors_name_the_key(table: dict[str, object], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_data({"hep": table})
    for needle in needles:
        assert needle in str(info.value)


def test_config_and_reload_plan() -> None:
    config = config_from_data(
        {"hep": {"address": "[::1]:9060", "transport": "TCP", "capture_id": 42, "password": "Zq9"}}
    )
    assert config.hep == HepConfig("[::1]:9060", "tcp", 42, "Zq9", 10000)
    assert (config.hep.host, config.hep.port) == ("::1", 9060)
    assert "Zq9" not in repr(config)  # the password stays out of logs and tracebacks
    plan = plan_reload(ProxyConfig(), config)
    assert plan.restart == () and plan.config.hep == config.hep
    changes = {c.key: (c.old, c.new) for c in plan.live}
    assert changes["hep.address"] == ('""', '"[::1]:9060"')
    assert changes["hep.password"] == ('""', '"***"')  # a reload report never shows it


# -- the exporter on real sockets ----------------------------------------------------------
def _message(call_id: str = "c-1@test", size: int = 0) -> Message:
    body = b"x" * size
    return parse_message(
        (
            "OPTIONS sip:p@127.0.0.1 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK1\r\n"
            f"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:p@127.0.0.1>\r\nCall-ID: {call_id}\r\n"
            f"CSeq: 1 OPTIONS\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )


async def _until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_exporter_udp_fields_and_order() -> None:
    async def run() -> None:
        counters: Counter[str] = Counter()
        with collector("udp") as stand_in:
            exporter = HepExporter(HepConfig(stand_in.address, "udp", 77, "pw", 100), counters)
            exporter.start()
            before = time.time()
            for n in range(20):
                exporter.offer("in" if n % 2 else "out", _message(f"c{n}"), "tls",
                               ("127.0.0.1", 5060), ("127.0.0.5", 6000 + n))  # fmt: skip
            await _until(lambda: len(stand_in.packets) == 20)
            await exporter.close()
        assert counters["hep_sent"] == 20 and counters["hep_dropped"] == 0
        times = [p.time for p in stand_in.packets]
        assert times == sorted(times) and before <= times[0] <= times[-1] <= time.time()
        for n, packet in enumerate(stand_in.packets):
            ours, theirs = ("127.0.0.1", 5060), ("127.0.0.5", 6000 + n)
            assert (packet.source, packet.destination) == (
                (theirs, ours) if n % 2 else (ours, theirs)
            )
            assert packet.protocol == 6 and packet.protocol_type == 1
            assert (packet.capture_id, packet.password) == (77, b"pw")
            assert packet.correlation_id == f"c{n}".encode() == packet.call_id.encode()

    asyncio.run(run())


def test_exporter_tcp_waits_for_the_collector_and_reconnects() -> None:
    port = free_port("tcp")

    async def run() -> None:
        counters: Counter[str] = Counter()
        exporter = HepExporter(HepConfig(f"127.0.0.1:{port}", "tcp", 1, "", 100), counters)
        exporter.start()
        await _until(lambda: not exporter.accepting)  # refused: copies are dropped meanwhile
        exporter.offer("out", _message("lost"), "udp", ("127.0.0.1", 5060), ("127.0.0.2", 5060))
        assert counters["hep_dropped"] >= 1
        stand_in = TcpCollector(port)  # the collector comes up
        try:
            await _until(lambda: stand_in.connections == 1)  # back-off: 0.5 s, 1 s, ...
            await _until(lambda: exporter.accepting)
            for n in range(5):
                exporter.offer("out", _message(f"k{n}"), "udp", ("127.0.0.1", 5060),
                               ("127.0.0.2", 5060))  # fmt: skip
            await _until(lambda: len(stand_in.packets) == 5)
            assert [p.correlation_id for p in stand_in.packets] == [
                f"k{n}".encode() for n in range(5)
            ]
        finally:
            await exporter.close()
            stand_in.close()

    asyncio.run(run())


def test_exporter_collector_that_never_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing blocks: the queue fills, copies are dropped and counted, and the stalled
    connection is given up for a new one."""
    monkeypatch.setattr(hep_export, "STALL_TIMEOUT", 1.0)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])  # and never read

    threading.Thread(target=accept, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"

    async def run() -> None:
        counters: Counter[str] = Counter()
        exporter = HepExporter(HepConfig(address, "tcp", 1, "", 50), counters)
        exporter.start()
        await _until(lambda: accepted)
        message = _message(size=8000)
        for _ in range(300):
            for _ in range(20):
                exporter.offer("in", message, "udp", ("127.0.0.1", 5060), ("127.0.0.2", 5060))
            await asyncio.sleep(0.005)
        assert counters["hep_dropped"] > 0, counters
        assert len(exporter.queue) <= 50
        await _until(lambda: len(accepted) >= 2)  # stalled for 1 s: a new connection
        await exporter.close()

    try:
        asyncio.run(run())
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def test_our_end_is_the_real_socket_address_not_the_advertised_one() -> None:
    """HEP shows addresses as a capture on this host would: a listener's `advertise` (the
    public address behind 1:1 NAT) is for Via and Record-Route, not for the copies; a
    wildcard listener is resolved to the address the route to the peer leaves from."""

    async def run() -> None:
        endpoint = SipEndpoint(lambda message, peer: None)
        try:
            _, port = await endpoint.listen(ListenerSpec("udp", "127.0.0.1", 0, "203.0.113.5"))
            peer = Peer("udp", PROVIDER_A_IP, 5060)
            assert endpoint.local_for("udp", PROVIDER_A_IP).host == "203.0.113.5"
            assert endpoint.local_address(peer) == ("127.0.0.1", port)
            server = await asyncio.start_server(lambda r, w: None, PROVIDER_A_IP, 0)
            try:
                far = server.sockets[0].getsockname()[1]
                connected = await endpoint.connect(Peer("tcp", PROVIDER_A_IP, far))
                conn = endpoint.connections[connected.conn]  # type: ignore[index]
                assert conn.sockname is not None
                assert endpoint.local_address(connected) == conn.sockname
                assert endpoint.local_address(connected.without_conn()) == conn.sockname
            finally:
                server.close()
        finally:
            await endpoint.close()
        wildcard = SipEndpoint(lambda message, peer: None)
        try:
            _, port = await wildcard.listen(ListenerSpec("udp", "0.0.0.0", 0))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((PROVIDER_A_IP, 9))
                route_source = probe.getsockname()[0]
            peer = Peer("udp", PROVIDER_A_IP, 5060)
            assert wildcard.local_address(peer) == (route_source, port)
        finally:
            await wildcard.close()

    asyncio.run(run())


# -- the real daemon: a whole call, every leg ------------------------------------------------
@dataclass
class Lab:
    dir: Path
    proxy_port: int
    clearip_port: int
    a_port: int
    switch_port: int

    def config(self, hep: str, proxy: str = "") -> Path:
        path = write_config(
            self.dir,
            port=self.proxy_port,
            upstream=f"sip:127.0.0.1:{self.clearip_port};transport=tcp",
            extra=hep,
        )
        path.write_text(path.read_text().replace("[proxy]\n", f"[proxy]\n{proxy}", 1))
        return path


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(
        tmp_path,
        proxy_port=free_port(),
        clearip_port=free_port("tcp"),
        a_port=free_port(host=PROVIDER_A_IP),
        switch_port=free_port(),
    )


def _hep_table(address: str, transport: str = "udp", extra: str = "") -> str:
    return (
        f'\n[hep]\naddress = "{address}"\ntransport = "{transport}"\ncapture_id = 2002\n'
        f'password = "s3cret"\n{extra}'
    )


@dataclass
class Call:
    proxy: ThreadedProxy
    switch: Sipp
    clearip: Sipp
    provider: Sipp
    upstream_local: tuple[str, int]  # our end of the TCP connection to ClearIP


@contextlib.contextmanager
def _routed_call(
    lab: Lab,
    hep: str,
    calls: int = 1,
    *,
    proxy_settings: str = "",
    before_calls: Callable[[ThreadedProxy], None] | None = None,
) -> Iterator[Call]:
    """ClearIP (SIPp over TCP) routes to provider A (SIPp, UDP); the switch calls and hangs up."""
    contacts = [f"sip:{DIALLED}@{PROVIDER_A_IP}:{lab.a_port}"]
    with (
        sipp_uas(lab.dir, "clearip", clearip_scenario(302, contacts),
                 local=("127.0.0.1", lab.clearip_port), transport="t1", calls=calls) as clearip,
        sipp_uas(lab.dir, "a", uas_scenario(200), local=(PROVIDER_A_IP, lab.a_port),
                 calls=calls) as a,
        threaded_proxy(lab.config(hep, proxy_settings)) as proxy,
    ):  # fmt: skip
        wait_for(lambda: proxy.call(lambda d: d.status()["upstreams"]["switch"]["state"]) == "up")
        if before_calls is not None:
            before_calls(proxy)
        upstream_local = proxy.call(
            lambda d: next(c.sockname for c in d.endpoint.connections.values()
                           if c.peer.port == lab.clearip_port)
        )  # fmt: skip
        switch = start_sipp(
            lab.dir, "switch", uac_scenario(200), local=(SWITCH_IP, lab.switch_port),
            remote=("127.0.0.1", lab.proxy_port), service=DIALLED, calls=calls,
            extra=["-r", "20"],
        )  # fmt: skip
        assert switch.wait(60) == 0, switch.messages[-3000:]
        assert a.wait(20) == 0, a.messages[-3000:]
        assert proxy.wait_idle() == (0, 0)
        assert upstream_local is not None
        yield Call(proxy, switch, clearip, a, upstream_local)


def _sipp_lines(sipp: Sipp, what: str) -> Counter[str]:
    """The first lines of the messages SIPp ``what`` ("sent" or "received")."""
    out: Counter[str] = Counter()
    for block in re.split(r"\n(?=-{10,} )", sipp.messages):
        if f"message {what}" in block:
            out[block.split("\n", 2)[-1].lstrip().split("\n", 1)[0].strip()] += 1
    return out


def _leg(packets: list[Packet], a: tuple[str, int], b: tuple[str, int]) -> list[Packet]:
    return [p for p in packets if {p.source, p.destination} == {a, b}]


def _lines(packets: list[Packet], source: tuple[str, int]) -> Counter[str]:
    return Counter(p.first_line for p in packets if p.source == source)


def _check_common(packets: list[Packet], started: float, ended: float) -> str:
    """What every packet of the call shares; returns the Call-ID."""
    assert packets
    call_ids = {p.call_id for p in packets}
    assert len(call_ids) == 1, call_ids  # one call: every leg shares the Call-ID
    (call_id,) = call_ids
    for packet in packets:
        assert packet.correlation_id == call_id.encode()
        assert (packet.capture_id, packet.password, packet.protocol_type) == (2002, b"s3cret", 1)
        assert packet.family == 2
        assert started - 0.001 <= packet.time <= ended + 0.001
    times = [p.time for p in packets]
    assert times == sorted(times), "copies arrive in the order the relay saw the messages"
    return call_id


@pytest.mark.sipp
@pytest.mark.slow
def test_every_message_of_a_call_on_every_leg_udp_collector(lab: Lab) -> None:
    with collector("udp") as stand_in:
        started = time.time()
        with _routed_call(lab, _hep_table(stand_in.address)) as call:
            counters = call.proxy.counters()
            wait_for(lambda: len(stand_in.packets) == counters["hep_sent"], what="copies")
            ended = time.time()
        packets = list(stand_in.packets)
    assert counters["hep_dropped"] == 0 and counters["hep_send_errors"] == 0
    _check_common(packets, started, ended)
    ours = ("127.0.0.1", lab.proxy_port)
    ours_to_clearip = call.upstream_local
    switch_side, clearip_side = ("127.0.0.1", lab.switch_port), ("127.0.0.1", lab.clearip_port)
    provider_side = (PROVIDER_A_IP, lab.a_port)
    legs = {
        "switch": (_leg(packets, switch_side, ours), call.switch, switch_side, 17),
        "clearip": (_leg(packets, clearip_side, ours_to_clearip), call.clearip, clearip_side, 6),
        "provider": (_leg(packets, provider_side, ours), call.provider, provider_side, 17),
    }
    assert sum(len(leg[0]) for leg in legs.values()) == len(packets), "a copy on no leg"
    for name, (leg, sipp, far_side, protocol) in legs.items():
        assert leg, name
        assert {p.protocol for p in leg} == {protocol}, name
        # Exactly what the far end sent reached us, and what we sent reached it.
        assert _lines(leg, far_side) == _sipp_lines(sipp, "sent"), name
        assert Counter(p.first_line for p in leg if p.source != far_side) == _sipp_lines(
            sipp, "received"
        ), name
    kinds = {name: [p.kind for p in leg[0]] for name, leg in legs.items()}
    assert {"INVITE", "200", "ACK", "BYE"} <= set(kinds["switch"]), kinds
    assert {"INVITE", "302", "ACK"} <= set(kinds["clearip"]), kinds
    assert {"INVITE", "200", "ACK", "BYE"} <= set(kinds["provider"]), kinds
    # The order of one call: INVITE in from the switch, to ClearIP, its 302, to the provider.
    order = [
        (p.kind, p.destination if p.source in (ours, ours_to_clearip) else p.source)
        for p in packets
    ]
    firsts = [
        order.index(("INVITE", switch_side)),
        order.index(("INVITE", clearip_side)),
        order.index(("302", clearip_side)),
        order.index(("INVITE", provider_side)),
    ]
    assert firsts == sorted(firsts), order


@pytest.mark.sipp
@pytest.mark.slow
def test_tls_leg_in_plaintext_to_a_tcp_collector(tmp_path: Path) -> None:
    from clearip.relay.labkit.labca import make_lab_certificates
    from tests.test_proxy_tls import _emulator, _rules

    certs = make_lab_certificates(tmp_path / "lab")
    a_port = free_port(host=PROVIDER_A_IP)
    switch_port = free_port()
    with collector("tcp") as stand_in:
        for tls_port in _emulator(tmp_path, _rules(a_port), tmp_path / "lab"):
            proxy_port = free_port()
            config = write_config(
                tmp_path,
                port=proxy_port,
                upstream=f"sip:localhost:{tls_port};transport=tls",
                ca_file=str(certs.ca_file),
                extra=_hep_table(stand_in.address, "tcp"),
            )
            started = time.time()
            with (
                sipp_uas(tmp_path, "a", uas_scenario(200), local=(PROVIDER_A_IP, a_port)) as a,
                threaded_proxy(config) as proxy,
            ):
                wait_for(lambda: proxy.call(lambda d: d.status()["upstreams"]["switch"]["state"])
                         == "up")  # fmt: skip
                switch = start_sipp(
                    tmp_path, "switch", uac_scenario(200), local=(SWITCH_IP, switch_port),
                    remote=("127.0.0.1", proxy_port), service=DIALLED,
                )  # fmt: skip
                assert switch.wait(30) == 0, switch.messages[-3000:]
                assert a.wait(10) == 0
                assert proxy.wait_idle() == (0, 0)
                counters = proxy.counters()
                sent = counters["hep_sent"]
                wait_for(lambda: len(stand_in.packets) == sent, what="copies")  # noqa: B023
                ended = time.time()
                conns = proxy.call(
                    lambda d: [(c.peer.port, c.name, c.sockname)
                               for c in d.endpoint.connections.values()]
                )  # fmt: skip
        packets = list(stand_in.packets)
    assert counters["hep_dropped"] == 0 and counters["hep_send_errors"] == 0
    call_id = _check_common(packets, started, ended)
    tls_local = next(local for port, name, local in conns if port == tls_port and name == "tls")
    tls_leg = _leg(packets, ("127.0.0.1", tls_port), tls_local)
    assert tls_leg, [(p.source, p.destination, p.kind) for p in packets]
    assert {p.protocol for p in tls_leg} == {6}  # TLS: its IP protocol, TCP
    invite = next(p for p in tls_leg if p.kind == "INVITE")
    assert invite.source == tls_local and invite.destination == ("127.0.0.1", tls_port)
    assert invite.payload.startswith(b"INVITE sip:" + DIALLED.encode())  # the plaintext
    assert f"Call-ID: {call_id}".encode() in invite.payload
    answer = next(p for p in tls_leg if p.kind == "302")
    assert answer.source == ("127.0.0.1", tls_port) and answer.destination == tls_local
    assert b"Identity: " in answer.payload
    assert answer.time >= invite.time
    switch_leg = _leg(packets, ("127.0.0.1", switch_port), ("127.0.0.1", proxy_port))
    provider_leg = _leg(packets, (PROVIDER_A_IP, a_port), ("127.0.0.1", proxy_port))
    assert {"INVITE", "200", "ACK", "BYE"} <= {p.kind for p in switch_leg}
    assert {"INVITE", "200", "ACK", "BYE"} <= {p.kind for p in provider_leg}
    assert len(switch_leg) + len(tls_leg) + len(provider_leg) == len(packets)


def _sngrep() -> str:
    path = shutil.which("sngrep")
    if path is None:
        import os

        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but sngrep is missing (apt-get install sngrep)")
        pytest.skip("sngrep not installed: apt-get install sngrep")
    return path


def _tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        import os

        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but tshark is missing (apt-get install tshark)")
        pytest.skip("tshark not installed: apt-get install tshark")
    return path


@pytest.mark.sipp
@pytest.mark.slow
def test_sngrep_listening_for_hep_shows_the_call_with_every_leg(lab: Lab) -> None:
    sngrep, tshark = _sngrep(), _tshark()
    port = free_port()
    pcap = lab.dir / "sngrep.pcap"
    settings_file = lab.dir / "sngreprc"
    settings_file.write_text("set eep.listen.pass s3cret\n")  # sngrep checks our auth key
    viewer = subprocess.Popen(
        [sngrep, "-f", str(settings_file), "-L", f"udp:127.0.0.1:{port}", "-N", "-O", str(pcap)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        assert viewer.poll() is None, viewer.communicate()
        with _routed_call(lab, _hep_table(f"127.0.0.1:{port}")) as call:
            sent = call.proxy.counters()["hep_sent"]
        time.sleep(1.0)
    finally:
        viewer.send_signal(signal.SIGTERM)
        out, err = viewer.communicate(timeout=10)
    # sngrep's own summary: one dialog (the legs share the Call-ID).
    assert out.rstrip().endswith("Dialog count: 1"), (out[-300:], err)
    ports = {lab.proxy_port, lab.clearip_port, lab.a_port, lab.switch_port}
    decode_as = [arg for p in sorted(ports) for arg in ("-d", f"udp.port=={p},sip")]
    result = subprocess.run(
        [tshark, "-r", str(pcap), *decode_as, "-Y", "sip", "-T", "fields",
         "-e", "ip.src", "-e", "udp.srcport", "-e", "ip.dst", "-e", "udp.dstport",
         "-e", "sip.Method", "-e", "sip.Status-Code", "-e", "sip.CSeq.method"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == sent, result.stdout  # every copy the proxy sent is in sngrep's file
    seen: dict[str, set[str]] = {"switch": set(), "clearip": set(), "provider": set()}
    for src, sport, dst, dport, method, status, _ in rows:
        far = {(src, int(sport)), (dst, int(dport))}
        if ("127.0.0.1", lab.switch_port) in far:
            seen["switch"].add(method or status)
        elif ("127.0.0.1", lab.clearip_port) in far:
            seen["clearip"].add(method or status)
        elif (PROVIDER_A_IP, lab.a_port) in far:
            seen["provider"].add(method or status)
    assert {"INVITE", "200", "BYE"} <= seen["switch"], seen
    assert {"INVITE", "302", "ACK"} <= seen["clearip"], seen
    assert {"INVITE", "200", "BYE"} <= seen["provider"], seen


@pytest.mark.sipp
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_calls_complete_when_the_collector_is_down(lab: Lab, transport: str) -> None:
    nobody = free_port(transport)  # nothing listens there
    with _routed_call(lab, _hep_table(f"127.0.0.1:{nobody}", transport)) as call:
        counters = call.proxy.counters()
    if transport == "tcp":  # refused: every copy dropped, none sent
        assert counters["hep_dropped"] > 0 and counters["hep_sent"] == 0, counters
    else:  # datagrams go out; the port-unreachable answers make later sends fail
        assert counters["hep_send_errors"] > 0, counters
    assert counters["call:switch:200:relayed"] == 1, counters


@pytest.mark.sipp
@pytest.mark.slow
def test_calls_complete_when_the_collector_never_reads(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TCP collector that accepts and never reads: once its socket is full (filled here
    first with big copies, as hours of traffic would), a call's copies are dropped, counted,
    and the calls go on as before."""
    monkeypatch.setattr(hep_export, "STALL_TIMEOUT", 120.0)  # no reconnect during the test
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])  # and never read

    threading.Thread(target=accept, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    big = _message(size=8000)
    state: dict[str, int] = {}

    def fill(daemon: Daemon) -> bool:
        assert daemon.hep is not None
        for _ in range(20):
            daemon.hep.offer("in", big, "udp", ("127.0.0.1", 1), ("127.0.0.2", 2))
        return daemon.hep.paused

    def stall(proxy: ThreadedProxy) -> None:
        wait_for(lambda: accepted, what="the exporter's connection")
        wait_for(lambda: proxy.call(fill), what="a full socket")
        state["dropped"] = proxy.counters()["hep_dropped"]

    calls = 40
    try:
        with _routed_call(
            lab,
            _hep_table(address, "tcp", "queue_limit = 20\n"),
            calls,
            # What is checked is that every call completes: the host's load (two cores shared
            # with other tests) must not turn into 503s from the overload guard.
            proxy_settings="overload_queue_delay = 0\n",
            before_calls=stall,
        ) as call:
            counters = call.proxy.counters()
            paused = call.proxy.call(lambda d: d.hep is not None and d.hep.paused)
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    assert counters["call:switch:200:relayed"] == calls, counters
    assert paused, "the collector's socket drained: the test did not test a slow collector"
    # Each call makes a dozen copies or more; at most 20 wait in the queue.
    assert counters["hep_dropped"] - state["dropped"] >= 10 * calls, counters


@pytest.mark.sipp
@pytest.mark.slow
def test_clearipctl_trace_hep_streams_to_a_collector(lab: Lab) -> None:
    with collector("udp") as stand_in:
        tracer: subprocess.Popen[str] | None = None
        contacts = [f"sip:{DIALLED}@{PROVIDER_A_IP}:{lab.a_port}"]
        with (
            sipp_uas(lab.dir, "clearip", clearip_scenario(302, contacts),
                     local=("127.0.0.1", lab.clearip_port), transport="t1"),
            sipp_uas(lab.dir, "a", uas_scenario(200), local=(PROVIDER_A_IP, lab.a_port)) as a,
            threaded_proxy(lab.config("")) as proxy,
        ):  # fmt: skip
            assert proxy.call(lambda d: d.endpoint.tracer) is None  # nobody traces: no cost
            tracer = subprocess.Popen(
                [sys.executable, "-m", "clearip.ctl.cli", "--socket",
                 str(lab.dir / "control.sock"), "trace", "--hep", stand_in.address,
                 "--hep-capture-id", "9", "--hep-password", "pw", "--seconds", "8"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            wait_for(lambda: proxy.call(lambda d: d.endpoint.tracer) is not None, what="trace")
            switch = start_sipp(
                lab.dir, "switch", uac_scenario(200), local=(SWITCH_IP, lab.switch_port),
                remote=("127.0.0.1", lab.proxy_port), service=DIALLED,
            )  # fmt: skip
            assert switch.wait(30) == 0, switch.messages[-3000:]
            assert a.wait(10) == 0
            out, err = tracer.communicate(timeout=30)
            assert tracer.returncode == 0, err
            wait_for(lambda: proxy.call(lambda d: d.endpoint.tracer) is None, what="untrace")
        packets = list(stand_in.packets)
    assert f"{len(packets)} messages sent as HEP to {stand_in.address}" in err
    assert out == ""
    call_ids = {p.call_id for p in packets}
    assert len(call_ids) == 1
    for packet in packets:
        assert (packet.capture_id, packet.password) == (9, b"pw")
        assert packet.correlation_id == packet.call_id.encode()
    switch_leg = _leg(packets, ("127.0.0.1", lab.switch_port), ("127.0.0.1", lab.proxy_port))
    assert _lines(switch_leg, ("127.0.0.1", lab.switch_port)) == _sipp_lines(switch, "sent")
    assert {p.protocol for p in packets if p.source[1] == lab.clearip_port} == {6}


def test_a_reload_turns_hep_on_and_off(tmp_path: Path) -> None:
    """[hep] applies without a restart; with it off and nobody tracing, no tracer runs."""
    port = free_port()
    config = write_config(tmp_path, port=port, upstream="sip:127.0.0.1:9;transport=tcp")
    options = (
        f"OPTIONS sip:{SWITCH_IP}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {SWITCH_IP}:{{sport}};"
        f"branch=z9hG4bK-{{n}}\r\nFrom: <sip:s@{SWITCH_IP}>;tag=1\r\nTo: <sip:p@{SWITCH_IP}>\r\n"
        "Call-ID: reload-{n}@test\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    with (
        collector("udp") as stand_in,
        threaded_proxy(config) as proxy,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as switch,
    ):
        switch.bind((SWITCH_IP, 0))
        switch.settimeout(5)
        sport = switch.getsockname()[1]
        assert proxy.call(lambda d: d.endpoint.tracer) is None
        proxy.call(lambda d: setattr(d, "config_path", config))  # as `clearip-proxy run` does
        config.write_text(config.read_text() + _hep_table(stand_in.address))
        report = proxy.call(lambda d: d.reload_config())
        assert {c["key"] for c in report["live"]} >= {"hep.address", "hep.password"}
        assert "s3cret" not in str(report)
        switch.sendto(options.format(sport=sport, n=1).encode(), ("127.0.0.1", port))
        answer = switch.recv(65535)
        assert answer.startswith(b"SIP/2.0 ")

        def ours(n: int) -> list[Packet]:
            return [p for p in stand_in.packets if p.correlation_id == f"reload-{n}@test".encode()]

        wait_for(lambda: len(ours(1)) == 2, what="both copies")
        request, response = ours(1)
        assert request.source == (SWITCH_IP, sport) and request.kind == "OPTIONS"
        assert response.destination == (SWITCH_IP, sport)
        assert response.payload == answer
        assert request.correlation_id == b"reload-1@test"
        config.write_text(config.read_text().replace(stand_in.address, ""))
        proxy.call(lambda d: d.reload_config())
        assert proxy.call(lambda d: (d.hep, d.endpoint.tracer)) == (None, None)
        switch.sendto(options.format(sport=sport, n=2).encode(), ("127.0.0.1", port))
        switch.recv(65535)
        time.sleep(0.3)
        assert ours(2) == []
