"""Worker processes (issue #16): the supervisor, Call-ID steering, restarts, degraded mode,
and the operator's view of N workers as one relay (clearipctl, /metrics).

The end-to-end tests run the real ``clearip-proxy run`` (the supervisor and its workers) on
loopback with a steering pin directory of their own, a SIPp switch at ONE address and port,
and a SIPp ClearIP stand-in over UDP, so that ClearIP's answers are steered by their Call-ID
too. Which worker owns a call is predicted with :func:`clearip.bpf.steering.worker_for` from
the Call-IDs in the switch's message log, and checked against each worker's own counters.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clearip.bpf.steering import worker_for
from clearip.ctl.client import Client
from clearip.relay.config import ConfigError, ProxyConfig, cpu_workers
from clearip.relay.config_toml import config_from_data
from clearip.relay.proxy.latency import LatencyHistogram
from clearip.relay.service.fleet import (
    WorkerView,
    merge_snapshots,
    merge_stats,
    merge_status,
    merge_upstreams,
    workers_block,
)
from clearip.relay.service.kernel_steering import bpffs_problem
from clearip.relay.service.metrics import registry_for
from clearip.relay.service.reload import plan_reload
from clearip.relay.service.worker_role import WorkerRole
from clearip.relay.service.workers import exit_status
from clearip.relay.transport.peer import ListenerSpec
from lab.netns import loopback_namespace, ns_exec, unique_tag
from lab.proxy_harness import SWITCH_IP, proxy_process, stop_process, wait_for, write_config
from lab.reliability import any_final_uac, outcomes
from lab.sipp import (
    _ACK_NON2XX,
    _HEAD,
    _INVITE,
    _REPLY,
    SDP,
    clearip_scenario,
    free_port,
    sipp_uas,
    start_sipp,
    uac_cancel_scenario,
    uac_scenario,
    uas_scenario,
)

DIALLED = "12125550100"
# Every INVITE gets a transaction (no overload shedding, no per-source limit), so the
# per-worker counters are exactly the calls each worker owns.
COUNT_EVERY_INVITE = "overload_queue_delay = 0\ninvite_rate_per_source = 0\n"
# Loading the steering program needs root and bcc (the "xdp" prerequisites).
STEERING = [pytest.mark.root, pytest.mark.xdp]
E2E = [*STEERING, pytest.mark.sipp, pytest.mark.slow]


F = TypeVar("F", bound=Callable[..., Any])


def _marked(*marks: pytest.MarkDecorator) -> Callable[[F], F]:
    def apply(test: F) -> F:
        for mark in marks:
            test = mark(test)
        return test

    return apply


# -- configuration ------------------------------------------------------------------------------


def test_workers_is_auto_or_a_count_and_needs_a_restart() -> None:
    assert ProxyConfig().workers == "auto"
    assert ProxyConfig().worker_count() == cpu_workers() >= 1
    assert config_from_data({"proxy": {"workers": 3}}).worker_count() == 3
    assert config_from_data({"proxy": {"workers": "auto"}}).worker_count() == cpu_workers()
    for bad in (0, -1, 129, "four", True, 2.0):
        with pytest.raises(ConfigError, match=r'proxy\.workers = .* "auto"'):
            config_from_data({"proxy": {"workers": bad}})
    plan = plan_reload(ProxyConfig(workers=2), ProxyConfig(workers=4))
    assert [c.key for c in plan.restart] == ["proxy.workers"] and plan.config.workers == 2


def test_the_run_dir_defaults_to_the_control_sockets_directory() -> None:
    assert ProxyConfig().worker_run_dir() == "/run/clearip-proxy"
    assert ProxyConfig(control_socket="/x/y/c.sock").worker_run_dir() == "/x/y"
    assert ProxyConfig(control_socket="").worker_run_dir() == "/run/clearip-proxy"
    assert ProxyConfig(run_dir="/r").worker_run_dir() == "/r"


def test_steering_pin_dirs_are_names_bpffs_accepts() -> None:
    role = WorkerRole(0, 2, "/run/x", "/sys/fs/bpf/p")
    assert role.steering_dir(ListenerSpec("udp", "127.0.0.1", 5060)) == (
        "/sys/fs/bpf/p/udp-127_0_0_1-5060"
    )
    assert role.steering_dir(ListenerSpec("udp", "::", 5060)) == "/sys/fs/bpf/p/udp-__-5060"
    assert bpffs_problem("/sys/fs/bpf/anything") is None
    assert "not on the bpf file system" in str(bpffs_problem("/tmp/pins"))


def test_exit_status_names_the_signal() -> None:
    assert exit_status(-9) == "killed by SIGKILL"
    assert exit_status(1) == "exited with status 1"


# -- sums over workers (pure) ---------------------------------------------------------------------


def _view(index: int, answer: dict[str, Any] | None, state: str = "up") -> WorkerView:
    return WorkerView(index, 100 + index, state, index, answer)


def test_status_sums_the_workers_and_shows_each() -> None:
    def status(calls: int, clearip: str) -> dict[str, Any]:
        return {
            "listeners": ["udp:127.0.0.1:5060"],
            "upstreams": {"switch": {"uri": "sip:c", "state": clearip}},
            "active_calls": calls,
            "active_transactions": 2 * calls,
            "connections": 1,
        }

    views = [_view(0, status(3, "up")), _view(1, status(4, "down")), _view(2, None)]
    own = {"uptime_s": 1.0, "trust_entries": 5, "kernel_filter": "off (x)", "emergency_numbers": []}
    merged = merge_status(views, own, workers_block(3, views, "on (udp)", restarts=2))
    assert (merged["active_calls"], merged["active_transactions"], merged["connections"]) == (
        7,
        14,
        2,
    )
    assert merged["workers"] == {
        "configured": 3,
        "running": 2,
        "steering": "on (udp)",
        "restarts": 2,
    }
    assert merged["upstreams"]["switch"]["state"] == "down"  # not up in every worker
    assert merged["trust_entries"] == 5
    assert merged["per_worker"]["1"]["upstreams"] == {"switch": "down"}
    assert merged["per_worker"]["2"]["state"] == "not answering"
    assert merge_upstreams([{"s": {"uri": "u", "state": "up"}}] * 2)["s"]["state"] == "up"
    # A worker still starting owns calls that cannot be relayed yet: not up as a whole.
    starting = merge_upstreams([{"s": {"uri": "u", "state": "up"}}], silent=1)["s"]
    assert (starting["state"], starting["up"]) == ("starting", 1)


def test_stats_and_metrics_sum_counters_and_keep_a_worker_label() -> None:
    def snapshot(calls: int) -> dict[str, Any]:
        latency = LatencyHistogram()
        latency.observe(0.02)
        return {
            "counters": {"call:switch:503:relayed": calls, "stray_response": 0},
            "latency": latency.as_dict(),
            "active_calls": 1,
            "active_transactions": 1,
            "connections": 0,
            "upstreams": {"switch": {"uri": "sip:c", "state": "up"}},
        }

    views = [_view(0, snapshot(10)), _view(1, snapshot(12))]
    block = workers_block(2, views, "on")
    state = merge_snapshots(
        views,
        Counter({"worker_restarts": 1}),
        {"trust_entries": 3, "kernel": None},
        block,
        {"udp:127.0.0.1:5060": {"steered": 40}},
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(
            generate_latest(registry_for(lambda: state)).decode()
        )
        for s in family.samples
    }
    assert (
        samples[
            ("clearip_calls_total", (("reason", "relayed"), ("role", "switch"), ("status", "503")))
        ]
        == 22
    )
    calls = "clearip_worker_calls_total"
    assert samples[(calls, (("role", "switch"), ("status", "503"), ("worker", "1")))] == 12
    assert samples[("clearip_worker_restarts_total", (("worker", "1"),))] == 1
    assert samples[("clearip_upstream_response_seconds_count", ())] == 2
    assert samples[("clearip_workers_running", ())] == 2
    assert samples[("clearip_active_calls", ())] == 2
    outcome = (("listener", "udp:127.0.0.1:5060"), ("outcome", "steered"))
    assert samples[("clearip_steering_datagrams_total", outcome)] == 40
    stats = merge_stats(
        [_view(0, {"relay": {"a": 1}}), _view(1, {"relay": {"a": 2, "b": 1}})],
        Counter({"worker_restarts": 1}),
        None,
        {},
    )
    assert stats["relay"] == {"a": 3, "b": 1, "worker_restarts": 1}
    assert stats["per_worker"] == {"0": {"a": 1}, "1": {"a": 2, "b": 1}}


def test_the_single_process_metrics_are_unchanged() -> None:
    state = {
        "counters": Counter(),
        "latency": LatencyHistogram(),
        "active_calls": 0,
        "active_transactions": 0,
        "connections": 0,
        "trust_entries": 0,
        "upstreams": {},
        "kernel": None,
    }
    assert b'worker="' not in generate_latest(registry_for(lambda: state))


# -- one process when workers = 1 ---------------------------------------------------------------


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_one_worker_is_todays_single_process(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=free_port(), upstream="sip:127.0.0.1:9;transport=tcp")
    with proxy_process(config, tmp_path / "proxy.log") as process:
        assert _children(process.pid) == []
        status = Client(str(tmp_path / "control.sock")).call("status")["result"]
        assert "workers" not in status and "per_worker" not in status
    assert "supervisor" not in (tmp_path / "proxy.log").read_text()


# -- the supervisor and its workers ---------------------------------------------------------------


@dataclass
class Relay:
    process: subprocess.Popen[bytes]
    dir: Path
    log: Path
    config: Path
    port: int
    workers: int
    pins: str
    ns: str | None = None  # the network namespace it runs in (None: this one)

    def ask(self, cmd: str, **fields: Any) -> Any:
        reply = Client(str(self.dir / "control.sock")).call(cmd, **fields)
        assert reply.get("ok"), reply
        return reply["result"]

    def ask_worker(self, index: int, cmd: str, **fields: Any) -> dict[str, Any]:
        return Client(str(self.dir / f"worker-{index}.sock")).call(cmd, **fields)

    def per_worker(self, counter: str) -> list[int]:
        per = self.ask("stats")["per_worker"]
        return [int(per[str(i)].get(counter, 0)) for i in range(self.workers)]

    def pids(self) -> dict[int, int | None]:
        per = self.ask("status")["per_worker"]
        return {i: per[str(i)]["pid"] for i in range(self.workers)}

    def wait_idle(self, timeout: float) -> tuple[int, int]:
        """Wait until no worker has a call or a transaction left; returns the totals."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.ask("status")
            state = (status["active_calls"], status["active_transactions"])
            running = status["workers"]["running"]
            if (state == (0, 0) and running == self.workers) or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", self.log.read_text())
        assert found, "no metrics endpoint in the log"
        url = f"http://127.0.0.1:{found.group(1)}/metrics"
        if self.ns is None:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
        else:  # its loopback is the namespace's: fetched from in there
            fetch = "import sys, urllib.request as u; print(u.urlopen(sys.argv[1]).read().decode())"
            text = subprocess.run(
                [*ns_exec(self.ns), sys.executable, "-c", fetch, url],
                capture_output=True, text=True, check=True, timeout=30,
            ).stdout  # fmt: skip
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@contextlib.contextmanager
def supervised(
    directory: Path, workers: int, upstream: str, *, pins: str | None = None, ns: str | None = None
) -> Iterator[Relay]:
    """``clearip-proxy run`` with ``workers`` processes and steering pinned in a directory
    of the test's own (removed afterwards); ``ns``: inside that network namespace."""
    from clearip.bpf.reuseport import remove_pins

    pin_dir = pins or f"/sys/fs/bpf/cip-test-{unique_tag()}-workers"
    port = free_port()
    config = write_config(
        directory,
        port=port,
        upstream=upstream,
        workers=workers,
        proxy_extra=COUNT_EVERY_INVITE + f"steering_pin_dir = {json.dumps(pin_dir)}\n",
    )
    log = directory / "proxy.log"
    try:
        with proxy_process(config, log, prefix=ns_exec(ns) if ns else ()) as process:
            yield Relay(process, directory, log, config, port, workers, pin_dir, ns)
    finally:
        if pins is None:
            remove_pins(pin_dir)


