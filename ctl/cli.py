"""``clearipctl``: the operator's tool for the running proxy (trust list, emergency numbers,
status, statistics, reload, the kernel filter).

It talks to the daemon's control socket (:mod:`clearip.ctl.client`). Trust-list commands also
work on the trust file when the daemon is not running (the change then applies at the next
start: :mod:`clearip.ctl.trust`). This module is the command line: its arguments, and which
command runs; ``trace`` is :mod:`clearip.ctl.trace`, the kernel programs' commands
:mod:`clearip.ctl.kernel`, the tables :mod:`clearip.ctl.output`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from clearip.ctl.client import (
    DEFAULT_SOCKET,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_NO_DAEMON,
    EXIT_OK,
    Client,
    DaemonDown,
    DaemonError,
    answer,
    fail,
)
from clearip.ctl.kernel import add_pin_dir_options, steering_remove, xdp_detach
from clearip.ctl.output import flatten, table, workers_view
from clearip.ctl.trace import trace
from clearip.ctl.trust import DEFAULT_TRUST_FILE, trust
from clearip.relay.policy.trust import TrustError
from clearip.relay.service.reload import report_lines

EPILOG = """exit codes:
  0  done
  1  the daemon or the system refused (see the message)
  2  invalid input (bad CIDR, unknown role, duplicate or missing entry, a config file the
     daemon refused to reload); nothing changed
  3  the daemon is not running (for commands that need it: emergency, status, stats,
     top-dropped, reload, trace)

trust commands work on --trust-file when the daemon is not running (and say so); the change
then applies at the next start. xdp detach works with or without the daemon; steering
remove only with the daemon stopped.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearipctl",
        description="Manage a running clearip-proxy: trust list, emergency numbers, status.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="daemon control socket")
    parser.add_argument(
        "--trust-file", default=DEFAULT_TRUST_FILE, help="trust file (used when no daemon runs)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    trust_commands = sub.add_parser("trust", help="trusted sources and their roles")
    actions = trust_commands.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="show the trust list")
    listing.add_argument("--json", action="store_true")
    add = actions.add_parser("add", help="trust an address or CIDR")
    add.add_argument("cidr")
    add.add_argument("--role", required=True, choices=["switch", "provider"])
    add.add_argument("--note", default="")
    remove = actions.add_parser("remove", help="stop trusting an address or CIDR")
    remove.add_argument("cidr")
    imp = actions.add_parser("import", help="replace the trust list with a file's")
    imp.add_argument("file")
    actions.add_parser("export", help="print the trust list as a trust file")

    emergency = sub.add_parser("emergency", help="emergency numbers").add_subparsers(
        dest="action", required=True
    )
    elist = emergency.add_parser("list")
    elist.add_argument("--json", action="store_true")
    eadd = emergency.add_parser("add")
    eadd.add_argument("number")
    eremove = emergency.add_parser("remove")
    eremove.add_argument("number")

    for name, text in (
        ("status", "daemon, ClearIP connections, kernel filter, trust-list size"),
        ("stats", "relay and kernel counters"),
        ("top-dropped", "sources the kernel filter dropped most"),
        ("reload", "re-read the config file and the trust list; print what changed"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--json", action="store_true")
    tracing = sub.add_parser(
        "trace", help="stream the SIP the daemon sends and receives (every leg, TLS included)"
    )
    tracing.add_argument("--call-id", help="only this Call-ID")
    tracing.add_argument("--number", help="only messages mentioning this number")
    tracing.add_argument("--pcap", metavar="FILE", help="write a pcap (Wireshark, sngrep)")
    tracing.add_argument(
        "--hep",
        metavar="HOST:PORT",
        help="send each message as HEPv3 over UDP to a collector (Homer, sngrep -L)",
    )
    tracing.add_argument(
        "--hep-capture-id", type=int, default=1, metavar="N", help="HEP capture agent id"
    )
    tracing.add_argument("--hep-password", default="", help="the collector's HEP password")
    tracing.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")

    xdp = sub.add_parser("xdp", help="the kernel filter").add_subparsers(
        dest="action", required=True
    )
    detach = xdp.add_parser(
        "detach", help="remove this XDP filter and its pinned maps (never another program)"
    )
    add_pin_dir_options(detach, "xdp.interfaces and xdp.pin_dir", "pinned maps")
    detach.add_argument(
        "--interface",
        action="append",
        default=[],
        help="interface to detach from (default: xdp.interfaces; with auto, every one); only "
        "this filter's program is removed, another XDP program stays",
    )
    steering = sub.add_parser(
        "steering", help="the kernel program steering calls to worker processes"
    ).add_subparsers(dest="action", required=True)
    unpin = steering.add_parser(
        "remove", help="unpin the steering program and its maps (with the service stopped)"
    )
    add_pin_dir_options(unpin, "proxy.steering_pin_dir", "pinned program and maps")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "trace":
        return trace(args)
    client = Client(args.socket)
    if args.command == "xdp":
        return xdp_detach(args, client)
    if args.command == "steering":
        return steering_remove(args, client)
    if args.command == "trust":
        return trust(args, client)
    try:
        if args.command == "emergency":
            fields = {"number": args.number} if args.action != "list" else {}
            result, code = answer(client.call(f"emergency.{args.action}", **fields))
            if code:
                return code
            if args.action != "list":
                print(result)
            elif args.json:
                print(json.dumps(result))
            else:
                print("\n".join(result) if result else "no emergency numbers")
            return EXIT_OK
        result, code = answer(client.call(args.command))
    except DaemonDown as exc:
        return fail(str(exc), EXIT_NO_DAEMON)
    if code:
        return code
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif args.command == "reload":
        print("\n".join(report_lines(result)))
    elif args.command == "top-dropped":
        print(table([[a, str(c)] for a, c in result], ["SOURCE", "DROPPED"]) if result else "none")
    elif isinstance(result, dict) and isinstance(result.get("per_worker"), dict):
        print(workers_view(args.command, result))
    else:
        print(table(flatten(result), ["WHAT", "VALUE"]))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except TrustError as exc:
        return fail(str(exc), EXIT_INVALID)
    except (DaemonError, OSError, ValueError) as exc:
        return fail(str(exc), EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
