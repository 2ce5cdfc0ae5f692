"""ClearIP-shaped responses for a decision.

The common part follows RFC 3261 §8.2.6: Via (all of them, in order), From, Call-ID and CSeq
are copied, and To gets a tag that is the same for retransmissions of the request (see
:func:`clearip.relay.proxy.replies.make_reply`). What ClearIP adds:

- route: ``302 Moved Temporarily``, ``Contact`` with q 1.0, 0.99, 0.98..., ``Identity`` with a
  signed SHAKEN PASSporT, ``Reason: SIP;cause=302;text="..."``;
- verify: 302 with ``P-Asserted-Identity: "CNAM" <sip:+N;verstat=...@host;user=phone>`` (verstat
  is a tel URI parameter, so in a SIP URI it sits in the user part, 3GPP TS 24.229 §7.2A.20);
- divert: 302 with a single Contact;
- pass: ``503 Service Unavailable``; block: ``603 Decline`` with a Reason, or with redress the
  603+ of ATIS-1000099 (``603 Network Blocked``, ``Reason: SIP;cause=603;text="v=..;url=.."``);
- unknown-source: ``404 Not Found`` or ``403 Forbidden``.
"""

from __future__ import annotations

from clearip.relay.labkit.emulator.passport import Signer
from clearip.relay.labkit.emulator.rules import Decision
from clearip.relay.proxy.replies import make_reply
from clearip.relay.sip.message import Request, Response

SERVER = "clearip-emulator"
PAI_HOST = "clearip.lab"
REASON_PHRASES = {
    100: "Trying",
    200: "OK",
    302: "Moved Temporarily",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    481: "Call/Transaction Does Not Exist",
    487: "Request Terminated",
    503: "Service Unavailable",
    603: "Decline",
}


def reply(request: Request, status: int, extra: list[tuple[str, str]] | None = None) -> Response:
    """A response to ``request`` with the standard reason phrase and the emulator's Server."""
    return make_reply(
        request, status, REASON_PHRASES.get(status, "Unknown"), extra=extra, server=SERVER
    )


def trying(request: Request) -> Response:
    """100 Trying: no To tag; a Timestamp is copied (RFC 3261 §8.2.6.1)."""
    timestamp = request.get("timestamp")
    extra = [("Timestamp", timestamp)] if timestamp else None
    return make_reply(request, 100, "Trying", extra=extra, add_to_tag=False, server=SERVER)


def q_value(index: int) -> str:
    """ClearIP's q-values for the Contacts of a 302: 1.0, 0.99, 0.98..., never below 0.01."""
    if index == 0:
        return "1.0"
    return f"{max(100 - index, 1) / 100:.2f}"


def contact_list(uris: list[str] | tuple[str, ...], dialled: str) -> str:
    return ", ".join(
        f"<{uri.replace('{dialled}', dialled or 'unknown')}>;q={q_value(i)}"
        for i, uri in enumerate(uris)
    )


def _reason(cause: int, text: str) -> tuple[str, str]:
    return ("Reason", f'SIP;cause={cause};text="{text}"')


def asserted_identity(calling: str, cnam: str, verstat: str) -> str:
    """The P-Asserted-Identity of a verified inbound call."""
    display = f'"{cnam}" ' if cnam else ""
    if not calling:
        return f"{display}<sip:anonymous;verstat=No-TN-Validation@anonymous.invalid;user=phone>"
    return f"{display}<sip:+{calling};verstat={verstat}@{PAI_HOST};user=phone>"


def build_response(decision: Decision, request: Request, signer: Signer) -> Response:
    """The final response for an answering decision (the action, or ``then`` after a delay)."""
    rule = decision.rule
    answer = rule.answer
    extra: list[tuple[str, str]] = []
    if answer in ("route", "verify", "divert"):
        extra.append(("Contact", contact_list(rule.contacts, decision.dialled)))
        if answer == "route":
            jwt = signer.sign(
                orig_tn=decision.calling, dest_tns=[decision.dialled], attest=rule.attest
            )
            extra.append(("Identity", signer.identity_header(jwt)))
            text = rule.reason or f"Routed by ClearIP, attestation {rule.attest}"
        elif answer == "verify":
            pai = asserted_identity(decision.calling, rule.cnam, rule.verstat)
            extra.append(("P-Asserted-Identity", pai))
            text = rule.reason or f"Verified by ClearIP: {rule.verstat}"
        else:
            text = rule.reason or "Diverted by ClearIP"
        extra.append(_reason(302, text))
        return reply(request, 302, extra)
    if answer == "block":
        if rule.redress is not None:
            extra.append(("Reason", rule.redress.reason_value()))
            return make_reply(request, 603, "Network Blocked", extra=extra, server=SERVER)
        extra.append(_reason(603, rule.reason or "Call blocked by ClearIP"))
        return reply(request, 603, extra)
    if answer == "pass":
        status = 503
    elif answer == "unknown-source":
        status = rule.code
    else:
        raise ValueError(f"action {rule.action!r} does not answer")
    if rule.reason:
        extra.append(_reason(status, rule.reason))
    return reply(request, status, extra)
