"""The relay process killed (SIGKILL) and restarted under load.

Promises checked: calls being set up when the process dies get nothing from it (the switch's
own timers, or its INVITE retransmissions reaching the new process, settle them); calls
already answered keep their BYE path across the restart, because in-dialog requests are
routed statelessly from their Route headers; calls placed after the restart complete.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lab.proxy_harness import PROVIDER_A_IP, SWITCH_IP, proxy_process, wait_for, write_config
from lab.reliability import any_final_uac, emulator, outcomes, uas_any_call
from lab.sipp import free_port, sipp_uas, start_sipp, uac_scenario

pytestmark = [pytest.mark.sipp, pytest.mark.slow]

RATE, SECONDS = 10, 7
LONG_CALLS = 5


def test_sigkill_and_restart_under_load(tmp_path: Path) -> None:
    a_port = free_port(host=PROVIDER_A_IP)
    rules = (
        f'[[rule]]\nname = "route"\naction = "route"\n'
        f'contacts = ["sip:{{dialled}}@{PROVIDER_A_IP}:{a_port}"]\n'
    )
    port = free_port()
    log = tmp_path / "proxy.log"
    with (
        emulator(tmp_path, rules) as ports,
        sipp_uas(
            tmp_path, "a", uas_any_call(), local=(PROVIDER_A_IP, a_port), calls=1000, timeout=60
        ),
    ):
        config = write_config(
            tmp_path, port=port, upstream=f"sip:127.0.0.1:{ports['tcp']};transport=tcp"
        )
        switches = []
        try:
            with proxy_process(config, log) as first:
                long = start_sipp(
                    tmp_path, "long", uac_scenario(200, hold_ms=6000), calls=LONG_CALLS,
                    local=(SWITCH_IP, free_port()), remote=("127.0.0.1", port),
                    service="12125550100", extra=["-r", "10"],
                )  # fmt: skip
                load = start_sipp(
                    tmp_path, "load", any_final_uac(), calls=RATE * SECONDS,
                    local=(SWITCH_IP, free_port()), remote=("127.0.0.1", port),
                    service="12125550100", extra=["-r", str(RATE)], timeout=60,
                )  # fmt: skip
                switches = [long, load]
                wait_for(
                    lambda: len(outcomes(long).finals) == LONG_CALLS, 10, "the long calls answered"
                )
                time.sleep(1.0)
                first.kill()
                first.wait(5)
            killed = time.time()
            time.sleep(0.5)
            with proxy_process(config, log):
                restarted = time.time()
                assert long.wait(30) == 0, long.messages[-3000:]
                load.wait(60)
        finally:
            for switch in switches:
                switch.stop()
    long_seen, seen = outcomes(long), outcomes(load)
    # Answered before the kill, hung up after the restart: every BYE got its 200.
    assert len(long_seen.bye_ok) == LONG_CALLS, long_seen
    assert len(seen.invites) == RATE * SECONDS
    before = {c for c, t in seen.sent_at.items() if t < killed - 1.0}
    after = {c for c, t in seen.sent_at.items() if t > restarted + 0.2}
    assert before and after, (killed, restarted, seen.sent_at)
    assert {seen.finals.get(c) for c in before} == {200}, "a call before the kill failed"
    assert {seen.finals.get(c) for c in after} == {200}, "a call after the restart failed"
    assert seen.bye_ok >= before | after
    # The calls in between (set up while the process died or was starting) were settled by
    # the switch: retransmissions reached the new process, or its own timers gave up.
    in_between = seen.invites - before - after
    assert len(in_between) <= RATE * (restarted - killed + 2.5), in_between
