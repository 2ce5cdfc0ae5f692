"""The XDP edge filter in network namespaces: a trusted host, an untrusted host, the proxy.

Sockets created inside a namespace stay there, so the test process itself plays every host.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearip.bpf.loader import EdgeFilter
from clearip.relay.emergency import EmergencyNumbers
from clearip.relay.policy import SourcePolicy
from clearip.relay.trust import Role, TrustEntry, TrustList, parse_cidr, save_trust_file
from tests.netns import Topology, build, destroy, in_namespace

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.xdp, pytest.mark.slow]

IP_RECVTOS = 13
IPV6_RECVTCLASS = 66
INVITE = b"INVITE sip:12125550100@proxy SIP/2.0\r\nVia: SIP/2.0/UDP x;branch=z9hG4bK1\r\n\r\n"
EMERGENCY = b"INVITE sip:911@proxy;user=phone SIP/2.0\r\nVia: SIP/2.0/UDP x;branch=z9hG4bK2\r\n\r\n"


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    topology = build(["trusted", "untrusted"], f"x{time.monotonic_ns() % 100000}")
    try:
        yield topology
    finally:
        destroy(topology)


def trust_for(topo: Topology) -> list[TrustEntry]:
    host = topo.hosts["trusted"]
    return [
        TrustEntry(parse_cidr(f"{host.ipv4}/32"), Role.SWITCH),
        TrustEntry(parse_cidr(f"{host.ipv6}/128"), Role.SWITCH),
    ]


def start_filter(topo: Topology, mode: str, pins: str) -> EdgeFilter:
    with topo.inside(topo.proxy_ns):
        return EdgeFilter.start(
            interfaces=list(topo.proxy_ifs.values()),
            mode=mode,
            pin_dir=pins,
            trust=trust_for(topo),
            emergency=["911", "933"],
        )


def stop_filter(topo: Topology, edge: EdgeFilter) -> None:
    with topo.inside(topo.proxy_ns):
        edge.detach()


class Listener:
    """UDP 5060 (v4 and v6, with TOS / traffic class), TCP 5060 and UDP 53 in the proxy ns."""

    def __init__(self, topo: Topology) -> None:
        self.udp4 = topo.socket_in(topo.proxy_ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp4.bind(("0.0.0.0", 5060))
        self.udp4.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
        self.udp6 = topo.socket_in(topo.proxy_ns, socket.AF_INET6, socket.SOCK_DGRAM)
        self.udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.udp6.bind(("::", 5060))
        self.udp6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVTCLASS, 1)
        self.dns = topo.socket_in(topo.proxy_ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.dns.bind(("0.0.0.0", 53))
        self.tcp = topo.socket_in(topo.proxy_ns, socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", 5060))
        self.tcp.listen(16)
        for sock in (self.udp4, self.udp6, self.dns):
            sock.settimeout(0.3)

    def receive(self, sock: socket.socket) -> list[tuple[bytes, str, int]]:
        """Everything queued: (payload, source address, DSCP)."""
        out = []
        while True:
            try:
                data, ancdata, _, address = sock.recvmsg(4096, 64)
            except (TimeoutError, BlockingIOError):
                return out
            dscp = 0
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IP and kind == socket.IP_TOS:
                    dscp = value[0] >> 2
                if level == socket.IPPROTO_IPV6 and kind == 67:
                    dscp = int.from_bytes(value[:4], "little") >> 2
            out.append((data, address[0], dscp))

    def close(self) -> None:
        for sock in (self.udp4, self.udp6, self.dns, self.tcp):
            sock.close()


@pytest.fixture
def listener(topo: Topology) -> Iterator[Listener]:
    lst = Listener(topo)
    yield lst
    lst.close()


def send_udp(topo: Topology, host: str, payload: bytes, port: int = 5060, v6: bool = False) -> None:
    family = socket.AF_INET6 if v6 else socket.AF_INET
    with topo.socket_in(topo.hosts[host].ns, family, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, (topo.proxy_addrs[host][1 if v6 else 0], port))


def tcp_connects(topo: Topology, host: str) -> bool:
    with topo.socket_in(topo.hosts[host].ns, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect((topo.proxy_addrs[host][0], 5060))
        except OSError:
            return False
        return True


@pytest.mark.parametrize("mode", ["generic", "native"])
def test_untrusted_sip_dropped_trusted_and_non_sip_pass(
    topo: Topology, listener: Listener, mode: str
) -> None:
    edge = start_filter(topo, mode, f"/sys/fs/bpf/cip-test-{mode}")
    try:
        assert {s["mode"] for s in edge.status().values()} == {mode}
        send_udp(topo, "trusted", INVITE)
        send_udp(topo, "untrusted", INVITE)
        send_udp(topo, "trusted", INVITE, v6=True)
        send_udp(topo, "untrusted", INVITE, v6=True)
        send_udp(topo, "untrusted", b"dns query", port=53)
        time.sleep(0.2)
        v4 = listener.receive(listener.udp4)
        v6 = listener.receive(listener.udp6)
        assert [src for _, src, _ in v4] == [topo.hosts["trusted"].ipv4]
        assert [src for _, src, _ in v6] == [topo.hosts["trusted"].ipv6]
        assert [src for _, src, _ in listener.receive(listener.dns)] == [
            topo.hosts["untrusted"].ipv4
        ]
        assert tcp_connects(topo, "trusted")
        assert not tcp_connects(topo, "untrusted")
        counters = edge.counters()
        assert counters["dropped_untrusted"] >= 3
        assert counters["passed_trusted"] >= 3
        offenders = dict(edge.top_dropped())
        assert offenders[topo.hosts["untrusted"].ipv4] >= 2
        assert offenders[topo.hosts["untrusted"].ipv6] >= 1
    finally:
        stop_filter(topo, edge)


def test_emergency_invite_marked_ef_and_counted(topo: Topology, listener: Listener) -> None:
    edge = start_filter(topo, "generic", "/sys/fs/bpf/cip-test-ef")
    try:
        send_udp(topo, "trusted", EMERGENCY)
        send_udp(topo, "trusted", INVITE)
        send_udp(topo, "trusted", EMERGENCY.replace(b"sip:911@proxy", b"tel:+9-3-3"), v6=True)
        time.sleep(0.2)
        by_payload = {data: dscp for data, _, dscp in listener.receive(listener.udp4)}
        assert by_payload[EMERGENCY] == 46
        assert by_payload[INVITE] == 0
        assert [dscp for _, _, dscp in listener.receive(listener.udp6)] == [46]
        assert edge.counters()["emergency_marked"] == 2
    finally:
        stop_filter(topo, edge)


def test_vlan_truncated_garbage_and_fragments_are_counted(topo: Topology) -> None:
    from scapy.all import IP, UDP, Dot1Q, Ether, Raw, fragment, sendp

    edge = start_filter(topo, "generic", "/sys/fs/bpf/cip-test-odd")
    try:
        trusted, untrusted = topo.hosts["trusted"], topo.hosts["untrusted"]
        dst_t, dst_u = topo.proxy_addrs["trusted"][0], topo.proxy_addrs["untrusted"][0]
        sip = UDP(sport=5060, dport=5060) / Raw(INVITE)
        frames_u = [
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01")
            / Dot1Q(vlan=10)
            / IP(src=untrusted.ipv4, dst=dst_u)
            / sip,
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01", type=0x88A8)
            / Dot1Q(vlan=20)
            / Dot1Q(vlan=30)
            / IP(src=untrusted.ipv4, dst=dst_u)
            / sip,
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01")
            / Raw(b"\x08"),  # truncated Ethernet
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01", type=0x0800) / Raw(b"\x45\x00"),
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01")
            / IP(src=untrusted.ipv4, dst=dst_u, ihl=2)
            / sip,
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01")
            / IP(src=untrusted.ipv4, dst=dst_u, proto=17)
            / Raw(b"\x13"),
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01") / Raw(bytes(range(256)) * 3),
        ]
        big = IP(src=untrusted.ipv4, dst=dst_u) / UDP(sport=5060, dport=5060) / Raw(INVITE * 30)
        frames_u += [
            Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01") / f
            for f in fragment(big, fragsize=400)
        ]
        before = edge.counters()
        with topo.inside(untrusted.ns):
            sendp(frames_u, iface=untrusted.ifname, verbose=False)
        with topo.inside(trusted.ns):
            vlan_trusted = (
                Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01")
                / Dot1Q(vlan=10)
                / IP(src=trusted.ipv4, dst=dst_t)
                / sip
            )
            sendp([vlan_trusted], iface=trusted.ifname, verbose=False)
        time.sleep(0.3)
        after = edge.counters()
        fragments = len(frames_u) - 7
        # Two VLAN frames and every fragment from the untrusted host are dropped.
        assert after["dropped_untrusted"] - before["dropped_untrusted"] == 2 + fragments
        assert after["parse_giveup"] - before["parse_giveup"] >= 3
        assert after["passed_trusted"] - before["passed_trusted"] >= 1
        # Still working afterwards.
        lst = Listener(topo)
        try:
            send_udp(topo, "trusted", INVITE)
            time.sleep(0.1)
            assert len(lst.receive(lst.udp4)) == 1
        finally:
            lst.close()
    finally:
        stop_filter(topo, edge)


def test_restart_keeps_untrusted_dropped_throughout(topo: Topology, listener: Listener) -> None:
    pins = "/sys/fs/bpf/cip-test-restart"
    edge = start_filter(topo, "generic", pins)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        with topo.socket_in(topo.hosts["untrusted"].ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
            while not stop.is_set():
                s.sendto(INVITE, (topo.proxy_addrs["untrusted"][0], 5060))
                sent[0] += 1
                time.sleep(0.002)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        time.sleep(0.2)
        edge.close()  # the daemon goes away; the program stays attached
        time.sleep(0.3)
        edge = start_filter(topo, "generic", pins)  # the new daemon adopts the pinned maps
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    try:
        assert sent[0] > 100
        assert listener.receive(listener.udp4) == []
        assert edge.counters()["dropped_untrusted"] >= sent[0] * 0.9
    finally:
        stop_filter(topo, edge)


def test_clearipctl_changes_what_is_dropped_within_100ms(
    topo: Topology, listener: Listener, tmp_path: Path
) -> None:
    import asyncio

    from clearip.relay.control import ControlServer

    edge = start_filter(topo, "generic", "/sys/fs/bpf/cip-test-ctl")
    trust_file = tmp_path / "trust.toml"
    save_trust_file(trust_file, trust_for(topo))
    policy = SourcePolicy(TrustList(trust_for(topo)), trust_file, EmergencyNumbers())
    policy.attach_kernel(edge)
    socket_path = str(tmp_path / "control.sock")
    loop = asyncio.new_event_loop()
    server = ControlServer(socket_path, policy, lambda: {}, lambda: {})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    untrusted = topo.hosts["untrusted"].ipv4

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "clearip.ctl.cli", "--socket", socket_path, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    try:
        result = ctl("trust", "add", f"{untrusted}/32", "--role", "provider", "--note", "test")
        assert result.returncode == 0, result.stderr
        added = time.monotonic()
        send_udp(topo, "untrusted", INVITE)
        got = listener.receive(listener.udp4)
        assert got and time.monotonic() - added < 0.1 + 0.3  # 0.3 s is the receive timeout
        assert f"{untrusted}/32" in trust_file.read_text()
        result = ctl("trust", "remove", f"{untrusted}/32")
        assert result.returncode == 0, result.stderr
        send_udp(topo, "untrusted", INVITE)
        assert listener.receive(listener.udp4) == []
        listed = json.loads(ctl("trust", "list", "--json").stdout)
        assert [e["cidr"] for e in listed] == [str(e.network) for e in trust_for(topo)]
        bad = ctl("trust", "add", "10.0.0.1/8", "--role", "switch")
        assert bad.returncode == 2 and "host bits" in bad.stderr
        top = json.loads(ctl("top-dropped", "--json").stdout)
        assert top and top[0][0] == untrusted
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.close())
        stop_filter(topo, edge)


def test_daemon_with_filter_and_without(topo: Topology, tmp_path: Path) -> None:
    """The real daemon in the proxy namespace: the kernel drops untrusted SIP before the
    relay sees it; with the filter unavailable the relay refuses untrusted sources itself."""
    for interfaces, expect_filter in (
        (list(topo.proxy_ifs.values()), True),
        (["nonexistent0"], False),
    ):
        trust = tmp_path / "trust.toml"
        save_trust_file(trust, trust_for(topo))
        config = tmp_path / "proxy.toml"
        config.write_text(
            f'[proxy]\ntrust_file = "{trust}"\ncontrol_socket = "{tmp_path / "c.sock"}"\n'
            f'state_dir = "{tmp_path}"\n'
            '[[listen]]\ntransport = "udp"\naddress = "0.0.0.0"\nport = 5060\n'
            '[upstream.outbound]\nuri = "sip:127.0.0.1:9;transport=tcp"\n'
            f'[xdp]\ninterfaces = {json.dumps(interfaces)}\nmode = "generic"\n'
            f'pin_dir = "/sys/fs/bpf/cip-test-daemon"\n[metrics]\nport = 9477\n'
        )
        log = tmp_path / "daemon.log"
        process = subprocess.Popen(
            in_namespace(topo.proxy_ns, "clearip.relay.cli", "run", "--config", str(config)),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while b"clearip-proxy ready" not in log.read_bytes():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            answers = {}
            for host in ("trusted", "untrusted"):
                with topo.socket_in(topo.hosts[host].ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(1.0)
                    options = (
                        f"OPTIONS sip:p@{topo.proxy_addrs[host][0]} SIP/2.0\r\n"
                        f"Via: SIP/2.0/UDP {topo.hosts[host].ipv4}:5099;branch=z9hG4bK{host}\r\n"
                        f"From: <sip:a@b>;tag=1\r\nTo: <sip:p@q>\r\nCall-ID: {host}\r\n"
                        "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
                    ).encode()
                    s.sendto(options, (topo.proxy_addrs[host][0], 5060))
                    try:
                        answers[host] = s.recv(4000)[:12]
                    except TimeoutError:
                        answers[host] = b""
            assert answers["trusted"].startswith(b"SIP/2.0 ")
            assert answers["untrusted"] == b""
            stats = subprocess.run(
                [sys.executable, "-m", "clearip.ctl.cli", "--socket", str(tmp_path / "c.sock"),
                 "stats", "--json"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            data = json.loads(stats.stdout)
            with topo.socket_in(topo.proxy_ns, socket.AF_INET, socket.SOCK_STREAM) as http:
                http.settimeout(5)
                http.connect(("127.0.0.1", 9477))
                http.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                metrics = b""
                while chunk := http.recv(65536):
                    metrics += chunk
            kernel_line = b'clearip_xdp_packets_total{outcome="dropped_untrusted"}'
            assert (kernel_line in metrics) == expect_filter
            if expect_filter:
                assert data["kernel"]["counters"]["dropped_untrusted"] >= 1
                assert data["relay"].get("untrusted_dropped", 0) == 0  # never reached the relay
            else:
                assert data["kernel"] is None
                assert data["relay"]["untrusted_dropped"] == 1
                assert "kernel filter off" in log.read_text()
        finally:
            process.terminate()
            process.wait(10)
            subprocess.run(
                in_namespace(
                    topo.proxy_ns, "clearip.ctl.cli", "xdp", "detach", "--config", str(config)
                ),
                capture_output=True,
                timeout=30,
            )
