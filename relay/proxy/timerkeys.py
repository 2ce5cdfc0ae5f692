"""The keys of the core's timers: which transaction or call a timer belongs to, and which timer.

The core starts and cancels timers by key (``effects.StartTimer``, ``effects.CancelTimer``);
the shell keeps one timer per key (``relay/service/timerwheel.py``) and gives the key back to
``ProxyCore.on_timer`` when it is due. Three kinds:

- :class:`TxTimerKey`: a SIP transaction's own timer (A, B, D, ... by its letter), handed back
  to that transaction.
- :class:`CallTimerKey`: one of the proxy's timers for a call (:data:`UPSTREAM`: ClearIP's
  deadline; :data:`PROVIDER`: a destination's deadline for a first answer and
  :data:`TIMER_C`: how long it may ring, both per branch, ``index``; :data:`CANCEL_GUARD`: how
  long the branches may take to answer the caller's CANCEL).
- :class:`ReapTimerKey`: forget a client transaction of a finished call that never got its
  final (a destination that rang and then ignored our CANCEL).

Rules of this module:

- Keys are immutable values: two keys with equal fields name the same timer, so a key made
  again cancels (or restarts) the timer started with another.
- Which call timer is an int (:data:`UPSTREAM` ...), not a string or an Enum: it is compared and
  hashed in C. Each key computes its hash once, when made; the timer wheel hashes it several
  times.
- Compiled classes with a written ``__init__``, ``__eq__`` and ``__hash__``, not dataclasses,
  tuples or NamedTuples (see ``clearip.relay.sip.record``): a key is made per timer started or
  stopped, several per message.
"""

from __future__ import annotations

from typing import Final, final

from clearip.relay.sip.transaction.matching import TransactionKey

#: Which call timer a :class:`CallTimerKey` names (its ``what``).
UPSTREAM: Final = 0
PROVIDER: Final = 1
TIMER_C: Final = 2
CANCEL_GUARD: Final = 3
#: Their names, by number (for reading keys, in reprs and logs).
CALL_TIMER_NAMES: Final = ("upstream", "provider", "timer-c", "cancel-guard")


@final
class TxTimerKey:
    """Timer ``name`` (a letter, ``sip.transaction.timers``) of the transaction ``txn``."""

    __slots__ = ("_hash", "name", "txn")

    def __init__(self, txn: TransactionKey, name: str) -> None:
        self.txn: Final = txn
        self.name: Final = name
        self._hash: Final = hash(txn) ^ hash(name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TxTimerKey) and self.name == other.name and self.txn == other.txn

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"TxTimerKey({self.txn!r}, {self.name!r})"


@final
class CallTimerKey:
    """Call timer ``what`` (:data:`UPSTREAM` ...) of the call ``call_id``; ``index``: the branch
    a per-branch timer (:data:`PROVIDER`, :data:`TIMER_C`) is for, -1 for the others."""

    __slots__ = ("_hash", "call_id", "index", "what")

    def __init__(self, call_id: int, what: int, index: int = -1) -> None:
        self.call_id: Final = call_id
        self.what: Final = what
        self.index: Final = index
        # Collisions (a branch index past 63) cost an equality check, nothing else.
        self._hash: Final = hash(call_id * 256 + what * 64 + index + 1)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CallTimerKey)
            and self.call_id == other.call_id
            and self.what == other.what
            and self.index == other.index
        )

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        index = f", {self.index}" if self.index >= 0 else ""
        return f"CallTimerKey({self.call_id}, {CALL_TIMER_NAMES[self.what]}{index})"


@final
class ReapTimerKey:
    """When to forget the client transaction ``txn`` if it is still waiting for a final."""

    __slots__ = ("_hash", "txn")

    def __init__(self, txn: TransactionKey) -> None:
        self.txn: Final = txn
        self._hash: Final = hash(txn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReapTimerKey) and self.txn == other.txn

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"ReapTimerKey({self.txn!r})"


TimerKey = TxTimerKey | CallTimerKey | ReapTimerKey
