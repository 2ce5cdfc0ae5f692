"""Pins and collects the Python wheels bundled into the RPM.

The RPM carries a private Python environment, so every wheel it contains is pinned with its
SHA-256 in two files beside this script:

``requirements.txt``
    the daemon's runtime dependencies: the closure of the project's own requirements (extras
    such as ``test`` left out), at the versions installed in the development venv.
``build-requirements.txt``
    the build backend named in ``pyproject.toml`` (setuptools, wheel and what they need), so
    ``rpmbuild`` can turn the sdist into a wheel with no network.

Usage (run with the development venv's Python)::

    python packaging/rpm/vendor.py pin              # rewrite both files (needs PyPI)
    python packaging/rpm/vendor.py collect DIR OUT  # copy the pinned wheels found in DIR to OUT

``collect`` copies exactly the files whose SHA-256 is pinned and fails if one is missing, so the
vendor tarball never holds a stray or tampered wheel.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROJECT = "clearip-inline-proxy"
RUNTIME_FILE = HERE / "requirements.txt"
BUILD_FILE = HERE / "build-requirements.txt"

# The target: RHEL 9's python3.11 (CPython 3.11, x86_64, glibc 2.34). manylinux_2_28 is the
# newest tag it can load; manylinux2014 (glibc 2.17) covers the older builds.
PYTHON_VERSION = "3.11"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")
TARGET_ENV = {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
    "extra": "",
}


def pip_download_args(dest: Path) -> list[str]:
    """``pip download`` options that select wheels for the target, not for this machine."""
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest)]
    args += ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> dict[str, str]:
    """Name -> installed version for every runtime dependency of the project, recursively."""
    from packaging.requirements import Requirement  # only ``pin`` needs it (dev venv)

    found: dict[str, str] = {}
    todo = [PROJECT]
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"vendor.py: {name} is not installed here; run it with the project's venv")
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
                continue
            key = canonical(req.name)
            if key not in found:
                found[key] = distribution(req.name).version
                todo.append(req.name)
    return dict(sorted(found.items()))


def build_backend() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return list(data["build-system"]["requires"])


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def write_pins(target: Path, header: str, wheels: list[Path]) -> None:
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    by_req: dict[tuple[str, str], list[str]] = {}
    for wheel in wheels:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        by_req.setdefault(wheel_name_version(wheel), []).append(digest)
    for (name, version), digests in sorted(by_req.items()):
        hashes = " ".join(f"--hash=sha256:{d}" for d in sorted(digests))
        lines.append(f"{name}=={version} {hashes}")
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"vendor.py: wrote {target.relative_to(ROOT)} ({len(by_req)} wheels)")


def pin() -> int:
    runtime = runtime_closure()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, build_dir = Path(tmp, "run"), Path(tmp, "build")
        specs = [f"{name}=={version}" for name, version in runtime.items()]
        subprocess.run([*pip_download_args(run_dir), "--no-deps", *specs], check=True)
        write_pins(
            RUNTIME_FILE,
            "Runtime wheels bundled into /opt/clearip-proxy by the RPM (packaging/rpm/vendor.py\n"
            "pin). The versions are those of the development venv; the hashes are of the wheels\n"
            "for CPython 3.11 on manylinux x86_64 (RHEL 9).",
            sorted(run_dir.glob("*.whl")),
        )
        subprocess.run([*pip_download_args(build_dir), *build_backend()], check=True)
        write_pins(
            BUILD_FILE,
            "Build backend from pyproject.toml, bundled so rpmbuild builds the project's wheel\n"
            "offline (packaging/rpm/vendor.py pin).",
            sorted(build_dir.glob("*.whl")),
        )
    return 0


def pinned_hashes(requirements: Path) -> dict[str, str]:
    """sha256 -> requirement, from a pin file."""
    hashes: dict[str, str] = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        req, *options = line.split()
        for option in options:
            hashes[option.removeprefix("--hash=sha256:")] = req
    return hashes


def collect(source: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    for requirements in (RUNTIME_FILE, BUILD_FILE):
        wanted = pinned_hashes(requirements)
        have = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in source.glob("*.whl")}
        reqs_found = set()
        for digest, req in wanted.items():
            if digest in have:
                shutil.copy2(have[digest], out / have[digest].name)
                reqs_found.add(req)
        missing += sorted(set(wanted.values()) - reqs_found)
        shutil.copy2(requirements, out / requirements.name)
    if missing:
        print(f"vendor.py: no wheel with a pinned hash for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pin", help="rewrite requirements.txt and build-requirements.txt")
    coll = sub.add_parser("collect", help="copy the pinned wheels from DIR to OUT")
    coll.add_argument("source", type=Path)
    coll.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pin":
        return pin()
    return collect(args.source, args.out)


if __name__ == "__main__":
    sys.exit(main())
