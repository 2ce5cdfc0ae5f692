"""The parsers' string-method fast paths give exactly what the regular expressions give.

For the common shapes the parsers skip the regular expressions of :mod:`grammar` (see its
docstring). Each test here runs the public parser and a reference that only uses the regular
expression (the code as it was before the fast paths) on generated text, both text the
regular expression accepts and text near it, and requires the same outcome: the same value,
or an error with the same reason.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import example, given, settings
from hypothesis import strategies as st

from clearip.relay.sip.address import check_address, parse_address
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.grammar import (
    HOST_SET,
    TOKEN_SET,
    address_re,
    cseq_re,
    is_token,
    simple_params,
    split_params,
    status_line_re,
    token_re,
    via_re,
)
from clearip.relay.sip.parser import cseq_fields, parse_message
from clearip.relay.sip.uri import _sip_re, parse_sip_uri
from clearip.relay.sip.via import check_via, parse_via

# Characters the fast paths branch on, and some they must leave to the regular expressions.
NEAR = "SIPsip/2.0UDPtcp abcxyzXYZ019-_.!%*+`'~:;=<>@?[]\"\\\t\x0b\u00a0é"
near = st.text(alphabet=NEAR, max_size=70)

# The shapes the fast paths take (so they run, not only the regular expressions), sometimes
# with one character from NEAR spliced in (so they must step aside).
tokens = st.text(alphabet=TOKEN_SET, min_size=1, max_size=8)
hosts = st.text(alphabet=HOST_SET, min_size=1, max_size=12)
ports = st.one_of(st.just(""), st.integers(0, 99999).map(lambda p: f":{p}"))
params = st.lists(
    st.tuples(tokens, st.one_of(st.none(), tokens)).map(
        lambda p: f";{p[0]}" if p[1] is None else f";{p[0]}={p[1]}"
    ),
    max_size=4,
).map("".join)


def spliced(shape: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def splice(text: str, index: int, char: str) -> str:
        index %= len(text) + 1
        return text[:index] + char + text[index:]

    return st.one_of(
        shape,
        st.builds(splice, shape, st.integers(0, 200), st.sampled_from(NEAR)),
    )


simple_vias = spliced(
    st.builds(lambda t, h, p, q: f"SIP/2.0/{t} {h}{p}{q}", tokens, hosts, ports, params)
)
simple_uris = st.builds(
    lambda s, u, h, p, q: f"{s}:{u}{h}{p}{q}",
    st.sampled_from(["sip", "sips", "SIP", "tel", "x-y.z+1"]),
    st.one_of(st.just(""), tokens.map(lambda u: u + "@")),
    hosts,
    ports,
    params,
)
simple_addresses = spliced(
    st.builds(
        lambda d, u, q: f"{d}<{u}>{q}",
        st.one_of(st.just(""), tokens.map(lambda d: f'"{d} x" '), tokens.map(lambda d: f'"{d}"')),
        simple_uris,
        params,
    )
)


def outcome(parse: Callable[[str], object], text: str) -> object:
    try:
        value = parse(text)
    except SipParseError as exc:
        return ("error", exc.reason)
    return ("ok", repr(value) if not isinstance(value, tuple) else value)


# -- references: the regular expressions alone -------------------------------------------------
def via_by_regex(text: str) -> tuple[str, str, int | None, list[tuple[str, str | None]]]:
    m = via_re.fullmatch(text)
    if m is None:
        raise SipParseError(f"malformed Via {text.strip()[:60]!r}", "via")
    transport, host, port, params = m.groups()
    number = int(port) if port else None
    if number is not None and not 0 < number <= 65535:
        raise SipParseError("Via port out of range", "via")
    return transport, host, number, split_params(params)


def address_by_regex(text: str) -> tuple[str | None, str, list[tuple[str, str | None]], bool]:
    m = address_re.fullmatch(text)
    if m is None:
        raise SipParseError(f"malformed address {text.strip()[:60]!r}", "address")
    display, bracketed, bare, params = m.group(1, 2, 3, 4)
    if bracketed is None:
        return None, bare, split_params(params), False
    if display is None:
        display = text[: m.start(2) - 1].strip() or None
    return display, bracketed, split_params(params), True


def sip_uri_by_regex(text: str) -> tuple[object, ...]:
    if " " in text or "\t" in text:
        raise SipParseError(f"whitespace in SIP URI {text[:60]!r}", "uri")
    scheme, _, rest = text.partition(":")
    userinfo = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
    m = _sip_re.fullmatch(f"{scheme}:{rest}")
    if m is None:
        raise SipParseError(f"malformed SIP URI {text[:60]!r}", "uri")
    user = password = None
    if userinfo is not None:
        if not userinfo:
            raise SipParseError("empty user part in SIP URI", "uri")
        user, sep, pw = userinfo.partition(":")
        password = pw if sep else None
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port <= 65535:
        raise SipParseError(f"port out of range in {text[:60]!r}", "uri")
    params = []
    for item in m.group("params").split(";")[1:]:
        if not item:
            raise SipParseError("empty URI parameter", "uri")
        name, sep, value = item.partition("=")
        params.append((name, value if sep else None))
    scheme_out = m.group("scheme").lower()
    return (scheme_out, user, password, m.group("host"), port, params, m.group("headers"))


def cseq_by_regex(value: str) -> tuple[int, str]:
    m = cseq_re.fullmatch(value)
    if m is None:
        raise SipParseError("malformed CSeq", "cseq")
    if len(m.group(1)) > 10 or int(m.group(1)) > 2**31 - 1:
        raise SipParseError("CSeq number too large", "cseq")
    return int(m.group(1)), m.group(2)


# -- the properties --------------------------------------------------------------------------
def _via(text: str) -> tuple[object, ...]:
    via = parse_via(text)
    return via.transport, via.host, via.port, via.params


@settings(max_examples=400, deadline=None)
@given(st.one_of(simple_vias, st.from_regex(via_re, fullmatch=True), near))
@example("SIP/2.0/UDP Host.Example.COM:5060;Branch=z9hG4bKx;RPort")
@example("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-1;rport=5060;received=192.0.2.10")
@example("SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKx")
@example("SIP/2.0/UDP host:99999;branch=z9hG4bKx")
@example('SIP/2.0/UDP host;branch="quoted"')
@example("SIP / 2.0 / UDP host ; branch = x")
def test_via(text: str) -> None:
    assert outcome(_via, text) == outcome(via_by_regex, text)
    assert outcome(check_via, text)[0] == outcome(via_by_regex, text)[0]


def _address(text: str) -> tuple[object, ...]:
    address = parse_address(text)
    return address.display, address.uri_text, address.params, address.angle


@settings(max_examples=400, deadline=None)
@given(st.one_of(simple_addresses, st.from_regex(address_re, fullmatch=True), near))
@example('"Acme Corp" <sip:+14045550100@192.0.2.10>;tag=8a7b6c5d')
@example('"Acme \\"Corp\\"" <sip:a@b>;tag=1')
@example("Acme Corp <sip:a@b>;tag=1")
@example("<sip:a@b;lr>")
@example("<sip:a b@c>")
@example("<sip:a@b>;tag=x y")
@example("<1sip:a@b>")
@example("sip:a@b;tag=1")
def test_address(text: str) -> None:
    assert outcome(_address, text) == outcome(address_by_regex, text)
    assert outcome(check_address, text)[0] == outcome(address_by_regex, text)[0]


def _sip_uri(text: str) -> tuple[object, ...]:
    uri = parse_sip_uri(text)
    return (uri.scheme, uri.user, uri.password, uri.host, uri.port, uri.params, uri.headers)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        spliced(simple_uris), st.from_regex(_sip_re, fullmatch=True), near.map(lambda t: "sip:" + t)
    )
)
@example("sip:+12125550100@198.51.100.7:5060;user=phone")
@example("SIPS:alice:secret@Example.COM:5061;transport=tls?subject=x")
@example("sip:a@host:0")
@example("sip:a@host:70000")
@example("sip:@host")
@example("sip:host;;lr")
@example("sip:host;a=\x0b")
@example("sip:[2001:db8::1]:5060")
def test_sip_uri(text: str) -> None:
    assert outcome(_sip_uri, text) == outcome(sip_uri_by_regex, text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.from_regex(cseq_re, fullmatch=True), near))
@example("1 INVITE")
@example("4294967296 INVITE")
@example("1\tINVITE")
@example("٣ INVITE")
def test_cseq(value: str) -> None:
    assert outcome(cseq_fields, value) == outcome(cseq_by_regex, value)


@settings(max_examples=300, deadline=None)
@given(near)
@example("INVITE")
@example("")
@example("IN VITE")
def test_token(text: str) -> None:
    assert is_token(text) == (token_re.fullmatch(text) is not None)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.from_regex(r"(;[a-z0-9.=-]{0,8}){0,4}", fullmatch=True), near))
def test_simple_params(text: str) -> None:
    params = simple_params(text)
    if params is not None:  # only text PARAMS accepts, split as split_params splits it
        assert via_re.fullmatch("SIP/2.0/UDP h" + text) is not None
        assert params == split_params(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.from_regex(status_line_re, fullmatch=True), near.map(lambda t: "SIP/2.0 " + t)))
@example("SIP/2.0 180 Ringing")
@example("SIP/2.0 700 Nope")
@example("SIP/2.0 1800 Ringing")
def test_status_line(line: str) -> None:
    data = f"{line}\r\nContent-Length: 0\r\n\r\n".encode("utf-8", "surrogateescape")
    m = status_line_re.fullmatch(line)

    def by_regex(_: str) -> tuple[int, str]:
        if m is None:
            reason = "unsupported SIP version" if not line.startswith("SIP/2.0 ") else ""
            raise SipParseError(reason or "malformed status line")
        return int(m.group(1)), m.group(2)

    def parsed(_: str) -> tuple[int, str]:
        response = parse_message(data)
        return response.status, response.reason  # type: ignore[union-attr]

    got, want = outcome(parsed, line), outcome(by_regex, line)
    if want[0] == "ok" or got[0] == "ok":
        assert got == want
