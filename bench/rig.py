"""Shared machinery of the call benchmarks: proxies, SIPp peers, captures, accounting, tables.

Every ``bench.calls``-style script (calls, capacity, memory, emergency, report) builds on this
module so the systems are started, driven and measured the same way everywhere:

- :func:`start_relay` is the ONE place that launches the relay (config generated per run);
  :func:`start_kamailio` runs the shared anchors' Kamailio config (``../shared/anchors``; derived
  into the work directory only when ports or the upstream transport differ from the anchor's).
- :class:`ProcessTree` accounts CPU (user+sys) and memory over the whole process tree of a
  proxy, so a multi-process relay (SO_REUSEPORT workers) or Kamailio's children all count.
- :class:`Capture` records a filtered loopback capture; :func:`read_pcap` and the
  ``*_latencies`` functions turn it into the time the proxy adds, from kernel timestamps.
- :func:`format_table`, :func:`percentile` and :func:`machine_info` print and describe results.

Only loopback addresses are ever used. Ports come from :class:`Ports` (``--port-base`` shifts
them all, so two benchmarks on one host do not collide).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lab.procs import stop_process

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ROOT.parent / "shared" / "anchors"
SIPP_ANCHORS = ANCHORS / "sipp"
KAMAILIO_CFG = ANCHORS / "kamailio" / "inline.cfg"
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
UPSTREAMS = ("udp", "tcp", "tls")
SYSTEMS = ("relay", "kamailio")


class BenchError(RuntimeError):
    """A benchmark cannot run (missing tool, busy port, a process that did not start)."""


# -- ports ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ports:
    """Every port a run uses on 127.0.0.1; the defaults are the anchors' numbers."""

    proxy: int = 5060
    clearip: int = 5070
    emulator_tls: int = 5071
    carrier: int = 5080
    carrier2: int = 5082
    psap: int = 5084
    switch: int = 5090
    emergency_switch: int = 5092

    @classmethod
    def shifted(cls, base: int) -> Ports:
        """All ports moved by ``base`` (``--port-base``), so two runs on one host do not mix."""
        default = cls()
        return cls(**{f.name: getattr(default, f.name) + base for f in fields(cls)})

    @property
    def base(self) -> int:
        return self.proxy - Ports().proxy

    def all(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]


def port_busy(port: int, kind: int = socket.SOCK_DGRAM) -> bool:
    """True when something on this host holds ``127.0.0.1:port`` (UDP or TCP)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def check_ports_free(ports: Ports) -> None:
    """Refuse to start over another run: shared ports would mix two benchmarks' traffic."""
    busy = [
        f"{p}/{name}"
        for p in ports.all()
        for kind, name in ((socket.SOCK_DGRAM, "udp"), (socket.SOCK_STREAM, "tcp"))
        if port_busy(p, kind)
    ]
    if busy:
        raise BenchError(
            f"ports in use on {HOST}: {', '.join(busy)} (another benchmark running?): "
            "wait for it or pass --port-base N to shift every port"
        )


