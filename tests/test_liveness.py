"""The ClearIP link's state machine (sans-IO): keep-alive answers, probes, back-off and kicks.

A small driver plays the shell on a virtual clock: it runs the machine's timers and records
what the machine asked for, so each rule is checked in time without sockets or sleeping.
"""

from __future__ import annotations

import itertools
import random

import pytest

from clearip.relay.service.liveness import (
    ANSWER,
    BACKOFF_CAP,
    JITTER,
    MIN_GAP,
    PING,
    REFUSED,
    RETRY,
    TIMEOUT,
    TLS,
    Action,
    Connect,
    Down,
    LinkState,
    Liveness,
    ProbeLiveness,
    SendPing,
    StartTimer,
    StopTimer,
    StreamLiveness,
    Up,
)


class Driver:
    """The shell on a virtual clock: timers, and a log of (time, action)."""

    def __init__(self, machine: Liveness) -> None:
        self.machine = machine
        self.now = 0.0
        self.timers: dict[str, float] = {}
        self.log: list[tuple[float, Action]] = []

    def apply(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            self.log.append((self.now, action))
            if isinstance(action, StartTimer):
                self.timers[action.name] = self.now + action.delay
            elif isinstance(action, StopTimer):
                self.timers.pop(action.name, None)
        return actions

    def advance(self, until: float, on_action: object = None) -> None:
        """Run the timers due up to ``until``, in order."""
        while self.timers:
            name, due = min(self.timers.items(), key=lambda item: item[1])
            if due > until:
                break
            del self.timers[name]
            self.now = due
            self.apply(self.machine.on_timer(name, due))
        self.now = until

    def at(self, kind: type) -> list[float]:
        return [t for t, action in self.log if isinstance(action, kind)]

    def of(self, kind: type) -> list[Action]:
        return [action for _, action in self.log if isinstance(action, kind)]


def stream(interval: float = 20.0, timeout: float = 10.0, **kwargs: float) -> Driver:
    machine = StreamLiveness(interval=interval, timeout=timeout, rng=random.Random(7), **kwargs)
    return Driver(machine)


def test_a_stream_link_pings_and_stays_up_while_answered() -> None:
    d = stream()
    machine = d.machine
    assert isinstance(machine, StreamLiveness)
    assert d.apply(machine.start(0.0)) == [Connect()]
    assert machine.state is LinkState.CONNECTING
    d.now = 0.1
    assert d.apply(machine.connected(0.1)) == [Up(0.1, 1, True), StartTimer(PING, 20.0)]
    for cycle in range(3):
        d.advance(20.1 + 20 * cycle)  # the ping goes out...
        assert d.log[-2:] == [(d.now, SendPing()), (d.now, StartTimer(ANSWER, 10.0))]
        d.now += 0.05
        d.apply(machine.proof(d.now))  # ...and its pong arrives
    assert machine.state is LinkState.UP
    assert d.at(SendPing) == pytest.approx([20.1, 40.1, 60.1])
    assert not d.of(Down)


def test_any_byte_after_the_ping_counts_and_one_before_it_does_not() -> None:
    d = stream()
    machine = d.machine
    assert isinstance(machine, StreamLiveness)
    d.apply(machine.start(0.0))
    d.apply(machine.connected(0.0))
    d.advance(20.0)
    d.apply(machine.proof(30.0, at=19.9))  # a message read before the ping: no answer
    assert machine.state is LinkState.UP
    d.advance(30.0)
    assert d.of(Down) == [Down("no keep-alive answer within 10 s", True)]
    assert machine.state is LinkState.CONNECTING  # reconnecting at once
    assert d.at(Connect) == [0.0, 30.0]


def test_unanswered_ping_takes_the_link_down_within_interval_plus_timeout() -> None:
    d = stream(interval=0.5, timeout=0.5)
    machine = d.machine
    assert isinstance(machine, StreamLiveness)
    d.apply(machine.start(0.0))
    d.apply(machine.connected(0.0))
    d.advance(1.5)
    assert d.at(Down) == [1.0]
    assert d.log[-1] == (1.0, Connect())  # ...and a new connection is tried straight away


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (REFUSED, [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]),  # cheap: short back-off, capped at 1 s
        (TLS, [BACKOFF_CAP] * 6),  # ClearIP answers but will not talk to us: the cap
        (TIMEOUT, [MIN_GAP] * 6),  # the attempt itself took long enough
    ],
)
def test_back_off_by_kind_of_failure(kind: str, expected: list[float]) -> None:
    d = stream()
    machine = d.machine
    assert isinstance(machine, StreamLiveness)
    d.apply(machine.start(0.0))
    waits = []
    for _ in expected:
        d.now += 0.001  # the attempt fails quickly
        retry = d.apply(machine.failed(d.now, kind))
        assert machine.state is LinkState.DOWN
        assert isinstance(retry[-1], StartTimer)
        waits.append(retry[-1].delay)
        d.advance(d.timers[RETRY])
        assert d.log[-1][1] == Connect()
    for wait, base in zip(waits, expected, strict=True):
        if kind == TIMEOUT:  # no back-off, only the minimum gap between attempt starts
            assert wait == pytest.approx(MIN_GAP - 0.001)
        else:
            assert base * (1 - JITTER) <= wait <= base * (1 + JITTER)


