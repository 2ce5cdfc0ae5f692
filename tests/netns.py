"""Network namespaces joined by veth pairs for kernel-filter tests (pyroute2, no `ip`).

Only addresses inside namespaces the test creates are used (10.199.0.0/16, fd00:199::/48).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyroute2 import IPRoute, NetNS, netns


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
    hosts: dict[str, Host] = field(default_factory=dict)
    proxy_ifs: dict[str, str] = field(default_factory=dict)  # host name -> proxy-side ifname
    proxy_addrs: dict[str, tuple[str, str]] = field(default_factory=dict)

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


def build(names: list[str], tag: str | None = None) -> Topology:
    tag = tag or str(os.getpid() % 100000)
    topo = Topology(proxy_ns=f"cip-proxy-{tag}")
    netns.create(topo.proxy_ns)
    with IPRoute() as ipr:
        for index, name in enumerate(names, start=1):
            ns = f"cip-{name}-{tag}"
            netns.create(ns)
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
    return topo


def _configure(ns: str, ifname: str, ipv4: str, ipv6: str) -> None:
    with NetNS(ns) as nsr:
        index = nsr.link_lookup(ifname=ifname)[0]
        nsr.addr("add", index=index, address=ipv4, prefixlen=24)
        nsr.addr("add", index=index, address=ipv6, prefixlen=64, IFA_F_NODAD=True, flags=0x02)
        nsr.link("set", index=index, state="up")
        lo = nsr.link_lookup(ifname="lo")[0]
        nsr.link("set", index=lo, state="up")


def destroy(topo: Topology) -> None:
    for host in topo.hosts.values():
        with contextlib.suppress(Exception):
            netns.remove(host.ns)
    with contextlib.suppress(Exception):
        netns.remove(topo.proxy_ns)


def in_namespace(ns: str, module: str, *args: str) -> list[str]:
    """A command line running ``python -m module args`` inside ``ns`` (setns via pyroute2)."""
    import sys

    code = (
        "import runpy, sys; from pyroute2 import netns; "
        f"netns.setns({ns!r}); sys.argv = [{module!r}, *sys.argv[1:]]; "
        f"runpy.run_module({module!r}, run_name='__main__')"
    )
    return [sys.executable, "-c", code, *args]
