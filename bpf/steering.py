"""Which worker the kernel steers a datagram to, in pure Python (no bcc, cheap to import).

``reuseport.c`` picks the socket of each incoming SIP datagram from its Call-ID; the relay
needs the same answer without the kernel: a worker that creates a call-related datagram, or
a supervisor that hands a call over, must know which worker owns that Call-ID. Everything
here reproduces the C program's rules and constants exactly (tests/test_reuseport.py checks
them against the loaded program), so a change to one is a change to both.

- :func:`call_id_hash` / :func:`worker_for`: the owner of a Call-ID value, as the relay's
  parser gives it (``Message.call_id``, str or bytes).
- :func:`find_call_id`: the value the kernel reads from a whole UDP payload, or None where the
  kernel falls back to its own hash (fallback_no_callid).
- :func:`steer`: the kernel's whole decision for one payload: outcome and slot.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

WINDOW = 1400  # the LF before the Call-ID name must be within these first payload bytes
NAME = 8  # "\ncall-id"
MAX_SPACE = 8  # spaces/tabs allowed on each side of the colon
MAX_VALUE = 128  # value bytes hashed
COPY = WINDOW + NAME + MAX_SPACE + 1 + MAX_SPACE + MAX_VALUE  # payload bytes the kernel reads
MAX_WORKERS = 128
MAX_DIGITS = 15

FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193

# Outcomes, in the order of the kernel's per-CPU counters.
STEERED = "steered"
FALLBACK_NO_CALLID = "fallback_no_callid"
FALLBACK_EMPTY_SLOT = "fallback_empty_slot"
EMERGENCY_STEERED = "emergency_steered"
EMERGENCY_TO_NORMAL = "emergency_to_normal"
OUTCOMES = (
    STEERED,
    FALLBACK_NO_CALLID,
    FALLBACK_EMPTY_SLOT,
    EMERGENCY_STEERED,
    EMERGENCY_TO_NORMAL,
)

_SPACE = b" \t"
_VALUE_END = b"\r\n \t"
_CALL_ID = b"\ncall-id"
_FOLD = bytes([0, 0x20, 0x20, 0x20, 0x20, 0, 0x20, 0x20])  # letters only: '\r' | 0x20 is '-'
_SCHEMES = ((b"sip:", 11), (b"sips:", 12), (b"tel:", 11))
_SEPARATORS = b"-.()"
_NUMBER_END = b"@; >?"


def _value_bytes(call_id: str | bytes) -> bytes:
    raw = call_id.encode("utf-8", "surrogateescape") if isinstance(call_id, str) else call_id
    raw = raw.lstrip(_SPACE)
    for index, byte in enumerate(raw):
        if byte in _VALUE_END:
            return raw[:index]
    return raw


def call_id_hash(call_id: str | bytes) -> int:
    """FNV-1a (32 bits) of the value as the kernel hashes it: leading spaces/tabs skipped, up
    to the first CR, LF, space or tab, at most :data:`MAX_VALUE` bytes."""
    h = FNV_OFFSET
    for byte in _value_bytes(call_id)[:MAX_VALUE]:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFF
    return h


def worker_for(call_id: str | bytes, n_workers: int) -> int:
    """The worker (0 to n_workers - 1) whose socket receives datagrams with this Call-ID."""
    if not 0 < n_workers <= MAX_WORKERS:
        raise ValueError(f"n_workers must be 1 to {MAX_WORKERS}, not {n_workers}")
    return call_id_hash(call_id) % n_workers


def _skip_space(data: bytes, at: int) -> int:
    for _ in range(MAX_SPACE):
        if at >= len(data) or data[at] not in _SPACE:
            break
        at += 1
    return at


def _candidate(word: bytes) -> int:
    """Length of the name when ``word`` (8 bytes at a LF) may start the Call-ID line, else 0."""
    if bytes(b | f for b, f in zip(word, _FOLD, strict=True)) == _CALL_ID:
        return NAME
    if word[0] == 0x0A and word[1] | 0x20 == ord("i") and word[2] in b": \t":
        return 2
    return 0


def find_call_id(payload: bytes) -> bytes | None:
    """The Call-ID value bytes the kernel hashes in this UDP payload (at most MAX_VALUE), or
    None when it finds none and falls back to its own hash."""
    data = payload[:COPY]
    n = len(data)
    for i in range(WINDOW):
        if i + NAME > n:
            return None
        name = _candidate(data[i : i + NAME])
        if name:
            break
    else:
        return None
    # The first candidate line decides, usable or not.
    at = _skip_space(data, i + name)
    if at >= n or data[at] != ord(":"):
        return None
    at = _skip_space(data, at + 1)
    value = bytearray()
    for byte in data[at : at + MAX_VALUE]:
        if byte in _VALUE_END:
            break
        value.append(byte)
    return bytes(value) or None


def emergency_number(payload: bytes) -> str | None:
    """The number of an INVITE to a telephone-number Request-URI, as xdp_filter.c and
    reuseport.c parse it (digits only; None when the start line is not of that shape)."""
    data = payload[:COPY]
    if len(data) < 12 or not data.startswith(b"INVITE "):
        return None
    folded = bytes(b | 0x20 for b in data[7:11]) + data[11:12]
    for scheme, offset in _SCHEMES:
        if folded.startswith(scheme[:-1]) and data[offset - 1] == ord(":"):
            break
    else:
        return None
    digits = bytearray()
    for i in range(24):
        p = offset + i
        if p >= len(data):
            return None
        c = data[p]
        if 0x30 <= c <= 0x39:
            if len(digits) >= MAX_DIGITS:
                return None
            digits.append(c)
        elif (c == ord("+") and i == 0) or c in _SEPARATORS:
            continue
        elif c in _NUMBER_END:
            return digits.decode() if digits else None
        else:
            return None
    return None


@dataclass(frozen=True)
class Decision:
    """The kernel's choice for one datagram: ``slot`` None means the kernel's own hash."""

    outcome: str
    slot: int | None


def steer(
    payload: bytes,
    n_workers: int,
    emergency: Collection[str] = (),
    *,
    registered: Collection[int] | None = None,
) -> Decision:
    """What reuseport.c does with this payload. ``registered``: the slots holding a socket
    (None: all of them)."""

    def present(slot: int) -> bool:
        return registered is None or slot in registered

    value = find_call_id(payload)
    if value is None:
        return Decision(FALLBACK_NO_CALLID, None)
    if not 0 < n_workers <= MAX_WORKERS:
        return Decision(FALLBACK_EMPTY_SLOT, None)
    owner = call_id_hash(value) % n_workers
    if emergency_number(payload) in emergency:
        if present(n_workers + owner):
            return Decision(EMERGENCY_STEERED, n_workers + owner)
        if present(owner):
            return Decision(EMERGENCY_TO_NORMAL, owner)
        return Decision(FALLBACK_EMPTY_SLOT, None)
    if present(owner):
        return Decision(STEERED, owner)
    return Decision(FALLBACK_EMPTY_SLOT, None)
