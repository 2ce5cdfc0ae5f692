"""A parsed config file (TOML data) to a :class:`~clearip.relay.config.ProxyConfig`.

Rules: :func:`config_from_data` validates the whole document before returning, so the daemon
never starts on half a config. Only the known tables are accepted at the top level and only
``outbound`` and ``inbound`` under ``[upstream]``; the tables are read in file order
(``[proxy]`` here, the others by :mod:`clearip.relay.config_sections`), and the first error
found is raised as :class:`~clearip.relay.config.ConfigError` naming the key, the value and
the fix. An empty document gives ``ProxyConfig()``: every default.
"""

from __future__ import annotations

from typing import Any

from clearip.bpf.steering import MAX_WORKERS
from clearip.relay import config_sections as sections
from clearip.relay.config import ConfigError, ProxyConfig, UpstreamConfig
from clearip.relay.config_reader import TableReader, sub_table

# The tables the top level may hold, in the order they are read.
TABLES = (
    "proxy",
    "listen",
    "upstream",
    "tls",
    "emergency",
    "timers",
    "xdp",
    "hep",
    "log",
    "metrics",
)


def config_from_data(data: dict[str, Any]) -> ProxyConfig:
    top = TableReader(data, "")
    top.used.update(TABLES)
    top.finish()

    defaults = ProxyConfig()
    config = _proxy_table(TableReader(sub_table(data, "proxy"), "proxy"), defaults)

    listen = data.get("listen")
    if listen is not None:
        config = config.with_changes(listeners=sections.listeners(listen))

    upstream = sub_table(data, "upstream")
    extra = set(upstream) - {"outbound", "inbound"}
    if extra:
        raise ConfigError(f"unknown table(s) {sorted(extra)} in [upstream]: use outbound, inbound")
    outbound = sections.upstream(
        sub_table(upstream, "outbound"), "upstream.outbound", UpstreamConfig()
    )
    inbound = sections.upstream(sub_table(upstream, "inbound"), "upstream.inbound", outbound)
    config = config.with_changes(
        outbound=outbound, inbound=inbound, tls=sections.tls(sub_table(data, "tls"))
    )

    numbers, route = sections.emergency(sub_table(data, "emergency"), defaults)
    config = config.with_changes(emergency_numbers=numbers, emergency_route=route)
    timers = sections.timers(sub_table(data, "timers"))
    xdp = sections.xdp(sub_table(data, "xdp"))
    level, fmt = sections.log(sub_table(data, "log"), defaults)
    enabled, address, port = sections.metrics(sub_table(data, "metrics"), defaults)
    return config.with_changes(
        timers=timers,
        xdp=xdp,
        hep=sections.hep(sub_table(data, "hep")),
        log_level=level,
        log_format=fmt,
        metrics_enabled=enabled,
        metrics_address=address,
        metrics_port=port,
    )


def _proxy_table(p: TableReader, defaults: ProxyConfig) -> ProxyConfig:
    """``[proxy]``: the relay's own settings, timeouts and limits."""
    upstream_timeout = p.positive(
        "upstream_timeout", defaults.upstream_timeout, "use seconds > 0 (the seed uses 5)"
    )
    provider_timeout = p.positive("provider_timeout", defaults.provider_timeout, "use seconds > 0")
    codes = p.int_list(
        "route_advance_codes", tuple(sorted(defaults.route_advance_codes)), "use SIP codes 300-699"
    )
    for code in codes:
        if not 300 <= code <= 699:
            raise ConfigError(f"proxy.route_advance_codes has {code}: use final codes 300-699")
    rate = float(
        p.get(
            "invite_rate_per_source",
            float,
            defaults.invite_rate_per_source,
            "use INVITEs per second",
        )
    )
    if rate < 0:
        raise ConfigError(
            f"proxy.invite_rate_per_source = {rate} is invalid: "
            "use INVITEs per second (0 = no limit)"
        )
    overload_delay = float(
        p.get(
            "overload_queue_delay",
            float,
            defaults.overload_queue_delay,
            "use seconds, e.g. 0.05 (0 = never shed)",
        )
    )
    if overload_delay < 0:
        raise ConfigError(
            f"proxy.overload_queue_delay = {overload_delay} is invalid: "
            "use seconds, e.g. 0.05 (0 = never shed)"
        )
    workers_hint = f'use a whole number from 1 to {MAX_WORKERS}, or "auto" (one per CPU)'
    workers = p.get("workers", (int, str), defaults.workers, workers_hint)
    if isinstance(workers, bool) or (
        workers != "auto" if isinstance(workers, str) else not 1 <= workers <= MAX_WORKERS
    ):
        raise ConfigError(f"proxy.workers = {workers!r} is invalid: {workers_hint}")
    options_down = p.get(
        "options_when_upstream_down", int, defaults.options_when_upstream_down, "use 200 or 503"
    )
    if options_down not in (200, 503):
        raise ConfigError(f"proxy.options_when_upstream_down = {options_down}: use 200 or 503")
    config = ProxyConfig(
        trust_file=p.get("trust_file", str, defaults.trust_file, "use a file path"),
        control_socket=p.get("control_socket", str, defaults.control_socket, "use a path"),
        state_dir=p.get("state_dir", str, defaults.state_dir, "use a directory path"),
        upstream_timeout=upstream_timeout,
        provider_timeout=provider_timeout,
        route_advance_codes=frozenset(codes),
        copy_headers=p.str_list("copy_headers", defaults.copy_headers, "use header names"),
        options_when_upstream_down=options_down,
        max_contacts=_count(p, "max_contacts", defaults.max_contacts),
        max_transactions=_count(p, "max_transactions", defaults.max_transactions),
        max_connections=_count(p, "max_connections", defaults.max_connections),
        max_connections_per_source=_count(
            p, "max_connections_per_source", defaults.max_connections_per_source
        ),
        max_message_size=_count(
            p, "max_message_size", defaults.max_message_size, "use a number of bytes > 0"
        ),
        overload_queue_delay=overload_delay,
        invite_rate_per_source=rate,
        workers=workers,
        run_dir=p.get(
            "run_dir", str, defaults.run_dir, 'use a directory path ("" = beside control_socket)'
        ),
        steering_pin_dir=p.get(
            "steering_pin_dir",
            str,
            defaults.steering_pin_dir,
            "use a directory under /sys/fs/bpf (a bpf file system)",
        ),
    )
    p.finish()
    return config


def _count(p: TableReader, name: str, default: int, hint: str = "use a whole number > 0") -> int:
    """A limit: a number > 0 (a float is accepted and truncated, as it always was)."""
    return int(p.positive(name, default, hint))
