"""The garbage-collector policy rests on one fact: a call leaves no reference cycles behind."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter

from clearip.relay.service.gc_tuning import run_policy, start_policy
from lab.core_driver import Driver


def test_calls_leave_nothing_for_the_cycle_collector() -> None:
    driver = Driver()
    for n in range(50):  # warm the caches and the class machinery
        driver.call(n)
    gc.collect()
    gc.disable()
    try:
        for n in range(50, 550):
            driver.call(n)
        assert driver.core.active_calls == 0
        assert driver.core.counters["call:switch:200:relayed"] == 550
        # What lingers (RFC 6026) is dropped as the timers would drop it.
        driver.core.client_txns.clear()
        driver.core.server_txns.clear()
        driver.timers.clear()
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_policy_freezes_survivors_and_runs_a_bounded_full_collection() -> None:
    counters: Counter[str] = Counter()
    before = gc.get_threshold()
    try:
        start_policy()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] > before[0]

        async def run() -> None:
            task = asyncio.create_task(
                run_policy(counters, freeze_interval=0.01, full_interval=0.03)
            )
            for _ in range(500):  # a full collection of a big test process can take a while
                if counters["gc_full_collections"] >= 2:
                    break
                await asyncio.sleep(0.02)
            task.cancel()

        asyncio.run(run())
        assert counters["gc_full_collections"] >= 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
