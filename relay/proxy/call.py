"""One INVITE's life in the proxy: the record the core keeps while a call is being set up.

Phases::

    CLEARIP  --302-->  ROUTING  --2xx / final / all tried-->  DONE
       |  \\--other final, timeout, upstream down, CANCEL--------> DONE
       \\--(emergency: skips CLEARIP and starts in ROUTING)

The record exists only until the INVITE has its final response; in-dialog requests never
touch it (they are routed by Record-Route alone), so it is gone when the call is answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from clearip.relay.config import ProxyConfig
from clearip.relay.proxy.redirect import Target
from clearip.relay.shaken import attestation_of
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction.matching import TransactionKey
from clearip.relay.transport.peer import Peer
from clearip.relay.trust import Role


class Phase(Enum):
    CLEARIP = "clearip"
    ROUTING = "routing"
    DONE = "done"


@dataclass(slots=True)
class Branch:
    """One attempt at one destination."""

    target: Target
    request: Request
    peer: Peer
    txn_key: TransactionKey | None = None
    status: int | None = None
    provisional: bool = False
    abandoned: bool = False
    cancelled: bool = False
    outcome: str = ""


@dataclass(slots=True)
class ProxyCall:
    id: int
    request: Request  # as received from the switch or provider (Via already stamped)
    source: Peer
    role: Role
    started: float
    server_key: TransactionKey
    # The config when the INVITE arrived: every later decision for this call reads it, so a
    # reload never changes a call halfway (timeouts, routing, copied headers, timers).
    config: ProxyConfig
    phase: Phase = Phase.CLEARIP
    emergency: bool = False
    upstream_key: TransactionKey | None = None
    upstream_peer: Peer | None = None
    upstream_provisional: bool = False
    clearip_status: int | None = None
    clearip_latency: float | None = None
    identity: str | None = None  # the Identity header copied from the 302
    copied: tuple[tuple[str, str], ...] = ()
    targets: list[Target] = field(default_factory=list)
    branches: list[Branch] = field(default_factory=list)
    finals: list[Response] = field(default_factory=list)
    early_sent: bool = False
    cancelled: bool = False
    final_status: int | None = None
    note: str = ""

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
