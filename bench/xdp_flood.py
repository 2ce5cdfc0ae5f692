"""Flood benchmark for the kernel edge filter (root): XDP vs nftables vs userspace vs nothing.

Run: ``.venv/bin/python -m bench.xdp_flood [SECONDS]`` (default 5 s per configuration;
``SENDER_CPUS=1`` leaves a core free for the receiving side).

An untrusted namespace floods SIP-sized UDP datagrams at the proxy namespace's port 5060 with
trafgen (netsniff-ng) while a trusted namespace sends a request every 10 ms to a UDP echo
service on 5060 that stands in for the relay (it answers trusted sources only, as the relay
would). For each configuration it prints the flood packets dropped per second, the CPU the
proxy host spent (all CPU time minus the sender's own), and the trusted requests completed and
failed. Traffic stays inside namespaces this script creates; everything is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from clearip.bpf.loader import EdgeFilter
from clearip.relay.trust import Role, TrustEntry, parse_cidr
from tests.netns import Topology, build, destroy

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
    if addr[0] != trusted:
        dropped += 1
        continue
    s.sendto(data, addr)
    answered += 1
print(json.dumps({"received": received, "dropped": dropped, "answered": answered,
                  "cpu": time.process_time() - start_cpu}), flush=True)
"""


SENDER_CPUS = int(os.environ.get("SENDER_CPUS", "2"))


def _cpu_jiffies() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    idle = int(fields[3]) + int(fields[4])
    return sum(int(f) for f in fields[:8]) - idle


def _proc_cpu(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(stat[11]) + int(stat[12])


def _tree_cpu(pid: int) -> int:
    """CPU jiffies of a process and its children (timeout -> trafgen)."""
    total = _proc_cpu(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        for child in children.read_text().split():
            total += _tree_cpu(int(child))
    except OSError:
        pass
    return total


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


def _trusted_calls(topo: Topology, seconds: float, result: dict[str, int]) -> None:
    host = topo.hosts["trusted"]
    with topo.socket_in(host.ns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            payload = f"OPTIONS {time.monotonic_ns()}".encode()
            sock.sendto(payload, (topo.proxy_addrs["trusted"][0], 5060))
            try:
                while sock.recv(2048) != payload:
                    pass
                result["completed"] += 1
            except TimeoutError:
                result["failed"] += 1
            time.sleep(0.01)


def run_one(topo: Topology, name: str, seconds: float, directory: Path) -> dict[str, object]:
    trusted_ip = topo.hosts["trusted"].ipv4
    edge = None
    nft_table = None
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
        nft_table = "cipbench"
        ifname = topo.proxy_ifs["untrusted"]
        rules = (
            f"table netdev {nft_table} {{\n"
            f"  chain ingress {{ type filter hook ingress device {ifname} priority -500;\n"
            f"    ip saddr != {trusted_ip} udp dport 5060 counter drop\n  }}\n}}\n"
        )
        subprocess.run(_nsenter(topo.proxy_ns, "nft", "-f", "-"), input=rules.encode(), check=True)
    echo = subprocess.Popen(
        [*_nsenter(topo.proxy_ns, sys.executable, "-c", ECHO, name, trusted_ip, str(seconds + 1))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert echo.stdout is not None
    echo.stdout.readline()
    calls = {"completed": 0, "failed": 0}
    caller = threading.Thread(target=_trusted_calls, args=(topo, seconds, calls))
    before_counters = edge.counters() if edge else {}
    cpu0 = _cpu_jiffies()
    sender = subprocess.Popen(
        _nsenter(
            topo.hosts["untrusted"].ns,
            "timeout",
            str(seconds),
            "trafgen",
            "--dev",
            topo.hosts["untrusted"].ifname,
            "--conf",
            str(_trafgen_config(topo, directory)),
            "--cpus",
            str(SENDER_CPUS),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    caller.start()
    started = time.monotonic()
    sender_cpu = 0
    while sender.poll() is None:
        sender_cpu = max(sender_cpu, _tree_cpu(sender.pid))
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    cpu1 = _cpu_jiffies()
    caller.join()
    report = json.loads(echo.communicate(timeout=30)[0].strip().splitlines()[-1])
    tick = os.sysconf("SC_CLK_TCK")
    host_cpu = max(0.0, (cpu1 - cpu0 - sender_cpu) / tick)
    if edge is not None:
        after = edge.counters()
        dropped = after["dropped_untrusted"] - before_counters["dropped_untrusted"]
        with topo.inside(topo.proxy_ns):
            edge.detach()
    elif nft_table is not None:
        out = subprocess.run(
            _nsenter(topo.proxy_ns, "nft", "-j", "list", "table", "netdev", nft_table),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        dropped = 0
        for item in json.loads(out.stdout)["nftables"]:
            rule = item.get("rule")
            if rule:
                for expr in rule["expr"]:
                    if "counter" in expr:
                        dropped = int(expr["counter"]["packets"])
        subprocess.run(
            _nsenter(topo.proxy_ns, "nft", "delete", "table", "netdev", nft_table), check=True
        )
    else:
        dropped = int(report["dropped"])
    return {
        "config": name,
        "dropped_pps": dropped / elapsed,
        "host_cpu_s": host_cpu,
        "cpu_us_per_drop": host_cpu * 1e6 / dropped if dropped else float("nan"),
        "relay_cpu_s": report["cpu"],
        "trusted_completed": calls["completed"],
        "trusted_failed": calls["failed"],
    }


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    if os.geteuid() != 0:
        print("bench.xdp_flood needs root (namespaces, XDP, nftables)", file=sys.stderr)
        return 2
    for tool in ("trafgen", "nft", "nsenter"):
        if shutil.which(tool) is None:
            print(
                f"{tool} missing: apt-get install netsniff-ng nftables util-linux", file=sys.stderr
            )
            return 2
    topo = build(["trusted", "untrusted"], f"b{os.getpid() % 100000}")
    directory = Path(tempfile.mkdtemp(prefix="xdp-bench-"))
    rows = []
    try:
        for name in ("none", "userspace", "nftables", "xdp-generic", "xdp-native"):
            rows.append(run_one(topo, name, seconds, directory))
    finally:
        destroy(topo)
    print(f"XDP flood benchmark: {seconds:.0f} s per configuration, trafgen from an untrusted ns,")
    print("a trusted request every 10 ms to a UDP echo stand-in for the relay (2 cores, veth pair)")
    print(
        f"{'config':12} {'dropped/s':>12} {'host CPU s':>11} {'us/drop':>9} "
        f"{'echo CPU s':>11} {'trusted ok':>11} {'failed':>7}"
    )
    for r in rows:
        print(
            f"{r['config']:12} {r['dropped_pps']:12,.0f} {r['host_cpu_s']:11.2f} "
            f"{r['cpu_us_per_drop']:9.3f} {r['relay_cpu_s']:11.2f} {r['trusted_completed']:11d} "
            f"{r['trusted_failed']:7d}"
        )
    pps = {str(r["config"]): float(r["dropped_pps"]) for r in rows}  # type: ignore[arg-type]
    best_xdp = max(pps["xdp-generic"], pps["xdp-native"])
    print(f"ratio XDP (best mode) / nftables:  {best_xdp / max(pps['nftables'], 1):.2f}")
    print(f"ratio XDP (best mode) / userspace: {best_xdp / max(pps['userspace'], 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
