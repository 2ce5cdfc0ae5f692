"""Trust list: parsing, longest-prefix lookup, atomic round trip through the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from clearip.relay.policy.trust import (
    Role,
    TrustEntry,
    TrustError,
    TrustList,
    load_trust_file,
    parse_cidr,
    save_trust_file,
)


def test_longest_prefix_wins() -> None:
    trust = TrustList(
        [
            TrustEntry(parse_cidr("10.0.0.0/8"), Role.PROVIDER),
            TrustEntry(parse_cidr("10.1.2.3/32"), Role.SWITCH),
            TrustEntry(parse_cidr("2001:db8::/32"), Role.SWITCH),
        ]
    )
    assert trust.role_of("10.1.2.3") is Role.SWITCH
    assert trust.role_of("10.9.9.9") is Role.PROVIDER
    assert trust.role_of("2001:db8::1") is Role.SWITCH
    assert trust.role_of("::ffff:10.1.2.3") is Role.SWITCH
    assert trust.role_of("192.0.2.1") is None
    assert trust.role_of("not-an-ip") is None


def test_changes_invalidate_the_cache() -> None:
    trust = TrustList()
    assert trust.role_of("192.0.2.1") is None
    trust.add(TrustEntry(parse_cidr("192.0.2.0/24"), Role.SWITCH))
    assert trust.role_of("192.0.2.1") is Role.SWITCH
    trust.remove(parse_cidr("192.0.2.0/24"))
    assert trust.role_of("192.0.2.1") is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [("10.0.0.1/24", "host bits"), ("300.1.1.1", "invalid"), ("", "invalid")],
)
def test_bad_cidr_says_what_to_write(text: str, needle: str) -> None:
    with pytest.raises(TrustError, match=r"192\.0\.2\.0/24") as info:
        parse_cidr(text)
    assert needle in str(info.value)


def test_duplicate_and_missing_entries_are_errors() -> None:
    trust = TrustList([TrustEntry(parse_cidr("192.0.2.1/32"), Role.SWITCH)])
    with pytest.raises(TrustError, match="already"):
        trust.add(TrustEntry(parse_cidr("192.0.2.1/32"), Role.PROVIDER))
    with pytest.raises(TrustError, match="not in the trust list"):
        trust.remove(parse_cidr("192.0.2.2/32"))


def test_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "trust.toml"
    entries = [
        TrustEntry(parse_cidr("192.0.2.10/32"), Role.SWITCH, 'core "A"'),
        TrustEntry(parse_cidr("2001:db8:1::/48"), Role.PROVIDER),
    ]
    save_trust_file(path, entries)
    assert load_trust_file(path).entries() == entries
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[[source]]\nrole = "switch"\n', "missing cidr"),
        ('[[source]]\ncidr = "192.0.2.1"\nrole = "sbc"\n', "unknown role 'sbc'"),
        ('[[source]]\ncidr = "192.0.2.1"\nrole = "switch"\ncolour = 1\n', "colour"),
        ("[[source]\n", "cannot read"),
    ],
)
def test_bad_file_names_entry_and_fix(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "trust.toml"
    path.write_text(body)
    with pytest.raises(TrustError, match=needle) as info:
        load_trust_file(path)
    assert str(path) in str(info.value)
