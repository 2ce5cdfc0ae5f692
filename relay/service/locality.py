"""Which addresses are this relay's own: what the core's Record-Route and loop checks compare.

Rules: the addresses and ports the endpoint is bound to are ours; a wildcard listener
(``0.0.0.0`` or ``::``) makes every address of this host ours (read from netlink; loopback when
netlink is not available); a listener on one address adds that address.
"""

from __future__ import annotations

from collections.abc import Iterable

from clearip.relay.proxy.routing import Locality
from clearip.relay.transport.peer import ListenerSpec, LocalAddress


def learn_locality(
    locality: Locality, bound: Iterable[LocalAddress], listeners: Iterable[ListenerSpec]
) -> None:
    """Add the endpoint's bound addresses and the listeners' hosts to ``locality``."""
    for local in bound:
        locality.hosts.add(local.host)
        locality.ports.add(local.port)
    for spec in listeners:
        if spec.address in ("0.0.0.0", "::"):
            locality.hosts.update(host_addresses())
        else:
            locality.hosts.add(spec.address)


def host_addresses() -> set[str]:
    """This host's addresses, so Record-Route entries naming any of them are recognised."""
    out = {"127.0.0.1", "::1", "localhost"}
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for addr in ipr.get_addr():
                value = addr.get_attr("IFA_ADDRESS")
                if value:
                    out.add(str(value))
    except Exception:  # pyroute2 missing or netlink refused: loopback is enough
        pass
    return out
