"""``[xdp] interfaces``: the "auto" rule (a pure function of links and listen addresses), the
config keys, and the port bitmap the loader writes. No root needed; the same rule on real
interfaces in a namespace is in test_xdp_filter.py."""

from __future__ import annotations

import pytest

from clearip.bpf.interfaces import Link, pick
from clearip.bpf.layout import port_words
from clearip.relay.config import ConfigError, XdpConfig
from clearip.relay.config_toml import config_from_data

LO = Link("lo", 1, ethernet=False, addresses=("127.0.0.1", "::1"))
ETH0 = Link("eth0", 2, addresses=("192.0.2.10", "2001:db8::10", "fe80::1"))
ETH1 = Link("eth1", 3, addresses=("198.51.100.10",))
DOWN = Link("eth2", 4, up=False, addresses=("203.0.113.10",))
WG = Link("wg0", 5, ethernet=False, kind="wireguard", addresses=("10.8.0.1",))
VLAN = Link("eth1.20", 6, kind="vlan", lower=3, addresses=("10.20.0.1",))
BOND = Link("bond0", 7, kind="bond", addresses=("10.30.0.1",))
SLAVE = Link("eth3", 8, master=7)
BRIDGE = Link("br0", 9, kind="bridge", addresses=("10.40.0.1",))
PORT = Link("veth-c1", 10, kind="veth", master=9, lower=11)
LINKS = [LO, ETH0, ETH1, DOWN, WG, VLAN, BOND, SLAVE, BRIDGE, PORT]


@pytest.mark.parametrize(
    ("addresses", "names"),
    [
        # A wildcard listener receives everywhere: up, Ethernet, not a bond/bridge member, not
        # a VLAN whose parent is picked (the parent's filter sees its tagged frames).
        (["0.0.0.0"], ["eth0", "eth1", "bond0", "br0"]),
        (["::"], ["eth0", "eth1", "bond0", "br0"]),
        (["0.0.0.0", "::", "192.0.2.10"], ["eth0", "eth1", "bond0", "br0"]),
        # A listener on an address: the interface carrying it (even down, or a VLAN).
        (["198.51.100.10"], ["eth1"]),
        (["2001:db8:0::10"], ["eth0"]),  # compared as addresses, not as text
        (["fe80::1%eth0"], ["eth0"]),
        (["10.20.0.1", "192.0.2.10"], ["eth0", "eth1.20"]),  # index order
        (["203.0.113.10"], ["eth2"]),
        ([], []),
    ],
)
def test_auto_picks_the_interfaces_carrying_the_listeners(
    addresses: list[str], names: list[str]
) -> None:
    assert list(pick(LINKS, addresses).names) == names


def test_auto_notes_what_it_cannot_protect() -> None:
    chosen = pick(LINKS, ["127.0.0.1", "10.8.0.1", "192.0.2.99", "not-an-address"])
    assert chosen.names == ()
    assert chosen.notes == (
        "127.0.0.1 is on lo: not filtered (loopback or not Ethernet)",
        "10.8.0.1 is on wg0: not filtered (loopback or not Ethernet)",
        "no interface here carries the listen address 192.0.2.99",
        "no interface here carries the listen address not-an-address",
    )


def test_a_vlan_stays_when_its_parent_is_not_picked() -> None:
    parent_down = [LO, Link("eth1", 3, up=False), VLAN]
    assert pick(parent_down, ["0.0.0.0"]).names == ("eth1.20",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), (["eth1", "eth2"], ("eth1", "eth2")), ([], ())],
)
def test_interfaces_config(value: object, expected: object) -> None:
    assert config_from_data({"xdp": {"interfaces": value}}).xdp.interfaces == expected


def test_auto_and_keep_foreign_programs_are_the_defaults() -> None:
    assert XdpConfig().interfaces == "auto" and XdpConfig().replace_foreign is False
    assert config_from_data({}).xdp == XdpConfig()
    assert config_from_data({"xdp": {"replace_foreign": True}}).xdp.replace_foreign is True


@pytest.mark.parametrize(
    ("value", "needles"),
    [
        ("eth0", ["xdp.interfaces", "'eth0'", '"auto"']),
        ("Auto", ["xdp.interfaces", "'Auto'"]),
        ([1], ["xdp.interfaces"]),
        (["a-very-long-interface-name"], ["a-very-long-interface-name", "not an interface"]),
        (["eth0/1"], ["eth0/1"]),
        ([""], ["''"]),
    ],
)
def test_bad_interfaces_name_the_key_and_the_fix(value: object, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_data({"xdp": {"interfaces": value}})
    for needle in needles:
        assert needle in str(info.value)


def test_replace_foreign_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"xdp\.replace_foreign"):
        config_from_data({"xdp": {"replace_foreign": "yes"}})


def test_port_bitmap() -> None:
    words = port_words([5060], [5060, 5061, 65535])
    assert len(words) == 2048
    assert words[5060 // 64] == 1 << (5060 % 64)
    assert words[1024 + 5060 // 64] == (1 << (5060 % 64)) | (1 << (5061 % 64))
    assert words[2047] == 1 << 63
    assert sum(bin(w).count("1") for w in words) == 4
    with pytest.raises(ValueError, match="invalid port 0"):
        port_words([0], [])
