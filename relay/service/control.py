"""The daemon's control socket: what ``clearipctl`` talks to.

A Unix stream socket (mode 0600, root only: peers are checked with SO_PEERCRED) speaking JSON
lines: one request ``{"cmd": "trust.add", "cidr": "...", "role": "switch"}`` in, one reply
``{"ok": true, "result": ...}`` or ``{"ok": false, "kind": "invalid"|"failed", "error": "..."}``
out, any number of requests per connection. ``kind`` is ``invalid`` when the request was wrong
and nothing changed (clearipctl exits 2), ``failed`` when the daemon or the kernel refused
(exit 1). A malformed request gets an error reply; nothing a client sends can stop the server.

Commands and their fields (results in brackets):
    trust.list                              [[{"cidr", "role", "note"}, ...]]
    trust.add      cidr, role, note?        ["added ..."]
    trust.remove   cidr                     ["removed ..."]
    trust.import   text (a trust file), origin?   ["imported N entries"]
    trust.export                            [trust file text]
    emergency.list                          [["911", ...]]
    emergency.add / emergency.remove  number   ["emergency numbers: ..."]
    status                                  [the daemon's status + kernel_filter, trust_entries]
    stats                                   [the daemon's counters + kernel (or null)]
    top-dropped    n? (default 10)          [[[address, packets], ...]]
    xdp.detach                              [{"detached": [interfaces], "pin_dir": ...}]
    reload                                  [{"config", "live": [{"key", "old", "new"}, ...],
                                             "restart": [...]}] (re-reads the config and trust
                                             files; a bad one: invalid, nothing changed)
    trace          call_id?, number?        (a stream of records; see relay/service/trace.py)

With worker processes the supervisor answers on this socket (status, stats and trace cover
every worker: see relay/service/supervisor.py) and asks each worker on a private one, where a worker
also answers (and refuses trust.*, emergency.add/remove and xdp.detach, the supervisor's):
    snapshot                                [what relay/service/metrics.py reads, as JSON]
    policy.set     trust, emergency          [{"changed", "trust_entries"}] (the supervisor's
                                             trust list and numbers, in memory)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from clearip.relay.policy.sources import PolicyError, SourcePolicy
from clearip.relay.policy.trust import (
    TrustEntry,
    TrustError,
    parse_cidr,
    render_trust_file,
    trust_list_from_text,
)
from clearip.relay.service.control_wire import decode_reply, encode_line
from clearip.relay.service.trace import Subscriber

log = logging.getLogger("clearip.control")
MAX_REQUEST = 1 << 20
#: What only the supervisor may do: a worker's private socket refuses these.
SUPERVISOR_COMMANDS = (
    "trust.add",
    "trust.remove",
    "trust.import",
    "emergency.add",
    "emergency.remove",
    "xdp.detach",
)
MAX_REPLY = 64 << 20  # a worker's snapshot or stats


class ControlServer:
    def __init__(
        self,
        path: str,
        policy: SourcePolicy,
        status: Callable[[], dict[str, Any]],
        stats: Callable[[], dict[str, Any]],
        *,
        allow_uid: int = 0,
        subscribe: Callable[[Subscriber], Callable[[], None]] | None = None,
        reload: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.subscribe = subscribe
        self.reload = reload
        self.path = Path(path)
        self.policy = policy
        self.status = status
        self.stats = stats
        self.allow_uid = allow_uid
        self.server: asyncio.AbstractServer | None = None
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "trust.list": self._trust_list,
            "trust.add": self._trust_add,
            "trust.remove": self._trust_remove,
            "trust.import": self._trust_import,
            "trust.export": lambda _: render_trust_file(self.policy.trust),
            "emergency.list": lambda _: self.policy.emergency.numbers(),
            "emergency.add": self._emergency_add,
            "emergency.remove": self._emergency_remove,
            "status": self._status,
            "stats": self._stats,
            "top-dropped": self._top_dropped,
            "xdp.detach": self._xdp_detach,
            "reload": self._reload,
        }

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                creds = sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                )
                _, uid, _ = struct.unpack("3i", creds)
                if uid not in (0, self.allow_uid):
                    writer.write(b'{"ok": false, "error": "permission denied: root only"}\n')
                    return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "request too large"}\n')
                    return
                if not line:
                    return
                request = _parse(line)
                if isinstance(request, dict) and request.get("cmd") == "trace":
                    if self.subscribe is None:
                        writer.write(b'{"ok": false, "error": "tracing is not available"}\n')
                        return
                    await self._trace(request, reader, writer)
                    return
                reply = await self.handle_async(request)
                writer.write(encode_line(reply))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _trace(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Stream trace records until the client goes away."""
        assert self.subscribe is not None
        subscriber = Subscriber(
            call_id=request.get("call_id") or None, number=request.get("number") or None
        )
        unsubscribe = self.subscribe(subscriber)
        gone = asyncio.ensure_future(reader.read())
        try:
            writer.write(b'{"ok": true, "result": "tracing"}\n')
            while not gone.done():
                getter = asyncio.ensure_future(subscriber.queue.get())
                done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                writer.write(encode_line(getter.result()))
                await writer.drain()
        finally:
            unsubscribe()
            gone.cancel()

    def handle(self, request: object) -> dict[str, Any]:
        """One reply for one decoded request; never raises. A handler may return an
        awaitable (a supervisor asking its workers): :meth:`handle_async` awaits it."""
        if request is _NOT_JSON:
            return {"ok": False, "kind": "invalid", "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "kind": "invalid", "error": 'request must be an object with "cmd"'}
        handler = self.handlers.get(request["cmd"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {
                "ok": False,
                "kind": "invalid",
                "error": f"unknown command {request['cmd']!r} (known: {known})",
            }
        try:
            return {"ok": True, "result": handler(request)}
        except Exception as exc:
            return _failure(request["cmd"], exc)

    async def handle_async(self, request: object) -> dict[str, Any]:
        reply = self.handle(request)
        result = reply.get("result")
        if reply.get("ok") and inspect.isawaitable(result):
            assert isinstance(request, dict)
            try:
                return {"ok": True, "result": await result}
            except Exception as exc:
                return _failure(request["cmd"], exc)
        return reply

    # -- handlers ----------------------------------------------------------------------------
    def _trust_list(self, _: dict[str, Any]) -> list[dict[str, str]]:
        return [entry.as_dict() for entry in self.policy.trust]

    def _trust_add(self, request: dict[str, Any]) -> str:
        entry = TrustEntry.parse(
            str(request["cidr"]), str(request["role"]), str(request.get("note", ""))
        )
        self.policy.trust_add(entry)
        return f"added {entry.cidr} ({entry.role.value})"

    def _trust_remove(self, request: dict[str, Any]) -> str:
        entry = self.policy.trust_remove(parse_cidr(str(request["cidr"])))
        return f"removed {entry.cidr}"

    def _trust_import(self, request: dict[str, Any]) -> str:
        origin = str(request.get("origin", "import"))
        if not isinstance(request["text"], str):
            raise TrustError('"text" must be the trust file\'s text')
        fresh = trust_list_from_text(request["text"], origin)
        self.policy.trust_replace(fresh)
        return f"imported {len(fresh)} entries"

    def _emergency_add(self, request: dict[str, Any]) -> str:
        self.policy.emergency_add(str(request["number"]))
        return f"emergency numbers: {', '.join(self.policy.emergency.numbers())}"

    def _emergency_remove(self, request: dict[str, Any]) -> str:
        self.policy.emergency_remove(str(request["number"]))
        return f"emergency numbers: {', '.join(self.policy.emergency.numbers())}"

    def _status(self, _: dict[str, Any]) -> dict[str, Any]:
        result = dict(self.status())
        result.setdefault("trust_entries", len(self.policy.trust))
        result.setdefault("kernel_filter", self.policy.describe_kernel())
        return result

    def _stats(self, _: dict[str, Any]) -> dict[str, Any]:
        result = dict(self.stats())
        result.setdefault("kernel", self.policy.kernel_status())
        return result

    def _top_dropped(self, request: dict[str, Any]) -> list[list[object]]:
        if self.policy.kernel is None:
            raise PolicyError(f"kernel filter {self.policy.describe_kernel()}")
        n = int(request.get("n", 10))
        if not 0 < n <= 4096:
            raise ValueError("n must be between 1 and 4096")
        return [[address, count] for address, count in self.policy.kernel.top_dropped(n)]

    def _reload(self, _: dict[str, Any]) -> dict[str, Any]:
        """Re-read the config file and the trust list (as SIGHUP does) and say what changed."""
        if self.reload is None:
            raise PolicyError("reload is not available here")
        return self.reload()

    def _xdp_detach(self, _: dict[str, Any]) -> dict[str, Any]:
        """Remove the daemon's kernel filter; the relay keeps checking sources itself."""
        kernel = self.policy.kernel
        if kernel is None:
            return {"detached": [], "pin_dir": None, "note": self.policy.describe_kernel()}
        interfaces = list(kernel.status())
        pin_dir = getattr(kernel, "pin_dir", None)
        detach = getattr(kernel, "detach", None)
        if detach is None:
            raise PolicyError("this kernel filter cannot be detached from the daemon")
        detach()
        self.policy.attach_kernel(None, "detached with clearipctl xdp detach")
        log.warning("kernel filter detached from %s on request", ", ".join(interfaces))
        return {"detached": interfaces, "pin_dir": str(pin_dir) if pin_dir else None}


_NOT_JSON = object()


def serve_worker_commands(
    control: ControlServer, policy: SourcePolicy, export_snapshot: Callable[[], dict[str, Any]]
) -> None:
    """A worker's private socket: the supervisor reads it and tells it the policy it decided;
    changing the trust list or the emergency numbers here would bypass the supervisor's files
    and kernel maps, so those commands are refused."""

    def refuse(request: dict[str, Any]) -> None:
        raise PolicyError(
            f"{request['cmd']} is the supervisor's: use the socket at proxy.control_socket"
        )

    def policy_set(request: dict[str, Any]) -> dict[str, Any]:
        """``policy.set``: the supervisor's trust list and emergency numbers, in memory."""
        entries = [
            TrustEntry.parse(str(e["cidr"]), str(e["role"]), str(e["note"]))
            for e in request["trust"]
        ]
        changed = policy.adopt(entries, [str(n) for n in request["emergency"]])
        return {"changed": changed, "trust_entries": len(policy.trust)}

    for name in SUPERVISOR_COMMANDS:
        control.handlers[name] = refuse
    control.handlers["snapshot"] = lambda _: export_snapshot()
    control.handlers["policy.set"] = policy_set


def then(
    handler: Callable[[dict[str, Any]], Any], after: Callable[[], Awaitable[None]]
) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    """``handler``, then ``after()`` before the reply: a refusal raised by the handler skips
    ``after``; the reply is the handler's result."""

    def run(request: dict[str, Any]) -> Awaitable[Any]:
        result = handler(request)

        async def finish() -> Any:
            await after()
            return result

        return finish()

    return run


def _failure(cmd: str, exc: Exception) -> dict[str, Any]:
    """The reply for a handler that raised: ``invalid`` (nothing changed) or ``failed``."""
    if isinstance(exc, KeyError):
        return {"ok": False, "kind": "invalid", "error": f"missing field {exc}"}
    if isinstance(exc, TrustError | ValueError | TypeError):
        return {"ok": False, "kind": "invalid", "error": str(exc)}
    if isinstance(exc, PolicyError):
        log.error("control command %s failed: %s", cmd, exc)
        return {"ok": False, "kind": "failed", "error": str(exc)}
    if isinstance(exc, OSError):
        log.error("control command %s failed: %s", cmd, exc)
        return {"ok": False, "kind": "failed", "error": f"cannot write: {exc}"}
    # A bug or a kernel surprise must not take the socket down.
    log.error("control command %s failed", cmd, exc_info=exc)
    return {"ok": False, "kind": "failed", "error": f"internal error: {exc}"}


class ControlUnavailable(Exception):
    """A control socket did not answer (not there, refused, timed out, garbled)."""


async def ask(path: str, cmd: str, *, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
    """One request to a control socket from an event loop (the supervisor asking a worker);
    returns the reply object as sent (``ok`` true or false)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REPLY)
            try:
                writer.write(encode_line({"cmd": cmd, **fields}))
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        raise ControlUnavailable(f"{path}: no answer to {cmd} within {timeout:g} s") from None
    except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
        raise ControlUnavailable(f"{path}: {exc}") from None
    reply = decode_reply(line)
    if reply is None:
        raise ControlUnavailable(f"{path}: no usable answer to {cmd}")
    return reply


def _parse(line: bytes) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return _NOT_JSON
