"""SIP, SIPS and tel URIs (RFC 3261 §19.1, RFC 3966), parsed on demand.

A URI keeps its original text; ``str(uri)`` returns it unchanged unless a field was edited, so a
proxy never rewrites a URI it only read. Other schemes are kept as opaque text.

Parsed URIs are immutable and :func:`parse_uri` memoises them by their text (Route and
Record-Route URIs recur in every call): callers share them and must not change them. The
Request-URI is parsed directly (:func:`parse_sip_uri`) and kept by its request.
"""

from __future__ import annotations

import functools
import re
from typing import Final, final

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.grammar import PARSE_CACHE_SIZE, find_param, is_digits, is_host_name
from clearip.relay.sip.record import Record

_sip_re = re.compile(
    r"(?P<scheme>sips?):(?:(?P<userinfo>[^@]*)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-_.]+)(?::(?P<port>\d{1,5}))?"
    r"(?P<params>(?:;[^;?\s]*)*)(?:\?(?P<headers>\S*))?",
    re.IGNORECASE,
)
_tel_re = re.compile(r"tel:(?P<number>[^;\s]+)(?P<params>(?:;[^;\s]*)*)", re.IGNORECASE)
MAX_PORT = 65535


def _params(text: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for item in text.split(";")[1:]:
        if not item:
            raise SipParseError("empty URI parameter", "uri")
        name, sep, value = item.partition("=")
        out.append((name, value if sep else None))
    return out


@final
class SipUri(Record):
    """``sip:user:password@host:port;params?headers``."""

    __slots__ = ("headers", "host", "params", "password", "port", "scheme", "user")
    FIELDS = ("scheme", "user", "password", "host", "port", "params", "headers")

    def __init__(  # noqa: PLR0917 (the fields in order, as the dataclass it was took them)
        self,
        scheme: str,
        user: str | None,
        password: str | None,
        host: str,
        port: int | None,
        params: list[tuple[str, str | None]] | None = None,
        headers: str | None = None,
    ) -> None:
        self.scheme: Final = scheme
        self.user: Final = user
        self.password: Final = password
        self.host: Final = host
        self.port: Final = port
        self.params: Final[list[tuple[str, str | None]]] = [] if params is None else params
        self.headers: Final = headers

    def without_headers(self) -> SipUri:
        """The same URI without its ``?headers`` part."""
        if self.headers is None:
            return self
        return SipUri(self.scheme, self.user, self.password, self.host, self.port, self.params)

    def param(self, name: str) -> str | None:
        """A parameter's value ('' for a flag such as ``lr``), or None when absent."""
        return find_param(self.params, name)

    def has_param(self, name: str) -> bool:
        return self.param(name) is not None

    @property
    def transport(self) -> str:
        value = self.param("transport")
        if value:
            return value.lower()
        return "tls" if self.scheme == "sips" else "udp"

    @property
    def host_bare(self) -> str:
        """The host without IPv6 brackets."""
        return self.host[1:-1] if self.host.startswith("[") else self.host

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [":", self.password]
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out += [":", str(self.port)]
        for name, value in self.params:
            out += [";", name] if value is None else [";", name, "=", value]
        if self.headers is not None:
            out += ["?", self.headers]
        return "".join(out)


@final
class TelUri(Record):
    """``tel:+1-212-555-0100;phone-context=...``."""

    __slots__ = ("number", "params")
    FIELDS = ("number", "params")

    def __init__(self, number: str, params: list[tuple[str, str | None]] | None = None) -> None:
        self.number: Final = number
        self.params: Final[list[tuple[str, str | None]]] = [] if params is None else params

    def __str__(self) -> str:
        out = ["tel:", self.number]
        for name, value in self.params:
            out += [";", name] if value is None else [";", name, "=", value]
        return "".join(out)


@final
class OtherUri(Record):
    """Any other scheme (``http:``, ``urn:``...): kept as text."""

    __slots__ = ("text",)
    FIELDS = ("text",)

    def __init__(self, text: str) -> None:
        self.text: Final = text

    @property
    def scheme(self) -> str:
        return self.text.partition(":")[0].lower()

    def __str__(self) -> str:
        return self.text


Uri = SipUri | TelUri | OtherUri


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def parse_uri(text: str) -> Uri:
    """Parse a URI; a malformed sip/sips/tel URI raises :class:`SipParseError`."""
    scheme, sep, _ = text.partition(":")
    if not sep or not scheme:
        raise SipParseError(f"not a URI: {text[:60]!r}", "uri")
    lscheme = scheme.lower()
    if lscheme in ("sip", "sips"):
        return parse_sip_uri(text)
    if lscheme == "tel":
        m = _tel_re.fullmatch(text)
        if m is None:
            raise SipParseError(f"malformed tel URI {text[:60]!r}", "uri")
        return TelUri(m.group("number"), _params(m.group("params")))
    if any(c.isspace() for c in text):
        raise SipParseError(f"whitespace in URI {text[:60]!r}", "uri")
    return OtherUri(text)


def parse_sip_uri(text: str) -> SipUri:
    # The user part may hold almost anything (even '?', ';' and ':'), but '@' cannot appear
    # unescaped after it, so the last '@' ends the userinfo.
    if " " in text or "\t" in text:
        raise SipParseError(f"whitespace in SIP URI {text[:60]!r}", "uri")
    scheme, _, rest = text.partition(":")
    userinfo: str | None = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
    simple = _simple_sip_uri(scheme, rest)
    m = None
    if simple is None:
        m = _sip_re.fullmatch(f"{scheme}:{rest}")
        if m is None:
            raise SipParseError(f"malformed SIP URI {text[:60]!r}", "uri")
    user = password = None
    if userinfo is not None:
        if not userinfo:
            raise SipParseError("empty user part in SIP URI", "uri")
        user, sep, pw = userinfo.partition(":")
        password = pw if sep else None
    if simple is not None:
        host, port, params = simple
        if port is not None and not 0 < port <= MAX_PORT:
            raise SipParseError(f"port out of range in {text[:60]!r}", "uri")
        return SipUri(scheme.lower(), user, password, host, port, _params(params), None)
    assert m is not None
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port <= MAX_PORT:
        raise SipParseError(f"port out of range in {text[:60]!r}", "uri")
    return SipUri(
        m.group("scheme").lower(),
        user,
        password,
        m.group("host"),
        port,
        _params(m.group("params")),
        m.group("headers"),
    )


def _simple_sip_uri(scheme: str, rest: str) -> tuple[str, int | None, str] | None:
    """(host, port, parameters) when what follows the userinfo is ``host[:port]`` and
    printable ASCII parameters, with no ``?headers`` and no IPv6 reference, read with string
    methods (see :mod:`grammar`); None for any other shape, which ``_sip_re`` then decides.
    The caller has refused spaces and tabs."""
    lscheme = scheme.lower()
    if lscheme not in ("sip", "sips") or "?" in rest:
        return None
    hostport, semi, params = rest.partition(";")
    if semi and not (params.isascii() and params.isprintable()):
        return None
    host, colon, port_text = hostport.partition(":")
    if not is_host_name(host):
        return None
    if not colon:
        return host, None, semi + params
    if not is_digits(port_text, 5):
        return None
    return host, int(port_text), semi + params


def uri_user_number(uri: Uri) -> str | None:
    """The dialled number: the user of a SIP URI, or the number of a tel URI."""
    if isinstance(uri, SipUri):
        return uri.user
    if isinstance(uri, TelUri):
        return uri.number
    return None
