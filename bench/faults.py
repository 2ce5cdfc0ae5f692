"""The acceptance run of issue #11 from the command line: a load with faults injected, where the
switch must count a final response for 100 % of its INVITEs. The rig, and what each fault
kind does, is ``lab/faults.py``.

Run (root: it creates a network namespace and puts netem on its loopback)::

    .venv/bin/python -m bench.faults [--rate 30] [--seconds 40] [--loss 5] [--delay-ms 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lab.faults import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rate", type=int, default=30, help="calls per second (default 30)")
    parser.add_argument("--seconds", type=int, default=40, help="seconds of calls (default 40)")
    parser.add_argument("--loss", type=float, default=5.0, help="netem loss in %% (default 5)")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="netem delay (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.faults needs root (a network namespace and netem)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="clearip-faults-"))
    report = run(args.rate, args.seconds, loss=args.loss, delay_ms=args.delay_ms, workdir=workdir)
    report.print()
    if args.keep:
        print(f"work directory: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report.unanswered else 0


if __name__ == "__main__":
    sys.exit(main())
