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
  time of asking, summed by :mod:`clearip.relay.service.fleet`.

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
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clearip.relay.config import ConfigError, ProxyConfig, load_config
from clearip.relay.policy.sources import PolicyError, SourcePolicy
from clearip.relay.policy.trust import TrustError, write_atomically
from clearip.relay.proxy.latency import LatencyHistogram
from clearip.relay.service.control import MAX_REPLY, ControlServer, ControlUnavailable, ask
from clearip.relay.service.daemon import Daemon, apply_logging, start_kernel_filter
from clearip.relay.service.fleet import (
    WorkerView,
    merge_snapshots,
    merge_stats,
    merge_status,
    workers_block,
)
from clearip.relay.service.metrics import MetricsServer, registry_for
from clearip.relay.service.reload import plan_reload
from clearip.relay.service.sdnotify import Notifier, watchdog, watchdog_interval
from clearip.relay.service.trace import Subscriber
from clearip.relay.service.worker_role import WorkerRole
from clearip.relay.transport.peer import ListenerSpec

if TYPE_CHECKING:
    from clearip.bpf.reuseport import ReuseportSteering

log = logging.getLogger("clearip.supervisor")

READY_TIMEOUT = 60.0  # a worker's start: imports, listeners, the first ClearIP attempt (<= 10 s)
STOP_TIMEOUT = 10.0  # SIGTERM to SIGKILL
POLL_INTERVAL = 5.0  # the supervisor asks every worker for its snapshot this often
ASK_TIMEOUT = 5.0
UNANSWERED_LIMIT = 3  # polls in a row a serving worker may miss before it is restarted
QUICK_DEATH = 5.0  # a worker dying sooner than this after its start is restarted with back-off
BACKOFF_MAX = 30.0
TRACE_RETRY = 0.5
# systemd's hand-over to the main process: a worker must not notify or take sockets.
SYSTEMD_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
BASE_CONFIG = "supervisor-config.toml"
EXIT_OK, EXIT_ERROR = 0, 1


