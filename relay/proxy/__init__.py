"""The in-line proxy: sans-IO decisions on top of the SIP stack.

- :mod:`effects`: what the core asks the shell to do (send, start/cancel a timer, log a call);
  :mod:`timerkeys`: the typed keys of its timers.
- :mod:`replies`: responses the proxy makes itself (RFC 3261 §8.2.6), OPTIONS, 405 — Kamailio's
  ``sl``.
- :mod:`routing`: Via, Record-Route and loose routing without dialog state — ``rr``;
  :mod:`stateless`: in-dialog requests and their responses relayed with it, and answers for
  calls a restarted worker lost (:mod:`orphans`).
- :mod:`redirect`: choosing and ordering the Contacts of ClearIP's 302 — ``uac_redirect``.
- :mod:`call`: one INVITE's record and its phases (a checked transition table) — with the
  modules below, ``tm``: :mod:`admission` (the checks a request must pass), :mod:`invite` (a
  new INVITE), :mod:`clearip_leg` (ClearIP's answer, fail-open), :mod:`branches` (the
  destinations, route advance, Timer C), :mod:`cancel` (the caller's CANCEL), :mod:`finish`
  (the switch's final).
- :mod:`state`: what the core keeps, and its transactions' actions as effects.
- :mod:`core`: classifies every message and timer and hands it to the module above.
"""
