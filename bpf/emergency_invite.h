// clearip-inline-proxy: the emergency-INVITE parse that xdp_filter.c and reuseport.c share
// (both include this file; the loaders put this folder on bcc's include path).
//
// Rules of this file
// - One parse and one key layout for both programs, so one number list fills both
//   `emergency` maps. relay/policy/emergency.py normalises numbers the same way, and
//   clearip.bpf.steering.emergency_number reproduces this parse in Python: change them
//   together (tests/test_xdp_filter.py test_emergency_marking runs the cases through the XDP
//   filter, tests/test_reuseport.py through the Python model and the steering program).
// - No packet or map access here: each program reads the bytes itself, checked where it
//   reads them (XDP against data_end, the steering program against its copy's length), so
//   each verifier sees the check next to the read, and each program looks the key up in its
//   own map.
// - Only __always_inline functions of u8/u32/u64 (bcc's types), no loops: the callers own
//   the loop (its bound, NUMBER_SCAN, is constant).
//
// The parse: a datagram that starts with "INVITE sip:", "INVITE sips:" or "INVITE tel:"
// (scheme in any case), then a number: digits only, at most MAX_DIGITS, one leading '+' and
// the visual separators - . ( ) skipped; then '@', ';', ' ', '>' or '?', all within
// NUMBER_SCAN bytes after the scheme.

#ifndef CLEARIP_EMERGENCY_INVITE_H
#define CLEARIP_EMERGENCY_INVITE_H

#define MAX_DIGITS 15
#define INVITE_PREFIX 12  // bytes invite_number_at() reads: "INVITE sips:"
#define NUMBER_SCAN 24    // bytes after the scheme that the number and its end must fit in

// Up to 15 ASCII digits, zero-padded; byte i of the number is byte i of (lo, hi) on
// little-endian hosts. Built with shifts: the verifier refuses stack writes at a variable
// index. The key of both programs' `emergency` maps.
struct number_key {
    u64 lo;
    u64 hi;
};

// Where the number starts in a datagram whose first INVITE_PREFIX bytes are b[0] to b[11]:
// after "INVITE sip:" or "INVITE tel:" (11), after "INVITE sips:" (12); 0 when the datagram
// does not start like that.
static __always_inline u32 invite_number_at(const u8 *b) {
    if (b[0] != 'I' || b[1] != 'N' || b[2] != 'V' || b[3] != 'I' || b[4] != 'T' || b[5] != 'E' ||
        b[6] != ' ')
        return 0;
    // URI schemes are case-insensitive (RFC 3261 19.1.4): compare with the ASCII case bit set.
    u8 s0 = b[7] | 0x20, s1 = b[8] | 0x20, s2 = b[9] | 0x20, s3 = b[10] | 0x20;
    if (s0 == 's' && s1 == 'i' && s2 == 'p' && b[10] == ':')
        return 11;
    if (s0 == 's' && s1 == 'i' && s2 == 'p' && s3 == 's' && b[11] == ':')
        return 12;
    if (s0 == 't' && s1 == 'e' && s2 == 'l' && b[10] == ':')
        return 11;
    return 0;
}

#define NUMBER_MORE 0  // go on with the next byte
#define NUMBER_END 1   // the number ended here: look its key up
#define NUMBER_BAD 2   // not an emergency-number shape

// Byte i (from 0) after the scheme: a digit goes into *key (*digits so far), a '+' first or a
// separator is skipped; NUMBER_END at the byte after a number, NUMBER_BAD otherwise.
static __always_inline int number_byte(struct number_key *key, u32 *digits, u8 c, int i) {
    if (c >= '0' && c <= '9') {
        if (*digits >= MAX_DIGITS)
            return NUMBER_BAD;
        if (*digits < 8)
            key->lo |= (u64)c << (*digits * 8);
        else
            key->hi |= (u64)c << ((*digits - 8) * 8);
        *digits += 1;
        return NUMBER_MORE;
    }
    if (c == '+' && i == 0)
        return NUMBER_MORE;
    if (c == '-' || c == '.' || c == '(' || c == ')')
        return NUMBER_MORE;
    if (c == '@' || c == ';' || c == ' ' || c == '>' || c == '?')
        return *digits ? NUMBER_END : NUMBER_BAD;
    return NUMBER_BAD;
}

#endif
