"""Which interfaces ``[xdp] interfaces = "auto"`` protects: those that carry the listeners'
addresses.

:func:`pick` is the rule, a pure function of the links (as netlink describes them) and the
listen addresses; :func:`read_links` is the netlink read, in the caller's network namespace.

The rule
    - A wildcard listener (``0.0.0.0`` or ``::``) receives on every interface: every interface
      that is up and carries Ethernet frames, except loopback (only this host talks there),
      members of a bond or bridge (their master is picked and sees the same frames) and VLAN or
      macvlan devices whose lower device is picked (it sees their frames, tagged, first).
    - A listener on an address: the interface that carries it, if it carries Ethernet frames;
      an address on loopback or on a tunnel is noted and left out.
    - The result is in interface-index order, each name once.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

WILDCARDS = frozenset({"0.0.0.0", "::"})
STACKED = frozenset({"vlan", "macvlan", "macvtap", "ipvlan"})  # ride on a lower device
ARPHRD_ETHER = 1
IFF_UP = 0x1


@dataclass(frozen=True, slots=True)
class Link:
    """One interface as far as the choice goes."""

    name: str
    index: int
    up: bool = True
    ethernet: bool = True  # ARPHRD_ETHER: XDP sees an Ethernet header (not lo, tun, wireguard)
    kind: str | None = None  # veth, vlan, bridge, bond... None for a physical NIC
    master: int | None = None  # the bond or bridge this one belongs to
    lower: int | None = None  # the device a VLAN or macvlan sits on (IFLA_LINK)
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Selection:
    """The interfaces picked, and why some listener addresses gave none."""

    names: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


def _normal(address: str) -> str | None:
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return None


def pick(links: Iterable[Link], listen_addresses: Iterable[str]) -> Selection:
    """The interfaces to attach the filter to for these listeners (see the module docstring)."""
    ordered = sorted(links, key=lambda link: link.index)
    chosen: dict[int, Link] = {}
    notes: list[str] = []
    addresses = list(dict.fromkeys(listen_addresses))
    if any(a in WILDCARDS for a in addresses):
        for link in ordered:
            if link.up and link.ethernet and link.master is None:
                chosen[link.index] = link
        for index, link in list(chosen.items()):
            if link.kind in STACKED and link.lower in chosen:
                del chosen[index]
    for address in addresses:
        if address in WILDCARDS:
            continue
        wanted = _normal(address)
        carriers = [link for link in ordered if wanted in {_normal(a) for a in link.addresses}]
        if wanted is None or not carriers:
            notes.append(f"no interface here carries the listen address {address}")
            continue
        for link in carriers:
            if link.ethernet:
                chosen.setdefault(link.index, link)
            else:
                notes.append(
                    f"{address} is on {link.name}: not filtered (loopback or not Ethernet)"
                )
    names = tuple(link.name for _, link in sorted(chosen.items()))
    return Selection(names, tuple(notes))


def read_links() -> list[Link]:
    """Every interface of the caller's network namespace with its addresses (two netlink
    dumps over a plain socket: pyroute2's IPRoute runs an event loop of its own)."""
    from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETLINK
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    addresses: dict[int, list[str]] = {}
    for message in _dump(ifaddrmsg, RTM_GETADDR):
        value = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
        if value:
            addresses.setdefault(int(message["index"]), []).append(str(value))
    links = []
    for message in _dump(ifinfmsg, RTM_GETLINK):
        info = message.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        index = int(message["index"])
        lower = message.get_attr("IFLA_LINK")
        if message.get_attr("IFLA_LINK_NETNSID") is not None:
            lower = None  # an index in another namespace (a veth peer moved away)
        links.append(
            Link(
                name=str(message.get_attr("IFLA_IFNAME")),
                index=index,
                up=bool(int(message["flags"]) & IFF_UP),
                ethernet=int(message["ifi_type"]) == ARPHRD_ETHER,
                kind=str(kind) if kind else None,
                master=message.get_attr("IFLA_MASTER"),
                lower=int(lower) if lower and int(lower) != index else None,
                addresses=tuple(addresses.get(index, ())),
            )
        )
    return links


def _dump(message_class: type, request_type: int) -> list[Any]:
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    request = message_class()
    request["header"]["type"] = request_type
    request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    request["header"]["sequence_number"] = 1
    request.encode()
    out: list[Any] = []
    marshal = MarshalRtnl()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:
        sock.settimeout(5)
        sock.send(request.data)
        while True:
            for message in marshal.parse(sock.recv(1 << 16)):
                kind = message["header"]["type"]
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    raise OSError(f"netlink dump {request_type} refused")
                out.append(message)
