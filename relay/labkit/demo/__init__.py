"""``clearip-proxy demo``: the main job on loopback, readable by a newcomer.

Starts the ClearIP emulator over TLS (throw-away CA), the proxy with its default settings
pointed at it, stand-in carriers and a stand-in switch, places one call of each kind, prints a
SIP ladder per call and a summary table, and exits 0 only if every call behaved as expected.

Where things are: :mod:`run` (``main``, :func:`run_demo`: set up, place the calls, keep
running, tear down), :mod:`calls` (the seven scenarios, the emulator rules behind them and
how each is judged), :mod:`report` (the printed ladders, summary table and JSON),
:mod:`agents` (the stand-in switch and carriers), :mod:`ladder` (the SIP ladder) and
:mod:`sipp` with ``scenarios/`` (the SIPp calls printed by ``--keep-running``).
"""
