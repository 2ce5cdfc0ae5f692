"""The benchmark harness's pure parts (pcap to latency, percentiles, tables, SIPp statistics)
and one short end-to-end run of ``bench.calls`` against SIPp."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import rig

ROOT = Path(__file__).resolve().parents[1]


def _invite(call_id: str, dport: int = 5060) -> bytes:
    return (
        f"INVITE sip:12125550100@127.0.0.1:{dport} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK-1\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _response(call_id: str, status: int) -> bytes:
    return (
        f"SIP/2.0 {status} Whatever\r\nVia: SIP/2.0/UDP 127.0.0.1:5092;branch=z9hG4bK-2\r\n"
        f"i: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _write_pcap(path: Path, frames: list[tuple[float, int, int, bytes]]) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    packets = []
    for when, sport, dport, payload in frames:
        pkt = Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=sport, dport=dport)
        pkt = pkt / Raw(payload)
        pkt.time = when
        packets.append(pkt)
    wrpcap(str(path), packets)


def test_added_latency_from_a_capture(tmp_path: Path) -> None:
    pcap = tmp_path / "x.pcap"
    _write_pcap(
        pcap,
        [
            (100.000000, 5090, 5060, _invite("a")),  # switch -> proxy
            (100.000500, 5060, 5070, _invite("a", 5070)),  # ClearIP leg: not the carrier
            (100.000800, 5090, 5060, _invite("b")),
            (100.001000, 5060, 5080, _invite("a", 5080)),  # out to the carrier: 1.0 ms
            (100.002000, 5090, 5060, _invite("a")),  # a retransmission does not count
            (100.003800, 5060, 5080, _invite("b", 5080)),  # 3.0 ms
            (100.004000, 5090, 5060, _invite("c")),  # never forwarded: left out
            (100.005000, 5060, 5090, _response("a", 100)),
        ],
    )
    packets = rig.sip_packets(rig.read_pcap(pcap))
    assert len(packets) == 8
    assert packets[-1].status == 100 and packets[-1].call_id == "a"
    got = rig.added_latencies(packets, in_port=5060, out_port=5080)
    assert got == pytest.approx([0.001, 0.003], abs=2e-6)


def test_emergency_times_forwarded_or_answered(tmp_path: Path) -> None:
    pcap = tmp_path / "e.pcap"
    _write_pcap(
        pcap,
        [
            (10.0, 5092, 5060, _invite("e1")),
            (10.002, 5060, 5092, _response("e1", 100)),  # 100 Trying is not the answer
            (10.004, 5060, 5092, _response("e1", 503)),  # answered 503 after 4 ms
            (11.0, 5092, 5060, _invite("e2")),
            (11.5, 5092, 5060, _invite("e2")),  # retransmitted
            (11.52, 5060, 5084, _invite("e2", 5084)),  # forwarded to the route after 520 ms
            (12.0, 5092, 5060, _invite("e3")),  # nothing came back
        ],
    )
    packets = rig.sip_packets(rig.read_pcap(pcap))
    result = rig.emergency_latencies(packets, proxy_port=5060, uac_port=5092, route_port=5084)
    assert result.times == pytest.approx([0.004, 0.52], abs=2e-6)
    assert (result.sent, result.retransmitted, result.unanswered) == (3, 1, 1)


def test_read_pcap_rejects_pcapng(tmp_path: Path) -> None:
    path = tmp_path / "x.pcapng"
    path.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\0" * 40)
    with pytest.raises(rig.BenchError, match="pcapng"):
        rig.read_pcap(path)
    assert rig.read_pcap(tmp_path / "missing.pcap") == []


def test_percentile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert rig.percentile(values, 50) == 3.0
    assert rig.percentile(values, 0) == 1.0
    assert rig.percentile(values, 100) == 5.0
    assert rig.percentile(values, 25) == 2.0
    assert rig.percentile(values, 90) == pytest.approx(4.6)
    assert rig.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert rig.percentile([7.0], 99) == 7.0
    assert math.isnan(rig.percentile([], 50))


def test_ratio_guards_missing_figures() -> None:
    assert rig.ratio(3.0, 2.0) == 1.5
    assert math.isnan(rig.ratio(1.0, 0.0))
    assert math.isnan(rig.ratio(1.0, math.nan))


def test_format_table_aligns_and_marks_missing() -> None:
    columns = [rig.Column("system", "system"), rig.Column("cps", "calls/s", ".1f")]
    rows = [{"system": "relay", "cps": 1234.56}, {"system": "kamailio", "cps": math.nan}]
    lines = rig.format_table(rows, columns).splitlines()
    assert lines[0] == "system    calls/s"
    assert lines[1] == "--------  -------"
    assert lines[2] == "relay      1234.6"
    assert lines[3] == "kamailio" + " " * 8 + "-"
    assert len({len(line) for line in lines}) == 1
    md = rig.markdown_table(rows, columns).splitlines()
    assert md[0] == "| system | calls/s |" and md[2] == "| relay | 1234.6 |"


def test_sipp_stats_sustained_rate(tmp_path: Path) -> None:
    header = (
        "StartTime;CurrentTime;OutgoingCall(P);TotalCallCreated;SuccessfulCall(P);"
        "SuccessfulCall(C);FailedCall(C);Retransmissions(C)"
    )
    start = "2026-01-01\t00:00:00.000000\t1000.000000"
    lines = [header]
    for second in range(7):  # 100 calls/s created for 5 s, every call done 1 s later
        created = min(second, 5) * 100
        ok = max(0, min(second - 1, 5)) * 100
        periodic = 100 if 1 <= second - 1 < 5 else 0
        out = 100 if 1 <= second <= 5 else 0
        now = f"2026-01-01\t00:00:0{second}.000000\t{1000 + second}.000000"
        lines.append(f"{start};{now};{out};{created};{periodic};{ok};0;{second // 6}")
    path = tmp_path / "s.csv"
    path.write_text("\n".join(lines) + "\n")
    stats = rig.sipp_stats(path)
    assert (stats.created, stats.successful, stats.failed, stats.retransmissions) == (
        500,
        500,
        0,
        1,
    )
    assert stats.elapsed == pytest.approx(6.0)
    assert 80 <= stats.sustained_cps <= 101
    assert rig.sipp_stats(tmp_path / "missing.csv").successful == 0


def test_relay_config_is_valid_toml_with_overrides(tmp_path: Path) -> None:
    import tomllib

    config = rig.relay_config(
        tmp_path,
        rig.Ports.shifted(100),
        "tcp",
        extra_config={"proxy": {"max_transactions": 5}, "emergency": {"route": "sip:h:1"}},
    )
    data = tomllib.loads(rig.toml_dumps(config))
    assert data["upstream"]["outbound"]["uri"] == "sip:127.0.0.1:5170;transport=tcp"
    assert data["proxy"]["max_transactions"] == 5
    assert data["proxy"]["invite_rate_per_source"] == 0
    assert data["listen"] == [{"transport": "udp", "address": "127.0.0.1", "port": 5160}]
    assert data["emergency"] == {"route": "sip:h:1"}


def test_worker_counts_and_the_scaling_report() -> None:
    import argparse

    from bench.capacity import scaling_report

    every_cpu = os.cpu_count() or 1
    assert rig.worker_counts("1,2,all,2") == list(dict.fromkeys([1, 2, every_cpu]))
    with pytest.raises(argparse.ArgumentTypeError, match="'0'"):
        rig.worker_counts("1,0")
    summaries = [
        {"system": "relay", "upstream": "udp", "workers": 1, "clean_rate": 400},
        {"system": "relay x4", "upstream": "udp", "workers": 4, "clean_rate": 1200},
        {"system": "kamailio", "upstream": "udp", "clean_rate": 1000},
    ]
    report = scaling_report(summaries, "udp").splitlines()
    assert report[0] == "ratio relay (udp): 400 calls/s, x0.40 Kamailio's 1000"
    assert report[1] == (
        "ratio relay x4 (udp): 1200 calls/s, x1.20 Kamailio's 1000, "
        "300 per worker = x0.75 the single worker's"
    )


def test_process_tree_accounts_children() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys; subprocess.run(['sleep','5'])"]
    )
    try:
        tree = rig.ProcessTree(child.pid)
        for _ in range(100):
            if len(tree.pids()) >= 2:
                break
            subprocess.run(["sleep", "0.02"])
        assert len(tree.pids()) == 2
        assert tree.rss_kb() > 0 and tree.peak_rss_kb() >= tree.rss_kb() > 0
        assert tree.cpu_seconds() >= 0
    finally:
        child.kill()
        child.wait()


def _free_base() -> int:
    for base in range(31000, 60000, 200):
        ports = rig.Ports.shifted(base - 5060)
        try:
            rig.check_ports_free(ports)
        except rig.BenchError:
            continue
        return base - 5060
    pytest.skip("no free port range on 127.0.0.1")


@pytest.mark.slow
@pytest.mark.sipp
def test_calls_smoke_prints_a_clean_table() -> None:
    capture = [] if shutil.which("dumpcap") and os.geteuid() == 0 else ["--no-capture"]
    out = subprocess.run(
        [sys.executable, "-m", "bench.calls", "20", "3", "--upstream", "udp", "--no-kamailio",
         "--port-base", str(_free_base()), *capture],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("system "))
    row = next(line for line in lines if line.startswith("relay "))
    cells = dict(zip(header.split(), row.split(), strict=False))
    assert int(cells["completed"]) > 0, out.stdout
    assert int(cells["failed"]) == 0, out.stdout


BENCH_MAINS = sorted(
    path.stem
    for path in (ROOT / "bench").glob("*.py")
    if not path.stem.startswith("test_") and 'if __name__ == "__main__":' in path.read_text()
)


@pytest.mark.parametrize("module", BENCH_MAINS)
def test_every_bench_command_answers_help(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m bench.{module}"), out.stdout


def test_parse_stream_is_distinct_calls_that_parse() -> None:
    from bench.samples import call_stream
    from clearip.relay.sip.message import Request, Response
    from clearip.relay.sip.parser import parse_message

    invites, ringing, answers = call_stream(50, seed=7)
    parsed = [parse_message(data) for data in invites + ringing + answers]
    assert all(isinstance(m, Request) for m in parsed[:50])
    assert all(isinstance(m, Response) for m in parsed[50:])
    for stream in (parsed[:50], parsed[50:100], parsed[100:]):
        assert len({m.call_id for m in stream}) == 50
        assert len({m.top_via.branch for m in stream}) == 50
        assert len({m.from_tag for m in stream}) == 50
    assert len({str(m.to_addr.uri) for m in parsed[:50]}) == 50  # dialled numbers
    assert [m.call_id for m in parsed[50:100]] == [m.call_id for m in parsed[:50]]
    assert call_stream(3, seed=7) == (invites[:3], ringing[:3], answers[:3])
