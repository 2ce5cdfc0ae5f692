"""How the config reader takes typed values out of one TOML table, and says what is wrong.

Rules: every value is read through a :class:`TableReader`, which records the key as used; a
value of the wrong type raises :class:`~clearip.relay.config.ConfigError` naming the full key
(``upstream.outbound.ca_file``), the bad value and the fix (the ``hint``). A table's reader
ends with :meth:`TableReader.finish`, which refuses any key nobody asked for, so a misspelt
key is an error rather than a silently ignored line. Checks that go beyond the type (ranges,
choices, files that must exist) are made by the section readers (``config_sections``) with
the helpers below, in the same words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clearip.relay.config import ConfigError


class TableReader:
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


def sub_table(data: dict[str, Any], name: str) -> dict[str, Any]:
    """``data[name]`` as a table (absent: empty, so every key takes its default)."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table, not {type(value).__name__}")
    return value


def port_number(value: int, key: str) -> int:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key} = {value} is invalid: use a port number from 1 to 65535")
    return value


def require_file(key: str, path: str) -> None:
    """A path the daemon will open (certificate, key, CA bundle) must name a file here."""
    if path and not Path(path).is_file():
        raise ConfigError(f"{key} = {path!r}: file not found")
