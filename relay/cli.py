"""``clearip-proxy``: the daemon's command line (run, check-config, emulate, demo)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

DEFAULT_CONFIG = "/etc/clearip-proxy/proxy.toml"

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearip-proxy",
        description="In-line SIP proxy between a carrier's switch and ClearIP.",
        epilog="Exit codes: 0 ok, 1 runtime error, 2 invalid configuration or usage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the proxy daemon")
    run.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config (default: %(default)s)")

    check = sub.add_parser("check-config", help="validate a config file and its trust list")
    check.add_argument(
        "--config", default=DEFAULT_CONFIG, help="TOML config (default: %(default)s)"
    )

    sub.add_parser(
        "emulate",
        help="run the ClearIP emulator (lab stand-in); see 'clearip-proxy emulate --help'",
        add_help=False,
    )
    demo = sub.add_parser("demo", help="run the demo calls through a local proxy and emulator")
    demo.add_argument("--json", action="store_true", help="print a JSON summary")
    demo.add_argument("--keep-running", action="store_true", help="leave everything up")
    demo.add_argument("--xdp", action="store_true", help="also load the kernel filter (root)")
    return parser


def _check_config(path: str) -> int:
    from clearip.relay.config import ConfigError, load_config
    from clearip.relay.trust import TrustError, load_trust_file

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        trust = load_trust_file(config.trust_file)
    except TrustError as exc:
        print(f"error: proxy.trust_file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    listeners = ", ".join(f"{s.transport}:{s.address}:{s.port}" for s in config.listeners)
    print(f"{path}: OK")
    print(f"  listeners: {listeners}")
    print(f"  outbound upstream: {config.outbound.uri}")
    print(f"  inbound upstream:  {config.inbound.uri}")
    print(f"  trust list: {config.trust_file} ({len(trust)} entries)")
    print(f"  emergency numbers: {', '.join(config.emergency_numbers)}")
    return EXIT_OK


def _run(path: str) -> int:
    from clearip.relay.config import ConfigError, load_config
    from clearip.relay.daemon import Daemon, setup_logging
    from clearip.relay.trust import TrustError

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level, config.log_format)
    try:
        daemon = Daemon(config)
    except TrustError as exc:
        print(f"error: proxy.trust_file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _use_uvloop()
    try:
        asyncio.run(daemon.run())
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulate"]:
        from clearip.relay.emulator.cli import main as emulate_main

        return emulate_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "run":
        return _run(args.config)
    if args.command == "demo":
        from clearip.relay.demo import main as demo_main

        return demo_main(json_output=args.json, keep_running=args.keep_running, xdp=args.xdp)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
