"""Memory per pending call, and whether it comes back: the relay holding N calls ringing.

Run: ``.venv/bin/python -m bench.memory`` (defaults: 3,000 pending calls set up at 300/s,
twice; then 20,000 complete calls at 400/s for the leak check; about 4 minutes).

What it does, and why it is an honest figure:

1. Warm-up: a few hundred ringing calls, then wait until the relay reports no active call and
   no transaction (over its control socket; RFC 3261 Timer D keeps a completed client INVITE
   transaction 32 s). Baseline RSS is taken there, so imports, caches and first-use
   allocations are not charged to the calls.
2. Two rounds of N pending calls: the carrier (``bench/scenarios/uas_ring.xml``) answers 100
   and 180 and then rings for as long as it takes to set up all N calls plus a margin; once the
   relay reports N active calls, RSS is read. (RSS at N pending - baseline) / N is the cost of
   one pending call (its server transaction, the completed ClearIP-leg transaction, the
   ringing carrier transaction and the call state). The carrier then gives up with 486; after
   the relay drains, RSS is read again. The second round shows whether freed memory is reused
   (same peak) or the heap keeps growing; CPython's allocator rarely returns freed arenas to
   the OS, so "after" above baseline is expected and reported, not hidden.
3. Leak check: many complete calls (the anchors' full flow with ACK and BYE) in batches, the
   relay drained after each and RSS read there. The first batch grows the heap to what the
   rate needs (every call leaves transactions for 32 s); the growth between the last two
   drained batches, per 100,000 calls, is the leak figure. ``--leak-calls 100000`` runs the
   issue's full check.

The relay only: Kamailio preallocates its shared memory (``-m 1024``), so its RSS does not
track calls, and the anchor's ``fr_inv_timer`` (5 s) ends ringing calls by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from bench import rig
from bench.rig import Column, Ports, Proc

ROUND_COLUMNS = [
    Column("phase", "phase"),
    Column("calls", "calls"),
    Column("pending", "pending seen"),
    Column("rss_before_mb", "RSS before MB", ".1f"),
    Column("rss_peak_mb", "RSS pending MB", ".1f"),
    Column("rss_after_mb", "RSS after MB", ".1f"),
    Column("kb_per_call", "KB/pending call", ".2f"),
    Column("drained", "drained"),
    Column("failed", "failed"),
]


def drain(control: Path, timeout: float) -> bool:
    """Wait until the relay holds no call and no transaction (True) or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            status = rig.relay_status(control)
            if status.get("active_calls") == 0 and status.get("active_transactions") == 0:
                return True
        time.sleep(0.5)
    return False


def active_calls(control: Path) -> int:
    with contextlib.suppress(Exception):
        return int(rig.relay_status(control).get("active_calls", 0))
    return 0


def ring_round(
    phase: str, relay: Proc, calls: int, rate: float, *, ports: Ports, workdir: Path, drain_s: float
) -> dict[str, Any]:
    """N calls ringing at once: RSS before, while all are pending, and after they ended."""
    control = workdir / "control.sock"
    hold_ms = int((calls / rate + 3.0) * 1000)
    tree = relay.tree
    before = tree.rss_kb()
    carrier = rig.sipp(
        f"{phase}-carrier", workdir, rig.SCENARIOS / "uas_ring.xml", ports.carrier,
        args=["-d", str(hold_ms)],
    )  # fmt: skip
    with rig.running(carrier):
        rig.wait_port(ports.carrier)
        switch = rig.sipp(
            f"{phase}-switch", workdir, rig.SCENARIOS / "uac_ring.xml", ports.switch,
            args=["-r", f"{rate:g}", "-m", str(calls), "-l", str(calls + 10),
                  "-recv_timeout", str(hold_ms + 10000)],
            remote=f"{rig.HOST}:{ports.proxy}",
        )  # fmt: skip
        with rig.running(switch):
            deadline = time.monotonic() + calls / rate + 2.5
            pending = 0
            while time.monotonic() < deadline:
                pending = active_calls(control)
                if pending >= calls:
                    break
                time.sleep(0.2)
            peak = tree.rss_kb()
            pss = tree.pss_kb()
            pending = max(pending, active_calls(control))
            switch.popen.wait(hold_ms / 1000 + calls / rate + 30)
    stats = rig.sipp_stats(workdir / f"{phase}-switch.csv")
    drained = drain(control, drain_s)
    after = tree.rss_kb()
    return {
        "phase": phase,
        "calls": calls,
        "pending": pending,
        "rss_before_mb": before / 1024,
        "rss_peak_mb": peak / 1024,
        "pss_peak_mb": pss / 1024,
        "rss_after_mb": after / 1024,
        "kb_per_call": (peak - before) / pending if pending else float("nan"),
        "drained": "yes" if drained else "NO",
        "failed": stats.created - stats.successful,
    }


