"""A worker process's place among its siblings (issue #16): what the supervisor tells it.

Rules:
- ``None`` everywhere means today's single process: no SO_REUSEPORT, no steering, no hand-off.
- Workers share nothing but the kernel: each binds every listener with SO_REUSEPORT, and the
  SK_REUSEPORT program (bpf/reuseport.c) sends every datagram of a call to the worker that owns
  its Call-ID (:func:`clearip.bpf.steering.worker_for`). One steering program and its pinned
  maps exist per UDP listener (one reuseport group each), under :meth:`steering_dir`.
- A worker's private Unix sockets (control, stream hand-off) live in ``run_dir``, named by index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clearip.relay.transport.peer import ListenerSpec


@dataclass(frozen=True, slots=True)
class WorkerRole:
    index: int  # 0 .. count-1
    count: int
    run_dir: str
    steering_pin_dir: str = ""  # "" = no kernel steering (the kernel's 4-tuple hash spreads)

    def steering_dir(self, spec: ListenerSpec) -> str:
        """The pin directory of the steering program for one UDP listener ("" = none).
        bpffs refuses names holding a dot (EPERM), so the address is spelled with '_'."""
        if not self.steering_pin_dir:
            return ""
        # bpffs refuses names with a dot (EPERM): 127.0.0.1 -> 127_0_0_1, :: -> __.
        address = spec.address.replace(":", "_").replace(".", "_") or "any"
        return str(Path(self.steering_pin_dir) / f"{spec.transport}-{address}-{spec.port}")

    def control_path(self, index: int | None = None) -> str:
        return str(Path(self.run_dir) / f"worker-{self.index if index is None else index}.sock")

    def handoff_path(self, index: int | None = None) -> str:
        return str(Path(self.run_dir) / f"worker-{self.index if index is None else index}.handoff")
