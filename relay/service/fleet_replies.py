"""The supervisor's answers about the whole relay: ``status``, ``stats`` and what ``/metrics``
reads.

Each is the same three steps: ask every worker over its private control socket
(:meth:`~clearip.relay.service.worker_link.WorkerLink.gather`), add what only the supervisor
knows (its uptime, the trust list and emergency numbers, the kernel filter and steering
programs, the counters of workers that died), and sum with :mod:`clearip.relay.service.fleet`.
They live here, apart from :mod:`clearip.relay.service.supervisor`, so that module is about
keeping the worker processes; the sums themselves stay pure in :mod:`fleet`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

from clearip.relay.policy.sources import SourcePolicy
from clearip.relay.service.fleet import (
    WorkerView,
    merge_snapshots,
    merge_stats,
    merge_status,
    workers_block,
)
from clearip.relay.service.kernel_steering import steering_counters
from clearip.relay.service.worker_link import WorkerLink

if TYPE_CHECKING:
    from clearip.bpf.reuseport import ReuseportSteering


class Supervised(Protocol):
    """What the answers read from the supervisor."""

    count: int
    started: float
    steering: dict[str, ReuseportSteering]
    steering_state: str
    counters: Counter[str]
    policy: SourcePolicy
    link: WorkerLink


def own_counters(supervisor: Supervised) -> Counter[str]:
    """The supervisor's counters plus those of workers that died (see
    :meth:`WorkerLink.retire`)."""
    return supervisor.counters + supervisor.link.retired


def own_status(supervisor: Supervised) -> dict[str, Any]:
    """The fields of ``status`` that only the supervisor knows."""
    return {
        "uptime_s": round(time.time() - supervisor.started, 1),
        "trust_entries": len(supervisor.policy.trust),
        "kernel_filter": supervisor.policy.describe_kernel(),
        "emergency_numbers": supervisor.policy.emergency.numbers(),
    }


def _workers_block(supervisor: Supervised, views: list[WorkerView]) -> dict[str, Any]:
    return workers_block(
        supervisor.count, views, supervisor.steering_state, supervisor.counters["worker_restarts"]
    )


async def status(supervisor: Supervised) -> dict[str, Any]:
    """``clearipctl status`` for the whole relay."""
    views = await supervisor.link.gather("status")
    return merge_status(views, own_status(supervisor), _workers_block(supervisor, views))


async def stats(supervisor: Supervised) -> dict[str, Any]:
    """``clearipctl stats`` for the whole relay."""
    views = await supervisor.link.gather("stats")
    return merge_stats(
        views,
        own_counters(supervisor),
        supervisor.policy.kernel_status(),
        steering_counters(supervisor.steering),
    )


async def snapshot(supervisor: Supervised) -> dict[str, Any]:
    """What the metrics collector reads at a scrape, for the whole relay."""
    views = await supervisor.link.gather("snapshot")
    own = {
        "trust_entries": len(supervisor.policy.trust),
        "kernel": supervisor.policy.kernel_status(),
    }
    return merge_snapshots(
        views,
        own_counters(supervisor),
        own,
        _workers_block(supervisor, views),
        steering_counters(supervisor.steering),
        retired_latency=supervisor.link.retired_latency,
    )