def _owners(call_ids: set[str], workers: int) -> list[int]:
    owners = Counter(worker_for(call_id, workers) for call_id in call_ids)
    return [owners[i] for i in range(workers)]


def _assert_owned(relay: Relay, call_ids: set[str], counts: list[int]) -> None:
    """Each worker handled exactly the calls the kernel's hash gives it, and the spread is
    within 15% of the mean."""
    assert counts == _owners(call_ids, relay.workers), (counts, relay.log.read_text()[-3000:])
    mean = len(call_ids) / relay.workers
    assert all(abs(c - mean) <= 0.15 * mean for c in counts), counts


def _assert_no_strays(relay: Relay) -> None:
    per = relay.ask("stats")["per_worker"]
    for index, counters in per.items():
        for name in ("stray_response", "stray_ack", "in_dialog_ack"):
            assert counters.get(name, 0) == 0, (index, name, counters)


def _clearip_udp(
    directory: Path, scenario: str, calls: int, name: str = "clearip", ns: str | None = None
) -> Any:
    port = free_port()
    uas = sipp_uas(
        directory, name, scenario, local=("127.0.0.1", port), calls=calls, timeout=180,
        extra=["-aa"],  # answers the workers' OPTIONS liveness probes
        prefix=ns_exec(ns) if ns else None,
    )  # fmt: skip
    return port, uas


