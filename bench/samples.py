"""Typical messages of an outbound call, as a switch and a carrier send them."""

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
