"""Is ClearIP alive, and when to try again: the upstream link's state machine, without I/O.

The rules (issue #15):

- A stream link (TLS, TCP) is up once its connection opens. Every ``interval`` it sends an
  RFC 5626 ping; proof of life must follow within ``timeout``: the pong, or any byte at all (a
  busy ClearIP that answers calls is alive). Without it the link is down at once: its connection
  is closed, the calls waiting on it fail open, and a new connection is tried straight away.
- A datagram link (UDP) is probed with OPTIONS every ``interval``; any response proves life. It
  is down after :data:`PROBE_MISSES` unanswered probes in a row and up again at the next answer.
  At start it is up on the first answer, and down if that first probe goes unanswered.
- Trying again: a short back-off with jitter (:data:`BACKOFF_START` doubling to
  :data:`BACKOFF_CAP`, ±:data:`JITTER`), so the link is back about a second after ClearIP
  accepts again however long the outage was. A refused connection is cheap and follows that
  back-off; a failed TLS handshake (ClearIP answers but will not talk to us) waits the full cap;
  a connect that timed out has waited long enough and goes again at once. A call finding the
  link down *kicks* it: an attempt now, unless one is in flight. Whatever the trigger, attempts
  start at least :data:`MIN_GAP` apart, so ClearIP never sees more than five a second.

Like the transaction machines (:mod:`clearip.relay.sip.transaction.base`), each machine has a
table ``(state, event) -> (next state, effect)``: the state moves before the effect runs, and a
pair not in the table is ignored, so a late timer or a stray answer needs no code. Time comes in
as an argument and jitter from an injected :class:`random.Random`; the caller (the asyncio
shell, :mod:`clearip.relay.service.upstream`) performs the actions and feeds back what happens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

BACKOFF_START = 0.2
BACKOFF_CAP = 1.0
JITTER = 0.25
MIN_GAP = 0.2  # seconds between the starts of two attempts, whatever triggered them
STABLE_AFTER = 1.0  # a connection lost after being up this long is retried at once
PROBE_MISSES = 2

# Timer names.
PING = "ping"  # the next keep-alive is due (datagram links: also the next probe while down)
ANSWER = "answer"  # the keep-alive sent last must have been answered by now
RETRY = "retry"  # the next connection attempt (stream links)

# Why an attempt failed (see the module docstring for what each costs).
REFUSED, TLS, TIMEOUT, OTHER = "refused", "tls", "timeout", "other"


class LinkState(Enum):
    CONNECTING = "connecting"  # first attempt or first probe in flight, or a reconnect in flight
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a connection to ClearIP; report :meth:`StreamLiveness.connected` or ``failed``."""


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send a keep-alive now: a CRLFCRLF ping on the connection, or an OPTIONS probe."""


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Start (or restart) the named timer; when it fires call :meth:`Liveness.on_timer`."""

    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class StopTimer:
    name: str


@dataclass(frozen=True, slots=True)
class Up:
    """The link is usable. ``down_for``/``attempts``: how long it was not (since start, the
    first time) and how many tries that took."""

    down_for: float
    attempts: int
    first: bool


@dataclass(frozen=True, slots=True)
class Down:
    """The link is not usable: close its connection, fail open the calls waiting on it.
    ``keepalive``: declared down for want of an answer (not a lost connection)."""

    reason: str
    keepalive: bool


Action = Connect | SendPing | StartTimer | StopTimer | Up | Down

EVENTS = frozenset(
    {
        "connected",  # the connection opened
        "failed",  # the connection attempt failed
        "lost",  # the connection closed
        "ping_due",
        "pong",  # proof of life after the keep-alive (or, while not up, at all)
        "miss",  # a keep-alive unanswered, tolerated
        "timeout",  # a keep-alive unanswered, the last one tolerated
        "retry_due",
        "kick",  # a call needs the link now
        "kick_early",  # ...but the last attempt started less than MIN_GAP ago
    }
)


