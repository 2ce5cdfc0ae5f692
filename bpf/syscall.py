"""The few bpf(2) commands the loader needs that bcc's Python API does not expose.

Called directly through libc's ``syscall`` so nothing depends on which libbpf symbols a
distribution's libbcc happens to export: pin an object, open a pinned one, open a program by
id, read a program's id and name (to tell our XDP program from another product's), and run a
program on a packet (BPF_PROG_TEST_RUN: tests and the cost benchmark).
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

# bpf(2) command numbers (include/uapi/linux/bpf.h, enum bpf_cmd).
BPF_PROG_TEST_RUN = 10
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15

_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}
_ATTR_SIZE = 144  # larger than every union member used here; the kernel wants the rest zero

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    pass


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        raise BpfError(0, f"bpf(2) syscall number unknown for {platform.machine()}")
    result = _libc.syscall(
        ctypes.c_long(number), ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr))
    )
    if result < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf command {cmd}: {os.strerror(err)}")
    return int(result)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


def _put(attr: ctypes.Array[ctypes.c_char], offset: int, ctype: type, value: int) -> None:
    ctype.from_buffer(attr, offset).value = value  # type: ignore[attr-defined]


def obj_pin(fd: int, path: str) -> None:
    """Pin a program or map fd at ``path`` on a bpf file system."""
    attr = _attr()
    raw = ctypes.create_string_buffer(path.encode())
    _put(attr, 0, ctypes.c_uint64, ctypes.addressof(raw))  # pathname
    _put(attr, 8, ctypes.c_uint32, fd)  # bpf_fd
    _bpf(BPF_OBJ_PIN, attr)


def obj_get(path: str) -> int:
    """A new fd for the object pinned at ``path`` (the caller closes it)."""
    attr = _attr()
    raw = ctypes.create_string_buffer(path.encode())
    _put(attr, 0, ctypes.c_uint64, ctypes.addressof(raw))
    return _bpf(BPF_OBJ_GET, attr)


def prog_fd_by_id(prog_id: int) -> int:
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr)


@dataclass(frozen=True, slots=True)
class ProgramInfo:
    """What the kernel says about a loaded program (struct bpf_prog_info, the part used)."""

    id: int
    name: str  # the loader's name for it, at most 15 characters
    tag: str  # hex digest of its instructions


def prog_info(fd: int) -> ProgramInfo:
    info = ctypes.create_string_buffer(256)  # struct bpf_prog_info: type u32, id u32, tag ...
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, fd)  # bpf_fd
    _put(attr, 4, ctypes.c_uint32, ctypes.sizeof(info))  # info_len
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(info))  # info
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    raw = info.raw
    return ProgramInfo(
        id=int.from_bytes(raw[4:8], "little"),
        name=raw[64:80].split(b"\0", 1)[0].decode(errors="replace"),  # char name[16]
        tag=raw[8:16].hex(),
    )


def prog_info_by_id(prog_id: int) -> ProgramInfo:
    """The same for a program id (as netlink reports per interface)."""
    fd = prog_fd_by_id(prog_id)
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


def prog_id(fd: int) -> int:
    """The kernel-wide id of the program behind ``fd`` (what netlink reports per interface)."""
    return prog_info(fd).id


def prog_test_run(fd: int, packet: bytes) -> tuple[int, bytes]:
    """Run the program once on ``packet``: its return code and the packet as it left it."""
    retval, out, _ = _test_run(fd, packet, 1)
    return retval, out


def prog_test_run_ns(fd: int, packet: bytes, repeat: int) -> int:
    """The kernel's average run time of the program on ``packet`` over ``repeat`` runs (ns)."""
    return _test_run(fd, packet, repeat)[2]


def _test_run(fd: int, packet: bytes, repeat: int) -> tuple[int, bytes, int]:
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, fd)  # prog_fd
    _put(attr, 8, ctypes.c_uint32, len(packet))  # data_size_in
    _put(attr, 12, ctypes.c_uint32, ctypes.sizeof(data_out))  # data_size_out
    _put(attr, 16, ctypes.c_uint64, ctypes.addressof(data_in))  # data_in
    _put(attr, 24, ctypes.c_uint64, ctypes.addressof(data_out))  # data_out
    _put(attr, 32, ctypes.c_uint32, repeat)  # repeat
    _bpf(BPF_PROG_TEST_RUN, attr)
    retval = int(ctypes.c_uint32.from_buffer(attr, 4).value)
    size_out = int(ctypes.c_uint32.from_buffer(attr, 12).value)
    duration = int(ctypes.c_uint32.from_buffer(attr, 36).value)  # ns per run
    return retval, data_out.raw[:size_out], duration
