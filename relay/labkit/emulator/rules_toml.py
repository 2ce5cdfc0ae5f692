"""Reading the emulator's rules file: a TOML file of ``[[rule]]`` tables and ``[signing]``.

Rules: every error is a :class:`~clearip.relay.labkit.emulator.rules.RulesError` naming the
file, the rule and the fix. A field an action does not use is an error, so that a typo never
silently changes behaviour. A field takes one pattern or a list (any may match); see
:mod:`rules` for how patterns and conditions match. The same file may hold the emulator's
``[[listen]]`` and ``[tls]`` tables (:data:`CONFIG_TABLES`, read by :mod:`config`).

Actions and their fields:

==================  ===========================================================================
``route``           302 to ``contacts`` with a signed PASSporT in ``Identity``; ``attest`` A/B/C
``verify``          302 to ``contacts`` with ``P-Asserted-Identity``: ``cnam``, ``verstat``
``divert``          302 to one ``target`` (or ``contacts`` with one URI), e.g. a CAPTCHA gateway
``pass``            503 Service Unavailable (nothing blocked, nothing to route or sign)
``block``           603 Decline with ``reason``; ``redress`` makes it a 603+ (ATIS-1000099)
``unknown-source``  ``code`` 404 (default) or 403
``silent``          never answers (retransmissions are absorbed)
``delay``           waits ``delay_ms``, then answers as ``then`` (another action, its fields)
``drop-connection`` closes the TCP/TLS connection the INVITE came on (UDP: like silent)
==================  ===========================================================================

``reason`` also sets the Reason text of route/verify/divert/pass/unknown-source answers.
Contact URIs may contain ``{dialled}``, replaced by the dialled number.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

from clearip.relay.labkit.emulator.passport import ATTESTATIONS
from clearip.relay.labkit.emulator.rules import (
    ACTIONS,
    DEFAULT_X5U,
    IPNetwork,
    Pattern,
    Redress,
    Rule,
    RulesError,
    RuleSet,
    Signing,
)
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.uri import parse_uri

# Actions that answer (what ``delay`` may do after waiting).
ANSWERS = ("route", "verify", "divert", "pass", "block", "unknown-source")
VERSTATS = ("TN-Validation-Passed", "TN-Validation-Failed", "No-TN-Validation")
LOCATIONS = ("LN", "TN", "LPN", "RPN", "RLN")

_MATCH_FIELDS = ("name", "action", "source", "dialled", "calling")
_ACTION_FIELDS: dict[str, tuple[str, ...]] = {
    "route": ("contacts", "attest", "reason"),
    "verify": ("contacts", "cnam", "verstat", "reason"),
    "divert": ("target", "contacts", "reason"),
    "pass": ("reason",),
    "block": ("reason", "redress"),
    "unknown-source": ("code", "reason"),
    "silent": (),
    "delay": ("delay_ms", "then"),
    "drop-connection": (),
}
_REDRESS_FIELDS = ("url", "tel", "email", "analytics", "location")
# What a Reason text or a display name may not contain (it goes inside a quoted-string).
_UNQUOTABLE = re.compile(r'["\\\x00-\x1f\x7f]')
_REDRESS_VALUE = re.compile(r'[^\s";\\]+')

DEFAULT_RULES = Path(__file__).with_name("data") / "default_rules.toml"


class _RuleReader:
    """Reads one ``[[rule]]`` table; every error names the file, the rule and the fix."""

    def __init__(self, item: dict[str, Any], index: int, origin: str) -> None:
        self.item, self.index, self.origin = item, index, origin
        name = item.get("name", "")
        self.name = name if isinstance(name, str) and name else f"rule {index}"
        self.where = f"rule #{index} ({self.name!r})"

    def error(self, problem: str, fix: str) -> RulesError:
        return RulesError(self.origin, problem, fix, self.where)

    def string(self, key: str, default: str, fix: str) -> str:
        value = self.item.get(key, default)
        if not isinstance(value, str):
            raise self.error(f"{key} must be a string, not {type(value).__name__}", fix)
        return value

    def quotable(self, key: str, default: str) -> str:
        value = self.string(key, default, f'write {key} = "some text"')
        if _UNQUOTABLE.search(value):
            raise self.error(
                f"{key} = {value!r} holds a double quote, backslash or control character",
                f"remove them from {key}",
            )
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.item.get(key, default)
        if value not in choices:
            raise self.error(
                f"{key} = {value!r} is not allowed", f"use one of {', '.join(choices)}"
            )
        return str(value)

    def patterns(self, key: str) -> tuple[Pattern, ...]:
        value = self.item.get(key)
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(f"{key} is an empty list", f"remove {key} to match any number")
        return tuple(self.pattern(key, text) for text in items)

    def pattern(self, key: str, text: Any) -> Pattern:
        example = f'{key} = "1212555*", {key} = "1?00", or {key} = "re:^1(800|888)"'
        if not isinstance(text, str) or not text:
            raise self.error(f"{key}: a pattern must be a non-empty string", f"write {example}")
        if text.startswith("re:"):
            try:
                return Pattern(text, re.compile(text[3:]))
            except re.error as exc:
                raise self.error(
                    f"{key}: bad regular expression {text!r}: {exc}",
                    "correct the regular expression",
                ) from None
        digits = text.removeprefix("+")
        if not re.fullmatch(r"[0-9*?]+", digits):
            raise self.error(
                f"{key}: bad pattern {text!r}",
                f"use digits with * (any digits) and ? (one digit), or re:REGEX; e.g. {example}",
            )
        return Pattern(text, re.compile(fnmatch.translate(digits)))

    def sources(self) -> tuple[IPNetwork, ...]:
        value = self.item.get("source")
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error("source is an empty list", "remove source to match any address")
        out = []
        for text in items:
            try:
                if not isinstance(text, str):
                    raise ValueError
                out.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise self.error(
                    f"bad source {text!r}",
                    'use an address or CIDR string, e.g. source = ["192.0.2.10", "10.0.0.0/8"]',
                ) from None
        return tuple(out)

    def uris(self, key: str, value: Any) -> tuple[str, ...]:
        example = f'{key} = ["sip:{{dialled}}@192.0.2.20:5060"]'
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(f"{key} is empty", f"list one or more SIP URIs: {example}")
        for text in items:
            if not isinstance(text, str) or not text.lower().startswith(("sip:", "sips:")):
                raise self.error(f"{key}: {text!r} is not a sip: or sips: URI", example)
            try:
                parse_uri(text.replace("{dialled}", "0"))
            except SipParseError as exc:
                raise self.error(f"{key}: bad URI {text!r}: {exc.reason}", example) from None
        return tuple(items)

    def redress(self) -> Redress | None:
        value = self.item.get("redress")
        if value is None:
            return None
        fix = 'write redress = "https://..." or redress = { url = "https://...", tel = "+1..." }'
        table = {"url": value} if isinstance(value, str) else value
        if not isinstance(table, dict):
            raise self.error("redress must be a URL or a table", fix)
        unknown = sorted(set(table) - set(_REDRESS_FIELDS))
        if unknown:
            raise self.error(
                f"redress: unknown key(s) {unknown}", f"use {', '.join(_REDRESS_FIELDS)}"
            )
        values = {k: v for k, v in table.items() if k != "location"}
        for key, text in values.items():
            if not isinstance(text, str) or not _REDRESS_VALUE.fullmatch(text):
                raise self.error(
                    f"redress {key} = {text!r} must be a string without spaces, quotes or ';'", fix
                )
        if not any(values.get(k) for k in ("url", "tel", "email")):
            raise self.error("redress gives no url, tel or email", fix)
        if values.get("url") and not values["url"].startswith("https://"):
            raise self.error(f"redress url {values['url']!r} is not https", "use an https:// URL")
        location = table.get("location", "TN")
        if location not in LOCATIONS:
            raise self.error(
                f"redress location = {location!r}", f"use one of {', '.join(LOCATIONS)}"
            )
        return Redress(**values, location=location)


def _rule(item: Any, index: int, origin: str, signing: Signing) -> Rule:
    if not isinstance(item, dict):
        raise RulesError(
            origin, "each rule must be a table", "write [[rule]] followed by key = value lines",
            f"rule #{index}",
        )  # fmt: skip
    r = _RuleReader(item, index, origin)
    if "name" in item and not isinstance(item["name"], str):
        raise r.error("name must be a string", 'write name = "known SBCs"')
    action = item.get("action")
    if action is None:
        raise r.error("missing action", f"add action = one of {', '.join(ACTIONS)}")
    if action not in ACTIONS:
        raise r.error(f"unknown action {action!r}", f"use one of {', '.join(ACTIONS)}")
    then = ""
    if action == "delay":
        if "delay_ms" not in item:
            raise r.error("delay needs delay_ms", "add delay_ms = 2000 (milliseconds)")
        then = item.get("then", "route")
        if then not in ANSWERS:
            raise r.error(f"then = {then!r} is not an answer", f"use one of {', '.join(ANSWERS)}")
    answer = then or action
    allowed = set(_MATCH_FIELDS) | set(_ACTION_FIELDS[action]) | set(_ACTION_FIELDS[answer])
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise r.error(
            f"field(s) {unknown} not used by action {action!r}"
            + (f" then {then!r}" if then else ""),
            f"remove them, or use {', '.join(sorted(allowed))}",
        )
    kwargs: dict[str, Any] = {
        "index": index,
        "name": r.name,
        "action": action,
        "then": then,
        "sources": r.sources(),
        "dialled": r.patterns("dialled"),
        "calling": r.patterns("calling"),
        "reason": r.quotable("reason", ""),
    }
    if action == "delay":
        delay = item["delay_ms"]
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= 600_000:
            raise r.error(f"delay_ms = {delay!r}", "use whole milliseconds from 0 to 600000")
        kwargs["delay_ms"] = delay
    if answer in ("route", "verify"):
        if "contacts" not in item:
            raise r.error(
                f"{answer} needs contacts", 'add contacts = ["sip:{dialled}@192.0.2.20:5060"]'
            )
        kwargs["contacts"] = r.uris("contacts", item["contacts"])
    if answer == "route":
        kwargs["attest"] = r.choice("attest", signing.attest, ATTESTATIONS)
    elif answer == "verify":
        kwargs["verstat"] = r.choice("verstat", "TN-Validation-Passed", VERSTATS)
        kwargs["cnam"] = r.quotable("cnam", "")
    elif answer == "divert":
        if ("target" in item) == ("contacts" in item):
            raise r.error(
                "divert needs exactly one of target and contacts",
                'write target = "sip:captcha@192.0.2.40"',
            )
        uris = r.uris("target", item["target"]) if "target" in item else ()
        uris = uris or r.uris("contacts", item["contacts"])
        if len(uris) != 1:
            raise r.error("divert goes to a single target", "list exactly one URI")
        kwargs["contacts"] = uris
    elif answer == "block":
        kwargs["redress"] = r.redress()
    elif answer == "unknown-source":
        code = item.get("code", 404)
        if code not in (403, 404) or isinstance(code, bool):
            raise r.error(f"code = {code!r}", "unknown-source answers code = 404 or code = 403")
        kwargs["code"] = code
    return Rule(**kwargs)


def _signing(data: Any, origin: str, base_dir: Path | None) -> Signing:
    if data is None:
        return Signing()
    if not isinstance(data, dict):
        raise RulesError(origin, "[signing] must be a table", "write [signing] on its own line")
    unknown = sorted(set(data) - {"x5u", "key_file", "attest"})
    if unknown:
        raise RulesError(
            origin, f"[signing]: unknown key(s) {unknown}", "use x5u, key_file, attest"
        )
    x5u = data.get("x5u", DEFAULT_X5U)
    if not isinstance(x5u, str) or not x5u.startswith(("https://", "http://")):
        raise RulesError(
            origin,
            f"[signing] x5u = {x5u!r}",
            'use an https URL, e.g. "https://cert.example/sh.pem"',
        )
    key_file = data.get("key_file", "")
    if not isinstance(key_file, str):
        raise RulesError(origin, "[signing] key_file must be a string", 'write key_file = "" ')
    attest = data.get("attest", "A")
    if attest not in ATTESTATIONS:
        raise RulesError(origin, f"[signing] attest = {attest!r}", "use A, B or C")
    if key_file and base_dir is not None and not Path(key_file).is_absolute():
        key_file = str(base_dir / key_file)
    return Signing(x5u, key_file, attest)


# Tables the emulator's configuration reads from the same file (see :mod:`config`).
CONFIG_TABLES = ("listen", "tls")


def rules_from_data(data: dict[str, Any], origin: str, base_dir: Path | None = None) -> RuleSet:
    """Validate parsed TOML; ``origin`` (the file name) starts every error message.

    A relative ``[signing] key_file`` is taken relative to ``base_dir`` (the file's folder).
    """
    extra = sorted(set(data) - {"rule", "signing", *CONFIG_TABLES})
    if extra:
        raise RulesError(
            origin, f"unknown table(s) {extra}", "use [signing], [tls], [[listen]] and [[rule]]"
        )
    signing = _signing(data.get("signing"), origin, base_dir)
    items = data.get("rule", [])
    if not isinstance(items, list):
        raise RulesError(origin, "rules must be [[rule]] tables", "write [[rule]], not [rule]")
    rules = tuple(_rule(item, i, origin, signing) for i, item in enumerate(items, start=1))
    return RuleSet(rules, signing, origin)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RulesError(
            str(path),
            "rules file not found",
            "check the path, or leave --rules out for the defaults",
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RulesError(str(path), f"cannot read the rules: {exc}", "correct the TOML") from None


def load_rules(path: str | Path) -> RuleSet:
    return rules_from_data(read_toml(path), str(path), Path(path).parent)
