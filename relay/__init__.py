"""The asyncio SIP relay: a sans-IO SIP core with thin asyncio transports around it.

The core (every module of ``sip/`` and ``proxy/``, plus the few modules of the shell that every
message goes through: ``coresources.COMPILED_MODULES``) is compiled into C extensions by mypyc
when the package is installed (see ``setup.py``); the ``.py`` files stay beside them as the
fallback. Python imports an extension before a ``.py`` of the same name, so the compiled core
is used when it was built. The pure-Python core is used instead when:

- ``CLEARIP_PURE_PYTHON=1`` is set (so the fallback keeps being tested: ``make test`` runs the
  suite both ways), or
- in a source checkout, a source of the core is newer than the compiled library: the edited
  code runs, not a stale build (one line on stderr says so; ``make setup-dev`` rebuilds).

Either way a finder put first on ``sys.meta_path`` loads those modules from their ``.py``
files; nothing is installed when neither applies.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location
from types import ModuleType

from clearip.relay.coresources import (
    COMPILED_MODULES,
    COMPILED_PACKAGES,
    DIGEST_FILE,
    core_digest,
    core_sources,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
_PREFIXES = tuple(f"{__name__}.{package}." for package in COMPILED_PACKAGES)
_MODULES = frozenset(
    f"{__name__}." + module.removesuffix(".py").replace(os.sep, ".") for module in COMPILED_MODULES
)


class PurePythonFinder(MetaPathFinder):
    """Finds the modules of the compiled packages as ``.py`` files, ignoring extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is None or not (fullname.startswith(_PREFIXES) or fullname in _MODULES):
            return None
        name = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, name + ".py")
            if os.path.isfile(source):
                return spec_from_file_location(fullname, source)
            package = os.path.join(entry, name)
            init = os.path.join(package, "__init__.py")
            if os.path.isfile(init):
                return spec_from_file_location(fullname, init, submodule_search_locations=[package])
        return None


def pure_python_requested() -> bool:
    return os.environ.get("CLEARIP_PURE_PYTHON", "") not in ("", "0")


def _stale_source() -> str | None:
    """In a source checkout, a source of the core edited since the library was built in place
    (or None). Times first (cheap); a newer file is stale only if the contents differ."""
    if not os.path.exists(os.path.join(os.path.dirname(_HERE), "setup.py")):
        return None  # installed: sources and extensions come from the same build
    libraries = glob.glob(os.path.join(_HERE, "_core__mypyc.*"))
    if not libraries:
        return None  # never compiled here
    built = min(os.path.getmtime(path) for path in libraries)
    newer = [path for path in core_sources(_HERE) if os.path.getmtime(path) > built]
    if not newer:
        return None
    try:
        with open(os.path.join(_HERE, DIGEST_FILE)) as recorded:
            if recorded.read().strip() == core_digest(_HERE):
                return None
    except OSError:
        pass
    return newer[0]


def core_build() -> str:
    """``compiled`` or ``pure``: how the SIP core runs in this process."""
    from clearip.relay.sip import parser

    return "pure" if parser.__file__.endswith(".py") else "compiled"


def _use_pure_python() -> None:
    if pure_python_requested():
        sys.meta_path.insert(0, PurePythonFinder())
        return
    stale = _stale_source()
    if stale is not None:
        print(
            f"clearip: {os.path.relpath(stale)} changed after the core was compiled: running "
            "the pure-Python core (rebuild it: make setup-dev)",
            file=sys.stderr,
        )
        sys.meta_path.insert(0, PurePythonFinder())


_use_pure_python()
