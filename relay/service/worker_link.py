"""The supervisor's conversation with its workers, over their private control sockets.

Rules: a worker is asked only while it is up, and one that does not answer within ASK_TIMEOUT
is treated as silent (None), never waited on; a serving worker silent for UNANSWERED_LIMIT
polls in a row is killed (its keeper restarts it); what a worker last reported is kept, so
when it dies its counters and latency stay in the totals (:meth:`WorkerLink.retire`) and summed
Prometheus counters never go backwards; the policy the supervisor decided is told to every
worker that is up, and to a restarted one when it is back; a trace asks every worker and
relays their records as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clearip.relay.policy.sources import SourcePolicy
from clearip.relay.proxy.latency import LatencyHistogram
from clearip.relay.service.control import MAX_REPLY, ControlUnavailable, ask
from clearip.relay.service.fleet import WorkerView
from clearip.relay.service.trace import Subscriber
from clearip.relay.service.worker_role import WorkerRole
from clearip.relay.service.workers import WorkerProcess

log = logging.getLogger("clearip.supervisor")

ASK_TIMEOUT = 5.0
UNANSWERED_LIMIT = 3  # polls in a row a serving worker may miss before it is restarted
TRACE_RETRY = 0.5


class WorkerLink:
    """Asking the workers, and what they last said."""

    def __init__(
        self, workers: list[WorkerProcess], count: int, run_dir: Path, policy: SourcePolicy
    ) -> None:
        self.workers = workers
        self.count = count
        self.run_dir = run_dir
        self.policy = policy
        # The counters and latency each worker last reported, and those of workers that died:
        # a restarted worker starts from zero, the totals carry on (Prometheus counters).
        self._seen: dict[int, dict[str, Any]] = {}
        self.retired: Counter[str] = Counter()
        self.retired_latency = LatencyHistogram()

    def control_path(self, index: int) -> str:
        return WorkerRole(index, self.count, str(self.run_dir)).control_path()

    async def ask(self, worker: WorkerProcess, cmd: str, **fields: Any) -> dict[str, Any] | None:
        """The worker's result, or None when it is not up or did not answer."""
        if worker.state != "up":
            return None
        try:
            reply = await ask(self.control_path(worker.index), cmd, timeout=ASK_TIMEOUT, **fields)
        except ControlUnavailable as exc:
            log.debug("worker %d: %s", worker.index, exc)
            return None
        if not reply.get("ok"):
            log.warning("worker %d refused %s: %s", worker.index, cmd, reply.get("error"))
            return None
        result = reply.get("result")
        return result if isinstance(result, dict) else None

    async def gather(self, cmd: str, **fields: Any) -> list[WorkerView]:
        answers = await asyncio.gather(*(self.ask(w, cmd, **fields) for w in self.workers))
        for worker, answer in zip(self.workers, answers, strict=True):
            if answer is not None and cmd in ("snapshot", "stats"):
                seen = self._seen.setdefault(worker.index, {})
                seen["counters"] = answer.get("counters" if cmd == "snapshot" else "relay", {})
                if cmd == "snapshot":
                    seen["latency"] = answer.get("latency")
        return [
            WorkerView(w.index, w.pid, w.state, w.restarts, answer)
            for w, answer in zip(self.workers, answers, strict=True)
        ]

    def retire(self, index: int) -> None:
        """A worker died: what it last reported stays in the totals."""
        seen = self._seen.pop(index, {})
        self.retired.update(seen.get("counters") or {})
        if seen.get("latency"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.retired_latency.add(LatencyHistogram.from_dict(seen["latency"]))

    async def tell_policy(self, worker: WorkerProcess) -> None:
        trust = [entry.as_dict() for entry in self.policy.trust]
        reply = await ask(
            self.control_path(worker.index),
            "policy.set",
            timeout=ASK_TIMEOUT,
            trust=trust,
            emergency=self.policy.emergency.numbers(),
        )
        if not reply.get("ok"):
            log.error("worker %d refused the policy: %s", worker.index, reply.get("error"))

    async def push_policy(self) -> None:
        """Every serving worker takes the supervisor's trust list and emergency numbers; one
        that is down gets them when it is back (see :meth:`_start`)."""

        async def tell(worker: WorkerProcess) -> None:
            if worker.state != "up":
                return
            try:
                await self.tell_policy(worker)
            except ControlUnavailable as exc:
                log.error("worker %d did not take the new policy: %s", worker.index, exc)

        await asyncio.gather(*(tell(w) for w in self.workers))

    async def poll_once(self) -> list[WorkerView]:
        """Totals for the STATUS line, the upstreams for the kernel filter, and a worker that
        stopped answering (a wedged event loop) is killed, then restarted by its keeper."""
        views = await self.gather("snapshot")
        addresses: set[str] = set()
        for worker, view in zip(self.workers, views, strict=True):
            if view.answer is not None:
                worker.missed = 0
                addresses.update(view.answer.get("upstream_addresses", []))
            elif worker.state == "up" and worker.alive:
                worker.missed += 1
                if worker.missed >= UNANSWERED_LIMIT:
                    log.error(
                        "worker %d (pid %s) has not answered for %d polls: killing it",
                        worker.index,
                        worker.pid,
                        worker.missed,
                    )
                    assert worker.process is not None
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
        if addresses and sorted(addresses) != self.policy.upstreams:
            self.policy.set_upstreams(addresses)
        return views

    def subscribe_trace(self, subscriber: Subscriber) -> Callable[[], None]:
        """One merged stream: the same trace request to every worker, records relayed as
        they come (a worker that restarts is asked again)."""
        tasks = [asyncio.create_task(self._relay_trace(w, subscriber)) for w in self.workers]

        def unsubscribe() -> None:
            for task in tasks:
                task.cancel()

        return unsubscribe

    async def _relay_trace(self, worker: WorkerProcess, subscriber: Subscriber) -> None:
        request = {"cmd": "trace", "call_id": subscriber.call_id, "number": subscriber.number}
        while True:
            if worker.state == "up":
                with contextlib.suppress(OSError, ValueError, asyncio.LimitOverrunError):
                    await self._trace_from(worker, request, subscriber)
            await asyncio.sleep(TRACE_RETRY)

    async def _trace_from(
        self, worker: WorkerProcess, request: dict[str, Any], subscriber: Subscriber
    ) -> None:
        reader, writer = await asyncio.open_unix_connection(
            self.control_path(worker.index), limit=MAX_REPLY
        )
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            first = json.loads(await reader.readline() or b"{}")
            if not first.get("ok"):
                return
            while line := await reader.readline():
                try:
                    subscriber.queue.put_nowait(json.loads(line))
                except asyncio.QueueFull:
                    subscriber.lost += 1
        finally:
            writer.close()
