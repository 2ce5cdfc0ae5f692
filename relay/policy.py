"""Who may send SIP, and which numbers are emergencies: one place that changes them all.

A change (from ``clearipctl`` or SIGHUP) is validated first, then written to disk atomically,
then applied to the kernel filter and to the relay's in-memory lists, so the file, the kernel
and the relay never disagree for longer than one call. Emergency numbers start from the
config; runtime changes are kept in ``<state_dir>/emergency.toml`` and survive restarts.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from clearip.relay.emergency import EmergencyNumbers, validate_number
from clearip.relay.trust import (
    IPNetwork,
    TrustEntry,
    TrustError,
    TrustList,
    load_trust_file,
    save_trust_file,
    write_atomically,
)

log = logging.getLogger("clearip.policy")


class KernelFilter(Protocol):
    """What the policy needs of the XDP filter (clearip.bpf.loader.EdgeFilter)."""

    def set_trust(self, entries: Iterable[TrustEntry]) -> None: ...
    def add_trust(self, entry: TrustEntry) -> None: ...
    def remove_trust(self, network: IPNetwork) -> None: ...
    def set_emergency(self, numbers: Iterable[str]) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def top_dropped(self, n: int = 10) -> list[tuple[str, int]]: ...
    def status(self) -> dict[str, dict[str, object]]: ...


class SourcePolicy:
    def __init__(
        self,
        trust: TrustList,
        trust_file: str | Path,
        emergency: EmergencyNumbers,
        state_dir: str | Path | None = None,
    ) -> None:
        self.trust = trust
        self.trust_file = Path(trust_file)
        self.emergency = emergency
        self.state_dir = Path(state_dir) if state_dir else None
        self.kernel: KernelFilter | None = None
        self.kernel_error: str | None = "not started"

    @classmethod
    def load(
        cls, trust_file: str | Path, numbers: Iterable[str], state_dir: str | Path | None = None
    ) -> SourcePolicy:
        emergency = EmergencyNumbers(numbers)
        saved = Path(state_dir) / "emergency.toml" if state_dir else None
        if saved is not None and saved.exists():
            try:
                data = tomllib.loads(saved.read_text())
                emergency = EmergencyNumbers(data.get("numbers", []))
            except (ValueError, OSError) as exc:
                log.error("ignoring %s (%s): using the config's emergency numbers", saved, exc)
        return cls(load_trust_file(trust_file), trust_file, emergency, state_dir)

    def attach_kernel(self, kernel: KernelFilter | None, error: str | None = None) -> None:
        self.kernel = kernel
        self.kernel_error = error

    # -- trust list ----------------------------------------------------------------------------
    def trust_add(self, entry: TrustEntry) -> None:
        if entry.network in self.trust:
            raise TrustError(f"{entry.cidr} is already in the trust list")
        save_trust_file(self.trust_file, [*self.trust, entry])
        if self.kernel is not None:
            self.kernel.add_trust(entry)
        self.trust.add(entry)
        log.info("trust list: added %s as %s", entry.cidr, entry.role.value)

    def trust_remove(self, network: IPNetwork) -> TrustEntry:
        if network not in self.trust:
            raise TrustError(f"{network} is not in the trust list")
        save_trust_file(self.trust_file, [e for e in self.trust if e.network != network])
        if self.kernel is not None:
            self.kernel.remove_trust(network)
        entry = self.trust.remove(network)
        log.info("trust list: removed %s", network)
        return entry

    def trust_replace(self, entries: Iterable[TrustEntry]) -> None:
        fresh = TrustList(entries)  # validates (duplicates) before anything changes
        save_trust_file(self.trust_file, fresh)
        self._apply(fresh)

    def reload(self) -> None:
        """Re-read the trust file (SIGHUP); a broken file leaves everything as it was."""
        self._apply(load_trust_file(self.trust_file))

    def _apply(self, fresh: TrustList) -> None:
        if self.kernel is not None:
            self.kernel.set_trust(fresh)
        self.trust.replace(fresh.entries())
        log.info("trust list: %d entries", len(self.trust))

    # -- emergency numbers -------------------------------------------------------------------
    def emergency_add(self, number: str) -> None:
        self._set_emergency(self.emergency.with_added(number))

    def emergency_remove(self, number: str) -> None:
        self._set_emergency(self.emergency.without(number))

    def _set_emergency(self, numbers: EmergencyNumbers) -> None:
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            text = "# Emergency numbers set with clearipctl; delete to use the config's.\n"
            text += f"numbers = {json.dumps(numbers.numbers())}\n"
            write_atomically(self.state_dir / "emergency.toml", text)
        if self.kernel is not None:
            self.kernel.set_emergency(numbers.numbers())
        self.emergency = numbers

    # -- reading -------------------------------------------------------------------------------
    def kernel_status(self) -> dict[str, Any] | None:
        if self.kernel is None:
            return None
        return {"interfaces": self.kernel.status(), "counters": self.kernel.counters()}

    def describe_kernel(self) -> str:
        if self.kernel is None:
            return f"off ({self.kernel_error})"
        modes = ", ".join(f"{i} {s['mode']}" for i, s in self.kernel.status().items())
        return f"on ({modes or 'no interfaces'})"


def validate_numbers(numbers: Iterable[str]) -> list[str]:
    return [validate_number(n) for n in numbers]
