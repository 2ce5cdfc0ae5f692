"""The daemon's logs: one handler on the root logger, text or JSON lines, and the call log.

Rules: ``setup_logging`` installs the one handler (named, so a reload changes only ours and
leaves a test runner's alone); a worker's lines carry its index; JSON lines are one object each,
for journald and log shippers; the call log (logger ``clearip.calls``) has one line per call,
``key=value`` text or JSON.
"""

from __future__ import annotations

import json
import logging
from typing import Any

calls_log = logging.getLogger("clearip.calls")

_LOG_HANDLER = "clearip"  # the name of the handler setup_logging installs
_log_worker: int | None = None  # a worker's index, shown on each of its log lines


def setup_logging(level: str, fmt: str, *, worker: int | None = None) -> None:
    global _log_worker
    _log_worker = worker
    handler = logging.StreamHandler()
    handler.set_name(_LOG_HANDLER)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def apply_logging(level: str, fmt: str) -> None:
    """A reloaded ``[log]``: the level, and the format of the handler setup_logging installed
    (other handlers, such as a test runner's, are left alone)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if handler.get_name() == _LOG_HANDLER:
            handler.setFormatter(_formatter(fmt))


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    who = "" if _log_worker is None else f"worker-{_log_worker} "
    return logging.Formatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith("{"):
            try:
                payload = json.loads(message)
            except ValueError:
                payload = {"message": message}
        else:
            payload = {"message": message}
        payload.update(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
            }
        )
        if _log_worker is not None:
            payload["worker"] = _log_worker
        return json.dumps(payload, separators=(",", ":"))


def log_call(summary: dict[str, Any], fmt: str) -> None:
    """One call's line in the call log (``fmt``: the ``[log] format``)."""
    if fmt == "json":
        calls_log.info(json.dumps({"event": "call", **summary}, separators=(",", ":")))
        return
    tried = ",".join(summary["tried"]) or "-"
    calls_log.info(
        "call call_id=%s from=%s to=%s role=%s clearip=%s clearip_ms=%s attest=%s "
        "tried=%s final=%s total_ms=%s%s",
        summary["call_id"],
        summary["from"],
        summary["to"],
        summary["role"],
        summary["clearip_status"],
        summary["clearip_ms"],
        summary["attest"],
        tried,
        summary["final"],
        summary["total_ms"],
        f' note="{summary["note"]}"' if summary["note"] else "",
    )
