"""``clearipctl``: the operator's tool for the running proxy (trust list, emergency numbers,
status, statistics, reload, the kernel filter).

It talks to the daemon's control socket. Trust-list commands also work on the trust file when
the daemon is not running (the change then applies at the next start).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clearip.relay.policy.trust import (
    TrustEntry,
    TrustError,
    load_trust_file,
    parse_cidr,
    render_trust_file,
    save_trust_file,
    trust_list_from_data,
    trust_list_from_text,
)
from clearip.relay.service.reload import report_lines

DEFAULT_SOCKET = "/run/clearip-proxy/control.sock"
DEFAULT_TRUST_FILE = "/etc/clearip-proxy/trust.toml"
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NO_DAEMON = 0, 1, 2, 3
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


class DaemonDown(Exception):
    pass


class DaemonError(Exception):
    """The daemon could not be asked (permissions, no answer, garbled answer)."""


class Client:
    def __init__(self, path: str) -> None:
        self.path = path

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(self.path)
                sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonDown(f"clearip-proxy is not running (no socket at {self.path})") from None
        except PermissionError:
            raise DaemonError(f"permission denied on {self.path}: run clearipctl as root") from None
        except TimeoutError:
            raise DaemonError(f"clearip-proxy did not answer within 10 s on {self.path}") from None
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise DaemonError(f"clearip-proxy sent no usable answer on {self.path}")
        return reply


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

    trust = sub.add_parser("trust", help="trusted sources and their roles").add_subparsers(
        dest="action", required=True
    )
    listing = trust.add_parser("list", help="show the trust list")
    listing.add_argument("--json", action="store_true")
    add = trust.add_parser("add", help="trust an address or CIDR")
    add.add_argument("cidr")
    add.add_argument("--role", required=True, choices=["switch", "provider"])
    add.add_argument("--note", default="")
    remove = trust.add_parser("remove", help="stop trusting an address or CIDR")
    remove.add_argument("cidr")
    imp = trust.add_parser("import", help="replace the trust list with a file's")
    imp.add_argument("file")
    trust.add_parser("export", help="print the trust list as a trust file")

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
    trace = sub.add_parser(
        "trace", help="stream the SIP the daemon sends and receives (every leg, TLS included)"
    )
    trace.add_argument("--call-id", help="only this Call-ID")
    trace.add_argument("--number", help="only messages mentioning this number")
    trace.add_argument("--pcap", metavar="FILE", help="write a pcap (Wireshark, sngrep)")
    trace.add_argument(
        "--hep",
        metavar="HOST:PORT",
        help="send each message as HEPv3 over UDP to a collector (Homer, sngrep -L)",
    )
    trace.add_argument(
        "--hep-capture-id", type=int, default=1, metavar="N", help="HEP capture agent id"
    )
    trace.add_argument("--hep-password", default="", help="the collector's HEP password")
    trace.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    xdp = sub.add_parser("xdp", help="the kernel filter").add_subparsers(
        dest="action", required=True
    )
    detach = xdp.add_parser(
        "detach", help="remove this XDP filter and its pinned maps (never another program)"
    )
    detach.add_argument(
        "--config",
        default="/etc/clearip-proxy/proxy.toml",
        help="read xdp.interfaces and xdp.pin_dir from this config",
    )
    detach.add_argument("--pin-dir", help="pinned maps (default: from the config)")
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
    unpin.add_argument(
        "--config",
        default="/etc/clearip-proxy/proxy.toml",
        help="read proxy.steering_pin_dir from this config",
    )
    unpin.add_argument("--pin-dir", help="pinned program and maps (default: from the config)")
    return parser


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Aligned columns; when the terminal is too narrow the widest column is shortened
    (ending in '…') until the table fits."""
    width = shutil.get_terminal_size((100, 20)).columns
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    # The last column (notes, values) gives way first, then the widest.
    while sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 8:
        column = len(widths) - 1 if widths[-1] > 8 else widths.index(max(widths))
        widths[column] -= 1
    lines = []
    for row in cells:
        fitted = [c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(row, widths, strict=True)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(fitted, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _error(message: str, code: int) -> int:
    print(f"clearipctl: {message}", file=sys.stderr)
    return code


def _reply(reply: dict[str, Any]) -> tuple[Any, int]:
    if reply.get("ok"):
        return reply.get("result"), EXIT_OK
    code = EXIT_INVALID if reply.get("kind") == "invalid" else EXIT_FAILED
    return None, _error(str(reply.get("error")), code)


def _read_import(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustError(f"cannot read {path}: {exc}") from None


def _trust_offline(args: argparse.Namespace) -> int:
    path = Path(args.trust_file)
    note = f"daemon not running: changed {path} only; it applies at the next start"
    if args.action in ("add", "import") and not path.exists():
        trust = trust_list_from_data({}, str(path))  # the first entry creates the file
    else:
        trust = load_trust_file(path)
    if args.action == "list":
        return _print_trust([entry.as_dict() for entry in trust], args)
    if args.action == "export":
        print(render_trust_file(trust), end="")
        return EXIT_OK
    if args.action == "add":
        trust.add(TrustEntry.parse(args.cidr, args.role, args.note))
    elif args.action == "remove":
        trust.remove(parse_cidr(args.cidr))
    elif args.action == "import":
        trust = trust_list_from_text(_read_import(args.file), args.file)
    save_trust_file(path, trust)
    print(f"{args.action}: done ({note})")
    return EXIT_OK


def _print_trust(entries: list[dict[str, str]], args: argparse.Namespace) -> int:
    if getattr(args, "json", False):
        print(json.dumps(entries, indent=2))
    elif entries:
        print(table([[e["cidr"], e["role"], e["note"]] for e in entries], ["CIDR", "ROLE", "NOTE"]))
    else:
        print("the trust list is empty: no source may send SIP")
    return EXIT_OK


def trace(args: argparse.Namespace) -> int:
    from clearip.relay.service.trace import PCAP_HEADER, pcap_record, render_text

    hep = None
    if args.hep:
        try:
            hep = _HepSender(args.hep, args.hep_capture_id, args.hep_password)
        except ValueError as exc:
            return _error(f"--hep {args.hep}: {exc}", EXIT_INVALID)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.socket)
    except (FileNotFoundError, ConnectionRefusedError):
        return _error(f"clearip-proxy is not running (no socket at {args.socket})", EXIT_NO_DAEMON)
    request = {"cmd": "trace", "call_id": args.call_id, "number": args.number}
    sock.sendall(json.dumps(request).encode() + b"\n")
    stream = sock.makefile("rb")
    first = json.loads(stream.readline() or b"{}")
    if not first.get("ok"):
        return _error(str(first.get("error", "trace refused")), EXIT_FAILED)
    pcap = open(args.pcap, "wb") if args.pcap else None  # noqa: SIM115 - closed below
    if pcap is not None:
        pcap.write(PCAP_HEADER)
        pcap.flush()
    deadline = time.monotonic() + args.seconds if args.seconds else None
    count = 0
    try:
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
            line = stream.readline()
            if not line:
                break
            item = json.loads(line)
            count += 1
            if hep is not None:
                hep.send(item)
            if pcap is not None:
                pcap.write(pcap_record(item))
                pcap.flush()
            elif hep is None:
                print(render_text(item), flush=True)
    except (TimeoutError, KeyboardInterrupt):
        pass
    finally:
        sock.close()
        if pcap is not None:
            pcap.close()
            print(f"{count} messages written to {args.pcap}", file=sys.stderr)
        if hep is not None:
            hep.sock.close()
            failed = f" ({hep.failed} could not be sent)" if hep.failed else ""
            print(f"{hep.sent} messages sent as HEP to {args.hep}{failed}", file=sys.stderr)
    return EXIT_OK


class _HepSender:
    """clearipctl trace --hep: each trace record as one HEPv3 datagram (Call-ID correlated)."""

    def __init__(self, address: str, capture_id: int, password: str) -> None:
        from clearip.relay.service.hep import parse_address

        if not 0 <= capture_id <= 0xFFFFFFFF:
            raise ValueError(f"capture id {capture_id}: use 0 to 4294967295")
        host, port = parse_address(address)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ValueError(f"cannot resolve {host}: {exc}") from None
        family, kind, proto, _, target = infos[0]
        self.sock = socket.socket(family, kind, proto)
        self.target = target
        self.capture_id = capture_id
        self.password = password.encode("utf-8")
        self.sent = self.failed = 0

    def send(self, item: dict[str, Any]) -> None:
        from clearip.relay.service.hep import HepError, encode, record_for

        try:
            data = encode(
                record_for(
                    item["direction"],
                    item["transport"],
                    (item["local"][0], item["local"][1]),
                    (item["remote"][0], item["remote"][1]),
                    item["time"],
                    payload=str(item["text"]).encode("utf-8", "replace"),
                    correlation_id=item.get("call_id") or "",
                    capture_id=self.capture_id,
                    password=self.password,
                )
            )
            self.sock.sendto(data, self.target)
        except (HepError, OSError):
            self.failed += 1
            return
        self.sent += 1


def xdp_detach(args: argparse.Namespace, client: Client) -> int:
    """The daemon detaches its own filter (it then keeps checking sources itself); whatever of
    ours is still pinned or attached afterwards (no daemon, or one from an older run) goes too.
    Another product's XDP program is never removed: it is named in the output."""
    from clearip.bpf.loader import detach_pinned

    detached: list[str] = []
    try:
        result, code = _reply(client.call("xdp.detach"))
        if code:
            return code
        detached = list(result.get("detached", []))
        daemon = "the running daemon removed it" if detached else "the daemon had none loaded"
    except DaemonDown:
        daemon = "daemon not running"
    interfaces, pin_dir = list(args.interface), args.pin_dir
    if Path(args.config).exists():
        from clearip.relay.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:  # still detach (the package's uninstall relies on it)
            print(f"clearipctl: {exc}; using the default pin directory", file=sys.stderr)
        else:
            if not interfaces and not isinstance(config.xdp.interfaces, str):
                interfaces = list(config.xdp.interfaces)  # "auto": every interface is looked at
            pin_dir = pin_dir or config.xdp.pin_dir
    pin_dir = pin_dir or "/sys/fs/bpf/clearip"
    report = detach_pinned(pin_dir, interfaces)
    removed = sorted({*detached, *(r.split(" ")[0] for r in report.removed)})
    where = ", ".join(removed) or "no interface (none carried it)"
    print(f"kernel filter detached from {where}; {pin_dir} cleared ({daemon})")
    for item in report.left_alone:
        print(f"left alone, not ours: {item}")
    if report.kept:
        print(f"kept in {pin_dir}, not ours: {', '.join(report.kept)}")
    return EXIT_OK


def steering_remove(args: argparse.Namespace, client: Client) -> int:
    """Unpin the steering program (package erase): its workers must be gone, since a worker
    started afterwards would find nothing to join."""
    from clearip.bpf.reuseport import remove_pins
    from clearip.relay.config import DEFAULT_STEERING_PIN_DIR, ConfigError, load_config

    try:
        client.call("status")
    except DaemonDown:
        pass
    else:
        return _error("clearip-proxy is running: stop it first (systemctl stop clearip-proxy)", 1)
    pin_dir = args.pin_dir
    if not pin_dir and Path(args.config).exists():
        try:
            pin_dir = load_config(args.config).steering_pin_dir
        except ConfigError as exc:
            print(f"clearipctl: {exc}: using {DEFAULT_STEERING_PIN_DIR}", file=sys.stderr)
    pin_dir = pin_dir or DEFAULT_STEERING_PIN_DIR
    existed = Path(pin_dir).exists()
    remove_pins(pin_dir)
    print(f"steering program {'unpinned: ' + pin_dir + ' removed' if existed else 'not pinned'}")
    return EXIT_OK


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
            result, code = _reply(client.call(f"emergency.{args.action}", **fields))
            if code:
                return code
            if args.action != "list":
                print(result)
            elif args.json:
                print(json.dumps(result))
            else:
                print("\n".join(result) if result else "no emergency numbers")
            return EXIT_OK
        result, code = _reply(client.call(args.command))
    except DaemonDown as exc:
        return _error(str(exc), EXIT_NO_DAEMON)
    if code:
        return code
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif args.command == "reload":
        print("\n".join(report_lines(result)))
    elif args.command == "top-dropped":
        print(table([[a, str(c)] for a, c in result], ["SOURCE", "DROPPED"]) if result else "none")
    elif isinstance(result, dict) and isinstance(result.get("per_worker"), dict):
        print(_workers_view(args.command, result))
    else:
        print(table(_flatten(result), ["WHAT", "VALUE"]))
    return EXIT_OK


def _workers_view(command: str, result: dict[str, Any]) -> str:
    """A supervisor's answer (workers > 1): the totals, then one column or row per worker."""
    per_worker: dict[str, dict[str, Any]] = result["per_worker"]
    rest = {k: v for k, v in result.items() if k != "per_worker"}
    indexes = sorted(per_worker, key=int)
    if command == "stats":
        relay = rest.pop("relay", {})
        names = sorted(set(relay).union(*(per_worker[i] for i in indexes)))
        rows = [
            [name, str(relay.get(name, 0)), *(str(per_worker[i].get(name, 0)) for i in indexes)]
            for name in names
        ]
        counters = table(rows, ["COUNTER", "TOTAL", *(f"WORKER {i}" for i in indexes)])
        return counters + "\n\n" + table(_flatten(rest), ["WHAT", "VALUE"])
    rows = []
    for i in indexes:
        view = per_worker[i]
        upstreams = view.get("upstreams") or {}
        rows.append(
            [
                i,
                str(view.get("pid") or "-"),
                str(view.get("state")),
                str(view.get("restarts", 0)),
                str(view.get("active_calls", "-")),
                str(view.get("active_transactions", "-")),
                str(view.get("connections", "-")),
                ", ".join(f"{role} {state}" for role, state in upstreams.items()) or "-",
            ]
        )
    headers = ["WORKER", "PID", "STATE", "RESTARTS", "CALLS", "TRANSACTIONS", "CONNECTIONS"]
    return table(_flatten(rest), ["WHAT", "VALUE"]) + "\n\n" + table(rows, [*headers, "CLEARIP"])


def trust(args: argparse.Namespace, client: Client) -> int:
    # Validate locally first so bad input never reaches the daemon or the file.
    if args.action in ("add", "remove"):
        parse_cidr(args.cidr)
    try:
        if args.action == "list":
            result, code = _reply(client.call("trust.list"))
            return code if code else _print_trust(result, args)
        if args.action == "export":
            result, code = _reply(client.call("trust.export"))
            if not code:
                print(result, end="")
            return code
        if args.action == "add":
            reply = client.call("trust.add", cidr=args.cidr, role=args.role, note=args.note)
        elif args.action == "remove":
            reply = client.call("trust.remove", cidr=args.cidr)
        else:
            text = _read_import(args.file)
            reply = client.call("trust.import", text=text, origin=args.file)
    except DaemonDown:
        return _trust_offline(args)
    result, code = _reply(reply)
    if not code:
        print(result)
    return code


def _flatten(data: Any, prefix: str = "") -> list[list[str]]:
    """Nested dicts as dotted keys; lists as comma-separated values."""
    rows: list[list[str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            rows += _flatten(value, f"{prefix}{key}.")
    elif isinstance(data, list):
        rows.append([prefix.rstrip("."), ", ".join(str(v) for v in data) or "-"])
    else:
        rows.append([prefix.rstrip("."), "-" if data is None else str(data)])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except TrustError as exc:
        return _error(str(exc), EXIT_INVALID)
    except (DaemonError, OSError, ValueError) as exc:
        return _error(str(exc), EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
