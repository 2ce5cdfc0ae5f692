"""Loading a C program of this folder through bcc: what both kernel programs' loaders share.

The XDP edge filter (:mod:`clearip.bpf.edge_filter`) and the Call-ID steering program
(:mod:`clearip.bpf.reuseport`) are C files that bcc compiles at run time (about 2 s each).
Before that, :func:`prerequisites` checks what compiling and loading take here (bcc's Python
module, root, the running kernel's headers) and names a missing one with its fix
(:class:`FilterUnavailable`, or a subclass the caller gives). :func:`cflags` makes the
compiler flags: the defines a program expects, and this folder on the include path, where the
headers the programs share live (``emergency_invite.h``). :func:`program_text` is what a
program is made of, its file and those headers: the digest that decides whether pinned maps
still fit a program (:func:`clearip.bpf.pins.maps_name`) covers all of it.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([\w.-]+)"', re.MULTILINE)


def install_hint() -> str:
    if Path("/etc/redhat-release").exists():
        return "dnf install bcc python3-bcc kernel-devel-$(uname -r)"
    return "apt-get install python3-bpfcc linux-headers-$(uname -r) (or scripts/bootstrap.sh)"


class FilterUnavailable(Exception):
    """The kernel filter cannot run here; ``reason`` says why and ``fix`` how to fix it."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason} (fix: {fix})")
        self.reason = reason
        self.fix = fix


def prerequisites(unavailable: type[FilterUnavailable], what: str, who: str) -> Any:
    """bcc's module, once loading ``what`` ("XDP", "the steering program") can work here:
    bcc installed, root (``who`` is told to run as root), the running kernel's headers.
    Raises ``unavailable`` with the fix otherwise."""
    try:
        import bcc
    except ImportError:
        raise unavailable("bcc's Python module is not installed", install_hint()) from None
    if os.geteuid() != 0:
        raise unavailable(
            f"loading {what} needs root (CAP_BPF, CAP_NET_ADMIN)", f"run {who} as root"
        )
    headers = Path("/lib/modules") / platform.release() / "build"
    if not headers.exists():
        raise unavailable(f"no kernel headers at {headers}", install_hint())
    return bcc


def cflags(**defines: str | int | Path) -> list[str]:
    """bcc's compiler flags for a program of this folder: this folder on the include path,
    ``-DNAME=value`` per define (paths and strings quoted as C strings, integers as they
    are), and the warning bcc's map macros set off turned off."""
    flags = [f"-I{HERE}"]
    for name, value in defines.items():
        flags.append(f"-D{name}={value}" if isinstance(value, int) else f'-D{name}="{value}"')
    flags.append("-Wno-unused-value")
    return flags


def program_text(source: str) -> str:
    """``source`` followed by the text of each header of this folder it includes (once each,
    recursively): everything the compiled program depends on besides the kernel's headers."""
    headers: dict[str, str] = {}

    def follow(text: str) -> None:
        for name in _LOCAL_INCLUDE.findall(text):
            path = HERE / name
            if name not in headers and path.is_file():
                headers[name] = path.read_text(encoding="utf-8")
                follow(headers[name])

    follow(source)
    return source + "".join(f"\n// {name}\n{text}" for name, text in headers.items())
