"""The trust list as the XDP filter sees it: its maps, and keeping them in step.

``trust_v4`` and ``trust_v6`` are LPM tries of the trusted networks (value: the role). In
front of the IPv4 trie, ``trust_v4_16`` is a bitmap of the /16s any trusted IPv4 network
touches (1024 64-bit words), and ``trust_generation`` is bumped after every change so the
program forgets the verdicts it cached per CPU (see xdp_filter.c, "Cost"). Besides the trust
list's entries the tries hold the ClearIP upstreams (:meth:`TrustMaps.set_upstreams`), which
only the kernel needs: their answers come back to the SIP port over UDP.

Changes are made additions first, removals after, so a source trusted before and after is
never dropped in between; the bitmap and the generation follow once per change, after the
tries.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from clearip.relay.policy.trust import IPNetwork, Role, TrustEntry

ROLE_VALUES = {Role.SWITCH: 1, Role.PROVIDER: 2}
UPSTREAM_ROLE = 3  # kernel-only entries: the ClearIP upstreams the daemon talks to over UDP


class TrustMaps:
    """The trust maps of one loaded filter; ``table(name)`` gives bcc's handle on a map."""

    def __init__(self, table: Callable[[str], Any]) -> None:
        self._table = table
        self._upstreams: set[IPNetwork] = set()  # kernel-only, see set_upstreams
        self._listed: set[IPNetwork] = set()  # what the trust list put in the maps
        self._v4: set[IPNetwork] = set()  # IPv4 networks in trust_v4 (listed and upstreams)
        self._slash16: Counter[int] = Counter()  # /16 -> how many of them touch it
        self._dirty: set[int] = set()  # trust_v4_16 words to rewrite

    def read(self) -> None:
        """Start from what the maps hold (adopted from a previous run, or nothing) and write
        the whole /16 bitmap once from it."""
        self._v4 = {n for n in self.networks() if n.version == 4}
        self._slash16.clear()
        for network in self._v4:
            self._cover(network, 1)
        self._dirty = set(range(1024))
        self._changed()

    def set(self, entries: Iterable[TrustEntry]) -> None:
        """Make the maps equal to ``entries`` (plus the upstreams)."""
        wanted = {entry.network: entry for entry in entries}
        current = self.networks()
        for entry in wanted.values():
            self._put(entry.network, ROLE_VALUES.get(entry.role, 1))
        self._listed = set(wanted)
        for network in current:
            if network not in wanted:
                self._unlist(network)  # upstreams stay (as upstreams)
        self._changed()  # once: a long list is not rewritten entry by entry

    def add(self, entry: TrustEntry) -> None:
        self._put(entry.network, ROLE_VALUES.get(entry.role, 1))
        self._listed.add(entry.network)
        self._changed()

    def remove(self, network: IPNetwork) -> None:
        self._unlist(network)
        self._changed()

    def set_upstreams(self, addresses: Iterable[str]) -> None:
        """Let the answers of these hosts (the ClearIP upstreams, resolved by the daemon) in,
        without putting them in the trust list. Entries the trust list also has are left to
        it."""
        wanted = {ipaddress.ip_network(a.split("%", 1)[0]) for a in addresses}
        for network in wanted - self._listed:
            self._put(network, UPSTREAM_ROLE)
        for network in self._upstreams - wanted - self._listed:
            self._delete(network)
        self._upstreams = wanted
        self._changed()

    def networks(self) -> list[IPNetwork]:
        """Every network in the tries (trust list and upstreams)."""
        out: list[IPNetwork] = []
        for key in list(self._table("trust_v4").keys()):
            address = ipaddress.IPv4Address(int(key.addr).to_bytes(4, "little"))
            out.append(ipaddress.IPv4Network(f"{address}/{key.prefixlen}"))
        for key in list(self._table("trust_v6").keys()):
            address6 = ipaddress.IPv6Address(bytes(key.addr))
            out.append(ipaddress.IPv6Network(f"{address6}/{key.prefixlen}"))
        return out

    def _unlist(self, network: IPNetwork) -> None:
        self._listed.discard(network)
        if network in self._upstreams:
            self._put(network, UPSTREAM_ROLE)  # still needed for the upstream's answers
        else:
            self._delete(network)

    def _key(self, network: IPNetwork) -> tuple[Any, Any]:
        if network.version == 4:
            table = self._table("trust_v4")
            addr = int.from_bytes(network.network_address.packed, "little")
            return table, table.Key(network.prefixlen, addr)
        table = self._table("trust_v6")
        addr16 = (ctypes.c_ubyte * 16)(*network.network_address.packed)
        return table, table.Key(network.prefixlen, addr16)

    def _put(self, network: IPNetwork, role: int) -> None:
        table, key = self._key(network)
        table[key] = table.Leaf(role)
        if network.version == 4 and network not in self._v4:
            self._v4.add(network)
            self._cover(network, 1)

    def _delete(self, network: IPNetwork) -> None:
        table, key = self._key(network)
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

    def _changed(self) -> None:
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
