"""The proxy's configuration: one TOML file, validated in full before anything starts.

Every key is optional; the defaults are the seed's behaviour (``relay/data/proxy.toml`` shows
them all). Any error names the key, the bad value and the fix, and the daemon refuses to start.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clearip.bpf.steering import MAX_WORKERS
from clearip.relay.policy.emergency import DEFAULT_NUMBERS, validate_number
from clearip.relay.service.hep import parse_address
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.transaction.timers import TimerSettings
from clearip.relay.sip.uri import SipUri, parse_uri
from clearip.relay.transport.peer import ListenerSpec

TRANSPORTS = ("udp", "tcp", "tls")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_RUN_DIR = "/run/clearip-proxy"
DEFAULT_STEERING_PIN_DIR = "/sys/fs/bpf/clearip-reuseport"


def cpu_workers() -> int:
    """``workers = "auto"``: one worker per CPU this process may run on (its affinity, which
    systemd's CPUAffinity= and containers narrow), at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


class ConfigError(ValueError):
    """The config is invalid: the message names the key, the value and the fix."""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Where ClearIP is: URI (host, port, transport), TLS trust, and keep-alive."""

    uri: str = "sip:sip.clearip.com:5061;transport=tls"
    addresses: tuple[str, ...] = ()
    ca_file: str = ""
    server_name: str = ""
    verify: bool = True
    keepalive_interval: float = 20.0
    # Proof of life (RFC 5626 §4.4.1: 10 s) expected after each keep-alive, else the link is down.
    keepalive_timeout: float = 10.0

    @property
    def sip_uri(self) -> SipUri:
        uri = parse_uri(self.uri)
        assert isinstance(uri, SipUri)
        return uri

    @property
    def transport(self) -> str:
        return self.sip_uri.transport

    @property
    def host(self) -> str:
        return self.sip_uri.host_bare

    @property
    def port(self) -> int:
        uri = self.sip_uri
        return uri.port or (5061 if uri.transport == "tls" else 5060)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Trust for outgoing TLS that is not a ClearIP upstream: carriers reached by TLS Contacts."""

    peers_ca_file: str = ""
    peers_verify: bool = True


AUTO_INTERFACES = "auto"


@dataclass(frozen=True, slots=True)
class XdpConfig:
    enabled: bool = True
    # Interface names, or "auto": those carrying the listeners' addresses, chosen at start
    # (clearip.bpf.interfaces).
    interfaces: tuple[str, ...] | str = AUTO_INTERFACES
    mode: str = "auto"
    udp_ports: tuple[int, ...] = (5060,)
    tcp_ports: tuple[int, ...] = (5060, 5061)
    pin_dir: str = "/sys/fs/bpf/clearip"
    replace_foreign: bool = False  # replace another product's XDP program on an interface


@dataclass(frozen=True, slots=True)
class HepConfig:
    """HEPv3 copies of every SIP message for a Homer collector (``address`` "" = off)."""

    address: str = ""  # "host:port"
    transport: str = "udp"
    capture_id: int = 1
    password: str = field(default="", repr=False)
    queue_limit: int = 10000

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listeners: tuple[ListenerSpec, ...] = (
        ListenerSpec("udp", "0.0.0.0", 5060),
        ListenerSpec("tcp", "0.0.0.0", 5060),
        ListenerSpec("udp", "::", 5060),
        ListenerSpec("tcp", "::", 5060),
    )
    trust_file: str = "/etc/clearip-proxy/trust.toml"
    control_socket: str = "/run/clearip-proxy/control.sock"
    state_dir: str = "/var/lib/clearip-proxy"
    upstream_timeout: float = 5.0
    provider_timeout: float = 2.0
    route_advance_codes: frozenset[int] = frozenset((408, 500, 502, 503, 504))
    copy_headers: tuple[str, ...] = ("Identity", "P-Asserted-Identity")
    options_when_upstream_down: int = 503
    max_contacts: int = 10
    max_transactions: int = 100000
    max_connections: int = 4096
    max_connections_per_source: int = 64
    max_message_size: int = 65536
    overload_queue_delay: float = 0.05
    invite_rate_per_source: float = 1000.0
    outbound: UpstreamConfig = field(default_factory=UpstreamConfig)
    inbound: UpstreamConfig = field(default_factory=UpstreamConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    emergency_numbers: tuple[str, ...] = DEFAULT_NUMBERS
    emergency_route: str = ""
    timers: TimerSettings = field(default_factory=TimerSettings)
    xdp: XdpConfig = field(default_factory=XdpConfig)
    hep: HepConfig = field(default_factory=HepConfig)
    log_level: str = "info"
    log_format: str = "text"
    metrics_enabled: bool = True
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9477
    # Worker processes (issue #16): a whole number, or "auto" (one per CPU, see cpu_workers).
    workers: int | str = "auto"
    run_dir: str = ""  # the workers' private sockets; "" = the control socket's directory
    steering_pin_dir: str = DEFAULT_STEERING_PIN_DIR

    def worker_count(self) -> int:
        """How many worker processes ``clearip-proxy run`` starts (1: no supervisor)."""
        return cpu_workers() if self.workers == "auto" else int(self.workers)

    def worker_run_dir(self) -> str:
        if self.run_dir:
            return self.run_dir
        if self.control_socket:
            return str(Path(self.control_socket).parent)
        return DEFAULT_RUN_DIR

    def with_changes(self, **changes: Any) -> ProxyConfig:
        return replace(self, **changes)


class _Reader:
    """Pulls typed values out of one TOML table, recording which keys were used."""

    def __init__(self, table: dict[str, Any], prefix: str) -> None:
        self.table = table
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any, hint: str) -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            raise ConfigError(f"{self.key(name)} = {value!r} is invalid: {hint}")
        return value

    def positive(self, name: str, default: float, hint: str) -> float:
        value = float(self.get(name, float, default, hint))
        if value <= 0:
            raise ConfigError(f"{self.key(name)} = {value!r} is invalid: {hint}")
        return value

    def str_list(self, name: str, default: tuple[str, ...], hint: str) -> tuple[str, ...]:
        value = self.get(name, list, list(default), hint)
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{self.key(name)} = {value!r} is invalid: {hint}")
        return tuple(value)

    def int_list(self, name: str, default: tuple[int, ...], hint: str) -> tuple[int, ...]:
        value = self.get(name, list, list(default), hint)
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise ConfigError(f"{self.key(name)} = {value!r} is invalid: {hint}")
        return tuple(value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            where = f"[{self.prefix}]" if self.prefix else "the top level"
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)} in {where}: check the spelling against "
                "the documented defaults (clearip-proxy check-config --show-defaults)"
            )


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table, not {type(value).__name__}")
    return value


