"""Kernel steering of SIP datagrams across worker sockets (bpf/reuseport.c, bpf/reuseport.py).

Real sockets on loopback: N UDP sockets bound to one address:port with SO_REUSEPORT (slot k is
worker k's normal socket, slot N + k its emergency socket), the program loaded through bcc
and attached to the group, datagrams sent from many source ports. Where each one lands is
compared with the pure-Python model (clearip.bpf.steering), which the relay will use to know
a call's owner, and the kernel's counters are checked per outcome. One test puts the sockets
in two child processes that register themselves through the pinned maps, as workers will.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearip.bpf import steering
from clearip.bpf.reuseport import (
    ReuseportSteering,
    SteeringUnavailable,
    WorkerSteering,
    remove_pins,
    socket_cookie,
)
from clearip.bpf.steering import call_id_hash, find_call_id, worker_for
from lab.netns import unique_tag

EMERGENCY = ("911", "933")
SO_RCVBUFFORCE = 33
# Call-ID characters (RFC 3261 "word") and the host part
WORD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~()<>:\\\"/[]?{}"


# -- the pure model, no kernel --------------------------------------------------------------------


def test_call_id_hash_is_fnv1a_32() -> None:
    # Published FNV-1a 32-bit vectors: the kernel and the relay must agree with these.
    assert call_id_hash(b"") == 0x811C9DC5
    assert call_id_hash(b"a") == 0xE40C292C
    assert call_id_hash(b"foobar") == 0xBF9CF968
    assert call_id_hash("foobar") == call_id_hash(b"foobar")


def test_call_id_hash_reads_the_value_as_the_kernel_does() -> None:
    long = "x" * 200
    assert call_id_hash(long) == call_id_hash(long[:128]) != call_id_hash(long[:127])
    assert call_id_hash("  \tabc@h") == call_id_hash("abc@h")
    assert call_id_hash("abc@h def") == call_id_hash("abc@h") == call_id_hash("abc@h\r\n")
    assert worker_for("abc@h", 1) == 0
    for bad in (0, -1, steering.MAX_WORKERS + 1):
        with pytest.raises(ValueError, match="n_workers"):
            worker_for("abc", bad)


def test_find_call_id_rules() -> None:
    def request(*headers: str) -> bytes:
        return ("OPTIONS sip:a@b SIP/2.0\r\n" + "".join(h + "\r\n" for h in headers)).encode()

    assert find_call_id(request("Call-ID: a1@h")) == b"a1@h"
    assert find_call_id(request("cALL-iD:a1@h")) == b"a1@h"
    assert find_call_id(request("i  :\t a1@h")) == b"a1@h"
    assert find_call_id(request("I: a1@h")) == b"a1@h"
    assert find_call_id(request("Via: x", "Call-ID: first", "Call-ID: second")) == b"first"
    assert find_call_id(request("In-Reply-To: x", "Call-ID: a")) == b"a"  # "\ni" + 'n': no
    assert find_call_id(request("Call-Info: x", "Call-ID: a")) == b"a"
    assert find_call_id(request("Call-ID:" + " " * 9 + "a")) is None  # more than MAX_SPACE
    assert find_call_id(request("Call-ID:")) is None  # empty value
    assert find_call_id(request("Call-IDx: a", "Call-ID: b")) is None  # first candidate decides
    assert find_call_id(b"Call-ID: a\r\n") is None  # the first line never matches
    assert find_call_id(request("X: " + "y" * 1400, "Call-ID: a")) is None  # beyond WINDOW
    assert find_call_id(b"\r\n\r\n") is None


def test_emergency_number_parse_matches_the_xdp_filter_rules() -> None:
    assert steering.emergency_number(b"INVITE sip:911@h SIP/2.0\r\n") == "911"
    assert steering.emergency_number(b"INVITE SIPS:+1(911)@h SIP/2.0\r\n") == "1911"
    assert steering.emergency_number(b"INVITE tel:9-1-1;phone-context=x SIP/2.0\r\n") == "911"
    assert steering.emergency_number(b"INVITE sip:911 SIP/2.0\r\n") == "911"
    assert steering.emergency_number(b"BYE sip:911@h SIP/2.0\r\n") is None
    assert steering.emergency_number(b"INVITE sip:alice@h SIP/2.0\r\n") is None
    assert steering.emergency_number(b"INVITE sip:1234567890123456@h SIP/2.0\r\n") is None


# -- sockets ----------------------------------------------------------------------------------


@dataclass
class Group:
    """Sockets of one reuseport group; index in ``sockets`` = slot (None: not made)."""

    family: int
    address: str
    port: int
    sockets: list[socket.socket | None]
    senders: list[socket.socket] = field(default_factory=list)

    def send(self, payloads: list[bytes]) -> None:
        for index, payload in enumerate(payloads):
            self.senders[index % len(self.senders)].sendto(payload, (self.address, self.port))

    def landed(self, payloads: list[bytes], timeout: float = 5.0) -> dict[bytes, int]:
        """Send each payload (from the senders in turn) and say which slot's socket got it."""
        self.send(payloads)
        wanted = set(payloads)
        got: dict[bytes, int] = {}
        live = {s.fileno(): slot for slot, s in enumerate(self.sockets) if s is not None}
        by_fd = {s.fileno(): s for s in self.sockets if s is not None}
        deadline = time.monotonic() + timeout
        while len(got) < len(wanted) and time.monotonic() < deadline:
            ready, _, _ = select.select(list(by_fd), [], [], 0.2)
            for fd in ready:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        data = by_fd[fd].recv(65535)
                        assert data not in got, "a datagram arrived twice"
                        got[data] = live[fd]
        assert set(got) == wanted, f"{len(wanted - set(got))} datagrams never arrived"
        return got

    def close(self) -> None:
        for s in [*self.sockets, *self.senders]:
            if s is not None:
                s.close()


