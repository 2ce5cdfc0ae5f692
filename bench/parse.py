"""Micro-benchmark of the SIP message layer (issue: parse <= 20 us, serialise <= 10 us).

Run: ``.venv/bin/python -m bench.parse``. Prints the mean time per operation for a typical 1 KB
INVITE with SDP, its serialisation after the edits a proxy makes, and a 180 and a 200.
"""

from __future__ import annotations

import platform
import sys
import timeit

from bench.samples import INVITE, OK_200, RINGING
from clearip.relay.sip.parser import parse_message

TARGETS = {"parse INVITE": 20.0, "serialise edited INVITE": 10.0}


def _edited_invite_bytes() -> bytes:
    msg = parse_message(INVITE)
    msg.prepend("Via", "SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKcl1p.0a1b2c3d4e5f")
    msg.set("Max-Forwards", "69")
    msg.prepend("Record-Route", "<sip:203.0.113.5;lr>")
    return msg.to_bytes()


def measure(number: int = 20000) -> dict[str, float]:
    edited = parse_message(INVITE)
    edited.prepend("Via", "SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKcl1p.0a1b2c3d4e5f")
    edited.set("Max-Forwards", "69")
    edited.prepend("Record-Route", "<sip:203.0.113.5;lr>")
    cases = {
        "parse INVITE": lambda: parse_message(INVITE),
        "serialise edited INVITE": edited.to_bytes,
        "parse + edit + serialise INVITE": _edited_invite_bytes,
        "parse 180 Ringing": lambda: parse_message(RINGING),
        "parse 200 OK": lambda: parse_message(OK_200),
    }
    results = {}
    for name, func in cases.items():
        best = min(timeit.repeat(func, number=number, repeat=5))
        results[name] = best / number * 1e6
    return results


def main() -> int:
    print(
        f"SIP message micro-benchmark: {platform.python_implementation()} {sys.version.split()[0]}"
    )
    print(f"INVITE size {len(INVITE)} bytes, 15 headers, SDP body")
    for name, micros in measure().items():
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            verdict = f"  target <= {target:.0f} us: {'met' if micros <= target else 'NOT met'}"
        print(f"  {name:34s} {micros:7.2f} us{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
