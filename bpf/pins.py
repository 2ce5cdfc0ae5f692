"""What the kernel programs keep on the bpf file system, and which XDP programs are ours.

Pins
    A program and its maps outlive the process that loaded them when they are pinned under
    /sys/fs/bpf (:func:`ensure_bpffs` mounts it where it is not). Each program's per-text maps
    live in ``maps-<digest>/`` (:func:`maps_name`): the same program text finds its maps again,
    a changed one gets fresh ones. The XDP filter pins ``prog`` and ``maps-*/`` under its pin
    directory (default :data:`DEFAULT_PIN_DIR`; the 0.1 release pinned its maps flat there,
    :data:`LEGACY_PINS`); :func:`our_pins` lists them, and nothing else in the directory is
    ever touched.

Ownership
    The filter only ever replaces or removes its own program: the one pinned at
    ``<pin_dir>/prog``, or one the kernel knows by this program's name (``clearip_xdp``: a
    filter whose pins were lost, or another clearip daemon's, on the interfaces named). An
    interface that carries any other XDP program (a DDoS agent, xdp-tools' xdp-filter) is left
    alone at start, logged and listed in the filter's status with the program's name and id,
    unless ``replace_foreign`` (:func:`foreign`). Detaching (:func:`detach_pinned`) removes our
    program wherever it is and our pins, and reports what it left (:class:`Detached`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from clearip.bpf import syscall
from clearip.bpf.attach import all_interfaces, attached_programs, set_xdp
from clearip.bpf.loader import FilterUnavailable, program_text

log = logging.getLogger("clearip.xdp")

BPFFS = Path("/sys/fs/bpf")
DEFAULT_PIN_DIR = "/sys/fs/bpf/clearip"
PROGRAM_NAME = "clearip_xdp"  # the kernel's name for the program: how detach recognises it
LEGACY_PINS = frozenset(
    {
        "trust_v4",
        "trust_v6",
        "sip_udp_ports",
        "sip_tcp_ports",
        "emergency",
        "counters",
        "dropped",
        "frag_dropped",
        "iface_counters",
    }
)  # the flat layout of 0.1, before maps-<layout>/


def ensure_bpffs(pin_dir: Path, unavailable: type[FilterUnavailable] = FilterUnavailable) -> None:
    """Make ``pin_dir`` (under /sys/fs/bpf), mounting the bpf file system first if it is not;
    ``unavailable`` (the caller's kind of FilterUnavailable) when that cannot be done."""
    if not os.path.ismount(BPFFS):
        result = subprocess.run(
            ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise unavailable(
                f"bpffs is not mounted at {BPFFS}: {result.stderr.strip()}",
                "mount -t bpf bpf /sys/fs/bpf",
            )
    pin_dir.mkdir(parents=True, exist_ok=True)


def maps_name(source: str) -> str:
    """The pin sub-directory of a program text's maps: same text (its headers included, see
    :func:`clearip.bpf.loader.program_text`), same maps."""
    return "maps-" + hashlib.sha256(program_text(source).encode()).hexdigest()[:12]


def pin(fd: int, path: Path) -> None:
    """Pin a program or map at ``path``, replacing what was pinned there."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    syscall.obj_pin(fd, str(path))


def our_pins(pins: Path) -> list[Path]:
    """What the XDP filter pins under ``pins``: ``prog``, ``maps-*/`` and the 0.1 map names."""
    if not pins.is_dir():
        return []
    return [
        path
        for path in sorted(pins.iterdir())
        if path.name == "prog" or path.name.startswith("maps-") or path.name in LEGACY_PINS
    ]


def owned_program_id(pin_dir: str | Path) -> int | None:
    """The id of the program pinned at ``<pin_dir>/prog`` (this daemon's filter), if any."""
    path = Path(pin_dir) / "prog"
    if not path.exists():
        return None
    try:
        fd = syscall.obj_get(str(path))
    except OSError:
        return None
    try:
        return syscall.prog_id(fd)
    finally:
        os.close(fd)


def describe_program(prog_id: int) -> str:
    """``'xdpfilt_dny_ip' (id 42)``, for messages about a program on an interface."""
    try:
        return f"'{syscall.prog_info_by_id(prog_id).name or '?'}' (id {prog_id})"
    except OSError:
        return f"id {prog_id}"


def named_ours(prog_id: int) -> bool:
    """The program has our program's name (:data:`PROGRAM_NAME`)."""
    try:
        return syscall.prog_info_by_id(prog_id).name == PROGRAM_NAME
    except OSError:
        return False


def is_ours(prog_id: int, pinned: int | None) -> bool:
    """Ours: the program pinned under our pin directory, or one with our program's name (a
    filter whose pins were lost, or another clearip daemon's)."""
    return prog_id == pinned or named_ours(prog_id)


def foreign(before: dict[str, dict[str, int]], pinned: int | None, replace: bool) -> dict[str, str]:
    """Interfaces to leave alone, with why: they carry a program that is not ours (see
    :func:`is_ours`), unless ``replace`` (then it is only logged)."""
    out: dict[str, str] = {}
    for name, present in before.items():
        others = [prog for prog in present.values() if not is_ours(prog, pinned)]
        if not others:
            continue
        what = ", ".join(describe_program(prog) for prog in others)
        if replace:
            log.warning("XDP on %s: replacing another program, %s (replace_foreign)", name, what)
            continue
        why = f"another XDP program is attached: {what}; left alone"
        log.error(
            "XDP on %s: %s (remove it, leave %s out of xdp.interfaces, or set [xdp] "
            "replace_foreign = true)",
            name,
            why,
            name,
        )
        out[name] = why
    return out


@dataclass
class Detached:
    """What a detach did: programs removed, programs left alone (not ours), pins."""

    removed: list[str] = field(default_factory=list)  # "eth1 (native)"
    left_alone: list[str] = field(default_factory=list)  # "eth2: 'xdpfilt_dny_ip' (id 42)"
    unpinned: list[str] = field(default_factory=list)  # paths removed
    kept: list[str] = field(default_factory=list)  # paths under the pin dir that are not ours

    def merge(self, other: Detached) -> None:
        self.removed += [r for r in other.removed if r not in self.removed]
        self.left_alone += [r for r in other.left_alone if r not in self.left_alone]
        self.unpinned += other.unpinned
        self.kept += other.kept


def detach_pinned(
    pin_dir: str | Path = DEFAULT_PIN_DIR, interfaces: Iterable[str] = ()
) -> Detached:
    """Remove a filter left by a previous daemon (``clearipctl xdp detach``), then our pins
    under ``pin_dir``. On the named interfaces our program is the pinned one or any program
    named like ours (see :func:`is_ours`); without names every interface of this namespace is
    looked at for the pinned program only (another clearip filter, pinned elsewhere, is not
    this one's). Any other XDP program stays where it is, and so does anything else in
    ``pin_dir``; the result says what was done and left."""
    pins = Path(pin_dir)
    report = Detached()
    pinned = owned_program_id(pins)
    names = list(interfaces)
    for ifname in names or all_interfaces():
        try:
            present = attached_programs(ifname)
        except FilterUnavailable:
            continue
        for mode, prog in present.items():
            if prog != pinned and not (names and named_ours(prog)):
                report.left_alone.append(f"{ifname}: {describe_program(prog)}")
                continue
            try:
                set_xdp(ifname, -1, mode)
                report.removed.append(f"{ifname} ({mode})")
            except OSError as exc:
                log.info("XDP detach from %s: %s", ifname, exc)
    for path in our_pins(pins):
        unpin(path)
        report.unpinned.append(str(path))
    if pins.is_dir():
        report.kept = [str(path) for path in sorted(pins.iterdir())]
        if not report.kept:
            pins.rmdir()
    return report


def unpin(path: Path) -> None:
    """Remove a pinned object, or a directory of them."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale_maps(pin_dir: Path, keep: Path, legacy: Collection[str] = ()) -> None:
    """The maps of older program texts go: ``maps-*`` other than ``keep``, and the names in
    ``legacy`` (an older flat layout); nothing else in ``pin_dir`` is touched."""
    for path in sorted(pin_dir.iterdir()) if pin_dir.is_dir() else ():
        if path == keep or not (path.name.startswith("maps-") or path.name in legacy):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
