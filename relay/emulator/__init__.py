"""The ClearIP emulator: a SIP redirect server that stands in for ClearIP in labs and tests.

It decides each INVITE by rules (:mod:`rules`), signs SHAKEN PASSporTs (:mod:`passport`),
builds ClearIP-shaped responses (:mod:`responses`) and serves them over UDP, TCP and TLS on the
project's own SIP stack (:mod:`server`). ``clearip-proxy emulate`` runs it (:mod:`cli`).
"""
