"""What a request must pass before the core spends anything on it: the request checks of RFC
3261 §16.3 and the proxy's own protection. Plain functions: each reads what it is given and
returns why the request is refused (a :class:`Refusal`, or a reason for a 400), or None to let
it in; the caller answers and counts.

The checks, in the order the core makes them:

1. Well-formed (every request but ACK and CANCEL, :func:`malformed`): Via, From, To, Call-ID
   and CSeq present, the last four once each, one Content-Length (or copies that agree): 400.
2. Load (a new INVITE, never an emergency call, :func:`overloaded`): what we read now waited
   longer than ``overload_queue_delay`` in the socket queue (503 Overloaded, Retry-After 1:
   the switch routes the call directly instead of every call timing out in our queue);
   ``max_transactions`` INVITEs in progress (503, Retry-After 5); the source is over its
   ``invite_rate_per_source`` (503 Rate Limit Exceeded, Retry-After 1). Before any state is
   made for the call.
3. Hops (a new INVITE, once its Via is stamped, :func:`hops_refusal`): Max-Forwards 0 (483);
   a loop, the request came back with one of our Vias carrying its own loop hash (482,
   §16.3 step 4).

The rate limiter keeps its buckets itself (:mod:`ratelimit`); nothing else here has state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

from clearip.relay.config import ProxyConfig
from clearip.relay.proxy.ratelimit import RateLimiter
from clearip.relay.proxy.routing import STATEFUL_PREFIX, Locality
from clearip.relay.sip.message import Request
from clearip.relay.sip.parser import content_length_conflict
from clearip.relay.sip.via import parse_via


@final
class Refusal:
    """A request turned away: our reply's ``status``, ``reason`` and Retry-After (""), the
    ``counter`` it adds one to, and the ``label`` of ``clearip_calls`` (its ``reason``)."""

    __slots__ = ("counter", "label", "reason", "retry_after", "status")

    def __init__(
        self, status: int, reason: str, counter: str, label: str, retry_after: str = ""
    ) -> None:
        self.status: Final = status
        self.reason: Final = reason
        self.counter: Final = counter
        self.label: Final = label
        self.retry_after: Final = retry_after


OVERLOADED: Final = Refusal(503, "Overloaded", "overload_shed", "overload", "1")
TOO_MANY_TRANSACTIONS: Final = Refusal(
    503, "Overloaded", "overload_rejected", "max-transactions", "5"
)
RATE_LIMITED: Final = Refusal(503, "Rate Limit Exceeded", "rate_limited", "rate-limit", "1")
TOO_MANY_HOPS: Final = Refusal(483, "Too Many Hops", "too_many_hops", "too-many-hops")
LOOP_DETECTED: Final = Refusal(482, "Loop Detected", "loop_detected", "loop")

_COUNTED: Final = frozenset(("via", "from", "to", "call-id", "cseq", "content-length"))
_REQUIRED: Final = ("via", "from", "to", "call-id", "cseq")
_SINGLE: Final = ("from", "to", "call-id", "cseq")


def malformed(request: Request) -> str | None:
    """Why ``request`` gets a 400 (the reason phrase), or None when it may go on."""
    seen: dict[str, int] = {}  # one pass over the headers for every check below
    for header in request.headers:
        key = header[1]
        if key in _COUNTED:
            seen[key] = seen.get(key, 0) + 1
    missing = [h for h in _REQUIRED if h not in seen]
    if missing:
        return f"Missing {', '.join(missing).title()}"
    for key in _SINGLE:
        if seen[key] > 1:
            return f"Multiple {key.title()} values"
    if seen.get("content-length", 0) > 1 and content_length_conflict(request):
        return "Conflicting Content-Length"
    return None


def overloaded(
    config: ProxyConfig,
    *,
    queue_delay: Callable[[], float],
    transactions: int,
    limiter: RateLimiter,
    source: str,
    clock: Callable[[], float],
) -> Refusal | None:
    """Whether a new INVITE from ``source`` is turned away to protect the proxy (check 2):
    ``queue_delay()`` is how long it waited to be read, ``transactions`` how many INVITEs are
    in progress. Consumes one of the source's tokens when it passes."""
    shed_after = config.overload_queue_delay
    if shed_after and queue_delay() > shed_after:
        return OVERLOADED
    if transactions >= config.max_transactions:
        return TOO_MANY_TRANSACTIONS
    if not limiter.allow(source, clock()):
        return RATE_LIMITED
    return None


def hops_exhausted(request: Request) -> bool:
    """Max-Forwards is 0: the request may go no further (483, §16.3 step 3)."""
    max_forwards = request.get("max-forwards")
    return max_forwards is not None and max_forwards.strip() == "0"


def hops_refusal(request: Request, loop: str, locality: Locality) -> Refusal | None:
    """Whether a new INVITE is out of hops or looping (check 3); ``loop`` is its
    ``routing.loop_hash``."""
    if hops_exhausted(request):
        return TOO_MANY_HOPS
    if is_loop(request, loop, locality):
        return LOOP_DETECTED
    return None


def is_loop(request: Request, expected: str, locality: Locality) -> bool:
    """Whether one of our Vias below the top carries ``expected``, the request's
    :func:`routing.loop_hash` (§16.3 step 4). Only Vias with our branch prefix are parsed."""
    for value in request.get_all("via")[1:]:
        if STATEFUL_PREFIX not in value:
            continue
        via = parse_via(value)
        branch = via.branch or ""
        if branch.startswith(STATEFUL_PREFIX) and locality.via_is_us(via):
            if branch[len(STATEFUL_PREFIX) :].split(".", 1)[0] == expected:
                return True
    return False
