"""Loads the XDP edge filter through bcc, keeps its maps in step with the trust list.

Lifecycle: :meth:`EdgeFilter.start` compiles ``xdp_filter.c`` (about 2 s), loads it, brings the
pinned maps (``/sys/fs/bpf/clearip/``) in line with the trust list and emergency numbers by
adding and removing only what changed, then attaches the program to each interface. A program
already attached by a previous daemon keeps filtering with the same maps until the new one
replaces it, so a restart or upgrade leaves no window without protection. :meth:`close` drops
the daemon's handles and leaves the filter in force; :meth:`detach` removes it.

Attach modes: ``native`` (driver XDP), ``generic`` (skb XDP) or ``auto``: generic on virtual
interfaces (veth, bridges, VLANs: measured here, native XDP on veth was several times slower
because it forces a NAPI path on the peer), native on physical NICs with a fall-back to generic
when the driver refuses.

Without bcc, kernel headers, or the privileges to load XDP, :class:`FilterUnavailable` says
what is missing and how to fix it; the daemon then relies on its own source check.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clearip.relay.emergency import validate_number
from clearip.relay.trust import IPNetwork, Role, TrustEntry

SOURCE = Path(__file__).with_name("xdp_filter.c")
DEFAULT_PIN_DIR = "/sys/fs/bpf/clearip"
OUTCOMES = (
    "passed_trusted",
    "dropped_untrusted",
    "passed_non_sip",
    "emergency_marked",
    "parse_giveup",
)
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
VIRTUAL_KINDS = {"veth", "bridge", "vlan", "macvlan", "ipvlan", "dummy", "vxlan", "bond", "tun"}
ROLE_VALUES = {Role.SWITCH: 1, Role.PROVIDER: 2}


def install_hint() -> str:
    if Path("/etc/redhat-release").exists():
        return "dnf install bcc python3-bcc kernel-devel-$(uname -r)"
    return "apt-get install python3-bpfcc linux-headers-$(uname -r) (or scripts/bootstrap.sh)"


class FilterUnavailable(Exception):
    """The kernel filter cannot run here; ``reason`` says why and ``fix`` how to fix it."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason} (fix: {fix})")
        self.reason = reason
        self.fix = fix


def _bcc() -> Any:
    try:
        import bcc
    except ImportError:
        raise FilterUnavailable("bcc's Python module is not installed", install_hint()) from None
    return bcc


