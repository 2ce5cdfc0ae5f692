"""Live SIP traces without giving up TLS: the plaintext of every leg, streamed to clearipctl.

The endpoint calls its tracer for every message in and out; the tracer is only installed while
someone is tracing, so tracing costs nothing otherwise. Each subscriber has a bounded queue: a
slow reader loses records (counted) instead of slowing calls down.

:func:`pcap_record` wraps a message in synthesised IPv4/IPv6 + UDP headers with the real
addresses and ports, so Wireshark and sngrep open the file as ordinary SIP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from clearip.relay.sip.message import Message, Request
from clearip.relay.sip.uri import uri_user_number

QUEUE_LIMIT = 1000
PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)  # LINKTYPE_RAW


@dataclass
class Subscriber:
    call_id: str | None = None
    number: str | None = None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    lost: int = 0

    def wants(self, message: Message) -> bool:
        if self.call_id and message.call_id != self.call_id:
            return False
        if self.number:
            for key in ("to", "from", "p-asserted-identity"):
                if self.number in (message.get(key) or ""):
                    return True
            if isinstance(message, Request):
                try:
                    return self.number in (uri_user_number(message.uri) or "")
                except ValueError:
                    return False
            return False
        return True


def record(
    direction: str,
    message: Message,
    transport: str,
    local: tuple[str, int],
    remote: tuple[str, int],
) -> dict[str, Any]:
    return {
        "time": time.time(),
        "direction": direction,
        "transport": transport,
        "local": list(local),
        "remote": list(remote),
        "call_id": message.call_id,
        "text": message.to_bytes().decode("utf-8", "replace"),
    }


def render_text(item: dict[str, Any]) -> str:
    arrow = "<-" if item["direction"] == "in" else "->"
    when = (
        time.strftime("%H:%M:%S", time.localtime(item["time"]))
        + f".{int(item['time'] * 1000) % 1000:03d}"
    )
    local = f"{item['local'][0]}:{item['local'][1]}"
    remote = f"{item['remote'][0]}:{item['remote'][1]}"
    head = f"{when} {item['transport'].upper()} {local} {arrow} {remote}"
    return f"{head}\n{item['text'].rstrip()}\n"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def pcap_record(item: dict[str, Any]) -> bytes:
    """One pcap record: the SIP text in UDP in IP, from sender to receiver, at its time."""
    payload = str(item["text"]).encode("utf-8", "replace")
    if item["direction"] == "in":
        (src, sport), (dst, dport) = item["remote"], item["local"]
    else:
        (src, sport), (dst, dport) = item["local"], item["remote"]
    source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if source.version == 4 and destination.version == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            0,
            0,
            64,
            17,
            0,
            source.packed,
            destination.packed,
        )
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    else:
        six_s = source if source.version == 6 else ipaddress.IPv6Address(f"::ffff:{source}")
        six_d = (
            destination
            if destination.version == 6
            else ipaddress.IPv6Address(f"::ffff:{destination}")
        )
        header = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, six_s.packed, six_d.packed)
    packet = header + udp
    seconds = int(item["time"])
    micros = int((item["time"] - seconds) * 1e6)
    record_header: bytes = struct.pack("<IIII", seconds, micros, len(packet), len(packet))
    return record_header + packet
