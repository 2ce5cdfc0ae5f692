"""The daemon's control socket: what ``clearipctl`` talks to.

A Unix stream socket (mode 0600, root only: peers are checked with SO_PEERCRED) speaking JSON
lines: one request ``{"cmd": "trust.add", "cidr": "...", "role": "switch"}`` in, one reply
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}`` out. A malformed request
gets an error reply; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clearip.relay.policy import SourcePolicy
from clearip.relay.trace import Subscriber
from clearip.relay.trust import (
    TrustEntry,
    TrustError,
    parse_cidr,
    parse_role,
    render_trust_file,
    trust_list_from_data,
)

log = logging.getLogger("clearip.control")
MAX_REQUEST = 1 << 20


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
    ) -> None:
        self.subscribe = subscribe
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
            "status": lambda _: self.status(),
            "stats": lambda _: self.stats(),
            "top-dropped": self._top_dropped,
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
                if line.startswith(b'{"cmd": "trace"') and self.subscribe is not None:
                    await self._trace(json.loads(line), reader, writer)
                    return
                writer.write(json.dumps(self.handle_line(line)).encode() + b"\n")
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
                writer.write(json.dumps(getter.result()).encode() + b"\n")
                await writer.drain()
        finally:
            unsubscribe()
            gone.cancel()

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with "cmd"'}
        handler = self.handlers.get(request["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['cmd']!r}"}
        try:
            return {"ok": True, "result": handler(request)}
        except KeyError as exc:
            return {"ok": False, "kind": "invalid", "error": f"missing field {exc}"}
        except (TrustError, ValueError, TypeError) as exc:
            return {"ok": False, "kind": "invalid", "error": str(exc)}
        except OSError as exc:
            log.error("control command %s failed: %s", request["cmd"], exc)
            return {"ok": False, "kind": "failed", "error": f"cannot write: {exc}"}

    # -- handlers ----------------------------------------------------------------------------
    def _trust_list(self, _: dict[str, Any]) -> list[dict[str, str]]:
        return [{"cidr": e.cidr, "role": e.role.value, "note": e.note} for e in self.policy.trust]

    def _trust_add(self, request: dict[str, Any]) -> str:
        entry = TrustEntry(
            parse_cidr(str(request["cidr"])),
            parse_role(str(request["role"])),
            str(request.get("note", "")),
        )
        self.policy.trust_add(entry)
        return f"added {entry.cidr} ({entry.role.value})"

    def _trust_remove(self, request: dict[str, Any]) -> str:
        entry = self.policy.trust_remove(parse_cidr(str(request["cidr"])))
        return f"removed {entry.cidr}"

    def _trust_import(self, request: dict[str, Any]) -> str:
        import tomllib

        data = tomllib.loads(str(request["text"]))
        fresh = trust_list_from_data(data, str(request.get("origin", "import")))
        self.policy.trust_replace(fresh)
        return f"imported {len(fresh)} entries"

    def _emergency_add(self, request: dict[str, Any]) -> str:
        self.policy.emergency_add(str(request["number"]))
        return f"emergency numbers: {', '.join(self.policy.emergency.numbers())}"

    def _emergency_remove(self, request: dict[str, Any]) -> str:
        self.policy.emergency_remove(str(request["number"]))
        return f"emergency numbers: {', '.join(self.policy.emergency.numbers())}"

    def _top_dropped(self, request: dict[str, Any]) -> list[list[object]]:
        if self.policy.kernel is None:
            raise ValueError(f"kernel filter: {self.policy.describe_kernel()}")
        n = int(request.get("n", 10))
        return [[address, count] for address, count in self.policy.kernel.top_dropped(n)]