@pytest.fixture
def lo_ns() -> Iterator[str]:
    """A network namespace of the test's own with only its loopback: the relay, its
    workers and every SIPp peer run in there, away from the host's traffic and ports."""
    with loopback_namespace() as loopback:
        yield loopback.ns


@pytest.mark.parametrize("transport", ["u1", "t1"])
@pytest.mark.parametrize("workers", [2, 4])
@_marked(*E2E, pytest.mark.netns)
def test_one_switch_address_spreads_its_calls_over_every_worker(
    tmp_path: Path, workers: int, transport: str, lo_ns: str
) -> None:
    """2,000 calls from ONE SIPp switch (one address and port; over TCP one connection):
    every call completes, each worker handles the calls its Call-IDs give it (within 15% of
    the mean), and no message of a call reaches another worker (no strays)."""
    calls = 2000
    clearip_port, clearip = _clearip_udp(tmp_path, clearip_scenario(503), calls, ns=lo_ns)
    upstream = f"sip:127.0.0.1:{clearip_port};transport=udp"
    with clearip, supervised(tmp_path, workers, upstream, ns=lo_ns) as relay:
        switch = start_sipp(
            tmp_path, "switch", uac_scenario(503), local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", relay.port), service=DIALLED, calls=calls, transport=transport,
            extra=["-r", "200"], timeout=150, prefix=ns_exec(lo_ns),
        )  # fmt: skip
        code = switch.wait(180)
        seen = outcomes(switch)
        assert code == 0, (seen.by_status(), switch.messages[-3000:])
        assert len(seen.invites) == calls and not seen.unanswered
        assert seen.by_status() == {503: calls}
        invites = relay.per_worker("invite_switch")
        _assert_owned(relay, seen.invites, invites)
        _assert_no_strays(relay)
        stats = relay.ask("stats")
        (steering,) = stats["steering"].values()
        assert steering["fallback_no_callid"] == steering["fallback_empty_slot"] == 0, steering
        # ClearIP's 503 of every call, plus the switch's INVITE and ACK over UDP.
        assert steering["steered"] >= (3 if transport == "u1" else 1) * calls, steering
        if transport == "t1":
            # One connection, every worker: the messages of the other workers' calls were
            # handed over by the worker that holds the connection (and their answers back).
            sent = sum(relay.per_worker("handoff_sent"))
            received = sum(relay.per_worker("handoff_received"))
            assert sent == received >= calls * (workers - 1) / workers * 0.8, (sent, received)
        _assert_operator_views(relay, invites)
        assert relay.wait_idle(60) == (0, 0)  # Timer D: 32 s after ClearIP's 503 over UDP


