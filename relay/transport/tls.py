"""TLS contexts for listeners and outgoing connections (TLS 1.2 minimum), and which one is used.

Each ClearIP upstream verifies against its own ``ca_file``; carriers reached through TLS
Contacts verify against ``[tls] peers_ca_file`` (default: the system store), with the Contact's
host as the server name. ClearIP's CA never vouches for a carrier, nor one upstream's CA for
the other. Contexts are cached per (CA file, verify) so identical settings share one.
"""

from __future__ import annotations

import logging
import re
import ssl
from typing import Protocol

from clearip.relay.transport.peer import Peer

log = logging.getLogger("clearip.tls")

PEERS = "carriers reached through TLS Contacts"


def server_context(certificate: str, private_key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    return context


def client_context(
    cafile: str | None = None, *, verify: bool = True, used_for: str = "the upstream connection"
) -> ssl.SSLContext:
    """Verify the server's certificate and name against ``cafile`` (default: the system store).

    ``verify=False`` is for labs only and is logged loudly every time a context is made.
    """
    if not verify:
        warn_unverified(used_for)
    return _client_context(cafile, verify)


def _client_context(cafile: str | None, verify: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if cafile:
            context.load_verify_locations(cafile)
        else:
            context.load_default_certs()
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def warn_unverified(used_for: str) -> None:
    log.warning(
        "TLS certificate verification is OFF for %s: anyone on the path can read and change "
        "calls. Use this only in a lab (set verify = true for production).",
        used_for,
    )


class UpstreamTls(Protocol):
    """What an upstream's settings say about TLS (``config.UpstreamConfig`` has these)."""

    @property
    def uri(self) -> str: ...
    @property
    def transport(self) -> str: ...
    @property
    def ca_file(self) -> str: ...
    @property
    def verify(self) -> bool: ...


class ClientTls:
    """The client-side TLS policy of an endpoint: which context an outgoing connection uses.

    Calling it with a peer gives the context for carriers (any connection that is not an
    upstream link); :meth:`upstream` gives an upstream link its own. ``peers_context`` fixes the
    carriers' context outright (tests, tools that talk to one server).
    """

    def __init__(
        self,
        peers_ca_file: str = "",
        peers_verify: bool = True,
        *,
        peers_context: ssl.SSLContext | None = None,
    ) -> None:
        self.peers_ca_file = peers_ca_file
        self.peers_verify = peers_verify
        self._peers = peers_context
        self._contexts: dict[tuple[str, bool], ssl.SSLContext] = {}
        self._warned: set[str] = set()

    def context(self, ca_file: str, verify: bool, used_for: str) -> ssl.SSLContext:
        """The shared context for (``ca_file``, ``verify``). Turning verification off is
        logged loudly, once for each use (``used_for`` names it)."""
        if not verify and used_for not in self._warned:
            self._warned.add(used_for)
            warn_unverified(used_for)
        key = (ca_file, verify)
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = _client_context(ca_file or None, verify)
        return context

    def upstream(self, settings: UpstreamTls) -> ssl.SSLContext | None:
        """The context of one ClearIP upstream (None unless it is reached over TLS)."""
        if settings.transport != "tls":
            return None
        return self.context(settings.ca_file, settings.verify, f"ClearIP ({settings.uri})")

    def peers(self) -> ssl.SSLContext:
        if self._peers is None:
            self._peers = self.context(self.peers_ca_file, self.peers_verify, PEERS)
        return self._peers

    def __call__(self, peer: Peer, server_name: str | None) -> ssl.SSLContext:
        """The context for a connection to a carrier (one policy for all of them today)."""
        return self.peers()


_OPENSSL_NOISE = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")


def failure_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's words without its decoration, e.g. ``certificate verify failed: unable to
    get local issuer certificate`` or ``...: Hostname mismatch, certificate is not valid for
    'x'.``"""
    text = _OPENSSL_NOISE.sub("", str(exc)) if exc.args else ""
    return text or exc.__class__.__name__


class FailureLog:
    """Which handshake failures were already logged: once per peer and reason, until the peer
    next succeeds (so a carrier or upstream that keeps failing does not flood the log)."""

    MAX_PEERS = 4096

    def __init__(self) -> None:
        self._logged: dict[str, set[str]] = {}

    def first(self, peer: Peer, reason: str) -> bool:
        """Record a failure; True if it has not been logged yet for this peer."""
        key = str(peer.without_conn())
        reasons = self._logged.get(key)
        if reasons is None:
            if len(self._logged) >= self.MAX_PEERS:
                self._logged.clear()
            reasons = self._logged[key] = set()
        if reason in reasons:
            return False
        reasons.add(reason)
        return True

    def succeeded(self, peer: Peer) -> None:
        self._logged.pop(str(peer.without_conn()), None)
