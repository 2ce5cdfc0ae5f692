"""SHAKEN PASSporTs: ES256 signatures, RFC 8225/8588 claims, the RFC 8224 Identity header."""

from __future__ import annotations

import base64
import json
import re
import stat
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from clearip.relay.labkit.emulator.passport import (
    PassportError,
    Signer,
    decode,
    identity_header,
    parse_identity,
    read_attestation,
    verify,
    verify_identity,
)
from clearip.relay.sip.grammar import QUOTED, TOKEN

X5U = "https://cert.test/shaken.pem"

# RFC 8224 §4.1 (with RFC 3261's SEMI, EQUAL, LAQUOT, RAQUOT, token and generic-param; token and
# quoted-string are the SIP stack's, the Identity structure is written out here):
#   Identity = signed-identity-digest SEMI ident-info *( SEMI ident-info-params )
#   signed-identity-digest = 1*(base64-char / ".")
#   ident-info = "info" EQUAL ident-info-uri ; ident-info-uri = LAQUOT absoluteURI RAQUOT
#   ident-info-params = ident-info-alg / ident-type / ident-info-extension
#   ident-info-alg = "alg" EQUAL token ; ident-type = "ppt" EQUAL token
#   ident-info-extension = generic-param
# base64-char is written ALPHA / DIGIT / "/" / "+" there, but a PASSporT is base64url (RFC
# 8225 §5), so "-" and "_" are accepted too.
_SWS = r"(?:[ \t]*(?:\r\n)?[ \t]+)?"
_SEMI = rf"{_SWS};{_SWS}"
_EQUAL = rf"{_SWS}={_SWS}"
_ABSOLUTE_URI = r"[A-Za-z][A-Za-z0-9+\-.]*:[^\s<>]+"
_PARAM = rf"(?:alg{_EQUAL}{TOKEN}|ppt{_EQUAL}{TOKEN}|{TOKEN}(?:{_EQUAL}(?:{TOKEN}|{QUOTED}))?)"
RFC8224_IDENTITY = re.compile(
    rf"(?P<digest>[A-Za-z0-9/+\-_.]+){_SEMI}info{_EQUAL}{_SWS}<(?P<uri>{_ABSOLUTE_URI})>{_SWS}"
    rf"(?:{_SEMI}{_PARAM})*"
)
JWS_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _b64(part: str) -> dict[str, object]:
    data = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(data, dict)
    return data


def test_signed_passport_verifies_and_carries_the_claims_of_the_call() -> None:
    signer = Signer.generate(X5U)
    jwt = signer.sign(orig_tn="14045550100", dest_tns=["12125550100"], attest="A")
    header_part, claims_part, signature = jwt.split(".")
    # The protected header and the claims, read straight from the base64url text.
    assert _b64(header_part) == {"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": X5U}
    claims = _b64(claims_part)
    assert set(claims) == {"attest", "dest", "iat", "orig", "origid"}
    assert claims["attest"] == "A"
    assert claims["orig"] == {"tn": "14045550100"}
    assert claims["dest"] == {"tn": ["12125550100"]}
    assert isinstance(claims["iat"], int) and abs(claims["iat"] - time.time()) < 5
    assert uuid.UUID(str(claims["origid"])).version == 4
    # RFC 8225 §9: the JSON is in its canonical form (sorted keys, no whitespace).
    raw = base64.urlsafe_b64decode(claims_part + "=" * (-len(claims_part) % 4)).decode()
    assert raw == json.dumps(claims, sort_keys=True, separators=(",", ":"))
    assert len(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))) == 64
    assert verify(jwt, signer.public_key) == claims


def test_signature_fails_with_another_key_or_changed_claims() -> None:
    signer = Signer.generate(X5U)
    jwt = signer.sign(orig_tn="14045550100", dest_tns=["12125550100"], attest="B")
    with pytest.raises(PassportError, match="does not verify"):
        verify(jwt, ec.generate_private_key(ec.SECP256R1()).public_key())
    header, claims, signature = jwt.split(".")
    forged = base64.urlsafe_b64encode(
        json.dumps({**_b64(claims), "attest": "A"}, sort_keys=True, separators=(",", ":")).encode()
    )
    with pytest.raises(PassportError, match="does not verify"):
        verify(f"{header}.{forged.rstrip(b'=').decode()}.{signature}", signer.public_key)
    with pytest.raises(PassportError, match="64 bytes"):
        verify(f"{header}.{claims}.{signature[:40]}", signer.public_key)
    with pytest.raises(PassportError):
        verify("only.two", signer.public_key)