def _port(value: int, key: str) -> int:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key} = {value} is invalid: use a port number from 1 to 65535")
    return value


def _interfaces(x: _Reader) -> tuple[str, ...] | str:
    """``xdp.interfaces``: "auto" or a list of interface names (whether they exist here is
    checked when the daemon starts: the file may be checked on another host)."""
    hint = 'use "auto" or interface names, e.g. ["eth0", "eth1"]'
    value = x.table.get("interfaces", AUTO_INTERFACES)
    if value == AUTO_INTERFACES:
        x.used.add("interfaces")
        return AUTO_INTERFACES
    names = x.str_list("interfaces", (), hint)
    for name in names:
        if not name or len(name) > 15 or "/" in name or name.strip() != name:
            raise ConfigError(f"xdp.interfaces has {name!r}: not an interface name ({hint})")
    return names


def _listener(item: Any, index: int) -> ListenerSpec:
    prefix = f"listen[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{prefix} must be a table ([[listen]] with transport, address, port)")
    r = _Reader(item, prefix)
    transport = r.get("transport", str, "udp", "use udp, tcp or tls").lower()
    if transport not in TRANSPORTS:
        raise ConfigError(f"{prefix}.transport = {transport!r} is invalid: use udp, tcp or tls")
    address = r.get("address", str, "0.0.0.0", "use an IP address such as 0.0.0.0 or ::")
    default_port = 5061 if transport == "tls" else 5060
    port = _port(r.get("port", int, default_port, "use a port number"), f"{prefix}.port")
    advertise = r.get("advertise", str, "", "use the public IP address or host name") or None
    certificate = r.get("certificate", str, "", "use the path of a PEM certificate") or None
    private_key = r.get("private_key", str, "", "use the path of a PEM private key") or None
    r.finish()
    if transport == "tls":
        for key, path in (("certificate", certificate), ("private_key", private_key)):
            if not path:
                raise ConfigError(
                    f"{prefix}.{key} is missing: a TLS listener needs certificate and private_key"
                )
            if not Path(path).is_file():
                raise ConfigError(f"{prefix}.{key} = {path!r}: file not found")
    return ListenerSpec(transport, address, port, advertise, certificate, private_key)