def wait_port(port: int, kind: int = socket.SOCK_DGRAM, timeout: float = 20.0) -> None:
    """Wait until a started process has bound the port (it was free before it started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_busy(port, kind):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on {HOST}:{port} after {timeout:.0f} s")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"missing: {', '.join(missing)} (apt-get install sip-tester tshark kamailio)"
        )


def have_kamailio() -> bool:
    return shutil.which("kamailio") is not None and KAMAILIO_CFG.is_file()


# -- process accounting -----------------------------------------------------------------------
class ProcessTree:
    """A process and all its descendants, read from /proc each time (workers may come and go).

    CPU is user+sys of every live process plus what exited, waited-for children left in their
    parent's cutime/cstime. Memory is summed over processes: RSS (what the issue asks for;
    shared pages count once per process) and PSS (shared pages split between the sharers, the
    fair figure for forked workers or Kamailio's shared memory).
    """

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        out: list[int] = []
        todo = [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):
                        todo += [int(c) for c in (task / "children").read_text().split()]
        return out

    def cpu_seconds(self) -> float:
        ticks = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        return ticks / TICK

    def _status_kb(self, key: str) -> int:
        total = 0
        pattern = re.compile(rf"^{key}:\s+(\d+)", re.MULTILINE)
        for pid in self.pids():
            with contextlib.suppress(OSError):
                m = pattern.search(Path(f"/proc/{pid}/status").read_text())
                total += int(m.group(1)) if m else 0
        return total

    def rss_kb(self) -> int:
        """Resident set now, summed over the tree."""
        return self._status_kb("VmRSS")

    def peak_rss_kb(self) -> int:
        """Each process's high-water mark, summed (exact for one process, an upper bound else)."""
        return self._status_kb("VmHWM")

    def pss_kb(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                m = re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
                total += int(m.group(1)) if m else 0
        return total


class MemorySampler:
    """Samples the tree's summed RSS and PSS a few times a second; keeps the peaks."""

    def __init__(self, tree: ProcessTree, interval: float = 0.5) -> None:
        self.tree = tree
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        self.peak_rss_kb = max(self.peak_rss_kb, self.tree.rss_kb())
        self.peak_pss_kb = max(self.peak_pss_kb, self.tree.pss_kb())

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


# -- processes --------------------------------------------------------------------------------
@dataclass
class Proc:
    """A started process, its log, and its process tree for accounting."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    # Processes that serve with this one and stop after it (a TLS terminator's backend).
    companions: list[Proc] = field(default_factory=list)

    @property
    def tree(self) -> ProcessTree:
        return ProcessTree(self.popen.pid)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


def spawn(name: str, argv: Sequence[str], workdir: Path, cwd: Path | None = None) -> Proc:
    log = workdir / f"{name}.log"
    popen = subprocess.Popen(
        list(argv), cwd=cwd or workdir, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    return Proc(name, popen, log)


def stop(proc: Proc, timeout: float = 10.0) -> None:
    """Stop one process we started, then its companions (by their own pids; never by name)."""
    stop_process(proc.popen, timeout)
    for companion in proc.companions:
        stop(companion, timeout)


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        stop(proc)


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for the generated configs (scalars, lists, tables, arrays of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    def is_table_list(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    lines = [
        f"{k} = {value(v)}"
        for k, v in data.items()
        if not (isinstance(v, dict) or is_table_list(v))
    ]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            scalars = {a: b for a, b in v.items() if not isinstance(b, dict)}
            if scalars or not v:
                out += f"\n[{name}]\n"
            out += toml_dumps(v, name)
        elif is_table_list(v):
            for item in v:
                out += f"\n[[{name}]]\n" + toml_dumps(item, name)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, table by table (lists and scalars replace)."""
    out = dict(base)
    for key, val in extra.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], val)
        else:
            out[key] = val
    return out


# Relay worker processes for every relay a benchmark starts (--workers; 1 = one process).
RELAY_WORKERS = 1


def use_workers(workers: int) -> None:
    """Run every relay of this benchmark with ``workers`` processes (issue #16)."""
    global RELAY_WORKERS
    if workers < 1:
        raise BenchError("--workers takes a number >= 1")
    RELAY_WORKERS = workers


