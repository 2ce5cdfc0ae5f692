"""Reload without sockets: plan_reload (pure), calls keeping the config they started with (the
sans-IO core), the policy taking new emergency numbers with the kernel map, and a Daemon that
applies a reload all or nothing. The end-to-end cases are in test_reload.py."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clearip.relay.config import ConfigError, ProxyConfig, UpstreamConfig, XdpConfig, load_config
from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.sources import PolicyError, SourcePolicy
from clearip.relay.policy.trust import Role, save_trust_file
from clearip.relay.proxy.core import ProxyCore
from clearip.relay.proxy.effects import Effect, StartTimer
from clearip.relay.proxy.routing import Locality
from clearip.relay.proxy.timerkeys import PROVIDER, UPSTREAM, CallTimerKey, TxTimerKey
from clearip.relay.service.daemon import Daemon
from clearip.relay.service.logs import apply_logging
from clearip.relay.service.reload import KEYS, Change, plan_reload, report_lines
from clearip.relay.sip.message import Request
from clearip.relay.sip.transaction.timers import TimerSettings
from clearip.relay.transport.peer import ListenerSpec, LocalAddress, Peer
from lab.proxy_harness import write_config
from tests.test_policy import CARRIER, NEW, SWITCH, FakeKernel
from tests.test_proxy_core import CLEARIP, invite, reply_to, sent

OLD = ProxyConfig()


# -- plan_reload -------------------------------------------------------------------------------
def test_the_same_config_changes_nothing() -> None:
    plan = plan_reload(OLD, ProxyConfig())
    assert plan.live == () and plan.restart == ()
    assert plan.config == OLD


def test_every_config_field_is_classified() -> None:
    # A new ProxyConfig field must be put in KEYS (live or restart), named as in the file.
    assert set(KEYS) == {f.name for f in dataclasses.fields(ProxyConfig)}


@pytest.mark.parametrize(
    ("changes", "key", "old", "new"),
    [
        ({"upstream_timeout": 1.5}, "proxy.upstream_timeout", "5.0", "1.5"),
        ({"provider_timeout": 0.5}, "proxy.provider_timeout", "2.0", "0.5"),
        (
            {"route_advance_codes": frozenset((503, 486))},
            "proxy.route_advance_codes",
            "[408, 500, 502, 503, 504]",
            "[486, 503]",
        ),
        (
            {"copy_headers": ("Identity",)},
            "proxy.copy_headers",
            '["Identity", "P-Asserted-Identity"]',
            '["Identity"]',
        ),
        ({"options_when_upstream_down": 200}, "proxy.options_when_upstream_down", "503", "200"),
        ({"max_contacts": 3}, "proxy.max_contacts", "10", "3"),
        ({"max_transactions": 5}, "proxy.max_transactions", "100000", "5"),
        ({"max_connections": 8}, "proxy.max_connections", "4096", "8"),
        ({"max_connections_per_source": 2}, "proxy.max_connections_per_source", "64", "2"),
        ({"max_message_size": 4096}, "proxy.max_message_size", "65536", "4096"),
        ({"overload_queue_delay": 0.0}, "proxy.overload_queue_delay", "0.05", "0.0"),
        ({"invite_rate_per_source": 10.0}, "proxy.invite_rate_per_source", "1000.0", "10.0"),
        ({"trust_file": "/etc/t.toml"}, "proxy.trust_file", '"/etc/clearip-proxy/trust.toml"',
         '"/etc/t.toml"'),
        ({"emergency_numbers": ("911", "933", "112")}, "emergency.numbers", '["911", "933"]',
         '["911", "933", "112"]'),
        ({"emergency_route": "sip:psap@192.0.2.7"}, "emergency.route", '""',
         '"sip:psap@192.0.2.7"'),
        ({"timers": TimerSettings(t1=0.1)}, "timers.t1", "0.5", "0.1"),
        ({"log_level": "debug"}, "log.level", '"info"', '"debug"'),
        ({"log_format": "json"}, "log.format", '"text"', '"json"'),
    ],
)  # fmt: skip
def test_live_keys_are_applied(changes: dict[str, Any], key: str, old: str, new: str) -> None:
    fresh = OLD.with_changes(**changes)
    plan = plan_reload(OLD, fresh)
    assert plan.live == (Change(key, old, new),)
    assert plan.restart == ()
    assert plan.config == fresh
    assert plan.changes(key) and plan.changes(key.split(".", maxsplit=1)[0])


@pytest.mark.parametrize(
    ("changes", "key", "old", "new"),
    [
        ({"listeners": (ListenerSpec("udp", "127.0.0.1", 5070),)}, "listen",
         "[udp:0.0.0.0:5060, tcp:0.0.0.0:5060, udp:[::]:5060, tcp:[::]:5060]",
         "[udp:127.0.0.1:5070]"),
        ({"control_socket": "/tmp/c.sock"}, "proxy.control_socket",
         '"/run/clearip-proxy/control.sock"', '"/tmp/c.sock"'),
        ({"state_dir": "/tmp/s"}, "proxy.state_dir", '"/var/lib/clearip-proxy"', '"/tmp/s"'),
        ({"outbound": UpstreamConfig(uri="sip:192.0.2.1:5061;transport=tls")},
         "upstream.outbound.uri", '"sip:sip.clearip.com:5061;transport=tls"',
         '"sip:192.0.2.1:5061;transport=tls"'),
        ({"inbound": UpstreamConfig(addresses=("192.0.2.1",))}, "upstream.inbound.addresses",
         "[]", '["192.0.2.1"]'),
        ({"outbound": UpstreamConfig(ca_file="/etc/ca.pem")}, "upstream.outbound.ca_file", '""',
         '"/etc/ca.pem"'),
        ({"xdp": XdpConfig(enabled=False)}, "xdp.enabled", "true", "false"),
        ({"xdp": XdpConfig(interfaces=("eth1",))}, "xdp.interfaces", '"auto"', '["eth1"]'),
        ({"metrics_enabled": False}, "metrics.enabled", "true", "false"),
        ({"metrics_address": "0.0.0.0"}, "metrics.address", '"127.0.0.1"', '"0.0.0.0"'),
        ({"metrics_port": 9478}, "metrics.port", "9477", "9478"),
    ],
)  # fmt: skip
def test_keys_needing_a_restart_are_reported_and_not_applied(
    changes: dict[str, Any], key: str, old: str, new: str
) -> None:
    plan = plan_reload(OLD, OLD.with_changes(**changes))
    assert plan.restart == (Change(key, old, new),)
    assert plan.live == ()
    assert plan.config == OLD  # the running value stays
    assert not plan.changes(key)


def test_a_mixed_file_applies_the_live_keys_only() -> None:
    fresh = OLD.with_changes(
        upstream_timeout=1.0,
        metrics_port=1,
        xdp=XdpConfig(interfaces=("eth0",), mode="native"),
        timers=TimerSettings(t1=0.2, t2=2.0),
    )
    plan = plan_reload(OLD, fresh)
    assert [c.key for c in plan.live] == ["proxy.upstream_timeout", "timers.t1", "timers.t2"]
    assert [c.key for c in plan.restart] == ["xdp.interfaces", "xdp.mode", "metrics.port"]
    assert plan.config.upstream_timeout == 1.0 and plan.config.timers == fresh.timers
    assert plan.config.metrics_port == OLD.metrics_port and plan.config.xdp == OLD.xdp
    # Compared again with the running config, the restart keys are still pending.
    again = plan_reload(plan.config, fresh)
    assert again.live == () and again.restart == plan.restart


def test_the_order_of_emergency_numbers_is_no_change() -> None:
    plan = plan_reload(OLD, OLD.with_changes(emergency_numbers=("933", "911")))
    assert plan.live == () and plan.restart == ()


def test_report_lines() -> None:
    result = {
        "live": [{"key": "proxy.upstream_timeout", "old": "1.5", "new": "5.0"}],
        "restart": [{"key": "metrics.port", "old": "0", "new": "9477"}],
    }
    assert report_lines(result) == [
        "applied  proxy.upstream_timeout: 1.5 -> 5.0",
        "restart  metrics.port: 0 -> 9477 (not applied: needs a restart)",
    ]
    assert report_lines({"live": [], "restart": []}) == ["no changes"]


# -- calls keep their config (sans-IO core) ----------------------------------------------------
A = Peer("udp", "198.51.100.20", 5060)
B = Peer("udp", "198.51.100.21", 5060)


@pytest.fixture
def core() -> ProxyCore:
    return ProxyCore(
        ProxyConfig(upstream_timeout=3.0, provider_timeout=2.0),
        role_of=lambda ip: Role.SWITCH if ip.startswith("192.0.2.") else Role.PROVIDER,
        emergency=lambda: EmergencyNumbers(["911"]),
        locality=Locality(hosts={"203.0.113.5"}, ports={5060}),
        local_for=lambda peer, record_route=False: LocalAddress(
            peer.transport, "203.0.113.5", 5060
        ),
        upstream=lambda role: CLEARIP,
        clock=lambda: 0.0,
    )


def _timer(effects: list[Effect], what: int) -> float:
    return next(
        e.delay
        for e in effects
        if isinstance(e, StartTimer) and isinstance(e.key, CallTimerKey) and e.key.what == what
    )


def _request(effects: list[Effect], peer: Peer) -> Request:
    return next(m for m, p in sent(effects) if isinstance(m, Request) and p == peer)


def test_a_call_in_flight_keeps_the_config_it_started_with(core: ProxyCore) -> None:
    effects = core.on_message(invite(branch="z9hG4bKold"), Peer("udp", "192.0.2.10", 5060))
    assert _timer(effects, UPSTREAM) == 3.0
    relayed = _request(effects, CLEARIP)
    # The reload: shorter timeouts, 503 no longer advances, no headers copied, T1 longer.
    core.use_config(
        core.config.with_changes(
            upstream_timeout=1.0,
            provider_timeout=0.5,
            route_advance_codes=frozenset((486,)),
            copy_headers=(),
            timers=TimerSettings(t1=2.0),
        )
    )
    contacts = (
        "Contact: <sip:a@198.51.100.20>;q=1.0, <sip:b@198.51.100.21>;q=0.5\r\n"
        "Identity: eyJhbGciOiJFUzI1NiJ9.eyJhdHRlc3QiOiJCIn0.sig;info=<https://x/c.pem>\r\n"
    )
    effects = core.on_message(reply_to(relayed, 302, extra=contacts), CLEARIP)
    assert _timer(effects, PROVIDER) == 2.0  # the old provider_timeout
    to_a = _request(effects, A)
    assert to_a.get("identity"), "the old copy_headers applies"
    retransmit = next(
        e for e in effects if isinstance(e, StartTimer) and isinstance(e.key, TxTimerKey)
    )
    assert retransmit.delay == 0.5  # Timer A = the old T1
    effects = core.on_message(reply_to(to_a, 503), A)
    assert _request(effects, B).uri_text == "sip:b@198.51.100.21", "503 still advances"

    # A call that starts after the reload gets the new settings.
    effects = core.on_message(invite(branch="z9hG4bKnew"), Peer("udp", "192.0.2.10", 5060))
    assert _timer(effects, UPSTREAM) == 1.0
    assert [c.config.upstream_timeout for c in core.calls.values()] == [3.0, 1.0]


def test_use_config_changes_the_rate_limit(core: ProxyCore) -> None:
    core.use_config(core.config.with_changes(invite_rate_per_source=2.0))
    assert core.limiter.rate == 2.0 and core.limiter.burst == 2.0


# -- emergency numbers through the policy (kernel map included) --------------------------------
@pytest.fixture
def policy(tmp_path: Path) -> tuple[SourcePolicy, FakeKernel, Path]:
    trust_file = tmp_path / "trust.toml"
    save_trust_file(trust_file, [SWITCH, CARRIER])
    policy = SourcePolicy.load(trust_file, ["911"], tmp_path / "state")
    kernel = FakeKernel()
    policy.attach_kernel(kernel)
    return policy, kernel, trust_file


def test_reload_takes_the_configs_new_emergency_numbers_to_the_kernel(
    policy: tuple[SourcePolicy, FakeKernel, Path], tmp_path: Path
) -> None:
    p, kernel, _ = policy
    p.emergency_add("988")  # a runtime change, kept while the config's list is the same
    p.reload(emergency_numbers=["911"])
    assert p.emergency.numbers() == ["911", "988"]
    state = tmp_path / "state" / "emergency.toml"
    assert state.exists()
    p.reload(emergency_numbers=["911", "112"])  # the config changed: it wins, as at a start
    assert p.emergency.numbers() == ["112", "911"] and kernel.emergency == {"112", "911"}
    assert "112" in p.emergency
    assert not state.exists() and state.with_name("emergency.toml.old").exists()
    p.emergency_add("988")
    again = SourcePolicy.load(p.trust_file, ["112", "911"], tmp_path / "state")
    assert again.emergency.numbers() == ["112", "911", "988"]  # saved against the new list


def test_reload_can_switch_to_another_trust_file(
    policy: tuple[SourcePolicy, FakeKernel, Path], tmp_path: Path
) -> None:
    p, kernel, _ = policy
    other = tmp_path / "other.toml"
    save_trust_file(other, [NEW])
    p.reload(other)
    assert p.trust_file == other and [e.cidr for e in p.trust] == [NEW.cidr]
    assert list(kernel.trust) == [NEW.network]


@pytest.mark.parametrize("refused", ["emergency", "trust"])
def test_a_kernel_refusal_during_reload_changes_nothing(
    policy: tuple[SourcePolicy, FakeKernel, Path], refused: str
) -> None:
    p, kernel, trust_file = policy
    kernel.set_trust(p.trust)
    kernel.set_emergency(p.emergency.numbers())
    save_trust_file(trust_file, [NEW])
    if refused == "trust":  # the emergency map takes the numbers, then the trust map refuses
        original = kernel.set_trust

        def refuse(entries: Any) -> None:
            kernel.set_trust = original  # type: ignore[method-assign]
            raise OSError(28, "map full")

        kernel.set_trust = refuse  # type: ignore[method-assign]
    else:
        kernel.refuse = True
    with pytest.raises(PolicyError, match="map full"):
        p.reload(emergency_numbers=["911", "112"])
    assert p.emergency.numbers() == ["911"] and kernel.emergency == {"911"}
    assert [e.cidr for e in p.trust] == [SWITCH.cidr, CARRIER.cidr]
    assert {str(n) for n in kernel.trust} == {SWITCH.cidr, CARRIER.cidr}


# -- the daemon applies a reload all or nothing (not started: no sockets) ----------------------
@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    path = write_config(tmp_path, port=5999, upstream="sip:127.0.0.1:9;transport=tcp")
    root = logging.getLogger()
    level = root.level
    yield Daemon(load_config(path), config_path=path), path
    root.setLevel(level)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_daemon_reload_applies_live_keys_everywhere(daemon: tuple[Daemon, Path]) -> None:
    d, path = daemon
    running = d.config
    _edit(
        path,
        "upstream_timeout = 1.5",
        "upstream_timeout = 4.0\nmax_connections = 7\n"
        "max_connections_per_source = 3\nmax_message_size = 2000\ninvite_rate_per_source = 5.0",
    )
    _edit(path, 'level = "debug"', 'level = "warning"')
    _edit(path, "port = 0", "port = 9999")  # [metrics]: needs a restart
    result = d.reload_config()
    assert [c["key"] for c in result["restart"]] == ["metrics.port"]
    assert {c["key"] for c in result["live"]} == {
        "proxy.upstream_timeout", "proxy.max_connections", "proxy.max_connections_per_source",
        "proxy.max_message_size", "proxy.invite_rate_per_source", "log.level",
    }  # fmt: skip
    assert d.core.config is d.config and d.config.upstream_timeout == 4.0
    assert d.config.metrics_port == running.metrics_port == 0
    assert (d.endpoint.max_connections, d.endpoint.max_connections_per_source) == (7, 3)
    assert d.endpoint.limits.max_message_size == 2000
    assert d.core.limiter.rate == 5.0
    assert logging.getLogger().level == logging.WARNING
    assert d.reload_config()["live"] == []  # nothing new the second time


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("provider_timeout = 1.0", "provider_timeout = 1.0\nupstream_timout = 2.0",
         "unknown key(s) upstream_timout in [proxy]"),
        ('level = "debug"', 'level = "loud"', "log.level = 'loud' is invalid"),
        ("[timers]", '[emergency]\nnumbers = ["9x1"]\n\n[timers]', "emergency.numbers"),
    ],
)  # fmt: skip
def test_daemon_reload_of_a_bad_file_keeps_every_setting(
    daemon: tuple[Daemon, Path], old: str, new: str, needle: str, caplog: pytest.LogCaptureFixture
) -> None:
    d, path = daemon
    running, endpoint_limits = d.config, d.endpoint.limits
    # Valid changes, and the error: none of them may apply.
    _edit(path, "upstream_timeout = 1.5", "upstream_timeout = 4.0\nmax_message_size = 2000")
    _edit(path, old, new)
    with caplog.at_level(logging.ERROR, "clearip.daemon"), pytest.raises(ConfigError) as error:
        d.reload_config()
    assert needle in str(error.value)
    assert needle in caplog.text and "reload refused" in caplog.text
    assert d.config is running and d.core.config is running
    assert d.endpoint.limits is endpoint_limits


def test_a_bad_trust_file_keeps_every_setting(daemon: tuple[Daemon, Path], tmp_path: Path) -> None:
    d, path = daemon
    running = d.config
    _edit(path, "upstream_timeout = 1.5", "upstream_timeout = 4.0")
    (tmp_path / "trust.toml").write_text('[[source]]\ncidr = "10.0.0.1/8"\nrole = "switch"\n')
    with pytest.raises(ValueError, match=r"proxy\.trust_file: .*host bits"):
        d.reload_config()
    assert d.config is running and d.core.config is running and len(d.trust) == 3


def test_apply_logging_touches_only_its_own_handler() -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    other = logging.StreamHandler()
    mine = logging.StreamHandler()
    mine.set_name("clearip")
    root.handlers[:] = [other, mine]
    try:
        apply_logging("error", "json")
        assert root.level == logging.ERROR
        assert type(mine.formatter).__name__ == "JsonFormatter"
        assert other.formatter is None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
