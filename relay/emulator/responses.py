"""ClearIP-shaped responses for a rule's decision (RFC 3261 §8.2.6 for the common part)."""

from __future__ import annotations

from clearip.relay.emulator.passport import Signer
from clearip.relay.emulator.rules import Rule, numbers_of
from clearip.relay.proxy.replies import make_reply
from clearip.relay.sip.message import Request, Response


def reply(
    request: Request, status: int, reason: str, extra: list[tuple[str, str]] | None = None
) -> Response:
    return make_reply(request, status, reason, extra=extra, server="clearip-emulator")


def q_value(index: int) -> str:
    """ClearIP's q-values: 1.0, 0.99, 0.98..."""
    return "1.0" if index == 0 else f"{1.0 - index / 100:.2f}"


def build_response(rule: Rule, request: Request, signer: Signer) -> Response:
    action = rule.then if rule.action == "delay" else rule.action
    dialled, calling = numbers_of(request)
    if action in ("route", "verify", "divert"):
        targets = [rule.target] if action == "divert" else list(rule.contacts)
        contacts = ", ".join(
            f"<{uri.replace('{dialled}', dialled or 'unknown')}>;q={q_value(i)}"
            for i, uri in enumerate(targets)
        )
        extra = [("Contact", contacts)]
        if action == "route":
            jwt = signer.sign(orig_tn=calling, dest_tns=[dialled], attest=rule.attest)
            extra.append(("Identity", signer.identity_header(jwt)))
            text = f"Routed by ClearIP, attestation {rule.attest}"
        elif action == "verify":
            display = f'"{rule.cnam}" ' if rule.cnam else ""
            pai = f"{display}<sip:+{calling}@clearip.lab;user=phone;verstat={rule.verstat}>"
            extra.append(("P-Asserted-Identity", pai))
            text = f"Verified by ClearIP: {rule.verstat}"
        else:
            text = "Diverted by ClearIP"
        extra.append(("Reason", f'SIP;cause=302;text="{text}"'))
        return reply(request, 302, "Moved Temporarily", extra=extra)
    if action == "pass":
        return reply(request, 503, "Service Unavailable")
    if action == "block":
        extra = [("Reason", f'SIP;cause=603;text="{rule.reason}"')]
        if rule.redress:
            extra.append(("Call-Info", f"<{rule.redress}>;purpose=jwt"))
        return reply(request, 603, "Decline", extra=extra)
    code = rule.code if action == "unknown-source" else 500
    reason = {404: "Not Found", 403: "Forbidden"}.get(code, "Server Internal Error")
    return reply(request, code, reason)