def _ensure_bpffs(pin_dir: Path) -> None:
    root = Path("/sys/fs/bpf")
    if not os.path.ismount(root):
        result = subprocess.run(
            ["mount", "-t", "bpf", "bpf", str(root)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise FilterUnavailable(
                f"bpffs is not mounted at {root}: {result.stderr.strip()}",
                "mount -t bpf bpf /sys/fs/bpf",
            )
    pin_dir.mkdir(parents=True, exist_ok=True)


def interface_kind(ifname: str) -> str | None:
    """The link kind (veth, bridge...) or None for a physical interface; pyroute2 netlink."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link("get", ifname=ifname)
        if not links:
            return None
        info = links[0].get_attr("IFLA_LINKINFO")
        if info is None:
            return None
        kind = info.get_attr("IFLA_INFO_KIND")
        return str(kind) if kind else None


class EdgeFilter:
    def __init__(self, bpf: Any, pin_dir: Path, interfaces: dict[str, str]) -> None:
        self.bpf = bpf
        self.pin_dir = pin_dir
        self.interfaces = interfaces  # ifname -> "native" | "generic"

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        *,
        interfaces: Iterable[str],
        mode: str = "auto",
        udp_ports: Iterable[int] = (5060,),
        tcp_ports: Iterable[int] = (5060, 5061),
        pin_dir: str = DEFAULT_PIN_DIR,
        trust: Iterable[TrustEntry] = (),
        emergency: Iterable[str] = (),
    ) -> EdgeFilter:
        bcc = _bcc()
        if os.geteuid() != 0:
            raise FilterUnavailable(
                "loading XDP needs root (CAP_BPF, CAP_NET_ADMIN)", "run the daemon as root"
            )
        headers = Path("/lib/modules") / platform.release() / "build"
        if not headers.exists():
            raise FilterUnavailable(f"no kernel headers at {headers}", install_hint())
        pins = Path(pin_dir)
        _ensure_bpffs(pins)
        try:
            bpf = bcc.BPF(
                src_file=str(SOURCE).encode(),
                cflags=[f'-DPIN_DIR="{pins}"', "-Wno-unused-value"],
            )
            function = bpf.load_func(b"xdp_filter", bcc.BPF.XDP)
        except Exception as exc:  # bcc raises bare Exception for compile/load failures
            raise FilterUnavailable(
                f"the XDP program did not compile or load: {exc}",
                "check that kernel headers match (" + install_hint() + ") and the bcc output",
            ) from None
        edge = cls(bpf, pins, {})
        edge._set_ports("sip_udp_ports", udp_ports)
        edge._set_ports("sip_tcp_ports", tcp_ports)
        edge.set_trust(trust)
        edge.set_emergency(emergency)
        for ifname in interfaces:
            edge._attach(bcc, function, ifname, mode)
        edge._pin_program(function.fd)
        return edge

    def _attach(self, bcc: Any, function: Any, ifname: str, mode: str) -> None:
        chosen = mode
        if mode == "auto":
            try:
                kind = interface_kind(ifname)
            except Exception as exc:
                raise FilterUnavailable(
                    f"no interface {ifname!r}: {exc}", "check xdp.interfaces"
                ) from None
            chosen = "generic" if kind in VIRTUAL_KINDS or ifname == "lo" else "native"
        flags = XDP_FLAGS_DRV_MODE if chosen == "native" else XDP_FLAGS_SKB_MODE
        try:
            bcc.BPF.attach_xdp(ifname, function, flags)
        except Exception as exc:
            if mode == "auto" and chosen == "native":
                bcc.BPF.attach_xdp(ifname, function, XDP_FLAGS_SKB_MODE)
                chosen = "generic"
            else:
                raise FilterUnavailable(
                    f"cannot attach XDP ({chosen}) to {ifname}: {exc}",
                    "check xdp.interfaces and xdp.mode (generic works on every interface)",
                ) from None
        self.interfaces[ifname] = chosen

    def _pin_program(self, fd: int) -> None:
        from bcc.libbcc import lib

        path = self.pin_dir / "prog"
        if path.exists():
            path.unlink()
        lib.bpf_obj_pin(fd, str(path).encode())

    def detach(self) -> None:
        """Remove the filter from every interface and unpin program and maps."""
        bcc = _bcc()
        for ifname, mode in list(self.interfaces.items()):
            flags = XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
            try:
                bcc.BPF.remove_xdp(ifname, flags)
            except Exception:  # the interface may be gone already
                pass
        self.interfaces.clear()
        detach_pinned(self.pin_dir)

    def close(self) -> None:
        """Release the daemon's handles; the attached program and pinned maps stay."""
        self.bpf = None

    # -- maps ----------------------------------------------------------------------------------
    def _table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def _set_ports(self, name: str, ports: Iterable[int]) -> None:
        table = self._table(name)
        wanted = {int(p) for p in ports}
        for key in list(table.keys()):
            if key.value not in wanted:
                del table[key]
        for port in wanted:
            table[table.Key(port)] = table.Leaf(1)

    def _trust_key(self, network: IPNetwork) -> tuple[Any, Any]:
        if network.version == 4:
            table = self._table("trust_v4")
            addr = int.from_bytes(network.network_address.packed, "little")
            return table, table.Key(network.prefixlen, addr)
        table = self._table("trust_v6")
        addr16 = (ctypes.c_ubyte * 16)(*network.network_address.packed)
        return table, table.Key(network.prefixlen, addr16)

    def set_trust(self, entries: Iterable[TrustEntry]) -> None:
        """Make the trust maps equal to ``entries``, touching only what differs."""
        wanted = {entry.network: entry for entry in entries}
        for current in self.trusted_networks():
            if current not in wanted:
                table, key = self._trust_key(current)
                del table[key]
        for entry in wanted.values():
            self.add_trust(entry)

    def add_trust(self, entry: TrustEntry) -> None:
        table, key = self._trust_key(entry.network)
        table[key] = table.Leaf(ROLE_VALUES.get(entry.role, 1))

    def remove_trust(self, network: IPNetwork) -> None:
        table, key = self._trust_key(network)
        try:
            del table[key]
        except KeyError:
            pass

    def trusted_networks(self) -> list[IPNetwork]:
        out: list[IPNetwork] = []
        for key in list(self._table("trust_v4").keys()):
            address = ipaddress.IPv4Address(int(key.addr).to_bytes(4, "little"))
            out.append(ipaddress.IPv4Network(f"{address}/{key.prefixlen}"))
        for key in list(self._table("trust_v6").keys()):
            address6 = ipaddress.IPv6Address(bytes(key.addr))
            out.append(ipaddress.IPv6Network(f"{address6}/{key.prefixlen}"))
        return out

    def set_emergency(self, numbers: Iterable[str]) -> None:
        table = self._table("emergency")
        wanted = {validate_number(n).encode() for n in numbers}
        for key in list(table.keys()):
            if _number_of(key) not in wanted:
                del table[key]
        for number in wanted:
            padded = number.ljust(16, b"\0")
            lo, hi = int.from_bytes(padded[:8], "little"), int.from_bytes(padded[8:], "little")
            key = table.Key(lo, hi)
            table[key] = table.Leaf(1)

    def emergency_numbers(self) -> list[str]:
        return sorted(_number_of(key).decode() for key in self._table("emergency"))

    # -- reading -------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        table = self._table("counters")
        return {name: int(table.sum(table.Key(i)).value) for i, name in enumerate(OUTCOMES)}

    def top_dropped(self, n: int = 10) -> list[tuple[str, int]]:
        rows = []
        for key, value in self._table("dropped").items():
            raw = bytes(key.addr)
            address = (
                str(ipaddress.IPv4Address(raw[:4]))
                if key.family == 4
                else str(ipaddress.IPv6Address(raw))
            )
            rows.append((address, int(value.value)))
        rows.sort(key=lambda row: -row[1])
        return rows[:n]

    def status(self) -> dict[str, dict[str, object]]:
        return {name: {"mode": mode, "attached": True} for name, mode in self.interfaces.items()}


def _number_of(key: Any) -> bytes:
    raw = int(key.lo).to_bytes(8, "little") + int(key.hi).to_bytes(8, "little")
    return raw.rstrip(b"\0")


def detach_pinned(pin_dir: str | Path = DEFAULT_PIN_DIR, interfaces: Iterable[str] = ()) -> None:
    """Remove a filter left by a previous daemon (``clearipctl xdp detach``)."""
    try:
        bcc = _bcc()
        for ifname in interfaces:
            for flags in (XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE):
                try:
                    bcc.BPF.remove_xdp(ifname, flags)
                except Exception:
                    pass
    except FilterUnavailable:
        pass
    pins = Path(pin_dir)
    if pins.is_dir():
        for path in pins.iterdir():
            path.unlink()
        pins.rmdir()
