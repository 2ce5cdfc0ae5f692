"""``clearip-proxy emulate`` (or ``python -m clearip.relay.labkit.emulator``): run the emulator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from clearip.relay.labkit.emulator.config import EmulatorConfig, load_config
from clearip.relay.labkit.emulator.rules import RulesError
from clearip.relay.labkit.emulator.rules_toml import DEFAULT_RULES
from clearip.relay.labkit.emulator.server import run_emulator
from clearip.relay.transport.peer import ListenerSpec

EPILOG = """\
The rules file decides each INVITE (first match wins); it may also hold [[listen]] and [tls]
(see the packaged default, printed by --show-default-rules). Listener flags replace the file's
[[listen]] tables. Counters are printed on SIGINT/SIGTERM.

examples:
  clearip-proxy emulate --udp 127.0.0.1:5070 --tcp 127.0.0.1:5070
  clearip-proxy emulate --tls 127.0.0.1:5061 --lab-tls /tmp/lab --rules lab.toml

exit codes: 0 stopped normally, 1 runtime error (e.g. port in use), 2 invalid rules or arguments.
"""


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use HOST:PORT, e.g. 127.0.0.1:5070 or [::1]:5070 (port 0: any free port)"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearip-proxy emulate",
        description="ClearIP emulator: a SIP redirect server that decides INVITEs by rules.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rules",
        "--config",
        dest="rules",
        default=str(DEFAULT_RULES),
        metavar="FILE",
        help="rules TOML (default: the packaged seed behaviour)",
    )
    for transport in ("udp", "tcp", "tls"):
        parser.add_argument(
            f"--{transport}",
            type=_hostport,
            action="append",
            default=[],
            metavar="HOST:PORT",
            help=f"listen on {transport.upper()} (repeatable)",
        )
    parser.add_argument("--certificate", help="PEM certificate for TLS listeners")
    parser.add_argument("--private-key", help="PEM private key for TLS listeners")
    parser.add_argument(
        "--lab-tls", metavar="DIR", help="make a throw-away CA (DIR/ca.pem) and certificate in DIR"
    )
    parser.add_argument(
        "--lab-name",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or address for the lab certificate (repeatable)",
    )
    parser.add_argument("--public-key-out", metavar="FILE", help="write the signing public key")
    parser.add_argument("--stats-file", metavar="FILE", help="write the counters as JSON on exit")
    parser.add_argument(
        "--ready-file", metavar="FILE", help='write {"udp": [port], ...} once listening'
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the counters on exit")
    parser.add_argument("--show-default-rules", action="store_true", help="print them and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every decision")
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The file's configuration with the command line's overrides."""
    config = load_config(args.rules)
    listeners = tuple(
        ListenerSpec(transport, host, port)
        for transport in ("udp", "tcp", "tls")
        for host, port in getattr(args, transport)
    )
    changes: dict[str, object] = {"print_stats": not args.quiet}
    if listeners:
        changes["listeners"] = listeners
    if args.certificate or args.private_key:
        if not (args.certificate and args.private_key):
            raise RulesError(
                "command line", "--certificate and --private-key go together", "give both"
            )
        changes.update(certificate=args.certificate, private_key=args.private_key, lab_dir=None)
    elif args.lab_tls:
        changes.update(lab_dir=args.lab_tls, certificate=None, private_key=None)
    if args.lab_name:
        changes["lab_names"] = tuple(args.lab_name)
    for name in ("stats_file", "ready_file", "public_key_out"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    return config.with_changes(**changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.show_default_rules:
        sys.stdout.write(DEFAULT_RULES.read_text(encoding="utf-8"))
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        asyncio.run(run_emulator(config))
    except RulesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # a port in use, an unreadable certificate...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
