"""Map commands and program facts through bpf(2), for processes that do not load bcc.

A worker process registers its sockets in the pinned socket map and attaches the pinned
steering program with these alone: no compiler, no headers, nothing but the syscall
(``clearip.bpf.syscall`` issues it). Keys and values are raw bytes; callers pack them.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from pathlib import Path

from clearip.bpf.syscall import _attr, _bpf, _put

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

BPF_ANY = 0

# struct bpf_prog_info offsets (include/uapi/linux/bpf.h)
_PROG_TYPE, _PROG_ID = 0, 4
_RUN_TIME_NS, _RUN_CNT, _VERIFIED_INSNS = 192, 200, 216
_INFO_SIZE = 512


def _buffer(data: bytes | int) -> ctypes.Array[ctypes.c_char]:
    return (
        ctypes.create_string_buffer(data, len(data))
        if isinstance(data, bytes)
        else (ctypes.create_string_buffer(data))
    )


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str) -> int:
    """A new map's fd (the caller closes or pins it)."""
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, map_type)
    _put(attr, 4, ctypes.c_uint32, key_size)
    _put(attr, 8, ctypes.c_uint32, value_size)
    _put(attr, 12, ctypes.c_uint32, max_entries)
    encoded = name.encode()[:15]
    ctypes.memmove(ctypes.addressof(attr) + 28, encoded, len(encoded))  # map_name
    return _bpf(BPF_MAP_CREATE, attr)


def _elem(
    cmd: int, fd: int, key: bytes | None, value: ctypes.Array[ctypes.c_char] | None, flags: int
) -> None:
    """One command on one element (key None: NULL, the first key for BPF_MAP_GET_NEXT_KEY;
    value: the value, or the next key)."""
    key_buf = _buffer(key) if key is not None else None
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, fd)
    if key_buf is not None:
        _put(attr, 8, ctypes.c_uint64, ctypes.addressof(key_buf))
    if value is not None:
        _put(attr, 16, ctypes.c_uint64, ctypes.addressof(value))
    _put(attr, 24, ctypes.c_uint64, flags)
    _bpf(cmd, attr)


def _found(cmd: int, fd: int, key: bytes | None, value: ctypes.Array[ctypes.c_char] | None) -> bool:
    """The same; False when the map has no such element (ENOENT)."""
    try:
        _elem(cmd, fd, key, value, 0)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def update(fd: int, key: bytes, value: bytes) -> None:
    _elem(BPF_MAP_UPDATE_ELEM, fd, key, _buffer(value), BPF_ANY)


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key``, or None when there is none."""
    value = _buffer(value_size)
    if not _found(BPF_MAP_LOOKUP_ELEM, fd, key, value):
        return None
    return value.raw[:value_size]


def delete(fd: int, key: bytes) -> bool:
    """Remove ``key``; False when it was not there."""
    return _found(BPF_MAP_DELETE_ELEM, fd, key, None)


def keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (a snapshot; entries may change meanwhile)."""
    out: list[bytes] = []
    following = _buffer(key_size)
    current: bytes | None = None  # NULL: the first key
    while _found(BPF_MAP_GET_NEXT_KEY, fd, current, following):
        current = following.raw[:key_size]
        out.append(current)
    return out


def possible_cpus() -> int:
    """How many values a per-CPU map returns per key (/sys/devices/system/cpu/possible)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def percpu_sum_u64(fd: int, key: bytes) -> int:
    """The sum over CPUs of a per-CPU u64 value (0 when absent)."""
    cpus = possible_cpus()
    raw = lookup(fd, key, 8 * cpus)
    if raw is None:
        return 0
    return sum(int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(cpus))


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int


def map_info(fd: int) -> MapInfo:
    info = _buffer(_INFO_SIZE)
    _info_by_fd(fd, info)
    fields = [int(ctypes.c_uint32.from_buffer(info, 4 * i).value) for i in range(5)]
    return MapInfo(*fields)


@dataclass(frozen=True)
class ProgInfo:
    prog_type: int
    prog_id: int
    verified_insns: int | None  # None: the kernel does not report it (before 5.16)
    run_time_ns: int  # both 0 unless kernel.bpf_stats_enabled=1
    run_cnt: int


def prog_info(fd: int) -> ProgInfo:
    info = _buffer(_INFO_SIZE)
    length = _info_by_fd(fd, info)

    def u32(offset: int) -> int:
        return int(ctypes.c_uint32.from_buffer(info, offset).value)

    def u64(offset: int) -> int:
        return int(ctypes.c_uint64.from_buffer(info, offset).value)

    return ProgInfo(
        prog_type=u32(_PROG_TYPE),
        prog_id=u32(_PROG_ID),
        verified_insns=u32(_VERIFIED_INSNS) if length >= _VERIFIED_INSNS + 4 else None,
        run_time_ns=u64(_RUN_TIME_NS) if length >= _RUN_CNT else 0,
        run_cnt=u64(_RUN_CNT) if length >= _RUN_CNT + 8 else 0,
    )


def enable_stats() -> int:
    """Count run time and runs of every program while the returned fd is open (5.8+); the
    same as kernel.bpf_stats_enabled=1 without a setting left behind."""
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, BPF_STATS_RUN_TIME)
    return _bpf(BPF_ENABLE_STATS, attr)


def _info_by_fd(fd: int, info: ctypes.Array[ctypes.c_char]) -> int:
    """Fill ``info`` for the object behind ``fd``; the length the kernel wrote."""
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, fd)
    _put(attr, 4, ctypes.c_uint32, ctypes.sizeof(info))
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return int(ctypes.c_uint32.from_buffer(attr, 4).value)
