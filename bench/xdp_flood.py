"""Flood benchmark for the kernel edge filter (root): XDP vs nftables vs userspace vs nothing.

Run: ``.venv/bin/python -m bench.xdp_flood [SECONDS]`` (default 6 s per configuration, about a
minute in all; ``SENDER_CPUS=2`` floods from both cores instead of one).

An untrusted namespace floods 460-byte SIP INVITEs at the proxy namespace's UDP port 5060 with
trafgen (netsniff-ng) over a veth pair, while a trusted namespace sends a request every 10 ms
to a UDP echo on 5060 that stands in for the relay (the proxy daemon is not part of this
benchmark; the echo answers trusted sources only, as the relay would, or every source under
"none"). Configurations, in one run:

- none:        no filter; the stand-in answers everything (an unprotected relay)
- userspace:   the stand-in reads everything and drops untrusted sources (the relay's own check)
- nftables:    a netdev ingress rule drops untrusted sources to 5060 (the earliest nft hook)
- xdp-generic: this project's filter, generic (skb) mode
- xdp-native:  the same in native (driver) mode on the veth

For each it prints the flood packets sent and dropped per second (by the filter; userspace: by
the stand-in, plus what the socket buffer overflowed), the CPU the whole host spent
(/proc/stat: user+system+softirq over both cores) and per flood packet, the softirq share,
and the trusted requests completed and failed with their median and worst latency. Traffic
stays inside namespaces this script creates; everything is removed at the end. On a veth pair
the receive side runs in the sender's softirq context (generic XDP, nftables) or in the
peer's NAPI poll (native XDP), so "per flood packet" includes the sender's own cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from clearip.bpf.loader import EdgeFilter, detach_pinned
from clearip.relay.trust import Role, TrustEntry, parse_cidr
from tests.netns import Topology, build, destroy

CONFIGS = ("none", "userspace", "nftables", "xdp-generic", "xdp-native")
SENDER_CPUS = int(os.environ.get("SENDER_CPUS", "1"))

ECHO = r"""
import json, socket, sys, time
mode, trusted, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("0.0.0.0", 5060))
s.settimeout(0.2)
received = dropped = answered = 0
end = time.monotonic() + seconds
start_cpu = time.process_time()
print("ready", flush=True)
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(2048)
    except TimeoutError:
        continue
    received += 1
    if mode != "none" and addr[0] != trusted:
        dropped += 1
        continue
    try:
        s.sendto(data[:64] if addr[0] != trusted else data, addr)
    except OSError:
        pass
    answered += 1
print(json.dumps({"received": received, "dropped": dropped, "answered": answered,
                  "cpu": time.process_time() - start_cpu}), flush=True)
"""


@dataclass
class Result:
    config: str
    seconds: float = 0.0
    sent: int = 0
    dropped: int = 0
    overflowed: int = 0
    busy_s: float = 0.0
    softirq_s: float = 0.0
    stand_in_cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def sent_pps(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def dropped_pps(self) -> float:
        return self.dropped / self.seconds if self.seconds else 0.0

    @property
    def us_per_packet(self) -> float:
        return self.busy_s * 1e6 / self.sent if self.sent else float("nan")


def _cpu() -> tuple[int, int]:
    """(busy, softirq) jiffies over all CPUs: user+nice+system+irq+softirq+steal, softirq."""
    fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, softirq


def _mac(topo: Topology, ifname: str) -> str:
    from pyroute2 import NetNS

    with NetNS(topo.proxy_ns) as ns:
        link = ns.link("get", index=ns.link_lookup(ifname=ifname)[0])[0]
        return str(link.get_attr("IFLA_ADDRESS"))


def _trafgen_config(topo: Topology, directory: Path) -> Path:
    host = topo.hosts["untrusted"]
    dst_mac = _mac(topo, topo.proxy_ifs["untrusted"])
    conf = directory / "flood.cfg"
    conf.write_text(
        "{\n"
        f"  eth(da={dst_mac}, sa=02:00:00:00:00:02),\n"
        f"  ipv4(saddr={host.ipv4}, daddr={topo.proxy_addrs['untrusted'][0]}, ttl=64),\n"
        "  udp(sp=dinc(10000, 60000), dp=5060),\n"
        '  "INVITE sip:12125550100@proxy SIP/2.0\\r\\n",\n'
        "  fill(0x41, 380)\n"
        "}\n"
    )
    return conf


def _nsenter(ns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


def _tx_packets(topo: Topology) -> int:
    """Frames the untrusted host's veth has sent (what the flood put on the wire)."""
    from pyroute2 import NetNS

    host = topo.hosts["untrusted"]
    with NetNS(host.ns) as ns:
        link = ns.link("get", index=ns.link_lookup(ifname=host.ifname)[0])[0]
        return int(link.get_attr("IFLA_STATS64")["tx_packets"])