def member(family: int, address: str, port: int) -> socket.socket:
    """A socket of the group at address:port (port 0: a new group), with room for bursts."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    s.bind((address, port))
    s.setblocking(False)
    return s


def bind_group(n_sockets: int, family: int = socket.AF_INET, senders: int = 64) -> Group:
    address = "127.0.0.1" if family == socket.AF_INET else "::1"
    sockets: list[socket.socket | None] = []
    port = 0
    for _ in range(n_sockets):
        s = member(family, address, port)
        port = s.getsockname()[1]
        sockets.append(s)
    group = Group(family, address, port, sockets)
    for _ in range(senders):
        sender = socket.socket(family, socket.SOCK_DGRAM)
        sender.bind((address, 0))
        group.senders.append(sender)
    return group


# -- datagrams --------------------------------------------------------------------------------

_KINDS = (
    "INVITE sip:bob@example.net SIP/2.0",
    "SIP/2.0 200 OK",
    "BYE sip:bob@example.net SIP/2.0",
    "CANCEL sip:bob@example.net SIP/2.0",
    "ACK sip:bob@example.net SIP/2.0",
    "SIP/2.0 180 Ringing",
)
_NAMES = ("Call-ID: ", "i: ", "call-id: ", "CALL-ID: ", "cAlL-Id:", "Call-ID :  ", "i:\t", "I :")


def datagram(call_id: str, index: int, *, call_id_after: int = 0) -> bytes:
    """A SIP message carrying ``call_id``, its shape chosen by ``index``; unique per index."""
    start = _KINDS[index % len(_KINDS)]
    name = _NAMES[(index // len(_KINDS)) % len(_NAMES)]
    lines = [
        start,
        f"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK{index}",
        "From: <sip:alice@example.com>;tag=1",
        "To: <sip:bob@example.net>",
    ]
    while sum(len(line) + 2 for line in lines) < call_id_after:
        lines.append("X-Padding: " + "p" * 60)
    lines += [f"{name}{call_id}", f"CSeq: {index} INVITE", "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def request(start: str, call_id: str, branch: str) -> bytes:
    via = f"Via: SIP/2.0/UDP h;branch=z9hG4bK{branch}"
    return f"{start} SIP/2.0\r\n{via}\r\nCall-ID: {call_id}\r\n\r\n".encode()


def call_ids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choice(WORD) for _ in range(rng.randint(8, 40))) + f"@{rng.randint(1, 255)}.h"
        for _ in range(count)
    ]


# -- the loaded program ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pin_dir() -> Iterator[str]:
    path = f"/sys/fs/bpf/cip-test-{unique_tag()}-reuseport"
    try:
        yield path
    finally:
        remove_pins(path)


@pytest.fixture(scope="module")
def loaded(pin_dir: str) -> Iterator[ReuseportSteering]:
    handle = ReuseportSteering.load(workers=4, emergency=EMERGENCY, pin_dir=pin_dir)
    try:
        yield handle
    finally:
        handle.close()


@contextlib.contextmanager
def steered_group(
    loaded: ReuseportSteering,
    workers: int,
    *,
    emergency: bool = True,
    family: int = socket.AF_INET,
    senders: int = 64,
) -> Iterator[Group]:
    """``workers`` normal (+ emergency) sockets, registered in their slots, program attached."""
    loaded.set_workers(workers)
    group = bind_group(2 * workers if emergency else workers, family, senders)
    try:
        loaded.attach(next(s for s in group.sockets if s is not None))
        for slot, s in enumerate(group.sockets):
            assert s is not None
            loaded.register(s, slot % workers, emergency=slot >= workers)
        yield group
    finally:
        group.close()


def counters(loaded: ReuseportSteering) -> Counter[str]:
    return Counter(loaded.counters())


def delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in steering.OUTCOMES if after[k] != before[k]}


# -- steering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.root
@pytest.mark.xdp
def test_each_call_lands_on_its_owner(loaded: ReuseportSteering, workers: int) -> None:
    ids = call_ids(2000, seed=workers)
    payloads = [
        datagram(cid, i, call_id_after=1000 if i % 10 == 9 else 0) for i, cid in enumerate(ids)
    ]
    assert sum(len(p) > 1000 for p in payloads) >= 200
    before = counters(loaded)
    with steered_group(loaded, workers) as group:
        landed = group.landed(payloads)
    wrong = [
        (cid, landed[p]) for cid, p in zip(ids, payloads, strict=True)
        if landed[p] != worker_for(cid, workers)
    ]  # fmt: skip
    assert not wrong, f"{len(wrong)} datagrams on another socket, e.g. {wrong[:3]}"
    assert delta(before, counters(loaded)) == {"steered": 2000}
    spread = Counter(landed.values())
    mean = 2000 / workers
    assert set(spread) == set(range(workers))
    for slot, count in spread.items():
        assert abs(count - mean) <= 0.15 * mean, f"socket {slot}: {count} of 2000 ({spread})"


@pytest.mark.root
@pytest.mark.xdp
def test_one_call_from_many_source_ports_stays_on_one_socket(loaded: ReuseportSteering) -> None:
    with steered_group(loaded, 4) as group:
        for cid in ("a84b4c76e66710@pc33.atlanta.com", "x", "Z" * 128):
            payloads = [datagram(cid, i) for i in range(20)]
            assert len({s.getsockname()[1] for s in group.senders[:20]}) == 20
            landed = group.landed(payloads)
            assert set(landed.values()) == {worker_for(cid, 4)}


@pytest.mark.root
@pytest.mark.xdp
def test_ipv6_is_steered_the_same_way(loaded: ReuseportSteering) -> None:
    ids = call_ids(200, seed=6)
    payloads = [datagram(cid, i) for i, cid in enumerate(ids)]
    with steered_group(loaded, 2, family=socket.AF_INET6) as group:
        landed = group.landed(payloads)
    assert all(landed[p] == worker_for(cid, 2) for cid, p in zip(ids, payloads, strict=True))


@pytest.mark.root
@pytest.mark.xdp
def test_datagrams_without_a_call_id_fall_back_and_are_counted(loaded: ReuseportSteering) -> None:
    payloads = [
        b"\r\n\r\n",  # keep-alive
        b"\r\n",
        b"x",
        bytes(range(256)) * 3,  # garbage
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n",  # no Call-ID
        b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID:\r\n\r\n",  # empty value
        datagram("late@h", 1, call_id_after=1500),  # beyond the scanned window
    ]
    assert all(find_call_id(p) is None for p in payloads)
    before = counters(loaded)
    with steered_group(loaded, 2) as group:
        group.landed(payloads)  # each arrives somewhere (asserted inside)
    assert delta(before, counters(loaded)) == {"fallback_no_callid": len(payloads)}


@pytest.mark.root
@pytest.mark.xdp
def test_emergency_invites_go_to_the_owners_emergency_socket(loaded: ReuseportSteering) -> None:
    ids = call_ids(40, seed=11)
    starts = ("INVITE sip:911@psap", "INVITE tel:9-1-1;phone-context=+1", "INVITE SIPS:+933@x")
    emergency = [request(starts[i % 3], cid, f"e{i}") for i, cid in enumerate(ids[:20])]
    normal = [request("BYE sip:911@psap", cid, f"b{i}") for i, cid in enumerate(ids[:10])]
    normal += [request("INVITE sip:9110@h", cid, f"n{i}") for i, cid in enumerate(ids[20:])]
    before = counters(loaded)
    with steered_group(loaded, 4) as group:
        landed = group.landed(emergency + normal)
    for cid, payload in zip(ids[:20], emergency, strict=True):
        assert landed[payload] == 4 + worker_for(cid, 4), payload[:40]
    for cid, payload in zip(ids[:10] + ids[20:], normal, strict=True):
        assert landed[payload] == worker_for(cid, 4), payload[:40]
    assert delta(before, counters(loaded)) == {"emergency_steered": 20, "steered": 30}


@pytest.mark.root
@pytest.mark.xdp
def test_emergency_without_an_emergency_socket_goes_to_the_owners_normal_socket(
    loaded: ReuseportSteering,
) -> None:
    ids = call_ids(20, seed=12)
    payloads = [
        f"INVITE sip:911@psap SIP/2.0\r\nCall-ID: {cid}\r\nCSeq: {i} INVITE\r\n\r\n".encode()
        for i, cid in enumerate(ids)
    ]
    before = counters(loaded)
    with steered_group(loaded, 2, emergency=False) as group:
        landed = group.landed(payloads)
    assert all(landed[p] == worker_for(cid, 2) for cid, p in zip(ids, payloads, strict=True))
    assert delta(before, counters(loaded)) == {"emergency_to_normal": 20}


@pytest.mark.root
@pytest.mark.xdp
def test_an_empty_slot_falls_back_and_counts_until_the_worker_is_back(
    loaded: ReuseportSteering,
) -> None:

    ids = call_ids(400, seed=13)
    orphans = [cid for cid in ids if worker_for(cid, 2) == 1]
    owned = [cid for cid in ids if worker_for(cid, 2) == 0]
    with steered_group(loaded, 2, emergency=False) as group:
        gone = group.sockets[1]
        assert gone is not None
        gone.close()  # worker 1 restarting: the kernel empties its slot
        group.sockets[1] = None
        assert 1 not in loaded.slots()
        payloads = [datagram(cid, i) for i, cid in enumerate(orphans + owned)]
        before = counters(loaded)
        landed = group.landed(payloads)  # all on the one socket left
        assert set(landed.values()) == {0}
        assert delta(before, counters(loaded)) == {
            "fallback_empty_slot": len(orphans),
            "steered": len(owned),
        }
        # Worker 1 is back: a new socket in its slot gets its calls again.
        back = member(group.family, group.address, group.port)
        group.sockets[1] = back
        loaded.register(back, 1)
        payloads = [datagram(cid, 1000 + i) for i, cid in enumerate(orphans)]
        assert set(group.landed(payloads).values()) == {1}


@pytest.mark.root
@pytest.mark.xdp
@settings(max_examples=300, deadline=None)
@given(
    call_id=st.text(alphabet=WORD, min_size=1, max_size=40)
    | st.integers(120, 200).flatmap(lambda n: st.text(alphabet=WORD, min_size=n, max_size=n)),
    name=st.sampled_from(_NAMES),
)
def test_the_pure_hash_agrees_with_the_kernel(
    loaded: ReuseportSteering, call_id: str, name: str
) -> None:
    with steered_group(loaded, 3, emergency=False, senders=2) as group:
        payload = f"MESSAGE sip:a@b SIP/2.0\r\n{name}{call_id}\r\n\r\n".encode()
        assert group.landed([payload])[payload] == worker_for(call_id, 3)


def at_offset(lf: int, line: bytes) -> bytes:
    """A request whose header ``line`` follows a LF at payload offset ``lf``."""
    head = b"OPTIONS sip:a@b SIP/2.0\r\nP: "
    return head + b"p" * (lf - len(head) - 1) + b"\r\n" + line


# Pairs that straddle one limit of the kernel: the first inside, the second outside.
LIMITS: dict[str, list[tuple[bytes, bytes]]] = {
    "window": [(at_offset(1399, b"Call-ID: w@h\r\n\r\n"), at_offset(1400, b"i: w@h\r\n\r\n"))],
    "space before colon": [
        (
            at_offset(100, b"Call-ID" + b" " * 8 + b": s@h\r\n"),
            at_offset(100, b"Call-ID" + b"\t" * 9 + b": s@h\r\n"),
        )
    ],
    "space after colon": [
        (
            at_offset(100, b"i:" + b" " * 8 + b"s@h\r\n"),
            at_offset(100, b"i:" + b" " * 9 + b"s@h\r\n"),
        )
    ],
    "name at the end": [(b"X\r\ni: abcd", b"X\r\ni: abc")],  # 8 bytes from the LF, or 7
    # Both found: a value is hashed on its first 128 bytes (the last line's LF at 1399, as
    # far as the kernel reads). Sixteen of them, so a chance match of one slot proves nothing.
    "value length": [
        (
            at_offset(1399, b"Call-ID:" + b" " * 8 + prefix + b"v" * 125 + b"1\r\n"),
            at_offset(1399, b"Call-ID:" + b" " * 8 + prefix + b"v" * 126 + b"1\r\n"),
        )
        for prefix in (f"{k:02d}".encode() for k in range(16))
    ],
}


@pytest.mark.root
@pytest.mark.xdp
@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_the_kernel_limits_are_the_models(loaded: ReuseportSteering, limit: str) -> None:
    with steered_group(loaded, 4, senders=2) as group:
        for inside, outside in LIMITS[limit]:
            if limit == "value length":
                assert (find_call_id(inside) or b"").endswith(b"v" * 125 + b"1")
                assert (find_call_id(outside) or b"").endswith(b"v" * 126)  # the "1" is cut
            else:
                assert find_call_id(inside) is not None and find_call_id(outside) is None
            for payload in (inside, outside):
                expected = steering.steer(payload, 4, EMERGENCY)
                before = counters(loaded)
                slot = group.landed([payload])[payload]
                assert delta(before, counters(loaded)) == {expected.outcome: 1}
                assert expected.slot is None or slot == expected.slot


_PIECES = st.sampled_from(
    ["\r\n", "\n", "Call-ID", "call-id", "CALL-ID", "Call-IDx", "i", "I", "In", ":", " ", "\t",
     "abc@h", "x" * 130, "INVITE sip:911@h", "INVITE tel:+9-1-1;x", "BYE ", "\r", "\x00", "é"]
)  # fmt: skip


@pytest.mark.root
@pytest.mark.xdp
@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(_PIECES, max_size=40),
    lead=st.sampled_from(["", "INVITE sip:911@h SIP/2.0\r\n", "SIP/2.0 200 OK\r\n"]),
    pad=st.integers(0, 1500),
)
def test_the_pure_model_predicts_every_kernel_decision(
    loaded: ReuseportSteering, pieces: list[str], lead: str, pad: int
) -> None:
    """Odd datagrams: outcome counter and landing socket as clearip.bpf.steering.steer says."""
    payload = (lead + "P: " + "p" * pad + "\r\n" + "".join(pieces)).encode()
    expected = steering.steer(payload, 2, EMERGENCY)
    with steered_group(loaded, 2, senders=2) as group:
        before = counters(loaded)
        slot = group.landed([payload])[payload]
        assert delta(before, counters(loaded)) == {expected.outcome: 1}
    if expected.slot is not None:
        assert slot == expected.slot


# -- worker processes ---------------------------------------------------------------------------

WORKER = r"""
import json, select, socket, sys
from clearip.bpf.reuseport import WorkerSteering
pin_dir, port, worker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for emergency in (False, True):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    socks.append(s)
handle = WorkerSteering.open(pin_dir)
handle.attach(socks[0])
slots = [handle.register(s, worker, emergency=e) for s, e in zip(socks, (False, True))]
handle.close()
print(json.dumps(slots), flush=True)
got = {}
while True:
    ready, _, _ = select.select([sys.stdin, *socks], [], [])
    for s in socks:
        if s in ready:
            try:
                while True:
                    got[s.recv(65535).decode("latin-1")] = slots[socks.index(s)]
            except BlockingIOError:
                pass
    if sys.stdin in ready and not sys.stdin.readline():
        break
