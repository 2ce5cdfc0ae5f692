"""``clearip-proxy demo``: bring the lab up on loopback, place the demo calls, tear it down.

Rules: everything runs in this process on 127.0.0.x: the ClearIP emulator over TLS (with a
throw-away CA), the proxy's daemon with its default settings pointed at it, stand-in
carriers and a stand-in switch (:mod:`agents`). :func:`run_demo` places the calls of
:mod:`calls` one after another, records a SIP ladder of each (:mod:`ladder`) and hands the
outcomes to the report before anything is torn down; the exit status is 0 only if every call
behaved as expected. With ``--keep-running`` it then leaves everything up, prints SIPp command
lines that place calls of their own (:mod:`sipp`) and a ladder line for each message of those
calls, until Ctrl-C or SIGTERM, which both go through the normal clean-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from clearip.relay.config import ProxyConfig, UpstreamConfig, XdpConfig
from clearip.relay.labkit.demo.agents import Uac, Uas
from clearip.relay.labkit.demo.calls import (
    PROVIDER_A,
    PROVIDER_B,
    SCENARIOS,
    SWITCH,
    demo_rules,
    judge,
)
from clearip.relay.labkit.demo.ladder import Ladder
from clearip.relay.labkit.demo.report import (
    KernelReport,
    Outcome,
    print_json,
    print_kernel_report,
    print_report,
)
from clearip.relay.labkit.demo.sipp import SIPP_CALLS, command, scenario_file
from clearip.relay.labkit.emulator.rules_toml import rules_from_data
from clearip.relay.labkit.emulator.server import Emulator
from clearip.relay.labkit.labca import make_lab_certificates
from clearip.relay.policy.trust import Role, TrustEntry, TrustList, parse_cidr
from clearip.relay.service.daemon import Daemon
from clearip.relay.transport.peer import ListenerSpec, Peer
from clearip.relay.transport.tls import server_context


async def run_demo(
    *,
    keep_running: bool = False,
    colour: bool = False,
    upstream_timeout: float = 1.0,
    xdp: bool = False,
    kernel: list[KernelReport] | None = None,
    report: Callable[[list[Outcome]], None] | None = None,
) -> list[Outcome]:
    """Places the demo calls and hands their outcomes to ``report`` before keep-running."""
    workdir = Path(tempfile.mkdtemp(prefix="clearip-demo-"))
    provider_a = Uas(PROVIDER_A, answer=200)
    provider_b = Uas(PROVIDER_B, answer=200)
    provider_a_fail = Uas(PROVIDER_A, answer=503)
    switch_in = Uas(SWITCH, answer=200)
    for agent in (provider_a, provider_b, provider_a_fail, switch_in):
        await agent.start()
    switch = Uac(SWITCH)
    carrier = Uac(PROVIDER_B)
    await switch.start()
    await carrier.start()

    certs = make_lab_certificates(workdir / "tls")
    emulator = Emulator(
        rules_from_data(
            demo_rules(
                provider_a=provider_a.peer,
                provider_b=provider_b.peer,
                provider_a_fail=provider_a_fail.peer,
                switch_in=switch_in.peer,
            ),
            "demo rules",
        )
    )
    tls_port = await emulator.listen(
        ListenerSpec("tls", "127.0.0.1", 0),
        server_context(str(certs.cert_file), str(certs.key_file)),
    )
    trust = TrustList(
        [
            TrustEntry(parse_cidr(f"{SWITCH}/32"), Role.SWITCH),
            TrustEntry(parse_cidr(f"{PROVIDER_A}/32"), Role.PROVIDER),
            TrustEntry(parse_cidr(f"{PROVIDER_B}/32"), Role.PROVIDER),
        ]
    )
    upstream = UpstreamConfig(
        uri=f"sip:127.0.0.1:{tls_port};transport=tls",
        ca_file=str(certs.ca_file),
        server_name="localhost",
    )
    port = _free_port()
    xdp_config = XdpConfig(
        enabled=xdp,
        interfaces=("lo",),
        mode="generic",
        udp_ports=(port,),
        tcp_ports=(port,),
        pin_dir=f"/sys/fs/bpf/clearip-demo-{os.getpid()}",
    )
    config = ProxyConfig(
        listeners=(ListenerSpec("udp", "127.0.0.1", port), ListenerSpec("tcp", "127.0.0.1", port)),
        xdp=xdp_config,
        outbound=upstream,
        inbound=upstream,
        upstream_timeout=upstream_timeout,
        trust_file=str(workdir / "trust.toml"),
        control_socket=str(workdir / "control.sock"),
        state_dir=str(workdir),
        metrics_enabled=False,
    )
    daemon = Daemon(config, trust)
    await daemon.start()
    proxy_port = daemon.endpoint.locals[0].port
    proxy = Peer("udp", "127.0.0.1", proxy_port)

    ladder = Ladder(hosts={SWITCH: "switch"})
    ladder.names.update(
        {
            (SWITCH, switch.port): "switch",
            (SWITCH, switch_in.port): "switch",
            (PROVIDER_A, provider_a.port): "provider A",
            (PROVIDER_A, provider_a_fail.port): "provider A",
            (PROVIDER_B, provider_b.port): "provider B",
            (PROVIDER_B, carrier.port): "carrier",
            ("127.0.0.1", tls_port): "ClearIP",
        }
    )
    daemon.endpoint.tracer = ladder.record
    summaries: list[dict[str, Any]] = []
    daemon.call_listeners.append(summaries.append)

    outcomes = []
    for scenario in SCENARIOS:
        ladder.reset()
        summaries.clear()
        before = emulator.counters["invites"]
        started = time.monotonic()
        caller_agent = carrier if scenario.inbound else switch
        result = await caller_agent.call(proxy, scenario.number, scenario.caller)
        total_ms = (time.monotonic() - started) * 1000
        await asyncio.sleep(0.05)
        summary = summaries[0] if summaries else {}
        observed, ok = judge(
            scenario,
            result,
            summary,
            clearip_invites=emulator.counters["invites"] - before,
            answered_by={"provider A": provider_a.invites, "provider B": provider_b.invites},
            switch_in=switch_in,
        )
        outcomes.append(
            Outcome(
                scenario, observed, ok, summary.get("clearip_ms"), total_ms, ladder.render(colour)
            )
        )
        provider_a.invites.clear()
        provider_b.invites.clear()

    if xdp and kernel is not None:
        edge = daemon.policy.kernel
        if edge is not None:
            # One INVITE from an address outside the trust list, for the kernel to drop.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                stranger.bind(("127.0.0.9", 0))
                stranger.sendto(
                    b"INVITE sip:12125550100@127.0.0.1 SIP/2.0\r\n\r\n", ("127.0.0.1", port)
                )
            await asyncio.sleep(0.1)
            kernel.append(
                KernelReport(daemon.policy.describe_kernel(), edge.counters(), edge.top_dropped(5))
            )
        else:
            kernel.append(KernelReport(daemon.policy.describe_kernel(), {}, []))
    if report is not None:
        report(outcomes)
    if keep_running:
        daemon.call_listeners.remove(summaries.append)
        ladder.follow(_say, colour=colour)
        await _keep_running(proxy, tls_port)
    kernel_filter = daemon.policy.kernel
    await daemon.close()
    if kernel_filter is not None and hasattr(kernel_filter, "detach"):
        kernel_filter.detach()  # the demo leaves nothing attached to lo
    await emulator.close()
    for closing in (provider_a, provider_b, provider_a_fail, switch_in, switch, carrier):
        await closing.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return outcomes


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (the kernel filter needs it up front)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise OSError("no free port on 127.0.0.1")


def _say(line: str = "") -> None:
    """Prints at once: a reader of a pipe (a test, ``| tee``) sees each line as it happens."""
    print(line, flush=True)


async def _keep_running(proxy: Peer, tls_port: int) -> None:
    """Prints the SIPp calls to try, then waits for Ctrl-C or SIGTERM."""
    with contextlib.ExitStack() as files:
        _say()
        _say(
            f"The proxy listens on udp/tcp {proxy.host}:{proxy.port}; "
            f"the ClearIP emulator on tls 127.0.0.1:{tls_port}."
        )
        _say("Trusted sources: 127.0.0.1 (switch), 127.0.0.2 and 127.0.0.3 (providers).")
        _say("Place calls as the switch with SIPp (each exits after its call, 0 if it succeeded):")
        for call in SIPP_CALLS:
            path = files.enter_context(resources.as_file(scenario_file(call.scenario)))
            _say(f"  {command(call, str(path), switch=SWITCH, proxy=proxy)}")
            _say(f"    {call.shows}")
        _say("The proxy's messages for each call are printed below. Press Ctrl-C to stop.")
        await _until_stopped()
    _say("Stopped.")


async def _until_stopped() -> None:
    """Returns on SIGINT or SIGTERM, so both stop the demo through its normal clean-up."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def main(*, json_output: bool = False, keep_running: bool = False, xdp: bool = False) -> int:
    colour = sys.stdout.isatty() and not json_output and os.environ.get("NO_COLOR") is None
    # The ladder tells the story; the daemon's own warnings (the 911 bypass, the ClearIP
    # connection closing at the end) would only interleave with it.
    logging.basicConfig(level=logging.ERROR)
    if xdp and os.geteuid() != 0:
        print("--xdp needs root (it loads the kernel filter on lo)", file=sys.stderr)
        return 2
    kernel: list[KernelReport] = []

    def report(outcomes: list[Outcome]) -> None:
        if json_output:
            print_json(outcomes)
        else:
            print_report(outcomes, colour=colour)
            for kernel_report in kernel:
                print_kernel_report(kernel_report)
        sys.stdout.flush()

    outcomes = asyncio.run(
        run_demo(keep_running=keep_running, colour=colour, xdp=xdp, kernel=kernel, report=report)
    )
    return 0 if all(o.ok for o in outcomes) else 1
