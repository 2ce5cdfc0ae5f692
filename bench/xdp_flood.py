"""Flood benchmark for the kernel edge filter (root): this XDP filter vs xdp-tools' xdp-filter
vs nftables vs userspace vs nothing, with a fixed and a random source.

Run: ``.venv/bin/python -m bench.xdp_flood [SECONDS] [--runs 3] [--json FILE]`` (default 4 s
per configuration and source, 3 alternating runs, the median of each figure: about 5 minutes;
``--help`` lists the rest).

An untrusted namespace floods 460-byte SIP INVITEs at the proxy namespace's UDP port 5060 with
trafgen (netsniff-ng) over a veth pair, from its own address ("fixed") or from a new random
IPv4 address on every packet ("random": trafgen's drnd(), checksums recomputed, a spoofed
flood), while a trusted namespace sends a request every 10 ms to a UDP echo on 5060 that stands
in for the relay (the proxy daemon is not part of this benchmark; the echo answers trusted
sources only, as the relay would, or every source under "none"). Configurations, each with
both sources, in one run:

- none:        no filter; the stand-in answers everything (an unprotected relay)
- userspace:   the stand-in reads everything and drops untrusted sources (the relay's own check)
- nftables:    a netdev ingress rule drops untrusted sources to 5060 (the earliest nft hook)
- xdp-filter:  xdp-tools' reference XDP filter, native mode, default-deny with the trusted
               source allowed (``xdp-filter load --policy deny --features ipv4,ipv6``, then
               ``xdp-filter ip TRUSTED --mode src``); it drops non-SIP from untrusted sources
               too, which this filter lets through
- xdp-generic: this project's filter, generic (skb) mode
- xdp-native:  the same in native (driver) mode on the veth

For each it prints the flood packets sent and dropped per second (by the filter; userspace: by
the stand-in, plus what the socket buffer overflowed), the CPU the packets cost (trafgen's own,
from its rusage; softirq time over all CPUs, where the veth's receive side and every filter
here run; the stand-in's) per flood packet sent and per packet dropped, softirq alone per
packet dropped, and the trusted requests completed and failed with their median and worst
latency. The machine may be running other work: the CPU figures leave out other processes,
but not their softirq time. Then the programs' own cost per packet from BPF_PROG_TEST_RUN
(``bench.xdp_cost``). Traffic stays inside namespaces this script creates; everything is
removed at the end. On a veth pair the receive side runs in softirq on the sender's CPU
(generic XDP, nftables) or in the peer's NAPI poll (native XDP); "per packet" includes the
sender's own cost, which is the same for every configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import xdp_cost
from clearip.bpf.edge_filter import EdgeFilter
from clearip.bpf.pins import detach_pinned
from clearip.relay.policy.trust import Role, TrustEntry, parse_cidr
from lab.netns import Topology, build, destroy

CONFIGS = ("none", "userspace", "nftables", "xdp-filter", "xdp-generic", "xdp-native")
SOURCES = ("fixed", "random")
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
    source: str = "fixed"
    seconds: float = 0.0
    sent: int = 0
    dropped: int = 0
    overflowed: int = 0
    sender_cpu_s: float = 0.0  # trafgen (user + system), from its rusage
    softirq_s: float = 0.0  # softirq time, all CPUs (the receive side of the veth)
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
        return self.path_cpu_s * 1e6 / self.sent if self.sent else float("nan")

    @property
    def us_per_drop(self) -> float:
        return self.path_cpu_s * 1e6 / self.dropped if self.dropped else float("nan")

    @property
    def softirq_us_per_drop(self) -> float:
        return self.softirq_s * 1e6 / self.dropped if self.dropped else float("nan")

    @property
    def path_cpu_s(self) -> float:
        """The packets' CPU: sending them, receiving (and filtering) them, the stand-in."""
        return self.sender_cpu_s + self.softirq_s + self.stand_in_cpu_s


