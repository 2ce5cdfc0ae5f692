"""TLS contexts for listeners and for the connection to ClearIP (TLS 1.2 minimum)."""

from __future__ import annotations

import logging
import ssl

log = logging.getLogger("clearip.tls")


def server_context(certificate: str, private_key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    return context


def client_context(cafile: str | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """Verify the server's certificate and name against ``cafile`` (default: the system store).

    ``verify=False`` is for labs only and is logged loudly every time a context is made.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if cafile:
            context.load_verify_locations(cafile)
        else:
            context.load_default_certs()
    else:
        log.warning(
            "TLS certificate verification is OFF for the upstream connection: anyone on the path "
            "can read and change calls. Use this only in a lab (set verify = true for production)."
        )
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
