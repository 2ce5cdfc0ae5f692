"""``clearip-proxy demo``: the main job on loopback, readable by a newcomer.

Starts the ClearIP emulator over TLS (throw-away CA), the proxy with its default settings
pointed at it, stand-in carriers and a stand-in switch, places one call of each kind, prints a
SIP ladder per call and a summary table, and exits 0 only if every call behaved as expected.
With ``--keep-running`` it then leaves everything up, prints SIPp command lines that place
calls of their own (see sipp.py) and a ladder line for each message of those calls, until
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from clearip.relay.config import ProxyConfig, UpstreamConfig, XdpConfig
from clearip.relay.labkit.demo.agents import CallResult, Uac, Uas
from clearip.relay.labkit.demo.ladder import Ladder
from clearip.relay.labkit.demo.sipp import SIPP_CALLS, command, scenario_file
from clearip.relay.labkit.emulator.rules_toml import rules_from_data
from clearip.relay.labkit.emulator.server import Emulator
from clearip.relay.labkit.labca import make_lab_certificates
from clearip.relay.policy.trust import Role, TrustEntry, TrustList, parse_cidr
from clearip.relay.service.daemon import Daemon
from clearip.relay.sip.identity import attestation_of
from clearip.relay.transport.peer import ListenerSpec, Peer
from clearip.relay.transport.tls import server_context

SWITCH = "127.0.0.1"
PROVIDER_A = "127.0.0.2"
PROVIDER_B = "127.0.0.3"
CALLER = "14045550100"


@dataclass
class Scenario:
    name: str
    expected: str
    number: str
    caller: str = CALLER
    inbound: bool = False


SCENARIOS = [
    Scenario(
        "1 outbound, A-attested, provider A answers", "200 via provider A, attest A", "12125550100"
    ),
    Scenario("2 provider A fails 503, advance to B", "200 via provider B", "12125550101"),
    Scenario(
        "3 robocall blocked by ClearIP", "603 to the switch", "12125550102", caller="18005550199"
    ),
    Scenario("4 ClearIP lets the call pass", "503 (switch routes directly)", "12125550103"),
    Scenario("5 emergency 911 bypasses ClearIP", "503 at once, ClearIP untouched", "911"),
    Scenario("6 ClearIP does not answer", "503 fail-open after timeout", "12125550104"),
    Scenario(
        "7 inbound call verified by ClearIP",
        "200 at the switch, PAI verstat",
        "12125550105",
        caller="13125550177",
        inbound=True,
    ),
]


def demo_rules(
    *, provider_a: Peer, provider_b: Peer, provider_a_fail: Peer, switch_in: Peer
) -> dict[str, Any]:
    """The emulator's rules for the seven demo calls (first match wins)."""

    def at(peer: Peer) -> str:
        return f"sip:{{dialled}}@{peer.host}:{peer.port}"

    return {
        "signing": {"x5u": "https://cert.clearip-lab.example/shaken.pem"},
        "rule": [
            {"name": "robocaller", "calling": "18005550199", "action": "block",
             "reason": "Robocall: caller on the block list"},
            {"name": "routed", "dialled": "12125550100", "action": "route", "attest": "A",
             "contacts": [at(provider_a), at(provider_b)]},
            {"name": "A fails", "dialled": "12125550101", "action": "route", "attest": "A",
             "contacts": [at(provider_a_fail), at(provider_b)]},
            {"name": "pass", "dialled": "12125550103", "action": "pass"},
            {"name": "no answer", "dialled": "12125550104", "action": "silent"},
            {"name": "inbound", "dialled": "12125550105", "action": "verify",
             "cnam": "ACME PHARMA", "verstat": "TN-Validation-Passed",
             "contacts": [at(switch_in)]},
        ],
    }  # fmt: skip


@dataclass
class Outcome:
    scenario: Scenario
    observed: str
    ok: bool
    clearip_ms: float | None
    total_ms: float
    ladder: list[str]


