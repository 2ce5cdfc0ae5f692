"""Network namespaces joined by veth pairs for kernel-filter tests (pyroute2, no `ip`).

Only addresses inside namespaces the test creates are used (10.199.0.0/16, fd00:199::/48).
Names carry the process id and a per-process counter, so parallel runs and several
topologies in one run never clash; :func:`topology` removes everything even when the test
fails, and :func:`build` removes what it made when it fails half-way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyroute2 import IPRoute, NetNS, netns

_SEQUENCE = itertools.count(1)


def unique_tag(prefix: str = "") -> str:
    """A short name part unique to this process and call (interface names have 15 bytes)."""
    return f"{prefix}{os.getpid() % 100000}{next(_SEQUENCE)}"


@dataclass
class Host:
    ns: str
    ifname: str
    ipv4: str
    ipv6: str


@dataclass
class Topology:
    """A proxy host with one veth link to each other host."""

    proxy_ns: str
    tag: str = ""
    hosts: dict[str, Host] = field(default_factory=dict)
    proxy_ifs: dict[str, str] = field(default_factory=dict)  # host name -> proxy-side ifname
    proxy_addrs: dict[str, tuple[str, str]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        netns.pushns(ns)
        try:
            yield
        finally:
            netns.popns()

    def socket_in(self, ns: str, family: int, kind: int) -> socket.socket:
        """A socket living in ``ns`` (sockets keep the namespace they were created in)."""
        with self.inside(ns):
            return socket.socket(family, kind)

    def add_vlan(self, name: str, vlan_id: int) -> Host:
        """A VLAN sub-interface on both ends of ``name``'s link, with its own subnet.

        The XDP program stays on the proxy's parent veth, so it sees the tagged frames.
        """
        host = self.hosts[name]
        index = list(self.hosts).index(name) + 1
        near_parent = self.proxy_ifs[name]
        sub = 100 + vlan_id % 100
        near, far = f"{near_parent[:10]}.{vlan_id}", f"{host.ifname[:10]}.{vlan_id}"
        vhost = Host(host.ns, far, f"10.199.{sub}.{index * 2}", f"fd00:199:{sub}::{index * 2}")
        proxy = (f"10.199.{sub}.{index * 2 + 1}", f"fd00:199:{sub}::{index * 2 + 1}")
        for ns, parent, ifname, (v4, v6) in (
            (host.ns, host.ifname, far, (vhost.ipv4, vhost.ipv6)),
            (self.proxy_ns, near_parent, near, proxy),
        ):
            with NetNS(ns) as nsr:
                link = nsr.link_lookup(ifname=parent)[0]
                nsr.link("add", ifname=ifname, kind="vlan", link=link, vlan_id=vlan_id)
            _configure(ns, ifname, v4, v6)
        vname = f"{name}.vlan{vlan_id}"
        self.hosts[vname] = vhost
        self.proxy_ifs[vname] = near
        self.proxy_addrs[vname] = proxy
        return vhost


def build(names: list[str], tag: str | None = None) -> Topology:
    tag = tag or unique_tag()
    topo = Topology(proxy_ns=f"cip-proxy-{tag}", tag=tag)
    try:
        netns.create(topo.proxy_ns)
        topo.namespaces.append(topo.proxy_ns)
        with IPRoute() as ipr:
            for index, name in enumerate(names, start=1):
                ns = f"cip-{name}-{tag}"
                netns.create(ns)
                topo.namespaces.append(ns)
                near, far = f"cp{index}-{tag}"[:15], f"ch{index}-{tag}"[:15]
                ipr.link("add", ifname=near, kind="veth", peer=far)
                ipr.link("set", index=ipr.link_lookup(ifname=near)[0], net_ns_fd=topo.proxy_ns)
                ipr.link("set", index=ipr.link_lookup(ifname=far)[0], net_ns_fd=ns)
                host = Host(ns, far, f"10.199.{index}.2", f"fd00:199:{index}::2")
                topo.hosts[name] = host
                topo.proxy_ifs[name] = near
                topo.proxy_addrs[name] = (f"10.199.{index}.1", f"fd00:199:{index}::1")
                _configure(ns, far, host.ipv4, host.ipv6)
                _configure(topo.proxy_ns, near, *topo.proxy_addrs[name])
    except BaseException:
        destroy(topo)
        raise
    return topo


def _configure(ns: str, ifname: str, ipv4: str, ipv6: str) -> None:
    with NetNS(ns) as nsr:
        index = nsr.link_lookup(ifname=ifname)[0]
        nsr.addr("add", index=index, address=ipv4, prefixlen=24)
        # IFA_F_NODAD: usable at once, no duplicate address detection wait.
        nsr.addr("add", index=index, address=ipv6, prefixlen=64, flags=0x02)
        nsr.link("set", index=index, state="up")
        lo = nsr.link_lookup(ifname="lo")[0]
        nsr.link("set", index=lo, state="up")


def destroy(topo: Topology) -> None:
    """Remove every namespace (their veth and VLAN interfaces go with them)."""
    for ns in reversed(topo.namespaces):
        with contextlib.suppress(Exception):
            netns.remove(ns)
    # A veth pair still in the root namespace (build failed before moving it).
    with contextlib.suppress(Exception), IPRoute() as ipr:
        for index in range(1, len(topo.hosts) + 2):
            for ifname in (f"cp{index}-{topo.tag}"[:15], f"ch{index}-{topo.tag}"[:15]):
                for found in ipr.link_lookup(ifname=ifname):
                    ipr.link("del", index=found)


@contextlib.contextmanager
def topology(names: list[str]) -> Iterator[Topology]:
    topo = build(names)
    try:
        yield topo
    finally:
        destroy(topo)


def in_namespace(ns: str, module: str, *args: str) -> list[str]:
    """A command line running ``python -m module args`` inside ``ns`` (setns via pyroute2)."""
    code = (
        "import runpy, sys; from pyroute2 import netns; "
        f"netns.setns({ns!r}); sys.argv = [{module!r}, *sys.argv[1:]]; "
        f"runpy.run_module({module!r}, run_name='__main__')"
    )
    return [sys.executable, "-c", code, *args]


def ns_exec(ns: str) -> list[str]:
    """The prefix that runs a command inside ``ns`` (``ip netns exec``; SIPp, tc, the daemon)."""
    return ["ip", "netns", "exec", ns]


@dataclass
class Loopback:
    """A namespace where everything runs on ``lo``, and how its loss is made."""

    ns: str
    impairment: str = "none"  # "netem", "nftables" (loss only) or "none"

    def dropped(self) -> int:
        """Packets dropped on purpose so far (netem's qdisc counter or the nftables rule's)."""
        import re
        import subprocess

        if self.impairment == "netem":
            cmd, pattern = ["tc", "-s", "qdisc", "show", "dev", "lo"], r"dropped (\d+)"
        elif self.impairment == "nftables":
            cmd, pattern = ["nft", "list", "table", "inet", "cip_loss"], r"packets (\d+)"
        else:
            return 0
        out = subprocess.run(
            [*ns_exec(self.ns), *cmd], check=True, capture_output=True, text=True
        ).stdout
        match = re.search(pattern, out)
        return int(match.group(1)) if match else 0


@contextlib.contextmanager
def loopback_namespace(loss: float = 0.0, delay_ms: float = 0.0) -> Iterator[Loopback]:
    """A namespace with only ``lo`` up (all of 127.0.0.0/8 is local in it), impaired with
    ``tc qdisc add dev lo root netem loss L% delay D ms``: every packet between the processes
    inside crosses it once. Kernels without sch_netem (CONFIG_NET_SCH_NETEM unset) get the
    same random loss from an nftables rule on input instead (no delay; dropping on output
    would make the sender's sendto fail with EPERM, which is not loss). Everything goes with
    the namespace."""
    import subprocess

    loopback = Loopback(f"cip-lo-{unique_tag()}")
    netns.create(loopback.ns)
    try:
        with NetNS(loopback.ns) as nsr:
            nsr.link("set", index=nsr.link_lookup(ifname="lo")[0], state="up")
        if loss or delay_ms:
            netem = ["tc", "qdisc", "add", "dev", "lo", "root", "netem"]
            netem += [*(["loss", f"{loss:g}%"] if loss else [])]
            netem += [*(["delay", f"{delay_ms:g}ms"] if delay_ms else [])]
            tried = subprocess.run([*ns_exec(loopback.ns), *netem], capture_output=True, text=True)
            if tried.returncode == 0:
                loopback.impairment = "netem"
            elif "unknown" in tried.stderr and loss:
                rule = f"numgen random mod 10000 < {round(loss * 100)} counter drop"
                for command in (
                    "add table inet cip_loss",
                    "add chain inet cip_loss input { type filter hook input priority -300; }",
                    f"add rule inet cip_loss input iif lo {rule}",
                ):
                    subprocess.run(
                        [*ns_exec(loopback.ns), "nft", command], check=True, capture_output=True
                    )
                loopback.impairment = "nftables"
            else:
                raise RuntimeError(f"cannot impair lo: {tried.stderr.strip()}")
        yield loopback
    finally:
        with contextlib.suppress(Exception):
            netns.remove(loopback.ns)