def _upstream(table: dict[str, Any], prefix: str, base: UpstreamConfig) -> UpstreamConfig:
    r = _Reader(table, prefix)
    uri = r.get("uri", str, base.uri, 'use e.g. "sip:sip.clearip.com:5061;transport=tls"')
    try:
        parsed = parse_uri(uri)
    except SipParseError as exc:
        raise ConfigError(f"{prefix}.uri = {uri!r} is invalid: {exc.reason}") from None
    if not isinstance(parsed, SipUri) or parsed.transport not in ("tls", "tcp", "udp"):
        raise ConfigError(
            f"{prefix}.uri = {uri!r} is invalid: use sip:HOST:5061;transport=tls "
            "(or ;transport=tcp for troubleshooting)"
        )
    upstream = UpstreamConfig(
        uri=uri,
        addresses=r.str_list("addresses", base.addresses, "use a list of IP addresses"),
        ca_file=r.get("ca_file", str, base.ca_file, "use the path of a PEM CA bundle"),
        server_name=r.get("server_name", str, base.server_name, "use the TLS server name"),
        verify=r.get("verify", bool, base.verify, "use true or false"),
        keepalive_interval=r.positive(
            "keepalive_interval", base.keepalive_interval, "use seconds > 0"
        ),
        keepalive_timeout=r.positive(
            "keepalive_timeout", base.keepalive_timeout, "use seconds > 0 (RFC 5626 uses 10)"
        ),
    )
    r.finish()
    if upstream.ca_file and not Path(upstream.ca_file).is_file():
        raise ConfigError(f"{prefix}.ca_file = {upstream.ca_file!r}: file not found")
    return upstream


def _tls(table: dict[str, Any]) -> TlsConfig:
    r = _Reader(table, "tls")
    base = TlsConfig()
    tls = TlsConfig(
        peers_ca_file=r.get(
            "peers_ca_file",
            str,
            base.peers_ca_file,
            'use the path of a PEM CA bundle ("" = the system store)',
        ),
        peers_verify=r.get("peers_verify", bool, base.peers_verify, "use true or false"),
    )
    r.finish()
    if tls.peers_ca_file and not Path(tls.peers_ca_file).is_file():
        raise ConfigError(f"tls.peers_ca_file = {tls.peers_ca_file!r}: file not found")
    return tls


def _hep(table: dict[str, Any]) -> HepConfig:
    r = _Reader(table, "hep")
    base = HepConfig()
    address = r.get(
        "address",
        str,
        base.address,
        'use "host:port" of the collector, e.g. "10.0.0.5:9060" ("" = off)',
    ).strip()
    if address:
        try:
            parse_address(address)
        except ValueError as exc:
            raise ConfigError(f"hep.address = {address!r} is invalid: {exc}") from None
    transport = r.get("transport", str, base.transport, "use udp or tcp").lower()
    if transport not in ("udp", "tcp"):
        raise ConfigError(f"hep.transport = {transport!r} is invalid: use udp or tcp")
    capture_id = r.get(
        "capture_id", int, base.capture_id, "use a whole number from 0 to 4294967295"
    )
    if not 0 <= capture_id <= 0xFFFFFFFF:
        raise ConfigError(
            f"hep.capture_id = {capture_id} is invalid: use a whole number from 0 to 4294967295"
        )
    password = r.get("password", str, base.password, 'use the collector\'s password ("" = none)')
    if len(password.encode("utf-8")) > 1024:
        raise ConfigError("hep.password is invalid: use at most 1024 bytes")
    queue_limit = r.get(
        "queue_limit", int, base.queue_limit, "use a whole number of records, e.g. 10000"
    )
    if queue_limit <= 0:
        raise ConfigError(
            f"hep.queue_limit = {queue_limit} is invalid: use a whole number of records > 0"
        )
    r.finish()
    return HepConfig(address, transport, capture_id, password, queue_limit)


