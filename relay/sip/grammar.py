"""RFC 3261 §25 grammar pieces as compiled regular expressions, shared by the parsers.

The regular expressions run in C, which keeps the per-message cost of strict validation low.
Whitespace is matched as ``[ \\t]`` because line folding is undone before these run.
"""

from __future__ import annotations

import re

TOKEN_CHARS = r"A-Za-z0-9\-.!%*_+`'~"
TOKEN = rf"[{TOKEN_CHARS}]+"
WS = r"[ \t]*"
QUOTED = r'"(?:[^"\\\r\n]|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*"'
IPV6_REF = r"\[[0-9A-Fa-f:.]+\]"
HOST = rf"(?:{IPV6_REF}|[A-Za-z0-9\-_.]+)"
GEN_VALUE = rf"(?:{TOKEN}|{IPV6_REF}|{QUOTED})"
PARAM = rf"{WS};{WS}{TOKEN}(?:{WS}={WS}{GEN_VALUE})?"
PARAMS = rf"(?:{PARAM})*"

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

#: Entries kept by each memoised parse (URIs, addresses, Via, CSeq). The same header values
#: recur in every message of a call (From, To, the switch's Via, Record-Route), so a call's
#: later messages look them up instead of parsing again; bounded so a flood of distinct values
#: costs a fixed amount of memory.
PARSE_CACHE_SIZE = 8192


def find_param(params: list[tuple[str, str | None]], name: str) -> str | None:
    """A parameter's value, names compared case-insensitively ('' for a flag such as ``lr``;
    None when absent)."""
    lname = name.lower()
    for key, value in params:
        if key.lower() == lname:
            return "" if value is None else value
    return None


def split_params(text: str) -> list[tuple[str, str | None]]:
    """``;a=1;b`` into ``[("a", "1"), ("b", None)]`` (names as written, values unquoted)."""
    return [(m.group(1), m.group(2)) for m in param_re.finditer(text)]


def split_commas(value: str) -> list[str]:
    """Split a header value on commas that are outside quotes and angle brackets."""
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