def relay_config(
    workdir: Path,
    ports: Ports,
    upstream: str = "udp",
    ca_file: Path | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The relay's config for a bench run: loopback listener, stand-in upstream, no XDP/metrics.

    ``invite_rate_per_source = 0``: the whole load comes from one switch address, and the
    per-source limit (1,000/s by default) would answer 503 in a capacity ramp.
    """
    if upstream == "tls":
        outbound: dict[str, Any] = {
            "uri": f"sip:{HOST}:{ports.emulator_tls};transport=tls",
            "ca_file": str(ca_file or ""),
            "server_name": "localhost",
        }
    else:
        outbound = {"uri": f"sip:{HOST}:{ports.clearip};transport={upstream}"}
    config: dict[str, Any] = {
        "proxy": {
            "trust_file": str(workdir / "trust.toml"),
            "control_socket": str(workdir / "control.sock"),
            "state_dir": str(workdir),
            "invite_rate_per_source": 0,
            "workers": RELAY_WORKERS,
            "steering_pin_dir": "/sys/fs/bpf/clearip-bench",
        },
        "listen": [{"transport": "udp", "address": HOST, "port": ports.proxy}],
        "upstream": {"outbound": outbound},
        "xdp": {"enabled": False},
        "metrics": {"enabled": False},
        "log": {"level": "warning"},
    }
    return merge(config, extra_config or {})


def start_relay(
    workdir: Path,
    ports: Ports,
    *,
    upstream: str = "udp",
    ca_file: Path | None = None,
    extra_config: dict[str, Any] | None = None,
    name: str = "relay",
) -> Proc:
    """Start the relay with a generated config; returns once it listens.

    The one place that decides how the relay is launched: a multi-process relay (e.g. a
    ``workers`` setting in ``extra_config``) is accounted as a whole by :class:`ProcessTree`.
    The caller stops it with :func:`stop` (or ``with running(start_relay(...))``).
    """
    (workdir / "trust.toml").write_text(f'[[source]]\ncidr = "{HOST}/32"\nrole = "switch"\n')
    config = workdir / f"{name}.toml"
    config.write_text(toml_dumps(relay_config(workdir, ports, upstream, ca_file, extra_config)))
    proc = spawn(
        name, [sys.executable, "-m", "clearip.relay.cli", "run", "--config", str(config)], workdir
    )
    try:
        wait_port(ports.proxy)
        wait_relay_upstream(workdir / "control.sock", timeout=10)
        proc.check_alive()
    except BaseException:
        stop(proc)
        raise
    return proc


def relay_status(control_socket: Path) -> dict[str, Any]:
    """The daemon's ``status`` over its control socket (active calls/transactions, upstreams)."""
    from clearip.ctl.client import Client

    reply = Client(str(control_socket)).call("status")
    result = reply.get("result")
    return result if isinstance(result, dict) else {}


def wait_relay_upstream(control_socket: Path, timeout: float) -> None:
    """Give the relay time to connect to ClearIP (TCP/TLS) before load starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            links = relay_status(control_socket).get("upstreams", {})
            if links and all(link.get("state") == "up" for link in links.values()):
                return
        time.sleep(0.1)
    time.sleep(0.5)  # no usable status (an older or different relay): a fixed wait


def kamailio_config(workdir: Path, ports: Ports, upstream: str = "udp") -> tuple[Path, bool]:
    """The anchor's config, or a copy in ``workdir`` with only ports/transport substituted.

    The anchor listens on UDP and TCP 5060 but relays to the ClearIP stand-in over UDP (its
    UPSTREAM has no transport); the TCP-upstream row adds ``;transport=tcp`` there.
    Returns (path, derived).
    """
    if ports.base == 0 and upstream == "udp":
        return KAMAILIO_CFG, False
    text = KAMAILIO_CFG.read_text()
    uri = f"sip:{HOST}:{ports.clearip}" + (";transport=tcp" if upstream == "tcp" else "")
    text = text.replace('"!UPSTREAM!sip:127.0.0.1:5070!"', f'"!UPSTREAM!{uri}!"')
    text = text.replace("udp:127.0.0.1:5060", f"udp:{HOST}:{ports.proxy}")
    text = text.replace("tcp:127.0.0.1:5060", f"tcp:{HOST}:{ports.proxy}")
    if f"!UPSTREAM!{uri}!" not in text:
        raise BenchError(f"{KAMAILIO_CFG}: UPSTREAM substdef not found; update bench/rig.py")
    derived = workdir / f"kamailio-{upstream}.cfg"
    derived.write_text(text)
    return derived, True


def start_kamailio(workdir: Path, ports: Ports, upstream: str = "udp") -> Proc:
    """Kamailio from the anchors, as ``run_kamailio_bench.sh`` starts it (TLSF, 1 GB shm)."""
    if upstream == "tls":
        raise BenchError("the Kamailio anchor has no TLS upstream")
    cfg, _ = kamailio_config(workdir, ports, upstream)
    proc = spawn(
        f"kamailio-{upstream}",
        ["kamailio", "-x", "tlsf", "-X", "tlsf", "-m", "1024", "-M", "64", "-f", str(cfg),
         "-P", str(workdir / "kamailio.pid"), "-DD", "-E"],
        workdir,
    )  # fmt: skip
    try:
        wait_port(ports.proxy)
        time.sleep(1.0)  # children fork after the bind
        proc.check_alive()
    except BaseException:
        stop(proc)
        raise
    return proc


# -- SIPp -------------------------------------------------------------------------------------
def sipp(
    name: str,
    workdir: Path,
    scenario: Path,
    port: int,
    *,
    args: Sequence[str] = (),
    remote: str = "",
) -> Proc:
    """A SIPp process with per-second statistics in ``<name>.csv`` (see :func:`sipp_stats`)."""
    stats, errors = workdir / f"{name}.csv", workdir / f"{name}.err"
    argv = ["sipp", *([remote] if remote else []), "-sf", str(scenario), "-i", HOST,
            "-p", str(port), "-nostdin", "-trace_stat", "-stf", str(stats), "-fd", "1",
            "-trace_err", "-error_file", str(errors), *args]  # fmt: skip
    return spawn(name, argv, workdir)


def start_clearip_standin(
    workdir: Path, ports: Ports, upstream: str, name: str = "clearip"
) -> Proc:
    """The ClearIP stand-in: the anchors' SIPp 302 over UDP or TCP; over TLS, the same SIPp
    over TCP behind stunnel (a C TLS terminator) with a lab CA.

    SIPp here is built without TLS. Without stunnel, the TLS row uses ``clearip-proxy emulate``,
    which signs a real PASSporT per INVITE: about half a core at 1,000 calls/s of Python on
    the cores the proxy is measured on, which inflates the proxy's own CPU figure.
    """
    if upstream == "tls":
        if shutil.which("stunnel4") or shutil.which("stunnel"):
            return _sipp_behind_stunnel(workdir, ports, name)
        return _emulator_standin(workdir, ports, name)
    transport = ["-t", "t1"] if upstream == "tcp" else []
    proc = sipp(
        name,
        workdir,
        SIPP_ANCHORS / "uas_clearip_302.xml",
        ports.clearip,
        # -aa: answer the relay's OPTIONS liveness probes (a UDP upstream counts as down
        # after two unanswered probes).
        args=[*transport, "-aa", "-key", "c1", f"{HOST}:{ports.carrier}", "-key", "c2",
         f"{HOST}:{ports.carrier2}"],
    )  # fmt: skip
    wait_port(ports.clearip, socket.SOCK_STREAM if upstream == "tcp" else socket.SOCK_DGRAM)
    return proc


def tls_standin_name() -> str:
    """What :func:`start_clearip_standin` runs for a TLS upstream on this machine."""
    if shutil.which("stunnel4") or shutil.which("stunnel"):
        return "the anchors' SIPp 302 over TCP behind stunnel (C, no signing)"
    return "clearip-proxy emulate over TLS (Python, signs a PASSporT per INVITE)"


def _sipp_behind_stunnel(workdir: Path, ports: Ports, name: str) -> Proc:
    """TLS on ``ports.emulator_tls``, terminated by stunnel and relayed to SIPp over TCP."""
    from clearip.relay.labkit.labca import make_lab_certificates

    backend = start_clearip_standin(workdir, ports, "tcp", name=f"{name}-sipp")
    try:
        lab = make_lab_certificates(workdir / "lab")
        config = workdir / f"{name}-stunnel.conf"
        config.write_text(
            "foreground = yes\n"
            "pid =\n"
            "debug = 4\n"
            "[clearip]\n"
            f"accept = {HOST}:{ports.emulator_tls}\n"
            f"connect = {HOST}:{ports.clearip}\n"
            f"cert = {lab.cert_file}\n"
            f"key = {lab.key_file}\n"
        )
        binary = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"
        proc = spawn(name, [binary, str(config)], workdir)
        proc.companions.append(backend)
        wait_port(ports.emulator_tls, socket.SOCK_STREAM)
        proc.check_alive()
    except BaseException:
        stop(backend)
        raise
    return proc


def _emulator_standin(workdir: Path, ports: Ports, name: str) -> Proc:
    """``clearip-proxy emulate`` over TLS with a lab CA (no stunnel on this machine)."""
    lab = workdir / "lab"
    rules = workdir / "emulator-rules.toml"
    rules.write_text(
        toml_dumps(
            {
                "signing": {"x5u": "https://cert.clearip-lab.example/shaken.pem"},
                "rule": [
                    {
                        "name": "bench",
                        "action": "route",
                        "attest": "A",
                        "contacts": [
                            f"sip:{{dialled}}@{HOST}:{ports.carrier}",
                            f"sip:{{dialled}}@{HOST}:{ports.carrier2}",
                        ],
                    }
                ],
            }
        )
    )
    ready = workdir / "emulator-ready.json"
    ready.unlink(missing_ok=True)
    proc = spawn(
        name,
        [sys.executable, "-m", "clearip.relay.cli", "emulate", "--rules", str(rules),
         "--tls", f"{HOST}:{ports.emulator_tls}", "--lab-tls", str(lab),
         "--ready-file", str(ready), "--quiet"],
        workdir,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not ready.exists():
        proc.check_alive()
        if time.monotonic() > deadline:
            stop(proc)
            raise BenchError("the ClearIP emulator did not start within 20 s")
        time.sleep(0.05)
    return proc


def lab_ca(workdir: Path) -> Path:
    return workdir / "lab" / "ca.pem"


@dataclass
class SippStats:
    """The last figures of a SIPp run, from its ``-trace_stat`` CSV."""

    created: int = 0
    successful: int = 0
    failed: int = 0
    retransmissions: int = 0
    elapsed: float = 0.0
    sustained_cps: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)


def _epoch(stamp: str) -> float:
    return float(stamp.rsplit("\t", maxsplit=1)[-1])


def sipp_stats(csv_path: Path) -> SippStats:
    """Parse a SIPp statistics CSV: cumulative counters and the sustained rate.

    Sustained calls/s is the successful calls of the periodic rows inside the run (the first
    and last rows, ramp-up and tail, left out) over their time span; with too few rows it falls
    back to all successful calls over the whole elapsed time.
    """
    if not csv_path.exists():
        return SippStats()
    lines = [ln for ln in csv_path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        return SippStats()
    header = lines[0].split(";")
    rows = [dict(zip(header, ln.split(";"), strict=False)) for ln in lines[1:]]
    rows = [r for r in rows if len(r) == len(header) and not r["StartTime"].startswith("Start")]
    if not rows:
        return SippStats()
    last = rows[-1]

    def num(row: dict[str, str], key: str) -> int:
        try:
            return int(float(row.get(key, "0") or 0))
        except ValueError:
            return 0

    counters = {k: num(last, k) for k in header if k.endswith("(C)")}
    elapsed = _epoch(last["CurrentTime"]) - _epoch(last["StartTime"])
    successful = num(last, "SuccessfulCall(C)")
    sustained = successful / elapsed if elapsed > 0 else 0.0
    inner = rows[1:-1]
    while inner and num(inner[-1], "OutgoingCall(P)") == 0:
        inner = inner[:-1]  # the tail after the last call was created
    if len(inner) >= 3:
        span = _epoch(inner[-1]["CurrentTime"]) - _epoch(rows[0]["CurrentTime"])
        ok = sum(num(r, "SuccessfulCall(P)") for r in inner)
        if span > 0:
            sustained = ok / span
    return SippStats(
        created=num(last, "TotalCallCreated"),
        successful=successful,
        failed=num(last, "FailedCall(C)"),
        retransmissions=num(last, "Retransmissions(C)"),
        elapsed=elapsed,
        sustained_cps=sustained,
        counters=counters,
    )


def run_switch(
    name: str,
    workdir: Path,
    ports: Ports,
    rate: float,
    calls: int,
    *,
    scenario: Path = SIPP_ANCHORS / "uac_switch.xml",
    args: Sequence[str] = (),
    port: int | None = None,
    timeout: float | None = None,
    limit: int | None = None,
) -> tuple[SippStats, float]:
    """Drive ``calls`` calls at ``rate``/s to the proxy and wait for SIPp to end them all.

    Returns the SIPp statistics and the wall time the run took.
    """
    proc = sipp(
        name,
        workdir,
        scenario,
        port or ports.switch,
        args=["-r", f"{rate:g}", "-m", str(calls), "-l", str(limit or max(20, int(rate * 2))),
              "-recv_timeout", "8000", *args],
        remote=f"{HOST}:{ports.proxy}",
    )  # fmt: skip
    started = time.monotonic()
    try:
        proc.popen.wait(timeout or calls / max(rate, 0.1) + 60)
    except subprocess.TimeoutExpired:
        stop(proc)
    elapsed = time.monotonic() - started
    return sipp_stats(workdir / f"{name}.csv"), elapsed


# -- capture and latency ----------------------------------------------------------------------
def invite_filter(*dst_ports: int) -> str:
    """BPF for UDP INVITEs to these ports only: the payload starts with "INVI" (0x494e5649).

    Capturing only what the latency needs keeps the capture's cost and drops small.
    """
    return " or ".join(f"(udp dst port {p} and udp[8:4] = 0x494e5649)" for p in dst_ports)


class Capture:
    """dumpcap on loopback into a pcap file; kernel timestamps, so scheduling of the readers
    does not bias the proxy's figures."""

    def __init__(self, workdir: Path, name: str, bpf: str) -> None:
        self.path = workdir / f"{name}.pcap"
        self.bpf = bpf
        self.proc: Proc | None = None
        self.workdir = workdir
        self.name = name

    def __enter__(self) -> Capture:
        self.path.unlink(missing_ok=True)
        self.proc = spawn(
            f"{self.name}-dumpcap",
            ["dumpcap", "-i", "lo", "-P", "-B", "64", "-f", self.bpf, "-w", str(self.path), "-q"],
            self.workdir,
        )
        deadline = time.monotonic() + 10
        while not (self.path.exists() and self.path.stat().st_size >= 24):
            self.proc.check_alive()
            if time.monotonic() > deadline:
                raise BenchError("dumpcap did not start capturing within 10 s")
            time.sleep(0.05)
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            time.sleep(0.3)
            stop(self.proc)


@dataclass(frozen=True)
class Packet:
    """One captured UDP datagram on loopback."""

    time: float
    sport: int
    dport: int
    payload: bytes


_LINK_OFFSETS = {0: 4, 1: 14, 101: 0, 12: 0, 113: 16, 276: 20}


def read_pcap(path: Path) -> list[Packet]:
    """UDP/IPv4 datagrams of a libpcap file (micro- or nanosecond, either byte order)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 24:
        return []
    magic = data[:4]
    formats = {
        b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
        b"\xa1\xb2\xc3\xd4": (">", 1e-6),
        b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
        b"\xa1\xb2\x3c\x4d": (">", 1e-9),
    }
    if magic not in formats:
        raise BenchError(f"{path}: not a libpcap file (pcapng? capture with dumpcap -P)")
    order, unit = formats[magic]
    linktype = struct.unpack(order + "I", data[20:24])[0] & 0xFFFF
    if linktype not in _LINK_OFFSETS:
        raise BenchError(f"{path}: unsupported link type {linktype}")
    offset = _LINK_OFFSETS[linktype]
    record = struct.Struct(order + "IIII")
    out: list[Packet] = []
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, _orig = record.unpack_from(data, pos)
        pos += 16
        frame = data[pos : pos + incl]
        pos += incl
        if linktype == 1 and frame[12:14] != b"\x08\x00":
            continue
        ip = frame[offset:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        sport, dport = struct.unpack("!HH", ip[ihl : ihl + 4])
        out.append(Packet(sec + frac * unit, sport, dport, ip[ihl + 8 :]))
    return out


_CALL_ID = re.compile(rb"\r\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
_CSEQ = re.compile(rb"\r\ncseq[ \t]*:[ \t]*(\d+)[ \t]+([A-Za-z]+)", re.IGNORECASE)


@dataclass(frozen=True)
class SipPacket:
    time: float
    sport: int
    dport: int
    method: str  # request method, or "" for a response
    status: int  # response status, or 0 for a request
    call_id: str
    cseq_method: str


def sip_packets(packets: Sequence[Packet]) -> list[SipPacket]:
    """The SIP start line, Call-ID and CSeq method of each captured datagram."""
    out = []
    for p in packets:
        line = p.payload.split(b"\r\n", 1)[0]
        parts = line.split(b" ", 2)
        if len(parts) < 2:
            continue
        method, status = "", 0
        if parts[0] == b"SIP/2.0":
            if not parts[1].isdigit():
                continue
            status = int(parts[1])
        else:
            method = parts[0].decode("ascii", "replace")
        cid = _CALL_ID.search(p.payload)
        cseq = _CSEQ.search(p.payload)
        if cid is None:
            continue
        out.append(
            SipPacket(
                p.time,
                p.sport,
                p.dport,
                method,
                status,
                cid.group(1).strip().decode("ascii", "replace"),
                cseq.group(2).decode("ascii").upper() if cseq else "",
            )
        )
    return out


def added_latencies(packets: Sequence[SipPacket], in_port: int, out_port: int) -> list[float]:
    """Seconds from each call's first INVITE into the proxy to its first INVITE out to
    ``out_port`` (the carrier), matched by Call-ID; calls missing either side are left out."""
    arrived: dict[str, float] = {}
    forwarded: dict[str, float] = {}
    for p in packets:
        if p.method != "INVITE":
            continue
        if p.dport == in_port:
            arrived.setdefault(p.call_id, p.time)
        elif p.dport == out_port:
            forwarded.setdefault(p.call_id, p.time)
    return sorted(forwarded[c] - arrived[c] for c in forwarded if c in arrived)


@dataclass
class EmergencyTimes:
    """Per 911 call: time from its first INVITE reaching the proxy to the proxy's first
    forwarded INVITE (to the PSAP route) or final answer (the 503 of "route directly")."""

    times: list[float]
    sent: int
    retransmitted: int
    unanswered: int


def emergency_latencies(
    packets: Sequence[SipPacket], proxy_port: int, uac_port: int, route_port: int
) -> EmergencyTimes:
    arrived: dict[str, float] = {}
    copies: dict[str, int] = {}
    left: dict[str, float] = {}
    for p in packets:
        if p.method == "INVITE" and p.dport == proxy_port and p.sport == uac_port:
            arrived.setdefault(p.call_id, p.time)
            copies[p.call_id] = copies.get(p.call_id, 0) + 1
        elif (p.method == "INVITE" and p.dport == route_port) or (
            p.status >= 200 and p.sport == proxy_port and p.dport == uac_port
            and p.cseq_method == "INVITE"
        ):  # fmt: skip
            left.setdefault(p.call_id, p.time)
    times = sorted(left[c] - arrived[c] for c in arrived if c in left and left[c] >= arrived[c])
    return EmergencyTimes(
        times=times,
        sent=len(arrived),
        retransmitted=sum(1 for n in copies.values() if n > 1),
        unanswered=sum(1 for c in arrived if c not in left),
    )


# -- figures and tables -----------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default);
    NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * min(max(q, 0.0), 100.0) / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def ratio(a: float, b: float) -> float:
    if not (isinstance(a, int | float) and isinstance(b, int | float)) or not b or math.isnan(b):
        return math.nan
    return a / b


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = ""  # format spec for numbers, e.g. ".1f"


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt) if fmt else str(value)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A plain-text table: strings left-aligned, numbers right-aligned, NaN/None as "-"."""
    cells = [[_cell(r.get(c.key), c.fmt) for c in columns] for r in rows]
    widths = [max([len(c.header)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(r.get(c.key), int | float) or r.get(c.key) is None for r in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line([c.header for c in columns]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    out = ["| " + " | ".join(c.header for c in columns) + " |"]
    out.append("| " + " | ".join("---" for _ in columns) + " |")
    out += ["| " + " | ".join(_cell(r.get(c.key), c.fmt) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def _first_line(argv: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
        for line in (out.stdout + out.stderr).splitlines():
            if line.strip():
                return line.strip()
    return "not installed"


def machine_info() -> dict[str, str]:
    """What the figures were measured on: CPU, cores, kernel, Python, Kamailio and SIPp."""
    model = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1).strip() if m else model
    sipp_version = _first_line(["sipp", "-v"]) if shutil.which("sipp") else "not installed"
    kam = _first_line(["kamailio", "-v"]) if shutil.which("kamailio") else "not installed"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kamailio": kam,
        "sipp": sipp_version,
    }


def write_json(path: str | Path, data: Any) -> None:
    def default(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(repr(o))

    def clean(o: Any) -> Any:  # NaN is not JSON
        if isinstance(o, float) and math.isnan(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    text = json.dumps(clean(json.loads(json.dumps(data, default=default))), indent=2)
    Path(path).write_text(text + "\n")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command as the user typed it, for the report."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def workdir_for(prefix: str) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))


def worker_counts(text: str) -> list[int]:
    """``--workers`` as a comma list: numbers, or ``all`` for one worker per CPU."""
    counts = []
    for raw in text.split(","):
        item = raw.strip()
        count = (os.cpu_count() or 1) if item == "all" else int(item) if item.isdigit() else 0
        if count < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: a number >= 1 or 'all'")
        if count not in counts:
            counts.append(count)
    return counts


def add_common_args(parser: Any, *, several_workers: bool = False) -> None:
    """Options every call benchmark takes; ``several_workers``: ``--workers`` is a list
    (e.g. ``1,2,all``) and the relay runs once per count."""
    parser.add_argument(
        "--port-base", type=int, default=0, metavar="N", help="add N to every port (default 0)"
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    if several_workers:
        parser.add_argument(
            "--workers",
            type=worker_counts,
            default=[1],
            metavar="N[,N...]",
            help="relay worker processes, a comma list, 'all' = one per CPU (default 1; N > 1 "
            "steers calls in the kernel, needs root); the relay is measured once per count",
        )
        return
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="relay worker processes (default 1; N > 1 steers calls in the kernel, needs root)",
    )
