"""What a reload (SIGHUP, ``clearip-proxy reload``) may change: a pure comparison of two configs.

Settings read per decision (timeouts, routing, limits, emergency numbers, logging) apply to the
running daemon; settings behind a socket, a kernel program or a ClearIP link (listeners, the
control socket, metrics, the state directory, the upstreams, ``[xdp]``, the worker processes)
need a restart. A
reload never half-applies: :func:`plan_reload` returns the config to run with (the new file's
live settings, the running ones for the rest) plus one :class:`Change` per key, for the log and
for the operator's report. Calls already being set up keep the config they started with.

:func:`read_reload` is the one step that is not pure: the first step of every reload, the
daemon's and the supervisor's alike (read the file, plan, re-read the policy files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clearip.relay.config import ConfigError, ProxyConfig, load_config
from clearip.relay.policy.sources import PolicyError, SourcePolicy
from clearip.relay.policy.trust import TrustError
from clearip.relay.transport.peer import ListenerSpec

# ProxyConfig field -> (its name in the config file, applies without a restart). A nested
# table (timers, xdp, upstreams) is reported key by key under that name. Fields missing here
# are treated as needing a restart (the safe side); a unit test keeps the table complete.
KEYS: dict[str, tuple[str, bool]] = {
    "listeners": ("listen", False),
    "trust_file": ("proxy.trust_file", True),
    "control_socket": ("proxy.control_socket", False),
    "state_dir": ("proxy.state_dir", False),
    "upstream_timeout": ("proxy.upstream_timeout", True),
    "provider_timeout": ("proxy.provider_timeout", True),
    "route_advance_codes": ("proxy.route_advance_codes", True),
    "copy_headers": ("proxy.copy_headers", True),
    "options_when_upstream_down": ("proxy.options_when_upstream_down", True),
    "max_contacts": ("proxy.max_contacts", True),
    "max_transactions": ("proxy.max_transactions", True),
    "max_connections": ("proxy.max_connections", True),
    "max_connections_per_source": ("proxy.max_connections_per_source", True),
    "max_message_size": ("proxy.max_message_size", True),
    "overload_queue_delay": ("proxy.overload_queue_delay", True),
    "invite_rate_per_source": ("proxy.invite_rate_per_source", True),
    "outbound": ("upstream.outbound", False),
    "inbound": ("upstream.inbound", False),
    "emergency_numbers": ("emergency.numbers", True),
    "emergency_route": ("emergency.route", True),
    "timers": ("timers", True),
    "tls": ("tls", False),
    "xdp": ("xdp", False),
    "hep": ("hep", True),  # the exporter is replaced: a new collector gets the next message
    "log_level": ("log.level", True),
    "log_format": ("log.format", True),
    "metrics_enabled": ("metrics.enabled", False),
    "metrics_address": ("metrics.address", False),
    "metrics_port": ("metrics.port", False),
    "workers": ("proxy.workers", False),
    "run_dir": ("proxy.run_dir", False),
    "steering_pin_dir": ("proxy.steering_pin_dir", False),
}


# Keys whose values never appear in a reload report or the log.
SECRETS = frozenset(("hep.password",))


@dataclass(frozen=True, slots=True)
class Change:
    """One key whose value differs between the running config and the file (values rendered
    the way the config file spells them)."""

    key: str
    old: str
    new: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "old": self.old, "new": self.new}


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    config: ProxyConfig  # what to run with: the file's live settings, the running ones else
    live: tuple[Change, ...]  # applied now
    restart: tuple[Change, ...]  # not applied: the daemon must be restarted for these

    def changes(self, key: str) -> bool:
        """Whether ``key`` (or a key under it, e.g. ``timers``) is applied by this plan."""
        return any(c.key == key or c.key.startswith(key + ".") for c in self.live)


def plan_reload(old: ProxyConfig, new: ProxyConfig) -> ReloadPlan:
    """Compare the running config with a freshly validated one (see the module docstring)."""
    live: list[Change] = []
    restart: list[Change] = []
    keep: dict[str, Any] = {}
    for f in dataclasses.fields(ProxyConfig):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if _same(f.name, before, after):
            continue
        key, applies = KEYS.get(f.name, (f"proxy.{f.name}", False))
        changes = list(_diff(key, before, after))
        (live if applies else restart).extend(changes)
        if not applies:
            keep[f.name] = before
    return ReloadPlan(
        config=new.with_changes(**keep) if keep else new, live=tuple(live), restart=tuple(restart)
    )


def read_reload(running: ProxyConfig, path: Path | None, policy: SourcePolicy) -> ReloadPlan:
    """Read the config file at ``path`` (None: only the policy files are re-read), plan the
    reload and re-read the trust list and emergency numbers into ``policy``. A bad file or a
    kernel refusal is logged and raised (ConfigError, TrustError, PolicyError) and nothing
    running has changed."""
    try:
        fresh = running if path is None else load_config(path)
        plan = plan_reload(running, fresh)
        try:
            policy.reload(plan.config.trust_file, plan.config.emergency_numbers)
        except TrustError as exc:
            raise TrustError(f"proxy.trust_file: {exc}") from None
    except (ConfigError, TrustError, PolicyError) as exc:
        logging.getLogger("clearip.daemon").error(
            "reload refused, every running setting kept: %s", exc
        )
        raise
    return plan


def log_changes(
    plan: ReloadPlan, trust_before: list[tuple[Any, ...]], trust_after: list[tuple[Any, ...]]
) -> list[Change]:
    """Log what an applied reload changed and what waits for a restart; the live changes,
    with the trust list's when its entries changed."""
    log = logging.getLogger("clearip.daemon")
    live = list(plan.live)
    if trust_after != trust_before:
        live.append(
            Change("trust list", f"{len(trust_before)} entries", f"{len(trust_after)} entries")
        )
    for change in live:
        log.info("reload: %s: %s -> %s", change.key, change.old, change.new)
    for change in plan.restart:
        log.warning(
            "%s changed: needs a restart (running with %s, the file says %s)",
            change.key,
            change.old,
            change.new,
        )
    if not live and not plan.restart:
        log.info("reload: no changes")
    return live


