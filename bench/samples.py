"""Typical messages of an outbound call, as a switch and a carrier send them."""

import random

INVITE = (
    b"INVITE sip:+12125550100@198.51.100.7:5060;user=phone SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-524287-1---7a6b5c4d3e2f1a0b;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Acme Corp" <sip:+14045550100@192.0.2.10>;tag=8a7b6c5d\r\n'
    b"To: <sip:+12125550100@198.51.100.7;user=phone>\r\n"
    b"Call-ID: 5f4e3d2c1b0a99887766554433221100@192.0.2.10\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:+14045550100@192.0.2.10:5060;transport=udp>\r\n"
    b"P-Asserted-Identity: <sip:+14045550100@192.0.2.10;user=phone>\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, INFO, REFER, NOTIFY\r\n"
    b"Supported: 100rel, timer, replaces\r\n"
    b"Session-Expires: 1800;refresher=uac\r\n"
    b"User-Agent: AcmeSwitch/7.2\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 312\r\n"
    b"\r\n"
    b"v=0\r\n"
    b"o=AcmeSwitch 1234567890 1234567890 IN IP4 192.0.2.10\r\n"
    b"s=SIP Call\r\n"
    b"c=IN IP4 192.0.2.20\r\n"
    b"t=0 0\r\n"
    b"m=audio 16384 RTP/AVP 0 8 18 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:18 G729/8000\r\n"
    b"a=fmtp:18 annexb=no\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\n"
    b"a=ptime:20\r\n"
    b"a=sendrecv\r\n"
    b"a=maxptime:40\r\n"
)

RINGING = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKcl1p.0a1b2c3d4e5f\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-524287-1---7a6b5c4d3e2f1a0b"
    b";rport=5060;received=192.0.2.10\r\n"
    b"Record-Route: <sip:203.0.113.5;lr>\r\n"
    b'From: "Acme Corp" <sip:+14045550100@192.0.2.10>;tag=8a7b6c5d\r\n'
    b"To: <sip:+12125550100@198.51.100.7;user=phone>;tag=as5e6f7a8b\r\n"
    b"Call-ID: 5f4e3d2c1b0a99887766554433221100@192.0.2.10\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:+12125550100@198.51.100.7:5060>\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

OK_200 = RINGING.replace(b"180 Ringing", b"200 OK").replace(
    b"Content-Length: 0\r\n\r\n",
    b"Content-Type: application/sdp\r\nContent-Length: 0\r\n\r\n",
)


def call_stream(calls: int, seed: int = 1) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """``calls`` distinct outbound calls as a switch and a carrier send them: the INVITEs, and
    the 180s and 200s that come back through the proxy (two Vias, Record-Route, To tag).

    Every call has its own Call-ID, tags, branches, numbers, SDP session and ports, so parse
    caches keyed by header text only hit on what really recurs between calls (the switch's
    and the carrier's addresses), as in production.
    """
    rng = random.Random(seed)
    invites: list[bytes] = []
    ringing: list[bytes] = []
    answers: list[bytes] = []
    for _ in range(calls):
        caller = f"+1{rng.randint(2000000000, 9999999999)}"
        callee = f"+1{rng.randint(2000000000, 9999999999)}"
        call_id = f"{rng.getrandbits(128):032x}@192.0.2.10"
        from_tag = f"{rng.getrandbits(32):08x}"
        to_tag = f"as{rng.getrandbits(32):08x}"
        switch_branch = f"z9hG4bK-{rng.randint(1, 999999)}-1---{rng.getrandbits(64):016x}"
        proxy_branch = f"z9hG4bKcip{rng.getrandbits(40):010x}.{rng.getrandbits(48):012x}"
        session = rng.randint(10**9, 4 * 10**9)
        sdp = (
            f"v=0\r\no=AcmeSwitch {session} {session} IN IP4 192.0.2.10\r\ns=SIP Call\r\n"
            f"c=IN IP4 192.0.2.20\r\nt=0 0\r\nm=audio {rng.randrange(16384, 32768, 2)} "
            "RTP/AVP 0 8 18 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\n"
            "a=sendrecv\r\na=maxptime:40\r\n"
        ).encode()
        from_ = f'"Acme Corp" <sip:{caller}@192.0.2.10>;tag={from_tag}'
        to = f"<sip:{callee}@198.51.100.7;user=phone>"
        invites.append(
            (
                f"INVITE sip:{callee}@198.51.100.7:5060;user=phone SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch={switch_branch};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: {from_}\r\n"
                f"To: {to}\r\n"
                f"Call-ID: {call_id}\r\n"
                "CSeq: 1 INVITE\r\n"
                f"Contact: <sip:{caller}@192.0.2.10:5060;transport=udp>\r\n"
                f"P-Asserted-Identity: <sip:{caller}@192.0.2.10;user=phone>\r\n"
                "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, INFO, REFER, NOTIFY\r\n"
                "Supported: 100rel, timer, replaces\r\n"
                "Session-Expires: 1800;refresher=uac\r\n"
                "User-Agent: AcmeSwitch/7.2\r\n"
                "Content-Type: application/sdp\r\n"
                f"Content-Length: {len(sdp)}\r\n\r\n"
            ).encode()
            + sdp
        )
        head = (
            f"Via: SIP/2.0/UDP 203.0.113.5:5060;branch={proxy_branch}\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch={switch_branch};rport=5060"
            ";received=192.0.2.10\r\n"
            "Record-Route: <sip:203.0.113.5;lr>\r\n"
            f"From: {from_}\r\n"
            f"To: {to};tag={to_tag}\r\n"
            f"Call-ID: {call_id}\r\n"
            "CSeq: 1 INVITE\r\n"
            f"Contact: <sip:{callee}@198.51.100.7:5060>\r\n"
        )
        ringing.append(f"SIP/2.0 180 Ringing\r\n{head}Content-Length: 0\r\n\r\n".encode())
        answers.append(
            f"SIP/2.0 200 OK\r\n{head}Content-Type: application/sdp\r\n"
            f"Content-Length: {len(sdp)}\r\n\r\n".encode()
            + sdp.replace(b"AcmeSwitch", b"Carrier").replace(b"192.0.2.20", b"198.51.100.20")
        )
    return invites, ringing, answers
