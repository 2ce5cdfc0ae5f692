"""The compiled SIP core and its pure-Python fallback (setup.py, relay/__init__.py).

Where a C compiler and the Python headers exist (CI, any machine bootstrap set up), the install
compiled every module of ``relay/sip`` and ``relay/proxy`` and a process loads them as
extensions; ``CLEARIP_PURE_PYTHON=1`` loads the ``.py`` files instead. Without a compiler the
wheel still builds, pure, with one message saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from clearip.relay import COMPILED_PACKAGES, core_build, pure_python_requested

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    "clearip." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for package in COMPILED_PACKAGES
    for path in (ROOT / "relay" / package).rglob("*.py")
    if path.name != "__init__.py"
)
PACKAGES = ["clearip.relay.proxy", "clearip.relay.sip", "clearip.relay.sip.transaction"]


def _toolchain() -> bool:
    """What setup.py checks before compiling: a C compiler and Python.h."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return shutil.which(cc) is not None and headers.exists()


def _loaded_from(pure: bool) -> dict[str, str]:
    """Module -> the file it loads from, in a fresh interpreter with or without the switch."""
    env = {k: v for k, v in os.environ.items() if k != "CLEARIP_PURE_PYTHON"}
    if pure:
        env["CLEARIP_PURE_PYTHON"] = "1"
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print(name, importlib.import_module(name).__file__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *PACKAGES, *MODULES],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "changed after the core was compiled" not in result.stderr, result.stderr
    files = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    # The packages themselves are never compiled, and stay packages either way.
    assert all(files.pop(name).endswith("__init__.py") for name in PACKAGES), files
    return files


def test_every_module_of_the_core_is_compiled_unless_pure_python_is_asked_for() -> None:
    assert len(MODULES) >= 20 and "clearip.relay.sip.parser" in MODULES
    files = _loaded_from(pure=False)
    assert sorted(files) == MODULES
    if _toolchain():
        # The install had what it needs to compile: a .py here is a build that fell back, or
        # one older than its sources (make setup-dev rebuilds).
        assert all(path.endswith(".so") for path in files.values()), files
    else:
        assert all(path.endswith(".py") for path in files.values()), files


def test_pure_python_switch_loads_every_module_from_its_source() -> None:
    files = _loaded_from(pure=True)
    assert sorted(files) == MODULES
    assert all(path.endswith(".py") for path in files.values()), files


def test_this_process_runs_the_build_its_environment_asks_for() -> None:
    from clearip.relay.sip import parser
    from clearip.relay.sip.transaction import base

    want = "pure" if pure_python_requested() or not _toolchain() else "compiled"
    assert core_build() == want
    suffix = ".py" if want == "pure" else ".so"
    assert parser.__file__.endswith(suffix) and base.__file__.endswith(suffix)


def _wheel_without_compiler(
    tmp_path: Path, cc: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Build the project's wheel from a copy of the sources with ``CC`` set to ``cc``."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    for folder in ("relay", "ctl", "bpf"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    env = {**os.environ, "CC": cc}
    env.pop("CLEARIP_PURE_PYTHON", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wheels = list((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheels[0]).namelist() if wheels else []
    return result, names


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cc", "why"),
    [("/nonexistent/cc", "no C compiler"), ("false", "compiling it failed")],
    ids=["no-compiler", "compiler-fails"],
)
def test_without_a_working_compiler_the_wheel_is_pure_python_with_one_message(
    tmp_path: Path, cc: str, why: str
) -> None:
    result, names = _wheel_without_compiler(tmp_path, cc)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert [name for name in names if name.endswith("clearip/relay/sip/parser.py")], names
    assert not [name for name in names if name.endswith(".so")]
    messages = [line for line in output.splitlines() if "the SIP core stays pure Python" in line]
    assert len(messages) == 1 and why in messages[0], messages
