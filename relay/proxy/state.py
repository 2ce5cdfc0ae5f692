"""What the proxy core keeps between messages, and the one translation of its transactions'
actions into effects.

:class:`CoreState` is the base of ``core.ProxyCore``: what the core was given (the config, the
trust roles, the emergency numbers, our addresses, the ClearIP links, the clock), its tables
(calls being set up, client and server transactions), its counters. The other modules of this
package are plain functions that take it (and a call) and return effects; ``core.ProxyCore``
classifies what arrives and wires them together.

Rules of this module:

- No I/O and no clock of its own: time is ``clock()``, what the shell gives.
- A transaction's actions become effects here and nowhere else (:meth:`CoreState.client_effects`,
  :meth:`CoreState.server_effects`): sends and timers at once; a response, a timeout or a
  transport error for a call goes to :meth:`CoreState.on_call_event`, which ``ProxyCore``
  implements (it knows which leg of the call the transaction is).
- Tables: a call is in ``calls`` (by id) and ``by_server_key`` from its INVITE until its final
  (:meth:`CoreState.forget`); a transaction is in ``client_txns`` or ``server_txns`` until it
  terminates (or is reaped, ``core.ProxyCore.on_timer``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Final, Protocol, final

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.trust import Role
from clearip.relay.proxy.call import Phase, ProxyCall
from clearip.relay.proxy.effects import CancelTimer, Effect, Send, StartTimer
from clearip.relay.proxy.latency import LatencyHistogram
from clearip.relay.proxy.ratelimit import RateLimiter
from clearip.relay.proxy.routing import Locality
from clearip.relay.proxy.timerkeys import TxTimerKey
from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.peer import STREAM_TRANSPORTS, LocalAddress, Peer
from clearip.relay.sip.transaction import (
    ClientInviteState,
    ClientInviteTransaction,
    ClientNonInviteState,
    ClientNonInviteTransaction,
    ServerInviteTransaction,
)
from clearip.relay.sip.transaction.ack import cancel_for
from clearip.relay.sip.transaction.actions import Action, SendMessage, Terminated
from clearip.relay.sip.transaction.actions import StartTimer as TxStartTimer
from clearip.relay.sip.transaction.actions import StopTimer as TxStopTimer
from clearip.relay.sip.transaction.matching import TransactionKey, client_key_for

Transaction = ClientInviteTransaction | ClientNonInviteTransaction
#: States of our client transactions still waiting for a final response (compared by identity).
AWAITING_FINAL: Final = (
    ClientInviteState.CALLING,
    ClientInviteState.PROCEEDING,
    ClientNonInviteState.TRYING,
    ClientNonInviteState.PROCEEDING,
)
_DONE: Final = Phase.DONE  # read once: reading an Enum member from its class costs ~0.1 us
_NAMES_LIMIT: Final = 256


@final
class CounterNames:
    """Counter names with a variable part (a role, a status, a method), each formatted once
    rather than per message; bounded, since a peer chooses methods and statuses."""

    __slots__ = ("_lower", "_made", "_template")

    def __init__(self, template: str, *, lower: bool = False) -> None:
        self._template = template
        self._lower = lower  # names in lower case (a method: in_dialog_bye)
        self._made: dict[str | int, str] = {}

    def name(self, value: str | int) -> str:
        made = self._made.get(value)
        if made is None:
            made = self._template.format(
                value.lower() if self._lower and isinstance(value, str) else value
            )
            if len(self._made) < _NAMES_LIMIT:
                self._made[value] = made
        return made


class LocalFor(Protocol):
    """Our address towards a peer: for a Via (the transport the message goes on) or, with
    ``record_route``, for a Record-Route (a listener the peer can send new requests to)."""

    def __call__(self, peer: Peer, *, record_route: bool = False) -> LocalAddress: ...


def reliable(peer: Peer) -> bool:
    """``peer.reliable``, without calling the interpreted property."""
    return peer.transport in STREAM_TRANSPORTS


class CoreState:
    """See the module docstring; the arguments are ``core.ProxyCore``'s."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        role_of: Callable[[str], Role | None],
        emergency: Callable[[], EmergencyNumbers],
        locality: Locality,
        local_for: LocalFor,
        upstream: Callable[[Role], Peer | None],
        clock: Callable[[], float],
        counters: Counter[str] | None = None,
        queue_delay: Callable[[], float] = lambda: 0.0,
    ) -> None:
        # Admission: the config for new INVITEs and the proxy-wide checks (a call keeps its
        # own), the per-source rate, how long what we read now waited to be read.
        self.config = config
        self.limiter = RateLimiter(config.invite_rate_per_source)
        self.queue_delay = queue_delay
        # Who is who: a source's role on the trust list (None: not on it), the emergency
        # numbers, which addresses are ours and which to write towards a peer, the ClearIP
        # link of a role (None: down).
        self.role_of = role_of
        self.emergency = emergency
        self.locality = locality
        self.local_for = local_for
        self.upstream = upstream
        # The shell's clock, and what is measured with it.
        self.clock = clock
        self.latency = LatencyHistogram()  # ClearIP's answer times
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.calls: dict[int, ProxyCall] = {}
        self.by_server_key: dict[TransactionKey, ProxyCall] = {}
        self.client_txns: dict[TransactionKey, tuple[Transaction, Peer, ProxyCall | None]] = {}
        self.server_txns: dict[TransactionKey, tuple[ServerInviteTransaction, Peer]] = {}
        self.ids = itertools.count(1)
        self.invite_names = CounterNames("invite_{}")
        self.in_dialog_names = CounterNames("in_dialog_{}", lower=True)
        self.clearip_names = CounterNames("clearip_response_{}")
        self.call_names: dict[tuple[Role, str], CounterNames] = {}

    # -- transactions --------------------------------------------------------------------------
    def on_call_event(self, key: TransactionKey, call: ProxyCall, action: Action) -> list[Effect]:
        """A client transaction of ``call`` delivered a response, timed out or could not send
        (``action``): the call's business. ``core.ProxyCore`` implements it."""
        raise NotImplementedError

    def client_effects(
        self, key: TransactionKey, actions: list[Action], peer: Peer, call: ProxyCall | None
    ) -> list[Effect]:
        """The actions of the client transaction ``key`` (towards ``peer``; for ``call``, or
        None for a CANCEL) as effects."""
        return self._effects(key, actions, peer, call, False)

    def server_effects(
        self, key: TransactionKey, actions: list[Action], peer: Peer
    ) -> list[Effect]:
        """The actions of the INVITE server transaction ``key`` (to the switch) as effects."""
        return self._effects(key, actions, peer, None, True)

    def _effects(
        self,
        key: TransactionKey,
        actions: list[Action],
        peer: Peer,
        call: ProxyCall | None,
        server: bool,
    ) -> list[Effect]:
        effects: list[Effect] = []
        for action in actions:
            if isinstance(action, SendMessage):
                effects.append(Send(action.message, peer))
            elif isinstance(action, TxStartTimer):
                effects.append(StartTimer(TxTimerKey(key, action.name), action.delay))
            elif isinstance(action, TxStopTimer):
                effects.append(CancelTimer(TxTimerKey(key, action.name)))
            elif isinstance(action, Terminated):
                if server:
                    self._server_terminated(key)
                else:
                    self.client_txns.pop(key, None)
            elif call is not None:
                effects += self.on_call_event(key, call, action)
        return effects

    def _server_terminated(self, key: TransactionKey) -> None:
        self.server_txns.pop(key, None)
        call = self.by_server_key.get(key)
        if call is not None and call.phase is not _DONE:
            # The switch's side is gone (transport error / timer H): nothing more to do.
            self.forget(call)

    def start_client(
        self,
        key: TransactionKey,
        txn: Transaction,
        peer: Peer,
        call: ProxyCall | None,
    ) -> list[Effect]:
        """Keep the new client transaction ``key`` (for ``call``; None for a CANCEL) and send
        its request."""
        self.client_txns[key] = (txn, peer, call)
        return self.client_effects(key, txn.start(), peer, call)

    def send_cancel(self, invite: Request, peer: Peer, call: ProxyCall) -> list[Effect]:
        """CANCEL a pending INVITE we sent (§9.1), in its own non-INVITE client transaction."""
        cancel = cancel_for(invite)
        txn = ClientNonInviteTransaction(cancel, reliable=reliable(peer), timers=call.config.timers)
        return self.start_client(client_key_for(cancel), txn, peer, None)

    # -- the switch's side ---------------------------------------------------------------------
    def respond(self, call: ProxyCall, response: Response) -> list[Effect]:
        """Send ``response`` to the switch through the call's INVITE server transaction."""
        server = self.server_txns.get(call.server_key)
        if server is None:
            return []
        txn, peer = server
        return self.server_effects(call.server_key, txn.send_response(response), peer)

    def forget(self, call: ProxyCall) -> None:
        self.calls.pop(call.id, None)
        self.by_server_key.pop(call.server_key, None)
