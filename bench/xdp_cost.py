"""Per-packet cost of XDP filters as the kernel measures it (BPF_PROG_TEST_RUN), root only.

Run: ``.venv/bin/python -m bench.xdp_cost [--rounds 9] [--repeat 500000] [--baseline REV]``.

Programs, in one run, each given the same 460-byte Ethernet/IPv4/UDP frames:

- empty:       ``return XDP_DROP`` (what test-run itself costs: the floor)
- xdp-filter:  xdp-tools' reference filter, default-deny with the trusted source allowed
               (``xdp-filter load --policy deny --features ipv4,ipv6`` on a veth in a private
               namespace, then ``xdp-filter ip TRUSTED --mode src``; test-run by program id)
- this:        this project's ``bpf/xdp_filter.c`` through :class:`EdgeFilter`
- baseline:    ``--baseline REV`` (a git revision) or ``--baseline FILE``: an older
               ``xdp_filter.c``, for before/after figures in the same run

Frames: an untrusted INVITE (dropped), a trusted INVITE (passed), a trusted INVITE to 911
(passed, DSCP EF), a DNS query from the untrusted source (passed, not SIP).

"Fixed source": ``--repeat`` runs of one frame. "New source per packet": the drop frame goes
through a rotator program that writes a new source address (100.64.0.0/10, scrambled, 4M before
one repeats) into the frame and tail-calls the program under test; its rows are compared with
the empty program behind the same rotator, so the rotator's own cost cancels out. Each figure
is the median over ``--rounds`` rounds; the programs take turns within a round (the machine may
be busy with other work: compare only figures from one run).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearip.bpf import loader, syscall
from clearip.bpf.edge_filter import EdgeFilter
from clearip.bpf.layout import port_words
from clearip.relay.policy.trust import Role, TrustEntry, parse_cidr

TRUSTED, UNTRUSTED, PROXY = "10.0.0.1", "10.0.0.2", "10.0.0.9"
BPF_XDP_ATTACH = 37  # enum bpf_attach_type BPF_XDP: libbpf loads XDP programs with it

EMPTY = "int empty(struct xdp_md *ctx) { return XDP_DROP; }\n"
ROTATOR = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/ip.h>
BPF_PROG_ARRAY(next, 1);
BPF_PERCPU_ARRAY(sequence, u32, 1);
int rotate(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct iphdr *ip = data + 14;
    if ((void *)(ip + 1) > end)
        return XDP_ABORTED;
    u32 zero = 0;
    u32 *n = sequence.lookup(&zero);
    if (!n)
        return XDP_ABORTED;
    u32 v = *n + 1;
    *n = v;
    ip->saddr = htonl(0x64400000 | ((v * 2654435761u) >> 10));
    next.call(ctx, 0);
    return XDP_ABORTED;
}
"""

CASES = ("drop", "drop, new source", "trusted INVITE", "trusted 911", "non-SIP")


def frames() -> dict[str, bytes]:
    from scapy.all import IP, UDP, Ether, Raw

    def invite(src: str, number: str) -> bytes:
        head = f"INVITE sip:{number}@proxy SIP/2.0\r\n".encode()
        packet = Ether() / IP(src=src, dst=PROXY) / UDP(sport=5060, dport=5060)
        return bytes(packet / Raw(head + b"A" * (418 - len(head))))  # 460 bytes in all

    dns = Ether() / IP(src=UNTRUSTED, dst=PROXY) / UDP(sport=40000, dport=53) / Raw(b"\0" * 40)
    return {
        "drop": invite(UNTRUSTED, "12125550100"),
        "trusted INVITE": invite(TRUSTED, "12125550100"),
        "trusted 911": invite(TRUSTED, "911"),
        "non-SIP": bytes(dns),
    }


@dataclass
class Program:
    name: str
    fd: int
    rotator: Any = None  # the bcc module whose prog array points at this program
    rotator_fd: int = -1
    costs: dict[str, list[int]] = field(default_factory=dict)

    def median(self, case: str) -> float:
        values = self.costs.get(case)
        return float(statistics.median(values)) if values else float("nan")


def _bcc() -> Any:
    import bcc

    return bcc


def rotator_for(program: Program) -> None:
    """Load a rotator whose tail call goes to ``program`` (libbpf's XDP programs need the
    rotator loaded with BPF_XDP as expected attach type, bcc's without)."""
    bcc = _bcc()
    for attach_type in (-1, BPF_XDP_ATTACH):
        module = bcc.BPF(text=ROTATOR)
        function = module.load_func(b"rotate", bcc.BPF.XDP, attach_type=attach_type)
        try:
            module[b"next"][0] = ctypes.c_int(program.fd)
        except Exception:  # bcc: "Could not update table: Invalid argument"
            module.cleanup()
            continue
        program.rotator, program.rotator_fd = module, function.fd
        return
    raise RuntimeError(f"cannot tail-call {program.name} from the rotator")