def test_whatever_the_outage_the_link_is_retried_at_least_every_cap_plus_jitter() -> None:
    d = stream()
    machine = d.machine
    assert isinstance(machine, StreamLiveness)
    d.apply(machine.start(0.0))
    d.apply(machine.connected(0.0))
    d.now = 100.0
    d.apply(machine.lost(100.0))  # up 100 s, then ClearIP goes away: refused for 90 s
    d.advance(100.0)
    while d.now < 190.0:
        d.now += 0.001
        d.apply(machine.failed(d.now, REFUSED))
        d.advance(d.timers[RETRY])
    attempts = d.at(Connect)
    gaps = [b - a for a, b in itertools.pairwise(attempts[1:])]
    assert max(gaps) <= BACKOFF_CAP * (1 + JITTER) + 0.002
    assert min(gaps) >= MIN_GAP
    assert d.of(Down) == [Down("connection lost", False)]  # one transition, not one per try


def test_kick_tries_at_once_when_down_and_never_faster_than_the_minimum_gap() -> None:
    d = stream(backoff_start=30.0, backoff_cap=30.0)  # a back-off far longer than the test
    machine = d.machine
    assert isinstance(machine, StreamLiveness)
    d.apply(machine.start(0.0))
    d.apply(machine.failed(0.01, REFUSED))
    assert d.timers[RETRY] > 20.0
    # Calls arrive every 10 ms for 2 s while ClearIP keeps refusing.
    while d.now < 2.0:
        d.now = round(d.now + 0.01, 3)
        d.advance(d.now)
        d.apply(machine.kick(d.now))
        if machine.state is LinkState.CONNECTING:
            d.apply(machine.failed(d.now + 0.001, REFUSED))
    attempts = d.at(Connect)
    assert len(attempts) >= 9  # a call waits at most MIN_GAP for the next attempt...
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert min(gaps) >= MIN_GAP - 1e-9  # ...and ClearIP sees at most five a second


def test_kick_is_ignored_while_an_attempt_is_in_flight_or_the_link_is_up() -> None:
    d = stream()
    machine = d.machine
    assert isinstance(machine, StreamLiveness)
    d.apply(machine.start(0.0))
    assert machine.kick(1.0) == []  # connecting: one attempt at a time
    d.apply(machine.connected(1.0))
    assert machine.kick(2.0) == []


