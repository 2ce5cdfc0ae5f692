"""Configuration: defaults are the seed's behaviour; every error names key, value and fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from clearip.relay.config import ConfigError, ProxyConfig, load_config
from clearip.relay.config_toml import config_from_data

PACKAGED = Path(__file__).resolve().parents[1] / "relay" / "data" / "proxy.toml"


def test_packaged_default_equals_built_in_defaults() -> None:
    config = load_config(PACKAGED)
    assert config == ProxyConfig()
    assert config.upstream_timeout == 5.0
    assert config.outbound.uri == "sip:sip.clearip.com:5061;transport=tls"
    assert config.outbound.transport == "tls" and config.outbound.port == 5061
    assert config.inbound == config.outbound
    assert config.emergency_numbers == ("911", "933")
    assert config.route_advance_codes == {408, 500, 502, 503, 504}


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"proxy": {"upstream_timeout": -1}}, ["proxy.upstream_timeout", "-1", "seconds"]),
        ({"proxy": {"upstream_timout": 3}}, ["upstream_timout", "spelling"]),
        ({"proxy": {"route_advance_codes": [200]}}, ["route_advance_codes", "300-699"]),
        ({"listen": [{"transport": "sctp"}]}, ["listen[0].transport", "sctp", "udp, tcp or tls"]),
        ({"listen": [{"transport": "tls"}]}, ["listen[0].certificate", "missing"]),
        ({"listen": [{"port": 70000}]}, ["listen[0].port", "70000", "1 to 65535"]),
        (
            {"upstream": {"outbound": {"uri": "http://x"}}},
            ["upstream.outbound.uri", "transport=tls"],
        ),
        ({"upstream": {"outbound": {"ca_file": "/nonexistent.pem"}}}, ["ca_file", "not found"]),
        ({"emergency": {"numbers": ["9-1-1x"]}}, ["emergency.numbers", "digits"]),
        ({"emergency": {"route": "tel:911"}}, ["emergency.route"]),
        ({"xdp": {"mode": "fast"}}, ["xdp.mode", "auto, native or generic"]),
        ({"log": {"level": "loud"}}, ["log.level", "loud"]),
        ({"colour": {}}, ["colour"]),
    ],
)
def test_errors_name_key_value_and_fix(data: dict[str, object], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_data(data)
    for needle in needles:
        assert needle in str(info.value)


def test_inbound_upstream_inherits_outbound() -> None:
    config = config_from_data(
        {"upstream": {"outbound": {"uri": "sip:10.0.0.1:5060;transport=tcp", "verify": False}}}
    )
    assert config.inbound.uri == "sip:10.0.0.1:5060;transport=tcp"
    assert config.outbound.transport == "tcp"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clearip.relay.cli", *args], capture_output=True, text=True
    )


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    trust = tmp_path / "trust.toml"
    trust.write_text('[[source]]\ncidr = "192.0.2.10/32"\nrole = "switch"\n')
    config = tmp_path / "proxy.toml"
    config.write_text(f'[proxy]\ntrust_file = "{trust}"\n')
    result = _cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "1 entries" in result.stdout


def test_check_config_refuses_and_names_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text("[proxy]\nprovider_timeout = 0\n")
    result = _cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "proxy.provider_timeout" in result.stderr and str(config) in result.stderr


def _schema_keys() -> set[str]:
    """Every key the config reader asks for (``section.key``), from the reader itself."""
    import clearip.relay.config_reader as config_module

    seen: set[str] = set()
    finish = config_module.TableReader.finish

    def recording_finish(reader: config_module.TableReader) -> None:
        prefix = re.sub(r"\[\d+\]", "", reader.prefix)  # listen[0] -> listen
        seen.update(f"{prefix}.{name}" if prefix else name for name in reader.used)
        finish(reader)

    config_module.TableReader.finish = recording_finish  # type: ignore[method-assign]
    try:
        load_config(PACKAGED)
        config_from_data({"upstream": {"inbound": {}}})
    finally:
        config_module.TableReader.finish = finish  # type: ignore[method-assign]
    return {key for key in seen if "." in key}  # the top level holds only tables


def _documented_keys() -> set[str]:
    """``section.key`` for every key in the packaged file, commented-out examples included."""
    documented: set[str] = set()
    section = ""
    for line in PACKAGED.read_text().splitlines():
        text = line.strip().lstrip("#").strip()
        if header := re.match(r"^\[\[?([a-z_.]+)\]\]?", text):
            section = header.group(1)
        elif key := re.match(r"^([a-z_0-9]+)\s*=", text):
            documented.add(f"{section}.{key.group(1)}" if section else key.group(1))
    return documented


def test_the_packaged_config_documents_every_key_and_only_real_keys() -> None:
    schema = _schema_keys()
    # [upstream.inbound] takes the same keys as [upstream.outbound]; the file says so once.
    schema = {k.replace("upstream.inbound.", "upstream.outbound.") for k in schema}
    documented = _documented_keys()
    documented = {k.replace("upstream.inbound.", "upstream.outbound.") for k in documented}
    assert "proxy.trust_file" in schema and "xdp.pin_dir" in schema  # the reader was seen
    assert sorted(schema - documented) == [], "keys missing from relay/data/proxy.toml"
    assert sorted(documented - schema) == [], "relay/data/proxy.toml documents unknown keys"


def test_show_defaults_prints_the_packaged_config_that_the_errors_point_to(
    tmp_path: Path,
) -> None:
    shown = _cli("check-config", "--show-defaults")
    assert shown.returncode == 0, shown.stderr
    copy = tmp_path / "proxy.toml"
    copy.write_text(shown.stdout)
    assert load_config(copy) == config_from_data({})  # every key at its default
    copy.write_text("[proxy]\nprovider_timout = 5\n")
    refused = _cli("check-config", "--config", str(copy))
    assert refused.returncode == 2 and "check-config --show-defaults" in refused.stderr


def test_run_refuses_an_invalid_file(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text("[proxy\n")
    result = _cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr


def test_help_prints_usage() -> None:
    result = _cli("--help")
    assert result.returncode == 0 and "check-config" in result.stdout
