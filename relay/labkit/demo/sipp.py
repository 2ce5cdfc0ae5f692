"""The SIPp calls the keep-running demo offers a newcomer, and the command line of each.

Rules: every printed line must succeed as pasted, so each call has its own scenario shipped
as package data (scenarios/*.xml) that expects what the demo's proxy really does; SIPp's
built-in ``uac`` does not (it ignores Record-Route, so its BYE gets 404, and it counts the
911 call's expected 503 as a failure). ``-m 1`` makes SIPp exit after the one call, with
status 0 only if the call went as its scenario says. No ``-p``: SIPp takes the first free port
from 5060 up, and the demo trusts the switch by address (127.0.0.1), not by port.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

from clearip.relay.transport.peer import Peer


@dataclass(frozen=True)
class SippCall:
    scenario: str  # a file name under scenarios/
    number: str
    shows: str  # what the call should show, one plain sentence


# Both are placed by the switch. The demo configures no emergency route, so a 911 call gets
# the proxy's 503 (the switch's cue to take its direct PSAP route); with an emergency route
# the proxy would forward it there instead and this scenario would not match.
SIPP_CALLS = (
    SippCall(
        "switch-call.xml",
        "12125550100",
        "1 successful call: INVITE -> 302 -> provider A -> 200, BYE through the proxy.",
    ),
    SippCall(
        "switch-911.xml",
        "911",
        "1 successful call: 911 bypasses ClearIP; the proxy answers 503 so the switch "
        "takes its direct PSAP route.",
    ),
)


def scenario_file(name: str) -> Traversable:
    """A shipped scenario file (use ``importlib.resources.as_file`` for a path to give SIPp)."""
    return resources.files("clearip.relay.labkit.demo") / "scenarios" / name


def command(call: SippCall, scenario_path: str, *, switch: str, proxy: Peer) -> str:
    """The line to paste: the switch's address as SIPp's source, the proxy as its target."""
    return shlex.join(
        [
            "sipp",
            *("-sf", scenario_path),
            *("-s", call.number),
            *("-i", switch),
            *("-m", "1"),
            f"{proxy.host}:{proxy.port}",
        ]
    )
