"""RFC 3261 §25 grammar pieces as compiled regular expressions, shared by the parsers.

The regular expressions run in C, which keeps the per-message cost of strict validation low.
Whitespace is matched as ``[ \\t]`` because line folding is undone before these run.

The parsers first try the shape nearly every message has (no optional whitespace, no quoted
parameter, no IPv6 reference) with string methods, which run in C a few times faster than
the regular expressions: :func:`is_token` and :func:`simple_params` below. Such a fast path
accepts only text its regular expression accepts, with the same result; anything else is
left to the regular expression, which decides.
"""

from __future__ import annotations

import re
from typing import Final

TOKEN_CHARS = r"A-Za-z0-9\-.!%*_+`'~"
TOKEN = rf"[{TOKEN_CHARS}]+"
WS = r"[ \t]*"
QUOTED = r'"(?:[^"\\\r\n]|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*"'
IPV6_REF = r"\[[0-9A-Fa-f:.]+\]"
HOST = rf"(?:{IPV6_REF}|[A-Za-z0-9\-_.]+)"
GEN_VALUE = rf"(?:{TOKEN}|{IPV6_REF}|{QUOTED})"
PARAM = rf"{WS};{WS}{TOKEN}(?:{WS}={WS}{GEN_VALUE})?"
PARAMS = rf"(?:{PARAM})*"