def program_cost() -> dict[str, int]:
    """The filter program's own cost per frame (BPF_PROG_TEST_RUN, 200k runs each)."""
    from scapy.all import IP, UDP, Ether, Raw

    pins = f"/sys/fs/bpf/cip-bench-cost-{os.getpid()}"
    edge = EdgeFilter.start(
        interfaces=[],
        pin_dir=pins,
        trust=[TrustEntry(parse_cidr("10.0.0.1/32"), Role.SWITCH)],
        emergency=["911"],
    )
    try:
        frames = {
            "untrusted INVITE (drop)": ("10.0.0.2", b"INVITE sip:12125550100@p SIP/2.0\r\n", 5060),
            "trusted INVITE (pass)": ("10.0.0.1", b"INVITE sip:12125550100@p SIP/2.0\r\n", 5060),
            "trusted 911 INVITE (mark EF)": ("10.0.0.1", b"INVITE sip:911@p SIP/2.0\r\n", 5060),
            "DNS (pass, not SIP)": ("10.0.0.2", b"\x12\x34" + b"\x00" * 30, 53),
        }
        return {
            name: edge.run_cost_ns(
                bytes(Ether() / IP(src=src, dst="10.0.0.9") / UDP(dport=port) / Raw(payload)),
                200_000,
            )
            for name, (src, payload, port) in frames.items()
        }
    finally:
        edge.detach()


def _udp_overflows(topo: Topology) -> int:
    """UDP datagrams the proxy namespace dropped for a full socket buffer."""
    text = subprocess.run(
        _nsenter(topo.proxy_ns, "cat", "/proc/net/snmp"), capture_output=True, text=True
    ).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1], strict=True))["RcvbufErrors"]) if rows else 0


