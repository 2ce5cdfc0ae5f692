"""Run a coverage-guided fuzzer (atheris / libFuzzer) over one target for a bounded time.

Usage: python -m fuzz.run TARGET SECONDS [CORPUS_DIR]
Seeds come from bench/samples.py and the RFC 4475 corpus when ../shared is present. A crash
is written to fuzz/crashes/ and the run exits non-zero; add the input to
fuzz/regressions/ so tests/test_fuzz.py replays it forever.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
SHARED_CORPUS = HERE.parent.parent / "shared" / "corpus" / "rfc4475"

with atheris.instrument_imports(include=["clearip"]):
    from fuzz import targets


def seed(directory: Path) -> None:
    from bench.samples import INVITE, OK_200, RINGING

    for index, data in enumerate((INVITE, RINGING, OK_200)):
        (directory / f"sample{index}").write_bytes(data)
    if SHARED_CORPUS.is_dir():
        for path in SHARED_CORPUS.glob("*.dat"):
            (directory / path.name).write_bytes(path.read_bytes())
    for path in (HERE / "regressions").glob("*"):
        (directory / f"regression-{path.name}").write_bytes(path.read_bytes())


def main() -> int:
    name, seconds = sys.argv[1], int(sys.argv[2])
    corpus = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(tempfile.mkdtemp(prefix="corpus-"))
    corpus.mkdir(parents=True, exist_ok=True)
    seed(corpus)
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    target = targets.TARGETS[name]
    args = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={crashes}/{name}-",
        "-print_final_stats=1",
        "-max_len=4096",
        "-rss_limit_mb=2048",
    ]
    atheris.Setup(args, target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
