"""One INVITE's life in the proxy: the record the core keeps while a call is being set up.

Phases, and the events that move a call from one to the next (:data:`PHASE_TABLE`)::

    CLEARIP --redirected--> ROUTING --final--> DONE
      |  |                     ^
      |  \\--emergency---------/
      \\--final-------------------------------> DONE

- redirected: ClearIP's 302 named usable Contacts (the destinations are tried in turn);
- emergency: an emergency call with an emergency route (ClearIP is skipped);
- final: the switch's final is decided. From CLEARIP: ClearIP's final relayed, fail-open
  (slow, unreachable, link lost), the caller's CANCEL, an emergency call without a route.
  From ROUTING: a destination's 2xx, the best final once all are tried, our 408/487/503.

Rules:

- A call changes phase only through :meth:`ProxyCall.advance` with one of the events
  (:data:`REDIRECTED`, :data:`EMERGENCY`, :data:`FINAL`); ``phase`` is read-only. A pair
  (phase, event) with no row in the table is a bug in the core, not something a peer can
  cause (the core checks the phase before it decides): :class:`PhaseError` is raised.
- The table is checked when the module is imported (every event known, DONE final, every
  other phase able to end with a final), as the transactions' tables are
  (``sip.transaction.base.compile_table``); the interpreter looks up one int per change.
- A call is DONE once the switch's final is decided: from then on nothing changes its phase.

The record exists only until the INVITE has its final response; in-dialog requests never
touch it (they are routed by Record-Route alone), so it is gone when the call is answered.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final, final

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.redirect import Target
from clearip.relay.sip.identity import attestation_of
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.peer import Peer
from clearip.relay.sip.transaction.matching import TransactionKey


class Phase(Enum):
    CLEARIP = "clearip"  # waiting for ClearIP's answer (where every call starts)
    ROUTING = "routing"  # trying the destinations in turn
    DONE = "done"  # the switch's final is decided


#: What moves a call to another phase, by number (what :meth:`ProxyCall.advance` takes).
PHASE_EVENTS: Final = ("redirected", "emergency", "final")
REDIRECTED: Final = 0  # ClearIP's 302 named destinations to try
EMERGENCY: Final = 1  # an emergency call: ClearIP skipped, the emergency route tried
FINAL: Final = 2  # the final for the switch: relayed, or our own (fail-open, 408, 487...)

#: The whole life of a call: ``(phase, event) -> next phase``. Nothing else is legal.
PHASE_TABLE: Final = {
    (Phase.CLEARIP, "redirected"): Phase.ROUTING,
    (Phase.CLEARIP, "emergency"): Phase.ROUTING,
    (Phase.CLEARIP, "final"): Phase.DONE,
    (Phase.ROUTING, "final"): Phase.DONE,
}


class PhaseError(Exception):
    """A phase change :data:`PHASE_TABLE` has no row for: a bug in the core."""


_PHASES: Final = tuple(Phase)
_ROW: Final = 4  # > len(PHASE_EVENTS): a (phase, event) pair is phase number * _ROW + event


def compile_phase_table(table: dict[tuple[Phase, str], Phase]) -> dict[int, int]:
    """``table`` as :meth:`ProxyCall.advance` reads it, ``phase * _ROW + event -> next phase``
    (phases by their number in :class:`Phase`), checked: a typo or a call that could never
    end fails here, at import, rather than as a :class:`PhaseError` in a live call."""
    numbers = {phase: number for number, phase in enumerate(_PHASES)}
    compiled: dict[int, int] = {}
    for (phase, event), after in table.items():
        if event not in PHASE_EVENTS:
            raise TypeError(f"PHASE_TABLE: unknown event {event!r}")
        if phase is Phase.DONE:
            raise TypeError(f"PHASE_TABLE: a call never leaves DONE ({event!r})")
        compiled[numbers[phase] * _ROW + PHASE_EVENTS.index(event)] = numbers[after]
    for phase in _PHASES:
        if phase is not Phase.DONE and numbers[phase] * _ROW + FINAL not in compiled:
            raise TypeError(f"PHASE_TABLE: a call in {phase.name} cannot end (no 'final' row)")
    return compiled


_TABLE: Final = compile_phase_table(PHASE_TABLE)


# Plain classes with a compiled __init__, not dataclasses (see clearip.relay.sip.record).


@final
class Branch:
    """One attempt at one destination."""

    __slots__ = (
        "abandoned",
        "cancelled",
        "outcome",
        "peer",
        "provisional",
        "request",
        "status",
        "target",
        "txn_key",
    )

    def __init__(
        self,
        target: Target,
        request: Request,
        peer: Peer,
        txn_key: TransactionKey | None = None,
    ) -> None:
        self.target = target
        self.request = request
        self.peer = peer
        self.txn_key = txn_key
        self.status: int | None = None
        self.provisional = False
        self.abandoned = False
        self.cancelled = False
        self.outcome = ""


@final
class ProxyCall:
    """One INVITE being set up (see the module docstring)."""

    __slots__ = (
        "_phase",
        "branches",
        "cancelled",
        "clearip_latency",
        "clearip_status",
        "config",
        "copied",
        "early_sent",
        "emergency",
        "final_status",
        "finals",
        "id",
        "identity",
        "loop",
        "note",
        "request",
        "role",
        "server_key",
        "source",
        "started",
        "targets",
        "upstream_key",
        "upstream_peer",
        "upstream_provisional",
    )

    def __init__(  # noqa: PLR0917 (the fields in order, as the dataclass it was took them)
        self,
        id: int,
        request: Request,
        source: Peer,
        role: Role,
        started: float,
        server_key: TransactionKey,
        config: ProxyConfig,
        loop: str = "",
    ) -> None:
        self.id = id
        self.request = request  # as received from the switch or provider (Via already stamped)
        self.source = source
        self.role = role
        self.started = started
        self.server_key = server_key
        # The config when the INVITE arrived: every later decision for this call reads it, so
        # a reload never changes a call halfway (timeouts, routing, copied headers, timers).
        self.config = config
        self.loop = loop  # the request's loop_hash (§16.6 step 8), in every branch we send
        self._phase = 0  # its number in Phase: CLEARIP (see advance)
        self.emergency = False
        self.upstream_key: TransactionKey | None = None
        self.upstream_peer: Peer | None = None
        self.upstream_provisional = False
        self.clearip_status: int | None = None
        self.clearip_latency: float | None = None
        self.identity: str | None = None  # the Identity header copied from the 302
        self.copied: tuple[tuple[str, str], ...] = ()
        self.targets: list[Target] = []
        self.branches: list[Branch] = []
        self.finals: list[Response] = []
        self.early_sent = False
        self.cancelled = False
        self.final_status: int | None = None
        self.note = ""

    @property
    def phase(self) -> Phase:
        """Where the call is (changed only by :meth:`advance`)."""
        return _PHASES[self._phase]

    def advance(self, event: int) -> None:
        """The one way a call changes phase: ``event`` (:data:`REDIRECTED`, :data:`EMERGENCY`,
        :data:`FINAL`) moves it as :data:`PHASE_TABLE` says; :class:`PhaseError` when the
        table has no such move from the phase it is in."""
        after = _TABLE.get(self._phase * _ROW + event) if 0 <= event < _ROW else None
        if after is None:
            name = PHASE_EVENTS[event] if 0 <= event < len(PHASE_EVENTS) else str(event)
            raise PhaseError(f"call {self.id}: no {name!r} move from {self.phase.name}")
        self._phase = after

    @property
    def attestation(self) -> str | None:
        """The SHAKEN attestation (A/B/C) of the Identity ClearIP gave, decoded on demand."""
        return attestation_of(self.identity) if self.identity else None

    def summary(self, now: float) -> dict[str, Any]:
        req = self.request
        return {
            "call_id": req.call_id,
            "from": _short(req.get("from")),
            "to": _short(req.get("to")),
            "role": self.role.value,
            "emergency": self.emergency,
            "clearip_status": self.clearip_status,
            "clearip_ms": None
            if self.clearip_latency is None
            else round(self.clearip_latency * 1000, 1),
            "attest": self.attestation,
            "tried": [f"{b.target.uri_text}={b.outcome or b.status}" for b in self.branches],
            "final": self.final_status,
            "note": self.note,
            "total_ms": round((now - self.started) * 1000, 1),
        }


def _short(value: str | None) -> str:
    if not value:
        return ""
    start, end = value.find("<"), value.find(">")
    return value[start + 1 : end] if 0 <= start < end else value.split(";")[0].strip()


def best_response(finals: list[Response]) -> Response | None:
    """RFC 3261 §16.7 step 6: a 6xx wins; otherwise the lowest class, preferring 4xx detail."""
    if not finals:
        return None
    for response in finals:
        if 600 <= response.status < 700:
            return response
    return min(finals, key=lambda r: (r.status // 100, r.status))
