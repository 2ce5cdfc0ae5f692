"""XDP on network interfaces: which programs an interface carries, in which mode, and putting
one on or off (netlink), in the network namespace the interface names belong to.

Attach modes
    ``native`` (driver XDP), ``generic`` (skb XDP) or ``auto``: generic on virtual interfaces
    (anything netlink reports a link kind for: veth, bridge, vlan, bond... and loopback), native
    on physical NICs (no link kind), falling back to generic when the driver refuses. Measured
    here on a veth pair (``python -m bench.xdp_flood``, 2 cores): with one flooding core native
    and generic both drop what the sender can send (0.49 vs 0.51 Mpps); with two flooding cores
    generic drops 0.98 Mpps and native 0.51 Mpps, because native XDP on veth funnels every frame
    through the receiving veth's single NAPI poll (one core) and has to convert each skb.
    Switching an interface between modes (the operator changed ``xdp.mode``) needs the old
    program removed first: the kernel refuses generic and native programs on one interface;
    that is the only moment without a filter, and it is logged.

Attaching over a program already there in that mode replaces it atomically: the interface is
never without a filter. :func:`attach_all` puts the interfaces it had changed back as they were
(:func:`restore`) when one of them refuses the program.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from clearip.bpf import syscall
from clearip.bpf.loader import FilterUnavailable

log = logging.getLogger("clearip.xdp")

MODES = ("auto", "native", "generic")
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def current_netns() -> int:
    """An fd on this thread's network namespace (the caller closes it): where interface names
    mean what they meant when it was opened, for :func:`in_netns`."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY)


@contextlib.contextmanager
def in_netns(fd: int | None) -> Iterator[None]:
    """Run the block (this thread only) in the network namespace ``fd`` refers to."""
    if fd is None:
        yield
        return
    here = current_netns()
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")
        try:
            yield
        finally:
            _libc.setns(here, CLONE_NEWNET)
    finally:
        os.close(here)


def _link(ifname: str) -> Any:
    """The RTM_GETLINK answer for ``ifname`` in the caller's namespace.

    One blocking netlink round trip with pyroute2's message classes, not its IPRoute: that one
    runs an event loop of its own, which fails inside the daemon (uvloop) and must not run on
    the daemon's loop when ``status()`` is called from the control socket.
    """
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        raise FilterUnavailable(
            f"no interface {ifname!r} here", "check xdp.interfaces (ip link shows the names)"
        ) from None
    request = ifinfmsg()
    request["index"] = index
    request["header"]["type"] = RTM_GETLINK
    request["header"]["flags"] = NLM_F_REQUEST
    request["header"]["sequence_number"] = 1
    request.encode()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:
        sock.settimeout(5)
        sock.send(request.data)
        data = sock.recv(65536)
    reply = ifinfmsg(data)
    reply.decode()
    if reply["header"]["type"] != RTM_NEWLINK:
        raise FilterUnavailable(
            f"netlink could not describe interface {ifname!r}", "check xdp.interfaces"
        )
    return reply


def interface_kind(ifname: str) -> str | None:
    """The link kind (veth, bridge, vlan...) or None for a physical interface (no kind)."""
    if ifname == "lo":
        return "loopback"
    info = _link(ifname).get_attr("IFLA_LINKINFO")
    if info is None:
        return None
    kind = info.get_attr("IFLA_INFO_KIND")
    return str(kind) if kind else None


def all_interfaces() -> list[str]:
    """Every interface name of the caller's network namespace."""
    return [name for _, name in socket.if_nameindex()]


def attached_programs(ifname: str) -> dict[str, int]:
    """Program ids attached to ``ifname`` by mode ("generic", "native"; absent: none)."""
    link = _link(ifname)
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return {}
    attrs = dict(xdp["attrs"])
    out: dict[str, int] = {}
    mode = attrs.get("IFLA_XDP_ATTACHED")
    single = attrs.get("IFLA_XDP_PROG_ID")
    for name, key, attached_as in (
        ("generic", "IFLA_XDP_SKB_PROG_ID", "xdpgeneric"),
        ("native", "IFLA_XDP_DRV_PROG_ID", "xdp"),
    ):
        if attrs.get(key):
            out[name] = int(attrs[key])
        elif single and mode == attached_as:
            out[name] = int(single)
    return out


def choose_mode(ifname: str, mode: str) -> str:
    """The mode to attach in: ``mode`` itself, or for ``auto`` the one the interface's kind
    calls for (see the module docstring)."""
    if mode not in MODES:
        raise FilterUnavailable(f"unknown XDP mode {mode!r}", "use auto, native or generic")
    if mode != "auto":
        return mode
    kind = interface_kind(ifname)
    return "native" if kind is None else "generic"


def set_xdp(ifname: str, fd: int, mode: str) -> None:
    """Attach the program ``fd`` (atomically replacing what is there in that mode), or
    remove it (fd -1); netlink through libbcc, in the caller's namespace."""
    from bcc.libbcc import lib

    result = lib.bpf_attach_xdp(ifname.encode(), fd, FLAGS[mode])
    if result < 0:
        err = ctypes.get_errno() or -result
        raise OSError(
            err, f"XDP {'detach from' if fd < 0 else 'attach to'} {ifname}: {os.strerror(err)}"
        )


def attach_all(
    fd: int,
    wanted: dict[str, str],
    before: dict[str, dict[str, int]],
    *,
    fallback: bool,
) -> dict[str, str]:
    """Attach the program ``fd`` to each interface of ``wanted`` in its mode (``before``: what
    each carried, by mode); the modes it got, native falling back to generic if ``fallback``.
    When an interface refuses, those already changed are put back as they were and
    :class:`FilterUnavailable` says which and why."""
    done: dict[str, str] = {}
    changed: list[str] = []
    try:
        for name, mode in wanted.items():
            changed.append(name)
            done[name] = _attach(fd, name, mode, before[name], fallback)
    except FilterUnavailable:
        for name in changed:
            restore(name, before[name])
        raise
    return done


def _attach(fd: int, ifname: str, mode: str, present: dict[str, int], fallback: bool) -> str:
    other = "generic" if mode == "native" else "native"
    if other in present:
        # The kernel allows one mode per interface: the old program must go first.
        log.warning("XDP on %s: switching from %s to %s mode", ifname, other, mode)
        set_xdp(ifname, -1, other)
    try:
        set_xdp(ifname, fd, mode)
        return mode
    except Exception as exc:
        if fallback and mode == "native":
            log.warning("native XDP refused on %s (%s): using generic", ifname, exc)
            return _attach(fd, ifname, "generic", attached_programs(ifname), False)
        raise FilterUnavailable(
            f"cannot attach XDP ({mode}) to {ifname}: {exc}",
            "check xdp.interfaces and xdp.mode (generic works on every interface)",
        ) from None


def restore(ifname: str, before: dict[str, int]) -> None:
    """Put ``ifname`` back to the programs it had (by id), after a failed start."""
    with contextlib.suppress(Exception):
        for mode in FLAGS:
            if mode not in before:
                with contextlib.suppress(Exception):
                    set_xdp(ifname, -1, mode)
        for mode, prog in before.items():
            fd = syscall.prog_fd_by_id(prog)
            try:
                set_xdp(ifname, fd, mode)
            finally:
                os.close(fd)
