"""The ClearIP emulator: a SIP redirect server that stands in for ClearIP in labs and tests.

It decides each INVITE by rules (:mod:`rules`, read from a file by :mod:`rules_toml`), signs
SHAKEN PASSporTs (:mod:`passport`), builds ClearIP-shaped responses (:mod:`responses`) and
serves them over UDP, TCP and TLS on the project's own SIP stack (:mod:`server`).
``clearip-proxy emulate`` runs it (:mod:`cli`); from another asyncio program use
:func:`start_emulator` or :func:`run_emulator` with an :class:`EmulatorConfig` (see
:mod:`server`).

The names below are imported on first use, so ``clearip.relay.labkit.emulator.passport`` (which the
proxy may use for its call log) does not pull in the server, the transport or the rules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clearip.relay.labkit.emulator.config import EmulatorConfig, config_from_data, load_config
    from clearip.relay.labkit.emulator.rules import Decision, Rule, RulesError, RuleSet
    from clearip.relay.labkit.emulator.rules_toml import DEFAULT_RULES, load_rules, rules_from_data
    from clearip.relay.labkit.emulator.server import Emulator, run_emulator, start_emulator

_EXPORTS = {
    "EmulatorConfig": "config",
    "config_from_data": "config",
    "load_config": "config",
    "DEFAULT_RULES": "rules_toml",
    "Decision": "rules",
    "Rule": "rules",
    "RuleSet": "rules",
    "RulesError": "rules",
    "load_rules": "rules_toml",
    "rules_from_data": "rules_toml",
    "Emulator": "server",
    "run_emulator": "server",
    "start_emulator": "server",
}

__all__ = [
    "DEFAULT_RULES",
    "Decision",
    "Emulator",
    "EmulatorConfig",
    "Rule",
    "RuleSet",
    "RulesError",
    "config_from_data",
    "load_config",
    "load_rules",
    "rules_from_data",
    "run_emulator",
    "start_emulator",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
