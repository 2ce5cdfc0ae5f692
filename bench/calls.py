"""Calls per second, CPU per call, RSS and added latency: the relay and Kamailio side by side.

Run: ``.venv/bin/python -m bench.calls [RATE] [SECONDS]`` (default 200 calls/s for 10 s).

Both proxies do the same in-line job on loopback, one after the other in the same run, with the
same SIPp peers (the scenarios and the Kamailio config are the shared anchors in
``../shared/anchors``; nothing is copied into the product): switch UAC (127.0.0.1:5090) ->
proxy (127.0.0.1:5060) -> ClearIP stand-in answering 302 with Identity and two Contacts
(127.0.0.1:5070, UDP) -> carrier UAS (127.0.0.1:5080) -> ACK, BYE through the Record-Route.
Added latency is measured from a tshark capture: switch INVITE in -> INVITE out to the carrier,
matched by Call-ID. Kamailio's row is skipped, with a note, where kamailio is not installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors"
TICK = os.sysconf("SC_CLK_TCK")


def _pids(root: int) -> list[int]:
    out = [root]
    try:
        for child in Path(f"/proc/{root}/task/{root}/children").read_text().split():
            out += _pids(int(child))
    except OSError:
        pass
    return out


def _cpu(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def _rss_peak_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            m = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
            total += int(m.group(1)) if m else 0
    return total


def _wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return  # bound by the proxy
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def relay(workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    (workdir / "trust.toml").write_text('[[source]]\ncidr = "127.0.0.1/32"\nrole = "switch"\n')
    config = workdir / "proxy.toml"
    config.write_text(
        f'[proxy]\ntrust_file = "{workdir / "trust.toml"}"\n'
        f'control_socket = "{workdir / "control.sock"}"\nstate_dir = "{workdir}"\n'
        "invite_rate_per_source = 0\n"
        '[[listen]]\ntransport = "udp"\naddress = "127.0.0.1"\nport = 5060\n'
        '[upstream.outbound]\nuri = "sip:127.0.0.1:5070;transport=udp"\n'
        '[xdp]\nenabled = false\n[metrics]\nenabled = false\n[log]\nlevel = "warning"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "clearip.relay.cli", "run", "--config", str(config)],
        stdout=(workdir / "relay.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(5060)
        time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def kamailio(workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        ["kamailio", "-x", "tlsf", "-X", "tlsf", "-m", "1024", "-M", "64",
         "-f", str(ANCHORS / "kamailio" / "inline.cfg"), "-P", str(workdir / "k.pid"), "-DD", "-E"],
        stdout=(workdir / "kamailio.log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_port(5060)
        time.sleep(1.0)
        yield process
    finally:
        process.terminate()
        process.wait(10)


def _sipp(workdir: Path, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["sipp", *args, "-nostdin"],
        cwd=workdir,
        stdout=(workdir / f"{name}.out").open("wb"),
        stderr=subprocess.STDOUT,
    )


def measure(
    name: str, proxy: subprocess.Popen[bytes], rate: int, seconds: int, workdir: Path
) -> dict[str, object]:
    sipp_dir = ANCHORS / "sipp"
    carrier = _sipp(workdir, f"{name}-carrier", ["-sf", str(sipp_dir / "uas_carrier.xml"),
                                                  "-i", "127.0.0.1", "-p", "5080"])  # fmt: skip
    clearip = _sipp(workdir, f"{name}-clearip", ["-sf", str(sipp_dir / "uas_clearip_302.xml"),
                    "-i", "127.0.0.1", "-p", "5070", "-key", "c1", "127.0.0.1:5080",
                    "-key", "c2", "127.0.0.1:5082"])  # fmt: skip
    pcap = workdir / f"{name}.pcap"
    capture = subprocess.Popen(
        [
            "tshark",
            "-i",
            "lo",
            "-f",
            "udp dst port 5060 or udp dst port 5080",
            "-w",
            str(pcap),
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    pids = _pids(proxy.pid)
    cpu0 = _cpu(pids)
    started = time.monotonic()
    calls = rate * seconds
    switch = _sipp(workdir, f"{name}-switch", [
        "127.0.0.1:5060", "-sf", str(sipp_dir / "uac_switch.xml"), "-i", "127.0.0.1",
        "-p", "5090", "-r", str(rate), "-m", str(calls), "-l", str(rate * 2),
        "-recv_timeout", "8000", "-fd", "1", "-trace_screen", "-screen_file",
        str(workdir / f"{name}-screen.txt"),
    ])  # fmt: skip
    try:
        switch.wait(seconds + 60)
    except subprocess.TimeoutExpired:
        switch.kill()
    elapsed = time.monotonic() - started
    cpu1 = _cpu(_pids(proxy.pid))
    rss = _rss_peak_kb(_pids(proxy.pid))
    capture.terminate()
    capture.wait(10)
    for peer in (carrier, clearip):
        peer.terminate()
        peer.wait(10)
    text = (workdir / f"{name}-switch.out").read_bytes().decode(errors="replace")
    screens = text + "".join(p.read_text(errors="replace") for p in workdir.glob(f"{name}-screen*"))
    ok = _last_int(screens, r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)")
    failed = _last_int(screens, r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)")
    cpu_s = (cpu1 - cpu0) / TICK
    latencies = _latencies(pcap)
    return {
        "system": name,
        "attempted": calls,
        "completed": ok,
        "failed": failed,
        "cps": ok / elapsed if elapsed else 0.0,
        "cpu_us_per_call": cpu_s * 1e6 / ok if ok else float("nan"),
        "rss_mb": rss / 1024,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99_ms": (statistics.quantiles(latencies, n=100)[98] * 1000)
        if len(latencies) > 100
        else float("nan"),
    }


def _last_int(text: str, pattern: str) -> int:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else 0


def _latencies(pcap: Path) -> list[float]:
    if not pcap.exists():
        return []
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", 'sip.Method == "INVITE"', "-T", "fields",
         "-e", "frame.time_epoch", "-e", "udp.dstport", "-e", "sip.Call-ID", "-e", "sip.CSeq.seq"],
        capture_output=True, text=True, timeout=600,
    ).stdout  # fmt: skip
    arrived: dict[str, float] = {}
    forwarded: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) < 4 or parts[3] != "1":
            continue
        when, port, call_id = float(parts[0]), parts[1], parts[2]
        if port == "5060":
            arrived.setdefault(call_id, when)
        elif port == "5080":
            forwarded.setdefault(call_id, when)
    return [forwarded[c] - arrived[c] for c in forwarded if c in arrived]


def main() -> int:
    rate = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    for tool in ("sipp", "tshark"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (apt-get install sip-tester tshark)", file=sys.stderr)
            return 2
    if not ANCHORS.is_dir():
        print(f"the shared anchors are missing at {ANCHORS}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    rows = []
    with relay(workdir) as process:
        rows.append(measure("relay", process, rate, seconds, workdir))
    if shutil.which("kamailio"):
        with kamailio(workdir) as process:
            rows.append(measure("kamailio", process, rate, seconds, workdir))
    else:
        print("kamailio is not installed: side-by-side skipped (apt-get install kamailio)")
    print(f"Outbound in-line flow on loopback, {rate} calls/s for {seconds} s, UDP upstream, "
          f"2 cores shared with the SIPp peers (logs in {workdir})")  # fmt: skip
    header = (
        f"{'system':10} {'attempted':>9} {'completed':>9} {'failed':>6} {'calls/s':>8} "
        f"{'CPU us/call':>11} {'peak RSS MB':>11} {'p50 ms':>7} {'p99 ms':>7}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['system']:10} {r['attempted']:9d} {r['completed']:9d} {r['failed']:6d} "
            f"{r['cps']:8.1f} {r['cpu_us_per_call']:11.1f} {r['rss_mb']:11.1f} "
            f"{r['p50_ms']:7.2f} {r['p99_ms']:7.2f}"
        )
    if len(rows) == 2:
        relay_row, kam = rows
        for key, label in (
            ("cpu_us_per_call", "CPU per call"),
            ("rss_mb", "peak RSS"),
            ("p99_ms", "p99 added latency"),
        ):
            ratio = float(relay_row[key]) / float(kam[key]) if float(kam[key]) else float("nan")  # type: ignore[arg-type]
            print(f"ratio relay/kamailio {label}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
