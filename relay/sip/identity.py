"""Reading SHAKEN PASSporTs (RFC 8225, RFC 8588) and Identity headers (RFC 8224 §4.1).

Decoding only: the proxy reads the ``attest`` claim for its call logs without verifying
anything (verification is ClearIP's job); the emulator signs and verifies with these helpers.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

# RFC 8224 §4.1: Identity = signed-identity-digest SEMI ident-info *( SEMI ident-info-params )
_B64 = r"[A-Za-z0-9_\-]+"
_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
IDENTITY_RE = re.compile(
    rf"(?P<jwt>{_B64}\.{_B64}\.{_B64})"
    r"[ \t]*;[ \t]*info[ \t]*=[ \t]*<(?P<info>[^<>\s]+)>"
    rf"(?P<params>(?:[ \t]*;[ \t]*{_TOKEN}(?:[ \t]*=[ \t]*{_TOKEN})?)*)"
)


class PassportError(ValueError):
    """A PASSporT that cannot be decoded or whose signature does not verify."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise PassportError(f"bad base64url: {exc}") from None


def decode(jwt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, without verifying the signature."""
    parts = jwt.split(".")
    if len(parts) != 3:
        raise PassportError("a PASSporT has three dot-separated parts")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: deeply nested JSON from a hostile peer must not escape as a crash.
        raise PassportError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise PassportError("header and claims must be JSON objects")
    return header, claims


def parse_identity(value: str) -> tuple[str, str, dict[str, str]]:
    """Split an Identity header into (jwt, info URI, params); PassportError if malformed."""
    m = IDENTITY_RE.fullmatch(value.strip())
    if m is None:
        raise PassportError("Identity header does not follow RFC 8224 §4.1")
    params: dict[str, str] = {}
    for item in m.group("params").split(";")[1:]:
        name, _, val = item.strip().partition("=")
        params[name.strip()] = val.strip()
    return m.group("jwt"), m.group("info"), params


def attestation_of(identity: str | None) -> str | None:
    """The ``attest`` claim of the PASSporT in an Identity header (decoded, not verified)."""
    if not identity:
        return None
    token = identity.strip().split(";", 1)[0].strip().strip("<>")
    try:
        _, claims = decode(token)
    except PassportError:
        return None
    attest = claims.get("attest")
    return attest if isinstance(attest, str) else None
