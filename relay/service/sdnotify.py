"""systemd notifications over ``$NOTIFY_SOCKET``, written directly (no extra dependency).

READY=1 once listeners are bound and the first ClearIP connection attempt has finished;
WATCHDOG=1 from a task on the event loop, so a wedged loop stops the pings and systemd
restarts the service; STATUS= carries a one-line summary for ``systemctl status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable


class Notifier:
    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def send(self, *fields: str) -> bool:
        if not self.path:
            return False
        address = self.path
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of the watchdog timeout systemd set for us (``WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


async def watchdog(notifier: Notifier, interval: float, status: Callable[[], str]) -> None:
    """Ping from the event loop itself: if the loop is stuck, the pings stop."""
    while True:
        with contextlib.suppress(Exception):
            notifier.send("WATCHDOG=1", f"STATUS={status()}")
        await asyncio.sleep(interval)
