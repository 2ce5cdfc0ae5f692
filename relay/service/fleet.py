"""The workers seen as one relay: their status, counters and snapshots added up (pure).

The supervisor asks every worker over its control socket and hands the answers here, keyed
by worker index; a worker that is down or did not answer is ``None``. Sums cover the workers
that answered; the per-worker view says which did not. Nothing here does I/O, so the rules
(what is summed, what is taken from the supervisor, what "running" means) are tested alone.

Rules:
- counters, gauges of calls/transactions/connections and the ClearIP latency histogram are
  summed; the supervisor's own counters (``worker_restarts``, and what dead workers had
  counted) join the sums;
- the trust list, emergency numbers and the kernel filter belong to the supervisor;
- an upstream is ``up`` only when it is up in every worker that answered (each worker has
  its own ClearIP connection), otherwise the first other state is shown;
- ``running`` counts the workers that are up and answered.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from clearip.relay.proxy.latency import LatencyHistogram

TOTALS = ("active_calls", "active_transactions", "connections")


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the supervisor knows of one worker: its process, and what it last answered."""

    index: int
    pid: int | None
    state: str  # "starting", "up", "down", "stopping"
    restarts: int
    answer: dict[str, Any] | None = None  # its status, stats or snapshot; None: no answer

    @property
    def serving(self) -> bool:
        return self.state == "up" and self.answer is not None


def workers_block(
    configured: int, views: Iterable[WorkerView], steering: str, restarts: int = 0
) -> dict[str, Any]:
    """``{"configured", "running", "steering", "restarts"}`` for status and metrics."""
    return {
        "configured": configured,
        "running": sum(view.serving for view in views),
        "steering": steering,
        "restarts": restarts,
    }


def sum_counters(parts: Iterable[Mapping[str, int] | None]) -> Counter[str]:
    total: Counter[str] = Counter()
    for part in parts:
        if part:
            total.update({key: int(value) for key, value in part.items()})
    return total


def merge_upstreams(
    statuses: Iterable[Mapping[str, Any] | None], *, silent: int = 0
) -> dict[str, dict[str, Any]]:
    """Each upstream role as one status: ``up`` only if up in every worker. ``silent``:
    workers that did not answer (starting, restarting): while there are any, a link up in
    all the others is ``starting``, since the calls a silent worker owns cannot be relayed."""
    merged: dict[str, dict[str, Any]] = {}
    for status in statuses:
        for role, link in (status or {}).items():
            seen = merged.get(role)
            if seen is None:
                merged[role] = {"uri": link.get("uri"), "state": link.get("state"), "up": 0}
                seen = merged[role]
            elif seen["state"] == "up" and link.get("state") != "up":
                seen["state"] = link.get("state")
            seen["up"] += link.get("state") == "up"
    if silent:
        for seen in merged.values():
            if seen["state"] == "up":
                seen["state"] = "starting"
    return merged


def _answers(views: Iterable[WorkerView]) -> list[dict[str, Any]]:
    return [view.answer for view in views if view.answer is not None]


def merge_status(
    views: list[WorkerView], supervisor: dict[str, Any], workers: dict[str, Any]
) -> dict[str, Any]:
    """``clearipctl status``: the supervisor's own fields, the workers' totals, the
    ``workers`` block and one entry per worker."""
    answers = _answers(views)
    out: dict[str, Any] = {
        "uptime_s": supervisor["uptime_s"],
        "listeners": answers[0]["listeners"] if answers else [],
        "upstreams": merge_upstreams(
            (a.get("upstreams") for a in answers), silent=len(views) - len(answers)
        ),
    }
    for key in TOTALS:
        out[key] = sum(int(a.get(key, 0)) for a in answers)
    out.update(
        {
            "trust_entries": supervisor["trust_entries"],
            "kernel_filter": supervisor["kernel_filter"],
            "emergency_numbers": supervisor["emergency_numbers"],
            "workers": workers,
        }
    )
    per_worker: dict[str, Any] = {}
    for view in views:
        entry: dict[str, Any] = {"pid": view.pid, "state": view.state, "restarts": view.restarts}
        if view.answer is not None:
            entry.update({key: view.answer.get(key, 0) for key in TOTALS})
            entry["upstreams"] = {
                role: link.get("state") for role, link in view.answer.get("upstreams", {}).items()
            }
        elif view.state == "up":
            entry["state"] = "not answering"
        per_worker[str(view.index)] = entry
    out["per_worker"] = per_worker
    return out


def merge_stats(
    views: list[WorkerView],
    own: Mapping[str, int],
    kernel: dict[str, Any] | None,
    steering: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """``clearipctl stats``: counters summed over the workers (plus the supervisor's), the
    kernel's, and each worker's own."""
    relay = sum_counters([own, *(a.get("relay") for a in _answers(views))])
    return {
        "relay": dict(sorted(relay.items())),
        "kernel": kernel,
        "steering": steering,
        "per_worker": {
            str(view.index): dict(sorted((view.answer or {}).get("relay", {}).items()))
            for view in views
        },
    }


def merge_snapshots(
    views: list[WorkerView],
    own: Mapping[str, int],
    supervisor: dict[str, Any],
    workers: dict[str, Any],
    steering: dict[str, dict[str, int]],
    *,
    retired_latency: LatencyHistogram | None = None,
) -> dict[str, Any]:
    """What the metrics collector reads (see :class:`clearip.relay.service.metrics.RelayCollector`),
    from the workers' ``snapshot`` answers: sums, plus ``per_worker`` for the labelled view.
    ``own`` and ``retired_latency`` carry what workers that died had counted."""
    answers = _answers(views)
    latency = LatencyHistogram()
    if retired_latency is not None:
        latency.add(retired_latency)
    for answer in answers:
        latency.add(LatencyHistogram.from_dict(answer["latency"]))
    upstreams = merge_upstreams(
        (a.get("upstreams") for a in answers), silent=len(views) - len(answers)
    )
    snapshot: dict[str, Any] = {
        "counters": sum_counters([own, *(a.get("counters") for a in answers)]),
        "latency": latency,
        "trust_entries": supervisor["trust_entries"],
        "upstreams": upstreams,
        "kernel": supervisor["kernel"],
        "workers": workers,
        "steering": steering,
    }
    for key in TOTALS:
        snapshot[key] = sum(int(a.get(key, 0)) for a in answers)
    snapshot["per_worker"] = {
        view.index: {
            "up": view.serving,
            "restarts": view.restarts,
            "counters": (view.answer or {}).get("counters", {}),
            "active_calls": (view.answer or {}).get("active_calls", 0),
            "active_transactions": (view.answer or {}).get("active_transactions", 0),
        }
        for view in views
    }
    return snapshot


def merge_reload(views: Iterable[WorkerView]) -> tuple[dict[str, Any] | None, list[str]]:
    """The workers' reload reports as one: the first that answered (they read the same file;
    None when none did), and a line for each worker that did not reload and for reports that
    differ."""
    views = list(views)
    problems = [f"worker {v.index} did not reload ({v.state})" for v in views if v.answer is None]
    reports = _answers(views)
    if not reports:
        return None, problems
    if any(r != reports[0] for r in reports):
        problems.append(f"the workers' reload reports differ: {json.dumps(reports)}")
    return reports[0], problems
