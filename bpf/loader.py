"""Loads the XDP edge filter through bcc and keeps its maps in step with the trust list.

Lifecycle
    :meth:`EdgeFilter.start` compiles ``xdp_filter.c`` (about 2 s), loads it, fills its maps
    (SIP ports, trust list, emergency numbers), then attaches it to each interface. Attaching
    over a program that is already there (a previous daemon's) replaces it atomically: the
    interface is never without a filter. The program is pinned at ``<pin_dir>/prog`` and its
    maps under ``<pin_dir>/maps-<layout>/``, where ``<layout>`` is a digest of the C source:

    - a restart with the same program *adopts* the pinned maps (counters and top offenders
      carry on; the trust map is brought in line with the trust file entry by entry, additions
      before removals, so no trusted source is ever dropped on the way);
    - an upgrade that changed the program gets *fresh* maps, filled from the trust file before
      the new program replaces the old one; the old maps are unpinned afterwards.

    :meth:`close` drops the daemon's handles and leaves the filter attached and pinned;
    :meth:`detach` (and ``clearipctl xdp detach``) removes it.

Ownership
    The filter only ever replaces or removes its own program: the one pinned at
    ``<pin_dir>/prog``, or one the kernel knows by this program's name (``clearip_xdp``: a
    filter whose pins were lost, or another clearip daemon's, on the interfaces named). An
    interface that carries any other XDP program (a DDoS agent, xdp-tools' xdp-filter) is left
    alone at start, logged and listed in :meth:`status` with the program's name and id,
    unless ``replace_foreign``; when that leaves no interface the filter is unavailable.
    Detaching removes our program wherever it is and our pins (``prog``, ``maps-*``), and
    reports what it left (:class:`Detached`). Which interfaces ``xdp.interfaces = "auto"``
    means is :mod:`clearip.bpf.interfaces`.

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

Failure
    Without bcc, kernel headers, privileges, or when an interface refuses the program,
    :class:`FilterUnavailable` says what is missing and how to fix it. Interfaces this start had
    already changed are put back as they were (the previous program, or none), so a failed
    start never leaves a program whose maps nobody updates. The daemon then relies on its own
    source check.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearip.bpf import syscall
from clearip.relay.policy.emergency import validate_number
from clearip.relay.policy.trust import IPNetwork, Role, TrustEntry

log = logging.getLogger("clearip.xdp")

SOURCE = Path(__file__).with_name("xdp_filter.c")
DEFAULT_PIN_DIR = "/sys/fs/bpf/clearip"


def c_defines(source: str) -> dict[str, int]:
    """The ``#define NAME <integer>`` lines of a C source."""
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^#define\s+([A-Z_][A-Z0-9_]*)\s+(\d+)\b", source, re.MULTILINE)
    }


def counter_layout(source: str) -> tuple[tuple[str, ...], int]:
    """The outcome names (``COUNTER_PASSED_TRUSTED`` 0 -> "passed_trusted", ...) and the number
    of per-interface counter slots, read from the C file: the one place they are defined."""
    defines = c_defines(source)
    named = {v: k.removeprefix("COUNTER_").lower() for k, v in defines.items()
             if k.startswith("COUNTER_")}  # fmt: skip
    count = defines["COUNTERS"]
    if sorted(named) != list(range(count)):
        raise ValueError(f"xdp_filter.c: COUNTER_* must number 0..{count - 1}, not {sorted(named)}")
    return tuple(named[i] for i in range(count)), defines["IFACE_SLOTS"]


# Outcomes counted per interface; IFACE_SLOTS counter slots (the last one, IFACE_OTHER, shared).
OUTCOMES, IFACE_SLOTS = counter_layout(SOURCE.read_text(encoding="utf-8"))
MODES = ("auto", "native", "generic")
PROGRAM_NAME = "clearip_xdp"  # the kernel's name for the program: how detach recognises it
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
ROLE_VALUES = {Role.SWITCH: 1, Role.PROVIDER: 2}
UPSTREAM_ROLE = 3  # kernel-only entries: the ClearIP upstreams the daemon talks to over UDP


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


