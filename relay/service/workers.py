"""Worker processes as the supervisor runs them: their command line, their start, their end.

Rules: a worker is started with a pipe on which it writes READY once serving; one that dies or
hangs before that is a failed start (a hung one is killed after READY_TIMEOUT); a worker runs in
its own session, so a terminal's Ctrl-C reaches the supervisor alone, which stops the workers in
order; an exit is reported as ``exited with status N`` or ``killed by SIGNAME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clearip.relay.config import ProxyConfig

log = logging.getLogger("clearip.supervisor")

STOP_TIMEOUT = 10.0  # SIGTERM to SIGKILL
READY_TIMEOUT = 60.0  # a worker's start: imports, listeners, the first ClearIP attempt (<= 10 s)
BASE_CONFIG = "supervisor-config.toml"
# systemd's hand-over to the main process: a worker must not notify or take sockets.
SYSTEMD_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def worker_env() -> dict[str, str]:
    """The supervisor's environment without systemd's hand-over (a worker must not notify
    systemd or take its sockets)."""
    return {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}


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


def worker_command(
    config: ProxyConfig, config_path: Path, run_dir: Path, *, count: int, index: int, ready_fd: int
) -> list[str]:
    """The command line of worker ``index``: ``clearip-proxy worker`` under this interpreter,
    with the supervisor's isolation flags; it says READY on ``ready_fd``."""
    return [
        sys.executable,
        *_interpreter_flags(),
        "-m",
        "clearip.relay.cli",
        "worker",
        "--config",
        str(config_path),
        "--base-config",
        str(run_dir / BASE_CONFIG),
        "--index",
        str(index),
        "--workers",
        str(count),
        "--run-dir",
        str(run_dir),
        "--steering-pin-dir",
        config.steering_pin_dir,
        "--ready-fd",
        str(ready_fd),
        "--supervisor",
        str(os.getpid()),
    ]


async def start_worker(
    worker: WorkerProcess, command: Callable[[int], list[str]], env: dict[str, str]
) -> bool:
    """Start the worker with ``command(ready_fd)`` and wait until it says READY on that pipe
    (False: it died or hung before; a hung one is killed)."""
    read_end, write_end = os.pipe()
    try:
        worker.process = await asyncio.create_subprocess_exec(
            *command(write_end),
            pass_fds=(write_end,),
            env=env,
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
    return line.startswith(b"READY")


async def stop_workers(
    workers: list[WorkerProcess], keepers: list[asyncio.Task[None]], timeout: float
) -> None:
    """SIGTERM to every worker, SIGKILL to those still running ``timeout`` seconds later;
    returns when their keepers are done (or after another ``timeout``)."""
    for worker in workers:
        worker.state = "stopping"
        if worker.alive:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()
    if keepers:
        _, late = await asyncio.wait(keepers, timeout=timeout)
        for worker in workers:
            if worker.alive:
                assert worker.process is not None
                log.warning(
                    "worker %d (pid %s) did not stop within %g s: killing it",
                    worker.index,
                    worker.pid,
                    timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
        if late:
            await asyncio.wait(late, timeout=timeout)
