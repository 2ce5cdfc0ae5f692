"""The emulator's rules: a TOML file, first match wins.

Each ``[[rule]]`` may match on ``source`` (CIDR list), ``dialled`` (the Request-URI user or
tel number) and ``calling`` (the From user, or the P-Asserted-Identity user when present);
all given conditions must hold. Number patterns are digits with ``*`` (any run) and ``?``
(one digit), or a regular expression written ``re:...``; numbers are compared as digits only
(``+1 (212) 555-0100`` is ``12125550100``). A request no rule matches gets ``unknown-source``.

Actions and their fields:

==================  =================================================================
``route``           302 to ``contacts`` with a signed Identity; ``attest`` A/B/C
``verify``          302 to ``contacts`` with P-Asserted-Identity: ``cnam``, ``verstat``
``divert``          302 to the single ``target``
``pass``            503 Service Unavailable
``block``           603 Decline with ``reason``; ``redress`` adds a 603+ Call-Info
``unknown-source``  ``code`` 404 (default) or 403
``silent``          never answers
``delay``           waits ``delay_ms``, then does ``then`` (another action, same fields)
``drop-connection`` closes the TCP/TLS connection the INVITE came on (UDP: silent)
==================  =================================================================

Contact URIs may contain ``{dialled}``, replaced by the dialled number.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearip.relay.emergency import normalise_number
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request
from clearip.relay.sip.uri import parse_uri, uri_user_number

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
VERSTATS = ("TN-Validation-Passed", "TN-Validation-Failed", "No-TN-Validation")
_FIELDS = {
    "name", "source", "dialled", "calling", "action", "contacts", "attest", "cnam",
    "verstat", "target", "reason", "redress", "code", "delay_ms", "then",
}  # fmt: skip


class RulesError(ValueError):
    """The rules file is unusable: the message names the file, the rule and the fix."""


@dataclass(frozen=True)
class Pattern:
    text: str
    regex: re.Pattern[str]

    def matches(self, number: str) -> bool:
        return self.regex.fullmatch(number) is not None


@dataclass(frozen=True)
class Rule:
    index: int
    name: str
    action: str
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    dialled: tuple[Pattern, ...] = ()
    calling: tuple[Pattern, ...] = ()
    contacts: tuple[str, ...] = ()
    attest: str = "A"
    cnam: str = ""
    verstat: str = "TN-Validation-Passed"
    target: str = ""
    reason: str = ""
    redress: str = ""
    code: int = 404
    delay_ms: int = 0
    then: str = "route"

    def matches(self, source: str, dialled: str, calling: str) -> bool:
        if self.sources:
            try:
                ip = ipaddress.ip_address(source)
            except ValueError:
                return False
            if not any(ip.version == n.version and ip in n for n in self.sources):
                return False
        if self.dialled and not any(p.matches(dialled) for p in self.dialled):
            return False
        return not self.calling or any(p.matches(calling) for p in self.calling)


@dataclass(frozen=True)
class Signing:
    x5u: str = "https://cert.clearip-lab.example/shaken.pem"
    key_file: str = ""


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    signing: Signing = field(default_factory=Signing)
    origin: str = "<rules>"

    def decide(self, request: Request, source: str) -> Rule:
        dialled, calling = numbers_of(request)
        for rule in self.rules:
            if rule.matches(source, dialled, calling):
                return rule
        return Rule(index=0, name="no rule matched", action="unknown-source")


def numbers_of(request: Request) -> tuple[str, str]:
    """(dialled, calling) as digits; '' where unreadable."""
    try:
        dialled = normalise_number(uri_user_number(request.uri) or "")
    except SipParseError:
        dialled = ""
    calling = ""
    for key in ("p-asserted-identity", "from"):
        value = request.get(key)
        if not value:
            continue
        try:
            address = request.addresses(key)[0] if key != "from" else request.from_addr
            calling = normalise_number(uri_user_number(parse_uri(address.uri_text)) or "")
        except (SipParseError, IndexError):
            continue
        if calling:
            break
    return dialled, calling


def _pattern(text: Any, where: str) -> Pattern:
    if not isinstance(text, str) or not text:
        raise RulesError(f"{where}: a number pattern must be a non-empty string")
    if text.startswith("re:"):
        try:
            return Pattern(text, re.compile(text[3:]))
        except re.error as exc:
            raise RulesError(f"{where}: bad regular expression {text!r}: {exc}") from None
    digits = text.lstrip("+")
    if not re.fullmatch(r"[0-9*?]+", digits):
        raise RulesError(
            f"{where}: bad pattern {text!r}: use digits with * and ?, or re:REGEX "
            '(e.g. "1212555*" or "re:^1800")'
        )
    return Pattern(text, re.compile(fnmatch.translate(digits)))


def _patterns(value: Any, where: str) -> tuple[Pattern, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(_pattern(item, where) for item in items)


def _rule(index: int, item: Any, origin: str) -> Rule:
    where = f"{origin}: rule #{index}"
    if not isinstance(item, dict):
        raise RulesError(f"{where}: each [[rule]] must be a table")
    name = str(item.get("name", f"rule {index}"))
    where = f"{origin}: rule #{index} ({name!r})"
    unknown = set(item) - _FIELDS
    if unknown:
        raise RulesError(
            f"{where}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(sorted(_FIELDS))}"
        )
    action = item.get("action")
    if action is None:
        raise RulesError(f"{where}: missing action (one of {', '.join(ACTIONS)})")
    if action not in ACTIONS:
        raise RulesError(f"{where}: unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    sources = []
    raw_sources = item.get("source", [])
    for text in raw_sources if isinstance(raw_sources, list) else [raw_sources]:
        try:
            sources.append(ipaddress.ip_network(str(text), strict=False))
        except ValueError:
            raise RulesError(
                f"{where}: bad source {text!r}: use an address or CIDR such as 192.0.2.0/24"
            ) from None
    kwargs: dict[str, Any] = {
        "index": index,
        "name": name,
        "action": action,
        "sources": tuple(sources),
        "dialled": _patterns(item.get("dialled"), f"{where} dialled"),
        "calling": _patterns(item.get("calling"), f"{where} calling"),
    }
    effective = action
    if action == "delay":
        delay = item.get("delay_ms")
        if not isinstance(delay, int) or delay < 0:
            raise RulesError(f"{where}: delay needs delay_ms = N (milliseconds, >= 0)")
        then = item.get("then", "route")
        if then not in ACTIONS or then in ("delay", "silent", "drop-connection"):
            raise RulesError(f"{where}: then = {then!r}: use route, verify, divert, pass or block")
        kwargs.update(delay_ms=delay, then=then)
        effective = then
    if effective in ("route", "verify"):
        contacts = item.get("contacts")
        if not isinstance(contacts, list) or not contacts:
            raise RulesError(
                f'{where}: {effective} needs contacts = ["sip:{{dialled}}@carrier.example:5060"]'
            )
        for contact in contacts:
            _check_uri(contact, where)
        kwargs["contacts"] = tuple(contacts)
    if effective == "route":
        attest = item.get("attest", "A")
        if attest not in ("A", "B", "C"):
            raise RulesError(f"{where}: attest = {attest!r}: use A, B or C")
        kwargs["attest"] = attest
    if effective == "verify":
        verstat = item.get("verstat", "TN-Validation-Passed")
        if verstat not in VERSTATS:
            raise RulesError(f"{where}: verstat = {verstat!r}: use one of {', '.join(VERSTATS)}")
        kwargs.update(verstat=verstat, cnam=str(item.get("cnam", "")))
    if effective == "divert":
        target = item.get("target")
        if not isinstance(target, str):
            raise RulesError(f'{where}: divert needs target = "sip:captcha@gateway.example"')
        _check_uri(target, where)
        kwargs["target"] = target
    if effective == "block":
        kwargs.update(
            reason=str(item.get("reason", "Call blocked by ClearIP")),
            redress=str(item.get("redress", "")),
        )
    if action == "unknown-source":
        code = item.get("code", 404)
        if code not in (403, 404):
            raise RulesError(f"{where}: code = {code!r}: unknown-source answers 404 or 403")
        kwargs["code"] = code
    return Rule(**kwargs)


def _check_uri(text: Any, where: str) -> None:
    try:
        parse_uri(str(text).replace("{dialled}", "0"))
    except SipParseError as exc:
        raise RulesError(f"{where}: bad URI {text!r}: {exc.reason}") from None
    if not str(text).startswith(("sip:", "sips:")):
        raise RulesError(f"{where}: bad URI {text!r}: use a sip: or sips: URI")


def rules_from_data(data: dict[str, Any], origin: str) -> RuleSet:
    extra = set(data) - {"rule", "signing"}
    if extra:
        raise RulesError(f"{origin}: unknown table(s) {sorted(extra)}; use [signing] and [[rule]]")
    signing_data = data.get("signing", {})
    if not isinstance(signing_data, dict) or set(signing_data) - {"x5u", "key_file"}:
        raise RulesError(f"{origin}: [signing] takes x5u and key_file only")
    signing = Signing(
        x5u=str(signing_data.get("x5u", Signing.x5u)),
        key_file=str(signing_data.get("key_file", "")),
    )
    items = data.get("rule", [])
    if not isinstance(items, list):
        raise RulesError(f"{origin}: rules are [[rule]] tables")
    return RuleSet(
        tuple(_rule(i, item, origin) for i, item in enumerate(items, start=1)), signing, origin
    )


def load_rules(path: str | Path) -> RuleSet:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RulesError(f"{path}: rules file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RulesError(f"{path}: cannot read the rules: {exc}") from None
    return rules_from_data(data, str(path))


DEFAULT_RULES = Path(__file__).with_name("data") / "default_rules.toml"
