"""SIP transactions (RFC 3261 §17, RFC 6026), sans-IO.

The four machines take events (a message, a timer firing, a transport error) and return
actions (:mod:`actions`); the caller sends, schedules and cancels. Time never enters here.
"""

from clearip.relay.sip.transaction.client_invite import ClientInviteState, ClientInviteTransaction
from clearip.relay.sip.transaction.client_non_invite import (
    ClientNonInviteState,
    ClientNonInviteTransaction,
)
from clearip.relay.sip.transaction.server_invite import ServerInviteState, ServerInviteTransaction
from clearip.relay.sip.transaction.server_non_invite import (
    ServerNonInviteState,
    ServerNonInviteTransaction,
)
from clearip.relay.sip.transaction.timers import TimerSettings

__all__ = [
    "ClientInviteState",
    "ClientInviteTransaction",
    "ClientNonInviteState",
    "ClientNonInviteTransaction",
    "ServerInviteState",
    "ServerInviteTransaction",
    "ServerNonInviteState",
    "ServerNonInviteTransaction",
    "TimerSettings",
]
