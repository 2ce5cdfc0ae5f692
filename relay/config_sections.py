"""The config file's sections other than ``[proxy]``: one reader per table, in file order.

Rules: each function reads one table (``[[listen]]``, ``[upstream.*]``, ``[tls]``,
``[emergency]``, ``[timers]``, ``[xdp]``, ``[hep]``, ``[log]``, ``[metrics]``) through a
:class:`~clearip.relay.config_reader.TableReader`, checks every value (an error names the key,
the value and the fix), ends with ``finish()`` so an unknown key is refused, and returns the
typed value the :class:`~clearip.relay.config.ProxyConfig` field holds. A key left out takes
the dataclass default, which ``relay/data/proxy.toml`` documents. Files named by a key are
checked only after the table's keys, so an unknown key is reported first. Nothing here reads
a file's contents or touches the network: whether an interface exists is checked at start.
"""

from __future__ import annotations

from typing import Any

from clearip.relay.config import (
    AUTO_INTERFACES,
    LOG_LEVELS,
    TRANSPORTS,
    ConfigError,
    HepConfig,
    ProxyConfig,
    TlsConfig,
    UpstreamConfig,
    XdpConfig,
)
from clearip.relay.config_reader import TableReader, port_number, require_file
from clearip.relay.policy.emergency import validate_number
from clearip.relay.service.hep import parse_address
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.transaction.timers import TimerSettings
from clearip.relay.sip.uri import SipUri, parse_uri
from clearip.relay.transport.peer import ListenerSpec


def listeners(listen: Any) -> tuple[ListenerSpec, ...]:
    """``[[listen]]``: one or more tables with transport, address and port."""
    if not isinstance(listen, list) or not listen:
        raise ConfigError("[[listen]] must be one or more tables with transport/address/port")
    return tuple(_listener(item, i) for i, item in enumerate(listen))


def _listener(item: Any, index: int) -> ListenerSpec:
    prefix = f"listen[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{prefix} must be a table ([[listen]] with transport, address, port)")
    r = TableReader(item, prefix)
    transport = r.get("transport", str, "udp", "use udp, tcp or tls").lower()
    if transport not in TRANSPORTS:
        raise ConfigError(f"{prefix}.transport = {transport!r} is invalid: use udp, tcp or tls")
    address = r.get("address", str, "0.0.0.0", "use an IP address such as 0.0.0.0 or ::")
    default_port = 5061 if transport == "tls" else 5060
    port = port_number(r.get("port", int, default_port, "use a port number"), f"{prefix}.port")
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
            require_file(f"{prefix}.{key}", path)
    return ListenerSpec(transport, address, port, advertise, certificate, private_key)


def upstream(table: dict[str, Any], prefix: str, base: UpstreamConfig) -> UpstreamConfig:
    """``[upstream.outbound]`` or ``[upstream.inbound]``; a key left out keeps ``base``'s value
    (inbound inherits outbound)."""
    r = TableReader(table, prefix)
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
    result = UpstreamConfig(
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
    require_file(f"{prefix}.ca_file", result.ca_file)
    return result


def tls(table: dict[str, Any]) -> TlsConfig:
    """``[tls]``: trust for TLS to carriers that are not a ClearIP upstream."""
    r = TableReader(table, "tls")
    base = TlsConfig()
    result = TlsConfig(
        peers_ca_file=r.get(
            "peers_ca_file",
            str,
            base.peers_ca_file,
            'use the path of a PEM CA bundle ("" = the system store)',
        ),
        peers_verify=r.get("peers_verify", bool, base.peers_verify, "use true or false"),
    )
    r.finish()
    require_file("tls.peers_ca_file", result.peers_ca_file)
    return result


def emergency(table: dict[str, Any], defaults: ProxyConfig) -> tuple[tuple[str, ...], str]:
    """``[emergency]``: (the numbers that bypass ClearIP, the route for them or "")."""
    e = TableReader(table, "emergency")
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
    return numbers, route


def timers(table: dict[str, Any]) -> TimerSettings:
    """``[timers]``: the RFC 3261 timer bases T1, T2 and T4."""
    t = TableReader(table, "timers")
    rfc = TimerSettings()
    result = TimerSettings(
        t1=t.positive("t1", rfc.t1, "use seconds > 0 (RFC 3261: 0.5)"),
        t2=t.positive("t2", rfc.t2, "use seconds > 0 (RFC 3261: 4)"),
        t4=t.positive("t4", rfc.t4, "use seconds > 0 (RFC 3261: 5)"),
    )
    t.finish()
    return result


def xdp(table: dict[str, Any]) -> XdpConfig:
    """``[xdp]``: the kernel filter, where it is attached and the ports it guards."""
    x = TableReader(table, "xdp")
    xd = XdpConfig()
    mode = x.get("mode", str, xd.mode, "use auto, native or generic")
    if mode not in ("auto", "native", "generic"):
        raise ConfigError(f"xdp.mode = {mode!r} is invalid: use auto, native or generic")
    result = XdpConfig(
        enabled=x.get("enabled", bool, xd.enabled, "use true or false"),
        interfaces=_interfaces(x),
        mode=mode,
        udp_ports=_ports(x, "udp_ports", xd.udp_ports),
        tcp_ports=_ports(x, "tcp_ports", xd.tcp_ports),
        pin_dir=x.get("pin_dir", str, xd.pin_dir, "use a path under /sys/fs/bpf"),
        replace_foreign=x.get("replace_foreign", bool, xd.replace_foreign, "use true or false"),
    )
    x.finish()
    return result


def _ports(x: TableReader, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(port_number(v, x.key(name)) for v in x.int_list(name, default, "use ports"))


def _interfaces(x: TableReader) -> tuple[str, ...] | str:
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


def hep(table: dict[str, Any]) -> HepConfig:
    """``[hep]``: HEPv3 copies of every SIP message for a Homer collector."""
    r = TableReader(table, "hep")
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


def log(table: dict[str, Any], defaults: ProxyConfig) -> tuple[str, str]:
    """``[log]``: (level, format)."""
    lg = TableReader(table, "log")
    level = lg.get("level", str, defaults.log_level, "use debug, info, warning or error").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log.level = {level!r} is invalid: use debug, info, warning or error")
    fmt = lg.get("format", str, defaults.log_format, "use text or json").lower()
    if fmt not in ("text", "json"):
        raise ConfigError(f"log.format = {fmt!r} is invalid: use text or json")
    lg.finish()
    return level, fmt


def metrics(table: dict[str, Any], defaults: ProxyConfig) -> tuple[bool, str, int]:
    """``[metrics]``: (enabled, address, port) of the Prometheus endpoint."""
    m = TableReader(table, "metrics")
    enabled = m.get("enabled", bool, defaults.metrics_enabled, "use true or false")
    address = m.get("address", str, defaults.metrics_address, "use an IP address")
    port = port_number(
        m.get("port", int, defaults.metrics_port, "use a port number"), "metrics.port"
    )
    m.finish()
    return enabled, address, port
