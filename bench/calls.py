"""Calls per second, CPU per call, RSS and added latency: the relay and Kamailio side by side.

Run: ``.venv/bin/python -m bench.calls [RATE] [SECONDS]`` (default 200 calls/s for 10 s);
``--upstream udp,tcp,tls`` picks the rows, ``--no-kamailio`` skips the side-by-side,
``--json OUT`` writes the rows for ``bench.report``.

Both proxies do the same in-line job on loopback, one after the other in the same run, with the
same SIPp peers (the scenarios and the Kamailio config are the shared anchors in
``../shared/anchors``; nothing is copied into the product): switch UAC (127.0.0.1:5090) ->
proxy (127.0.0.1:5060) -> ClearIP stand-in answering 302 with Identity and two Contacts
(127.0.0.1:5070, UDP or TCP) -> carrier UAS (127.0.0.1:5080) -> ACK, BYE through the
Record-Route. The TLS row is the relay alone against the project's ClearIP emulator over TLS
(SIPp has no TLS here, the Kamailio anchor no TLS upstream). Added latency comes from a
loopback capture of INVITEs only: switch INVITE in -> INVITE out to the carrier, by Call-ID.
CPU is user+sys of the proxy's whole process tree over the run; RSS is summed over it.

CPU per call moves by up to a quarter from one 10 s run to the next on a small machine, for
both proxies. ``--rounds N`` runs every row N times, the systems taking turns within each
round, and prints each round's ratios and their median: the figure to compare with a target.
The relay's TLS row is compared with Kamailio's UDP row of the same round (the anchor has no
TLS upstream): the stricter comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import rig
from bench.rig import Column, Ports

COLUMNS = [
    Column("system", "system"),
    Column("upstream", "upstream"),
    Column("rate", "offered/s"),
    Column("attempted", "attempted"),
    Column("completed", "completed"),
    Column("failed", "failed"),
    Column("retransmissions", "retrans"),
    Column("cps", "calls/s", ".1f"),
    Column("cpu_us_per_call", "CPU us/call", ".1f"),
    Column("peak_rss_mb", "peak RSS MB", ".1f"),
    Column("peak_pss_mb", "peak PSS MB", ".1f"),
    Column("p50_ms", "p50 ms", ".2f"),
    Column("p99_ms", "p99 ms", ".2f"),
]
RATIO_COLUMNS = [
    Column("round", "round"),
    Column("upstream", "upstream"),
    Column("rate", "offered/s"),
    Column("cps", "calls/s", ".2f"),
    Column("cpu_us_per_call", "CPU/call", ".2f"),
    Column("peak_rss_mb", "peak RSS", ".2f"),
    Column("p99_ms", "p99 added", ".2f"),
]


def run_one(
    system: str,
    upstream: str,
    rate: int,
    seconds: float,
    *,
    ports: Ports,
    workdir: Path,
    capture: bool = True,
    keep: bool = False,
) -> dict[str, Any]:
    """One system, one upstream transport, one rate: start everything, drive, measure, stop."""
    name = f"{system}-{upstream}-{rate}"
    planned = max(1, round(rate * seconds))
    rig.check_ports_free(ports)
    pcap: Path | None = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            rig.running(rig.start_clearip_standin(workdir, ports, upstream, name=f"{name}-clearip"))
        )
        carrier = f"{name}-carrier"
        stack.enter_context(
            rig.running(
                rig.sipp(carrier, workdir, rig.SIPP_ANCHORS / "uas_carrier.xml", ports.carrier)
            )
        )
        rig.wait_port(ports.carrier)
        if system == "relay":
            proxy = rig.start_relay(
                workdir, ports, upstream=upstream, ca_file=rig.lab_ca(workdir), name=name
            )
        else:
            proxy = rig.start_kamailio(workdir, ports, upstream)
        stack.enter_context(rig.running(proxy))
        if capture:
            cap = rig.Capture(workdir, name, rig.invite_filter(ports.proxy, ports.carrier))
            stack.enter_context(cap)
            pcap = cap.path
        tree = proxy.tree
        cpu0 = tree.cpu_seconds()
        with rig.MemorySampler(tree) as memory:
            stats, wall = rig.run_switch(f"{name}-switch", workdir, ports, rate, planned)
        cpu = tree.cpu_seconds() - cpu0
        peak_rss = max(tree.peak_rss_kb(), memory.peak_rss_kb)
        proxy.check_alive()
    carrier_stats = rig.sipp_stats(workdir / f"{carrier}.csv")
    latencies: list[float] = []
    if pcap is not None:
        latencies = rig.added_latencies(
            rig.sip_packets(rig.read_pcap(pcap)), ports.proxy, ports.carrier
        )
        if not keep:
            pcap.unlink(missing_ok=True)
    completed = stats.successful
    notes = []
    if stats.created < planned:
        notes.append(f"SIPp created {stats.created} of {planned} calls")
    workers = rig.RELAY_WORKERS
    label = f"relay x{workers}" if system == "relay" and workers > 1 else system
    return {
        "system": label,
        "upstream": upstream,
        "rate": rate,
        "seconds": seconds,
        "attempted": stats.created,
        "completed": completed,
        "failed": stats.created - completed,
        "retransmissions": stats.retransmissions + carrier_stats.retransmissions,
        "cps": stats.sustained_cps,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_us_per_call": cpu * 1e6 / completed if completed else math.nan,
        "peak_rss_mb": peak_rss / 1024,
        "peak_pss_mb": memory.peak_pss_kb / 1024,
        "p50_ms": rig.percentile(latencies, 50) * 1000,
        "p99_ms": rig.percentile(latencies, 99) * 1000,
        "latency_samples": len(latencies),
        "notes": notes,
    }


RATIO_KEYS = ("cps", "cpu_us_per_call", "peak_rss_mb", "p99_ms")


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """relay/Kamailio for each (round, upstream, rate) both systems ran; the relay's TLS row
    against Kamailio's UDP row of its round (``upstream``: ``tls/udp``)."""
    out = []
    for relay_row in rows:
        if not relay_row["system"].startswith("relay"):
            continue
        upstream = relay_row["upstream"]
        against = "udp" if upstream == "tls" else upstream
        for kam in rows:
            if (
                kam["system"] == "kamailio"
                and kam["upstream"] == against
                and kam["rate"] == relay_row["rate"]
                and kam.get("round", 1) == relay_row.get("round", 1)
            ):
                label = upstream if against == upstream else f"{upstream}/{against}"
                out.append(
                    {"round": relay_row.get("round", 1), "upstream": label, "rate": kam["rate"]}
                    | {k: rig.ratio(relay_row[k], kam[k]) for k in RATIO_KEYS}
                )
    return out