def _assert_operator_views(relay: Relay, invites: list[int]) -> None:
    """``clearipctl status``/``stats`` and ``/metrics``: totals and one view per worker."""
    total = sum(invites)
    ctl = [sys.executable, "-m", "clearip.ctl.cli", "--socket", str(relay.dir / "control.sock")]
    status = subprocess.run([*ctl, "status"], capture_output=True, text=True, check=True).stdout
    assert re.search(rf"workers\.running\s+{relay.workers}\n", status), status
    assert re.search(r"WORKER\s+PID\s+STATE\s+RESTARTS\s+CALLS", status), status
    for index in range(relay.workers):
        assert re.search(rf"\n{index}\s+\d+\s+up\s+0\s", status), status
    stats = subprocess.run([*ctl, "stats"], capture_output=True, text=True, check=True).stdout
    workers = r"\s+".join(f"WORKER {i}" for i in range(relay.workers))
    assert re.search(rf"COUNTER\s+TOTAL\s+{workers}", stats), stats
    counts = r"\s+".join(str(n) for n in invites)
    assert re.search(rf"\ninvite_switch\s+{total}\s+{counts}\n", stats), stats
    metrics = relay.metrics()
    # ClearIP's 503 relayed, or (a slow ClearIP on a loaded machine) our own fail-open 503.
    answered = sum(
        value
        for (name, labels), value in metrics.items()
        if name == "clearip_calls_total" and ("role", "switch") in labels
        and ("status", "503") in labels
    )  # fmt: skip
    assert answered == total
    assert metrics[("clearip_workers_running", ())] == relay.workers
    for index, count in enumerate(invites):
        labels = (("role", "switch"), ("status", "503"), ("worker", str(index)))
        assert metrics[("clearip_worker_calls_total", labels)] == count
        assert metrics[("clearip_worker_up", (("worker", str(index)),))] == 1


def _minus(after: list[int], before: list[int]) -> list[int]:
    return [a - b for a, b in zip(after, before, strict=True)]


def _clearip_answering_cancel() -> str:
    """ClearIP that answers 100 and waits: a CANCEL gets 200, then the INVITE 487."""
    xml = _HEAD.format(name="clearip-cancel") + '  <recv request="INVITE" crlf="true"/>\n'
    xml += _REPLY.format(code=100, reason="Trying", extra="")
    xml += '  <recv request="CANCEL"/>\n' + _REPLY.format(code=200, reason="OK", extra="")
    xml += _REPLY.format(code=487, reason="Request Terminated", extra="").replace(
        "[last_CSeq:]", "CSeq: 1 INVITE"
    )
    return xml + '  <recv request="ACK"/>\n</scenario>\n'


def _clearip_slow_503(pause_ms: int) -> str:
    """A ClearIP that answers 503 after ``pause_ms``. Like any UDP UAS (RFC 3261 §17.2.1,
    Timer G) it retransmits its final every 500 ms until the ACK: a 503 that was in a killed
    worker's socket queue still comes again, to a worker that is alive."""
    xml = _HEAD.format(name="clearip-slow") + '  <recv request="INVITE" crlf="true"/>\n'
    xml += _REPLY.format(code=100, reason="Trying", extra="")
    xml += f'  <pause milliseconds="{pause_ms}"/>\n'
    xml += _REPLY.format(code=503, reason="Service Unavailable", extra="").replace(
        "<send>", '<send retrans="500">', 1
    )
    return xml + '  <recv request="ACK"/>\n</scenario>\n'


