"""ClearIP's 302: which Contacts to try, in which order, and which headers to carry over.

Like Kamailio's ``uac_redirect``: Contacts are tried in descending q order, ties in the order
given. Only ``sip:``/``sips:`` Contacts are usable; a Contact that points back at this proxy
would loop and is skipped; after sorting, at most ``max_contacts`` are kept (a hostile 302 with
hundreds of Contacts cannot make us call hundreds of destinations, and the best ones survive).
"""

from __future__ import annotations

from typing import Final, final

from clearip.relay.proxy.routing import Locality
from clearip.relay.sip.address import Address
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Response
from clearip.relay.sip.record import Record
from clearip.relay.sip.uri import SipUri, parse_uri


@final
class Target(Record):
    __slots__ = ("q", "uri", "uri_text")
    FIELDS = ("uri", "q")

    def __init__(self, uri: SipUri, q: float) -> None:
        self.uri: Final = uri
        self.q: Final = q
        # Contact header parameters (q, expires) are not part of the target URI; URI
        # parameters (transport, user=phone) are.
        self.uri_text: Final = str(uri)


@final
class Redirect(Record):
    __slots__ = ("copied", "skipped", "targets")
    FIELDS = ("targets", "skipped", "copied")

    def __init__(
        self,
        targets: tuple[Target, ...],
        skipped: tuple[tuple[str, str], ...],  # (contact, why)
        copied: tuple[tuple[str, str], ...],  # (header name, value) to put into the INVITE
    ) -> None:
        self.targets: Final = targets
        self.skipped: Final = skipped
        self.copied: Final = copied


def read_redirect(
    response: Response, locality: Locality, copy_headers: tuple[str, ...], max_contacts: int
) -> Redirect:
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    try:
        contacts: list[Address] = response.addresses("contact")
    except SipParseError:
        contacts = []
        skipped.append(("Contact", "malformed"))
    for contact in contacts:
        try:
            uri = parse_uri(contact.uri_text)
        except SipParseError:
            skipped.append((contact.uri_text, "malformed URI"))
            continue
        if not isinstance(uri, SipUri):
            skipped.append((contact.uri_text, "not a SIP URI"))
            continue
        if uri.transport not in ("udp", "tcp", "tls"):
            skipped.append((contact.uri_text, f"unsupported transport {uri.transport}"))
            continue
        if locality.is_us(uri):
            skipped.append((contact.uri_text, "points at this proxy (loop)"))
            continue
        uri = uri.without_headers()  # not applied from a redirect (§19.1.5)
        targets.append(Target(uri, contact.q))
    # Sort first, then cut: the best Contacts survive a long list (stable: ties keep order).
    targets.sort(key=lambda t: -t.q)
    if len(targets) > max_contacts:
        extra = len(targets) - max_contacts
        skipped.append(("...", f"{extra} lower-q Contact(s) beyond max_contacts = {max_contacts}"))
        del targets[max_contacts:]
    copied: list[tuple[str, str]] = []
    for name in copy_headers:
        key = name.lower()
        for hname, hkey, value, _ in response.headers:
            if hkey == key:
                copied.append((hname, value))
    return Redirect(tuple(targets), tuple(skipped), tuple(copied))
