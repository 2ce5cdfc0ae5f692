"""How clearipctl shows the daemon's answers on a terminal: aligned tables that fit its width,
nested answers as dotted keys, and a supervisor's per-worker views."""

from __future__ import annotations

import shutil
from typing import Any


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Aligned columns; when the terminal is too narrow the widest column is shortened
    (ending in '…') until the table fits."""
    width = shutil.get_terminal_size((100, 20)).columns
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    # The last column (notes, values) gives way first, then the widest.
    while sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 8:
        column = len(widths) - 1 if widths[-1] > 8 else widths.index(max(widths))
        widths[column] -= 1
    lines = []
    for row in cells:
        fitted = [c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(row, widths, strict=True)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(fitted, widths, strict=True)).rstrip())
    return "\n".join(lines)


def flatten(data: Any, prefix: str = "") -> list[list[str]]:
    """Nested dicts as dotted keys; lists as comma-separated values."""
    rows: list[list[str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            rows += flatten(value, f"{prefix}{key}.")
    elif isinstance(data, list):
        rows.append([prefix.rstrip("."), ", ".join(str(v) for v in data) or "-"])
    else:
        rows.append([prefix.rstrip("."), "-" if data is None else str(data)])
    return rows


def workers_view(command: str, result: dict[str, Any]) -> str:
    """A supervisor's answer (workers > 1): the totals, then one column or row per worker."""
    per_worker: dict[str, dict[str, Any]] = result["per_worker"]
    rest = {k: v for k, v in result.items() if k != "per_worker"}
    indexes = sorted(per_worker, key=int)
    if command == "stats":
        relay = rest.pop("relay", {})
        names = sorted(set(relay).union(*(per_worker[i] for i in indexes)))
        rows = [
            [name, str(relay.get(name, 0)), *(str(per_worker[i].get(name, 0)) for i in indexes)]
            for name in names
        ]
        counters = table(rows, ["COUNTER", "TOTAL", *(f"WORKER {i}" for i in indexes)])
        return counters + "\n\n" + table(flatten(rest), ["WHAT", "VALUE"])
    rows = []
    for i in indexes:
        view = per_worker[i]
        upstreams = view.get("upstreams") or {}
        rows.append(
            [
                i,
                str(view.get("pid") or "-"),
                str(view.get("state")),
                str(view.get("restarts", 0)),
                str(view.get("active_calls", "-")),
                str(view.get("active_transactions", "-")),
                str(view.get("connections", "-")),
                ", ".join(f"{role} {state}" for role, state in upstreams.items()) or "-",
            ]
        )
    headers = ["WORKER", "PID", "STATE", "RESTARTS", "CALLS", "TRANSACTIONS", "CONNECTIONS"]
    return table(flatten(rest), ["WHAT", "VALUE"]) + "\n\n" + table(rows, [*headers, "CLEARIP"])