def _switch_retransmitting() -> str:
    """A switch whose INVITE is sent twice (the same branch: a retransmission) after the
    100; the final (503) is ACKed. SIPp's [branch-N] reuses element N back's branch."""
    invite, _ = _INVITE.format(caller="14045550100", sdp=SDP).split("  <recv", 1)
    xml = _HEAD.format(name="switch-retransmit") + invite
    xml += '  <recv response="100"/>\n  <pause milliseconds="100"/>\n'
    xml += invite.replace('<send retrans="500">', "<send>").replace("[branch]", "[branch-3]")
    xml += '  <recv response="100" optional="true"/>\n  <recv response="503"/>\n'
    return (
        xml
        + _ACK_NON2XX.format(caller="14045550100").replace("[branch-5]", "[branch-6]")
        + ("</scenario>\n")
    )


@pytest.mark.parametrize("workers", [2])
@_marked(*E2E, pytest.mark.netns)
def test_cancel_and_retransmissions_reach_the_calls_owner(
    tmp_path: Path, workers: int, lo_ns: str
) -> None:
    """A CANCEL from the switch, ClearIP's 200 and 487, and a retransmitted INVITE all reach
    the worker that owns the call: every CANCEL gets 200 (none 481), each worker cancels and
    absorbs the retransmissions of its own calls, nothing is stray."""
    calls = 200
    clearip_port = free_port()
    upstream = f"sip:127.0.0.1:{clearip_port};transport=udp"
    # The UDP ClearIP answers the workers' OPTIONS probes (-aa) and is there before they start.
    first = contextlib.ExitStack()
    first.enter_context(
        sipp_uas(
            tmp_path,
            "clearip-cancel",
            _clearip_answering_cancel(),
            local=("127.0.0.1", clearip_port),
            calls=calls,
            timeout=120,
            extra=["-aa"],
            prefix=ns_exec(lo_ns),
        )
    )
    with first, supervised(tmp_path, workers, upstream, ns=lo_ns) as relay:
        switch = start_sipp(
            tmp_path, "switch-cancel", uac_cancel_scenario(wait_for_ringing=False),
            local=(SWITCH_IP, free_port()), remote=("127.0.0.1", relay.port),
            service=DIALLED, calls=calls, extra=["-r", "50"], timeout=100,
            prefix=ns_exec(lo_ns),
        )  # fmt: skip
        assert switch.wait(120) == 0, switch.messages[-3000:]
        cancelled = outcomes(switch)
        assert cancelled.by_status() == {487: calls}
        assert relay.per_worker("cancelled") == _owners(cancelled.invites, workers)
        # ClearIP's 487, after the relay answered the switch itself: at the owner, counted late
        # (a 487 that loses the race with the client transaction's end is absorbed by it).
        late, owners = (
            relay.per_worker("clearip_late_response"),
            _owners(cancelled.invites, workers),
        )
        assert all(got <= want for got, want in zip(late, owners, strict=True)), (late, owners)
        assert sum(late) >= 0.95 * calls, late
        first.close()  # the port is free for the next stand-in
        invites_before = relay.per_worker("invite_switch")
        retrans_before = relay.per_worker("invite_retransmission")
        with sipp_uas(
            tmp_path, "clearip-slow", _clearip_slow_503(400), local=("127.0.0.1", clearip_port),
            calls=calls, timeout=120, extra=["-aa"], prefix=ns_exec(lo_ns),
        ):  # fmt: skip
            switch = start_sipp(
                tmp_path, "switch-retransmit", _switch_retransmitting(),
                local=(SWITCH_IP, free_port()), remote=("127.0.0.1", relay.port),
                service=DIALLED, calls=calls, extra=["-r", "50", "-nr"], timeout=100,
                prefix=ns_exec(lo_ns),
            )  # fmt: skip
            assert switch.wait(120) == 0, switch.messages[-3000:]
        retransmitted = outcomes(switch)
        assert retransmitted.by_status() == {503: calls}
        owners = _owners(retransmitted.invites, workers)
        invites = _minus(relay.per_worker("invite_switch"), invites_before)
        retrans = _minus(relay.per_worker("invite_retransmission"), retrans_before)
        assert invites == owners, "a retransmission reached another worker: a second call"
        assert retrans == owners, "each worker absorbs the retransmissions of its own calls"
        _assert_no_strays(relay)
        assert relay.wait_idle(60) == (0, 0)


