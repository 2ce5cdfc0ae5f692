"""The emulator's configuration: listeners, TLS, and where to write what it reports.

One TOML file carries everything: the rules (``[signing]``, ``[[rule]]``, see
:mod:`rules_toml`) and, optionally, where to listen::

    [[listen]]
    transport = "tls"          # udp, tcp or tls
    address = "127.0.0.1"      # default 127.0.0.1
    port = 5061                # default 5060 (udp, tcp) or 5061 (tls); 0 = any free port

    [tls]
    certificate = ""           # PEM certificate and key for TLS listeners, or:
    private_key = ""
    lab_dir = "/tmp/clearip-lab"   # make a throw-away CA and certificate here at start
    names = ["emulator.lab"]       # extra names/addresses for that certificate

Command-line listeners (``--udp/--tcp/--tls``) replace the file's ``[[listen]]`` tables, and
``--certificate/--private-key/--lab-tls`` its ``[tls]`` values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clearip.relay.labkit.emulator.rules import RulesError, RuleSet
from clearip.relay.labkit.emulator.rules_toml import (
    DEFAULT_RULES,
    load_rules,
    read_toml,
    rules_from_data,
)
from clearip.relay.sip.transaction.timers import DEFAULT_TIMERS, TimerSettings
from clearip.relay.transport.peer import ListenerSpec

TRANSPORTS = ("udp", "tcp", "tls")


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything :func:`clearip.relay.labkit.emulator.server.run_emulator` needs.

    ``listeners`` may use port 0 (any free port); the bound ports are in
    :attr:`Emulator.bound` and, with ``ready_file``, written as JSON
    ``{"udp": [port, ...], "tcp": [...], "tls": [...]}`` once every listener is up.
    A TLS listener without its own certificate uses ``certificate``/``private_key``, else a
    lab CA made in ``lab_dir``.
    """

    rules: RuleSet = field(default_factory=lambda: load_rules(DEFAULT_RULES))
    listeners: tuple[ListenerSpec, ...] = ()
    certificate: str | None = None
    private_key: str | None = None
    lab_dir: str | None = None
    lab_names: tuple[str, ...] = ()
    stats_file: str | None = None
    ready_file: str | None = None
    public_key_out: str | None = None
    print_stats: bool = True
    timers: TimerSettings = DEFAULT_TIMERS

    def with_changes(self, **changes: Any) -> EmulatorConfig:
        return replace(self, **changes)


def _listener(item: Any, index: int, origin: str) -> ListenerSpec:
    where = f"[[listen]] #{index}"

    def error(problem: str, fix: str) -> RulesError:
        return RulesError(origin, problem, fix, where)

    if not isinstance(item, dict):
        raise error("must be a table", "write [[listen]] then transport, address and port")
    allowed = {"transport", "address", "port", "certificate", "private_key"}
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise error(f"unknown key(s) {unknown}", f"use {', '.join(sorted(allowed))}")
    transport = item.get("transport")
    if transport not in TRANSPORTS:
        raise error(f"transport = {transport!r}", 'write transport = "udp", "tcp" or "tls"')
    address = item.get("address", "127.0.0.1")
    if not isinstance(address, str) or not address:
        raise error(f"address = {address!r}", 'write address = "127.0.0.1" (or "::1", "0.0.0.0")')
    port = item.get("port", 5061 if transport == "tls" else 5060)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise error(f"port = {port!r}", "use a port number from 0 (any free port) to 65535")
    files = [item.get("certificate"), item.get("private_key")]
    if any(f is not None and not isinstance(f, str) for f in files) or (
        (files[0] is None) != (files[1] is None)
    ):
        raise error("certificate and private_key go together", "give both paths, or neither")
    return ListenerSpec(transport, address, port, None, files[0], files[1])


def _tls(data: Any, origin: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RulesError(origin, "[tls] must be a table", "write [tls] on its own line")
    allowed = {"certificate", "private_key", "lab_dir", "names"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RulesError(origin, f"[tls]: unknown key(s) {unknown}", f"use {', '.join(allowed)}")
    out: dict[str, Any] = {}
    for key, target in (("certificate", "certificate"), ("private_key", "private_key")):
        if key in data:
            if not isinstance(data[key], str):
                raise RulesError(origin, f"[tls] {key} must be a string", "give a file path")
            out[target] = data[key] or None
    if "lab_dir" in data:
        if not isinstance(data["lab_dir"], str):
            raise RulesError(origin, "[tls] lab_dir must be a string", "give a directory path")
        out["lab_dir"] = data["lab_dir"] or None
    names = data.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise RulesError(origin, "[tls] names must be a list of strings", 'write names = ["lab"]')
    out["lab_names"] = tuple(names)
    if bool(out.get("certificate")) != bool(out.get("private_key")):
        raise RulesError(
            origin, "[tls] certificate and private_key go together", "give both, or neither"
        )
    return out


def _resolve(path: str | None, base_dir: Path | None) -> str | None:
    if not path or base_dir is None or Path(path).is_absolute():
        return path
    return str(base_dir / path)


def config_from_data(
    data: dict[str, Any], origin: str, base_dir: Path | None = None
) -> EmulatorConfig:
    """Validate parsed TOML; relative paths are taken relative to ``base_dir``."""
    rules = rules_from_data(data, origin, base_dir)
    items = data.get("listen", [])
    if not isinstance(items, list):
        raise RulesError(origin, "listeners must be [[listen]] tables", "write [[listen]]")
    listeners = tuple(
        replace(
            spec,
            certificate=_resolve(spec.certificate, base_dir),
            private_key=_resolve(spec.private_key, base_dir),
        )
        for spec in (_listener(item, i, origin) for i, item in enumerate(items, start=1))
    )
    tls = _tls(data.get("tls"), origin)
    for key in ("certificate", "private_key", "lab_dir"):
        if key in tls:
            tls[key] = _resolve(tls[key], base_dir)
    return EmulatorConfig(rules=rules, listeners=listeners, **tls)


def load_config(path: str | Path = DEFAULT_RULES) -> EmulatorConfig:
    """Rules, listeners and TLS settings from one TOML file; errors are :class:`RulesError`."""
    path = Path(path)
    return config_from_data(read_toml(path), str(path), path.parent)