def median_ratios(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The median over the rounds of each ratio, per (upstream, rate)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in table:
        groups.setdefault((row["upstream"], row["rate"]), []).append(row)
    out = []
    for (upstream, rate), group in groups.items():
        medians = {}
        for key in RATIO_KEYS:
            values = [r[key] for r in group if not math.isnan(r[key])]
            medians[key] = statistics.median(values) if values else math.nan
        label = f"median of {len(group)}"
        out.append({"round": label, "upstream": upstream, "rate": rate} | medians)
    return out


def run(
    rate: int,
    seconds: float,
    upstreams: list[str],
    ports: Ports,
    workdir: Path,
    *,
    kamailio: bool = True,
    capture: bool = True,
    keep: bool = False,
    rounds: int = 1,
    log: Any = print,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every requested row at one rate, ``rounds`` times: relay then Kamailio per transport
    (TLS: relay only); each row carries its round."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if kamailio and not rig.have_kamailio():
        notes.append("kamailio is not installed: side-by-side skipped (apt-get install kamailio)")
        kamailio = False
    for number in range(1, rounds + 1):
        for upstream in upstreams:
            systems = ["relay"] + (["kamailio"] if kamailio and upstream != "tls" else [])
            for system in systems:
                log(
                    f"... round {number}/{rounds}: {system}, {upstream} upstream, "
                    f"{rate} calls/s for {seconds:g} s"
                )
                row = run_one(
                    system,
                    upstream,
                    rate,
                    seconds,
                    ports=ports,
                    workdir=workdir,
                    capture=capture,
                    keep=keep,
                )
                rows.append({"round": number} | row)
                time.sleep(0.5)  # let sockets of the previous run close
    if kamailio and "tcp" in upstreams:
        notes.append(
            "kamailio tcp: the anchor relays upstream over UDP; this row runs a copy in the "
            "work directory with only ';transport=tcp' added to its UPSTREAM"
        )
    if "tls" in upstreams:
        notes.append(
            f"tls: the ClearIP stand-in is {rig.tls_standin_name()}; no Kamailio TLS row (the "
            "anchor has no TLS upstream): the relay's TLS row is compared with Kamailio's UDP"
        )
    return rows, notes


def print_results(
    rows: list[dict[str, Any]], notes: list[str], heading: str, out: Any = sys.stdout
) -> None:
    print(heading, file=out)
    several = any(row.get("round", 1) > 1 for row in rows)
    print(
        rig.format_table(rows, COLUMNS + ([Column("round", "round")] if several else [])), file=out
    )
    table = ratios(rows)
    if table:
        print("\nratio relay/kamailio (same run, same peers):", file=out)
        print(rig.format_table(table, RATIO_COLUMNS), file=out)
        if len({r["round"] for r in table}) > 1:
            print("\nmedian over the rounds:", file=out)
            print(rig.format_table(median_ratios(table), RATIO_COLUMNS), file=out)
    for row in rows:
        for note in row.get("notes", []):
            print(f"note: {row['system']} {row['upstream']}: {note}", file=out)
    for note in notes:
        print(f"note: {note}", file=out)


def parse_upstreams(text: str) -> list[str]:
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in rig.UPSTREAMS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma list of udp, tcp, tls")
    return items


def rounds_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number >= 1")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.calls",
        description="The full outbound flow on loopback with SIPp: the relay and Kamailio.",
    )
    parser.add_argument("rate", nargs="?", type=int, default=200, help="calls/s (default 200)")
    parser.add_argument("seconds", nargs="?", type=float, default=10, help="default 10")
    parser.add_argument(
        "--upstream",
        type=parse_upstreams,
        default=["udp", "tcp", "tls"],
        help="ClearIP leg transports, comma list (default udp,tcp,tls; tls: relay only)",
    )
    parser.add_argument("--no-kamailio", action="store_true", help="relay rows only")
    parser.add_argument("--no-capture", action="store_true", help="no latency capture")
    parser.add_argument("--keep", action="store_true", help="keep the pcaps in the work dir")
    parser.add_argument(
        "--rounds",
        type=rounds_count,
        default=1,
        metavar="N",
        help="run every row N times, the systems taking turns; prints the median ratios",
    )
    rig.add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rig.use_workers(args.workers)
    try:
        rig.require_tools("sipp", *([] if args.no_capture else ["dumpcap"]))
        if not rig.SIPP_ANCHORS.is_dir():
            raise rig.BenchError(f"the shared anchors are missing at {rig.ANCHORS}")
        workdir = rig.workdir_for("calls")
        ports = Ports.shifted(args.port_base)
        rows, notes = run(
            args.rate,
            args.seconds,
            args.upstream,
            ports,
            workdir,
            kamailio=not args.no_kamailio,
            capture=not args.no_capture,
            keep=args.keep,
            rounds=args.rounds,
        )
    except rig.BenchError as exc:
        print(f"bench.calls: {exc}", file=sys.stderr)
        return 2
    print_results(
        rows,
        notes,
        f"\nOutbound in-line flow on loopback, {args.rate} calls/s for {args.seconds:g} s, "
        f"{os.cpu_count()} cores shared with the SIPp peers (logs in {workdir})",
    )
    if args.json:
        table = ratios(rows)
        rig.write_json(
            args.json,
            {
                "bench": "calls",
                "rate": args.rate,
                "seconds": args.seconds,
                "rows": rows,
                "ratios": table,
                "median_ratios": median_ratios(table),
                "notes": notes,
                "command": "python -m bench.calls "
                + " ".join(sys.argv[1:] if argv is None else argv),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