@_marked(*E2E, pytest.mark.netns)
def test_a_killed_worker_is_back_and_the_others_calls_go_on(tmp_path: Path, lo_ns: str) -> None:
    """SIGKILL of worker 1 while a switch places 50 calls/s. Expected: every call owned by
    worker 0 completes; worker 1 is back (new pid, up) within 2 s; every INVITE gets a final
    from the relay. The calls worker 1 had between its 100 Trying and ClearIP's answer died
    with it, but ClearIP's answer (or its retransmission) still comes, to worker 0 while
    worker 1 is away or to the new worker 1: it goes on to the switch (proxy/orphans.py).
    Calls placed while it is away go to worker 0 (the kernel's fallback) and complete."""
    rate, seconds, workers = 50, 12, 2
    calls = rate * seconds
    # ClearIP answers after 300 ms: some 15 calls are waiting for it in each worker at the kill.
    clearip_port, clearip = _clearip_udp(tmp_path, _clearip_slow_503(300), calls, ns=lo_ns)
    upstream = f"sip:127.0.0.1:{clearip_port};transport=udp"
    with clearip, supervised(tmp_path, workers, upstream, ns=lo_ns) as relay:
        switch = start_sipp(
            tmp_path, "switch", any_final_uac(), local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", relay.port), service=DIALLED, calls=calls,
            extra=["-r", str(rate), "-recv_timeout", "8000"], timeout=120,
            prefix=ns_exec(lo_ns),
        )  # fmt: skip
        time.sleep(seconds / 3)
        victim = relay.pids()[1]
        assert victim is not None
        calls_before = _calls_total(relay)
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()

        def back() -> bool:
            view = relay.ask("status")["per_worker"]["1"]
            return view["state"] == "up" and view["pid"] not in (None, victim)

        wait_for(back, 10, "worker 1 back")
        assert time.monotonic() - started <= 2.0, "worker 1 took more than 2 s to come back"
        switch.wait(150)
        seen = outcomes(switch)
        assert len(seen.invites) == calls
        assert not seen.unanswered, (seen.unanswered, killed_at)  # every INVITE: a final
        # ... the calls worker 1 lost among them, by ClearIP's answers coming to a worker
        # that does not have their state.
        assert sum(relay.per_worker("orphan_response_forwarded")) >= 1
        log = relay.log.read_text()
        assert f"worker 1 (pid {victim}) killed by SIGKILL: restarting it" in log
        status = relay.ask("status")
        assert status["workers"]["running"] == workers and status["workers"]["restarts"] == 1
        assert status["per_worker"]["0"]["restarts"] == 0
        assert status["per_worker"]["1"]["restarts"] == 1
        assert relay.ask("stats")["relay"]["worker_restarts"] == 1
        assert relay.metrics()[("clearip_worker_restarts_total", (("worker", "1"),))] == 1
        # The summed counters carry on past the restart: what worker 1 had counted stays in
        # the totals (all but what it counted between the last scrape and its death).
        calls_after = _calls_total(relay)
        assert calls_before <= calls_after and calls_after >= len(seen.finals) - rate
        assert relay.wait_idle(60) == (0, 0)


def _calls_total(relay: Relay) -> float:
    return sum(v for (name, _), v in relay.metrics().items() if name == "clearip_calls_total")


