"""The running service: the asyncio shell around the sans-IO core.

Daemon or supervisor and workers, the effect interpreter and its timer wheel, the links to
ClearIP, the control socket, metrics, traces and HEP export, sd_notify and GC tuning. This is
where I/O lives; decisions stay in :mod:`clearip.relay.proxy` and :mod:`clearip.relay.sip`.
Importing this package imports nothing.
"""