def test_fixed_iat_and_origid_are_kept_and_attest_is_checked() -> None:
    signer = Signer.generate(X5U)
    origid = str(uuid.uuid4())
    jwt = signer.sign(orig_tn="1", dest_tns=["2", "3"], attest="C", iat=1700000000, origid=origid)
    _, claims = decode(jwt)
    assert claims["iat"] == 1700000000 and claims["origid"] == origid
    assert claims["dest"] == {"tn": ["2", "3"]}
    with pytest.raises(PassportError, match="A, B or C"):
        signer.sign(orig_tn="1", dest_tns=["2"], attest="D")


def test_identity_header_follows_the_rfc8224_grammar() -> None:
    signer = Signer.generate(X5U)
    value = signer.identity_header(signer.sign(orig_tn="1", dest_tns=["2"], attest="A"))
    m = RFC8224_IDENTITY.fullmatch(value)
    assert m is not None, value
    assert JWS_COMPACT.fullmatch(m.group("digest"))
    assert m.group("uri") == X5U
    assert value.endswith(";info=<https://cert.test/shaken.pem>;alg=ES256;ppt=shaken")
    assert value == identity_header(m.group("digest"), X5U)
    jwt, info, params = parse_identity(value)
    assert (jwt, info, params) == (m.group("digest"), X5U, {"alg": "ES256", "ppt": "shaken"})
    # The grammar regex rejects what it should (so the test above can fail).
    for bad in (
        f"{jwt};info={X5U};alg=ES256",  # the URI without angle brackets
        f"{jwt};alg=ES256;ppt=shaken",  # no ident-info
        f"{jwt} info=<{X5U}>",  # no SEMI
        f"{jwt};info=<not a uri>",  # not an absoluteURI
        f"{jwt};info=<{X5U}>;alg=ES 256",  # not a token
    ):
        assert RFC8224_IDENTITY.fullmatch(bad) is None, bad


def test_verify_identity_checks_ppt_alg_and_x5u() -> None:
    signer = Signer.generate(X5U)
    jwt = signer.sign(orig_tn="14045550100", dest_tns=["12125550100"], attest="A")
    assert verify_identity(identity_header(jwt, X5U), signer.public_key)["attest"] == "A"
    with pytest.raises(PassportError, match="differs from info"):
        verify_identity(identity_header(jwt, "https://elsewhere.test/x.pem"), signer.public_key)
    with pytest.raises(PassportError, match="ppt"):
        verify_identity(f"{jwt};info=<{X5U}>;alg=ES256;ppt=div", signer.public_key)
    with pytest.raises(PassportError, match="alg"):
        verify_identity(f"{jwt};info=<{X5U}>;alg=RS256;ppt=shaken", signer.public_key)


def test_read_attestation_decodes_without_verifying_and_never_raises() -> None:
    signer = Signer.generate(X5U)
    for level in ("A", "B", "C"):
        jwt = signer.sign(orig_tn="1", dest_tns=["2"], attest=level)
        assert read_attestation(identity_header(jwt, X5U)) == level
        assert read_attestation(jwt) == level
    header = base64.urlsafe_b64encode(b'{"alg":"ES256"}').rstrip(b"=").decode()

    def passport(claims: bytes) -> str:
        return f"{header}.{base64.urlsafe_b64encode(claims).rstrip(b'=').decode()}.sig"

    assert read_attestation(passport(b'{"attest":"B"}')) == "B"  # unsigned: still read
    assert read_attestation(passport(b'{"attest":"Z"}')) is None
    assert read_attestation(passport(b'{"attest":["A"]}')) is None
    assert read_attestation(passport(b"[" * 5000)) is None  # nested past the JSON decoder
    for junk in (None, "", "garbage", "a.b.c;info=<x>", "\x00;;;"):
        assert read_attestation(junk) is None


def test_signer_keys_from_pem(tmp_path: Path) -> None:
    signer = Signer.generate(X5U)
    path = tmp_path / "signing.key"
    signer.save_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Signer.from_pem(path.read_bytes(), X5U)
    jwt = again.sign(orig_tn="1", dest_tns=["2"], attest="A")
    assert verify(jwt, signer.public_key)["attest"] == "A"
    public = serialization.load_pem_public_key(signer.public_pem())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert verify(jwt, public)["orig"] == {"tn": "1"}
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(PassportError, match="P-256"):
        Signer.from_pem(rsa_pem, X5U)
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(PassportError, match="P-256"):
        Signer(p384, X5U)
    with pytest.raises(PassportError, match="PEM"):
        Signer.from_pem(b"not a key", X5U)