def _invite(call_id: str, local: tuple[str, int], proxy_port: int) -> bytes:
    host, port = local
    return (
        f"INVITE sip:{DIALLED}@127.0.0.1:{proxy_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-{call_id}\r\n"
        f"From: <sip:14045550100@{host}>;tag=t-{call_id}\r\n"
        f"To: <sip:{DIALLED}@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        f"Contact: <sip:switch@{host}:{port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _options(proxy_port: int, call_id: str) -> None:
    """An OPTIONS for the relay itself from the switch's address (the answer is not read)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((SWITCH_IP, 0))
        host, port = sock.getsockname()
        sock.sendto(
            f"OPTIONS sip:127.0.0.1:{proxy_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-{call_id}-{time.monotonic_ns()}\r\n"
            f"From: <sip:switch@{host}>;tag=o\r\nTo: <sip:127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n".encode(),
            ("127.0.0.1", proxy_port),
        )


def _time_to_final(proxy_port: int, call_id: str) -> tuple[int, float]:
    """Send one INVITE from the switch's address; the final's status and how long it took
    (the final is ACKed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((SWITCH_IP, 0))
        sock.settimeout(10)
        local = sock.getsockname()
        invite = _invite(call_id, local, proxy_port)
        started = time.monotonic()
        sock.sendto(invite, ("127.0.0.1", proxy_port))
        while True:
            data = sock.recv(65535)
            status = int(data[8:11])
            if status >= 200:
                break
        elapsed = time.monotonic() - started
        to = re.search(rb"\r\nTo: ([^\r]*)", data)
        assert to is not None
        ack = invite.replace(b"INVITE sip", b"ACK sip", 1).replace(b"1 INVITE", b"1 ACK")
        ack = ack.replace(f"To: <sip:{DIALLED}@127.0.0.1>".encode(), b"To: " + to.group(1))
        sock.sendto(ack, ("127.0.0.1", proxy_port))
    return status, elapsed


@_marked(*E2E)
def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    """A reload (SIGHUP to the supervisor) changes upstream_timeout in every worker: a call
    owned by each of them fails open after the new timeout, not the old one. The trace of
    the supervisor merges the workers' traces."""
    clearip_port = free_port("tcp")
    upstream = f"sip:127.0.0.1:{clearip_port};transport=tcp"
    with (
        sipp_uas(
            tmp_path, "clearip", uas_scenario(0), local=("127.0.0.1", clearip_port),
            transport="t1", calls=10,
        ),
        supervised(tmp_path, 2, upstream) as relay,
    ):  # fmt: skip
        text = relay.config.read_text()
        relay.config.write_text(text.replace("upstream_timeout = 1.5", "upstream_timeout = 0.5"))
        relay.process.send_signal(signal.SIGHUP)
        for index in range(2):
            wait_for(
                lambda i=index: (
                    f"worker-{i} clearip.daemon: reload: proxy.upstream_timeout: "
                    "1.5 -> 0.5" in relay.log.read_text()
                ),
                10,
                f"worker {index} reloaded",
            )
        with _tracing(relay) as records:
            call_ids = []
            for index in range(2):
                call_id = next(f"hup-{n}" for n in range(99) if worker_for(f"hup-{n}", 2) == index)
                status, elapsed = _time_to_final(relay.port, call_id)
                assert status == 503 and 0.4 <= elapsed < 1.2, (index, status, elapsed)
                call_ids.append(call_id)
            # One trace (the supervisor's socket) shows the calls of both workers.
            wait_for(lambda: {r["call_id"] for r in records} >= set(call_ids), 5, "traced")
        reload = subprocess.run(
            [sys.executable, "-m", "clearip.relay.cli", "reload", "--config", str(relay.config)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert (reload.returncode, reload.stdout) == (0, "no changes\n"), reload.stderr
        assert relay.wait_idle(20) == (0, 0)


@contextlib.contextmanager
def _tracing(relay: Relay) -> Iterator[list[dict[str, Any]]]:
    """``trace`` on the supervisor's socket: the records it streams, as they come."""
    records: list[dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(relay.dir / "control.sock"))
        sock.sendall(b'{"cmd": "trace"}\n')
        stream = sock.makefile("rb")
        assert json.loads(stream.readline())["ok"]

        def read() -> None:
            with contextlib.suppress(OSError, ValueError):
                for line in stream:
                    records.append(json.loads(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # The supervisor subscribes to each worker: ping each until its trace flows.
        for index in range(relay.workers):
            ping = next(
                f"ping-{n}" for n in range(99) if worker_for(f"ping-{n}", relay.workers) == index
            )
            deadline = time.monotonic() + 10
            while ping not in {r["call_id"] for r in records}:
                assert time.monotonic() < deadline, f"no trace from worker {index}"
                _options(relay.port, ping)
                time.sleep(0.2)
        yield records
        sock.shutdown(socket.SHUT_RDWR)
    reader.join(5)


@_marked(*STEERING, pytest.mark.slow)
def test_trust_and_emergency_changes_reach_every_worker(tmp_path: Path) -> None:
    """clearipctl talks to the supervisor: it writes the trust file and the emergency state
    once, updates the steering program's emergency map, and every worker takes the change;
    a worker's own socket refuses to change them. ``clearipctl steering remove`` unpins the
    program once the service is stopped."""
    from clearip.bpf import bpfmaps, syscall
    from clearip.bpf.reuseport import remove_pins

    pins = f"/sys/fs/bpf/cip-test-{unique_tag()}-workers"
    ctl = [sys.executable, "-m", "clearip.ctl.cli", "--socket", str(tmp_path / "control.sock")]
    unpin = [*ctl, "steering", "remove", "--pin-dir", pins]
    try:
        with supervised(tmp_path, 2, "sip:127.0.0.1:9;transport=tcp", pins=pins) as relay:
            for args in (
                ["trust", "add", "192.0.2.0/24", "--role", "provider"],
                ["emergency", "add", "112"],
            ):
                done = subprocess.run([*ctl, *args], capture_output=True, text=True, check=False)
                assert done.returncode == 0, done.stderr
            for index in range(2):
                trust = relay.ask_worker(index, "trust.list")["result"]
                assert {"cidr": "192.0.2.0/24", "role": "provider", "note": ""} in trust
                assert "112" in relay.ask_worker(index, "emergency.list")["result"]
                refused = relay.ask_worker(
                    index, "trust.add", cidr="198.51.100.0/24", role="switch"
                )
                assert not refused["ok"] and "supervisor" in refused["error"]
            assert (tmp_path / "trust.toml").read_text().count("192.0.2.0/24") == 1
            assert '"112"' in (tmp_path / "emergency.toml").read_text()
            (maps,) = Path(relay.pins).glob("udp-*/maps-*")
            fd = syscall.obj_get(str(maps / "emergency"))
            try:
                numbers = {k.rstrip(b"\0").decode() for k in bpfmaps.keys(fd, 16)}
            finally:
                os.close(fd)
            assert numbers == {"112", "911", "933"}
            status = relay.ask("status")
            assert status["trust_entries"] == 4 and "112" in status["emergency_numbers"]
            # The package's erase unpins the program, never under a running service.
            running = subprocess.run(unpin, capture_output=True, text=True, check=False)
            assert running.returncode == 1 and "stop it first" in running.stderr
            assert Path(relay.pins).exists()
        stopped = subprocess.run(unpin, capture_output=True, text=True, check=False)
        assert stopped.returncode == 0 and "removed" in stopped.stdout, stopped.stderr
        assert not Path(relay.pins).exists()
    finally:
        remove_pins(pins)


@_marked(*STEERING, pytest.mark.slow)
def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """SIGKILL of the supervisor (no chance to stop anything): its workers stop on their own
    (PR_SET_PDEATHSIG), so a restarted service never finds old workers on its ports."""
    with supervised(tmp_path, 2, "sip:127.0.0.1:9;transport=tcp") as relay:
        workers = [pid for pid in relay.pids().values() if pid is not None]
        assert len(workers) == 2
        relay.process.kill()
        relay.process.wait(5)

        def gone() -> bool:
            return not any(Path(f"/proc/{pid}").exists() for pid in workers)

        wait_for(gone, 10, "the workers to stop")


@_marked(*STEERING, pytest.mark.slow)
def test_only_the_supervisor_notifies_systemd(tmp_path: Path) -> None:
    """READY=1 once every worker is ready, then WATCHDOG=1 with the totals in STATUS=; every
    message from the supervisor's pid (the unit's NotifyAccess=main)."""
    from clearip.bpf.reuseport import remove_pins

    pins = f"/sys/fs/bpf/cip-test-{unique_tag()}-workers"
    config = write_config(
        tmp_path, port=free_port(), upstream="sip:127.0.0.1:9;transport=tcp", workers=2,
        proxy_extra=f"steering_pin_dir = {json.dumps(pins)}\n",
    )  # fmt: skip
    log = tmp_path / "proxy.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
        process = subprocess.Popen(
            [sys.executable, "-m", "clearip.relay.cli", "run", "--config", str(config)],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        messages: list[tuple[int, str]] = []
        try:
            while sum("WATCHDOG=1" in m for _, m in messages) < 3:
                data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
                (_, _, creds), *_ = ancdata
                pid = int.from_bytes(creds[:4], sys.byteorder)
                messages.append((pid, data.decode()))
        finally:
            stop_process(process)
            remove_pins(pins)
    assert {pid for pid, _ in messages} == {process.pid}, messages
    first = messages[0][1]
    assert "READY=1" in first and "STATUS=2/2 workers up" in first, messages
    ready_line = next(
        n for n, line in enumerate(log.read_text().splitlines()) if "clearip-proxy ready" in line
    )
    workers_up = [
        n for n, line in enumerate(log.read_text().splitlines()) if re.search(r"worker \d up", line)
    ]
    assert len(workers_up) == 2 and max(workers_up) < ready_line


@_marked(pytest.mark.sipp, pytest.mark.slow)
def test_without_steering_one_process_relays_and_says_why(tmp_path: Path) -> None:
    """Steering cannot load (its pin directory is not on the bpf file system): one error line
    naming the fix, and the relay runs as one process that still relays calls."""
    clearip_port = free_port("tcp")
    upstream = f"sip:127.0.0.1:{clearip_port};transport=tcp"
    with (
        sipp_uas(
            tmp_path, "clearip", clearip_scenario(503), local=("127.0.0.1", clearip_port),
            transport="t1",
        ),
        supervised(tmp_path, 2, upstream, pins=str(tmp_path / "pins")) as relay,
    ):  # fmt: skip
        errors = [line for line in relay.log.read_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1, errors
        assert (
            "not on the bpf file system" in errors[0]
            and "Fix: set proxy.steering_pin_dir" in (errors[0])
        )
        assert _children(relay.process.pid) == []
        status = relay.ask("status")
        assert status["workers"]["configured"] == 2 and status["workers"]["running"] == 1
        assert status["workers"]["steering"].startswith("off: ")
        switch = start_sipp(
            tmp_path, "switch", uac_scenario(503), local=(SWITCH_IP, free_port()),
            remote=("127.0.0.1", relay.port), service=DIALLED,
        )  # fmt: skip
        assert switch.wait(30) == 0, switch.messages[-3000:]
        deadline = time.monotonic() + 20
        while (state := relay.ask("status"))["active_transactions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (state["active_calls"], state["active_transactions"]) == (0, 0)


@_marked(*STEERING, pytest.mark.slow)
def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """A port taken by another program: the workers cannot bind, the supervisor says which
    and exits 1 (as the single daemon would), leaving no worker behind."""
    from clearip.bpf.reuseport import remove_pins

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        pins = f"/sys/fs/bpf/cip-test-{unique_tag()}-workers"
        config = write_config(
            tmp_path, port=port, upstream="sip:127.0.0.1:9;transport=tcp", workers=2,
            proxy_extra=f"steering_pin_dir = {json.dumps(pins)}\n",
        )  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "clearip.relay.cli", "run", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = process.communicate(timeout=60)
        finally:
            stop_process(process)
            remove_pins(pins)
    text = output.decode()
    assert process.returncode == 1, text
    assert re.search(r"worker \d did not start: exited with status 1", text), text
    assert "address already in use" in text.lower(), text
