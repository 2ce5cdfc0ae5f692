"""HEPv3 ("HEP3", EEP): a SIP message as Homer's heplify-server, Kamailio and sngrep read it.

Pure code: no sockets, no clock (the caller gives the time). :func:`encode` turns one
:class:`HepRecord` into one packet, :func:`decode` reads one back (tests, tools).

Wire format, every integer big-endian (network byte order)::

    packet = "HEP3" | total length (uint16: the whole packet, these 6 bytes included) | chunk...
    chunk  = vendor id (uint16) | type id (uint16) | length (uint16: these 6 bytes + value) | value

The chunks written, all with vendor id 0x0000 (the generic ones), in Kamailio's order::

    type  what                       value
    0x01  IP protocol family         uint8: 2 (AF_INET) or 10 (AF_INET6)
    0x02  IP protocol id             uint8: 17 (UDP) or 6 (TCP, TLS too: see the rules)
    0x03  IPv4 source address        4 bytes   (0x05 instead for IPv6: 16 bytes)
    0x04  IPv4 destination address   4 bytes   (0x06 instead for IPv6: 16 bytes)
    0x07  source port                uint16
    0x08  destination port           uint16
    0x09  timestamp, seconds         uint32 (Unix time)
    0x0a  timestamp, microseconds    uint32 (0-999999: the offset into that second)
    0x0b  protocol type              uint8: 1 = SIP
    0x0c  capture agent id           uint32 (which node the copy comes from)
    0x11  correlation id             the Call-ID (only when the message has one)
    0x0e  authentication key         the collector's password (only when one is set)
    0x0f  captured payload           the SIP message, as sent or received (always last)

(0x0d, a keep-alive timer, and 0x10, a compressed payload, are never written.)

Rules:

- The source is whoever sent the message: the peer for a message we received, us for one
  we sent. Both addresses are of one family: IPv4 next to IPv6 is written as IPv4-mapped IPv6.
- The protocol id is the IP protocol the bytes travelled on: TLS is 6 (TCP), with the
  plaintext as payload and the real ports (5061 tells the TLS leg apart). Kamailio's siptrace
  writes 22 (IPPROTO_IDP, a "fake proto type" in its source) for tls/ws/wss instead; the field
  is an IP protocol number, and 22 is not the one the bytes travelled on.
- The total length has 16 bits: a packet above 65535 bytes cannot be written (:class:`HepError`).
- Decoding skips chunks of other vendors and of types it does not know (HEP3 is extensible) and
  rejects a packet whose lengths do not add up or that lacks a mandatory chunk.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MAGIC = b"HEP3"
HEADER = struct.Struct("!4sH")  # magic, total length
CHUNK = struct.Struct("!HHH")  # vendor id, type id, length
MAX_LENGTH = 0xFFFF
GENERIC_VENDOR = 0x0000

IP_FAMILY = 0x01
IP_PROTOCOL = 0x02
IPV4_SOURCE = 0x03
IPV4_DESTINATION = 0x04
IPV6_SOURCE = 0x05
IPV6_DESTINATION = 0x06
SOURCE_PORT = 0x07
DESTINATION_PORT = 0x08
TIME_SECONDS = 0x09
TIME_MICROSECONDS = 0x0A
PROTOCOL_TYPE = 0x0B
CAPTURE_ID = 0x0C
AUTH_KEY = 0x0E
PAYLOAD = 0x0F
CORRELATION_ID = 0x11

AF_INET = 2
AF_INET6 = 10
UDP = 17
TCP = 6
SIP = 1
# The IP protocol each SIP transport travels on.
PROTOCOLS = {"udp": UDP, "tcp": TCP, "tls": TCP}

_MANDATORY = (
    IP_FAMILY,
    IP_PROTOCOL,
    SOURCE_PORT,
    DESTINATION_PORT,
    TIME_SECONDS,
    TIME_MICROSECONDS,
    PROTOCOL_TYPE,
    CAPTURE_ID,
    PAYLOAD,
)


class HepError(ValueError):
    """A record HEP3 cannot carry, or bytes that are not a HEP3 packet (the message says why)."""


@dataclass(frozen=True, slots=True)
class HepRecord:
    """One captured message: who sent it to whom, over what, when, and the bytes."""

    source: str  # an IP address literal
    source_port: int
    destination: str
    destination_port: int
    protocol: int  # IP protocol id: 17 UDP, 6 TCP
    seconds: int
    microseconds: int
    payload: bytes
    capture_id: int = 0
    password: bytes = b""  # the authentication key; b"" = no chunk
    correlation_id: bytes = b""  # b"" = no chunk
    protocol_type: int = SIP


def record_for(
    direction: str,
    transport: str,
    local: tuple[str, int],
    remote: tuple[str, int],
    when: float,
    *,
    payload: bytes,
    correlation_id: str,
    capture_id: int,
    password: bytes = b"",
) -> HepRecord:
    """The record of one traced message: ``direction`` "in" (``remote`` sent it to us at
    ``when``) or "out" (we sent it to ``remote``)."""
    if direction == "in":
        (source, source_port), (destination, destination_port) = remote, local
    else:
        (source, source_port), (destination, destination_port) = local, remote
    seconds, microseconds = divmod(round(when * 1_000_000), 1_000_000)
    return HepRecord(
        source=source,
        source_port=source_port,
        destination=destination,
        destination_port=destination_port,
        protocol=PROTOCOLS.get(transport.lower(), UDP),
        seconds=seconds,
        microseconds=microseconds,
        payload=payload,
        capture_id=capture_id,
        password=password,
        correlation_id=correlation_id.encode("utf-8", "surrogateescape"),
    )


def encode(record: HepRecord) -> bytes:
    """One HEP3 packet; :class:`HepError` if the record cannot be written (see the rules)."""
    source, destination = _address(record.source), _address(record.destination)
    if source.version != destination.version:
        source, destination = _mapped(source), _mapped(destination)
    v6 = source.version == 6
    for name, port in (("source", record.source_port), ("destination", record.destination_port)):
        if not 0 <= port <= 0xFFFF:
            raise HepError(f"{name} port {port} is not a port number")
    if not 0 <= record.capture_id <= 0xFFFFFFFF:
        raise HepError(f"capture id {record.capture_id} does not fit 32 bits")
    if not 0 <= record.seconds <= 0xFFFFFFFF or not 0 <= record.microseconds < 1_000_000:
        raise HepError(f"time {record.seconds}.{record.microseconds:06d} cannot be written")
    parts = [
        _chunk(IP_FAMILY, bytes((AF_INET6 if v6 else AF_INET,))),
        _chunk(IP_PROTOCOL, bytes((record.protocol & 0xFF,))),
        _chunk(IPV6_SOURCE if v6 else IPV4_SOURCE, source.packed),
        _chunk(IPV6_DESTINATION if v6 else IPV4_DESTINATION, destination.packed),
        _chunk(SOURCE_PORT, struct.pack("!H", record.source_port)),
        _chunk(DESTINATION_PORT, struct.pack("!H", record.destination_port)),
        _chunk(TIME_SECONDS, struct.pack("!I", record.seconds)),
        _chunk(TIME_MICROSECONDS, struct.pack("!I", record.microseconds)),
        _chunk(PROTOCOL_TYPE, bytes((record.protocol_type & 0xFF,))),
        _chunk(CAPTURE_ID, struct.pack("!I", record.capture_id)),
    ]
    if record.correlation_id:
        parts.append(_chunk(CORRELATION_ID, record.correlation_id))
    if record.password:
        parts.append(_chunk(AUTH_KEY, record.password))
    parts.append(_chunk(PAYLOAD, record.payload))
    length = HEADER.size + sum(len(part) for part in parts)
    if length > MAX_LENGTH:
        raise HepError(f"{length} bytes: a HEP3 packet holds at most {MAX_LENGTH}")
    return HEADER.pack(MAGIC, length) + b"".join(parts)


def decode(data: bytes) -> HepRecord:
    """Read one HEP3 packet (exactly ``data``); :class:`HepError` names what is wrong."""
    if len(data) < HEADER.size:
        raise HepError(f"{len(data)} bytes: shorter than the HEP3 header")
    magic, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HepError(f"not HEP3 (starts with {magic!r})")
    if length != len(data):
        raise HepError(f"the header says {length} bytes, the packet has {len(data)}")
    values: dict[int, bytes] = {}
    offset = HEADER.size
    while offset < length:
        if length - offset < CHUNK.size:
            raise HepError(f"a truncated chunk header at byte {offset}")
        vendor, kind, size = CHUNK.unpack_from(data, offset)
        if size < CHUNK.size or offset + size > length:
            raise HepError(f"chunk 0x{kind:04x} at byte {offset} has a bad length {size}")
        if vendor == GENERIC_VENDOR:
            values.setdefault(kind, data[offset + CHUNK.size : offset + size])
        offset += size
    missing = [f"0x{kind:02x}" for kind in _MANDATORY if kind not in values]
    if missing:
        raise HepError(f"missing chunk(s) {', '.join(missing)}")
    family = _uint(values, IP_FAMILY, 1)
    if family == AF_INET:
        source, destination = values.get(IPV4_SOURCE), values.get(IPV4_DESTINATION)
        width = 4
    elif family == AF_INET6:
        source, destination = values.get(IPV6_SOURCE), values.get(IPV6_DESTINATION)
        width = 16
    else:
        raise HepError(f"unknown IP family {family}")
    if source is None or destination is None or len(source) != width or len(destination) != width:
        raise HepError(f"IP family {family} without matching source and destination addresses")
    return HepRecord(
        source=str(ipaddress.ip_address(source)),
        source_port=_uint(values, SOURCE_PORT, 2),
        destination=str(ipaddress.ip_address(destination)),
        destination_port=_uint(values, DESTINATION_PORT, 2),
        protocol=_uint(values, IP_PROTOCOL, 1),
        seconds=_uint(values, TIME_SECONDS, 4),
        microseconds=_uint(values, TIME_MICROSECONDS, 4),
        payload=values[PAYLOAD],
        capture_id=_uint(values, CAPTURE_ID, 4),
        password=values.get(AUTH_KEY, b""),
        correlation_id=values.get(CORRELATION_ID, b""),
        protocol_type=_uint(values, PROTOCOL_TYPE, 1),
    )


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError says what is wrong."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError('use "host:port", e.g. "10.0.0.5:9060" or "[2001:db8::5]:9060"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError('put an IPv6 address in brackets: "[2001:db8::5]:9060"')
    number = int(port)
    if not 1 <= number <= 0xFFFF:
        raise ValueError(f"port {number}: use a port number from 1 to 65535")
    return host, number


def _chunk(kind: int, value: bytes) -> bytes:
    length = CHUNK.size + len(value)
    if length > MAX_LENGTH - HEADER.size:
        raise HepError(f"{len(value)} bytes in one chunk: a HEP3 packet holds at most {MAX_LENGTH}")
    return CHUNK.pack(GENERIC_VENDOR, kind, length) + value


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # a scoped IPv6 address: no scope
    except ValueError:
        raise HepError(f"{text!r} is not an IP address") from None


def _mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def _uint(values: dict[int, bytes], kind: int, width: int) -> int:
    value = values[kind]
    if len(value) != width:
        raise HepError(f"chunk 0x{kind:02x} has {len(value)} bytes, expected {width}")
    return int.from_bytes(value, "big")
