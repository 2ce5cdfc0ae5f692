"""SourcePolicy: a change reaches the file, the kernel map and the relay's list together, and a
refusal anywhere leaves all three as they were. No root needed: the kernel is a fake that
behaves like EdgeFilter's maps and can be told to refuse."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.sources import PolicyError, SourcePolicy
from clearip.relay.policy.trust import (
    IPNetwork,
    Role,
    TrustEntry,
    TrustError,
    TrustList,
    load_trust_file,
    parse_cidr,
    save_trust_file,
)

SWITCH = TrustEntry(parse_cidr("192.0.2.10"), Role.SWITCH, "core switch")
CARRIER = TrustEntry(parse_cidr("2001:db8::/32"), Role.PROVIDER)
NEW = TrustEntry(parse_cidr("198.51.100.0/24"), Role.PROVIDER, "carrier B")


class FakeKernel:
    """The EdgeFilter calls the policy makes, on dicts; ``refuse`` makes the next write fail."""

    def __init__(self) -> None:
        self.trust: dict[IPNetwork, Role] = {}
        self.emergency: set[str] = set()
        self.refuse = False
        self.calls: list[str] = []

    def _write(self, what: str) -> None:
        self.calls.append(what)
        if self.refuse:
            self.refuse = False
            raise OSError(28, "map full")

    def set_trust(self, entries: Iterable[TrustEntry]) -> None:
        self._write("set_trust")
        self.trust = {e.network: e.role for e in entries}

    def add_trust(self, entry: TrustEntry) -> None:
        self._write("add_trust")
        self.trust[entry.network] = entry.role

    def remove_trust(self, network: IPNetwork) -> None:
        self._write("remove_trust")
        self.trust.pop(network, None)

    def set_emergency(self, numbers: Iterable[str]) -> None:
        self._write("set_emergency")
        self.emergency = set(numbers)

    def counters(self) -> dict[str, int]:
        return {"dropped_untrusted": 7}

    def top_dropped(self, n: int = 10) -> list[tuple[str, int]]:
        return [("203.0.113.9", 7)][:n]

    def status(self) -> dict[str, dict[str, object]]:
        return {"eth1": {"mode": "native", "attached": True}}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[SourcePolicy, FakeKernel, Path]:
    trust_file = tmp_path / "trust.toml"
    save_trust_file(trust_file, [SWITCH, CARRIER])
    policy = SourcePolicy.load(trust_file, ["911", "933"], tmp_path / "state")
    kernel = FakeKernel()
    kernel.set_trust(policy.trust)
    kernel.set_emergency(policy.emergency.numbers())
    kernel.calls.clear()
    policy.attach_kernel(kernel)
    return policy, kernel, trust_file


def in_step(policy: SourcePolicy, kernel: FakeKernel, trust_file: Path) -> list[str]:
    """The three views agree; returns the CIDRs."""
    memory = {e.network: e.role for e in policy.trust}
    on_disk = {e.network: e.role for e in load_trust_file(trust_file)}
    assert memory == on_disk == kernel.trust
    return sorted(str(n) for n in memory)


def test_add_remove_replace_reach_file_kernel_and_relay(
    setup: tuple[SourcePolicy, FakeKernel, Path],
) -> None:
    policy, kernel, trust_file = setup
    role_of = policy.trust.role_of  # what the relay bound at start
    assert role_of("198.51.100.7") is None

    policy.trust_add(NEW)
    assert in_step(policy, kernel, trust_file) == [
        "192.0.2.10/32",
        "198.51.100.0/24",
        "2001:db8::/32",
    ]
    assert role_of("198.51.100.7") is Role.PROVIDER
    assert kernel.calls == ["add_trust"]  # one map update, not a rewrite of the whole map
    assert load_trust_file(trust_file).entries()[-1].note == "carrier B"

    removed = policy.trust_remove(parse_cidr("192.0.2.10"))
    assert removed == SWITCH
    assert role_of("192.0.2.10") is None
    assert in_step(policy, kernel, trust_file) == ["198.51.100.0/24", "2001:db8::/32"]

    policy.trust_replace([SWITCH])
    assert in_step(policy, kernel, trust_file) == ["192.0.2.10/32"]
    assert role_of("198.51.100.7") is None and role_of("192.0.2.10") is Role.SWITCH


def test_invalid_changes_touch_nothing(setup: tuple[SourcePolicy, FakeKernel, Path]) -> None:
    policy, kernel, trust_file = setup
    before = trust_file.read_bytes()
    with pytest.raises(TrustError, match="already"):
        policy.trust_add(TrustEntry(SWITCH.network, Role.PROVIDER))
    with pytest.raises(TrustError, match="not in the trust list"):
        policy.trust_remove(parse_cidr("203.0.113.0/24"))
    with pytest.raises(TrustError, match="already"):
        policy.trust_replace([NEW, NEW])
    assert kernel.calls == []
    assert trust_file.read_bytes() == before
    assert len(policy.trust) == 2


@pytest.mark.parametrize("change", ["add", "remove", "replace", "reload"])
def test_a_kernel_refusal_leaves_file_kernel_and_relay_as_they_were(
    setup: tuple[SourcePolicy, FakeKernel, Path], change: str
) -> None:
    policy, kernel, trust_file = setup
    if change == "reload":
        save_trust_file(trust_file, [NEW])  # the operator edited the file, then SIGHUP
    before_file = trust_file.read_bytes()
    before = in_step(policy, kernel, trust_file) if change != "reload" else None
    kernel.refuse = True
    with pytest.raises(PolicyError, match=r"map full.*nothing changed"):
        if change == "add":
            policy.trust_add(NEW)
        elif change == "remove":
            policy.trust_remove(SWITCH.network)
        elif change == "replace":
            policy.trust_replace([NEW])
        else:
            policy.reload()
    assert trust_file.read_bytes() == before_file
    assert sorted(str(e.network) for e in policy.trust) == ["192.0.2.10/32", "2001:db8::/32"]
    assert {str(n) for n in kernel.trust} == {"192.0.2.10/32", "2001:db8::/32"}
    if before is not None:
        assert in_step(policy, kernel, trust_file) == before


def test_a_file_that_cannot_be_written_changes_nothing(tmp_path: Path) -> None:
    policy = SourcePolicy(TrustList([SWITCH]), tmp_path / "gone" / "trust.toml", EmergencyNumbers())
    kernel = FakeKernel()
    policy.attach_kernel(kernel)
    with pytest.raises(OSError):
        policy.trust_add(NEW)
    assert kernel.calls == [] and len(policy.trust) == 1


def test_reload_rereads_the_file_and_a_broken_file_keeps_the_list(
    setup: tuple[SourcePolicy, FakeKernel, Path],
) -> None:
    policy, kernel, trust_file = setup
    save_trust_file(trust_file, [NEW])
    policy.reload()
    assert in_step(policy, kernel, trust_file) == ["198.51.100.0/24"]
    trust_file.write_text('[[source]]\ncidr = "10.0.0.1/8"\nrole = "switch"\n')
    with pytest.raises(TrustError, match="host bits"):
        policy.reload()
    assert [str(e.network) for e in policy.trust] == ["198.51.100.0/24"]
    assert list(kernel.trust) == [ipaddress.ip_network("198.51.100.0/24")]


def test_emergency_changes_reach_kernel_and_survive_a_restart(
    setup: tuple[SourcePolicy, FakeKernel, Path], tmp_path: Path
) -> None:
    policy, kernel, trust_file = setup
    policy.emergency_add("112")
    policy.emergency_remove("933")
    assert policy.emergency.numbers() == ["112", "911"]
    assert kernel.emergency == {"112", "911"}
    assert "112" in policy.emergency and "933" not in policy.emergency
    with pytest.raises(ValueError, match="not an emergency number"):
        policy.emergency_remove("999")
    with pytest.raises(ValueError, match="digits only"):
        policy.emergency_add("11a")

    again = SourcePolicy.load(trust_file, ["933", "911"], tmp_path / "state")
    assert again.emergency.numbers() == ["112", "911"]  # same config: runtime changes kept


def test_a_changed_config_wins_over_runtime_emergency_changes(
    setup: tuple[SourcePolicy, FakeKernel, Path], tmp_path: Path
) -> None:
    policy, _, trust_file = setup
    policy.emergency_add("112")
    state = tmp_path / "state" / "emergency.toml"
    assert state.exists()
    fresh = SourcePolicy.load(trust_file, ["911", "933", "988"], tmp_path / "state")
    assert fresh.emergency.numbers() == ["911", "933", "988"]
    assert not state.exists() and state.with_name("emergency.toml.old").exists()


def test_an_emergency_change_the_kernel_refuses_is_undone(
    setup: tuple[SourcePolicy, FakeKernel, Path], tmp_path: Path
) -> None:
    policy, kernel, _ = setup
    kernel.refuse = True
    with pytest.raises(PolicyError):
        policy.emergency_add("112")
    assert policy.emergency.numbers() == ["911", "933"]
    assert kernel.emergency == {"911", "933"}
    assert not (tmp_path / "state" / "emergency.toml").exists()


def test_without_a_state_dir_emergency_changes_are_runtime_only(tmp_path: Path) -> None:
    save_trust_file(tmp_path / "trust.toml", [])
    policy = SourcePolicy.load(tmp_path / "trust.toml", ["911"])
    policy.emergency_add("112")
    assert policy.emergency.numbers() == ["112", "911"]
    assert os.listdir(tmp_path) == ["trust.toml"]


def test_kernel_description_and_status(setup: tuple[SourcePolicy, FakeKernel, Path]) -> None:
    policy, _, _ = setup
    assert policy.describe_kernel() == "on (eth1 native)"
    assert policy.kernel_status() == {
        "interfaces": {"eth1": {"mode": "native", "attached": True}},
        "counters": {"dropped_untrusted": 7},
    }
    policy.attach_kernel(None, "no kernel headers at /lib/modules/x/build")
    assert policy.describe_kernel() == "off (no kernel headers at /lib/modules/x/build)"
    assert policy.kernel_status() is None
