"""The daemon's timer wheel against a plain model: never early, at most one tick late, one
timer per key, cancellations honoured even between timers due in the same tick."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearip.relay.service.timerwheel import TimerWheel

RES = 0.01


def drain(wheel: TimerWheel[str], now: float) -> list[str]:
    fired = []
    while (key := wheel.pop_due(now)) is not None:
        fired.append(key)
    return fired


def test_a_timer_fires_at_the_end_of_its_tick_never_before() -> None:
    wheel: TimerWheel[str] = TimerWheel(RES)
    due = wheel.start("a", 0.503)
    assert due == pytest.approx(0.51)
    assert wheel.next_tick() == pytest.approx(0.51)
    assert drain(wheel, 0.503) == []  # its deadline, but its tick has not ended
    assert drain(wheel, 0.5101) == ["a"]
    assert len(wheel) == 0 and wheel.next_tick() is None


def test_restarting_moves_a_timer_and_cancelling_an_absent_one_is_a_no_op() -> None:
    wheel: TimerWheel[str] = TimerWheel(RES)
    wheel.start("a", 0.1)
    wheel.start("a", 0.5)
    assert len(wheel) == 1
    assert drain(wheel, 0.2) == []
    assert wheel.cancel("a") is True
    assert wheel.cancel("a") is False
    assert wheel.next_tick() is None  # the emptied ticks are forgotten


def test_a_timer_cancelled_by_another_due_in_the_same_tick_does_not_fire() -> None:
    wheel: TimerWheel[str] = TimerWheel(RES)
    wheel.start("b", 0.1)
    wheel.start("a", 0.1)
    first = wheel.pop_due(0.2)
    assert first == "b"
    wheel.cancel("a")  # what handling "b" did
    assert wheel.pop_due(0.2) is None


def test_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimerWheel(0)


ops = st.lists(
    st.tuples(
        st.sampled_from(["start", "cancel", "advance"]),
        st.sampled_from("abcdef"),
        st.floats(min_value=0, max_value=1, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_the_wheel_agrees_with_a_model(steps: list[tuple[str, str, float]]) -> None:
    wheel: TimerWheel[str] = TimerWheel(RES)
    model: dict[str, float] = {}  # key -> deadline
    now = 0.0
    for op, key, value in steps:
        if op == "start":
            deadline = now + value
            wheel.start(key, deadline)
            model[key] = deadline
        elif op == "cancel":
            assert wheel.cancel(key) == (key in model)
            model.pop(key, None)
        else:
            now += value
            for fired in drain(wheel, now):
                deadline = model.pop(fired)
                assert deadline <= now + 1e-9  # never early
            # nothing whose tick has ended is left behind (at most one tick late)
            assert all(math.ceil(d / RES) * RES > now for d in model.values())
        assert len(wheel) == len(model)
        nxt = wheel.next_tick()
        if model:
            assert nxt == pytest.approx(min(math.ceil(d / RES) * RES for d in model.values()))
        else:
            assert nxt is None
