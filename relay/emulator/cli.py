"""``clearip-proxy emulate``: run the ClearIP emulator from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from clearip.relay.emulator.rules import DEFAULT_RULES, RulesError, load_rules
from clearip.relay.emulator.server import Emulator
from clearip.relay.labca import make_lab_certificates
from clearip.relay.shaken import PassportError
from clearip.relay.transport.peer import ListenerSpec
from clearip.relay.transport.tls import server_context

log = logging.getLogger("clearip.emulator")


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: use HOST:PORT, e.g. 127.0.0.1:5070")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearip-proxy emulate",
        description="ClearIP emulator: a SIP redirect server deciding INVITEs by rules.",
        epilog="Exit codes: 0 stopped normally, 1 runtime error, 2 invalid rules or arguments.",
    )
    parser.add_argument(
        "--rules", default=str(DEFAULT_RULES), help="rules TOML (default: built-in)"
    )
    parser.add_argument("--udp", type=_hostport, action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--tcp", type=_hostport, action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--tls", type=_hostport, action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--certificate", help="PEM certificate for TLS")
    parser.add_argument("--private-key", help="PEM private key for TLS")
    parser.add_argument(
        "--lab-tls", metavar="DIR", help="make a throw-away CA and certificate in DIR for TLS"
    )
    parser.add_argument("--public-key-out", metavar="FILE", help="write the signing public key")
    parser.add_argument("--stats-file", metavar="FILE", help="write counters as JSON on exit")
    parser.add_argument("--ready-file", metavar="FILE", help="write the bound ports when ready")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


async def run(args: argparse.Namespace) -> int:
    rules = load_rules(args.rules)
    emulator = Emulator(rules)
    if args.public_key_out:
        Path(args.public_key_out).write_bytes(emulator.signer.public_pem())
    tls = None
    if args.tls:
        if args.lab_tls:
            certs = make_lab_certificates(args.lab_tls)
            tls = server_context(str(certs.cert_file), str(certs.key_file))
            log.warning("lab TLS: CA certificate for clients is %s", certs.ca_file)
        elif args.certificate and args.private_key:
            tls = server_context(args.certificate, args.private_key)
        else:
            print(
                "error: --tls needs --lab-tls DIR or --certificate and --private-key",
                file=sys.stderr,
            )
            return 2
    ports: dict[str, list[int]] = {}
    for transport in ("udp", "tcp", "tls"):
        for host, port in getattr(args, transport):
            bound = await emulator.listen(ListenerSpec(transport, host, port), tls)
            ports.setdefault(transport, []).append(bound)
            print(f"ClearIP emulator listening on {transport} {host}:{bound}", flush=True)
    if not ports:
        print("error: give at least one of --udp, --tcp, --tls", file=sys.stderr)
        return 2
    if args.ready_file:
        Path(args.ready_file).write_text(json.dumps(ports))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    stats = emulator.stats()
    await emulator.close()
    print("ClearIP emulator counters:")
    for name, value in sorted(stats.items()):
        print(f"  {name:20s} {value}")
    if args.stats_file:
        Path(args.stats_file).write_text(json.dumps(stats))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(run(args))
    except (RulesError, PassportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
