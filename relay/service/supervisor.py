"""The supervisor: ``clearip-proxy run`` with more than one worker (issue #16).

The relay's capacity is one CPython process per core, so with ``[proxy] workers = N`` the
process systemd starts is a supervisor, and the calls are handled by N worker processes
(``clearip-proxy worker ...``, each a :class:`~clearip.relay.service.daemon.Daemon` with a
:class:`~clearip.relay.service.worker_role.WorkerRole`). They share nothing but the kernel: every
worker binds every listener with SO_REUSEPORT, and the SK_REUSEPORT program loaded here
(:mod:`clearip.bpf.reuseport`, one per UDP listener) sends every datagram of a call to the
worker that owns its Call-ID.

What the supervisor owns, and why here:
- start-up: the steering program (before any worker binds), the XDP filter, the trust file
  and the emergency numbers (one writer for the files and the kernel maps);
- the workers: started with a pipe on which each says READY, restarted when one dies (logged
  with its exit status, counted ``worker_restarts``, back at once; with back-off only when it
  keeps dying right after its start), killed and restarted when it stops answering; what a
  dead worker last reported stays in the totals, so summed counters never go backwards;
- signals: SIGHUP reloads its own policy and every worker's config; SIGTERM/SIGINT stops the
  workers (SIGTERM, then SIGKILL after STOP_TIMEOUT) and exits 0;
- systemd: READY=1 once every worker is ready, WATCHDOG=1 and STATUS= with the totals;
- the control socket (``clearipctl``) and ``/metrics``, answered from what the workers say
  over their private control sockets (``status``, ``stats``, ``snapshot``, ``trace``) at the
  time of asking (:mod:`clearip.relay.service.fleet_replies`), summed by
  :mod:`clearip.relay.service.fleet`.

Degraded mode: when the steering program cannot load (no privileges, no bcc, no kernel
headers, a pin directory off the bpf file system), one error names the reason and the fix,
and this process runs the single :class:`Daemon` itself (workers = 1, still correct);
``clearipctl status`` shows ``"workers": {"configured": N, "running": 1, "steering": "off:
..."}``. A worker that cannot start at all during start-up (a port in use, a bad file) stops
the supervisor with an error, as the single daemon would; later deaths are healed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clearip.relay.config import ConfigError, ProxyConfig
from clearip.relay.policy.sources import PolicyError, SourcePolicy
from clearip.relay.policy.trust import TrustError, write_atomically
from clearip.relay.service import fleet_replies
from clearip.relay.service.control import ControlServer, ControlUnavailable, then
from clearip.relay.service.daemon import Daemon
from clearip.relay.service.fleet import WorkerView, merge_reload
from clearip.relay.service.kernel_filter import start_kernel_filter
from clearip.relay.service.kernel_steering import (
    SteeringOff,
    load_steering,
    set_steering_emergency,
)
from clearip.relay.service.logs import apply_logging
from clearip.relay.service.metrics import MetricsServer, registry_for
from clearip.relay.service.reload import read_reload
from clearip.relay.service.sdnotify import Notifier, watchdog, watchdog_interval
from clearip.relay.service.worker_link import WorkerLink
from clearip.relay.service.workers import (
    BASE_CONFIG,
    STOP_TIMEOUT,
    WorkerProcess,
    exit_status,
    start_worker,
    stop_workers,
    worker_command,
    worker_env,
)

if TYPE_CHECKING:
    from clearip.bpf.reuseport import ReuseportSteering

log = logging.getLogger("clearip.supervisor")

POLL_INTERVAL = 5.0  # the supervisor asks every worker for its snapshot this often
QUICK_DEATH = 5.0  # a worker dying sooner than this after its start is restarted with back-off
BACKOFF_MAX = 30.0
EXIT_OK, EXIT_ERROR = 0, 1


class Supervisor:
    def __init__(self, config: ProxyConfig, config_path: str | Path) -> None:
        self.config = config
        self.config_path = Path(config_path)
        self.count = config.worker_count()
        # The trust file and emergency numbers: read now, so a broken file stops the start
        # (TrustError) before anything is loaded.
        self.policy = SourcePolicy.load(
            config.trust_file, config.emergency_numbers, config.state_dir
        )
        self.run_dir = Path(config.worker_run_dir())
        self.steering: dict[str, ReuseportSteering] = {}
        self.steering_state = "not loaded"
        self.counters: Counter[str] = Counter()
        self.started = time.time()
        self.workers = [WorkerProcess(index) for index in range(self.count)]
        self.notifier = Notifier()
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.failure: str | None = None  # a worker that could not start: the exit reason
        self._stopping = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._keepers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._last: list[WorkerView] = []  # the latest poll, for the one-line status
        # Asking the workers; what dead workers last reported stays in the totals.
        self.link = WorkerLink(self.workers, self.count, self.run_dir, self.policy)
        self._scrape: dict[str, Any] = {}
        self._env = worker_env()

    # -- the process -----------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (0, or 1 when a worker could not
        start). Runs the single Daemon instead when steering cannot load."""
        loop = asyncio.get_running_loop()
        numbers = self.policy.emergency.numbers()
        try:
            self.steering = await loop.run_in_executor(
                None, load_steering, self.config, self.count, numbers
            )
        except SteeringOff as exc:
            log.error(
                "workers off: kernel steering of calls is unavailable: %s. Fix: %s. Running "
                "one process (workers = 1) instead of %d; calls are still relayed.",
                exc.reason,
                exc.fix,
                self.count,
            )
            daemon = Daemon(
                self.config,
                config_path=self.config_path,
                workers={"configured": self.count, "running": 1, "steering": f"off: {exc.reason}"},
            )
            await daemon.run()
            return EXIT_OK
        names = ", ".join(self.steering)
        self.steering_state = f"on ({names})" if names else "none (no UDP listener)"
        log.info("kernel steering %s for %d workers", self.steering_state, self.count)
        try:
            return await self._serve()
        finally:
            for handle in self.steering.values():
                handle.close()  # program, maps and registrations stay for the next start

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # What the workers start from: a worker restarted after the file was edited takes
        # the file's live settings but keeps the running listeners, sockets and upstreams.
        write_atomically(
            self.run_dir / BASE_CONFIG, self.config_path.read_text(encoding="utf-8"), 0o600
        )
        await start_kernel_filter(self.config, self.policy)
        await self._start_control()
        if self.config.metrics_enabled:
            self.metrics = MetricsServer(
                registry_for(lambda: self._scrape), before_scrape=self._gather_snapshot
            )
            port = await self.metrics.start(self.config.metrics_address, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_address, port)
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload_logged()))
        self._keepers = [asyncio.create_task(self._keep(worker)) for worker in self.workers]
        ready = asyncio.create_task(self._all_ready.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._all_ready.is_set() and not self._stopping.is_set():
            await self._poll_once()
            self.notifier.ready(self.one_line_status())
            log.info("clearip-proxy ready: %d workers", self.count)
            self._spawn(self._poll())
            interval = watchdog_interval()
            if interval is not None:
                self._spawn(watchdog(self.notifier, interval, self.one_line_status))
        await stopping
        await self._shutdown()
        if self.failure is not None:
            log.error("stopped: %s", self.failure)
            return EXIT_ERROR
        return EXIT_OK

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        for task in list(self._background):
            task.cancel()
        await stop_workers(self.workers, self._keepers, STOP_TIMEOUT)
        if self.metrics is not None:
            await self.metrics.close()
        if self.control is not None:
            await self.control.close()
        self.policy.release_kernel()
        with contextlib.suppress(OSError):
            (self.run_dir / BASE_CONFIG).unlink()
        self.notifier.close()

    # -- one worker -------------------------------------------------------------------------
    def _command(self, index: int) -> Callable[[int], list[str]]:
        return lambda ready_fd: worker_command(
            self.config,
            self.config_path,
            self.run_dir,
            count=self.count,
            index=index,
            ready_fd=ready_fd,
        )

    async def _start(self, worker: WorkerProcess) -> bool:
        """Start the worker (:func:`start_worker`); once it is READY, tell it the policy."""
        if not await start_worker(worker, self._command(worker.index), self._env):
            return False
        if self._stopping.is_set():
            return True
        worker.state = "up"
        log.info("worker %d up (pid %s)", worker.index, worker.pid)
        # What it read from the files may be older than what the supervisor decided since
        # (emergency numbers changed at runtime without a state directory).
        with contextlib.suppress(ControlUnavailable):
            await self.link.tell_policy(worker)
        if all(w.state == "up" for w in self.workers):
            self._all_ready.set()
        return True

    async def _keep(self, worker: WorkerProcess) -> None:
        """Run one worker for the supervisor's life: start it, restart it when it dies."""
        quick_deaths = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                ready = await self._start(worker)
            except Exception:  # a bug here must not leave the worker's slot empty for good
                log.exception("worker %d: could not be started", worker.index)
                ready = False
            if self._stopping.is_set():
                if worker.process is not None:
                    await worker.process.wait()  # _shutdown sends SIGTERM, then SIGKILL
                worker.state = "stopped"
                return
            if not ready and not self._all_ready.is_set():
                code = await worker.process.wait() if worker.process is not None else None
                status = exit_status(code) if code is not None else "could not be started"
                self.failure = f"worker {worker.index} did not start: {status} (see its log above)"
                self._stopping.set()
                return
            assert worker.process is not None
            returncode = await worker.process.wait()
            if self._stopping.is_set():
                worker.state = "stopped"
                log.info("worker %d (pid %s) %s", worker.index, worker.pid, exit_status(returncode))
                return
            worker.state = "down"
            self.link.retire(worker.index)
            worker.restarts += 1
            self.counters["worker_restarts"] += 1
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH else 0
            delay = 0.0 if quick_deaths <= 1 else min(BACKOFF_MAX, 0.5 * 2 ** (quick_deaths - 2))
            log.warning(
                "worker %d (pid %s) %s: restarting it%s; the other workers' calls go on",
                worker.index,
                worker.pid,
                exit_status(returncode),
                f" in {delay:g} s (it keeps dying at start)" if delay else "",
            )
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    def _sync_steering(self) -> None:
        set_steering_emergency(self.steering, self.policy.emergency.numbers())

    # -- periodic ----------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            await self._poll_once()

    async def _poll_once(self) -> None:
        self._last = await self.link.poll_once()

    def one_line_status(self) -> str:
        answers = [v.answer for v in self._last if v.answer is not None]
        calls = sum(int(a.get("active_calls", 0)) for a in answers)
        running = sum(w.state == "up" for w in self.workers)
        return (
            f"{running}/{self.count} workers up; {calls} calls in setup; "
            f"{len(self.policy.trust)} trusted sources"
        )

    # -- control socket -----------------------------------------------------------------------
    async def _start_control(self) -> None:
        if not self.config.control_socket:
            return
        control = ControlServer(
            self.config.control_socket,
            self.policy,
            lambda: fleet_replies.own_status(self),
            lambda: {"relay": dict(self.counters)},
            subscribe=self.link.subscribe_trace,
        )
        # A policy command: the supervisor changes the file and its kernel maps once (a
        # refusal raises and nothing is pushed), then every worker takes the result.
        for name in ("trust.add", "trust.remove", "trust.import"):
            control.handlers[name] = then(control.handlers[name], self.link.push_policy)
        for name in ("emergency.add", "emergency.remove"):
            control.handlers[name] = then(control.handlers[name], self._push_numbers)
        control.handlers["status"] = lambda _: fleet_replies.status(self)
        control.handlers["stats"] = lambda _: fleet_replies.stats(self)
        control.handlers["reload"] = lambda _: self.reload()
        try:
            await control.start()
        except OSError as exc:
            log.error("control socket %s unavailable: %s", self.config.control_socket, exc)
            return
        self.control = control

    async def _push_numbers(self) -> None:
        self._sync_steering()
        await self.link.push_policy()

    async def _gather_snapshot(self) -> None:
        self._scrape = await fleet_replies.snapshot(self)

    # -- reload -------------------------------------------------------------------------------
    async def _reload_logged(self) -> None:
        with contextlib.suppress(ConfigError, TrustError, PolicyError):
            await self.reload()

    async def reload(self) -> dict[str, Any]:
        """SIGHUP / ``clearip-proxy reload``: the supervisor's policy (trust file, emergency
        numbers: files and kernel maps), then every worker reloads the same file. The report
        is the workers' (they read the same file; the first that answered)."""
        plan = read_reload(self.config, self.config_path, self.policy)
        self.config = plan.config
        if plan.changes("log"):
            apply_logging(self.config.log_level, self.config.log_format)
        self._sync_steering()
        views = await self.link.gather("reload")
        await self.link.push_policy()
        report, problems = merge_reload(views)
        for problem in problems:
            log.warning("%s", problem)
        if report is not None:
            return report
        return {
            "config": str(self.config_path),
            "live": [c.as_dict() for c in plan.live],
            "restart": [c.as_dict() for c in plan.restart],
            "note": "no worker answered",
        }