def _same(name: str, before: Any, after: Any) -> bool:
    if name == "emergency_numbers":  # a set: the order in the file does not matter
        return sorted(before) == sorted(after)
    return bool(before == after)


def _diff(key: str, before: Any, after: Any) -> Iterable[Change]:
    """One change per differing key; nested tables are compared key by key."""
    if dataclasses.is_dataclass(before) and not isinstance(before, ListenerSpec):
        for f in dataclasses.fields(before):
            yield from _diff(f"{key}.{f.name}", getattr(before, f.name), getattr(after, f.name))
    elif before != after:
        if key in SECRETS:  # logged and shown by clearipctl: say that it changed, not to what
            yield Change(key, _secret(before), _secret(after))
        else:
            yield Change(key, render(before), render(after))


def _secret(value: Any) -> str:
    return '"***"' if value else '""'


def render(value: Any) -> str:
    """A value as the config file would spell it (TOML-like, sorted sets)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, ListenerSpec):
        address = f"[{value.address}]" if ":" in value.address else value.address
        text = f"{value.transport}:{address}:{value.port}"
        for name in ("advertise", "certificate", "private_key"):
            if getattr(value, name):
                text += f";{name}={getattr(value, name)}"
        return text
    if isinstance(value, frozenset | set):
        return render(sorted(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    return str(value)


def report_lines(result: dict[str, Any]) -> list[str]:
    """The operator's view of a reload's result (the control command's reply)."""
    lines = [f"applied  {c['key']}: {c['old']} -> {c['new']}" for c in result.get("live", [])]
    lines += [
        f"restart  {c['key']}: {c['old']} -> {c['new']} (not applied: needs a restart)"
        for c in result.get("restart", [])
    ]
    return lines or ["no changes"]
