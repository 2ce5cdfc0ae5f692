"""What the demo prints: a ladder and a verdict per call, a summary table, or JSON.

Rules: :class:`Outcome` holds everything printed about one call, :class:`KernelReport` what
the kernel filter counted (``--xdp`` only); nothing here runs a call. Colour is used only when
the caller asks for it (a terminal, no ``NO_COLOR``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from clearip.relay.labkit.demo.calls import Scenario


@dataclass
class Outcome:
    scenario: Scenario
    observed: str
    ok: bool
    clearip_ms: float | None
    total_ms: float
    ladder: list[str]


@dataclass
class KernelReport:
    status: str
    counters: dict[str, int]
    top_dropped: list[tuple[str, int]]


def print_report(outcomes: list[Outcome], *, colour: bool) -> None:
    green, red, bold, reset = (
        ("\033[32m", "\033[31m", "\033[1m", "\033[0m") if colour else ("", "", "", "")
    )
    for outcome in outcomes:
        mark = f"{green}ok{reset}" if outcome.ok else f"{red}FAILED{reset}"
        print(f"\n{bold}Call {outcome.scenario.name}{reset}  [{mark}]")
        for line in outcome.ladder:
            print(line)
    print(f"\n{bold}Summary{reset}")
    header = f"  {'call':44} {'expected':34} {'observed':44} {'ClearIP':>9} {'total':>9}"
    print(header)
    for o in outcomes:
        clearip = "-" if o.clearip_ms is None else f"{o.clearip_ms:.1f} ms"
        mark = f"{green}ok{reset}" if o.ok else f"{red}FAILED{reset}"
        row = f"  {o.scenario.name[:44]:44} {o.scenario.expected[:34]:34} "
        row += f"{o.observed[:44]:44} {clearip:>9} {o.total_ms:7.1f} ms"
        print(f"{row}  {mark}")
    failed = [o for o in outcomes if not o.ok]
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} calls behaved as expected.")


def _as_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "call": outcome.scenario.name,
        "expected": outcome.scenario.expected,
        "observed": outcome.observed,
        "ok": outcome.ok,
        "clearip_ms": outcome.clearip_ms,
        "total_ms": round(outcome.total_ms, 1),
    }


def print_json(outcomes: list[Outcome]) -> None:
    """``--json``: one object per call, without the ladders."""
    print(json.dumps([_as_json(o) for o in outcomes], indent=2))


def print_kernel_report(kernel_report: KernelReport) -> None:
    """``--xdp``: the kernel filter's state, its counters and the sources it dropped most."""
    print(f"\nKernel filter: {kernel_report.status}")
    for name, value in kernel_report.counters.items():
        print(f"  {name:20s} {value}")
    for address, count in kernel_report.top_dropped:
        print(f"  dropped from {address}: {count}")