#: The characters of TOKEN, of a host name (the non-IPv6 HOST) and of a URI scheme.
TOKEN_SET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.!%*_+`'~"
HOST_SET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
SCHEME_SET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+.-"
# The same sets as tables indexed by ASCII code (1: in the set).
_TOKEN_TABLE: Final = bytes(int(chr(code) in TOKEN_SET) for code in range(128))
_HOST_TABLE: Final = bytes(int(chr(code) in HOST_SET) for code in range(128))
_SCHEME_TABLE: Final = bytes(int(chr(code) in SCHEME_SET) for code in range(128))
#: Compiled, a loop over the characters is the fastest check (mypyc reads ``ord(text[i])``
#: natively, ~3 ns a character); interpreted, ``str.strip`` with the set is.
COMPILED: Final = not __file__.endswith(".py")

token_re = re.compile(TOKEN)
param_re = re.compile(rf"{WS};{WS}({TOKEN})(?:{WS}={WS}({GEN_VALUE}))?")
params_re = re.compile(PARAMS)

# name-addr / addr-spec with header parameters (From, To, Contact, Route, Record-Route, PAI).
# Every repetition here is separated by a mandatory character (LWS between display-name
# tokens, ';' between parameters) so a failing match cannot backtrack exponentially.
# Group 1: display name (token list or quoted string), 2: URI inside <>, 3: bare addr-spec URI.
address_re = re.compile(
    rf"{WS}(?:((?:{TOKEN}(?:[ \t]+{TOKEN})*)|{QUOTED})?{WS}<([A-Za-z][A-Za-z0-9+.\-]*:[^<>\s]+)>"
    rf"|([A-Za-z][A-Za-z0-9+.\-]*:[^\s;,?<>\"]+))"
    rf"({PARAMS}){WS}"
)

via_re = re.compile(
    rf"{WS}SIP{WS}/{WS}2\.0{WS}/{WS}({TOKEN}){WS}[ \t]({HOST})"
    rf"(?:{WS}:{WS}(\d{{1,5}}))?({PARAMS}){WS}",
    re.ASCII,
)

request_uri_scheme_re = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+")
cseq_re = re.compile(rf"{WS}(\d+)[ \t]+({TOKEN}){WS}")
digits_re = re.compile(rf"{WS}(\d{{1,10}}){WS}")
status_line_re = re.compile(r"SIP/2\.0 ([1-6]\d\d) ([^\r\n]*)")
date_re = re.compile(
    r"[ \t]*(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT[ \t]*"
)
header_name_re = re.compile(TOKEN)

#: Entries kept by the memoised URI parse: Route and Record-Route URIs recur in every call;
#: bounded so a flood of distinct values costs a fixed amount of memory. Values new in every
#: call or transaction (Via branches, tags) are parsed directly, not memoised.
PARSE_CACHE_SIZE = 8192


def find_param(params: list[tuple[str, str | None]], name: str) -> str | None:
    """A parameter's value, names compared case-insensitively ('' for a flag such as ``lr``;
    None when absent)."""
    lname = name.lower()
    size = len(lname)
    for key, value in params:
        if key == lname or (len(key) == size and key.lower() == lname):
            return "" if value is None else value
    return None


def split_params(text: str) -> list[tuple[str, str | None]]:
    """``;a=1;b`` into ``[("a", "1"), ("b", None)]`` (names as written, values as written).

    ``text`` has matched ``PARAMS`` (its callers' regular expressions include it). Without
    whitespace or quotes, every parameter is ``;token`` or ``;token=token`` (or an IPv6
    reference), none holding ``;`` or ``=``, so splitting the string gives what the regular
    expression would, several times faster; anything else goes through it.
    """
    if not text:
        return []
    if '"' in text or " " in text or "\t" in text:
        return [(m.group(1), m.group(2)) for m in param_re.finditer(text)]
    out: list[tuple[str, str | None]] = []
    for item in text.split(";")[1:]:
        name, equals, value = item.partition("=")
        out.append((name, value if equals else None))
    return out


def _only(text: str, table: bytes, chars: str) -> bool:
    """Whether every character of ``text`` is in a set (``table``, and as a string ``chars``)."""
    if not COMPILED:
        return not text.strip(chars)
    for index in range(len(text)):
        code = ord(text[index])
        if code > 127 or not table[code]:
            return False
    return True


def token_end(text: str, start: int) -> int:
    """Where the run of token characters from ``start`` ends."""
    return _run_end(text, start, _TOKEN_TABLE)


def host_end(text: str, start: int) -> int:
    """Where the run of host-name characters from ``start`` ends."""
    return _run_end(text, start, _HOST_TABLE)


def scheme_end(text: str, start: int) -> int:
    """Where the run of URI-scheme characters from ``start`` ends."""
    return _run_end(text, start, _SCHEME_TABLE)


def _run_end(text: str, start: int, table: bytes) -> int:
    index = start
    size = len(text)
    while index < size:
        code = ord(text[index])
        if code > 127 or not table[code]:
            break
        index += 1
    return index


def digits_end(text: str, start: int) -> int:
    """Where the run of ASCII digits from ``start`` ends."""
    index = start
    size = len(text)
    while index < size and 48 <= ord(text[index]) <= 57:
        index += 1
    return index


def params_end(text: str, start: int) -> int:
    """How far ``text`` from ``start`` is ``;token[=token]`` parameters with no whitespace:
    the end of the last whole one (``len(text)`` when they run to the end). Nothing is
    allocated: the compiled checks of Via and address values use it."""
    index = start
    size = len(text)
    while index < size and ord(text[index]) == 59:  # ;
        name_end = token_end(text, index + 1)
        if name_end == index + 1:
            return index
        if name_end < size and ord(text[name_end]) == 61:  # =
            value_end = token_end(text, name_end + 1)
            if value_end == name_end + 1:
                return index
            index = value_end
        else:
            index = name_end
    return index


def is_token(text: str) -> bool:
    """``token_re.fullmatch(text)``, without the regular expression."""
    return bool(text) and _only(text, _TOKEN_TABLE, TOKEN_SET)


def is_host_name(text: str) -> bool:
    """A host name or IPv4 address as HOST matches it (``[A-Za-z0-9-_.]+``)."""
    return bool(text) and _only(text, _HOST_TABLE, HOST_SET)


def is_digits(text: str, most: int) -> bool:
    """1 to ``most`` ASCII digits."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def is_scheme(text: str) -> bool:
    """A URI scheme: ``[A-Za-z][A-Za-z0-9+.-]*``."""
    return (
        bool(text)
        and text[0].isascii()
        and text[0].isalpha()
        and _only(text, _SCHEME_TABLE, SCHEME_SET)
    )


def simple_params(text: str) -> list[tuple[str, str | None]] | None:
    """``text`` (empty, or starting with ``;``) as parameters when every one is ``;token`` or
    ``;token=token``, with no whitespace: what PARAMS matches then, split as
    :func:`split_params` splits it. None for any other text (PARAMS decides)."""
    out: list[tuple[str, str | None]] = []
    if not text:
        return out
    if text[0] != ";" or " " in text or "\t" in text:
        return None
    for item in text[1:].split(";"):
        name, equals, value = item.partition("=")
        if not is_token(name):
            return None
        if equals:
            if not is_token(value):
                return None
            out.append((name, value))
        else:
            out.append((name, None))
    return out


def split_commas(value: str) -> list[str]:
    """Split a header value on commas that are outside quotes and angle brackets."""
    if "," not in value:
        return [value.strip()]
    if '"' not in value and "<" not in value:
        return [part.strip() for part in value.split(",")]
    parts: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    start = 0
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "<":
            depth += 1
        elif char == ">":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(value[start:index].strip())
            start = index + 1
    parts.append(value[start:].strip())
    return parts
