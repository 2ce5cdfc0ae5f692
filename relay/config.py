"""The proxy's configuration: one TOML file, validated in full before anything starts.

Rules: every key is optional; the defaults are the seed's behaviour and live here, in the
frozen dataclasses (``relay/data/proxy.toml`` shows them all, and a test keeps the two equal).
Any error names the key, the bad value and the fix, and the daemon refuses to start. The
rest of the program reads only these dataclasses, never the TOML.

Theory of operation: :func:`load_config` reads the file and parses the TOML;
:func:`clearip.relay.config_toml.config_from_data` checks the top level and ``[proxy]`` and
hands each other table to its reader in :mod:`clearip.relay.config_sections`; all of them
take values through :class:`clearip.relay.config_reader.TableReader`, which refuses unknown
keys. The result is a :class:`ProxyConfig`; ``with_changes`` derives another (reload, tests).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clearip.bpf.steering import MAX_WORKERS
from clearip.relay.policy.emergency import DEFAULT_NUMBERS
from clearip.relay.service.hep import parse_address
from clearip.relay.sip.parser import DEFAULT_LIMITS
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
    """Everything the relay is told: ``[proxy]`` keys under their own names, the other tables
    as one field each (``outbound``, ``xdp``, ``hep``) or as prefixed fields (``log_level``)."""

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
    max_message_size: int = DEFAULT_LIMITS.max_message_size  # the parser's bound, one default
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


def load_config(path: str | Path) -> ProxyConfig:
    """The config in ``path``, validated in full; any problem is a :class:`ConfigError`."""
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
    # config_toml reads into the dataclasses above, so it is imported here, not at the top.
    from clearip.relay.config_toml import config_from_data

    try:
        return config_from_data(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
