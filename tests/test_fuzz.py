"""Hostile input: fuzzer findings replayed forever, and a short coverage-guided run in CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = sorted(p for p in (ROOT / "fuzz" / "regressions").glob("*") if p.name != ".keep")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.name)
def test_regression_inputs_stay_fixed(path: Path) -> None:
    """Each file once crashed or hung a target (the prefix names it); now it must not."""
    data = path.read_bytes()
    for name, target in TARGETS.items():
        if path.name.startswith(name) or name == "parser":
            target(data)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_short_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fuzz.run", target, "8", str(tmp_path / "corpus")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "ERROR: libFuzzer" not in output
    runs = re.search(r"stat::number_of_executed_units: (\d+)", output)
    coverage = re.findall(r"cov: (\d+)", output)
    assert runs and int(runs.group(1)) > 1000, output[-2000:]
    print(
        f"{target}: {runs.group(1)} executions, coverage {coverage[-1] if coverage else '?'} edges"
    )
