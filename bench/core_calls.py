"""Python work per call, without sockets: the outbound flow through parser, core and serialiser.

Run: ``.venv/bin/python -m bench.core_calls [CALLS] [--profile FILE]``. The switch, ClearIP
(302 with Identity and two Contacts) and the carrier (100/180/200, 200 for BYE) are simulated
in-process with string templates (``lab/core_driver.py``); only the proxy's side is timed:
parsing what arrives, ``ProxyCore.on_message``, the timer bookkeeping the daemon does, and
serialising what it sends. It isolates the Python cost that ``bench.calls`` measures end to end
(together with system calls) and is steady enough to compare optimisations run by run. Prints
microseconds per call and per message, and which build of the SIP core ran (compiled or pure).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import sys

from clearip.relay.service.gc_tuning import FREEZE_INTERVAL, start_policy
from lab.core_driver import CALL_INTERVAL, Driver, core_build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.core_calls",
        description="The proxy's work per call (parse, core, timers, serialise), no sockets.",
    )
    parser.add_argument("calls", nargs="?", type=int, default=5000, help="calls to time")
    parser.add_argument(
        "--profile", metavar="FILE", help="also write a cProfile of the timed calls to FILE"
    )
    args = parser.parse_args(argv)
    calls = args.calls
    driver = Driver()
    for n in range(200):  # warm-up
        driver.call(n)
    driver.busy, driver.messages = 0.0, 0
    # As the daemon runs: survivors frozen every FREEZE_INTERVAL of (simulated) time.
    start_policy()
    freeze_every = max(1, round(FREEZE_INTERVAL / CALL_INTERVAL))
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    for n in range(200, 200 + calls):
        driver.call(n)
        if n % freeze_every == 0:
            gc.freeze()
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    per_call = driver.busy / calls * 1e6
    messages = driver.messages / calls
    print(f"SIP core {core_build()}: {calls} calls, {messages:.1f} messages in per call")
    per_message = driver.busy / driver.messages * 1e6
    print(f"proxy work per call {per_call:8.1f} us  per message {per_message:6.1f} us")
    print(f"live calls {driver.core.active_calls}, transactions {driver.core.active_transactions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
