"""Test-suite conventions, for the tests in tests/ and the benchmarks' own tests in bench/.

Tests that need root, network namespaces, XDP or SIPp carry a marker. Under ``CI=true`` a missing
prerequisite fails the test: CI must never pass by skipping. Elsewhere such tests skip with a
reason that says how to enable them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def _root() -> str | None:
    return None if os.geteuid() == 0 else "needs root: run as root (sudo make test)"


def _sipp() -> str | None:
    return None if shutil.which("sipp") else "needs SIPp: apt-get install sip-tester"


def _bcc() -> str | None:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs the OS's bcc module: run scripts/bootstrap.sh --dev"
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
        return "needs kernel headers: run scripts/bootstrap.sh --dev"
    return None


PREREQUISITES: dict[str, list[Callable[[], str | None]]] = {
    "root": [_root],
    "netns": [_root],
    "xdp": [_root, _bcc],
    "sipp": [_sipp],
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, checks in PREREQUISITES.items():
        if item.get_closest_marker(marker) is None:
            continue
        for check in checks:
            reason = check()
            if reason is None:
                continue
            if IN_CI:
                pytest.fail(f"CI=true but prerequisite missing for @{marker}: {reason}")
            pytest.skip(reason)
