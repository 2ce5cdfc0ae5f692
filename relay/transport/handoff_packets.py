"""The hand-off packet between worker processes: its format, and what its numbers mean.

Rules of this module (pure: no I/O, nothing about sockets):

- One packet carries one SIP message (or none), big-endian::

    version 0xC1 | kind | worker u16 | conn u32 | transport | port u16 | host length | host | data

- ``(worker, conn)`` always names the stream connection: the worker holding it and its id
  there. ``kind`` is MESSAGE (received on that connection: handle it), WRITE (send ``data`` on
  it) or CLOSED (it is gone; no data). ``transport`` is 1 = tcp, 2 = tls; ``host``/``port``
  are the remote end of the connection.
- :func:`encode` raises ValueError for fields the format cannot carry; :func:`decode` raises
  :class:`HandoffError` for anything :func:`encode` cannot make.
- Another worker's connection is named, in ``Peer.conn``, by :func:`remote_conn` (origin,
  conn id): ``(origin + 1) << 32 | conn``. Local connection ids are below
  :data:`LOCAL_CONN_LIMIT` (2**32), so one int says which worker holds the connection; it
  survives a Via ``cid`` parameter (decimal digits) and comes back on the response.
- A message's owner is the worker its Call-ID hashes to (:func:`owner_of`), the same one the
  kernel picks for UDP (:func:`clearip.bpf.steering.worker_for`).
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

from clearip.bpf.steering import MAX_WORKERS, call_id_hash

VERSION = 0xC1
LOCAL_CONN_LIMIT = 1 << 32  # local connection ids are below; remote_conn() values above
_HEADER = struct.Struct("!BBHIBHB")
HEADER_MAX = _HEADER.size + 255
_TRANSPORTS = {"tcp": 1, "tls": 2}
_TRANSPORT_NAMES = {code: name for name, code in _TRANSPORTS.items()}
_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n \t]+)", re.I)


class Kind(enum.IntEnum):
    MESSAGE = 1
    WRITE = 2
    CLOSED = 3


class HandoffError(ValueError):
    """A packet this module would not have encoded."""


@dataclass(frozen=True, slots=True)
class Packet:
    kind: Kind
    worker: int  # the worker holding the connection
    conn: int  # its id there (below LOCAL_CONN_LIMIT)
    transport: str  # "tcp" or "tls"
    host: str
    port: int
    data: bytes = b""


def encode(packet: Packet) -> bytes:
    """The packet's bytes; ValueError for fields the format cannot carry."""
    host = packet.host.encode()
    if packet.transport not in _TRANSPORTS:
        raise ValueError(f"hand-off is for stream transports, not {packet.transport!r}")
    if len(host) > 255:
        raise ValueError("host longer than 255 bytes")
    if not 0 <= packet.worker < MAX_WORKERS or not 0 <= packet.conn < LOCAL_CONN_LIMIT:
        raise ValueError(f"no such connection ({packet.worker}, {packet.conn})")
    if (packet.kind is Kind.CLOSED) == bool(packet.data):
        raise ValueError("CLOSED carries no data, MESSAGE and WRITE carry some")
    header = _HEADER.pack(
        VERSION,
        packet.kind,
        packet.worker,
        packet.conn,
        _TRANSPORTS[packet.transport],
        packet.port,
        len(host),
    )
    return header + host + packet.data


def decode(raw: bytes | memoryview) -> Packet:
    """The packet in ``raw``; HandoffError when it is not one :func:`encode` makes."""
    if len(raw) < _HEADER.size:
        raise HandoffError(f"packet of {len(raw)} bytes is shorter than the header")
    version, kind, worker, conn, transport, port, host_len = _HEADER.unpack_from(raw)
    if version != VERSION:
        raise HandoffError(f"unknown packet version {version:#x}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise HandoffError(f"unknown packet kind {kind}") from None
    name = _TRANSPORT_NAMES.get(transport)
    if name is None:
        raise HandoffError(f"unknown transport code {transport}")
    if worker >= MAX_WORKERS:
        raise HandoffError(f"worker {worker} out of range")
    start = _HEADER.size + host_len
    if len(raw) < start:
        raise HandoffError("packet shorter than its host")
    data = bytes(raw[start:])
    if (kind is Kind.CLOSED) == bool(data):
        raise HandoffError("CLOSED carries no data, MESSAGE and WRITE carry some")
    try:
        host = bytes(raw[_HEADER.size : start]).decode()
    except UnicodeDecodeError:
        raise HandoffError("host is not UTF-8") from None
    return Packet(kind, worker, conn, name, host, port, data)


def remote_conn(worker: int, conn: int) -> int:
    """The ``Peer.conn`` of connection ``conn`` held by ``worker``, as other workers see it."""
    return (worker + 1) << 32 | conn


def split_conn(conn: int) -> tuple[int, int] | None:
    """(worker, conn id) of a :func:`remote_conn` value; None for a local connection id."""
    if conn < LOCAL_CONN_LIMIT:
        return None
    return (conn >> 32) - 1, conn & (LOCAL_CONN_LIMIT - 1)


def call_id_of(message: bytes) -> bytes | None:
    """The Call-ID value of one framed message (its first Call-ID header, ``i`` included)."""
    end = message.find(b"\r\n\r\n")
    match = _CALL_ID.search(message, 0, end + 2 if end >= 0 else len(message))
    return match.group(1) if match else None


def owner_of(message: bytes, workers: int) -> int | None:
    """The worker owning this message's call (:func:`clearip.bpf.steering.worker_for`)."""
    value = call_id_of(message)
    return None if value is None else call_id_hash(value) % workers