@dataclass
class Summary:
    """One configuration and source over several runs: the median of each figure."""

    config: str
    source: str
    runs: int
    sent_pps: float
    dropped_pps: float
    overflow_pps: float
    sender_cpu_s: float
    softirq_s: float
    us_per_packet: float
    us_per_drop: float
    softirq_us_per_drop: float
    stand_in_cpu_s: float
    trusted_ok: int
    failed: int
    latencies: list[float]

    @classmethod
    def of(cls, results: list[Result]) -> Summary:
        def median(values: list[float]) -> float:
            finite = [v for v in values if not math.isnan(v)]  # NaN: nothing dropped
            return float(statistics.median(finite)) if finite else float("nan")

        return cls(
            config=results[0].config,
            source=results[0].source,
            runs=len(results),
            sent_pps=median([r.sent_pps for r in results]),
            dropped_pps=median([r.dropped_pps for r in results]),
            overflow_pps=median([r.overflowed / r.seconds for r in results]),
            sender_cpu_s=median([r.sender_cpu_s for r in results]),
            softirq_s=median([r.softirq_s for r in results]),
            us_per_packet=median([r.us_per_packet for r in results]),
            us_per_drop=median([r.us_per_drop for r in results]),
            softirq_us_per_drop=median([r.softirq_us_per_drop for r in results]),
            stand_in_cpu_s=median([r.stand_in_cpu_s for r in results]),
            trusted_ok=sum(len(r.latencies) for r in results),
            failed=sum(r.failed for r in results),
            latencies=[x for r in results for x in r.latencies],
        )

    def as_dict(self) -> dict[str, object]:
        return {
            key: (round(value, 3) if isinstance(value, float) else value)
            for key, value in vars(self).items()
            if key != "latencies"
        }


def _softirq() -> float:
    """Softirq seconds over all CPUs (/proc/stat). The veth's receive side (generic and native
    XDP, nftables' ingress hook, the UDP stack) runs there; other work on the host adds a
    little too."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[7]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mac(topo: Topology, ifname: str) -> str:
    from pyroute2 import NetNS

    with NetNS(topo.proxy_ns) as ns:
        link = ns.link("get", index=ns.link_lookup(ifname=ifname)[0])[0]
        return str(link.get_attr("IFLA_ADDRESS"))


def _trafgen_config(topo: Topology, directory: Path, source: str) -> Path:
    host = topo.hosts["untrusted"]
    dst_mac = _mac(topo, topo.proxy_ifs["untrusted"])
    conf = directory / f"flood-{source}.cfg"
    saddr = "drnd()" if source == "random" else host.ipv4  # random: a new one per packet
    conf.write_text(
        "{\n"
        f"  eth(da={dst_mac}, sa=02:00:00:00:00:02),\n"
        f"  ipv4(saddr={saddr}, daddr={topo.proxy_addrs['untrusted'][0]}, ttl=64),\n"
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


def _flood(topo: Topology, directory: Path, seconds: float, source: str) -> str:
    """trafgen for ``seconds``; its whole process group (one process per CPU) is stopped with
    SIGINT, and killed if it lingers. Returns its output."""
    sender = subprocess.Popen(
        _nsenter(
            topo.hosts["untrusted"].ns,
            "trafgen", "--dev", topo.hosts["untrusted"].ifname,
            "--conf", str(_trafgen_config(topo, directory, source)),
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


def _xdp_filter(topo: Topology, *argv: str) -> str:
    done = subprocess.run(
        _nsenter(topo.proxy_ns, "xdp-filter", *argv), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"xdp-filter {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _xdp_filter_dropped(topo: Topology) -> int:
    """XDP_DROP packets in xdp-filter's aggregate statistics."""
    match = re.search(r"XDP_DROP\s+(\d+) pkts", _xdp_filter(topo, "status"))
    return int(match.group(1)) if match else 0


