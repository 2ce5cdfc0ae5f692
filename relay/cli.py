"""``clearip-proxy``: the daemon's command line (run, check-config, reload, emulate, demo)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clearip.relay.config import ProxyConfig

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

    # Started by the supervisor for each worker process (no help: not for operators).
    worker = sub.add_parser("worker")
    worker.add_argument("--config", required=True)
    worker.add_argument("--base-config", default="")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--workers", type=int, required=True)
    worker.add_argument("--run-dir", required=True)
    worker.add_argument("--steering-pin-dir", default="")
    worker.add_argument("--ready-fd", type=int, default=-1)
    worker.add_argument("--supervisor", type=int, default=0)

    check = sub.add_parser("check-config", help="validate a config file and its trust list")
    check.add_argument(
        "--config", default=DEFAULT_CONFIG, help="TOML config (default: %(default)s)"
    )
    check.add_argument(
        "--show-defaults",
        action="store_true",
        help="print the packaged config, which documents every key and its default, and exit",
    )

    reload = sub.add_parser(
        "reload",
        help="make the running daemon re-read its config and trust list; print what changed",
        description="Ask the running daemon, over proxy.control_socket, to re-read its config "
        "file and trust list (as SIGHUP does). Settings that need no new socket apply at once "
        "to new calls; calls being set up keep theirs. Prints each applied key and each key "
        "that needs a restart (not applied), or 'no changes'. A bad file changes nothing: "
        "the error is printed and the exit status is 2.",
    )
    reload.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="the daemon's TOML config, for proxy.control_socket (default: %(default)s)",
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


def _packaged_config() -> str:
    """``relay/data/proxy.toml``: every key with its default and what it does."""
    from importlib.resources import files

    return files("clearip.relay").joinpath("data", "proxy.toml").read_text(encoding="utf-8")


def _load_or_report(path: str) -> ProxyConfig | None:
    """The config in ``path``, or None once its error is printed (the caller exits 2)."""
    from clearip.relay.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _check_config(path: str) -> int:
    from clearip.relay.policy.trust import TrustError, load_trust_file

    config = _load_or_report(path)
    if config is None:
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
    auto = " (auto: one per CPU)" if config.workers == "auto" else ""
    print(f"  worker processes: {config.worker_count()}{auto}")
    return EXIT_OK


def _run(path: str) -> int:
    from clearip.relay.policy.trust import TrustError
    from clearip.relay.service.daemon import Daemon
    from clearip.relay.service.logs import setup_logging

    config = _load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    setup_logging(config.log_level, config.log_format)
    if config.worker_count() > 1:
        from clearip.relay.service.supervisor import Supervisor

        try:
            supervisor = Supervisor(config, path)
        except TrustError as exc:
            print(f"error: proxy.trust_file: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        _use_uvloop()
        try:
            return asyncio.run(supervisor.run())
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    try:
        daemon = Daemon(config, config_path=path)
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


def _worker(args: argparse.Namespace) -> int:
    """One worker process of a supervisor (``clearip-proxy run`` with workers > 1)."""
    import os

    from clearip.relay.config import ConfigError, load_config
    from clearip.relay.policy.trust import TrustError
    from clearip.relay.service.daemon import Daemon
    from clearip.relay.service.logs import setup_logging
    from clearip.relay.service.reload import plan_reload
    from clearip.relay.service.worker_role import WorkerRole

    if args.supervisor:
        _stop_with_parent(args.supervisor)
    try:
        base = load_config(args.base_config) if args.base_config else None
        try:
            config = load_config(args.config)
        except ConfigError:
            if base is None:
                raise
            config = base  # the file broke since the supervisor read it: start as it did
        if base is not None:
            config = plan_reload(base, config).config
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level, config.log_format, worker=args.index)
    role = WorkerRole(args.index, args.workers, args.run_dir, args.steering_pin_dir)
    try:
        daemon = Daemon(config, config_path=args.config, role=role)
    except TrustError as exc:
        print(f"error: proxy.trust_file: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def ready() -> None:
        if args.ready_fd >= 0:
            os.write(args.ready_fd, b"READY\n")
            os.close(args.ready_fd)

    _use_uvloop()
    try:
        asyncio.run(daemon.run(on_ready=ready))
    except OSError as exc:
        print(f"error: worker {args.index}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _stop_with_parent(parent: int) -> None:
    """A worker gets SIGTERM when its supervisor dies (even by SIGKILL), so no orphan keeps
    the listeners; if the supervisor is already gone, stop now."""
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        sys.exit(EXIT_ERROR)


def _reload(path: str) -> int:
    """Ask the daemon (over its control socket) to reload, and print what changed."""
    from clearip.ctl.client import Client, DaemonDown, DaemonError
    from clearip.relay.config import ConfigError, ProxyConfig, load_config
    from clearip.relay.service.reload import report_lines

    local_error: ConfigError | None = None
    try:
        socket_path = load_config(path).control_socket
    except ConfigError as exc:
        # The daemon re-reads the same file and names the error itself (and logs it); find
        # its socket as best we can.
        local_error = exc
        socket_path = _control_socket_of(path) or ProxyConfig().control_socket
    if not socket_path:
        print(
            f"error: {path}: proxy.control_socket is empty, so the daemon cannot be asked: "
            "send it SIGHUP instead (systemctl reload clearip-proxy)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        reply = Client(socket_path).call("reload")
    except DaemonDown as exc:
        print(f"error: {local_error or exc}", file=sys.stderr)
        return EXIT_CONFIG if local_error else EXIT_ERROR
    except DaemonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not reply.get("ok"):
        print(f"error: {reply.get('error')}", file=sys.stderr)
        return EXIT_CONFIG if reply.get("kind") == "invalid" else EXIT_ERROR
    result = reply.get("result") or {}
    print("\n".join(report_lines(result)))
    daemon_config = result.get("config")
    if daemon_config and Path(daemon_config).resolve() != Path(path).resolve():
        print(f"note: the daemon reads {daemon_config}, not {path}", file=sys.stderr)
    return EXIT_OK


def _control_socket_of(path: str) -> str | None:
    """``proxy.control_socket`` from a file that is TOML but not a valid config."""
    import tomllib

    try:
        value = tomllib.loads(Path(path).read_text(encoding="utf-8"))["proxy"]["control_socket"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulate"]:
        from clearip.relay.labkit.emulator.cli import main as emulate_main

        return emulate_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        if args.show_defaults:
            sys.stdout.write(_packaged_config())
            return 0
        return _check_config(args.config)
    if args.command == "run":
        return _run(args.config)
    if args.command == "worker":
        return _worker(args)
    if args.command == "reload":
        return _reload(args.config)
    if args.command == "demo":
        from clearip.relay.labkit.demo.run import main as demo_main

        return demo_main(json_output=args.json, keep_running=args.keep_running, xdp=args.xdp)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
