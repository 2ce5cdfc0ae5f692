"""Emergency calls while the relay is saturated: how long a 911 INVITE takes to get through.

Run: ``.venv/bin/python -m bench.emergency --capacity N`` (N: the relay's highest clean rate
from ``bench.capacity``; without it a short capacity search runs first).

Normal INVITEs (the anchors' full flow) are offered at ``--load`` x N calls/s (default 2x) while
a second SIPp switch dials 911 once a second. The relay sends emergency calls to its
``[emergency] route`` without asking ClearIP (``relay/config.py``, ``relay/data/proxy.toml``):

- ``--route psap`` (default): route = a PSAP stand-in (``bench/scenarios/uas_psap.xml``);
  measured: the 911 INVITE's first arrival at the proxy -> the proxy's INVITE to the PSAP.
- ``--route direct``: route = "" (the packaged default): the relay answers 503 at once so the
  switch uses its direct PSAP trunk; measured: first arrival -> the 503.

Times come from a loopback capture of the 911 traffic only (kernel timestamps), so they include
the wait in the proxy's socket queue behind the flood: what a saturated proxy really costs.
A 911 INVITE lost in a full socket buffer shows as a SIPp retransmission (500 ms later) and a
time above 500 ms. The relay prefers DSCP EF datagrams within a read batch; the EF mark comes
from the XDP filter, which this loopback bench does not load, so the 911s here are unmarked.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

from bench import rig
from bench.capacity import search
from bench.rig import Column, Ports

COLUMNS = [
    Column("route", "route"),
    Column("load_rate", "normal offered/s"),
    Column("normal_cps", "normal done/s", ".1f"),
    Column("normal_failed", "normal failed"),
    Column("sent", "911 sent"),
    Column("through", "911 through"),
    Column("retransmitted", "911 retrans"),
    Column("p50_ms", "p50 ms", ".2f"),
    Column("p99_ms", "p99 ms", ".2f"),
    Column("max_ms", "max ms", ".2f"),
]


def run(
    capacity: int, *, load: float, seconds: int, route: str, ports: Ports, workdir: Any
) -> dict[str, Any]:
    rate = round(capacity * load)
    extra = {"emergency": {"route": f"sip:{rig.HOST}:{ports.psap}" if route == "psap" else ""}}
    rig.check_ports_free(ports)
    uac = "uac_emergency_psap.xml" if route == "psap" else "uac_emergency_direct.xml"
    with contextlib.ExitStack() as stack:
        stack.enter_context(rig.running(rig.start_clearip_standin(workdir, ports, "udp")))
        carrier = rig.sipp("carrier", workdir, rig.SIPP_ANCHORS / "uas_carrier.xml", ports.carrier)
        stack.enter_context(rig.running(carrier))
        if route == "psap":
            psap = rig.sipp("psap", workdir, rig.SCENARIOS / "uas_psap.xml", ports.psap)
            stack.enter_context(rig.running(psap))
            rig.wait_port(ports.psap)
        rig.wait_port(ports.carrier)
        relay = stack.enter_context(
            rig.running(rig.start_relay(workdir, ports, extra_config=extra))
        )
        bpf = f"udp port {ports.emergency_switch} or udp dst port {ports.psap}"
        stack.enter_context(rig.Capture(workdir, "emergency", bpf))
        flood_calls = rate * (seconds + 5)
        flood = rig.sipp(
            "flood-switch", workdir, rig.SIPP_ANCHORS / "uac_switch.xml", ports.switch,
            args=["-r", str(rate), "-m", str(flood_calls), "-l", str(max(20, rate * 4)),
                  "-recv_timeout", "8000"],
            remote=f"{rig.HOST}:{ports.proxy}",
        )  # fmt: skip
        stack.enter_context(rig.running(flood))
        time.sleep(3)  # the flood reaches steady state first
        caller = rig.sipp(
            "emergency-switch", workdir, rig.SCENARIOS / uac, ports.emergency_switch,
            args=["-s", "911", "-r", "1", "-m", str(seconds), "-recv_timeout", "10000"],
            remote=f"{rig.HOST}:{ports.proxy}",
        )  # fmt: skip
        with rig.running(caller):
            caller.popen.wait(seconds + 30)
        flood_stats = rig.sipp_stats(workdir / "flood-switch.csv")
        relay.check_alive()
        cpu_note = f"relay CPU {relay.tree.cpu_seconds():.1f} s"
    packets = rig.sip_packets(rig.read_pcap(workdir / "emergency.pcap"))
    times = rig.emergency_latencies(packets, ports.proxy, ports.emergency_switch, ports.psap)
    caller_stats = rig.sipp_stats(workdir / "emergency-switch.csv")
    ms = [t * 1000 for t in times.times]
    return {
        "route": route,
        "capacity": capacity,
        "load_rate": rate,
        "normal_cps": flood_stats.sustained_cps,
        "normal_failed": flood_stats.failed,
        "sent": times.sent,
        "through": len(ms),
        "retransmitted": times.retransmitted,
        "unanswered": times.unanswered,
        "emergency_failed": caller_stats.created - caller_stats.successful,
        "p50_ms": rig.percentile(ms, 50),
        "p99_ms": rig.percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "times_ms": ms,
        "note": cpu_note,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.emergency",
        description="911 INVITEs at 1/s while normal INVITEs saturate the relay.",
    )
    parser.add_argument(
        "--capacity", type=int, help="the relay's clean rate (default: a short search first)"
    )
    parser.add_argument("--load", type=float, default=2.0, help="x capacity (default 2)")
    parser.add_argument("--seconds", type=int, default=30, help="911 calls, one a second (30)")
    parser.add_argument("--route", choices=("psap", "direct"), default="psap")
    rig.add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rig.use_workers(args.workers)
    workdir = rig.workdir_for("emergency")
    ports = Ports.shifted(args.port_base)
    try:
        rig.require_tools("sipp", "dumpcap")
        capacity = args.capacity
        if capacity is None:
            print("... no --capacity: a short capacity search of the relay first")
            summary, _ = search("relay", "udp", ports=ports, workdir=workdir, seconds=5, refine=1)
            capacity = summary["clean_rate"] or 100
        row = run(
            capacity,
            load=args.load,
            seconds=args.seconds,
            route=args.route,
            ports=ports,
            workdir=workdir,
        )
    except rig.BenchError as exc:
        print(f"bench.emergency: {exc}", file=sys.stderr)
        return 2
    print(
        f"\nEmergency INVITEs while saturated: normal load {args.load:g} x {capacity} calls/s, "
        f"911 at 1/s for {args.seconds} s, route {args.route} (logs in {workdir})"
    )
    print(rig.format_table([row], COLUMNS))
    print(
        f"911 time {'to the PSAP route' if args.route == 'psap' else 'to the 503'} "
        f"p99 {row['p99_ms']:.2f} ms (target with --workers > 1: <= 10 ms); "
        f"{row['unanswered']} never got through, "
        f"{row['emergency_failed']} 911 calls failed at the caller; {row['note']}"
    )
    print("note: no DSCP EF mark on loopback (the XDP filter that sets it is not loaded)")
    if args.json:
        rig.write_json(
            args.json,
            {"bench": "emergency", "result": row,
             "command": rig.command_line("bench.emergency", argv)},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
