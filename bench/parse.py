"""Micro-benchmark of the SIP message layer (issue: parse <= 20 us, serialise <= 10 us).

Run: ``.venv/bin/python -m bench.parse [--calls N] [--rounds R]``.

The main figures parse a stream of distinct calls as a real switch and carrier send them
(:func:`bench.samples.call_stream`: every INVITE, 180 and 200 has its own Call-ID, tags,
branches, numbers and SDP), each message once, so the parse caches only hit on what really
recurs between calls. Each round generates a new stream up front, then times parsing it; the
best round is reported, per message.

The secondary figures are the old ones: the same 1 KB INVITE (and a 180 and a 200) parsed again
and again, whose memoised header parses always hit, and the serialisation of an edited INVITE.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
import timeit
from collections.abc import Callable

from bench.samples import INVITE, OK_200, RINGING, call_stream
from clearip.relay.sip.parser import parse_message

try:
    from clearip.relay import core_build
except ImportError:  # a checkout from before the compiled core, run for a comparison

    def core_build() -> str:
        return "pure"


TARGETS = {"parse INVITE, distinct calls": 20.0, "serialise edited INVITE": 10.0}


def _edited_invite_bytes() -> bytes:
    msg = parse_message(INVITE)
    msg.prepend("Via", "SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKcl1p.0a1b2c3d4e5f")
    msg.set("Max-Forwards", "69")
    msg.prepend("Record-Route", "<sip:203.0.113.5;lr>")
    return msg.to_bytes()


def _parse_all(messages: list[bytes]) -> float:
    """Seconds to parse each message once (collector off, as timeit runs)."""
    parse = parse_message
    enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        for data in messages:
            parse(data)
        return time.perf_counter() - started
    finally:
        if enabled:
            gc.enable()


def measure_distinct(calls: int = 20000, rounds: int = 3) -> dict[str, float]:
    """Microseconds per message, parsing ``calls`` distinct calls once each (best round)."""
    best: dict[str, float] = {}
    for seed in range(1, rounds + 1):
        invites, ringing, answers = call_stream(calls, seed)
        for name, stream in (
            ("parse INVITE, distinct calls", invites),
            ("parse 180 Ringing, distinct calls", ringing),
            ("parse 200 OK, distinct calls", answers),
        ):
            micros = _parse_all(stream) / len(stream) * 1e6
            best[name] = min(best.get(name, micros), micros)
    return best


def measure(number: int = 20000) -> dict[str, float]:
    """Microseconds per operation on the same bytes every time (best of 5 timeit runs)."""
    edited = parse_message(INVITE)
    edited.prepend("Via", "SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKcl1p.0a1b2c3d4e5f")
    edited.set("Max-Forwards", "69")
    edited.prepend("Record-Route", "<sip:203.0.113.5;lr>")
    cases: dict[str, Callable[[], object]] = {
        "parse INVITE, same bytes": lambda: parse_message(INVITE),
        "serialise edited INVITE": edited.to_bytes,
        "parse + edit + serialise INVITE": _edited_invite_bytes,
        "parse 180 Ringing, same bytes": lambda: parse_message(RINGING),
        "parse 200 OK, same bytes": lambda: parse_message(OK_200),
    }
    results = {}
    for name, func in cases.items():
        best = min(timeit.repeat(func, number=number, repeat=5))
        results[name] = best / number * 1e6
    return results


def _print(results: dict[str, float]) -> None:
    for name, micros in results.items():
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            verdict = f"  target <= {target:.0f} us: {'met' if micros <= target else 'NOT met'}"
        print(f"  {name:36s} {micros:7.2f} us{verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.parse",
        description="SIP parse and serialise cost per message: distinct calls, then same bytes.",
    )
    parser.add_argument("--calls", type=int, default=20000, help="distinct calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the best is reported)")
    parser.add_argument(
        "--number", type=int, default=20000, help="repetitions of the same-bytes cases"
    )
    args = parser.parse_args(argv)
    print(
        f"SIP message micro-benchmark: {platform.python_implementation()} "
        f"{sys.version.split()[0]}, SIP core {core_build()}"
    )
    print(
        f"{args.calls} distinct calls (INVITE {len(INVITE)} bytes, 15 headers, SDP; 180; 200), "
        f"each message parsed once, best of {args.rounds} rounds:"
    )
    _print(measure_distinct(args.calls, args.rounds))
    print("The same bytes again and again (the old figure; a build's parse caches always hit):")
    _print(measure(args.number))
    return 0


if __name__ == "__main__":
    sys.exit(main())
