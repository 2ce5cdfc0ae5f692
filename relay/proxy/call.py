"""One INVITE's life in the proxy: the record the core keeps while a call is being set up.

Phases::

    CLEARIP  --302-->  ROUTING  --2xx / final / all tried-->  DONE
       |  \\--other final, timeout, upstream down, CANCEL--------> DONE
       \\--(emergency: skips CLEARIP and starts in ROUTING)

The record exists only until the INVITE has its final response; in-dialog requests never
touch it (they are routed by Record-Route alone), so it is gone when the call is answered.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, final

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.redirect import Target
from clearip.relay.sip.identity import attestation_of
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.peer import Peer
from clearip.relay.sip.transaction.matching import TransactionKey


class Phase(Enum):
    CLEARIP = "clearip"
    ROUTING = "routing"
    DONE = "done"


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
        "phase",
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
        self.phase = Phase.CLEARIP
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