class Liveness:
    """What both machines share: the table interpreter, timers, keep-alive cycle, back-off."""

    TABLE: ClassVar[dict[tuple[LinkState, str], tuple[LinkState, str]]] = {}
    MISSES: ClassVar[int] = 1  # unanswered keep-alives in a row that make the link down
    RETRY_TIMER: ClassVar[str] = RETRY  # the timer a kick brings forward

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for (_, event), (_, effect) in cls.TABLE.items():
            if event not in EVENTS:
                raise TypeError(f"{cls.__name__}.TABLE: unknown event {event!r}")
            if not callable(getattr(cls, effect, None)):
                raise TypeError(f"{cls.__name__}.TABLE: no effect method {effect!r}")

    def __init__(
        self,
        *,
        interval: float,
        timeout: float,
        rng: random.Random | None = None,
        backoff_start: float = BACKOFF_START,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.state = LinkState.CONNECTING
        self.now = 0.0
        self.ping_at: float | None = None  # when the latest keep-alive went out
        self.awaiting = False  # ...and it is not answered yet
        self.misses = 0
        self.attempt_at = -math.inf  # when the latest attempt started
        self.attempts = 0  # attempts since the link was last up (or since start)
        self.down_since = 0.0
        self.up_since = 0.0
        self.was_up = False
        self.failure = OTHER  # the kind of the latest failed attempt
        self.retry_at = math.inf
        self.backoff = backoff_start  # the next back-off before jitter (grows to the cap)
        self._running: set[str] = set()

    # -- events in -----------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        raise NotImplementedError

    def proof(self, now: float, at: float | None = None) -> list[Action]:
        """ClearIP showed it is alive at ``at`` (default: now): a pong, any byte, an answer."""
        self.now = now
        at = now if at is None else at
        if self.awaiting and self.ping_at is not None and at >= self.ping_at:
            return self._fire("pong")
        if self.state is not LinkState.UP:
            return self._fire("pong")  # a late answer still shows ClearIP is back
        return []

    def on_timer(self, name: str, now: float) -> list[Action]:
        """A timer this machine started has fired (one not running: no actions)."""
        if name not in self._running:
            return []
        self._running.discard(name)
        self.now = now
        if name == PING:
            return self._fire("ping_due")
        if name == RETRY:
            return self._fire("retry_due")
        self.awaiting = False
        self.misses += 1
        last = self.misses >= self.MISSES or self.state is not LinkState.UP
        return self._fire("timeout" if last else "miss")

    def kick(self, now: float) -> list[Action]:
        """A call found the link down: try now if nothing is in flight (cheap when not down)."""
        if self.state is not LinkState.DOWN or self.awaiting:
            return []
        self.now = now
        return self._fire("kick" if now >= self.attempt_at + MIN_GAP else "kick_early")

    # -- the interpreter -----------------------------------------------------------------------
    def _fire(self, event: str) -> list[Action]:
        entry = self.TABLE.get((self.state, event))
        if entry is None:
            return []
        self.state, effect = entry
        actions: list[Action] = getattr(self, effect)()
        return actions

    def _start_timer(self, name: str, delay: float) -> list[Action]:
        self._running.add(name)
        if name == self.RETRY_TIMER:
            self.retry_at = self.now + delay
        return [StartTimer(name, delay)]

    def _stop_timers(self, *names: str) -> list[Action]:
        """Stop these timers (all running ones when none are named)."""
        stopping = sorted(self._running.intersection(names) if names else self._running)
        self._running.difference_update(stopping)
        return [StopTimer(name) for name in stopping]

    def _next_ping(self) -> float:
        """Keep-alives go out every ``interval`` (later only if the previous one took longer)."""
        if self.ping_at is None:
            return self.interval
        return max(0.0, self.ping_at + self.interval - self.now)

    def _backoff(self) -> float:
        """The wait before the next attempt, after a failed one of kind ``self.failure``."""
        if self.failure == TIMEOUT:
            base = 0.0
        elif self.failure == TLS:
            base = self.backoff_cap
        else:
            base = self.backoff
            self.backoff = min(self.backoff_cap, base * 2)
        delay = base * (1.0 + self.rng.uniform(-JITTER, JITTER))
        return max(delay, self.attempt_at + MIN_GAP - self.now)

    def _soonest(self) -> float:
        """The earliest an attempt may start: ``MIN_GAP`` after the previous one."""
        return max(0.0, self.attempt_at + MIN_GAP - self.now)

    # -- effects shared by both machines -------------------------------------------------------
    def _came_up(self) -> list[Action]:
        up = Up(self.now - self.down_since, self.attempts, not self.was_up)
        self.was_up = True
        self.up_since = self.now
        self.attempts = 0
        self.misses = 0
        self.awaiting = False
        return [*self._stop_timers(), up, *self._start_timer(PING, self._next_ping())]

    def _ping(self) -> list[Action]:
        self.ping_at = self.now
        self.awaiting = True
        return [SendPing(), *self._start_timer(ANSWER, self.timeout)]

    def _answered(self) -> list[Action]:
        self.awaiting = False
        self.misses = 0
        return [*self._stop_timers(ANSWER), *self._start_timer(PING, self._next_ping())]

    def _unanswered(self) -> list[Action]:
        return self._start_timer(PING, self._next_ping())

    def _went_down(self, reason: str, keepalive: bool) -> list[Action]:
        if self.was_up:
            self.down_since = self.now
        self.awaiting = False
        self.misses = 0
        return [*self._stop_timers(), Down(reason, keepalive)]

    def _retry_sooner(self) -> list[Action]:
        """A kick too soon after the last attempt: bring the next one forward to the gap."""
        soonest = self._soonest()
        if self.RETRY_TIMER in self._running and self.now + soonest >= self.retry_at:
            return []
        return self._start_timer(self.RETRY_TIMER, soonest)


_C, _U, _D = LinkState.CONNECTING, LinkState.UP, LinkState.DOWN


class StreamLiveness(Liveness):
    """A TLS/TCP link: up while its connection is open and answers keep-alives."""

    TABLE: ClassVar[dict[tuple[LinkState, str], tuple[LinkState, str]]] = {
        (_C, "connected"): (_U, "_came_up"),
        (_C, "failed"): (_D, "_retry_later"),
        (_U, "ping_due"): (_U, "_ping"),
        (_U, "pong"): (_U, "_answered"),
        (_U, "timeout"): (_D, "_dead"),
        (_U, "lost"): (_D, "_lost"),
        (_D, "retry_due"): (_C, "_connect"),
        (_D, "kick"): (_C, "_connect"),
        (_D, "kick_early"): (_D, "_retry_sooner"),
    }

    def start(self, now: float) -> list[Action]:
        self.now = self.down_since = now
        return self._connect()

    def connected(self, now: float) -> list[Action]:
        self.now = now
        return self._fire("connected")

    def failed(self, now: float, kind: str) -> list[Action]:
        """The attempt failed: ``kind`` is REFUSED, TLS, TIMEOUT or OTHER."""
        self.now = now
        self.failure = kind
        return self._fire("failed")

    def lost(self, now: float) -> list[Action]:
        """The link's connection closed (by ClearIP, the network, or a write that stalled)."""
        self.now = now
        return self._fire("lost")

    def _connect(self) -> list[Action]:
        self.attempt_at = self.now
        self.attempts += 1
        self.ping_at = None
        return [*self._stop_timers(), Connect()]

    def _retry_later(self) -> list[Action]:
        return self._start_timer(RETRY, self._backoff())

    def _dead(self) -> list[Action]:
        self.backoff = self.backoff_start  # it was up for a whole keep-alive cycle
        actions = self._went_down(f"no keep-alive answer within {self.timeout:g} s", True)
        return actions + self._start_timer(RETRY, self._soonest())

    def _lost(self) -> list[Action]:
        # Up a while (ClearIP restarted, a reset): reconnect at once, since every call arriving
        # meanwhile fails open. Lost right after connecting: the back-off goes on growing (it
        # is only reset by a connection that lasted), so a server that accepts and drops at
        # once is not hammered.
        actions = self._went_down("connection lost", False)
        if self.now - self.up_since >= STABLE_AFTER:
            self.backoff = self.backoff_start
            return actions + self._start_timer(RETRY, self._soonest())
        self.failure = OTHER
        return actions + self._start_timer(RETRY, self._backoff())


class ProbeLiveness(Liveness):
    """A UDP link: up while ClearIP answers OPTIONS probes."""

    MISSES: ClassVar[int] = PROBE_MISSES
    RETRY_TIMER: ClassVar[str] = PING

    TABLE: ClassVar[dict[tuple[LinkState, str], tuple[LinkState, str]]] = {
        (_C, "pong"): (_U, "_came_up"),
        (_C, "timeout"): (_D, "_dead"),
        (_U, "ping_due"): (_U, "_probe"),
        (_U, "pong"): (_U, "_answered"),
        (_U, "miss"): (_U, "_unanswered"),
        (_U, "timeout"): (_D, "_dead"),
        (_D, "ping_due"): (_D, "_probe"),
        (_D, "pong"): (_U, "_came_up"),
        (_D, "timeout"): (_D, "_unanswered"),
        (_D, "kick"): (_D, "_probe"),
        (_D, "kick_early"): (_D, "_retry_sooner"),
    }

    def start(self, now: float) -> list[Action]:
        self.now = self.down_since = now
        return self._probe()

    def _probe(self) -> list[Action]:
        if self.state is not LinkState.UP:
            self.attempts += 1
        self.attempt_at = self.now
        return [*self._stop_timers(PING), *self._ping()]

    def _dead(self) -> list[Action]:
        reason = f"no answer to {self.misses} OPTIONS probe(s) within {self.timeout:g} s each"
        return self._went_down(reason, True) + self._unanswered()
