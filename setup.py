"""Maps the top-level source folders onto the ``clearip`` import namespace, and compiles the
sans-IO core with mypyc.

``relay/`` installs as ``clearip.relay``, ``ctl/`` as ``clearip.ctl`` and ``bpf/`` as
``clearip.bpf``; sub-packages are found automatically so a new folder cannot be forgotten.

Every module of ``relay/sip/`` and ``relay/proxy/`` (the SIP stack and the proxy core: pure,
strictly typed code that runs per message) is also compiled into a C extension by mypyc, which
halves their cost, with the few other modules that every message goes through (the UDP socket
reader, the effect interpreter, its timer wheel, the emergency-number check:
``relay/coresources.py``); the rest of the asyncio shell stays interpreted. The ``.py`` files
are installed too: they are the fallback, used when no C compiler or Python headers are
available at install time (one message says so, the install goes on) and whenever
``CLEARIP_PURE_PYTHON=1`` is set at run time (see ``relay/__init__.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

FOLDERS = ("relay", "ctl", "bpf")
# One shared library holds the compiled code of every module (calls between them stay C calls);
# each module gets a small extension that loads its part from it.
GROUP = "clearip.relay._core"
WORK = Path("build", "mypyc")  # relative to the project: mypyc names modules from paths
PURE_HINT = (
    "install a C compiler and the Python headers (Debian: gcc python3-dev, RHEL: gcc "
    "python3.11-devel) and reinstall to compile it"
)

# Which sources are compiled and their digest, shared with relay/__init__.py (loaded by path:
# importing the relay package here would run its start-up checks).
_spec = importlib.util.spec_from_file_location("_coresources", Path("relay", "coresources.py"))
assert _spec is not None and _spec.loader is not None
_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core)

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder in FOLDERS:
    top = f"clearip.{folder}"
    packages.append(top)
    package_dir[top] = folder
    packages.extend(f"{top}.{sub}" for sub in find_packages(folder))


def _say_pure(why: str) -> None:
    """The one message of a build without the compiled core."""
    print(
        f"clearip-inline-proxy: {why}: the SIP core stays pure Python; {PURE_HINT}", file=sys.stderr
    )


def _compiler_missing() -> str | None:
    """Why no C extension can be built here, or None when a compiler and headers exist."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler ({cc[0] if cc else 'cc'})"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return f"no Python headers ({sysconfig.get_paths()['include']}/Python.h)"
    return None


def _sources() -> list[str]:
    """The modules to compile, as paths in a link farm shaped like the installed namespace
    (``build/mypyc/src/clearip/relay`` -> ``relay``), so mypy names them ``clearip.relay.*``
    as the code imports them."""
    farm = WORK / "src" / "clearip"
    farm.mkdir(parents=True, exist_ok=True)
    link = farm / "relay"
    if not link.is_symlink():
        if link.exists():
            shutil.rmtree(link)
        link.symlink_to(Path("..", "..", "..", "..", "relay"))
    # Package __init__ files stay interpreted: a compiled one computes its __path__ from the
    # module name (clearip/relay/sip), which is not where the folder is (relay/sip); they
    # only re-export names.
    return [str(link / os.path.relpath(path, "relay")) for path in _core.core_sources("relay")]


def _mypy_config() -> str:
    """mypy settings for the compile, independent of the project's [tool.mypy]: the build
    environment lacks the runtime dependencies (their imports are Any here), and only the
    compiled modules' own errors matter (``make typecheck`` is the strict check)."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "mypy.ini"
    path.write_text(
        "[mypy]\n"
        f"mypy_path = {WORK / 'src'}\n"
        "explicit_package_bases = True\n"
        "namespace_packages = True\n"
        "ignore_missing_imports = True\n"
        "follow_imports = silent\n"
        "warn_unused_configs = False\n"
    )
    return str(path)


# When mypyc read the sources: a source changed after it is newer than the library built
# in place (relay/__init__.py then runs the .py files in a checkout).
_READ_AT: list[float] = []


@functools.cache  # setuptools may finalize build_ext more than once (editable builds)
def compiled_extensions() -> list[Extension]:
    _READ_AT.append(time.time())
    why = _compiler_missing()
    if why is not None:
        _say_pure(why)
        return []
    try:
        from mypyc.build import mypycify

        return list(
            mypycify(
                ["--config-file", _mypy_config(), *_sources()],
                opt_level="3",
                group_name=GROUP,
                target_dir=str(WORK / "c"),
            )
        )
    except (SystemExit, Exception) as exc:  # the install goes on without it
        _say_pure(f"mypyc could not translate it ({exc or type(exc).__name__})")
        return []


class BuildCore(build_ext):
    """``build_ext`` that compiles the core, and falls back to the pure-Python modules when it
    cannot: an install never fails for want of a working compiler.

    mypyc runs here, when a build needs the extensions, not when setup.py is loaded: making
    the sdist or the metadata (pip asks for it first) then costs nothing and ships no C.
    """

    def finalize_options(self) -> None:
        building = set(self.distribution.commands) - {"sdist", "egg_info", "dist_info"}
        self.distribution.ext_modules = list(compiled_extensions()) if building else []
        super().finalize_options()

    def build_extensions(self) -> None:
        # A Python built with a shared libpython (pyenv's) links extensions with an rpath to
        # its own lib directory. An extension needs no libpython (the interpreter provides
        # the symbols), and a package must not carry the build machine's paths (rpmlint:
        # binary-or-shlib-defines-rpath).
        for attr in ("linker_so", "linker_so_cxx"):
            command = getattr(self.compiler, attr, None)
            if command:
                kept = [arg for arg in command if not arg.startswith(("-Wl,-rpath", "-Wl,-R"))]
                setattr(self.compiler, attr, kept)
        super().build_extensions()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CCompilerError, LinkError, OSError...
            # A partial build would leave module extensions without their shared library.
            for path in self.get_outputs():
                Path(path).unlink(missing_ok=True)
            self.extensions = []
            _say_pure(f"compiling it failed ({exc})")
            return
        if self.inplace and self.extensions and _READ_AT:
            # The library in the source tree is as new as the sources it was made from, even
            # when setuptools kept an older identical copy.
            for library in Path("relay").glob("_core__mypyc.*"):
                os.utime(library, (_READ_AT[0], _READ_AT[0]))
            # ... and names their contents, which a checkout that only moves times keeps.
            Path("relay", _core.DIGEST_FILE).write_text(_core.core_digest("relay") + "\n")


# A placeholder, replaced by BuildCore: it makes setuptools run build_ext and tag the wheel
# for this platform.
PLACEHOLDER = Extension(f"{GROUP}__mypyc", sources=[])

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=[PLACEHOLDER],
    cmdclass={"build_ext": BuildCore},
)