print(json.dumps(got), flush=True)
"""


@pytest.mark.root
@pytest.mark.xdp
def test_workers_in_separate_processes_register_through_the_pinned_maps(
    loaded: ReuseportSteering, pin_dir: str
) -> None:

    loaded.set_workers(2)
    # The port: bound and released here, then taken by the workers.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, pin_dir, str(port), str(k)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).parent.parent,
        )
        for k in range(2)
    ]  # fmt: skip
    try:
        slots = [json.loads(child.stdout.readline()) for child in children]  # type: ignore[union-attr]
        assert slots == [[0, 2], [1, 3]]
        ids = call_ids(400, seed=14)
        payloads = [datagram(cid, i) for i, cid in enumerate(ids)]
        payloads += [
            f"INVITE sip:911@psap SIP/2.0\r\nCall-ID: {cid}\r\nCSeq: {i} INVITE\r\n\r\n".encode()
            for i, cid in enumerate(ids[:20])
        ]
        group = Group(socket.AF_INET, "127.0.0.1", port, [])
        for _ in range(32):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.bind(("127.0.0.1", 0))
            group.senders.append(sender)
        before = counters(loaded)
        group.send(payloads)
        deadline = time.monotonic() + 10
        while delta(before, counters(loaded)) != {"steered": 400, "emergency_steered": 20}:
            assert time.monotonic() < deadline, delta(before, counters(loaded))
            time.sleep(0.05)
        time.sleep(0.2)
        group.close()
        got: dict[str, int] = {}
        for child in children:
            out, _ = child.communicate(timeout=10)
            got.update(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert len(got) == len(payloads)
    for cid, payload in zip(ids, payloads[:400], strict=True):
        assert got[payload.decode("latin-1")] == worker_for(cid, 2)
    for cid, payload in zip(ids[:20], payloads[400:], strict=True):
        assert got[payload.decode("latin-1")] == 2 + worker_for(cid, 2)


# -- loader lifecycle ---------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.xdp
def test_a_reload_reuses_the_pinned_maps_and_registrations(
    loaded: ReuseportSteering, pin_dir: str
) -> None:

    with steered_group(loaded, 2, emergency=False) as group:
        group.landed([datagram("before@h", 1)])
        total = sum(counters(loaded).values())
        again = ReuseportSteering.load(workers=2, emergency=["112"], pin_dir=pin_dir)
        try:
            assert again.emergency_numbers() == ["112"]
            assert sum(counters(again).values()) == total  # the same counters
            cookies = {slot: socket_cookie(s) for slot, s in enumerate(group.sockets) if s}
            assert again.slots() == cookies  # registrations made with the old handle
            assert again.verified_insns is None or 0 < again.verified_insns < 1_000_000
            worker = WorkerSteering.open(pin_dir)
            try:
                assert worker.workers == 2
                worker.attach(group.sockets[0])  # type: ignore[arg-type]  # the new program
            finally:
                worker.close()
            ids = call_ids(50, seed=15)
            landed = group.landed([datagram(cid, i) for i, cid in enumerate(ids)])
            assert all(landed[datagram(cid, i)] == worker_for(cid, 2) for i, cid in enumerate(ids))
        finally:
            again.set_emergency(EMERGENCY)
            again.close()


@pytest.mark.root
@pytest.mark.xdp
def test_a_socket_sits_in_one_slot_and_bad_sockets_are_refused(loaded: ReuseportSteering) -> None:
    with steered_group(loaded, 2, emergency=False, senders=1) as group:
        first, second = group.sockets
        assert first is not None and second is not None
        assert loaded.register(first, 0) == 0  # again in its own slot: nothing changes
        with pytest.raises(OSError, match="in another slot") as raised:
            loaded.register(first, 1)
        assert raised.value.errno == errno.EBUSY
        assert loaded.slots() == {0: socket_cookie(first), 1: socket_cookie(second)}
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as loose,
            pytest.raises(OSError, match="bound UDP socket with SO_REUSEPORT"),
        ):
            loaded.register(loose, 1)  # not bound
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            pytest.raises(ValueError, match="UDP"),
        ):
            loaded.register(tcp, 1)
        with pytest.raises(ValueError, match="worker must be 0 to 1"):
            loaded.register(first, 2)
        assert loaded.unregister(1) is True
        assert loaded.unregister(1) is False
        assert loaded.slots() == {0: socket_cookie(first)}


def test_a_worker_without_a_loaded_program_is_told_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SteeringUnavailable) as raised:
        WorkerSteering.open(tmp_path / "nothing")
    assert "no steering program pinned" in raised.value.reason
    assert "ReuseportSteering.load" in raised.value.fix


def test_bad_arguments_are_refused_before_anything_loads() -> None:
    with pytest.raises(ValueError, match="workers"):
        ReuseportSteering.load(workers=0, pin_dir="/nonexistent")
    with pytest.raises(ValueError, match="emergency number"):
        ReuseportSteering.load(workers=2, emergency=["91a"], pin_dir="/nonexistent")
