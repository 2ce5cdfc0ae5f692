"""``clearip-proxy``: the daemon's command line (run, check-config, emulate, demo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_CONFIG = "/etc/clearip-proxy/proxy.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearip-proxy",
        description="In-line SIP proxy between a carrier's switch and ClearIP.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the proxy daemon")
    run.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config (default: %(default)s)")

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument(
        "--config", default=DEFAULT_CONFIG, help="TOML config (default: %(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        print(f"{args.config}: not checked yet")
        return 0
    print("not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
