"""The XDP edge filter: loads ``xdp_filter.c`` through bcc and keeps its maps in step with the
trust list.

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

Elsewhere
    Which programs are ours, and the pins: :mod:`clearip.bpf.pins` (an interface carrying
    another product's XDP program is left alone unless ``replace_foreign``; when that leaves
    no interface the filter is unavailable). Attach modes (native, generic, auto):
    :mod:`clearip.bpf.attach`. The trust maps: :mod:`clearip.bpf.trust_maps`. What is read
    from the C file: :mod:`clearip.bpf.layout`. Which interfaces ``xdp.interfaces = "auto"``
    means: :mod:`clearip.bpf.interfaces`.

Failure
    Without bcc, kernel headers, privileges, or when an interface refuses the program,
    :class:`FilterUnavailable` says what is missing and how to fix it. Interfaces this start had
    already changed are put back as they were (the previous program, or none), so a failed
    start never leaves a program whose maps nobody updates. The daemon then relies on its own
    source check.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clearip.bpf import loader, pins, syscall
from clearip.bpf.attach import (
    attach_all,
    attached_programs,
    choose_mode,
    current_netns,
    in_netns,
    set_xdp,
)
from clearip.bpf.layout import IFACE_SLOTS, OUTCOMES, SOURCE, port_words
from clearip.bpf.loader import FilterUnavailable
from clearip.bpf.pins import DEFAULT_PIN_DIR, PROGRAM_NAME, Detached
from clearip.bpf.trust_maps import TrustMaps
from clearip.relay.policy.emergency import validate_number
from clearip.relay.policy.trust import IPNetwork, TrustEntry

log = logging.getLogger("clearip.xdp")


class EdgeFilter:
    """The loaded filter: its maps, where it is attached, and how to read its counters."""

    def __init__(self, bpf: Any, pin_dir: Path, interfaces: dict[str, str], prog_id: int) -> None:
        self._bpf: Any = bpf
        self.pin_dir = pin_dir
        self.interfaces = interfaces  # ifname -> "native" | "generic"
        self.prog_id = prog_id
        self._ifindex: dict[int, str] = {}
        self.skipped: dict[str, str] = {}  # ifname -> why it was left alone (a foreign program)
        self._trust = TrustMaps(self._table)
        # Interface names mean something in one network namespace: the one start() ran in.
        # Later calls (status, detach) go there, whichever thread or namespace they come from.
        self._netns: int | None = current_netns()

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
        skipped = pins.foreign(before, pins.owned_program_id(pin_dir), replace_foreign)
        if names and len(skipped) == len(names):
            raise FilterUnavailable(
                "every interface carries another XDP program: "
                + "; ".join(f"{name}: {why}" for name, why in skipped.items()),
                "remove it, leave the interface out of xdp.interfaces, or set "
                "[xdp] replace_foreign = true to replace it",
            )
        bcc = loader.prerequisites(FilterUnavailable, "XDP", "the daemon")
        pin_root = Path(pin_dir)
        fresh_pins = not pin_root.exists()
        pins.ensure_bpffs(pin_root)
        source = SOURCE.read_text()
        maps = pin_root / pins.maps_name(source)
        adopted = maps.exists()
        maps.mkdir(exist_ok=True)
        try:
            edge = cls._load(bcc, source, maps)
            edge._set_ports(udp_ports, tcp_ports)
            edge._trust.read()
            edge.set_trust(trust)
            edge.set_emergency(emergency)
        except Exception as exc:
            _forget(maps, pin_root, adopted, fresh_pins)
            if isinstance(exc, FilterUnavailable):
                raise
            edge.close()
            raise FilterUnavailable(
                f"cannot fill the XDP maps: {exc}", "check the trust list and emergency numbers"
            ) from None
        edge.skipped = skipped
        attach = {name: wanted[name] for name in names if name not in skipped}
        try:
            edge.interfaces = attach_all(edge._fd, attach, before, fallback=mode == "auto")
        except FilterUnavailable:
            edge.close()
            _forget(maps, pin_root, adopted, fresh_pins)
            raise
        edge._ifindex = {socket.if_nametoindex(name): name for name in edge.interfaces}
        pins.pin(edge._fd, edge.pin_dir / "prog")
        pins.remove_stale_maps(edge.pin_dir, keep=maps, legacy=pins.LEGACY_PINS)
        return edge

    @classmethod
    def _load(cls, bcc: Any, source: str, maps: Path) -> EdgeFilter:
        try:
            bpf = bcc.BPF(text=source.encode(), cflags=loader.cflags(PIN_DIR=maps))
            function = bpf.load_func(PROGRAM_NAME.encode(), bcc.BPF.XDP)
        except Exception as exc:  # bcc raises bare Exception for compile/load failures
            raise FilterUnavailable(
                f"the XDP program did not compile or load: {exc}",
                "check that kernel headers match (" + loader.install_hint() + ") and the bcc "
                "output",
            ) from None
        return cls(bpf, maps.parent, {}, syscall.prog_id(function.fd))

    @property
    def _fd(self) -> int:
        return int(self.bpf.funcs[PROGRAM_NAME.encode()].fd)

    def detach(self) -> Detached:
        """Remove the filter from every interface where it still is (a program someone put in
        its place stays) and unpin program and maps."""
        report = Detached()
        with in_netns(self._netns):
            for ifname, mode in list(self.interfaces.items()):
                try:
                    present = attached_programs(ifname).get(mode)
                    if present is None:
                        continue
                    if present != self.prog_id and not pins.named_ours(present):
                        report.left_alone.append(f"{ifname}: {pins.describe_program(present)}")
                        continue
                    set_xdp(ifname, -1, mode)
                    report.removed.append(f"{ifname} ({mode})")
                except Exception as exc:  # the interface may be gone already
                    log.info("XDP detach from %s: %s", ifname, exc)
            self.interfaces.clear()
            report.merge(pins.detach_pinned(self.pin_dir))
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

    def set_trust(self, entries: Iterable[TrustEntry]) -> None:
        """Make the trust maps equal to ``entries`` (plus the upstreams): additions first, then
        removals, so a source trusted before and after is never dropped in between."""
        self._trust.set(entries)

    def add_trust(self, entry: TrustEntry) -> None:
        self._trust.add(entry)

    def remove_trust(self, network: IPNetwork) -> None:
        self._trust.remove(network)

    def set_upstreams(self, addresses: Iterable[str]) -> None:
        """Let the answers of these hosts (the ClearIP upstreams, resolved by the daemon) in,
        without putting them in the trust list: over UDP they come back to the SIP port."""
        self._trust.set_upstreams(addresses)

    def trusted_networks(self) -> list[IPNetwork]:
        return self._trust.networks()

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
        with in_netns(self._netns):
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


def _number_of(key: Any) -> bytes:
    raw = int(key.lo).to_bytes(8, "little") + int(key.hi).to_bytes(8, "little")
    return raw.rstrip(b"\0")


def _forget(maps: Path, pin_root: Path, adopted: bool, fresh_pins: bool) -> None:
    """After a failed start: maps it created go; adopted ones stay with the running program."""
    if not adopted:
        shutil.rmtree(maps, ignore_errors=True)
    if fresh_pins:
        with contextlib.suppress(OSError):
            pin_root.rmdir()
