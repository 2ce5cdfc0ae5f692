"""SHAKEN PASSporTs: signing and verifying with ES256, and the RFC 8224 Identity header.

A PASSporT (RFC 8225) with the SHAKEN extension (RFC 8588) is a JWS in compact form:
``base64url(header).base64url(claims).base64url(signature)``. The protected header is
``{"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": URL}``; the claims are ``attest``
(A, B or C), ``dest`` (``{"tn": [numbers]}``), ``iat`` (seconds since the epoch), ``orig``
(``{"tn": number}``) and ``origid`` (a UUID). Numbers are E.164 digits without ``+``. JSON is
written with sorted keys and no whitespace (RFC 8225 §9). The ES256 signature is ECDSA P-256
with SHA-256 in the JWS form: r and s as 32-byte big-endian integers, concatenated.

The Identity header (RFC 8224 §4.1) carrying it reads
``<jwt>;info=<x5u>;alg=ES256;ppt=shaken``.

Decoding without verifying lives in :mod:`clearip.relay.sip.identity` (the proxy reads
``attest`` for its call log); :func:`read_attestation` is the strict form of that reading.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from clearip.relay.sip.identity import (
    PassportError,
    attestation_of,
    b64url,
    b64url_decode,
    decode,
    parse_identity,
)

__all__ = [
    "ATTESTATIONS",
    "PassportError",
    "Signer",
    "decode",
    "identity_header",
    "parse_identity",
    "read_attestation",
    "verify",
    "verify_identity",
]

ATTESTATIONS = ("A", "B", "C")


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def identity_header(jwt: str, x5u: str) -> str:
    """The value of an RFC 8224 Identity header for a SHAKEN PASSporT signed with ES256."""
    return f"{jwt};info=<{x5u}>;alg=ES256;ppt=shaken"


class Signer:
    """Signs SHAKEN PASSporTs with one P-256 key; ``x5u`` says where its certificate lives."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, x5u: str) -> None:
        if key.curve.name != "secp256r1":
            raise PassportError("the signing key must be an EC P-256 private key (ES256)")
        self.key = key
        self.x5u = x5u

    @classmethod
    def generate(cls, x5u: str) -> Signer:
        return cls(ec.generate_private_key(ec.SECP256R1()), x5u)

    @classmethod
    def from_pem(cls, pem: bytes, x5u: str) -> Signer:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise PassportError(f"not a usable unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PassportError("the signing key must be an EC P-256 private key (ES256)")
        return cls(key, x5u)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save_key(self, path: str | Path) -> None:
        """Write the private key (mode 0600) so a later run can sign with the same key."""
        path = Path(path)
        path.write_bytes(self.private_pem())
        path.chmod(0o600)

    def sign(
        self,
        *,
        orig_tn: str,
        dest_tns: list[str],
        attest: str,
        iat: int | None = None,
        origid: str | None = None,
    ) -> str:
        """A compact PASSporT for a call from ``orig_tn`` to ``dest_tns``."""
        if attest not in ATTESTATIONS:
            raise PassportError(f"attest = {attest!r}: use A, B or C")
        header = {"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": self.x5u}
        claims = {
            "attest": attest,
            "dest": {"tn": list(dest_tns)},
            "iat": int(time.time()) if iat is None else iat,
            "orig": {"tn": orig_tn},
            "origid": origid or str(uuid.uuid4()),
        }
        signing_input = f"{b64url(_canonical(header))}.{b64url(_canonical(claims))}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def identity_header(self, jwt: str) -> str:
        return identity_header(jwt, self.x5u)


def _decode(jwt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return decode(jwt)
    except RecursionError:
        raise PassportError("header or claims nested too deeply") from None


def verify(jwt: str, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The claims if the ES256 signature verifies; PassportError otherwise."""
    header, claims = _decode(jwt)
    if header.get("alg") != "ES256":
        raise PassportError(f"unexpected alg {header.get('alg')!r} (only ES256 is used)")
    signing_input, _, signature = jwt.rpartition(".")
    raw = b64url_decode(signature)
    if len(raw) != 64:
        raise PassportError("an ES256 signature is 64 bytes (r and s, 32 bytes each)")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PassportError("signature does not verify") from None
    return claims


def verify_identity(value: str, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """Parse an Identity header value, check its SHAKEN parameters and verify the PASSporT.

    Returns the claims. The header's ``ppt`` must be ``shaken``; ``alg``, if present, ``ES256``
    (RFC 8224 §4.1); the PASSporT's ``x5u`` must equal the header's ``info`` URI.
    """
    jwt, info, params = parse_identity(value)
    if params.get("ppt") != "shaken":
        raise PassportError(f"ppt = {params.get('ppt')!r}: a SHAKEN PASSporT has ppt=shaken")
    if params.get("alg", "ES256") != "ES256":
        raise PassportError(f"alg = {params['alg']!r}: SHAKEN signs with ES256")
    header, _ = _decode(jwt)
    if header.get("x5u") != info:
        raise PassportError(f"x5u {header.get('x5u')!r} differs from info <{info}>")
    return verify(jwt, public_key)


def read_attestation(identity_header_value: str | None) -> str | None:
    """The ``attest`` claim (A, B or C) of an Identity header's PASSporT, without verifying.

    For logs: never raises; anything unreadable, or an ``attest`` that is not A, B or C, gives
    None. Accepts the full RFC 8224 value or a bare compact PASSporT.
    """
    try:
        attest = attestation_of(identity_header_value)
    except RecursionError:  # claims nested deeper than the JSON decoder goes
        return None
    return attest if attest in ATTESTATIONS else None
