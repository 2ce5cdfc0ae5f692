"""The XDP toolchain end to end: bcc compiles a trivial program, it attaches to a veth in a
namespace, counts real packets, and everything is removed afterwards."""

from __future__ import annotations

import socket
import time

import pytest

from tests.netns import build, destroy

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.xdp]

PROGRAM = """
#include <uapi/linux/bpf.h>
BPF_ARRAY(packets, u64, 1);
int count_all(struct xdp_md *ctx) {
    u32 key = 0;
    u64 *value = packets.lookup(&key);
    if (value) __sync_fetch_and_add(value, 1);
    return XDP_PASS;
}
"""


def test_bcc_xdp_counts_packets_on_a_veth_in_a_namespace() -> None:
    import bcc

    topo = build(["peer"], f"s{time.monotonic_ns() % 100000}")
    ifname = topo.proxy_ifs["peer"]
    try:
        with topo.inside(topo.proxy_ns):
            bpf = bcc.BPF(text=PROGRAM)
            function = bpf.load_func(b"count_all", bcc.BPF.XDP)
            bcc.BPF.attach_xdp(ifname, function, 1 << 1)  # generic mode
        sender = topo.socket_in(topo.hosts["peer"].ns, socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(5):
            sender.sendto(b"hello", (topo.proxy_addrs["peer"][0], 9999))
        time.sleep(0.2)
        counted = bpf[b"packets"][bpf[b"packets"].Key(0)].value
        assert counted >= 5
        with topo.inside(topo.proxy_ns):
            bcc.BPF.remove_xdp(ifname, 1 << 1)
        bpf.cleanup()
    finally:
        destroy(topo)
