"""The XDP toolchain end to end: bcc compiles a trivial program, it attaches (generic mode) to
a veth in a namespace, counts real packets in a per-CPU array, and everything is removed
afterwards, also when an assertion fails."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab.netns import Topology, topology

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.xdp]

XDP_FLAGS_SKB_MODE = 1 << 1
PROGRAM = b"""
#include <uapi/linux/bpf.h>
BPF_PERCPU_ARRAY(packets, u64, 1);
int count_all(struct xdp_md *ctx) {
    u32 key = 0;
    u64 *value = packets.lookup(&key);
    if (value)
        *value += 1;
    return XDP_PASS;
}
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    with topology(["peer"]) as topo:
        yield topo


@pytest.fixture
def attached(topo: Topology) -> Iterator[Any]:
    """The counting program, attached to the proxy end of the veth; detached afterwards."""
    import bcc

    ifname = topo.proxy_ifs["peer"]
    with topo.inside(topo.proxy_ns):
        bpf = bcc.BPF(text=PROGRAM)
        function = bpf.load_func(b"count_all", bcc.BPF.XDP)
        bcc.BPF.attach_xdp(ifname.encode(), function, XDP_FLAGS_SKB_MODE)
    try:
        yield bpf
    finally:
        with topo.inside(topo.proxy_ns):
            bcc.BPF.remove_xdp(ifname.encode(), XDP_FLAGS_SKB_MODE)
        bpf.cleanup()


def packets_counted(bpf: Any) -> int:
    table = bpf[b"packets"]
    return sum(int(v) for v in table.getvalue(table.Key(0)))


def test_bcc_xdp_counts_packets_on_a_veth_in_a_namespace(topo: Topology, attached: Any) -> None:
    from pyroute2 import NetNS

    with NetNS(topo.proxy_ns) as ns:
        link = ns.link("get", index=ns.link_lookup(ifname=topo.proxy_ifs["peer"])[0])[0]
        xdp = dict(link.get_attr("IFLA_XDP")["attrs"])
    assert xdp["IFLA_XDP_ATTACHED"] == "xdpgeneric"

    before = packets_counted(attached)
    receiver = topo.socket_in(topo.proxy_ns, socket.AF_INET, socket.SOCK_DGRAM)
    sender = topo.socket_in(topo.hosts["peer"].ns, socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind((topo.proxy_addrs["peer"][0], 9999))
        receiver.settimeout(2)
        for index in range(5):
            sender.sendto(b"hello %d" % index, (topo.proxy_addrs["peer"][0], 9999))
        got = [receiver.recv(100) for _ in range(5)]  # XDP_PASS: every datagram arrives
    assert sorted(got) == [b"hello %d" % i for i in range(5)]
    deadline = time.monotonic() + 2
    while packets_counted(attached) - before < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Five datagrams (plus the ARP exchange that preceded them) went through the program.
    assert packets_counted(attached) - before >= 5
