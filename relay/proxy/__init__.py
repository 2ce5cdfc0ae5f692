"""The in-line proxy: sans-IO decisions on top of the SIP stack.

- :mod:`effects`: what the core asks the shell to do (send, start/cancel a timer, log a call).
- :mod:`replies`: responses the proxy makes itself (RFC 3261 §8.2.6) — Kamailio's ``sl``.
- :mod:`routing`: Via, Record-Route and loose routing without dialog state — ``rr``.
- :mod:`redirect`: choosing and ordering the Contacts of ClearIP's 302 — ``uac_redirect``.
- :mod:`call`: one INVITE's life: ClearIP leg, destinations, fail-open — ``tm``.
- :mod:`core`: classifies every message and dispatches it.
"""