class SteeringOff(Exception):
    """Kernel steering cannot run: ``reason`` and ``fix`` for the one error line."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason} (fix: {fix})")
        self.reason = reason
        self.fix = fix


# -- the steering programs ----------------------------------------------------------------------


def listener_name(spec: ListenerSpec) -> str:
    address = f"[{spec.address}]" if ":" in spec.address else spec.address
    return f"{spec.transport}:{address}:{spec.port}"


def bpffs_problem(path: str) -> str | None:
    """Why ``path`` cannot hold pins (None: it can). Under /sys/fs/bpf the loader mounts the
    bpf file system itself when it is missing; elsewhere ``path`` must be on one."""
    target = os.path.abspath(path)
    if target == "/sys/fs/bpf" or target.startswith("/sys/fs/bpf/"):
        return None
    mount, kind = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError as exc:
        return f"cannot read /proc/self/mounts: {exc}"
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(mount):
            mount, kind = point, fields[2]
    if kind == "bpf":
        return None
    return f"{path} is not on the bpf file system ({kind or 'unknown'} at {mount or '?'})"


def load_steering(
    config: ProxyConfig, count: int, numbers: list[str]
) -> dict[str, ReuseportSteering]:
    """Load (or reload) the steering program of every UDP listener, pinned where the
    workers look (:meth:`WorkerRole.steering_dir`); :class:`SteeringOff` with the fix."""
    fix_dir = 'set proxy.steering_pin_dir to a directory under /sys/fs/bpf (the default is "'
    fix_dir += '/sys/fs/bpf/clearip-reuseport")'
    if not config.steering_pin_dir:
        raise SteeringOff("proxy.steering_pin_dir is empty", fix_dir)
    problem = bpffs_problem(config.steering_pin_dir)
    if problem is not None:
        raise SteeringOff(problem, fix_dir)
    from clearip.bpf.reuseport import ReuseportSteering, SteeringUnavailable

    role = WorkerRole(0, count, config.worker_run_dir(), config.steering_pin_dir)
    loaded: dict[str, ReuseportSteering] = {}
    try:
        for spec in config.listeners:
            if spec.transport == "udp":
                pins = role.steering_dir(spec)
                try:
                    loaded[listener_name(spec)] = ReuseportSteering.load(
                        workers=count, emergency=numbers, pin_dir=pins
                    )
                except OSError as exc:
                    raise SteeringOff(
                        f"cannot load the steering program into {pins}: {exc}",
                        "run the service as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); "
                        + fix_dir,
                    ) from None
    except SteeringUnavailable as exc:
        for handle in loaded.values():
            handle.close()
        raise SteeringOff(exc.reason, exc.fix) from None
    except SteeringOff:
        for handle in loaded.values():
            handle.close()
        raise
    return loaded


# -- the workers --------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    index: int
    process: asyncio.subprocess.Process | None = None
    state: str = "starting"
    restarts: int = 0
    started: float = 0.0
    missed: int = 0  # polls in a row without an answer

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


def exit_status(returncode: int) -> str:
    """``exited with status 1`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


def _interpreter_flags() -> list[str]:
    """The supervisor's own isolation flags (the RPM's wrapper runs Python with -I -B)."""
    flags = []
    if sys.flags.isolated:
        flags.append("-I")
    if sys.flags.dont_write_bytecode:
        flags.append("-B")
    return flags


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
        # The counters and latency each worker last reported, and those of workers that died:
        # a restarted worker starts from zero, the totals carry on (Prometheus counters).
        self._seen: dict[int, dict[str, Any]] = {}
        self._retired: Counter[str] = Counter()
        self._retired_latency = LatencyHistogram()
        self._scrape: dict[str, Any] = {}
        self._env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}

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
        for worker in self.workers:
            worker.state = "stopping"
            if worker.alive:
                assert worker.process is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.process.terminate()
        if self._keepers:
            _, late = await asyncio.wait(self._keepers, timeout=STOP_TIMEOUT)
            for worker in self.workers:
                if worker.alive:
                    assert worker.process is not None
                    log.warning(
                        "worker %d (pid %s) did not stop within %g s: killing it",
                        worker.index,
                        worker.pid,
                        STOP_TIMEOUT,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            if late:
                await asyncio.wait(late, timeout=STOP_TIMEOUT)
        if self.metrics is not None:
            await self.metrics.close()
        if self.control is not None:
            await self.control.close()
        kernel = self.policy.kernel
        if kernel is not None and hasattr(kernel, "close"):
            kernel.close()  # the filter stays attached: the host stays protected
        with contextlib.suppress(OSError):
            (self.run_dir / BASE_CONFIG).unlink()
        self.notifier.close()

    # -- one worker -------------------------------------------------------------------------
    def _command(self, index: int, ready_fd: int) -> list[str]:
        return [
            sys.executable,
            *_interpreter_flags(),
            "-m",
            "clearip.relay.cli",
            "worker",
            "--config",
            str(self.config_path),
            "--base-config",
            str(self.run_dir / BASE_CONFIG),
            "--index",
            str(index),
            "--workers",
            str(self.count),
            "--run-dir",
            str(self.run_dir),
            "--steering-pin-dir",
            self.config.steering_pin_dir,
            "--ready-fd",
            str(ready_fd),
            "--supervisor",
            str(os.getpid()),
        ]

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
            self._retire(worker.index)
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

    async def _start(self, worker: WorkerProcess) -> bool:
        """Start the worker and wait until it says READY on its pipe (False: it died or
        hung before; a hung one is killed)."""
        read_end, write_end = os.pipe()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *self._command(worker.index, write_end),
                pass_fds=(write_end,),
                env=self._env,
                # Its own session: a terminal's Ctrl-C (SIGINT to the foreground group) goes
                # to the supervisor alone, which then stops the workers in order.
                start_new_session=True,
            )
        except OSError as exc:
            os.close(read_end)
            log.error("cannot start worker %d: %s", worker.index, exc)
            return False
        finally:
            os.close(write_end)
        worker.state = "starting"
        worker.started = time.time()
        worker.missed = 0
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", 0)
        )
        try:
            line = await asyncio.wait_for(reader.readline(), READY_TIMEOUT)
        except TimeoutError:
            log.error("worker %d (pid %s) not ready within %g s: killing it", worker.index,
                      worker.pid, READY_TIMEOUT)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            return False
        finally:
            transport.close()
        if not line.startswith(b"READY"):
            return False
        if self._stopping.is_set():
            return True
        worker.state = "up"
        log.info("worker %d up (pid %s)", worker.index, worker.pid)
        # What it read from the files may be older than what the supervisor decided since
        # (emergency numbers changed at runtime without a state directory).
        with contextlib.suppress(ControlUnavailable):
            await self._tell_policy(worker)
        if all(w.state == "up" for w in self.workers):
            self._all_ready.set()
        return True

    # -- asking the workers ---------------------------------------------------------------------
    def control_path(self, index: int) -> str:
        return WorkerRole(index, self.count, str(self.run_dir)).control_path()

    async def _ask(self, worker: WorkerProcess, cmd: str, **fields: Any) -> dict[str, Any] | None:
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

    async def _gather(self, cmd: str, **fields: Any) -> list[WorkerView]:
        answers = await asyncio.gather(*(self._ask(w, cmd, **fields) for w in self.workers))
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

    def _retire(self, index: int) -> None:
        """A worker died: what it last reported stays in the totals."""
        seen = self._seen.pop(index, {})
        self._retired.update(seen.get("counters") or {})
        if seen.get("latency"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self._retired_latency.add(LatencyHistogram.from_dict(seen["latency"]))

    def _own_counters(self) -> Counter[str]:
        """The supervisor's counters plus those of workers that died (see :meth:`_retire`)."""
        return self.counters + self._retired

    async def _tell_policy(self, worker: WorkerProcess) -> None:
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

    async def _push_policy(self) -> None:
        """Every serving worker takes the supervisor's trust list and emergency numbers; one
        that is down gets them when it is back (see :meth:`_start`)."""

        async def tell(worker: WorkerProcess) -> None:
            if worker.state != "up":
                return
            try:
                await self._tell_policy(worker)
            except ControlUnavailable as exc:
                log.error("worker %d did not take the new policy: %s", worker.index, exc)

        await asyncio.gather(*(tell(w) for w in self.workers))

    def _sync_steering(self) -> None:
        """The steering programs' emergency maps follow the policy's numbers (their queue
        jump only; the workers bypass ClearIP for them whatever the kernel does)."""
        numbers = self.policy.emergency.numbers()
        for name, handle in self.steering.items():
            try:
                handle.set_emergency(numbers)
            except OSError as exc:
                log.error("steering %s: cannot set the emergency numbers: %s", name, exc)

    def _steering_counters(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, handle in self.steering.items():
            with contextlib.suppress(OSError, RuntimeError):
                out[name] = handle.counters()
        return out

    # -- periodic ----------------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            await self._poll_once()

    async def _poll_once(self) -> None:
        """Totals for the STATUS line, the upstreams for the kernel filter, and a worker that
        stopped answering (a wedged event loop) is killed, then restarted by its keeper."""
        views = await self._gather("snapshot")
        self._last = views
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
            self._own_status,
            lambda: {"relay": dict(self.counters)},
            subscribe=self.subscribe_trace,
        )
        for name in ("trust.add", "trust.remove", "trust.import"):
            control.handlers[name] = self._then_push(control.handlers[name])
        for name in ("emergency.add", "emergency.remove"):
            control.handlers[name] = self._then_push(control.handlers[name], steering=True)
        control.handlers["status"] = lambda _: self.status()
        control.handlers["stats"] = lambda _: self.stats()
        control.handlers["reload"] = lambda _: self.reload()
        try:
            await control.start()
        except OSError as exc:
            log.error("control socket %s unavailable: %s", self.config.control_socket, exc)
            return
        self.control = control

    def _then_push(
        self, handler: Callable[[dict[str, Any]], Any], *, steering: bool = False
    ) -> Callable[[dict[str, Any]], Awaitable[Any]]:
        """A policy command: the supervisor changes the file and its kernel maps once (a
        refusal raises here and nothing is pushed), then every worker takes the result."""

        def run(request: dict[str, Any]) -> Awaitable[Any]:
            result = handler(request)

            async def push() -> Any:
                if steering:
                    self._sync_steering()
                await self._push_policy()
                return result

            return push()

        return run

    def _own_status(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "trust_entries": len(self.policy.trust),
            "kernel_filter": self.policy.describe_kernel(),
            "emergency_numbers": self.policy.emergency.numbers(),
        }

    def _workers_block(self, views: list[WorkerView]) -> dict[str, Any]:
        return workers_block(
            self.count, views, self.steering_state, self.counters["worker_restarts"]
        )

    async def status(self) -> dict[str, Any]:
        views = await self._gather("status")
        return merge_status(views, self._own_status(), self._workers_block(views))

    async def stats(self) -> dict[str, Any]:
        views = await self._gather("stats")
        return merge_stats(
            views, self._own_counters(), self.policy.kernel_status(), self._steering_counters()
        )

    async def _gather_snapshot(self) -> None:
        views = await self._gather("snapshot")
        supervisor = {
            "trust_entries": len(self.policy.trust),
            "kernel": self.policy.kernel_status(),
        }
        self._scrape = merge_snapshots(
            views,
            self._own_counters(),
            supervisor,
            self._workers_block(views),
            self._steering_counters(),
            retired_latency=self._retired_latency,
        )

    # -- reload -------------------------------------------------------------------------------
    async def _reload_logged(self) -> None:
        with contextlib.suppress(ConfigError, TrustError, PolicyError):
            await self.reload()

    async def reload(self) -> dict[str, Any]:
        """SIGHUP / ``clearip-proxy reload``: the supervisor's policy (trust file, emergency
        numbers: files and kernel maps), then every worker reloads the same file. The report
        is the workers' (they read the same file; the first that answered)."""
        try:
            fresh = load_config(self.config_path)
            plan = plan_reload(self.config, fresh)
            try:
                self.policy.reload(plan.config.trust_file, plan.config.emergency_numbers)
            except TrustError as exc:
                raise TrustError(f"proxy.trust_file: {exc}") from None
        except (ConfigError, TrustError, PolicyError) as exc:
            log.error("reload refused, every running setting kept: %s", exc)
            raise
        self.config = plan.config
        if plan.changes("log"):
            apply_logging(self.config.log_level, self.config.log_format)
        self._sync_steering()
        views = await self._gather("reload")
        await self._push_policy()
        reports = [v.answer for v in views if v.answer is not None]
        for view in views:
            if view.answer is None:
                log.warning("worker %d did not reload (%s)", view.index, view.state)
        if reports:
            if any(r != reports[0] for r in reports):
                log.error("the workers' reload reports differ: %s", json.dumps(reports))
            return reports[0]
        return {
            "config": str(self.config_path),
            "live": [c.as_dict() for c in plan.live],
            "restart": [c.as_dict() for c in plan.restart],
            "note": "no worker answered",
        }

    # -- trace ---------------------------------------------------------------------------------
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
