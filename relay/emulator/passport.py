"""Signing and verifying SHAKEN PASSporTs with ES256 (ECDSA P-256, SHA-256).

The signature is r||s (64 bytes). JSON is written with sorted keys and no spaces (RFC 8225 §9's
canonical form). Decoding and the Identity grammar live in :mod:`clearip.relay.shaken`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from clearip.relay.shaken import PassportError, b64url, b64url_decode, decode


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Signer:
    """Signs SHAKEN PASSporTs with one P-256 key; ``x5u`` says where its certificate lives."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, x5u: str) -> None:
        self.key = key
        self.x5u = x5u

    @classmethod
    def generate(cls, x5u: str) -> Signer:
        return cls(ec.generate_private_key(ec.SECP256R1()), x5u)

    @classmethod
    def from_pem(cls, pem: bytes, x5u: str) -> Signer:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise PassportError("the signing key must be an EC P-256 private key (ES256)")
        return cls(key, x5u)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(
        self,
        *,
        orig_tn: str,
        dest_tns: list[str],
        attest: str,
        iat: int | None = None,
        origid: str | None = None,
    ) -> str:
        header = {"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": self.x5u}
        claims = {
            "attest": attest,
            "dest": {"tn": dest_tns},
            "iat": int(time.time()) if iat is None else iat,
            "orig": {"tn": orig_tn},
            "origid": origid or str(uuid.uuid4()),
        }
        signing_input = f"{b64url(_canonical(header))}.{b64url(_canonical(claims))}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def identity_header(self, jwt: str) -> str:
        return f"{jwt};info=<{self.x5u}>;alg=ES256;ppt=shaken"


def verify(jwt: str, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The claims if the ES256 signature verifies; PassportError otherwise."""
    header, claims = decode(jwt)
    if header.get("alg") != "ES256":
        raise PassportError(f"unexpected alg {header.get('alg')!r}")
    signing_input, _, signature = jwt.rpartition(".")
    raw = b64url_decode(signature)
    if len(raw) != 64:
        raise PassportError("an ES256 signature is 64 bytes")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PassportError("signature does not verify") from None
    return claims