def layout(source: str) -> str:
    """The pin sub-directory for a program text: same text, same maps."""
    return "maps-" + hashlib.sha256(source.encode()).hexdigest()[:12]


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


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def _netns(fd: int | None) -> Iterator[None]:
    """Run the block (this thread only) in the network namespace ``fd`` refers to."""
    if fd is None:
        yield
        return
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
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
    if mode not in MODES:
        raise FilterUnavailable(f"unknown XDP mode {mode!r}", "use auto, native or generic")
    if mode != "auto":
        return mode
    kind = interface_kind(ifname)
    return "native" if kind is None else "generic"


def _set_xdp(ifname: str, fd: int, mode: str) -> None:
    """Attach the program ``fd`` (atomically replacing what is there in that mode), or
    remove it (fd -1); netlink through libbcc, in the caller's namespace."""
    from bcc.libbcc import lib

    result = lib.bpf_attach_xdp(ifname.encode(), fd, FLAGS[mode])
    if result < 0:
        err = ctypes.get_errno() or -result
        raise OSError(
            err, f"XDP {'detach from' if fd < 0 else 'attach to'} {ifname}: {os.strerror(err)}"
        )


class EdgeFilter:
    """The loaded filter: its maps, where it is attached, and how to read its counters."""

    def __init__(self, bpf: Any, pin_dir: Path, interfaces: dict[str, str], prog_id: int) -> None:
        self._bpf: Any = bpf
        self.pin_dir = pin_dir
        self.interfaces = interfaces  # ifname -> "native" | "generic"
        self.prog_id = prog_id
        self._ifindex: dict[int, str] = {}
        self.skipped: dict[str, str] = {}  # ifname -> why it was left alone (a foreign program)
        self._upstreams: set[IPNetwork] = set()  # kernel-only, see set_upstreams
        self._listed: set[IPNetwork] = set()  # what the trust list put in the maps
        self._v4: set[IPNetwork] = set()  # IPv4 networks in trust_v4 (listed and upstreams)
        self._slash16: Counter[int] = Counter()  # /16 -> how many of them touch it
        self._dirty: set[int] = set()  # trust_v4_16 words to rewrite
        # Interface names mean something in one network namespace: the one start() ran in.
        # Later calls (status, detach) go there, whichever thread or namespace they come from.
        self._netns: int | None = os.open("/proc/thread-self/ns/net", os.O_RDONLY)

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
        replace_foreign: bool = False,
    ) -> EdgeFilter:
        """Load, fill, attach and pin; raises :class:`FilterUnavailable` with the fix.

        An interface that carries another product's XDP program is left alone (and listed in
        :meth:`status` with the reason) unless ``replace_foreign``; when every interface is
        left alone the filter is unavailable."""
        names = list(interfaces)
        wanted = {name: choose_mode(name, mode) for name in names}  # checks names and mode
        before = {name: attached_programs(name) for name in names}
        skipped = _foreign(before, owned_program_id(pin_dir), replace_foreign)
        if names and len(skipped) == len(names):
            raise FilterUnavailable(
                "every interface carries another XDP program: "
                + "; ".join(f"{name}: {why}" for name, why in skipped.items()),
                "remove it, leave the interface out of xdp.interfaces, or set "
                "[xdp] replace_foreign = true to replace it",
            )
        names = [name for name in names if name not in skipped]
        bcc = _bcc()
        if os.geteuid() != 0:
            raise FilterUnavailable(
                "loading XDP needs root (CAP_BPF, CAP_NET_ADMIN)", "run the daemon as root"
            )
        headers = Path("/lib/modules") / platform.release() / "build"
        if not headers.exists():
            raise FilterUnavailable(f"no kernel headers at {headers}", install_hint())
        pins = Path(pin_dir)
        fresh_pins = not pins.exists()
        _ensure_bpffs(pins)
        source = SOURCE.read_text()
        maps = pins / layout(source)
        adopted = maps.exists()
        maps.mkdir(exist_ok=True)
        try:
            edge = cls._load(bcc, source, maps)
            edge._set_ports(udp_ports, tcp_ports)
            edge._read_trust()
            edge.set_trust(trust)
            edge.set_emergency(emergency)
        except Exception as exc:
            _forget(maps, pins, adopted, fresh_pins)
            if isinstance(exc, FilterUnavailable):
                raise
            edge.close()
            raise FilterUnavailable(
                f"cannot fill the XDP maps: {exc}", "check the trust list and emergency numbers"
            ) from None
        edge.skipped = skipped
        try:
            edge._attach_all(names, wanted, before, fallback=mode == "auto")
        except FilterUnavailable:
            _forget(maps, pins, adopted, fresh_pins)
            raise
        edge._pin_program()
        edge._remove_stale_pins(keep=maps)
        return edge

    @classmethod
    def _load(cls, bcc: Any, source: str, maps: Path) -> EdgeFilter:
        try:
            bpf = bcc.BPF(
                text=source.encode(),
                cflags=[f'-DPIN_DIR="{maps}"', "-Wno-unused-value"],
            )
            function = bpf.load_func(PROGRAM_NAME.encode(), bcc.BPF.XDP)
        except Exception as exc:  # bcc raises bare Exception for compile/load failures
            raise FilterUnavailable(
                f"the XDP program did not compile or load: {exc}",
                "check that kernel headers match (" + install_hint() + ") and the bcc output",
            ) from None
        return cls(bpf, maps.parent, {}, syscall.prog_id(function.fd))

    @property
    def _fd(self) -> int:
        return int(self.bpf.funcs[PROGRAM_NAME.encode()].fd)

    def _attach_all(
        self,
        names: list[str],
        wanted: dict[str, str],
        before: dict[str, dict[str, int]],
        *,
        fallback: bool,
    ) -> None:
        fd = self._fd
        changed: list[str] = []
        try:
            for name in names:
                changed.append(name)
                self.interfaces[name] = self._attach(fd, name, wanted[name], before[name], fallback)
                self._ifindex[socket.if_nametoindex(name)] = name
        except FilterUnavailable:
            for name in changed:
                _restore(name, before[name])
            self.close()
            raise

    def _attach(
        self, fd: int, ifname: str, mode: str, present: dict[str, int], fallback: bool
    ) -> str:
        other = "generic" if mode == "native" else "native"
        if other in present:
            # The kernel allows one mode per interface: the old program must go first.
            log.warning("XDP on %s: switching from %s to %s mode", ifname, other, mode)
            _set_xdp(ifname, -1, other)
        try:
            _set_xdp(ifname, fd, mode)
            return mode
        except Exception as exc:
            if fallback and mode == "native":
                log.warning("native XDP refused on %s (%s): using generic", ifname, exc)
                return self._attach(fd, ifname, "generic", attached_programs(ifname), False)
            raise FilterUnavailable(
                f"cannot attach XDP ({mode}) to {ifname}: {exc}",
                "check xdp.interfaces and xdp.mode (generic works on every interface)",
            ) from None

    def _pin_program(self) -> None:
        path = self.pin_dir / "prog"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        syscall.obj_pin(self._fd, str(path))

    def _remove_stale_pins(self, keep: Path) -> None:
        """Maps of an older program (another layout, or the flat layout of 0.1) go; nothing
        else in the directory is touched."""
        for path in _our_pins(self.pin_dir):
            if path == keep or path.name == "prog":
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def detach(self) -> Detached:
        """Remove the filter from every interface where it still is (a program someone put in
        its place stays) and unpin program and maps."""
        report = Detached()
        with _netns(self._netns):
            for ifname, mode in list(self.interfaces.items()):
                try:
                    present = attached_programs(ifname).get(mode)
                    if present is None:
                        continue
                    if present != self.prog_id and not _named_ours(present):
                        report.left_alone.append(f"{ifname}: {describe_program(present)}")
                        continue
                    _set_xdp(ifname, -1, mode)
                    report.removed.append(f"{ifname} ({mode})")
                except Exception as exc:  # the interface may be gone already
                    log.info("XDP detach from %s: %s", ifname, exc)
            self.interfaces.clear()
            report.merge(detach_pinned(self.pin_dir))
        self.close()
        return report

    def close(self) -> None:
        """Release the daemon's handles; the attached program and pinned maps stay."""
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if self._netns is not None:
            os.close(self._netns)
            self._netns = None

    @property
    def bpf(self) -> Any:
        if self._bpf is None:
            raise RuntimeError("the kernel filter handle is closed")
        return self._bpf

    # -- maps ----------------------------------------------------------------------------------
    def _table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def _set_ports(self, udp: Iterable[int], tcp: Iterable[int]) -> None:
        """Make the ``sip_ports`` bitmap hold exactly these ports (words that change only)."""
        table = self._table("sip_ports")
        wanted = port_words(udp, tcp)
        for index, word in enumerate(wanted):
            key = table.Key(index)
            if int(table[key].value) != word:
                table[key] = table.Leaf(word)

    def _trust_key(self, network: IPNetwork) -> tuple[Any, Any]:
        if network.version == 4:
            table = self._table("trust_v4")
            addr = int.from_bytes(network.network_address.packed, "little")
            return table, table.Key(network.prefixlen, addr)
        table = self._table("trust_v6")
        addr16 = (ctypes.c_ubyte * 16)(*network.network_address.packed)
        return table, table.Key(network.prefixlen, addr16)

    def set_trust(self, entries: Iterable[TrustEntry]) -> None:
        """Make the trust maps equal to ``entries`` (plus the upstreams): additions first, then
        removals, so a source trusted before and after is never dropped in between."""
        wanted = {entry.network: entry for entry in entries}
        current = self.trusted_networks()
        for entry in wanted.values():
            self._put(entry.network, ROLE_VALUES.get(entry.role, 1))
        self._listed = set(wanted)
        for network in current:
            if network not in wanted:
                self._unlist(network)  # upstreams stay (as upstreams)
        self._trust_changed()  # once: a long list is not rewritten entry by entry

    def add_trust(self, entry: TrustEntry) -> None:
        self._put(entry.network, ROLE_VALUES.get(entry.role, 1))
        self._listed.add(entry.network)
        self._trust_changed()

    def remove_trust(self, network: IPNetwork) -> None:
        self._unlist(network)
        self._trust_changed()

    def _unlist(self, network: IPNetwork) -> None:
        self._listed.discard(network)
        if network in self._upstreams:
            self._put(network, UPSTREAM_ROLE)  # still needed for the upstream's answers
        else:
            self._delete(network)

    def set_upstreams(self, addresses: Iterable[str]) -> None:
        """Let the answers of these hosts (the ClearIP upstreams, resolved by the daemon) in,
        without putting them in the trust list: over UDP they come back to the SIP port.
        Entries the trust list also has are left to it."""
        wanted = {ipaddress.ip_network(a.split("%", 1)[0]) for a in addresses}
        for network in wanted - self._listed:
            self._put(network, UPSTREAM_ROLE)
        for network in self._upstreams - wanted - self._listed:
            self._delete(network)
        self._upstreams = wanted
        self._trust_changed()

    def _put(self, network: IPNetwork, role: int) -> None:
        table, key = self._trust_key(network)
        table[key] = table.Leaf(role)
        if network.version == 4 and network not in self._v4:
            self._v4.add(network)
            self._cover(network, 1)

    def _delete(self, network: IPNetwork) -> None:
        table, key = self._trust_key(network)
        with contextlib.suppress(KeyError):
            del table[key]
        if network in self._v4:
            self._v4.discard(network)
            self._cover(network, -1)

    def _cover(self, network: IPNetwork, delta: int) -> None:
        """Count ``network`` in (or out of) every /16 it touches (the ``trust_v4_16`` bits)."""
        first = int(network.network_address) >> 16
        for slash16 in range(first, first + (1 << max(0, 16 - network.prefixlen))):
            self._slash16[slash16] += delta
            self._dirty.add(slash16 >> 6)

    def _read_trust(self) -> None:
        """Start from what the maps hold (adopted from a previous run, or nothing) and write
        the whole /16 bitmap once from it."""
        self._v4 = {n for n in self.trusted_networks() if n.version == 4}
        self._slash16.clear()
        for network in self._v4:
            self._cover(network, 1)
        self._dirty = set(range(1024))
        self._trust_changed()

    def _trust_changed(self) -> None:
        """Bring the /16 bitmap in line (the words that changed), then bump
        ``trust_generation`` so the program forgets the IPv4 verdicts it cached per CPU. Runs
        after the LPM maps changed: a packet that sees the new generation sees the new maps."""
        bitmap = self._table("trust_v4_16")
        for word_index in sorted(self._dirty):
            word = 0
            for bit in range(64):
                if self._slash16.get(word_index * 64 + bit, 0) > 0:
                    word |= 1 << bit
            bitmap[bitmap.Key(word_index)] = bitmap.Leaf(word)
        self._dirty.clear()
        table = self._table("trust_generation")
        key = table.Key(0)
        table[key] = table.Leaf((int(table[key].value) % 0xFFFFFFFF) + 1)  # never 0 again

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
        for number in wanted:
            padded = number.ljust(16, b"\0")
            lo, hi = int.from_bytes(padded[:8], "little"), int.from_bytes(padded[8:], "little")
            table[table.Key(lo, hi)] = table.Leaf(1)
        for key in list(table.keys()):
            if _number_of(key) not in wanted:
                del table[key]

    def emergency_numbers(self) -> list[str]:
        return sorted(_number_of(key).decode() for key in self._table("emergency"))

    # -- reading -------------------------------------------------------------------------------
    def _slots(self) -> dict[int, list[int]]:
        """Counts per outcome by receiving ifindex (0: interfaces counted in the shared
        slot), summed over CPUs."""
        out: dict[int, list[int]] = {}
        table = self._table("counters")
        for key, per_cpu in table.items():
            other = int(key.value) == IFACE_SLOTS
            for cpu in per_cpu:
                totals = out.setdefault(0 if other else int(cpu.ifindex), [0] * len(OUTCOMES))
                for i in range(len(OUTCOMES)):
                    totals[i] += int(cpu.outcome[i])
        return out

    def counters(self) -> dict[str, int]:
        """Packets per outcome since the maps were created, summed over CPUs and interfaces."""
        totals = [0] * len(OUTCOMES)
        for counts in self._slots().values():
            totals = [a + b for a, b in zip(totals, counts, strict=True)]
        return dict(zip(OUTCOMES, totals, strict=True))

    def interface_counters(self) -> dict[str, dict[str, int]]:
        """The same per receiving interface (by name where this filter attached it; "other"
        for interfaces that shared a counter slot)."""
        out: dict[str, dict[str, int]] = {}
        for ifindex, counts in sorted(self._slots().items()):
            if ifindex == 0 and not any(counts):
                continue  # free slots
            name = self._ifindex.get(ifindex) or ("other" if ifindex == 0 else f"ifindex {ifindex}")
            out[name] = dict(zip(OUTCOMES, counts, strict=True))
        return out

    def top_dropped(self, n: int = 10) -> list[tuple[str, int]]:
        """The sources dropped most (from a bounded LRU map: recent offenders)."""
        rows = []
        for key, value in self._table("dropped").items():
            raw = bytes(key.addr)
            address = (
                str(ipaddress.IPv4Address(raw[:4]))
                if key.family == 4
                else str(ipaddress.IPv6Address(raw))
            )
            rows.append((address, int(value.value)))
        rows.sort(key=lambda row: (-row[1], row[0]))
        return rows[:n]

    def status(self) -> dict[str, dict[str, object]]:
        """Per interface: the mode and whether this program is really attached (netlink)."""
        out: dict[str, dict[str, object]] = {}
        with _netns(self._netns):
            for name, mode in self.interfaces.items():
                try:
                    present = attached_programs(name)
                except FilterUnavailable:
                    present = {}
                out[name] = {"mode": mode, "attached": present.get(mode) == self.prog_id}
        for name, why in self.skipped.items():
            out[name] = {"mode": "", "attached": False, "note": why}
        return out

    def test_run(self, packet: bytes) -> tuple[int, bytes]:
        """Run the loaded program on one frame without any interface: (XDP action, frame)."""
        return syscall.prog_test_run(self._fd, packet)

    def run_cost_ns(self, packet: bytes, repeat: int = 100_000) -> int:
        """The program's own average cost on one frame, measured by the kernel (ns); its
        counters move by ``repeat``."""
        return syscall.prog_test_run_ns(self._fd, packet, repeat)


