"""Loading the XDP edge filter for the relay's source policy, or saying why it is off.

Rules: the filter is loaded once, by the process that owns the policy (the daemon, or the
supervisor when workers run); a filter that cannot load is one error with its fix, and the relay
then checks sources itself (calls are never refused because the kernel said no); a listed
interface this host does not have stops the start, naming it.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from clearip.relay.config import ProxyConfig
from clearip.relay.policy.sources import SourcePolicy

log = logging.getLogger("clearip.daemon")


async def start_kernel_filter(config: ProxyConfig, policy: SourcePolicy) -> None:
    """Load the XDP filter for ``policy`` (the daemon's, or the supervisor's when workers
    run); when it cannot load, one error with the fix, and the relay checks sources itself.
    ``xdp.interfaces = "auto"``: the interfaces carrying the listeners' addresses; a listed
    name this host does not have stops the start (OSError naming it)."""
    xdp = config.xdp
    if not xdp.enabled:
        policy.attach_kernel(None, "disabled in the config (xdp.enabled)")
        return
    if not xdp.interfaces:
        policy.attach_kernel(None, "no interfaces configured (xdp.interfaces)")
        return
    import socket

    from clearip.bpf.edge_filter import EdgeFilter
    from clearip.bpf.interfaces import pick, read_links
    from clearip.bpf.loader import FilterUnavailable

    auto = xdp.interfaces == "auto"

    def interfaces() -> list[str]:
        if auto:
            chosen = pick(read_links(), [spec.address for spec in config.listeners])
            for note in chosen.notes:
                log.info("xdp.interfaces = auto: %s", note)
            return list(chosen.names)
        missing = []
        for name in xdp.interfaces:
            try:
                socket.if_nametoindex(name)
            except OSError:
                missing.append(name)
        if missing:
            raise OSError(
                errno.ENODEV,
                f"xdp.interfaces lists {', '.join(map(repr, missing))}, which this host does "
                'not have (check the config against `ip link`, or use interfaces = "auto")',
            )
        return list(xdp.interfaces)

    def load() -> EdgeFilter | None:
        names = interfaces()
        if not names:
            return None
        return EdgeFilter.start(
            interfaces=names,
            mode=xdp.mode,
            udp_ports=xdp.udp_ports,
            tcp_ports=xdp.tcp_ports,
            pin_dir=xdp.pin_dir,
            trust=policy.trust,
            emergency=policy.emergency.numbers(),
            replace_foreign=xdp.replace_foreign,
        )

    try:
        edge = await asyncio.get_running_loop().run_in_executor(None, load)
    except FilterUnavailable as exc:
        log.error(
            "kernel filter off: %s. Fix: %s. Calls are still relayed; the relay refuses "
            "untrusted sources itself.",
            exc.reason,
            exc.fix,
        )
        policy.attach_kernel(None, exc.reason)
        return
    if edge is None:
        listening = ", ".join(sorted({spec.address for spec in config.listeners}))
        policy.attach_kernel(
            None,
            f"xdp.interfaces = auto found no interface to protect (listening on "
            f"{listening}; loopback is never filtered)",
        )
        log.warning("kernel filter off: %s", policy.kernel_error)
        return
    policy.attach_kernel(edge, chosen_by="auto" if auto else "")
    log.info("kernel filter on: %s", policy.describe_kernel())
