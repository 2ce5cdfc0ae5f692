"""``clearipctl xdp detach`` and ``clearipctl steering remove``: taking the kernel programs
away, with or without the daemon (the package's uninstall runs both)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clearip.ctl.client import EXIT_FAILED, EXIT_OK, Client, DaemonDown, answer, fail

DEFAULT_CONFIG = "/etc/clearip-proxy/proxy.toml"


def add_pin_dir_options(command: argparse.ArgumentParser, read: str, pinned: str) -> None:
    """``--config`` (whose ``read`` settings name the pin directory, and more) and
    ``--pin-dir`` (``pinned`` is what lies there), for the commands below."""
    command.add_argument("--config", default=DEFAULT_CONFIG, help=f"read {read} from this config")
    command.add_argument("--pin-dir", help=f"{pinned} (default: from the config)")


def xdp_detach(args: argparse.Namespace, client: Client) -> int:
    """The daemon detaches its own filter (it then keeps checking sources itself); whatever of
    ours is still pinned or attached afterwards (no daemon, or one from an older run) goes too.
    Another product's XDP program is never removed: it is named in the output."""
    from clearip.bpf.pins import DEFAULT_PIN_DIR, detach_pinned

    detached: list[str] = []
    try:
        result, code = answer(client.call("xdp.detach"))
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
    pin_dir = pin_dir or DEFAULT_PIN_DIR
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
        return fail(
            "clearip-proxy is running: stop it first (systemctl stop clearip-proxy)", EXIT_FAILED
        )
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