@contextlib.contextmanager
def empty_program() -> Iterator[Program]:
    bcc = _bcc()
    module = bcc.BPF(text=EMPTY)
    try:
        yield Program("empty", module.load_func(b"empty", bcc.BPF.XDP).fd)
    finally:
        module.cleanup()


@contextlib.contextmanager
def this_program() -> Iterator[Program]:
    edge = EdgeFilter.start(
        interfaces=[],
        pin_dir=f"/sys/fs/bpf/cip-bench-cost-{os.getpid()}",
        trust=[TrustEntry(parse_cidr(f"{TRUSTED}/32"), Role.SWITCH)],
        emergency=["911"],
    )
    try:
        fd = syscall.prog_fd_by_id(edge.prog_id)
        try:
            yield Program("this", fd)
        finally:
            os.close(fd)
    finally:
        edge.detach()


def baseline_source(spec: str) -> str:
    """The text of an older xdp_filter.c: a file, or a git revision of this checkout."""
    if Path(spec).is_file():
        return Path(spec).read_text()
    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run(
        ["git", "-C", str(root), "show", f"{spec}:bpf/xdp_filter.c"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if shown.returncode != 0:
        raise SystemExit(f"--baseline {spec}: neither a file nor a git revision ({shown.stderr})")
    return shown.stdout


@contextlib.contextmanager
def baseline_program(spec: str) -> Iterator[Program]:
    """An older filter loaded with bcc directly; its maps filled as the loader of its time did
    (two port hash maps, or the port bitmap), with the same trust entry."""
    bcc = _bcc()
    text = baseline_source(spec)
    entry = re.search(r"^int (\w+)\(struct xdp_md \*ctx\)", text, re.M)
    if entry is None:
        raise SystemExit(f"--baseline {spec}: no XDP entry function found")
    pins = Path(f"/sys/fs/bpf/cip-bench-base-{os.getpid()}")
    pins.mkdir(parents=True, exist_ok=True)
    # This checkout's bpf/ on the include path: a baseline that includes emergency_invite.h
    # compiles with today's copy of it.
    module = bcc.BPF(text=text.encode(), cflags=loader.cflags(PIN_DIR=pins))
    try:
        function = module.load_func(entry.group(1).encode(), bcc.BPF.XDP)
        if "sip_ports" in text:
            ports = module[b"sip_ports"]
            for index, word in enumerate(port_words([5060], [5060, 5061])):
                if word:
                    ports[ports.Key(index)] = ports.Leaf(word)
        else:
            for name, values in (("sip_udp_ports", [5060]), ("sip_tcp_ports", [5060, 5061])):
                table = module[name.encode()]
                for port in values:
                    table[table.Key(port)] = table.Leaf(1)
        trust = module[b"trust_v4"]
        trust[trust.Key(32, int.from_bytes(bytes(map(int, TRUSTED.split("."))), "little"))] = (
            trust.Leaf(1)
        )
        if "trust_v4_16" in text:  # the /16 bitmap in front of the LPM trie
            slash16 = int.from_bytes(bytes(map(int, TRUSTED.split("."))), "big") >> 16
            bitmap = module[b"trust_v4_16"]
            bitmap[bitmap.Key(slash16 // 64)] = bitmap.Leaf(1 << (slash16 % 64))
        if "trust_generation" in text:  # the loader bumps it after filling the trust maps
            generation = module[b"trust_generation"]
            generation[generation.Key(0)] = generation.Leaf(1)
        emergency = module[b"emergency"]
        emergency[emergency.Key(int.from_bytes(b"911".ljust(8, b"\0"), "little"), 0)] = (
            emergency.Leaf(1)
        )
        yield Program(f"baseline {spec}", function.fd)
    finally:
        module.cleanup()
        shutil.rmtree(pins, ignore_errors=True)


def _run(*argv: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    # nsenter keeps this mount namespace (and its /sys/fs/bpf); `ip netns exec` would not.
    prefix = ["nsenter", f"--net=/run/netns/{ns}"] if ns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def xdp_filter_program() -> Iterator[Program | None]:
    """xdp-filter, default-deny with the trusted source allowed, attached (generic mode) to a
    veth in a namespace of its own; None (with a note) when xdp-tools is not installed."""
    if shutil.which("xdp-filter") is None:
        print("xdp-filter not installed (apt-get install xdp-tools): its rows are left out")
        yield None
        return
    ns = f"cip-xdpf-{os.getpid()}"
    _run("ip", "netns", "add", ns)
    try:
        steps = [
            ("ip", "link", "add", "xf0", "type", "veth", "peer", "name", "xf1"),
            ("ip", "link", "set", "xf0", "up"),
            ("ip", "link", "set", "xf1", "up"),
            ("xdp-filter", "load", "--policy", "deny", "--features", "ipv4,ipv6",
             "--mode", "skb", "xf0"),
            ("xdp-filter", "ip", TRUSTED, "--mode", "src"),
        ]  # fmt: skip
        for step in steps:
            done = _run(*step, ns=ns)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(step)}: {done.stderr.strip()}")
        link = json.loads(_run("ip", "-j", "-d", "link", "show", "dev", "xf0", ns=ns).stdout)
        fd = syscall.prog_fd_by_id(int(link[0]["xdp"]["prog"]["id"]))
        try:
            yield Program("xdp-filter", fd)
        finally:
            os.close(fd)
    finally:
        _run("xdp-filter", "unload", "--all", ns=ns)
        _run("ip", "netns", "delete", ns)


def measure(programs: list[Program], rounds: int, repeat: int) -> None:
    """Fill each program's costs: every case once per round, programs taking turns."""
    cases = frames()
    for program in programs:
        rotator_for(program)
    for round_ in range(rounds):
        order = programs[round_ % len(programs) :] + programs[: round_ % len(programs)]
        for program in order:
            for case, frame in cases.items():
                cost = syscall.prog_test_run_ns(program.fd, frame, repeat)
                program.costs.setdefault(case, []).append(cost)
            cost = syscall.prog_test_run_ns(program.rotator_fd, cases["drop"], repeat)
            program.costs.setdefault("drop, new source", []).append(cost)


def verdicts_agree(programs: list[Program]) -> list[str]:
    """Problems: a program that does not drop the untrusted INVITE (all must)."""
    drop = frames()["drop"]
    return [p.name for p in programs if syscall.prog_test_run(p.fd, drop)[0] != 1]


def report(programs: list[Program], rounds: int, repeat: int) -> list[str]:
    lines = [
        f"XDP program cost per frame, ns (BPF_PROG_TEST_RUN, median of {rounds} rounds of "
        f"{repeat:,} runs; {os.cpu_count()} cores, {os.uname().release})",
        f"{'program':22}" + "".join(f"{case:>18}" for case in CASES),
    ]
    for p in programs:
        lines.append(f"{p.name:22}" + "".join(f"{p.median(case):18.0f}" for case in CASES))
    by = {p.name: p for p in programs}
    this, empty = by.get("this"), by.get("empty")
    if this is not None and empty is not None:
        fixed = this.median("drop") - empty.median("drop")
        fresh = this.median("drop, new source") - empty.median("drop, new source")
        lines.append(
            f"this - empty, drop: +{fixed:.0f} ns fixed source, +{fresh:.0f} ns new source"
        )
        reference = by.get("xdp-filter")
        if reference is not None:
            for case in ("drop", "drop, new source"):
                ratio = this.median(case) / reference.median(case)
                lines.append(f"this / xdp-filter, {case}: x{ratio:.2f}")
    return lines


def as_json(programs: list[Program]) -> dict[str, dict[str, float]]:
    return {p.name: {case: p.median(case) for case in CASES} for p in programs}


def run(rounds: int, repeat: int, baselines: list[str]) -> list[Program]:
    with contextlib.ExitStack() as stack:
        programs = [stack.enter_context(empty_program())]
        reference = stack.enter_context(xdp_filter_program())
        if reference is not None:
            programs.append(reference)
        programs.append(stack.enter_context(this_program()))
        for spec in baselines:
            programs.append(stack.enter_context(baseline_program(spec)))
        wrong = verdicts_agree(programs)
        if wrong:
            raise RuntimeError(f"these do not drop the untrusted INVITE: {', '.join(wrong)}")
        try:
            measure(programs, rounds, repeat)
        finally:
            for program in programs:
                if program.rotator is not None:
                    program.rotator.cleanup()
        return programs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.xdp_cost",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
    )
    parser.add_argument("--rounds", type=int, default=9, help="rounds (median; default 9)")
    parser.add_argument("--repeat", type=int, default=500_000, help="runs per figure (500k)")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="REV|FILE",
        help="also measure an older xdp_filter.c (a git revision or a file); repeatable",
    )
    parser.add_argument("--json", metavar="FILE", help="write the medians as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench.xdp_cost needs root (BPF programs, a namespace)", file=sys.stderr)
        return 2
    programs = run(args.rounds, args.repeat, args.baseline)
    print("\n".join(report(programs, args.rounds, args.repeat)))
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(programs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
