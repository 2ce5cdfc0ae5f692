"""The kernel counters' layout is read from the C file, the one place it is defined."""

from __future__ import annotations

import pytest

from clearip.bpf.layout import IFACE_SLOTS, OUTCOMES, SOURCE, counter_layout


def test_the_loader_reads_the_outcomes_and_slots_from_the_c_file() -> None:
    source = SOURCE.read_text()
    assert counter_layout(source) == (OUTCOMES, IFACE_SLOTS)
    assert OUTCOMES[:2] == ("passed_trusted", "dropped_untrusted")
    for name in OUTCOMES:  # each outcome is counted somewhere in the program
        assert f"COUNTER_{name.upper()}, XDP_" in source or f"[COUNTER_{name.upper()}]" in source


def test_a_gap_in_the_counter_numbers_is_an_error() -> None:
    source = "#define COUNTER_A 0\n#define COUNTER_C 2\n#define COUNTERS 2\n#define IFACE_SLOTS 4\n"
    with pytest.raises(ValueError, match="COUNTER_"):
        counter_layout(source)