@dataclass
class KernelReport:
    status: str
    counters: dict[str, int]
    top_dropped: list[tuple[str, int]]


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
        observed, ok = _judge(
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


def _judge(
    scenario: Scenario,
    result: CallResult,
    summary: dict[str, Any],
    *,
    clearip_invites: int,
    answered_by: dict[str, list[Any]],
    switch_in: Uas,
) -> tuple[str, bool]:
    final = result.final
    if final is None:
        return "no final response", False
    number = scenario.number
    if number == "12125550100":
        attest = (
            attestation_of(answered_by["provider A"][0].get("identity"))
            if answered_by["provider A"]
            else None
        )
        return (
            f"{final} via provider A, attest {attest}",
            final == 200 and attest == "A" and result.bye_status == 200,
        )
    if number == "12125550101":
        ok = final == 200 and bool(answered_by["provider B"]) and not answered_by["provider A"]
        return f"{final} via {'provider B' if answered_by['provider B'] else '?'}", ok
    if number == "12125550102":
        return f"{final} to the switch", final == 603
    if number == "12125550103":
        return f"{final} (pass)", final == 503 and summary.get("clearip_status") == 503
    if number == "911":
        return (
            f"{final}, ClearIP saw {clearip_invites} INVITE(s)",
            final == 503 and clearip_invites == 0,
        )
    if number == "12125550104":
        return (
            f"{final} after {summary.get('total_ms')} ms",
            final == 503 and "fail-open" in summary.get("note", ""),
        )
    if scenario.inbound:
        pai = switch_in.invites[-1].get("p-asserted-identity") if switch_in.invites else ""
        return f"{final}, PAI {pai}", final == 200 and "verstat=TN-Validation-Passed" in (pai or "")
    return str(final), False


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


def print_report(outcomes: list[Outcome], *, colour: bool) -> None:
    green, red, bold, reset = (
        ("\033[32m", "\033[31m", "\033[1m", "\033[0m") if colour else ("", "", "", "")
    )
    for outcome in outcomes:
        mark = f"{green}ok{reset}" if outcome.ok else f"{red}FAILED{reset}"
        print(f"\n{bold}Call {outcome.scenario.name}{reset}  [{mark}]")
        for line in outcome.ladder:
            print(line)
    print(f"\n{bold}Summary{reset}")
    header = f"  {'call':44} {'expected':34} {'observed':44} {'ClearIP':>9} {'total':>9}"
    print(header)
    for o in outcomes:
        clearip = "-" if o.clearip_ms is None else f"{o.clearip_ms:.1f} ms"
        mark = f"{green}ok{reset}" if o.ok else f"{red}FAILED{reset}"
        row = f"  {o.scenario.name[:44]:44} {o.scenario.expected[:34]:34} "
        row += f"{o.observed[:44]:44} {clearip:>9} {o.total_ms:7.1f} ms"
        print(f"{row}  {mark}")
    failed = [o for o in outcomes if not o.ok]
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} calls behaved as expected.")


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
            print(json.dumps([_as_json(o) for o in outcomes], indent=2))
        else:
            print_report(outcomes, colour=colour)
            for kernel_report in kernel:
                print(f"\nKernel filter: {kernel_report.status}")
                for name, value in kernel_report.counters.items():
                    print(f"  {name:20s} {value}")
                for address, count in kernel_report.top_dropped:
                    print(f"  dropped from {address}: {count}")
        sys.stdout.flush()

    outcomes = asyncio.run(
        run_demo(keep_running=keep_running, colour=colour, xdp=xdp, kernel=kernel, report=report)
    )
    return 0 if all(o.ok for o in outcomes) else 1


def _as_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "call": outcome.scenario.name,
        "expected": outcome.scenario.expected,
        "observed": outcome.observed,
        "ok": outcome.ok,
        "clearip_ms": outcome.clearip_ms,
        "total_ms": round(outcome.total_ms, 1),
    }
