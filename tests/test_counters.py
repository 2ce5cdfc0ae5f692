"""Counters are declared once (relay/service/counters.py): every key the product increments is in
the table, and README's counter table is the generated one."""

from __future__ import annotations

import re
from pathlib import Path

from clearip.relay.service.counters import COUNTERS, markdown_table, spec_for

ROOT = Path(__file__).resolve().parents[1]
# counters["key"] / counters[f"prefix{...}"] in the relay (the lab emulator has its own).
INCREMENT = re.compile(r"""counters\[(f?)"([^"]+)"\]""")
SOURCES = [
    path
    for folder in ("relay", "ctl", "bpf")
    for path in (ROOT / folder).rglob("*.py")
    if "emulator" not in path.parts and "demo" not in path.parts
]


def incremented_keys() -> set[tuple[str, bool]]:
    """(key or f-string literal prefix, is_prefix) for every counter the code touches."""
    found: set[tuple[str, bool]] = set()
    for path in SOURCES:
        for is_f, key in INCREMENT.findall(path.read_text()):
            if is_f and "{" in key:
                found.add((key.split("{", 1)[0], True))
            else:
                found.add((key, False))
    return found


def test_every_incremented_counter_is_declared() -> None:
    keys = incremented_keys()
    assert len(keys) > 40, "the scan found too little: check the pattern"
    families = {spec.key for spec in COUNTERS if spec.labels}
    undeclared = []
    for key, is_prefix in sorted(keys):
        if is_prefix:
            # clearip_{why}: each value it takes is declared on its own (timeout, unreachable)
            if key not in families and key != "clearip_":
                undeclared.append(f"{key}... (a family prefix)")
        elif spec_for(key) is None:
            undeclared.append(key)
    assert not undeclared, f"declare these in relay/service/counters.py: {undeclared}"


def test_declarations_are_unique_and_named_like_prometheus_counters() -> None:
    keys = [spec.key for spec in COUNTERS]
    metrics = [spec.metric for spec in COUNTERS]
    assert len(set(keys)) == len(keys)
    assert len(set(metrics)) == len(metrics)
    for metric in metrics:
        assert re.fullmatch(r"clearip_[a-z0-9_]+", metric) and not metric.endswith("_total")


def test_families_split_their_label_values() -> None:
    assert spec_for("parse_error_via") == (spec_for("parse_error_x")[0], ("via",))  # type: ignore[index]
    spec, values = spec_for("call:switch:503:overload")  # type: ignore[misc]
    assert (spec.metric, values) == ("clearip_calls", ("switch", "503", "overload"))
    assert spec_for("no_such_counter") is None


def test_readme_counter_table_is_generated() -> None:
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- counters:begin -->\n", "<!-- counters:end -->"
    assert begin in readme and end in readme, "README lost its counter table markers"
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == markdown_table(), "regenerate: python -m clearip.relay.service.counters"