def port_words(udp: Iterable[int], tcp: Iterable[int]) -> list[int]:
    """The ``sip_ports`` bitmap: 1024 64-bit words for UDP, then 1024 for TCP; bit p % 64 of
    word p // 64 is port p."""
    words = [0] * 2048
    for base, ports in ((0, udp), (1024, tcp)):
        for value in ports:
            port = int(value)
            if not 0 < port < 65536:
                raise ValueError(f"invalid port {port}")
            words[base + port // 64] |= 1 << (port % 64)
    return words


def _number_of(key: Any) -> bytes:
    raw = int(key.lo).to_bytes(8, "little") + int(key.hi).to_bytes(8, "little")
    return raw.rstrip(b"\0")


def _forget(maps: Path, pins: Path, adopted: bool, fresh_pins: bool) -> None:
    """After a failed start: maps it created go; adopted ones stay with the running program."""
    if not adopted:
        shutil.rmtree(maps, ignore_errors=True)
    if fresh_pins:
        with contextlib.suppress(OSError):
            pins.rmdir()


def _restore(ifname: str, before: dict[str, int]) -> None:
    """Put ``ifname`` back to the programs it had (by id) before a failed start."""
    with contextlib.suppress(Exception):
        for mode in FLAGS:
            if mode not in before:
                with contextlib.suppress(Exception):
                    _set_xdp(ifname, -1, mode)
        for mode, prog in before.items():
            fd = syscall.prog_fd_by_id(prog)
            try:
                _set_xdp(ifname, fd, mode)
            finally:
                os.close(fd)


def _all_interfaces() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


LEGACY_PINS = frozenset(
    {
        "trust_v4",
        "trust_v6",
        "sip_udp_ports",
        "sip_tcp_ports",
        "emergency",
        "counters",
        "dropped",
        "frag_dropped",
        "iface_counters",
    }
)  # the flat layout of 0.1, before maps-<layout>/


def _our_pins(pins: Path) -> list[Path]:
    """What this loader pins under ``pins``: ``prog``, ``maps-*/`` and the 0.1 map names."""
    if not pins.is_dir():
        return []
    return [
        path
        for path in sorted(pins.iterdir())
        if path.name == "prog" or path.name.startswith("maps-") or path.name in LEGACY_PINS
    ]


def owned_program_id(pin_dir: str | Path) -> int | None:
    """The id of the program pinned at ``<pin_dir>/prog`` (this daemon's filter), if any."""
    path = Path(pin_dir) / "prog"
    if not path.exists():
        return None
    try:
        fd = syscall.obj_get(str(path))
    except OSError:
        return None
    try:
        return syscall.prog_id(fd)
    finally:
        os.close(fd)


def describe_program(prog_id: int) -> str:
    """``'xdpfilt_dny_ip' (id 42)``, for messages about a program on an interface."""
    try:
        return f"'{syscall.prog_info_by_id(prog_id).name or '?'}' (id {prog_id})"
    except OSError:
        return f"id {prog_id}"


def _named_ours(prog_id: int) -> bool:
    try:
        return syscall.prog_info_by_id(prog_id).name == PROGRAM_NAME
    except OSError:
        return False


def is_ours(prog_id: int, pinned: int | None) -> bool:
    """Ours: the program pinned under our pin directory, or one with our program's name (a
    filter whose pins were lost, or another clearip daemon's)."""
    return prog_id == pinned or _named_ours(prog_id)


def _foreign(
    before: dict[str, dict[str, int]], pinned: int | None, replace: bool
) -> dict[str, str]:
    """Interfaces to leave alone: they carry a program that is not ours (see :func:`is_ours`),
    unless ``replace`` (then it is only logged)."""
    out: dict[str, str] = {}
    for name, present in before.items():
        foreign = [prog for prog in present.values() if not is_ours(prog, pinned)]
        if not foreign:
            continue
        what = ", ".join(describe_program(prog) for prog in foreign)
        if replace:
            log.warning("XDP on %s: replacing another program, %s (replace_foreign)", name, what)
            continue
        why = f"another XDP program is attached: {what}; left alone"
        log.error(
            "XDP on %s: %s (remove it, leave %s out of xdp.interfaces, or set [xdp] "
            "replace_foreign = true)",
            name,
            why,
            name,
        )
        out[name] = why
    return out


@dataclass
class Detached:
    """What a detach did: programs removed, programs left alone (not ours), pins."""

    removed: list[str] = field(default_factory=list)  # "eth1 (native)"
    left_alone: list[str] = field(default_factory=list)  # "eth2: 'xdpfilt_dny_ip' (id 42)"
    unpinned: list[str] = field(default_factory=list)  # paths removed
    kept: list[str] = field(default_factory=list)  # paths under the pin dir that are not ours

    def merge(self, other: Detached) -> None:
        self.removed += [r for r in other.removed if r not in self.removed]
        self.left_alone += [r for r in other.left_alone if r not in self.left_alone]
        self.unpinned += other.unpinned
        self.kept += other.kept


def detach_pinned(
    pin_dir: str | Path = DEFAULT_PIN_DIR, interfaces: Iterable[str] = ()
) -> Detached:
    """Remove a filter left by a previous daemon (``clearipctl xdp detach``), then our pins
    under ``pin_dir``. On the named interfaces our program is the pinned one or any program
    named like ours (see :func:`is_ours`); without names every interface of this namespace is
    looked at for the pinned program only (another clearip filter, pinned elsewhere, is not
    this one's). Any other XDP program stays where it is, and so does anything else in
    ``pin_dir``; the result says what was done and left."""
    pins = Path(pin_dir)
    report = Detached()
    pinned = owned_program_id(pins)
    names = list(interfaces)
    for ifname in names or _all_interfaces():
        try:
            present = attached_programs(ifname)
        except FilterUnavailable:
            continue
        for mode, prog in present.items():
            if prog != pinned and not (names and _named_ours(prog)):
                report.left_alone.append(f"{ifname}: {describe_program(prog)}")
                continue
            try:
                _set_xdp(ifname, -1, mode)
                report.removed.append(f"{ifname} ({mode})")
            except OSError as exc:
                log.info("XDP detach from %s: %s", ifname, exc)
    for path in _our_pins(pins):
        if path.is_dir():
            for inner in _walk(path):
                if inner.is_dir():
                    inner.rmdir()
                else:
                    inner.unlink()
            path.rmdir()
        else:
            path.unlink()
        report.unpinned.append(str(path))
    if pins.is_dir():
        report.kept = [str(path) for path in sorted(pins.iterdir())]
        if not report.kept:
            pins.rmdir()
    return report


def _walk(pins: Path) -> Iterator[Path]:
    for path in sorted(pins.iterdir()):
        if path.is_dir():
            yield from _walk(path)
        yield path