def _trusted_calls(topo: Topology, seconds: float, result: Result) -> None:
    host = topo.hosts["trusted"]
    with topo.socket_in(host.ns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            payload = f"OPTIONS {time.monotonic_ns()}".encode()
            started = time.monotonic()
            sock.sendto(payload, (topo.proxy_addrs["trusted"][0], 5060))
            try:
                while sock.recv(2048) != payload:
                    pass
                result.latencies.append(time.monotonic() - started)
            except TimeoutError:
                result.failed += 1
            time.sleep(0.01)


def _flood(topo: Topology, directory: Path, seconds: float) -> str:
    """trafgen for ``seconds``; its whole process group (one process per CPU) is stopped with
    SIGINT, and killed if it lingers. Returns its output."""
    sender = subprocess.Popen(
        _nsenter(
            topo.hosts["untrusted"].ns,
            "trafgen", "--dev", topo.hosts["untrusted"].ifname,
            "--conf", str(_trafgen_config(topo, directory)),
            "--cpus", str(SENDER_CPUS),
        ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = sender.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(sender.pid, signal.SIGINT)
        try:
            out, _ = sender.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(sender.pid, signal.SIGKILL)
            out, _ = sender.communicate()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sender.pid, signal.SIGKILL)  # a child that outlived its parent
    return out


def _nft_dropped(topo: Topology, table: str) -> int:
    out = subprocess.run(
        _nsenter(topo.proxy_ns, "nft", "-j", "list", "table", "netdev", table),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for item in json.loads(out.stdout)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    return 0


def run_one(topo: Topology, name: str, seconds: float, directory: Path) -> Result:
    result = Result(name)
    trusted_ip = topo.hosts["trusted"].ipv4
    edge = None
    nft_table = "cipbench"
    pins = f"/sys/fs/bpf/cip-bench-{os.getpid()}"
    if name.startswith("xdp"):
        with topo.inside(topo.proxy_ns):
            edge = EdgeFilter.start(
                interfaces=list(topo.proxy_ifs.values()),
                mode=name.split("-")[1],
                pin_dir=pins,
                trust=[TrustEntry(parse_cidr(f"{trusted_ip}/32"), Role.SWITCH)],
            )
    elif name == "nftables":
        ifname = topo.proxy_ifs["untrusted"]
        rules = (
            f"table netdev {nft_table} {{\n"
            f"  chain ingress {{ type filter hook ingress device {ifname} priority -500;\n"
            f"    ip saddr != {trusted_ip} udp dport 5060 counter drop\n  }}\n}}\n"
        )
        subprocess.run(_nsenter(topo.proxy_ns, "nft", "-f", "-"), input=rules.encode(), check=True)
    echo = subprocess.Popen(
        _nsenter(topo.proxy_ns, sys.executable, "-c", ECHO, name, trusted_ip, str(seconds + 1.5)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None
        echo.stdout.readline()
        caller = threading.Thread(target=_trusted_calls, args=(topo, seconds, result))
        before = edge.counters()["dropped_untrusted"] if edge else 0
        overflow0 = _udp_overflows(topo)
        busy0, soft0 = _cpu()
        started = time.monotonic()
        caller.start()
        tx0 = _tx_packets(topo)
        _flood(topo, directory, seconds)
        result.sent = _tx_packets(topo) - tx0
        result.seconds = time.monotonic() - started
        busy1, soft1 = _cpu()
        caller.join()
        tick = os.sysconf("SC_CLK_TCK")
        result.busy_s = (busy1 - busy0) / tick
        result.softirq_s = (soft1 - soft0) / tick
        result.overflowed = _udp_overflows(topo) - overflow0
        report = json.loads(echo.communicate(timeout=30)[0].strip().splitlines()[-1])
        result.stand_in_cpu_s = float(report["cpu"])
        if edge is not None:
            result.dropped = edge.counters()["dropped_untrusted"] - before
        elif name == "nftables":
            result.dropped = _nft_dropped(topo, nft_table)
        else:
            result.dropped = int(report["dropped"])
    finally:
        if echo.poll() is None:
            echo.kill()
        if edge is not None:
            with topo.inside(topo.proxy_ns):
                edge.detach()
                detach_pinned(pins, list(topo.proxy_ifs.values()))
        elif name == "nftables":
            subprocess.run(
                _nsenter(topo.proxy_ns, "nft", "delete", "table", "netdev", nft_table),
                check=False,
            )
    return result


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def report(rows: list[Result], seconds: float) -> None:
    print(
        f"XDP flood benchmark: {seconds:.0f} s per configuration; trafgen on {SENDER_CPUS} "
        f"CPU(s) floods SIP INVITEs from an untrusted ns over a veth pair; a trusted request\n"
        f"every 10 ms to a UDP echo standing in for the relay; {os.cpu_count()} cores "
        f"({os.uname().release})"
    )
    print(
        f"{'config':12} {'sent/s':>11} {'dropped/s':>11} {'overflow/s':>10} {'CPU s':>6} "
        f"{'softirq':>7} {'us/pkt':>7} {'echo CPU':>8} {'trusted ok':>10} {'failed':>6} "
        f"{'p50 ms':>6} {'max ms':>7}"
    )
    for r in rows:
        print(
            f"{r.config:12} {r.sent_pps:11,.0f} {r.dropped_pps:11,.0f} "
            f"{r.overflowed / r.seconds:10,.0f} {r.busy_s:6.2f} {r.softirq_s:7.2f} "
            f"{r.us_per_packet:7.3f} {r.stand_in_cpu_s:8.2f} {len(r.latencies):10d} "
            f"{r.failed:6d} {_ms(r.latencies, 0.5):>6} {_ms(r.latencies, 1.0):>7}"
        )
    by = {r.config: r for r in rows}
    best = max((by["xdp-generic"], by["xdp-native"]), key=lambda r: r.dropped_pps)
    for other in ("nftables", "userspace"):
        o = by[other]
        pps_ratio = best.dropped_pps / max(o.dropped_pps, 1)
        print(
            f"ratio {best.config} / {other}: dropped/s x{pps_ratio:.2f}"
            f", CPU per flood packet x{best.us_per_packet / o.us_per_packet:.2f}"
        )
    generic, native = by["xdp-generic"], by["xdp-native"]
    print(
        f"veth: native / generic dropped/s x{native.dropped_pps / max(generic.dropped_pps, 1):.2f}"
        f", CPU per packet x{native.us_per_packet / generic.us_per_packet:.2f}"
    )
    print(
        "note: the proxy daemon is not running here: the trusted UDP echo stands in for it; "
        "dropped/s is bounded by what the sender can put on the veth"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.xdp_flood",
        description="Flood the proxy's SIP port from a namespace: XDP vs nftables vs userspace "
        "vs nothing (root; about a minute).",
    )
    parser.add_argument(
        "seconds", nargs="?", type=float, default=6.0, help="per configuration (1-20, default 6)"
    )
    seconds = parser.parse_args(argv).seconds
    if os.geteuid() != 0:
        print("bench.xdp_flood needs root (namespaces, XDP, nftables)", file=sys.stderr)
        return 2
    if not 1 <= seconds <= 20:
        print("SECONDS must be between 1 and 20 (the whole run stays under 2 minutes)")
        return 2
    for tool in ("trafgen", "nft", "nsenter", "timeout"):
        if shutil.which(tool) is None:
            print(
                f"{tool} missing: apt-get install netsniff-ng nftables util-linux", file=sys.stderr
            )
            return 2
    topo = build(["trusted", "untrusted"])
    directory = Path(tempfile.mkdtemp(prefix="xdp-bench-"))
    rows = []
    try:
        for name in CONFIGS:
            rows.append(run_one(topo, name, seconds, directory))
    finally:
        destroy(topo)
        shutil.rmtree(directory, ignore_errors=True)
    report(rows, seconds)
    print("XDP program cost per frame (BPF_PROG_TEST_RUN, kernel-measured):")
    for name, ns in program_cost().items():
        print(f"  {name:30} {ns:4d} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