def config_from_data(data: dict[str, Any]) -> ProxyConfig:
    top = _Reader(data, "")
    for name in (
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
    ):
        top.used.add(name)
    top.finish()

    p = _Reader(_table(data, "proxy"), "proxy")
    defaults = ProxyConfig()
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
        max_contacts=int(
            p.positive("max_contacts", defaults.max_contacts, "use a whole number > 0")
        ),
        max_transactions=int(
            p.positive("max_transactions", defaults.max_transactions, "use a whole number > 0")
        ),
        max_connections=int(
            p.positive("max_connections", defaults.max_connections, "use a whole number > 0")
        ),
        max_connections_per_source=int(
            p.positive(
                "max_connections_per_source",
                defaults.max_connections_per_source,
                "use a whole number > 0",
            )
        ),
        max_message_size=int(
            p.positive("max_message_size", defaults.max_message_size, "use a number of bytes > 0")
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

    listen = data.get("listen")
    if listen is not None:
        if not isinstance(listen, list) or not listen:
            raise ConfigError("[[listen]] must be one or more tables with transport/address/port")
        config = config.with_changes(
            listeners=tuple(_listener(item, i) for i, item in enumerate(listen))
        )

    upstream = _table(data, "upstream")
    extra = set(upstream) - {"outbound", "inbound"}
    if extra:
        raise ConfigError(f"unknown table(s) {sorted(extra)} in [upstream]: use outbound, inbound")
    outbound = _upstream(_table(upstream, "outbound"), "upstream.outbound", UpstreamConfig())
    inbound = _upstream(_table(upstream, "inbound"), "upstream.inbound", outbound)
    config = config.with_changes(outbound=outbound, inbound=inbound, tls=_tls(_table(data, "tls")))

    e = _Reader(_table(data, "emergency"), "emergency")
    numbers = e.str_list(
        "numbers", defaults.emergency_numbers, 'use digit strings, e.g. ["911", "933"]'
    )
    try:
        numbers = tuple(validate_number(n) for n in numbers)
    except ValueError as exc:
        raise ConfigError(f"emergency.numbers: {exc}") from None
    route = e.get(
        "route",
        str,
        defaults.emergency_route,
        'use a SIP URI such as "sip:psap-gw.example.net:5060"',
    )
    if route:
        try:
            if not isinstance(parse_uri(route), SipUri):
                raise SipParseError("not a sip: or sips: URI")
        except SipParseError as exc:
            raise ConfigError(f"emergency.route = {route!r} is invalid: {exc.reason}") from None
    e.finish()
    config = config.with_changes(emergency_numbers=numbers, emergency_route=route)

    t = _Reader(_table(data, "timers"), "timers")
    rfc = TimerSettings()
    timers = TimerSettings(
        t1=t.positive("t1", rfc.t1, "use seconds > 0 (RFC 3261: 0.5)"),
        t2=t.positive("t2", rfc.t2, "use seconds > 0 (RFC 3261: 4)"),
        t4=t.positive("t4", rfc.t4, "use seconds > 0 (RFC 3261: 5)"),
    )
    t.finish()

    x = _Reader(_table(data, "xdp"), "xdp")
    xd = XdpConfig()
    mode = x.get("mode", str, xd.mode, "use auto, native or generic")
    if mode not in ("auto", "native", "generic"):
        raise ConfigError(f"xdp.mode = {mode!r} is invalid: use auto, native or generic")
    xdp = XdpConfig(
        enabled=x.get("enabled", bool, xd.enabled, "use true or false"),
        interfaces=_interfaces(x),
        mode=mode,
        udp_ports=tuple(
            _port(v, "xdp.udp_ports") for v in x.int_list("udp_ports", xd.udp_ports, "use ports")
        ),
        tcp_ports=tuple(
            _port(v, "xdp.tcp_ports") for v in x.int_list("tcp_ports", xd.tcp_ports, "use ports")
        ),
        pin_dir=x.get("pin_dir", str, xd.pin_dir, "use a path under /sys/fs/bpf"),
        replace_foreign=x.get("replace_foreign", bool, xd.replace_foreign, "use true or false"),
    )
    x.finish()

    lg = _Reader(_table(data, "log"), "log")
    level = lg.get("level", str, defaults.log_level, "use debug, info, warning or error").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log.level = {level!r} is invalid: use debug, info, warning or error")
    fmt = lg.get("format", str, defaults.log_format, "use text or json").lower()
    if fmt not in ("text", "json"):
        raise ConfigError(f"log.format = {fmt!r} is invalid: use text or json")
    lg.finish()

    m = _Reader(_table(data, "metrics"), "metrics")
    metrics_enabled = m.get("enabled", bool, defaults.metrics_enabled, "use true or false")
    metrics_address = m.get("address", str, defaults.metrics_address, "use an IP address")
    metrics_port = _port(
        m.get("port", int, defaults.metrics_port, "use a port number"), "metrics.port"
    )
    m.finish()
    return config.with_changes(
        timers=timers,
        xdp=xdp,
        hep=_hep(_table(data, "hep")),
        log_level=level,
        log_format=fmt,
        metrics_enabled=metrics_enabled,
        metrics_address=metrics_address,
        metrics_port=metrics_port,
    )


def load_config(path: str | Path) -> ProxyConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (copy the packaged default or pass --config FILE)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return config_from_data(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
