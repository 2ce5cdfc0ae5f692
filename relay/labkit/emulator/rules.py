"""The emulator's rules in memory, and how a call is matched to one: first match wins.

Rules: each rule may match on ``source`` (addresses or CIDRs the INVITE came from),
``dialled`` (the Request-URI user or tel number) and ``calling`` (the P-Asserted-Identity user
when it holds a number, else the From user); every condition given must hold, a condition left
out matches anything. Numbers are compared as digits only (``+1 (212) 555-0100`` is
``12125550100``). A :class:`Pattern` is digits with ``*`` (any run of digits, also none) and
``?`` (exactly one), matched against the whole number, or ``re:REGEX``, a Python regular
expression searched in the digits (anchor it with ``^`` and ``$``). A request no rule matches
gets ``unknown-source`` 404 (:data:`NO_MATCH`).

Theory of operation: :mod:`rules_toml` reads a rules file into a :class:`RuleSet`;
:meth:`RuleSet.decide` is pure (request and source in, :class:`Decision` out) and
:mod:`responses` turns the decision into the SIP answer. The actions and their fields are
listed in :mod:`rules_toml`, which checks them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from clearip.relay.policy.emergency import normalise_number
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request
from clearip.relay.sip.uri import parse_uri, uri_user_number

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ACTIONS = (
    "route",
    "verify",
    "divert",
    "pass",
    "block",
    "unknown-source",
    "silent",
    "delay",
    "drop-connection",
)

DEFAULT_X5U = "https://cert.clearip-lab.example/shaken.pem"


class RulesError(ValueError):
    """The rules file is unusable. The message names the file, the rule and the fix."""

    def __init__(self, origin: str, problem: str, fix: str = "", rule: str = "") -> None:
        self.origin, self.rule, self.problem, self.fix = origin, rule, problem, fix
        where = f"{origin}: {rule}" if rule else origin
        super().__init__(f"{where}: {problem}" + (f"; fix: {fix}" if fix else ""))


@dataclass(frozen=True, slots=True)
class Pattern:
    """A number pattern: digits with ``*`` and ``?`` (whole number), or ``re:`` (searched)."""

    text: str
    regex: re.Pattern[str]

    def matches(self, number: str) -> bool:
        if self.text.startswith("re:"):
            return self.regex.search(number) is not None
        return self.regex.fullmatch(number) is not None


@dataclass(frozen=True, slots=True)
class Redress:
    """603+ redress information (ATIS-1000099): where a blocked caller can ask for review."""

    url: str = ""
    tel: str = ""
    email: str = ""
    analytics: str = "clearip"
    location: str = "TN"

    def reason_value(self) -> str:
        """The 603+ Reason header value."""
        pairs = [f"v={self.analytics}"]
        pairs += [
            f"{k}={v}"
            for k, v in (("url", self.url), ("tel", self.tel), ("email", self.email))
            if v
        ]
        return f'SIP;cause=603;text="{";".join(pairs)}";location={self.location}'


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    name: str
    action: str
    sources: tuple[IPNetwork, ...] = ()
    dialled: tuple[Pattern, ...] = ()
    calling: tuple[Pattern, ...] = ()
    contacts: tuple[str, ...] = ()
    attest: str = "A"
    cnam: str = ""
    verstat: str = "TN-Validation-Passed"
    reason: str = ""
    redress: Redress | None = None
    code: int = 404
    delay_ms: int = 0
    then: str = ""

    @property
    def answer(self) -> str:
        """What the answer will be: the action, or for ``delay`` the action after the wait."""
        return self.then if self.action == "delay" else self.action

    @property
    def target(self) -> str:
        """The diversion target of a ``divert`` rule."""
        return self.contacts[0] if self.contacts else ""

    def matches(self, source: str, dialled: str, calling: str) -> bool:
        if self.sources:
            ip = _address(source)
            if ip is None or not any(ip.version == n.version and ip in n for n in self.sources):
                return False
        if self.dialled and not any(p.matches(dialled) for p in self.dialled):
            return False
        return not self.calling or any(p.matches(calling) for p in self.calling)


NO_MATCH = Rule(index=0, name="no rule matched", action="unknown-source")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :meth:`RuleSet.decide`: the rule and the numbers it was decided on."""

    rule: Rule
    dialled: str
    calling: str
    source: str

    @property
    def action(self) -> str:
        return self.rule.action


@dataclass(frozen=True, slots=True)
class Signing:
    """``[signing]``: the x5u URL, the key (empty: generated at start), default attestation."""

    x5u: str = DEFAULT_X5U
    key_file: str = ""
    attest: str = "A"


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    signing: Signing = field(default_factory=Signing)
    origin: str = "<rules>"

    def decide(self, request: Request, source: str) -> Decision:
        """The first rule matching ``request`` from ``source`` (``unknown-source`` if none)."""
        dialled, calling = numbers_of(request)
        for rule in self.rules:
            if rule.matches(source, dialled, calling):
                return Decision(rule, dialled, calling, source)
        return Decision(NO_MATCH, dialled, calling, source)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _number(uri_text: str) -> str:
    try:
        return normalise_number(uri_user_number(parse_uri(uri_text)) or "")
    except SipParseError:
        return ""


def numbers_of(request: Request) -> tuple[str, str]:
    """(dialled, calling) as digits; '' where there is no readable number."""
    try:
        dialled = normalise_number(uri_user_number(request.uri) or "")
    except SipParseError:
        dialled = ""
    calling = ""
    try:
        for address in request.addresses("p-asserted-identity"):
            calling = _number(address.uri_text)
            if calling:
                break
    except SipParseError:
        calling = ""
    if not calling:
        try:
            calling = _number(request.from_addr.uri_text)
        except SipParseError:
            calling = ""
    return dialled, calling
