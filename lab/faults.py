"""The acceptance run of issue #11: a load with faults injected, where the switch must count a
final response for 100 % of its INVITEs.

Run (root: it creates a network namespace and puts netem on its loopback)::

    .venv/bin/python -m bench.faults [--rate 30] [--seconds 40] [--loss 5] [--delay-ms 2]

(the command line is ``bench/faults.py``; the rig is here, in the lab, because
``tests/test_reliability_load.py`` runs it too).

Everything runs in one fresh namespace whose ``lo`` carries ``netem loss L% delay D ms``: the
real daemon (``clearip-proxy run``), the real ClearIP emulator over TCP, SIPp carriers and a
SIPp switch. Each call's dialled number (an injection file, shuffled with a fixed seed) picks
its fault through the emulator's rules:

========================  =======================================================  ==========
kind                      what happens                                             expected
========================  =======================================================  ==========
normal                    302 to carrier A, answered                               200
provider-503-advance      302 to B (503) then A                                    200
provider-silent-advance   302 to a destination nobody answers, then A              200
provider-5xx-storm        302 to B (503) then C (500): every destination fails     500
clearip-silent            ClearIP never answers: fail-open after upstream_timeout  503
clearip-late              ClearIP answers after upstream_timeout                   503
clearip-reset             ClearIP closes its TCP connection on the INVITE          503
========================  =======================================================  ==========

(plus the packets netem drops on every leg). A reset also fails open every other call waiting
on ClearIP at that moment, and calls arriving while the relay reconnects, so those show up as
503 in other kinds too. The run is bounded: the switch stops placing calls after ``--seconds``
and everything is torn down at most ``DRAIN`` seconds later. It prints calls placed, faults
injected by kind, finals received by status (overall and per kind) and ``unanswered = N``; the
exit status is 1 when any INVITE went unanswered.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clearip.relay.policy.trust import Role, TrustEntry, parse_cidr, save_trust_file
from lab.netns import loopback_namespace, ns_exec
from lab.proxy_harness import PROVIDER_A_IP, PROVIDER_B_IP, SWITCH_IP, proxy_process
from lab.reliability import (
    Outcomes,
    any_final_uac,
    emulator,
    emulator_stats,
    outcomes,
    uas_any_call,
)
from lab.sipp import Sipp, start_sipp

DRAIN = 45  # seconds after the last INVITE: SIPp's INVITE retransmissions give up by then
UPSTREAM_TIMEOUT = 2.0
PROVIDER_TIMEOUT = 1.0

# kind -> (share of calls in percent, the final the switch should see)
KINDS: dict[str, tuple[int, int]] = {
    "normal": (75, 200),
    "provider-503-advance": (6, 200),
    "provider-silent-advance": (5, 200),
    "provider-5xx-storm": (5, 500),
    "clearip-silent": (4, 503),
    "clearip-late": (4, 503),
    "clearip-reset": (1, 503),
}
NUMBERS = {kind: f"1212555{index:04d}" for index, kind in enumerate(KINDS)}

PROXY_PORT, EMULATOR_PORT = 5060, 5070
A_PORT, B_PORT, C_PORT, SILENT_PORT = 5080, 5082, 5084, 5086


def rules() -> str:
    """The emulator's rules: one per kind, chosen by the dialled number."""
    a = f"sip:{{dialled}}@{PROVIDER_A_IP}:{A_PORT}"
    b = f"sip:{{dialled}}@{PROVIDER_B_IP}:{B_PORT}"
    c = f"sip:{{dialled}}@{PROVIDER_B_IP}:{C_PORT}"
    silent = f"sip:{{dialled}}@{PROVIDER_A_IP}:{SILENT_PORT}"
    route = {
        "normal": [a],
        "provider-503-advance": [b, a],
        "provider-silent-advance": [silent, a],
        "provider-5xx-storm": [b, c],
    }
    out = []
    for kind, number in NUMBERS.items():
        out.append(f'[[rule]]\nname = "{kind}"\ndialled = "{number}"')
        if kind in route:
            contacts = ", ".join(f'"{u}"' for u in route[kind])
            out.append(f'action = "route"\ncontacts = [{contacts}]')
        elif kind == "clearip-silent":
            out.append('action = "silent"')
        elif kind == "clearip-late":
            out.append(
                f'action = "delay"\nthen = "pass"\ndelay_ms = {int(UPSTREAM_TIMEOUT * 1000) + 1000}'
            )
        else:
            out.append('action = "drop-connection"')
    return "\n".join(out) + "\n"


def plan(calls: int, seed: int = 11) -> list[str]:
    """The kind of each call, in the order SIPp places them (a fixed shuffle)."""
    kinds = [k for k, (share, _) in KINDS.items() for _ in range(share)]
    random.Random(seed).shuffle(kinds)
    return [kinds[i % len(kinds)] for i in range(calls)]


def relay_config(directory: Path, upstream_port: int) -> Path:
    trust = directory / "trust.toml"
    save_trust_file(
        trust,
        [
            TrustEntry(parse_cidr(f"{SWITCH_IP}/32"), Role.SWITCH),
            TrustEntry(parse_cidr(f"{PROVIDER_A_IP}/32"), Role.PROVIDER),
            TrustEntry(parse_cidr(f"{PROVIDER_B_IP}/32"), Role.PROVIDER),
        ],
    )
    path = directory / "proxy.toml"
    path.write_text(
        f'[proxy]\ntrust_file = "{trust}"\ncontrol_socket = "{directory / "control.sock"}"\n'
        f'state_dir = "{directory}"\nupstream_timeout = {UPSTREAM_TIMEOUT}\n'
        f"provider_timeout = {PROVIDER_TIMEOUT}\ninvite_rate_per_source = 0\n"
        f'[[listen]]\ntransport = "udp"\naddress = "127.0.0.1"\nport = {PROXY_PORT}\n'
        f'[upstream.outbound]\nuri = "sip:127.0.0.1:{upstream_port};transport=tcp"\n'
        '[xdp]\nenabled = false\n[metrics]\nenabled = false\n[log]\nlevel = "info"\n'
    )
    return path


