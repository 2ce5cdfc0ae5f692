"""Opening the endpoint's UDP listening sockets, alone or as one of a worker group.

Rules of this module:

- A UDP listener is non-blocking, reports each datagram's IP TOS / IPv6 traffic class (the
  DSCP EF mark of emergency INVITEs) and, where the kernel allows, its arrival time (the
  overload signal); IPv6 listeners are IPv6 only. Its receive buffer is 4 MiB.
- As one of a worker group every listener is bound with SO_REUSEPORT, and a UDP listener
  joins the Call-ID steering program pinned by the supervisor (:func:`join_steering`) with a
  second "emergency" socket on the same address. What fails says what to fix
  (:class:`SteeringUnavailable`); nothing is left open then.

Theory of operation: :meth:`SipEndpoint.listen` calls these and owns what they return;
TCP/TLS listeners are asyncio servers it opens itself.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

from clearip.relay.transport.udp import SO_TIMESTAMPNS, UdpSocket

if TYPE_CHECKING:  # worker_role imports this package
    from clearip.relay.service.worker_role import WorkerRole

__all__ = ["bind_udp", "join_steering"]

_IP_RECVTOS = getattr(socket, "IP_RECVTOS", 13)
_IPV6_RECVTCLASS = getattr(socket, "IPV6_RECVTCLASS", 66)


def bind_udp(family: int, address: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, non-blocking UDP listener socket (SO_REUSEPORT: one of a worker group)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVTCLASS, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVTOS, 1)
        with contextlib.suppress(OSError):  # arrival times: the overload signal
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def join_steering(udp: UdpSocket, worker: WorkerRole, pin_dir: str) -> UdpSocket:
    """Join the steering program pinned at ``pin_dir`` (loaded by the supervisor) with the
    normal socket and a new emergency socket on the same address (returned).
    Raises SteeringUnavailable saying what failed and how to fix it."""
    from clearip.bpf.reuseport import SteeringUnavailable, WorkerSteering

    index = worker.index
    host, port = udp.sock.getsockname()[:2]
    where = f"UDP listener {udp.local.hostport()} (worker {index}, steering at {pin_dir})"
    try:
        esock = bind_udp(udp.family, host, port, reuse_port=True)
    except OSError as exc:
        raise SteeringUnavailable(
            f"{where}: cannot bind the emergency socket: {exc}",
            "check that every socket on that port is bound with SO_REUSEPORT by the same user",
        ) from None
    try:
        steering = WorkerSteering.open(pin_dir)
        try:
            steering.attach(udp.sock)
            steering.register(udp.sock, index)
            steering.register(esock, index, emergency=True)
        finally:
            steering.close()
    except SteeringUnavailable as exc:
        esock.close()
        raise SteeringUnavailable(f"{where}: {exc.reason}", exc.fix) from None
    except ValueError as exc:  # the program was loaded for fewer workers
        esock.close()
        raise SteeringUnavailable(
            f"{where}: {exc}", "load the program with workers = the worker count"
        ) from None
    except OSError as exc:
        esock.close()
        raise SteeringUnavailable(
            f"{where}: cannot join the steering program: {exc}",
            "run the worker as root (CAP_BPF, CAP_NET_ADMIN) with /sys/fs/bpf readable",
        ) from None
    return UdpSocket(udp.endpoint, esock, udp.local)
