"""The SK_REUSEPORT steering programs the supervisor loads before any worker binds.

Rules: one program per UDP listener, pinned where the workers look
(:meth:`~clearip.relay.service.worker_role.WorkerRole.steering_dir`); the pins must be on the bpf
file system (under /sys/fs/bpf the loader mounts it when missing); anything that stops steering
raises :class:`SteeringOff` with the reason and the fix, and the supervisor then runs one
process instead (degraded, still correct). A partial load is closed before raising.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from clearip.relay.config import ProxyConfig
from clearip.relay.service.worker_role import WorkerRole
from clearip.relay.transport.peer import ListenerSpec

if TYPE_CHECKING:
    from clearip.bpf.reuseport import ReuseportSteering

log = logging.getLogger("clearip.supervisor")


class SteeringOff(Exception):
    """Kernel steering cannot run: ``reason`` and ``fix`` for the one error line."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason} (fix: {fix})")
        self.reason = reason
        self.fix = fix


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


def set_steering_emergency(steering: dict[str, ReuseportSteering], numbers: list[str]) -> None:
    """The steering programs' emergency maps follow the policy's numbers (their queue jump
    only; the workers bypass ClearIP for them whatever the kernel does). Logged, not raised."""
    for name, handle in steering.items():
        try:
            handle.set_emergency(numbers)
        except OSError as exc:
            log.error("steering %s: cannot set the emergency numbers: %s", name, exc)


def steering_counters(steering: dict[str, ReuseportSteering]) -> dict[str, dict[str, int]]:
    """Each steering program's counters, by listener (one that cannot be read is left out)."""
    out: dict[str, dict[str, int]] = {}
    for name, handle in steering.items():
        with contextlib.suppress(OSError, RuntimeError):
            out[name] = handle.counters()
    return out