def relay_counters(directory: Path) -> dict[str, int]:
    """The running daemon's counters through its control socket (``clearipctl stats``)."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "clearip.ctl.cli"),
            *("--socket", str(directory / "control.sock"), "stats", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if result.returncode != 0:
        return {}
    return dict(json.loads(result.stdout).get("relay", {}))


@dataclass
class Report:
    planned: Counter[str]
    seen: Outcomes
    kind_of: dict[str, str]
    netem_dropped: int
    impairment: str
    relay: dict[str, int]
    emulator: dict[str, int]
    seconds: float
    by_kind: dict[str, Counter[int]] = field(default_factory=dict)

    @property
    def unanswered(self) -> int:
        return len(self.seen.unanswered)

    def faults(self) -> dict[str, int]:
        """Faults injected, by kind: the planned call kinds, netem's drops, and what the
        relay counted (ClearIP timeouts, late answers, lost connections, silent carriers)."""
        out = {k: n for k, n in sorted(self.planned.items()) if k != "normal"}
        out[f"packets dropped ({self.impairment})"] = self.netem_dropped
        for name in (
            "clearip_timeout",
            "clearip_late_response",
            "clearip_down_fail_open",
            "provider_timeout",
            "route_advance",
            "invite_retransmission",
        ):
            out[f"relay {name}"] = self.relay.get(name, 0)
        return out

    def print(self) -> None:
        finals = self.seen.by_status()
        print(f"fault-injected load run: {self.seconds:.0f} s")
        print(f"calls placed = {len(self.seen.invites)}")
        print("faults injected by kind:")
        for kind, count in self.faults().items():
            print(f"  {kind:32} {count}")
        print("finals received by status: " + ", ".join(f"{s}: {n}" for s, n in finals.items()))
        print("finals by call kind (expected final in brackets):")
        for kind, (_, expected) in KINDS.items():
            got = self.by_kind.get(kind, Counter())
            shown = ", ".join(f"{s}: {n}" for s, n in sorted(got.items()))
            print(f"  {kind:26} [{expected}] {shown}")
        print(f"answered calls hung up with BYE 200: {len(self.seen.bye_ok)}")
        if self.emulator:
            shown = ", ".join(f"{k}: {v}" for k, v in sorted(self.emulator.items()) if v)
            print(f"emulator: {shown}")
        print(f"unanswered = {self.unanswered}")


def run(
    rate: int, seconds: int, *, loss: float, delay_ms: float, workdir: Path, seed: int = 11
) -> Report:
    """One bounded run; see the module docstring."""
    calls = rate * seconds
    kinds = plan(calls, seed)
    (workdir / "calls.csv").write_text("SEQUENTIAL\n" + "".join(f"{NUMBERS[k]};\n" for k in kinds))
    started = time.monotonic()
    with loopback_namespace(loss, delay_ms) as lo:
        inside = ns_exec(lo.ns)
        with contextlib.ExitStack() as stack:
            ports = stack.enter_context(
                emulator(
                    workdir,
                    rules(),
                    listen=("--tcp", f"127.0.0.1:{EMULATOR_PORT}"),
                    prefix=inside,
                )
            )
            carriers: list[Sipp] = []
            for name, ip, port, code in (
                ("a", PROVIDER_A_IP, A_PORT, 200),
                ("b", PROVIDER_B_IP, B_PORT, 503),
                ("c", PROVIDER_B_IP, C_PORT, 500),
            ):
                carrier = start_sipp(
                    workdir,
                    f"carrier-{name}",
                    uas_any_call(answer_code=code),
                    local=(ip, port),
                    calls=10 * calls,
                    prefix=inside,
                    timeout=seconds + DRAIN + 30,
                )
                carriers.append(carrier)
                stack.callback(carrier.stop)
            stack.enter_context(
                proxy_process(relay_config(workdir, ports["tcp"]), workdir / "relay.log", inside)
            )
            time.sleep(0.5)
            switch = start_sipp(
                workdir,
                "switch",
                any_final_uac(number="[field0]"),
                local=(SWITCH_IP, 5090),
                remote=("127.0.0.1", PROXY_PORT),
                calls=calls,
                prefix=inside,
                timeout=seconds + DRAIN,
                extra=["-inf", str(workdir / "calls.csv"), "-r", str(rate), "-l", str(rate * 30)],
            )
            stack.callback(switch.stop)
            with contextlib.suppress(subprocess.TimeoutExpired):
                switch.process.wait(seconds + DRAIN + 15)
            switch.stop()
            relay = relay_counters(workdir)
            dropped = lo.dropped()
            impairment = lo.impairment
        elapsed = time.monotonic() - started
    seen = outcomes(switch)
    # SIPp numbers calls 1, 2, ... (Call-ID "N-pid@ip") and reads the injection file in order.
    kind_of = {cid: kinds[(int(cid.split("-", 1)[0]) - 1) % len(kinds)] for cid in seen.invites}
    by_kind: dict[str, Counter[int]] = {}
    for cid, status in seen.finals.items():
        by_kind.setdefault(kind_of[cid], Counter())[status] += 1
    return Report(
        planned=Counter(kind_of.values()),
        seen=seen,
        kind_of=kind_of,
        netem_dropped=dropped,
        impairment=impairment,
        relay=relay,
        emulator=emulator_stats(workdir),
        seconds=elapsed,
        by_kind=by_kind,
    )
