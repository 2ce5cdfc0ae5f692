"""Each kind of protective event reaches /metrics (issue #19): the real daemon is driven into
it and the scrape shows it counted, in its own counter and, for INVITEs answered before a call
exists, in ``clearip_calls_total`` with its reason."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from clearip.relay.proxy.routing import STATEFUL_PREFIX, loop_hash
from clearip.relay.sip.message import Request
from clearip.relay.sip.parser import parse_message
from lab.proxy_harness import SWITCH_IP, ThreadedProxy, threaded_proxy, wait_for, write_config
from lab.sipp import clearip_scenario, free_port, sipp_uas

pytestmark = [pytest.mark.sipp, pytest.mark.slow]


def _scrape(proxy: ThreadedProxy) -> str:
    port = proxy.call(lambda d: d.metrics.port if d.metrics else 0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _value(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?")
    found = re.search(rf"^{pattern} (\S+)$", text, re.M)
    assert found, f"{name}{{{labels}}} not in metrics"
    return float(found.group(1))


def _invite(port: int, tag: str, *, extra: str = "", max_forwards: int = 70) -> bytes:
    return (
        f"INVITE sip:12125550100@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {SWITCH_IP}:{port};rport;branch=z9hG4bK-{tag}\r\n{extra}"
        f"Max-Forwards: {max_forwards}\r\nFrom: <sip:14045550100@{SWITCH_IP}>;tag=f{tag}\r\n"
        f"To: <sip:12125550100@127.0.0.1>\r\nCall-ID: {tag}@metrics\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:s@{SWITCH_IP}:{port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _finals(sock: socket.socket, tags: list[str], timeout: float = 5.0) -> dict[str, int]:
    """The first final status of each INVITE (by its tag); our 503s are retransmitted until
    ACKed (RFC 3261 §17.2.1), so answers are told apart by Call-ID, not by order."""
    want = {f"{tag}@metrics": tag for tag in tags}
    finals: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(finals) < len(tags) and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65535)
        except TimeoutError:
            break
        call_id = re.search(rb"(?im)^call-id:\s*(\S+)", data)
        tag = want.get(call_id.group(1).decode()) if call_id else None
        if tag is not None and int(data[8:11]) >= 200:
            finals.setdefault(tag, int(data[8:11]))
    return finals


def test_shedding_reaches_metrics(tmp_path: Path) -> None:
    # Any wait in the socket queue sheds: every new INVITE is answered 503 Overloaded.
    config = write_config(
        tmp_path, port=free_port(), upstream="sip:127.0.0.1:9;transport=tcp",
        extra="", proxy_extra="overload_queue_delay = 0.000001\n",
    )  # fmt: skip
    with threaded_proxy(config) as proxy, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((SWITCH_IP, 0))
        port = proxy.config.listeners[0].port
        for n in range(5):
            s.sendto(_invite(s.getsockname()[1], f"shed{n}"), ("127.0.0.1", port))
        assert 503 in _finals(s, [f"shed{n}" for n in range(5)]).values()
        text = _scrape(proxy)
        shed = _value(text, "clearip_overload_shed_total")
        assert shed >= 1
        labels = 'reason="overload",role="switch",status="503"'
        assert _value(text, "clearip_calls_total", labels) == shed


def test_protective_events_reach_metrics(tmp_path: Path) -> None:
    clearip_port = free_port("tcp")
    config = write_config(
        tmp_path, port=free_port(), upstream=f"sip:127.0.0.1:{clearip_port};transport=tcp",
        proxy_extra="invite_rate_per_source = 2.0\nmax_connections_per_source = 1\n"
        "overload_queue_delay = 0\n",
    )  # fmt: skip
    # ClearIP answers 503 after 2.5 s, with no 100 before it (so the relay has nothing to
    # CANCEL): later than upstream_timeout (1.5 s), a late answer.
    with (
        sipp_uas(
            tmp_path, "clearip", clearip_scenario(503).replace(
                '<recv request="INVITE" crlf="true"/>\n',
                '<recv request="INVITE" crlf="true"/>\n  <pause milliseconds="2500"/>\n',
            ),
            local=("127.0.0.1", clearip_port), transport="t1", calls=1,
        ),
        threaded_proxy(config) as proxy,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
    ):  # fmt: skip
        s.bind((SWITCH_IP, 0))
        me, port = s.getsockname()[1], proxy.config.listeners[0].port
        up = lambda: proxy.call(lambda d: all(link.up for link in d.links.values()))  # noqa: E731
        wait_for(up, 10, "the ClearIP link")
        # One call to the slow ClearIP: fail-open at 1.5 s, ClearIP's 503 comes late.
        s.sendto(_invite(me, "late"), ("127.0.0.1", port))
        assert _finals(s, ["late"]) == {"late": 503}
        wait_for(lambda: proxy.counters().get("clearip_late_response"), 5, "the late answer")
        time.sleep(1.1)  # the rate limiter's bucket refills
        # Out of hops, then a loop (our own Via with this request's loop hash, below the top).
        s.sendto(_invite(me, "hops", max_forwards=0), ("127.0.0.1", port))
        assert _finals(s, ["hops"]) == {"hops": 483}
        looping = parse_message(_invite(me, "loop"))
        assert isinstance(looping, Request)
        ours = f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={STATEFUL_PREFIX}{loop_hash(looping)}.1"
        s.sendto(_invite(me, "loop", extra=ours + "\r\n"), ("127.0.0.1", port))
        assert _finals(s, ["loop"]) == {"loop": 482}
        # A burst over the per-source rate (2/s).
        for n in range(6):
            s.sendto(_invite(me, f"burst{n}"), ("127.0.0.1", port))
        assert 503 in _finals(s, [f"burst{n}" for n in range(6)], timeout=6).values()
        # A second TCP connection from the same source is over max_connections_per_source.
        with socket.create_connection(("127.0.0.1", port)) as first:
            first.sendall(b"\r\n\r\n")
            assert first.recv(10) == b"\r\n"  # the first connection is served
            with socket.create_connection(("127.0.0.1", port)) as second:
                second.settimeout(5)
                assert second.recv(10) == b"", "the second connection should be closed"
        text = _scrape(proxy)
    assert _value(text, "clearip_upstream_late_responses_total") >= 1
    assert _value(text, "clearip_too_many_hops_total") == 1
    assert _value(text, "clearip_loops_detected_total") == 1
    assert _value(text, "clearip_rate_limited_total") >= 1
    assert _value(text, "clearip_connection_per_source_limit_closed_total") == 1
    for reason, status in (("too-many-hops", 483), ("loop", 482)):
        labels = f'reason="{reason}",role="switch",status="{status}"'
        assert _value(text, "clearip_calls_total", labels) == 1
    fail_open = 'reason="fail-open",role="switch",status="503"'
    assert _value(text, "clearip_calls_total", fail_open) >= 1  # the late call (and a burst's)
    labels = 'reason="rate-limit",role="switch",status="503"'
    assert _value(text, "clearip_calls_total", labels) == _value(text, "clearip_rate_limited_total")


def test_a_stalled_stream_reaches_metrics(tmp_path: Path) -> None:
    """A TCP peer that sends OPTIONS and never reads: the relay gives the connection up once
    1 MiB of answers is queued (stream_write_stalled)."""
    config = write_config(tmp_path, port=free_port(), upstream="sip:127.0.0.1:9;transport=tcp")
    with threaded_proxy(config) as proxy:
        port = proxy.config.listeners[0].port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        options = [
            (
                f"OPTIONS sip:p@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP {SWITCH_IP}:5060;"
                f"branch=z9hG4bK-st{n}\r\nMax-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\n"
                f"To: <sip:p@127.0.0.1>\r\nCall-ID: stall{n}\r\nCSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
            for n in range(30000)
        ]
        sock.settimeout(30)
        try:
            for start in range(0, len(options), 500):
                sock.sendall(b"".join(options[start : start + 500]))
                if proxy.counters().get("stream_write_stalled"):
                    break
        except OSError:
            pass  # the relay closed the connection: what we expect
        finally:
            sock.close()
        wait_for(lambda: proxy.counters().get("stream_write_stalled"), 20, "the stall")
        assert _value(_scrape(proxy), "clearip_stream_write_stalled_total") >= 1
