"""Lets the RPM's private environment import the OS's ``bcc`` module, and nothing else of it.

bcc's Python binding is pure Python over ``ctypes`` and comes with the OS's ``python3-bcc``,
installed for the OS's own Python (RHEL 9: 3.9, Debian: 3.11), never from PyPI (the PyPI
project called ``bcc`` is unrelated). Putting that whole site-packages on ``sys.path`` would
mix in modules built for another Python, so this finder answers for the top-level ``bcc``
package only; its submodules then load through ``bcc.__path__``. ``clearip-os-bcc.pth``
imports this module at interpreter start. scripts/bootstrap.sh does the same for the
development venv with a symbolic link.
"""

from __future__ import annotations

import glob
import sys
from importlib.machinery import ModuleSpec, PathFinder

# RHEL 9 (python3-bcc is noarch), Debian/Ubuntu, then any other Python's site-packages.
CANDIDATES = (
    "/usr/lib/python3.9/site-packages",
    "/usr/lib/python3/dist-packages",
    *sorted(glob.glob("/usr/lib*/python3*/site-packages"), reverse=True),
)


class OsBccFinder:
    """A meta path finder for ``bcc`` alone, looked up in the OS's Python directories."""

    @classmethod
    def find_spec(cls, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if name != "bcc":
            return None
        for directory in CANDIDATES:
            spec = PathFinder.find_spec(name, [directory])
            if spec is not None:
                return spec
        return None


if not any(finder is OsBccFinder for finder in sys.meta_path):
    sys.meta_path.append(OsBccFinder)
