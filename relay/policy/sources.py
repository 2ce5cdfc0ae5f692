"""Who may send SIP, and which numbers are emergencies: one place that changes them all.

Every change (``clearipctl``, SIGHUP) goes in this order: validate; write the file atomically;
update the kernel filter's maps; update the relay's in-memory lists. When the kernel refuses,
the file (and whatever part of the kernel change was made) is put back, so the file, the kernel
and the relay keep agreeing; when validation or the file write fails, nothing has changed.

The relay holds on to :attr:`SourcePolicy.trust` (it calls ``trust.role_of`` on every message),
so that object is changed in place, never replaced. :attr:`SourcePolicy.emergency` is an
immutable :class:`EmergencyNumbers` that is swapped whole: read it afresh on every INVITE.

Emergency numbers come from the config. Numbers added or removed with ``clearipctl`` are kept in
``<state_dir>/emergency.toml`` together with the config's list at that moment, and survive
restarts as long as the config's list is unchanged; once the config's emergency numbers change,
the config wins again (the state file is set aside with a log line). Without a state directory
runtime changes last until the daemon stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from clearip.relay.policy.emergency import EmergencyNumbers, validate_number
from clearip.relay.policy.trust import (
    IPNetwork,
    TrustEntry,
    TrustError,
    TrustList,
    load_trust_file,
    save_trust_file,
    write_atomically,
)

log = logging.getLogger("clearip.policy")
EMERGENCY_STATE = "emergency.toml"


class KernelFilter(Protocol):
    """What the policy needs of the XDP filter (clearip.bpf.edge_filter.EdgeFilter)."""

    def set_trust(self, entries: Iterable[TrustEntry]) -> None: ...
    def add_trust(self, entry: TrustEntry) -> None: ...
    def remove_trust(self, network: IPNetwork) -> None: ...
    def set_emergency(self, numbers: Iterable[str]) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def top_dropped(self, n: int = 10) -> list[tuple[str, int]]: ...
    def status(self) -> dict[str, dict[str, object]]: ...


class PolicyError(RuntimeError):
    """The kernel filter refused a change; it was rolled back (the message says so)."""


class SourcePolicy:
    def __init__(
        self,
        trust: TrustList,
        trust_file: str | Path,
        emergency: EmergencyNumbers,
        state_dir: str | Path | None = None,
        *,
        config_numbers: Iterable[str] | None = None,
    ) -> None:
        self.trust = trust
        self.trust_file = Path(trust_file)
        self.emergency = emergency
        self.state_dir = Path(state_dir) if state_dir else None
        self.config_numbers = (
            sorted(validate_number(n) for n in config_numbers)
            if config_numbers is not None
            else emergency.numbers()
        )
        self.kernel: KernelFilter | None = None
        self.kernel_error: str | None = "not started"
        self.kernel_chosen_by = ""  # "auto" when xdp.interfaces = "auto" picked them
        self.upstreams: list[str] = []

    @classmethod
    def load(
        cls, trust_file: str | Path, numbers: Iterable[str], state_dir: str | Path | None = None
    ) -> SourcePolicy:
        """The trust file and the emergency numbers (config, or runtime changes kept in
        ``state_dir`` while the config's list is what it was when they were made)."""
        config = sorted(validate_number(n) for n in numbers)
        emergency = EmergencyNumbers(config)
        saved = Path(state_dir) / EMERGENCY_STATE if state_dir else None
        if saved is not None and saved.exists():
            emergency = _saved_emergency(saved, config) or emergency
        return cls(
            load_trust_file(trust_file), trust_file, emergency, state_dir, config_numbers=config
        )

    def attach_kernel(
        self, kernel: KernelFilter | None, error: str | None = None, *, chosen_by: str = ""
    ) -> None:
        """The kernel filter now in use (or None and why); ``chosen_by`` says how its
        interfaces were chosen ("auto"), for the status line."""
        self.kernel = kernel
        self.kernel_error = error
        self.kernel_chosen_by = chosen_by if kernel is not None else ""
        if kernel is not None and self.upstreams:
            self.set_upstreams(self.upstreams)

    def set_upstreams(self, addresses: Iterable[str]) -> None:
        """The ClearIP upstreams' current addresses: the kernel filter lets their answers in
        (over UDP they come back to the SIP port) without them joining the trust list. Call
        again whenever an upstream is resolved anew."""
        self.upstreams = sorted(set(addresses))
        setter = getattr(self.kernel, "set_upstreams", None)
        if setter is not None:
            try:
                setter(self.upstreams)
            except Exception as exc:
                log.error("kernel filter: cannot let the upstreams %s in: %s", self.upstreams, exc)

    # -- trust list ----------------------------------------------------------------------------
    def trust_add(self, entry: TrustEntry) -> None:
        if entry.network in self.trust:
            raise TrustError(f"{entry.cidr} is already in the trust list")
        fresh = TrustList([*self.trust, entry])
        self._change_trust(fresh, lambda kernel: kernel.add_trust(entry))
        log.info("trust list: added %s as %s", entry.cidr, entry.role.value)

    def trust_remove(self, network: IPNetwork) -> TrustEntry:
        if network not in self.trust:
            raise TrustError(f"{network} is not in the trust list")
        entry = next(e for e in self.trust if e.network == network)
        fresh = TrustList(e for e in self.trust if e.network != network)
        self._change_trust(fresh, lambda kernel: kernel.remove_trust(network))
        log.info("trust list: removed %s", network)
        return entry

    def trust_replace(self, entries: Iterable[TrustEntry]) -> None:
        """Replace the whole list (``clearipctl trust import``)."""
        fresh = TrustList(entries)  # validates (duplicates) before anything changes
        self._change_trust(fresh, lambda kernel: kernel.set_trust(fresh))
        log.info("trust list: imported, %d entries", len(self.trust))

    def reload(
        self, trust_file: str | Path | None = None, emergency_numbers: Iterable[str] | None = None
    ) -> None:
        """Re-read the trust file (SIGHUP, ``clearip-proxy reload``), from ``trust_file`` when
        the config now names another, and take the config's ``emergency_numbers`` when they
        differ from the list the running ones came from (the config wins over runtime changes,
        as at a start). A broken file or a kernel refusal leaves everything as it was."""
        path = Path(trust_file) if trust_file is not None else self.trust_file
        fresh = load_trust_file(path)
        numbers = None
        if emergency_numbers is not None:
            config = sorted(validate_number(n) for n in emergency_numbers)
            numbers = config if config != self.config_numbers else None
        old_numbers = self.emergency.numbers()
        if numbers is not None and self.kernel is not None:
            try:
                self.kernel.set_emergency(numbers)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    self.kernel.set_emergency(old_numbers)
                raise PolicyError(
                    f"the kernel filter refused the emergency numbers ({exc}); nothing changed"
                ) from exc
        try:
            self._change_trust(fresh, lambda kernel: kernel.set_trust(fresh), write=False)
        except PolicyError:
            if numbers is not None and self.kernel is not None:
                with contextlib.suppress(Exception):
                    self.kernel.set_emergency(old_numbers)
            raise
        if path != self.trust_file:
            log.info("trust list: now %s", path)
        self.trust_file = path
        log.info("trust list: reloaded, %d entries", len(self.trust))
        if numbers is not None:
            self.emergency = EmergencyNumbers(numbers)
            self.config_numbers = numbers
            state = self.state_dir / EMERGENCY_STATE if self.state_dir is not None else None
            if state is not None and state.exists():
                with contextlib.suppress(OSError):
                    state.replace(state.with_name(state.name + ".old"))
                log.warning(
                    "the config's emergency numbers changed: runtime changes set aside in %s.old",
                    state.name,
                )
            log.info("emergency numbers (from the config): %s", ", ".join(numbers))

    def adopt(self, entries: Iterable[TrustEntry], numbers: Iterable[str]) -> bool:
        """Take the trust list and emergency numbers another process decided (a worker is
        told by its supervisor, which wrote the files and the kernel maps): memory only, no
        file, no kernel. Returns whether anything changed."""
        fresh = TrustList(entries)
        emergency = EmergencyNumbers(numbers)
        changed = (fresh.entries(), emergency.numbers()) != (
            self.trust.entries(),
            self.emergency.numbers(),
        )
        self.trust.replace(fresh.entries())
        self.emergency = emergency
        return changed

    def _change_trust(
        self, fresh: TrustList, apply: Callable[[KernelFilter], None], *, write: bool = True
    ) -> None:
        old = self.trust.entries()
        if write:
            save_trust_file(self.trust_file, fresh)  # an OSError here: nothing has changed
        if self.kernel is not None:
            try:
                apply(self.kernel)
            except Exception as exc:
                undone = self._undo(old, old if write else None)
                raise PolicyError(
                    f"the kernel filter refused the change ({exc}); {undone}"
                ) from exc
        self.trust.replace(fresh.entries())

    def _undo(self, kernel_entries: list[TrustEntry], file_entries: list[TrustEntry] | None) -> str:
        """Put the kernel map (and the trust file) back; say whether that worked."""
        failed = []
        assert self.kernel is not None
        try:
            self.kernel.set_trust(kernel_entries)
        except Exception as exc:
            failed.append(f"kernel map: {exc}")
        if file_entries is not None:
            try:
                save_trust_file(self.trust_file, file_entries)
            except OSError as exc:
                failed.append(f"trust file: {exc}")
        if failed:
            log.error("rolling back a refused change failed: %s", "; ".join(failed))
            return "rolling back failed too (" + "; ".join(failed) + ")"
        return "nothing changed"

    # -- emergency numbers -------------------------------------------------------------------
    def emergency_add(self, number: str) -> None:
        self._set_emergency(self.emergency.with_added(number))

    def emergency_remove(self, number: str) -> None:
        self._set_emergency(self.emergency.without(number))

    def _set_emergency(self, numbers: EmergencyNumbers) -> None:
        old = self.emergency
        state = self.state_dir / EMERGENCY_STATE if self.state_dir is not None else None
        previous = state.read_text() if state is not None and state.exists() else None
        if state is not None:
            state.parent.mkdir(parents=True, exist_ok=True)
            text = (
                "# Emergency numbers changed with clearipctl. They apply while the config's\n"
                "# emergency numbers are still `config`; delete this file to use the config's.\n"
                f"config = {json.dumps(self.config_numbers)}\n"
                f"numbers = {json.dumps(numbers.numbers())}\n"
            )
            write_atomically(state, text)
        if self.kernel is not None:
            try:
                self.kernel.set_emergency(numbers.numbers())
            except Exception as exc:
                with contextlib.suppress(Exception):
                    self.kernel.set_emergency(old.numbers())
                if state is not None:
                    with contextlib.suppress(OSError):
                        if previous is None:
                            state.unlink()
                        else:
                            write_atomically(state, previous)
                raise PolicyError(f"the kernel filter refused the change ({exc})") from exc
        self.emergency = numbers
        log.info("emergency numbers: %s", ", ".join(numbers.numbers()))

    # -- reading -------------------------------------------------------------------------------
    def kernel_status(self) -> dict[str, Any] | None:
        """The filter's interfaces and counters (and per interface, when it has them)."""
        if self.kernel is None:
            return None
        status: dict[str, Any] = {
            "interfaces": self.kernel.status(),
            "counters": self.kernel.counters(),
        }
        per_interface = getattr(self.kernel, "interface_counters", None)
        if per_interface is not None:
            status["per_interface"] = per_interface()
        return status

    def release_kernel(self) -> None:
        """At exit: let go of the kernel filter's handles; the filter stays attached, so the
        host stays protected while the relay restarts."""
        kernel = self.kernel
        if kernel is not None and hasattr(kernel, "close"):
            kernel.close()

    def describe_kernel(self) -> str:
        """``on (eth1 native, eth2 generic)``, ``on (auto: eth1 native; eth2 skipped: why)``
        or ``off (reason)``, for status lines."""
        if self.kernel is None:
            return f"off ({self.kernel_error})"
        parts, skipped = [], []
        for name, state in self.kernel.status().items():
            if state.get("note"):
                skipped.append(f"{name} skipped: {state['note']}")
            else:
                parts.append(f"{name} {state['mode']}" + ("" if state.get("attached") else " LOST"))
        prefix = f"{self.kernel_chosen_by}: " if self.kernel_chosen_by else ""
        return f"on ({prefix}{'; '.join([', '.join(parts) or 'no interfaces', *skipped])})"


def _saved_emergency(path: Path, config: list[str]) -> EmergencyNumbers | None:
    try:
        data = tomllib.loads(path.read_text())
        numbers = EmergencyNumbers(data.get("numbers", []))
        saved_config = sorted(validate_number(n) for n in data.get("config", []))
    except (ValueError, OSError, TypeError) as exc:
        log.error("ignoring %s (%s): using the config's emergency numbers", path, exc)
        return None
    if saved_config != config:
        log.warning(
            "the config's emergency numbers changed since %s was written: using the config's "
            "(%s); the runtime changes are kept in %s.old",
            path,
            ", ".join(config),
            path.name,
        )
        with contextlib.suppress(OSError):
            path.replace(path.with_name(path.name + ".old"))
        return None
    return numbers
