"""Every counter the relay keeps, declared once (issue #19).

Rules of this module:

- A counter is a key of the daemon's ``Counter[str]``, incremented in place where the event
  happens (``counters["overload_shed"] += 1``): no lookup here on the hot path.
- Each key is declared below, once, with its Prometheus name (``clearip_`` prefix, ``_total``
  added by the exporter), its help text and, for a family, its label: a family's key is a prefix
  and the rest of the key is the label's value (``parse_error_<kind>`` ->
  ``clearip_parse_errors_total{kind="<kind>"}``). Keys with several labels separate the values
  with ``:`` (``call:<role>:<status>:<reason>``).
- ``/metrics`` exports every declared counter (zero until it counts), ``clearipctl stats`` shows
  the raw keys, and README's counter table is generated from here (``python -m
  clearip.relay.service.counters``). tests/test_counters.py fails when code increments a key that is
  not declared, and when the README's table is not the generated one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CounterSpec:
    key: str  # the counter key, or a family's prefix
    metric: str  # Prometheus name without "_total"
    help: str
    labels: tuple[str, ...] = ()  # a family: the label(s) the rest of the key holds


def _c(key: str, metric: str, text: str, *labels: str) -> CounterSpec:
    return CounterSpec(key, f"clearip_{metric}", text, labels)


COUNTERS: tuple[CounterSpec, ...] = (
    # -- calls ------------------------------------------------------------------------------
    _c(
        "call:",
        "calls",
        "INVITEs answered, by role, final status and why (relayed = the "
        "destination's or ClearIP's answer; fail-open, overload, rate-limit, max-transactions, "
        "emergency, too-many-hops, loop: our own)",
        "role",
        "status",
        "reason",
    ),
    _c("invite_", "invites", "New INVITEs accepted into a transaction, by role", "role"),
    _c("invite_retransmission", "invite_retransmissions", "INVITE retransmissions absorbed"),
    _c("emergency", "emergency_calls", "Emergency calls that bypassed ClearIP"),
    _c("cancelled", "cancelled_calls", "Calls cancelled by the caller"),
    _c("route_advance", "route_advances", "Calls moved on to the next Contact"),
    _c("provider_timeout", "provider_timeouts", "Destinations that did not answer at all"),
    _c("timer_c", "timer_c_expired", "Branches cancelled by Timer C (ringing too long)"),
    _c(
        "late_2xx_abandoned_branch",
        "late_2xx_abandoned_branch",
        "A destination answered 200 after being skipped",
    ),
    _c(
        "response_via_repaired",
        "responses_via_repaired",
        "Destination responses that lost the switch's Vias, answered with the switch's own",
    ),
    _c(
        "transaction_reaped",
        "transactions_reaped",
        "Client transactions of finished calls forgotten without a final",
    ),
    # -- ClearIP --------------------------------------------------------------------------------
    _c("clearip_response_", "upstream_responses", "ClearIP final responses by code", "code"),
    _c("clearip_timeout", "upstream_timeouts", "ClearIP did not answer in time (fail-open)"),
    _c(
        "clearip_unreachable",
        "upstream_unreachable",
        "ClearIP could not be reached for a call (fail-open)",
    ),
    _c(
        "clearip_down_fail_open",
        "upstream_down_fail_open",
        "Calls answered 503 at once because ClearIP was unreachable",
    ),
    _c(
        "clearip_late_response",
        "upstream_late_responses",
        "ClearIP answers that came after the call had failed open",
    ),
    _c(
        "clearip_keepalive_timeout",
        "upstream_keepalive_timeouts",
        "ClearIP links declared down: no keep-alive answer in time",
    ),
    # -- protection -------------------------------------------------------------------------
    _c(
        "overload_shed",
        "overload_shed",
        "New INVITEs answered 503 Overloaded: they waited too long in the socket queue",
    ),
    _c("overload_rejected", "overload_rejected", "INVITEs answered 503: too many calls in set-up"),
    _c("rate_limited", "rate_limited", "INVITEs answered 503 by the per-source limit"),
    _c("too_many_hops", "too_many_hops", "Requests answered 483 (Max-Forwards reached 0)"),
    _c("loop_detected", "loops_detected", "Requests answered 482 (loop)"),
    _c("untrusted_dropped", "untrusted_datagrams_dropped", "UDP from untrusted sources"),
    _c(
        "untrusted_connection_closed",
        "untrusted_connections_closed",
        "TCP/TLS connections from untrusted sources",
    ),
    _c(
        "connection_limit_closed",
        "connection_limit_closed",
        "Inbound connections refused: max_connections reached",
    ),
    _c(
        "connection_per_source_limit_closed",
        "connection_per_source_limit_closed",
        "Inbound connections refused: max_connections_per_source reached",
    ),
    _c(
        "stream_write_stalled",
        "stream_write_stalled",
        "Connections given up: the peer stopped reading",
    ),
    # -- bad input ------------------------------------------------------------------------------
    _c("parse_error_", "parse_errors", "Messages that failed to parse, by kind", "kind"),
    _c("bad_request", "bad_requests", "Requests answered 400 by the proxy core"),
    _c("bad_request_sent", "bad_requests_answered", "Malformed requests answered 400"),
    _c("malformed_dropped", "malformed_dropped", "Unparseable messages dropped"),
    _c("method_not_allowed", "methods_not_allowed", "Requests answered 405"),
    _c("stray_response", "stray_responses", "Responses matching no transaction"),
    _c("stray_ack", "stray_acks", "ACKs matching no transaction or dialog"),
    _c(
        "orphan_response_",
        "orphan_responses",
        "Answers to INVITEs whose call was lost in a worker restart, by what the switch got "
        "(absorbed, forwarded, fail_open)",
        "outcome",
    ),
    # -- in-dialog ------------------------------------------------------------------------------
    _c("in_dialog_", "in_dialog_requests", "In-dialog requests routed, by method", "method"),
    # -- transport ------------------------------------------------------------------------------
    _c("stream_closed_", "connections_closed", "Connections we closed, by reason", "reason"),
    _c("send_failed", "send_failures", "Messages the transport could not send"),
    _c("tls_handshake_failed", "tls_handshake_failures", "TLS handshakes that failed"),
    _c("udp_keepalive", "udp_keepalives", "UDP keep-alive datagrams (CRLF) received"),
    _c("udp_recv_error", "udp_receive_errors", "Errors reading a UDP socket"),
    _c("udp_send_error", "udp_send_errors", "Errors sending a UDP datagram"),
    _c("udp_no_socket", "udp_no_socket", "UDP sends with no socket of the address family"),
    _c(
        "udp_dscp_ef_received",
        "udp_dscp_ef_batches",
        "UDP batches holding a datagram the kernel filter marked DSCP EF (emergency)",
    ),
    _c(
        "udp_emergency_received",
        "udp_emergency_received",
        "Datagrams read from the worker's emergency socket (kernel steering)",
    ),
    # -- workers: stream hand-off ---------------------------------------------------------------
    _c("handoff_sent", "handoff_sent", "Stream messages handed to the worker owning the call"),
    _c("handoff_received", "handoff_received", "Stream messages received from another worker"),
    _c(
        "handoff_write_sent",
        "handoff_writes_sent",
        "Messages sent back to the worker owning the connection",
    ),
    _c(
        "handoff_write_received",
        "handoff_writes_received",
        "Messages written on a connection for another worker",
    ),
    _c(
        "handoff_write_failed",
        "handoff_write_failures",
        "Messages that could not be handed back to the connection's worker",
    ),
    _c(
        "handoff_write_no_connection",
        "handoff_write_no_connection",
        "Hand-back writes for a connection already closed",
    ),
    _c(
        "handoff_fallback_local",
        "handoff_fallback_local",
        "Stream messages handled locally: the owning worker was unreachable",
    ),
    _c(
        "handoff_closed_received",
        "handoff_closed_received",
        "Connection-closed notices from other workers",
    ),
    _c("handoff_bad_packet", "handoff_bad_packets", "Malformed hand-off packets dropped"),
    _c(
        "worker_restarts",
        "workers_restarted",
        "Worker processes the supervisor restarted, all workers (per worker: "
        "clearip_worker_restarts_total)",
    ),
    # -- HEP, GC ------------------------------------------------------------------------------
    _c("hep_sent", "hep_sent", "Messages sent to the HEP collector"),
    _c("hep_dropped", "hep_dropped", "HEP copies dropped (queue full or collector down)"),
    _c("hep_send_errors", "hep_send_errors", "Errors sending to the HEP collector"),
    _c("gc_full_collections", "gc_full_collections", "Full garbage collections run"),
    _c(
        "gc_full_unreachable",
        "gc_full_unreachable",
        "Objects the full garbage collections found unreachable",
    ),
)

_PLAIN = {spec.key: spec for spec in COUNTERS if not spec.labels}
_FAMILIES = sorted((spec for spec in COUNTERS if spec.labels), key=lambda s: -len(s.key))


def spec_for(key: str) -> tuple[CounterSpec, tuple[str, ...]] | None:
    """The declaration of a counter key and its label values; None when undeclared."""
    spec = _PLAIN.get(key)
    if spec is not None:
        return spec, ()
    for family in _FAMILIES:
        if key.startswith(family.key):
            values = tuple(key[len(family.key) :].split(":", len(family.labels) - 1))
            if len(values) <= len(family.labels):  # an older key may lack a trailing value
                return family, values
    return None


def markdown_table() -> str:
    """README's counter table (between its markers)."""
    rows = ["| metric | labels | what it counts |", "| --- | --- | --- |"]
    for spec in COUNTERS:
        labels = ", ".join(spec.labels) or "-"
        rows.append(f"| `{spec.metric}_total` | {labels} | {spec.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