def run_one(topo: Topology, name: str, source: str, seconds: float, directory: Path) -> Result:
    result = Result(name, source)
    trusted_ip = topo.hosts["trusted"].ipv4
    edge = None
    nft_table = "cipbench"
    pins = f"/sys/fs/bpf/cip-bench-{os.getpid()}"
    if name in ("xdp-generic", "xdp-native"):
        with topo.inside(topo.proxy_ns):
            edge = EdgeFilter.start(
                interfaces=list(topo.proxy_ifs.values()),
                mode=name.split("-")[1],
                pin_dir=pins,
                trust=[TrustEntry(parse_cidr(f"{trusted_ip}/32"), Role.SWITCH)],
            )
    elif name == "xdp-filter":
        for ifname in topo.proxy_ifs.values():
            _xdp_filter(topo, "load", "--policy", "deny", "--features", "ipv4,ipv6",
                        "--mode", "native", ifname)  # fmt: skip
        _xdp_filter(topo, "ip", trusted_ip, "--mode", "src")
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
        if name == "xdp-filter":
            before = _xdp_filter_dropped(topo)
        overflow0 = _udp_overflows(topo)
        soft0, children0 = _softirq(), _children_cpu()
        started = time.monotonic()
        caller.start()
        tx0 = _tx_packets(topo)
        _flood(topo, directory, seconds, source)  # trafgen is reaped inside: its rusage counts
        result.sent = _tx_packets(topo) - tx0
        result.seconds = time.monotonic() - started
        result.softirq_s = _softirq() - soft0
        result.sender_cpu_s = _children_cpu() - children0
        caller.join()
        result.overflowed = _udp_overflows(topo) - overflow0
        report = json.loads(echo.communicate(timeout=30)[0].strip().splitlines()[-1])
        result.stand_in_cpu_s = float(report["cpu"])
        if edge is not None:
            result.dropped = edge.counters()["dropped_untrusted"] - before
        elif name == "xdp-filter":
            result.dropped = _xdp_filter_dropped(topo) - before
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
        elif name == "xdp-filter":
            for ifname in topo.proxy_ifs.values():
                with contextlib.suppress(RuntimeError):
                    _xdp_filter(topo, "unload", ifname)
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


