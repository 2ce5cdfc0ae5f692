"""The highest clean rate of each system: step the offered rate up until calls fail or SIPp sees
retransmissions, then bisect between the last clean and the first unclean step.

Run: ``.venv/bin/python -m bench.capacity`` (defaults: from 200 calls/s in steps of 200 up to
3,000, 8 s per step, two bisection steps, relay and Kamailio, UDP upstream).

A step is clean when every planned call completed, none failed, and neither the switch nor the
carrier SIPp retransmitted anything (a retransmission means a response came later than T1 =
500 ms: the proxy is already queueing). Each step starts the proxy and the peers afresh, so one
overloaded step leaves nothing behind for the next. No capture runs (it would take CPU from the
proxy); ``bench.calls`` measures the latency.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench import rig
from bench.calls import COLUMNS, parse_upstreams, run_one
from bench.rig import Column, Ports

STEP_COLUMNS = [c for c in COLUMNS if not c.key.startswith("p")] + [Column("verdict", "verdict")]
SUMMARY_COLUMNS = [
    Column("system", "system"),
    Column("upstream", "upstream"),
    Column("clean_rate", "highest clean calls/s"),
    Column("clean_cps", "achieved calls/s", ".1f"),
    Column("clean_cpu_us_per_call", "CPU us/call there", ".1f"),
    Column("unclean_rate", "first unclean"),
    Column("reason", "why"),
]


def verdict(row: dict[str, Any]) -> str:
    """'clean', or what made the step unclean."""
    planned = max(1, round(row["rate"] * row["seconds"]))
    problems = []
    if row["failed"]:
        problems.append(f"{row['failed']} failed")
    if row["retransmissions"]:
        problems.append(f"{row['retransmissions']} retrans")
    if row["attempted"] < planned:
        problems.append(f"SIPp sent {row['attempted']}/{planned}")
    return ", ".join(problems) or "clean"


def search(
    system: str,
    upstream: str,
    *,
    ports: Ports,
    workdir: Path,
    start: int = 200,
    step: int = 200,
    maximum: int = 3000,
    seconds: float = 8,
    refine: int = 2,
    log: Any = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ramp, then bisect; returns the summary row and every step run."""
    steps: list[dict[str, Any]] = []

    def attempt(rate: int) -> bool:
        row = run_one(system, upstream, rate, seconds, ports=ports, workdir=workdir, capture=False)
        row["verdict"] = verdict(row)
        steps.append(row)
        log(f"... {system} {upstream} {rate} calls/s: {row['verdict']}")
        return row["verdict"] == "clean"

    best: int | None = None
    worst: int | None = None
    rate = start
    while rate <= maximum:
        if not attempt(rate):
            worst = rate
            break
        best = rate
        rate += step
    low, high = best or 0, worst
    for _ in range(refine):
        if high is None:
            break
        mid = round((low + high) / 20) * 10
        if not low < mid < high:
            break
        if attempt(mid):
            low = best = mid
        else:
            high = worst = mid
    clean = next((s for s in steps if s["rate"] == best and s["verdict"] == "clean"), None)
    unclean = next((s for s in steps if s["rate"] == worst), None)
    summary = {
        "system": system,
        "upstream": upstream,
        "clean_rate": best,
        "clean_cps": clean["cps"] if clean else None,
        "clean_cpu_us_per_call": clean["cpu_us_per_call"] if clean else None,
        "unclean_rate": worst,
        "reason": unclean["verdict"] if unclean else f"clean up to --max {maximum}",
    }
    return summary, steps


def scaling_report(summaries: list[dict[str, Any]], upstream: str) -> str:
    """Each relay's highest clean rate against Kamailio's, and per worker against one worker's
    (how far the relay scales across cores on this rig)."""
    relays = [s for s in summaries if s["upstream"] == upstream and "workers" in s]
    kam = next(
        (s for s in summaries if s["upstream"] == upstream and s["system"] == "kamailio"), None
    )
    single = next((s for s in relays if s["workers"] == 1 and s["clean_rate"]), None)
    lines = []
    for relay in relays:
        rate, workers = relay["clean_rate"], relay["workers"]
        if not rate:
            continue
        parts = [f"{relay['system']} ({upstream}): {rate} calls/s"]
        if kam and kam["clean_rate"]:
            parts.append(f"x{rate / kam['clean_rate']:.2f} Kamailio's {kam['clean_rate']}")
        if single and workers > 1:
            per_worker = rate / workers
            parts.append(
                f"{per_worker:.0f} per worker = x{per_worker / single['clean_rate']:.2f} "
                "the single worker's"
            )
        lines.append("ratio " + ", ".join(parts))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.capacity",
        description="Highest clean calls/s (no failure, no retransmission) per system.",
    )
    parser.add_argument("--start", type=int, default=200, help="first rate (default 200)")
    parser.add_argument("--step", type=int, default=200, help="ramp step (default 200)")
    parser.add_argument("--max", type=int, default=3000, help="highest rate tried (3000)")
    parser.add_argument("--seconds", type=float, default=8, help="per step (default 8)")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps (default 2)")
    parser.add_argument("--upstream", type=parse_upstreams, default=["udp"], help="default udp")
    parser.add_argument("--no-kamailio", action="store_true", help="the relay only")
    rig.add_common_args(parser, several_workers=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summaries: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    notes: list[str] = []
    workdir = rig.workdir_for("capacity")
    ports = Ports.shifted(args.port_base)
    # (system, relay workers): the relay once per worker count, then Kamailio.
    systems: list[tuple[str, int]] = [("relay", count) for count in args.workers]
    if not args.no_kamailio:
        if rig.have_kamailio():
            systems.append(("kamailio", 1))
        else:
            notes.append("kamailio is not installed: side-by-side skipped")
    try:
        rig.require_tools("sipp")
        for upstream in args.upstream:
            for system, workers in systems:
                if system == "kamailio" and upstream == "tls":
                    continue
                rig.use_workers(workers)
                summary, ran = search(
                    system,
                    upstream,
                    ports=ports,
                    workdir=workdir,
                    start=args.start,
                    step=args.step,
                    maximum=args.max,
                    seconds=args.seconds,
                    refine=args.refine,
                )
                if system == "relay":
                    summary["workers"] = workers
                    if workers > 1:
                        summary["system"] = f"relay x{workers}"
                summaries.append(summary)
                steps += ran
    except rig.BenchError as exc:
        print(f"bench.capacity: {exc}", file=sys.stderr)
        return 2
    print(f"\nCapacity on loopback, {args.seconds:g} s per step (logs in {workdir})")
    print(rig.format_table(steps, STEP_COLUMNS))
    print()
    print(rig.format_table(summaries, SUMMARY_COLUMNS))
    for upstream in args.upstream:
        print(scaling_report(summaries, upstream))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        rig.write_json(
            args.json,
            {"bench": "capacity", "summary": summaries, "steps": steps, "notes": notes,
             "command": rig.command_line("bench.capacity", argv)},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
