"""What Call-ID steering costs (root): UDP datagrams/s with and without the program attached.

Run: ``.venv/bin/python -m bench.reuseport [--seconds 3] [--workers 4] [--batch 64]``.

A reuseport group of ``--workers`` UDP sockets on 127.0.0.1 (one per worker, all in this
process) receives datagrams sent from 32 source ports, in batches: ``--batch`` sendto calls,
then recv on every socket until the batch is in. Three payloads:

- short:   a 573-byte INVITE, Call-ID in its 6th line (about 200 bytes in: the common case)
- long:    a 1,703-byte INVITE whose Call-ID comes after 1,200 bytes of headers
- none:    a 1,651-byte INVITE without a Call-ID (the whole 1,400-byte window is scanned)

For each it prints datagrams/s without the program (the kernel's hash), with it, and their
ratio; then the program's own cost per datagram as the kernel measures it (BPF_ENABLE_STATS:
run time / runs, held only while this script runs). sendto and recv from Python dominate the
first figures; the second is what the program adds to the receiving softirq.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys
import time
from collections.abc import Iterator

from clearip.bpf import bpfmaps
from clearip.bpf.reuseport import ReuseportSteering, detach, remove_pins

SO_RCVBUFFORCE = 33
SENDERS = 32


def payloads(kind: str, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        lines = [
            "INVITE sip:+12125550100@carrier.example SIP/2.0",
            f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK{i:08d}",
            "Max-Forwards: 70",
            "From: <sip:+13125550111@switch.example>;tag=8f3a",
            "To: <sip:+12125550100@carrier.example>",
        ]
        if kind != "short":
            lines += ["X-Padding: " + "p" * 90] * 10
        if kind != "none":
            lines.append(f"Call-ID: {i:016x}-5f2c-4c1e@switch.example")
        lines += [
            "CSeq: 1 INVITE",
            "Contact: <sip:+13125550111@192.0.2.10:5060>",
            "Content-Type: application/sdp",
        ]
        body = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
        body += "m=audio 20000 RTP/AVP 0 8\r\n" + "a=x\r\n" * (40 if kind != "short" else 20)
        lines += [f"Content-Length: {len(body)}", ""]
        out.append(("\r\n".join(lines) + "\r\n" + body).encode())
    return out


@contextlib.contextmanager
def group(workers: int) -> Iterator[tuple[list[socket.socket], list[socket.socket], int]]:
    receivers: list[socket.socket] = []
    port = 0
    for _ in range(workers):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        s.setblocking(False)
        receivers.append(s)
    senders = []
    for _ in range(SENDERS):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        senders.append(sender)
    try:
        yield receivers, senders, port
    finally:
        for s in receivers + senders:
            s.close()


def rate(
    receivers: list[socket.socket],
    senders: list[socket.socket],
    port: int,
    data: list[bytes],
    *,
    seconds: float,
    batch: int,
) -> float:
    """Datagrams/s sent and received, batch by batch, for ``seconds``."""
    target = ("127.0.0.1", port)
    done = 0
    start = time.perf_counter()
    end = start + seconds
    index = 0
    while time.perf_counter() < end:
        for k in range(batch):
            senders[k % SENDERS].sendto(data[index % len(data)], target)
            index += 1
        pending = batch
        while pending:
            ready, _, _ = select.select(receivers, [], [], 1.0)
            if not ready:
                raise RuntimeError("datagrams lost on loopback: the receive buffers overflowed")
            for s in ready:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        s.recv(65535)
                        pending -= 1
        done += batch
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reuseport",
        description="Datagrams/s through sendto+recv with and without Call-ID steering, "
        "and the steering program's own cost per datagram (root, bcc).",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (3)")
    parser.add_argument("--workers", type=int, default=4, help="sockets in the group (4)")
    parser.add_argument("--batch", type=int, default=64, help="datagrams per send batch (64)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (loads a BPF program)", file=sys.stderr)
        return 2

    pin_dir = f"/sys/fs/bpf/cip-bench-{os.getpid()}"
    steering = ReuseportSteering.load(workers=args.workers, pin_dir=pin_dir)
    stats = bpfmaps.enable_stats()
    print(
        f"Call-ID steering, {args.workers} sockets on 127.0.0.1, {SENDERS} source ports, "
        f"batches of {args.batch}, {args.seconds:g} s per figure; "
        f"program verified in {steering.verified_insns} instructions"
    )
    print(f"{'payload':8} {'bytes':>6} {'no program':>12} {'steered':>12} {'ratio':>6} "
          f"{'program ns/datagram':>20}")  # fmt: skip
    try:
        with group(args.workers) as (receivers, senders, port):
            for kind in ("short", "long", "none"):
                data = payloads(kind, 512)
                detach(receivers[0])
                rate(receivers, senders, port, data, seconds=0.3, batch=args.batch)  # warm-up
                plain = rate(receivers, senders, port, data, seconds=args.seconds, batch=args.batch)
                steering.attach(receivers[0])
                for worker, s in enumerate(receivers):
                    steering.register(s, worker)
                rate(receivers, senders, port, data, seconds=0.3, batch=args.batch)
                runs0, ns0 = steering.run_stats()
                steered = rate(
                    receivers, senders, port, data, seconds=args.seconds, batch=args.batch
                )
                runs1, ns1 = steering.run_stats()
                cost = (ns1 - ns0) / (runs1 - runs0) if runs1 > runs0 else float("nan")
                print(
                    f"{kind:8} {len(data[0]):6d} {plain:12,.0f} {steered:12,.0f} "
                    f"{steered / plain:6.2f} {cost:20.0f}"
                )
        print("counters:", ", ".join(f"{k}={v}" for k, v in steering.counters().items()))
    finally:
        os.close(stats)
        steering.close()
        remove_pins(pin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