def report(rows: list[Summary], seconds: float) -> list[str]:
    runs = max((r.runs for r in rows), default=0)
    lines = [
        f"XDP flood benchmark: median of {runs} alternating runs of {seconds:.0f} s per "
        f"configuration and source; trafgen on {SENDER_CPUS} CPU(s) floods 460-byte SIP INVITEs "
        "from an untrusted ns over a veth pair (fixed: its own address; random: a new random "
        "source per packet); a trusted request every 10 ms to a UDP echo standing in for the "
        f"relay; {os.cpu_count()} cores ({os.uname().release}); CPU: the sender's, softirq "
        "(all CPUs) and the stand-in's, per packet sent and per packet dropped",
        f"{'config':12} {'source':6} {'sent/s':>10} {'dropped/s':>10} {'overflow/s':>10} "
        f"{'sender s':>8} {'softirq s':>9} {'echo s':>6} {'us/pkt':>7} {'us/drop':>7} "
        f"{'sirq us/drop':>12} {'trusted ok':>10} {'failed':>6} {'p50 ms':>6} {'max ms':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r.config:12} {r.source:6} {r.sent_pps:10,.0f} {r.dropped_pps:10,.0f} "
            f"{r.overflow_pps:10,.0f} {r.sender_cpu_s:8.2f} {r.softirq_s:9.2f} "
            f"{r.stand_in_cpu_s:6.2f} {r.us_per_packet:7.3f} {r.us_per_drop:7.3f} "
            f"{r.softirq_us_per_drop:12.3f} {r.trusted_ok:10d} {r.failed:6d} "
            f"{_ms(r.latencies, 0.5):>6} {_ms(r.latencies, 1.0):>7}"
        )
    by = {(r.config, r.source): r for r in rows}
    for source in SOURCES:
        for ours in ("xdp-generic", "xdp-native"):
            mine = by.get((ours, source))
            if mine is None:
                continue
            for other in ("xdp-filter", "nftables", "userspace"):
                o = by.get((other, source))
                if o is None or not o.dropped_pps:
                    continue
                lines.append(
                    f"{source} source, {ours} / {other}: dropped/s "
                    f"x{mine.dropped_pps / o.dropped_pps:.2f}, CPU per dropped packet "
                    f"x{mine.us_per_drop / o.us_per_drop:.2f} (softirq "
                    f"x{mine.softirq_us_per_drop / o.softirq_us_per_drop:.2f})"
                )
    lines.append(
        "note: the proxy daemon is not running here: the trusted UDP echo stands in for it; "
        "dropped/s is bounded by what the sender can put on the veth"
    )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.xdp_flood",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
    )
    parser.add_argument(
        "seconds", nargs="?", type=float, default=4.0, help="per configuration and source (4)"
    )
    parser.add_argument(
        "--sender-cpus", type=int, default=SENDER_CPUS, help="trafgen CPUs (1; env SENDER_CPUS)"
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma list (default {','.join(CONFIGS)})"
    )
    parser.add_argument("--sources", default=",".join(SOURCES), help="fixed,random (default)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs (median; 3)")
    parser.add_argument("--cost-rounds", type=int, default=7, help="bench.xdp_cost rounds (7)")
    parser.add_argument(
        "--cost-repeat", type=int, default=200_000, help="bench.xdp_cost runs per figure"
    )
    parser.add_argument("--no-cost", action="store_true", help="skip the test-run costs")
    parser.add_argument("--json", metavar="FILE", help="write the rows and costs as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    global SENDER_CPUS
    args = build_parser().parse_args(argv)
    seconds = args.seconds
    SENDER_CPUS = args.sender_cpus
    configs = [c for c in args.configs.split(",") if c]
    sources = [s for s in args.sources.split(",") if s]
    unknown = sorted(set(configs) - set(CONFIGS)) + sorted(set(sources) - set(SOURCES))
    if unknown:
        print(f"unknown configuration or source: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench.xdp_flood needs root (namespaces, XDP, nftables)", file=sys.stderr)
        return 2
    if not 1 <= seconds <= 20:
        print("SECONDS must be between 1 and 20 (the whole run stays within a few minutes)")
        return 2
    tools = {"trafgen": "netsniff-ng", "nft": "nftables", "nsenter": "util-linux"}
    if "xdp-filter" in configs:
        tools["xdp-filter"] = "xdp-tools"
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            print(f"{tool} missing: apt-get install {package}", file=sys.stderr)
            return 2
    topo = build(["trusted", "untrusted"])
    directory = Path(tempfile.mkdtemp(prefix="xdp-bench-"))
    results: dict[tuple[str, str], list[Result]] = {}
    combos = [(name, source) for source in sources for name in configs]
    try:
        for run in range(args.runs):
            shift = run % len(combos)  # a different order each run
            for name, source in combos[shift:] + combos[:shift]:
                result = run_one(topo, name, source, seconds, directory)
                results.setdefault((name, source), []).append(result)
    finally:
        destroy(topo)
        shutil.rmtree(directory, ignore_errors=True)
    rows = [Summary.of(results[combo]) for combo in combos]
    print("\n".join(report(rows, seconds)))
    costs: dict[str, dict[str, float]] = {}
    if not args.no_cost:
        programs = xdp_cost.run(args.cost_rounds, args.cost_repeat, [])
        print("\n".join(xdp_cost.report(programs, args.cost_rounds, args.cost_repeat)))
        costs = xdp_cost.as_json(programs)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": [r.as_dict() for r in rows], "cost_ns": costs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
