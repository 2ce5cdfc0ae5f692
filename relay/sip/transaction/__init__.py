"""SIP transactions (RFC 3261 §17, RFC 6026), sans-IO.

The four machines take events (a message, a timer firing, a transport error) and return
actions (:mod:`actions`); the caller sends, schedules and cancels. No socket and no clock are
used here: every delay is returned in a :class:`StartTimer`, and the caller calls
``on_timer(name)`` when it is due.

Modules: :mod:`timers` (T1/T2/T4 and the values derived from them), :mod:`actions`,
:mod:`base` (the transition-table interpreter), :mod:`sides` (what the client machines and
what the server machines share), one module per machine, :mod:`matching` (transaction keys
and a table) and :mod:`ack` (the hop-by-hop ACK and the CANCEL).
"""

from clearip.relay.sip.transaction.ack import ack_for, cancel_for
from clearip.relay.sip.transaction.actions import (
    Action,
    DeliverRequest,
    DeliverResponse,
    SendMessage,
    StartTimer,
    StopTimer,
    Terminated,
    Timeout,
    TransportError,
)
from clearip.relay.sip.transaction.client_invite import ClientInviteState, ClientInviteTransaction
from clearip.relay.sip.transaction.client_non_invite import (
    ClientNonInviteState,
    ClientNonInviteTransaction,
)
from clearip.relay.sip.transaction.matching import (
    TransactionKey,
    TransactionTable,
    cancel_target_key,
    client_key,
    client_key_for,
    server_key,
)
from clearip.relay.sip.transaction.server_invite import ServerInviteState, ServerInviteTransaction
from clearip.relay.sip.transaction.server_non_invite import (
    ServerNonInviteState,
    ServerNonInviteTransaction,
)
from clearip.relay.sip.transaction.timers import TimerSettings

__all__ = [
    "Action",
    "ClientInviteState",
    "ClientInviteTransaction",
    "ClientNonInviteState",
    "ClientNonInviteTransaction",
    "DeliverRequest",
    "DeliverResponse",
    "SendMessage",
    "ServerInviteState",
    "ServerInviteTransaction",
    "ServerNonInviteState",
    "ServerNonInviteTransaction",
    "StartTimer",
    "StopTimer",
    "Terminated",
    "Timeout",
    "TimerSettings",
    "TransactionKey",
    "TransactionTable",
    "TransportError",
    "ack_for",
    "cancel_for",
    "cancel_target_key",
    "client_key",
    "client_key_for",
    "server_key",
]
