"""The daemon's control socket as clearipctl (and ``clearip-proxy``'s own commands) use it:
one JSON request per connection, answered by one JSON line (or, for ``trace``, a line per
item); and what an answer means for clearipctl's exit status."""

from __future__ import annotations

import socket
import sys
from typing import Any, BinaryIO

from clearip.relay.service.control_wire import decode_reply, encode_line

DEFAULT_SOCKET = "/run/clearip-proxy/control.sock"
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NO_DAEMON = 0, 1, 2, 3


class DaemonDown(Exception):
    pass


class DaemonError(Exception):
    """The daemon could not be asked (permissions, no answer, garbled answer)."""


class Client:
    def __init__(self, path: str) -> None:
        self.path = path

    def _connect(self, request: dict[str, Any]) -> socket.socket:
        """A connection that has carried ``request`` (10 s to connect and send)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(10)
            sock.connect(self.path)
            sock.sendall(encode_line(request))
        except BaseException:
            sock.close()
            raise
        return sock

    def _failure(self, exc: OSError) -> Exception:
        """What a failed exchange means: the daemon is down, or could not be asked."""
        if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
            return DaemonDown(f"clearip-proxy is not running (no socket at {self.path})")
        if isinstance(exc, PermissionError):
            return DaemonError(f"permission denied on {self.path}: run clearipctl as root")
        if isinstance(exc, TimeoutError):
            return DaemonError(f"clearip-proxy did not answer within 10 s on {self.path}")
        return exc

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Ask once; the answer (a dict with ``ok``, and ``result`` or ``error``)."""
        try:
            with self._connect({"cmd": cmd, **fields}) as sock:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError as exc:
            raise self._failure(exc) from None
        reply = decode_reply(data)
        if reply is None:
            raise DaemonError(f"clearip-proxy sent no usable answer on {self.path}")
        return reply

    def stream(self, cmd: str, **fields: Any) -> tuple[socket.socket, BinaryIO]:
        """Ask for a stream (``trace``): the connection, without a timeout from then on, and
        its lines (the first answers the request). The caller closes the connection."""
        try:
            sock = self._connect({"cmd": cmd, **fields})
        except OSError as exc:
            raise self._failure(exc) from None
        sock.settimeout(None)
        return sock, sock.makefile("rb")


def fail(message: str, code: int) -> int:
    """Say what went wrong, as clearipctl; ``code`` back, for the exit status."""
    print(f"clearipctl: {message}", file=sys.stderr)
    return code


def answer(reply: dict[str, Any]) -> tuple[Any, int]:
    """The result of a daemon's answer and EXIT_OK, or None and the exit status of a refusal
    (which is printed): EXIT_INVALID for input the daemon found invalid, else EXIT_FAILED."""
    if reply.get("ok"):
        return reply.get("result"), EXIT_OK
    code = EXIT_INVALID if reply.get("kind") == "invalid" else EXIT_FAILED
    return None, fail(str(reply.get("error")), code)
