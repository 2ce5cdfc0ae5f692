"""Runs the real proxy daemon for end-to-end tests: in a thread with its own event loop (so
tests can read its counters and transaction tables) or as a subprocess (restart tests)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from clearip.relay.config import load_config
from clearip.relay.policy.trust import Role, TrustEntry, parse_cidr, save_trust_file
from clearip.relay.service.daemon import Daemon
from lab.procs import stop_process

T = TypeVar("T")

SWITCH_IP = "127.0.0.1"
PROVIDER_A_IP = "127.0.0.2"
PROVIDER_B_IP = "127.0.0.3"
UNTRUSTED_IP = "127.0.0.9"


def write_config(
    directory: Path,
    *,
    port: int,
    upstream: str,
    extra: str = "",
    trust: list[tuple[str, Role]] | None = None,
    ca_file: str = "",
    workers: int | str = 1,
    proxy_extra: str = "",
) -> Path:
    """A test config. ``workers`` defaults to one process (the tests written before worker
    processes existed see today's daemon); ``proxy_extra`` adds lines to ``[proxy]``."""
    trust_path = directory / "trust.toml"
    entries = trust or [
        (f"{SWITCH_IP}/32", Role.SWITCH),
        (f"{PROVIDER_A_IP}/32", Role.PROVIDER),
        (f"{PROVIDER_B_IP}/32", Role.PROVIDER),
    ]
    save_trust_file(trust_path, [TrustEntry(parse_cidr(c), r) for c, r in entries])
    ca = f'ca_file = "{ca_file}"\n' if ca_file else ""
    text = f"""
[proxy]
trust_file = "{trust_path}"
control_socket = "{directory / "control.sock"}"
state_dir = "{directory}"
upstream_timeout = 1.5
provider_timeout = 1.0
workers = {json.dumps(workers)}
{proxy_extra}

[[listen]]
transport = "udp"
address = "127.0.0.1"
port = {port}

[[listen]]
transport = "tcp"
address = "127.0.0.1"
port = {port}

[upstream.outbound]
uri = "{upstream}"
{ca}
[timers]
# A short T1 keeps RFC 6026's linger timers (64*T1) short, so tests can see the proxy
# return to zero transactions quickly.
t1 = 0.1

[xdp]
enabled = false

[metrics]
port = 0

[log]
level = "debug"
{extra}
"""
    path = directory / "proxy.toml"
    path.write_text(text)
    return path


class ThreadedProxy:
    """A Daemon running in a background thread."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.daemon = Daemon(self.config)
            self.loop.run_until_complete(self.daemon.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ThreadedProxy:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def call(self, func: Callable[[Daemon], T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                assert self.daemon is not None
                future.set_result(func(self.daemon))
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(10)

    def counters(self) -> dict[str, int]:
        return self.call(lambda d: dict(d.counters))

    def wait_idle(self, timeout: float = 10.0) -> tuple[int, int]:
        """Wait until no call and no transaction is left; returns (calls, transactions)."""
        deadline = time.monotonic() + timeout
        state = (-1, -1)
        while time.monotonic() < deadline:
            state = self.call(lambda d: (d.core.active_calls, d.core.active_transactions))
            if state == (0, 0):
                break
            time.sleep(0.1)
        return state

    def stop(self) -> None:
        if self.daemon is not None and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.daemon.close(), self.loop)
            with contextlib.suppress(Exception):
                fut.result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def threaded_proxy(config_path: Path) -> Iterator[ThreadedProxy]:
    proxy = ThreadedProxy(config_path).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def proxy_process(
    config_path: Path, log_path: Path, prefix: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon as its own process (``clearip-proxy run``), ready when it says so;
    ``prefix`` runs it through another command (``ip netns exec NS``)."""
    log = log_path.open("ab")
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "clearip.relay.cli", "run", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while b"clearip-proxy ready" not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield process
    finally:
        stop_process(process)
        log.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")
