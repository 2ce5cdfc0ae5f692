"""The sockets between sibling workers that hand-off packets travel on.

Rules of this module:

- Each worker listens on ``WorkerRole.handoff_path()`` (mode 0600) with SOCK_SEQPACKET and
  connects to a sibling on first use, so each ordered pair of workers has one connection:
  packets keep their order, and flow control counts bytes (SO_SNDBUF, 8 MiB where allowed),
  not packets. (An unconnected SOCK_DGRAM receiver refuses more than
  net.unix.max_dgram_qlen packets, 10 by default: one TCP read of pipelined requests would
  overflow it.)
- Sending never waits: a sibling that is not running (not retried for :data:`RETRY_AFTER`)
  or whose queue is full is reported as False, and the caller decides. A sibling that
  restarted is connected to again, once, on the send that finds its old connection broken.
- A packet that does not decode (or did not fit the buffer) is dropped and reported to
  ``on_bad``; the rest go to ``on_packet``, in order.
- Opening refuses a path another live worker listens on (a second supervisor with the same
  run directory); closing removes the path only while it is still this listener's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from clearip.bpf.steering import MAX_WORKERS
from clearip.relay.transport.handoff_packets import HandoffError, Packet, decode

if TYPE_CHECKING:
    from clearip.relay.service.worker_role import WorkerRole

log = logging.getLogger("clearip.transport.handoff")

SOCKET_BUFFER = 8 * 1024 * 1024
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
RECV_BATCH = 64
RETRY_AFTER = 0.1  # seconds before connecting again to a sibling that was not there


def _buffers(sock: socket.socket) -> None:
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:  # not root: as much as net.core.[wr]mem_max allows
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


class Channel:
    """This worker's SOCK_SEQPACKET listener and its connections to its siblings."""

    def __init__(
        self,
        role: WorkerRole,
        on_packet: Callable[[Packet], None],
        on_bad: Callable[[str], None],
        buffer_size: Callable[[], int],
    ) -> None:
        self.role = role
        self.on_packet = on_packet
        self.on_bad = on_bad
        self.buffer_size = buffer_size
        self.path = role.handoff_path()
        self._listener: socket.socket | None = None
        self._inode = 0
        self._incoming: set[socket.socket] = set()
        self._out: dict[int, socket.socket] = {}
        self._absent_until: dict[int, float] = {}
        self._buffer = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        """Listen at the role's hand-off path; OSError naming the path when that fails."""
        loop = asyncio.get_running_loop()
        path = self.path
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(path)
            except OSError:
                pass  # nobody listens there: a stale path (or none) from an earlier run
            else:
                raise OSError(
                    errno.EADDRINUSE,
                    f"another worker {self.role.index} is listening at {path}: "
                    "is a second supervisor running with the same run directory?",
                )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(MAX_WORKERS)
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"cannot listen for hand-offs at {path}: {exc}") from None
        listener.setblocking(False)
        self._inode = os.stat(path).st_ino
        self._listener = listener
        self._loop = loop
        loop.add_reader(listener, self._accept)

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("hand-off accept failed: %s", exc)
                return
            sock.setblocking(False)
            _buffers(sock)
            self._incoming.add(sock)
            self._loop.add_reader(sock, self._readable, sock)

    def _readable(self, sock: socket.socket) -> None:
        size = self.buffer_size()
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        buffer = self._buffer
        view = memoryview(buffer)
        for _ in range(RECV_BATCH):
            try:
                n = sock.recv_into(buffer, 0, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("hand-off receive failed: %s", exc)
                n = 0
            if n == 0:  # the sibling closed its end (it stopped or restarted)
                self._drop_incoming(sock)
                return
            if n > len(buffer):
                self.on_bad(f"packet of {n} bytes truncated to {len(buffer)}")
                continue
            try:
                packet = decode(view[:n])
            except HandoffError as exc:
                self.on_bad(str(exc))
                continue
            self.on_packet(packet)

    def _drop_incoming(self, sock: socket.socket) -> None:
        if self._loop is not None:
            self._loop.remove_reader(sock)
        self._incoming.discard(sock)
        sock.close()

    def _connect(self, worker: int) -> socket.socket | None:
        now = time.monotonic()
        if self._absent_until.get(worker, 0.0) > now:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _buffers(sock)
        sock.setblocking(False)
        try:
            sock.connect(self.role.handoff_path(worker))
        except OSError:  # ENOENT, ECONNREFUSED: not running; EAGAIN: its backlog is full
            sock.close()
            self._absent_until[worker] = now + RETRY_AFTER
            return None
        self._out[worker] = sock
        return sock

    def send(self, worker: int, raw: bytes) -> bool:
        """Queue one packet for ``worker``; False when it is not running or its queue is full."""
        for _attempt in range(2):
            sock = self._out.get(worker)
            if sock is None:
                if self._listener is None:
                    return False  # closed
                sock = self._connect(worker)
                if sock is None:
                    return False
            try:
                sock.send(raw, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return False  # its queue is full: not worth waiting for
            except OSError as exc:
                # EPIPE, ECONNRESET: that worker stopped (or restarted: connect again, once).
                del self._out[worker]
                sock.close()
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    log.debug("hand-off to worker %d failed: %s", worker, exc)
                    return False
                continue
            return True
        return False

    def close(self) -> None:
        loop = self._loop
        for sock in list(self._incoming):
            self._drop_incoming(sock)
        for sock in self._out.values():
            sock.close()
        self._out.clear()
        if self._listener is not None:
            if loop is not None:
                loop.remove_reader(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:  # still ours, not a successor's
                    os.unlink(self.path)
