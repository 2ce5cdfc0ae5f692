"""What the XDP filter's loader reads from ``xdp_filter.c`` or must write as the C file
expects it: the counter outcomes and per-interface slots (``COUNTER_*``, ``COUNTERS``,
``IFACE_SLOTS``, defined only there) and the ``sip_ports`` bitmap's words."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

SOURCE = Path(__file__).with_name("xdp_filter.c")


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
