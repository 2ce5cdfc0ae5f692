"""Loads the Call-ID steering program (``reuseport.c``) and lets worker processes join it.

Every worker binds the same UDP address:port with SO_REUSEPORT; the program, attached to that
reuseport group, sends each datagram to the socket of the worker that owns its Call-ID
(:func:`clearip.bpf.steering.worker_for`), and emergency INVITEs to that worker's emergency
socket. What runs where:

Supervisor (root, once per listening address, before the workers start)
    ``steering = ReuseportSteering.load(workers=N, emergency=numbers, pin_dir=...)`` compiles
    and loads the program (about 2 s, bcc), creates or reopens its maps, sets N, fills the
    emergency numbers and pins program and maps under ``pin_dir``. Later:
    ``set_emergency(numbers)`` (with ``clearipctl emergency``), ``counters()``, ``slots()``;
    ``close()`` at exit leaves everything pinned and attached for the workers.
Worker k (no bcc: bpf(2) on the pinned objects)
    bind its normal socket (and its emergency socket) with SO_REUSEPORT, then
    ``WorkerSteering.open(pin_dir)``, ``attach(sock)`` (idempotent: the group has one program,
    whoever attached it last; attaching after bind matters, a group re-forms when every
    socket was closed), ``register(sock, k)`` and ``register(esock, k, emergency=True)``, then
    ``close()`` the handle (the registrations stay until the sockets close). A restarted worker
    does the same; while it is away its slots are empty and its calls fall back to the
    kernel's hash (counted fallback_empty_slot), so any other worker may get them. The
    kernel's hash (every fallback) may pick any socket of the group, emergency ones included:
    a worker reads both of its sockets, the emergency one first. Workers need CAP_BPF and
    access to /sys/fs/bpf for bpf(2); without them the supervisor can bind and register the
    sockets itself and hand them down (registering needs the socket's fd in the caller).

Pins (``pin_dir``, default /sys/fs/bpf/clearip-reuseport, outside the XDP filter's directory,
whose loader removes whatever it does not know)
    ``prog`` the program, ``socks`` the socket map (2 * MAX_WORKERS slots: k, and N + k for
    emergency), ``config`` the worker count; ``maps-<digest>/`` the emergency numbers and the
    counters of one program text (an upgrade gets fresh ones; stale ones are removed).

One program and one socket map serve one reuseport group: a second listening address (IPv6
next to IPv4, another port) needs its own ``pin_dir``.

Failure
    Without bcc, kernel headers, privileges, or when the kernel refuses the program,
    :class:`SteeringUnavailable` says what is missing and how to fix it; the workers then
    share the group through the kernel's own hash (no steering).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clearip.bpf import bpfmaps, loader, syscall
from clearip.bpf.loader import FilterUnavailable, install_hint
from clearip.bpf.pins import ensure_bpffs, maps_name, pin, remove_stale_maps
from clearip.bpf.steering import MAX_WORKERS, OUTCOMES
from clearip.relay.policy.emergency import validate_number

SOURCE = Path(__file__).with_name("reuseport.c")
DEFAULT_PIN_DIR = "/sys/fs/bpf/clearip-reuseport"
BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68
SO_COOKIE = 57
SLOTS = 2 * MAX_WORKERS
NUMBER_KEY_SIZE = 16  # struct number_key: 15 digits at most, zero-padded


class SteeringUnavailable(FilterUnavailable):
    """Kernel steering cannot run here; ``reason`` says why and ``fix`` how to fix it (the
    XDP filter's exception, so one handler serves both kernel programs)."""


def _check_workers(workers: int) -> int:
    if not 0 < workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1 to {MAX_WORKERS}, not {workers}")
    return workers


def _check_udp(sock: socket.socket) -> None:
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError("Call-ID steering is for UDP sockets (IPv4 or IPv6)")


class WorkerSteering:
    """A worker's handle on the pinned program and socket map (no bcc)."""

    def __init__(self, prog_fd: int, socks_fd: int, config_fd: int) -> None:
        self._prog_fd: int | None = prog_fd
        self._socks_fd: int | None = socks_fd
        self._config_fd: int | None = config_fd

    @classmethod
    def open(cls, pin_dir: str | Path = DEFAULT_PIN_DIR) -> WorkerSteering:
        """Open what :meth:`ReuseportSteering.load` pinned; SteeringUnavailable if nothing is."""
        pins = Path(pin_dir)
        opened: list[int] = []
        try:
            for name in ("prog", "socks", "config"):
                opened.append(syscall.obj_get(str(pins / name)))
        except OSError as exc:
            for fd in opened:
                os.close(fd)
            raise SteeringUnavailable(
                f"no steering program pinned at {pins} ({exc.strerror})",
                "load it first (ReuseportSteering.load in the supervisor), as root",
            ) from None
        return cls(*opened)

    def _fd(self, fd: int | None) -> int:
        if fd is None:
            raise RuntimeError("the steering handle is closed")
        return fd

    @property
    def prog_fd(self) -> int:
        return self._fd(self._prog_fd)

    @property
    def workers(self) -> int:
        """The worker count the program divides by (set by the supervisor's load)."""
        raw = bpfmaps.lookup(self._fd(self._config_fd), bytes(4), 4)
        return int.from_bytes(raw or bytes(4), "little")

    def slot(self, worker: int, *, emergency: bool = False) -> int:
        n = self.workers
        if not 0 <= worker < n:
            raise ValueError(f"worker must be 0 to {n - 1} (the program has {n} workers)")
        return n + worker if emergency else worker

    def attach(self, sock: socket.socket) -> None:
        """Make the program choose for ``sock``'s reuseport group (bind ``sock`` first)."""
        _check_udp(sock)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, self.prog_fd)

    def register(self, sock: socket.socket, worker: int, *, emergency: bool = False) -> int:
        """Put ``sock`` (bound, SO_REUSEPORT, owned by this process) in worker's normal or
        emergency slot, replacing what was there; returns the slot. The kernel empties the
        slot when the socket closes. A socket sits in one slot at most: registering it again
        in its slot does nothing, in another slot is refused (EBUSY)."""
        _check_udp(sock)
        slot = self.slot(worker, emergency=emergency)
        fd = self._fd(self._socks_fd)
        key = slot.to_bytes(4, "little")
        try:
            bpfmaps.update(fd, key, sock.fileno().to_bytes(8, "little"))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                if bpfmaps.lookup(fd, key, 8) == socket_cookie(sock).to_bytes(8, "little"):
                    return slot
                why = "it is in another slot (unregister it there first)"
            else:
                why = "it must be a bound UDP socket with SO_REUSEPORT, owned by this process"
            raise OSError(
                exc.errno, f"cannot register the socket in slot {slot}: {exc.strerror} ({why})"
            ) from None
        return slot

    def unregister(self, worker: int, *, emergency: bool = False) -> bool:
        """Empty a slot (its datagrams fall back to the kernel's hash)."""
        key = self.slot(worker, emergency=emergency).to_bytes(4, "little")
        return bpfmaps.delete(self._fd(self._socks_fd), key)

    def slots(self) -> dict[int, int]:
        """Occupied slots -> socket cookie (SO_COOKIE of the socket in it)."""
        fd = self._fd(self._socks_fd)
        out: dict[int, int] = {}
        for slot in range(SLOTS):
            raw = bpfmaps.lookup(fd, slot.to_bytes(4, "little"), 8)
            if raw is not None:
                out[slot] = int.from_bytes(raw, "little")
        return out

    def close(self) -> None:
        """Drop this process's handles; registrations and the attached program stay."""
        for name in ("_prog_fd", "_socks_fd", "_config_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def detach(sock: socket.socket) -> bool:
    """Remove the program from ``sock``'s reuseport group (the kernel's hash again); False
    when the group had none."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except FileNotFoundError:
        return False
    return True


def socket_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


class ReuseportSteering(WorkerSteering):
    """The supervisor's handle: loads the program and owns its emergency numbers and counters."""

    def __init__(self, bpf: Any, prog_fd: int, socks_fd: int, config_fd: int, maps: Path) -> None:
        super().__init__(prog_fd, socks_fd, config_fd)
        self._bpf: Any = bpf
        self.maps = maps
        self.pin_dir = maps.parent
        self._emergency_fd: int | None = syscall.obj_get(str(maps / "emergency"))
        self._counters_fd: int | None = syscall.obj_get(str(maps / "counters"))
        info = bpfmaps.prog_info(prog_fd)
        self.prog_id = info.prog_id
        self.verified_insns = info.verified_insns

    @classmethod
    def load(
        cls,
        *,
        workers: int,
        emergency: Iterable[str] = (),
        pin_dir: str | Path = DEFAULT_PIN_DIR,
    ) -> ReuseportSteering:
        """Compile, load, fill and pin; raises :class:`SteeringUnavailable` with the fix."""
        _check_workers(workers)
        numbers = {validate_number(n) for n in emergency}
        bcc = loader.prerequisites(SteeringUnavailable, "the steering program", "the supervisor")
        pins = Path(pin_dir)
        ensure_bpffs(pins, SteeringUnavailable)
        source = SOURCE.read_text()
        maps = pins / maps_name(source)
        maps.mkdir(exist_ok=True)
        socks_fd = _socket_map(pins / "socks")
        try:
            bpf = bcc.BPF(
                text=source.encode(),
                cflags=loader.cflags(SOCKS_FD=socks_fd, PIN_DIR=pins, MAPS_DIR=maps),
            )
            function = bpf.load_func(b"steer", BPF_PROG_TYPE_SK_REUSEPORT)
        except Exception as exc:  # bcc raises bare Exception for compile/load failures
            os.close(socks_fd)
            raise SteeringUnavailable(
                f"the steering program did not compile or load: {exc}",
                "check that kernel headers match (" + install_hint() + ") and the bcc output "
                "(a verifier refusal is printed above it)",
            ) from None
        prog_fd = os.dup(int(function.fd))
        config_fd = syscall.obj_get(str(pins / "config"))
        steering = cls(bpf, prog_fd, socks_fd, config_fd, maps)
        try:
            steering.set_workers(workers)
            steering.set_emergency(numbers)
            pin(prog_fd, pins / "prog")
        except Exception:
            steering.close()
            raise
        remove_stale_maps(pins, keep=maps)
        return steering

    # -- maps ----------------------------------------------------------------------------------
    def set_workers(self, workers: int) -> None:
        """The divisor of the Call-ID hash. Emergency slots are N + k, so after a change
        every worker registers its sockets again (calls move to their new owners)."""
        value = _check_workers(workers).to_bytes(4, "little")
        bpfmaps.update(self._fd(self._config_fd), bytes(4), value)

    def set_emergency(self, numbers: Iterable[str]) -> None:
        """Make the emergency map equal to ``numbers`` (additions first, then removals)."""
        fd = self._fd(self._emergency_fd)
        wanted = {validate_number(n).encode().ljust(NUMBER_KEY_SIZE, b"\0") for n in numbers}
        for key in wanted:
            bpfmaps.update(fd, key, b"\1")
        for key in bpfmaps.keys(fd, NUMBER_KEY_SIZE):
            if key not in wanted:
                bpfmaps.delete(fd, key)

    def emergency_numbers(self) -> list[str]:
        keys = bpfmaps.keys(self._fd(self._emergency_fd), NUMBER_KEY_SIZE)
        return sorted(key.rstrip(b"\0").decode() for key in keys)

    def counters(self) -> dict[str, int]:
        """Datagrams per outcome since the counters were created, summed over CPUs."""
        fd = self._fd(self._counters_fd)
        return {
            name: bpfmaps.percpu_sum_u64(fd, index.to_bytes(4, "little"))
            for index, name in enumerate(OUTCOMES)
        }

    def run_stats(self) -> tuple[int, int]:
        """(runs, total ns) of the program, counted while kernel.bpf_stats_enabled is 1 or a
        :func:`clearip.bpf.bpfmaps.enable_stats` fd is open."""
        info = bpfmaps.prog_info(self.prog_fd)
        return info.run_cnt, info.run_time_ns

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the supervisor's handles; the program, its pins and registrations stay."""
        for name in ("_emergency_fd", "_counters_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        super().close()
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def _socket_map(path: Path) -> int:
    """The pinned socket map, reopened when it has the expected shape, else made anew."""
    if path.exists():
        fd = syscall.obj_get(str(path))
        info = bpfmaps.map_info(fd)
        wanted = (BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, SLOTS)
        if (info.map_type, info.key_size, info.value_size, info.max_entries) == wanted:
            return fd
        os.close(fd)
    try:
        fd = bpfmaps.map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, SLOTS, "clearip_socks")
    except OSError as exc:
        raise SteeringUnavailable(
            f"cannot create the socket map: {exc.strerror}",
            "run as root on a kernel with BPF_MAP_TYPE_REUSEPORT_SOCKARRAY (4.19+)",
        ) from None
    pin(fd, path)
    return fd


def remove_pins(pin_dir: str | Path = DEFAULT_PIN_DIR) -> None:
    """Unpin program and maps (a program still attached to a group stays until that group's
    sockets close or :func:`detach`)."""
    pins = Path(pin_dir)
    if pins.is_dir():
        shutil.rmtree(pins, ignore_errors=True)
