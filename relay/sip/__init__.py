"""The SIP stack: messages, URIs, transactions. Pure code: no sockets, no clock."""
