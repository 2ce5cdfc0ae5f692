"""``clearipctl trace``: the SIP the daemon sends and receives, streamed from its control
socket as text, into a pcap file, or to a HEP collector."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

from clearip.ctl import client
from clearip.ctl.client import Client, DaemonDown, fail


def trace(args: argparse.Namespace) -> int:
    from clearip.relay.service.trace import PCAP_HEADER, pcap_record, render_text

    hep = None
    if args.hep:
        try:
            hep = HepSender(args.hep, args.hep_capture_id, args.hep_password)
        except ValueError as exc:
            return fail(f"--hep {args.hep}: {exc}", client.EXIT_INVALID)
    try:
        sock, stream = Client(args.socket).stream("trace", call_id=args.call_id, number=args.number)
    except DaemonDown as exc:
        return fail(str(exc), client.EXIT_NO_DAEMON)
    first = json.loads(stream.readline() or b"{}")
    if not first.get("ok"):
        sock.close()
        return fail(str(first.get("error", "trace refused")), client.EXIT_FAILED)
    pcap = open(args.pcap, "wb") if args.pcap else None  # noqa: SIM115 - closed below
    if pcap is not None:
        pcap.write(PCAP_HEADER)
        pcap.flush()
    deadline = time.monotonic() + args.seconds if args.seconds else None
    count = 0
    try:
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
            line = stream.readline()
            if not line:
                break
            item = json.loads(line)
            count += 1
            if hep is not None:
                hep.send(item)
            if pcap is not None:
                pcap.write(pcap_record(item))
                pcap.flush()
            elif hep is None:
                print(render_text(item), flush=True)
    except (TimeoutError, KeyboardInterrupt):
        pass
    finally:
        sock.close()
        if pcap is not None:
            pcap.close()
            print(f"{count} messages written to {args.pcap}", file=sys.stderr)
        if hep is not None:
            hep.sock.close()
            failed = f" ({hep.failed} could not be sent)" if hep.failed else ""
            print(f"{hep.sent} messages sent as HEP to {args.hep}{failed}", file=sys.stderr)
    return client.EXIT_OK


class HepSender:
    """clearipctl trace --hep: each trace record as one HEPv3 datagram (Call-ID correlated)."""

    def __init__(self, address: str, capture_id: int, password: str) -> None:
        from clearip.relay.service.hep import parse_address

        if not 0 <= capture_id <= 0xFFFFFFFF:
            raise ValueError(f"capture id {capture_id}: use 0 to 4294967295")
        host, port = parse_address(address)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ValueError(f"cannot resolve {host}: {exc}") from None
        family, kind, proto, _, target = infos[0]
        self.sock = socket.socket(family, kind, proto)
        self.target = target
        self.capture_id = capture_id
        self.password = password.encode("utf-8")
        self.sent = self.failed = 0

    def send(self, item: dict[str, Any]) -> None:
        from clearip.relay.service.hep import HepError, encode, record_for

        try:
            data = encode(
                record_for(
                    item["direction"],
                    item["transport"],
                    (item["local"][0], item["local"][1]),
                    (item["remote"][0], item["remote"][1]),
                    item["time"],
                    payload=str(item["text"]).encode("utf-8", "replace"),
                    correlation_id=item.get("call_id") or "",
                    capture_id=self.capture_id,
                    password=self.password,
                )
            )
            self.sock.sendto(data, self.target)
        except (HepError, OSError):
            self.failed += 1
            return
        self.sent += 1