def leak_run(
    relay: Proc,
    calls: int,
    rate: float,
    batches: int,
    *,
    ports: Ports,
    workdir: Path,
    drain_s: float,
) -> dict[str, Any]:
    """Many complete calls in batches, the relay drained after each; RSS after each drain.

    The first batch grows the heap to what ``rate`` x 32 s of lingering transactions (Timer D)
    needs; freed, that memory is reused, so growth is counted between the last two drained
    batches, where the heap has settled.
    """
    tree = relay.tree
    size = max(1, calls // batches)
    after: list[int] = []
    completed = failed = 0
    drained = True
    start_rss = tree.rss_kb()
    carrier = rig.sipp("leak-carrier", workdir, rig.SIPP_ANCHORS / "uas_carrier.xml", ports.carrier)
    with rig.running(carrier):
        rig.wait_port(ports.carrier)
        for index in range(batches):
            stats, _ = rig.run_switch(f"leak-{index}-switch", workdir, ports, rate, size)
            completed += stats.successful
            failed += stats.created - stats.successful
            drained = drain(workdir / "control.sock", drain_s) and drained
            after.append(tree.rss_kb())
    growth = (after[-1] - after[-2]) / size * 100000
    return {
        "calls": size * batches,
        "batches": batches,
        "completed": completed,
        "failed": failed,
        "rss_start_mb": start_rss / 1024,
        "rss_after_batches_mb": [kb / 1024 for kb in after],
        "growth_kb_per_100k": growth,
        "drained": drained,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory",
        description="The relay's RSS per pending (ringing) call, return to baseline, leak check.",
    )
    parser.add_argument("--calls", type=int, default=3000, help="pending calls (3000)")
    parser.add_argument("--rate", type=float, default=300, help="set-up rate (300/s)")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up calls (300)")
    parser.add_argument("--leak-calls", type=int, default=20000, help="complete calls (20000)")
    parser.add_argument("--leak-rate", type=float, default=400, help="their rate (400/s)")
    parser.add_argument("--leak-batches", type=int, default=3, help="drained batches (3)")
    parser.add_argument(
        "--leak-tolerance-mb", type=float, default=2.0, help="growth per 100k calls (2 MB)"
    )
    parser.add_argument(
        "--drain", type=float, default=45, help="longest wait for the relay to drain (45 s)"
    )
    rig.add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rig.use_workers(args.workers)
    workdir = rig.workdir_for("memory")
    ports = Ports.shifted(args.port_base)
    try:
        rig.require_tools("sipp")
        rig.check_ports_free(ports)
        with contextlib.ExitStack() as stack:
            stack.enter_context(rig.running(rig.start_clearip_standin(workdir, ports, "udp")))
            relay = stack.enter_context(rig.running(rig.start_relay(workdir, ports)))
            rounds = []
            common = {"ports": ports, "workdir": workdir, "drain_s": args.drain}
            if args.warmup:
                print(f"... warm-up: {args.warmup} ringing calls, then drain")
                warm = ring_round("warm-up", relay, args.warmup, args.rate, **common)
            baseline = relay.tree.rss_kb()
            for phase in ("round 1", "round 2"):
                print(f"... {phase}: {args.calls} calls ringing at once")
                rounds.append(ring_round(phase, relay, args.calls, args.rate, **common))
            leak = None
            if args.leak_calls:
                print(f"... leak check: {args.leak_calls} complete calls at {args.leak_rate:g}/s")
                leak = leak_run(
                    relay, args.leak_calls, args.leak_rate, max(2, args.leak_batches), **common
                )
            relay.check_alive()
    except rig.BenchError as exc:
        print(f"bench.memory: {exc}", file=sys.stderr)
        return 2
    if args.warmup:
        rounds.insert(0, warm)
    print(f"\nRelay memory, pending calls ringing (logs in {workdir})")
    print(rig.format_table(rounds, ROUND_COLUMNS))
    r1, r2 = rounds[-2], rounds[-1]
    per_call = r1["kb_per_call"]
    print(f"\nbaseline RSS (warmed up, drained): {baseline / 1024:.1f} MB")
    print(f"RSS per pending call: {per_call:.2f} KB (target <= 20 KB)")
    back = r2["rss_after_mb"] - baseline / 1024
    print(
        f"after the calls ended: {back:+.1f} MB vs baseline; round 2 peak "
        f"{r2['rss_peak_mb'] - r1['rss_peak_mb']:+.1f} MB vs round 1 "
        "(freed memory reused when close to 0)"
    )
    verdict = None
    if leak is not None:
        verdict = leak["growth_kb_per_100k"] / 1024 <= args.leak_tolerance_mb and leak["drained"]
        steps = " -> ".join(f"{mb:.1f}" for mb in leak["rss_after_batches_mb"])
        print(
            f"leak check: {leak['completed']}/{leak['calls']} complete calls in "
            f"{leak['batches']} batches, {leak['failed']} failed; RSS {leak['rss_start_mb']:.1f}"
            f" MB before, after each drained batch {steps} MB "
            f"(drained: {'yes' if leak['drained'] else 'NO'})"
        )
        print(
            f"growth over the last batch: {leak['growth_kb_per_100k'] / 1024:.2f} MB per "
            f"100,000 calls: {'no leak' if verdict else 'LEAK?'} "
            f"(tolerance {args.leak_tolerance_mb:g} MB)"
        )
    if args.json:
        rig.write_json(
            args.json,
            {"bench": "memory", "baseline_mb": baseline / 1024, "rounds": rounds,
             "kb_per_pending_call": per_call, "after_vs_baseline_mb": back, "leak": leak,
             "no_leak": verdict, "command": rig.command_line("bench.memory", argv)},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