def test_a_connection_lost_soon_after_connecting_backs_off() -> None:
    """A server that accepts and drops at once: the back-off grows as if it refused."""
    d = stream()
    machine = d.machine
    assert isinstance(machine, StreamLiveness)
    d.apply(machine.start(0.0))
    waits = []
    for _ in range(5):
        d.apply(machine.connected(d.now))
        d.now += 0.01
        retry = d.apply(machine.lost(d.now))
        assert isinstance(retry[-1], StartTimer)
        waits.append(retry[-1].delay)
        d.advance(d.timers[RETRY])
    for wait, base in zip(waits, [0.2, 0.4, 0.8, 1.0, 1.0], strict=True):
        assert base * (1 - JITTER) <= wait <= base * (1 + JITTER)
    assert len(d.of(Down)) == 5
    d2 = stream()
    machine2 = d2.machine
    assert isinstance(machine2, StreamLiveness)
    d2.apply(machine2.start(0.0))
    d2.apply(machine2.connected(0.0))
    assert d2.apply(machine2.lost(5.0))[-1] == StartTimer(RETRY, 0.0)  # stable: at once


def probe(interval: float = 1.0, timeout: float = 0.5) -> Driver:
    return Driver(ProbeLiveness(interval=interval, timeout=timeout, rng=random.Random(3)))


def test_a_udp_link_is_up_on_the_first_answer_and_down_after_two_misses() -> None:
    d = probe()
    machine = d.machine
    assert d.apply(machine.start(0.0))[:1] == [SendPing()]
    assert machine.state is LinkState.CONNECTING
    d.now = 0.01
    d.apply(machine.proof(0.01))
    assert machine.state is LinkState.UP and d.of(Up) == [Up(0.01, 1, True)]
    d.advance(1.0)  # probe 2 goes out: ClearIP has gone
    d.advance(1.6)
    assert machine.state is LinkState.UP  # one unanswered probe is tolerated
    d.advance(2.6)
    assert machine.state is LinkState.DOWN
    assert d.at(Down) == [2.5]
    assert d.of(Down)[0] == Down("no answer to 2 OPTIONS probe(s) within 0.5 s each", True)
    d.advance(3.02)  # still probing while down...
    d.apply(machine.proof(3.02))  # ...and up at the next answer
    assert machine.state is LinkState.UP
    assert d.at(SendPing) == [0.0, 1.0, 2.0, 3.0]
    assert d.of(Up)[-1] == Up(pytest.approx(0.52), 1, False)


def test_a_udp_link_whose_first_probe_is_unanswered_starts_down() -> None:
    d = probe()
    machine = d.machine
    d.apply(machine.start(0.0))
    d.advance(0.6)
    assert machine.state is LinkState.DOWN
    assert d.of(Down)[0].reason.startswith("no answer to 1 OPTIONS probe")


def test_kick_sends_a_probe_early_when_none_is_outstanding() -> None:
    d = probe(interval=20.0, timeout=0.5)
    machine = d.machine
    d.apply(machine.start(0.0))
    d.advance(1.0)
    assert machine.state is LinkState.DOWN
    d.apply(machine.kick(1.0))
    assert d.at(SendPing) == [0.0, 1.0]  # not 20.0
    assert machine.kick(1.1) == []  # a probe is outstanding: at most one in flight


def test_a_workers_probe_call_id_is_steered_back_to_it() -> None:
    """Answers to a worker's OPTIONS probe reach that worker: the kernel steers by Call-ID."""
    from clearip.bpf.steering import worker_for
    from clearip.relay.config import UpstreamConfig
    from clearip.relay.service.upstream import UpstreamLink
    from clearip.relay.service.worker_role import WorkerRole
    from clearip.relay.sip.message import Request
    from clearip.relay.transport.endpoint import SipEndpoint

    for index in range(4):
        role = WorkerRole(index=index, count=4, run_dir="/nonexistent")
        endpoint = SipEndpoint(lambda message, peer: None, worker=role)
        config = UpstreamConfig(uri="sip:127.0.0.1:5070;transport=udp")
        link = UpstreamLink("outbound", config, endpoint, lambda: None)
        for _ in range(5):
            probe = link._probe_request("127.0.0.1")
            assert isinstance(probe, Request)
            assert worker_for(probe.call_id, 4) == index
