"""The trust list: which source addresses may send SIP, and in which role.

Every trusted source is an address or CIDR (IPv4 or IPv6) with a role: ``switch`` (our side; its
INVITEs are outbound calls) or ``provider`` (a carrier; its INVITEs are inbound calls). The list
lives in a TOML file that ``clearipctl`` edits; the relay reads it at start and on reload, and the
XDP filter is filled from it.

File format::

    [[source]]
    cidr = "192.0.2.10/32"
    role = "switch"
    note = "core switch A"

Writes are atomic (write to a temporary file, fsync, rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Role(StrEnum):
    SWITCH = "switch"
    PROVIDER = "provider"


class TrustError(ValueError):
    """A trust-list entry or file is invalid; the message says what and how to fix it."""


@dataclass(frozen=True, slots=True)
class TrustEntry:
    network: IPNetwork
    role: Role
    note: str = ""

    @property
    def cidr(self) -> str:
        return str(self.network)

    @classmethod
    def parse(cls, cidr: str, role: str, note: str = "") -> TrustEntry:
        """An entry from its text fields (a command, a file); errors say how to fix them."""
        return cls(parse_cidr(cidr), parse_role(role), note)

    def as_dict(self) -> dict[str, str]:
        """The JSON form (control socket, ``clearipctl trust list --json``): text fields."""
        return {"cidr": self.cidr, "role": self.role.value, "note": self.note}


def parse_cidr(text: str) -> IPNetwork:
    """An address or CIDR; host bits set is an error (``10.0.0.1/24`` is ambiguous)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise TrustError(
            f"invalid address or CIDR {text!r}: {exc} "
            "(write e.g. 192.0.2.10, 192.0.2.0/24 or 2001:db8::/32)"
        ) from None


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise TrustError(f"unknown role {text!r}: use 'switch' or 'provider'") from None


class TrustList:
    """An ordered set of trusted networks with longest-prefix-match lookup.

    Lookups are cached per source address; the cache is dropped whenever the list changes and
    is bounded so that a spray of spoofed sources cannot grow it without limit.
    """

    CACHE_LIMIT = 65536

    def __init__(self, entries: Iterable[TrustEntry] = ()) -> None:
        self._entries: dict[IPNetwork, TrustEntry] = {}
        self._cache: dict[str, Role | None] = {}
        self._by_prefix: list[TrustEntry] = []
        for entry in entries:
            self.add(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[TrustEntry]:
        return iter(self._entries.values())

    def __contains__(self, network: object) -> bool:
        return network in self._entries

    def entries(self) -> list[TrustEntry]:
        return list(self._entries.values())

    def add(self, entry: TrustEntry) -> None:
        if entry.network in self._entries:
            raise TrustError(f"{entry.cidr} is already in the trust list")
        self._entries[entry.network] = entry
        self._changed()

    def remove(self, network: IPNetwork) -> TrustEntry:
        try:
            entry = self._entries.pop(network)
        except KeyError:
            raise TrustError(f"{network} is not in the trust list") from None
        self._changed()
        return entry

    def replace(self, entries: Iterable[TrustEntry]) -> None:
        fresh = TrustList(entries)
        self._entries = fresh._entries
        self._changed()

    def role_of(self, address: str) -> Role | None:
        """The role of the most specific network containing ``address``, or None."""
        cache = self._cache
        try:
            return cache[address]
        except KeyError:
            pass
        role = self._lookup(address)
        if len(cache) >= self.CACHE_LIMIT:
            cache.clear()
        cache[address] = role
        return role

    def _lookup(self, address: str) -> Role | None:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for entry in self._by_prefix:
            if ip.version == entry.network.version and ip in entry.network:
                return entry.role
        return None

    def _changed(self) -> None:
        self._cache = {}
        self._by_prefix = sorted(
            self._entries.values(), key=lambda e: e.network.prefixlen, reverse=True
        )


def load_trust_file(path: str | Path) -> TrustList:
    """Read a trust file; errors name the file, the entry and the fix."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrustError(
            f"{path}: trust file not found (create it with 'clearipctl trust add CIDR --role ...' "
            "or set proxy.trust_file)"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TrustError(f"{path}: cannot read the trust file: {exc}") from None
    return trust_list_from_data(data, str(path))


def trust_list_from_text(text: str, origin: str) -> TrustList:
    """A trust file's text (``clearipctl trust import``); ``origin`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TrustError(f"{origin}: not a trust file: {exc}") from None
    return trust_list_from_data(data, origin)


def trust_list_from_data(data: dict[str, object], origin: str) -> TrustList:
    unknown = set(data) - {"source"}
    if unknown:
        raise TrustError(f"{origin}: unknown key(s) {sorted(unknown)}; only [[source]] is allowed")
    sources = data.get("source", [])
    if not isinstance(sources, list):
        raise TrustError(f"{origin}: 'source' must be an array of tables ([[source]])")
    trust = TrustList()
    for index, item in enumerate(sources, start=1):
        where = f"{origin}: [[source]] #{index}"
        if not isinstance(item, dict):
            raise TrustError(f"{where}: must be a table with cidr, role and optional note")
        extra = set(item) - {"cidr", "role", "note"}
        if extra:
            raise TrustError(f"{where}: unknown key(s) {sorted(extra)}; allowed: cidr, role, note")
        cidr, role, note = item.get("cidr"), item.get("role"), item.get("note", "")
        if not isinstance(cidr, str):
            raise TrustError(f'{where}: missing cidr (add cidr = "192.0.2.10/32")')
        if not isinstance(role, str):
            raise TrustError(f'{where}: missing role (add role = "switch" or "provider")')
        if not isinstance(note, str):
            raise TrustError(f"{where}: note must be a string")
        try:
            trust.add(TrustEntry.parse(cidr, role, note))
        except TrustError as exc:
            raise TrustError(f"{where}: {exc}") from None
    return trust


def render_trust_file(trust: Iterable[TrustEntry]) -> str:
    lines = [
        "# clearip-proxy trust list: sources allowed to send SIP, with their role.",
        '# role = "switch" (our side, outbound calls) or "provider" (carrier, inbound calls).',
        "# Edit with clearipctl (it updates the running daemon and the kernel filter too).",
    ]
    for entry in trust:
        lines += ["", "[[source]]", f"cidr = {json.dumps(entry.cidr)}"]
        lines.append(f"role = {json.dumps(entry.role.value)}")
        if entry.note:
            lines.append(f"note = {json.dumps(entry.note, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_atomically(path: str | Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new file, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_trust_file(path: str | Path, trust: Iterable[TrustEntry]) -> None:
    write_atomically(path, render_trust_file(trust))
