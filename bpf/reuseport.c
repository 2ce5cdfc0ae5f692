// clearip-inline-proxy: steers each SIP datagram to the worker process that owns its call,
// an SO_REUSEPORT selector (BPF_PROG_TYPE_SK_REUSEPORT) compiled and loaded through bcc.
//
// Rules of this file
// - Only UAPI headers, so any installed kernel headers will do.
// - The datagram is copied (bpf_skb_load_bytes) into a per-CPU scratch buffer, so the
//   linear/paged split of the skb does not matter and the 512-byte stack is not used for it.
//   Every read of the copy is below the copied length `n`, never in stale bytes of an earlier
//   datagram, and below the buffer size, so the verifier can prove it.
// - Loops have constant bounds; the long ones are bounded loops (kernel 5.3+), not unrolled;
//   no bpf_loop (bcc cannot use it), so RHEL 9's 5.14 verifier meets nothing newer.
// - The verifier walks every iteration of a bounded loop and keeps the other side of each
//   branch pending, giving up past 8,192 pending states: the header scan therefore reads 8
//   bytes at a time with branch-free tests (may_be_call_id) and two branches per step.
// - Where a loop can stop at any of many positions, the position (and the length `n`) goes
//   through the scratch map and is read back with a volatile load (FORGET): the verifier then
//   sees one unknown, bounded value instead of one constant per stop and checks the code
//   after the loop once. The whole program verifies in about 206,000 of the 1,000,000
//   instructions the verifier allows (Linux 6.x; verified_insns in the loader).
// - The sockets map (REUSEPORT_SOCKARRAY) is created and pinned by the loader (bcc has no
//   declaration for that map type) and reaches this program as a map fd (SOCKS_FD). It and
//   `config` keep their layout for good and are pinned in PIN_DIR, where worker processes
//   find them; `emergency` and `counters` are pinned in MAPS_DIR, one per program text, so an
//   upgrade that changes them gets fresh maps. A restarted loader reuses all of them.
// - clearip.bpf.steering reproduces every decision of this file in pure Python, constants
//   included: change both together (tests/test_reuseport.py compares them).
//
// What it does
// - Finds the Call-ID: a line start (the byte after a LF, so CRLF lines match) with the name
//   `Call-ID` (any case) or its compact form `i`/`I`, then up to MAX_SPACE spaces/tabs, a
//   colon, up to MAX_SPACE spaces/tabs, then the value: the bytes up to CR, LF, space, tab or
//   the datagram's end. The first line that starts like the name decides ("Call-ID" then
//   anything, or "i" then space, tab or colon): if the rest does not follow, the datagram
//   falls back. The request/status line cannot match (no LF before it). A folded header
//   (value on a continuation line) is not followed.
// - Hashes the first MAX_VALUE bytes of the value with FNV-1a (32 bits) and selects slot
//   `hash % workers` of `socks`: the normal socket of the owning worker. `workers` comes from
//   the one-slot `config` array, set by the loader.
// - Emergency queue: a datagram that starts with "INVITE sip:", "INVITE sips:" or "INVITE tel:"
//   (scheme in any case) followed by a number in the `emergency` map (digits only, at most
//   15, one leading '+' and the visual separators - . ( ) skipped; then '@', ';', ' ', '>' or
//   '?'; the parse and key layout of emergency_invite.h, which xdp_filter.c uses too, so one
//   number list fills both maps) goes to slot `workers + hash % workers`: the emergency
//   socket of the same owner. If that slot is empty it goes to the owner's normal socket
//   (counted emergency_to_normal).
//
// Limits
// - The LF before the header name must be within the first WINDOW (1,400) bytes of the UDP
//   payload; the name, whitespace and value must be in the first COPY bytes (WINDOW plus room
//   for the longest header line this file reads), which always holds when the LF is in WINDOW.
// - Values longer than MAX_VALUE (128) bytes are hashed on their first 128 bytes only.
// - At most MAX_WORKERS (128) workers: `socks` has 2 * MAX_WORKERS slots.
//
// Fallbacks (SK_PASS without a selection: the kernel's own 4-tuple hash picks a socket of the
// group, which may be any worker's normal or emergency socket; nothing is dropped)
// - fallback_no_callid: no Call-ID line in the window, a malformed one, an empty value, a
//   datagram that is not SIP (keep-alives, garbage), or not UDP.
// - fallback_empty_slot: the chosen slot holds no socket (its worker is restarting: the kernel
//   removes a socket from `socks` when it closes) or `workers` is not set.
// Every datagram is counted once, in exactly one of the COUNTERS slots.
//
// Cost (bench/reuseport.py, this machine): about 0.7 us per datagram with the Call-ID 200
// bytes in, 1.1 us when the whole window is scanned (no Call-ID, or one after 1,000 bytes),
// spent in the receiving softirq.
//
// What could not be tested here
// - Developed and tested on Linux 6.1 headers / 6.x kernel, x86_64 only. RHEL 9's 5.14
//   verifier has bounded loops and bpf_sk_select_reuseport but has not seen this program; it
//   prunes less well than 6.x, so the instruction count there may be higher. If it refuses the
//   program, the loader says so (SteeringUnavailable) and the workers share the group through
//   the kernel's own hash (no steering). Big-endian hosts (s390x) use the byte-swapped word
//   below, untested.

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "emergency_invite.h"  // struct number_key, the INVITE parse (shared with xdp_filter.c)

#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/clearip-reuseport"
#endif
#ifndef MAPS_DIR
#define MAPS_DIR PIN_DIR "/maps"
#endif
#ifndef SOCKS_FD
#error "SOCKS_FD: the fd of the REUSEPORT_SOCKARRAY map (the loader defines it)"
#endif

#define COUNTER_STEERED 0
#define COUNTER_FALLBACK_NO_CALLID 1
#define COUNTER_FALLBACK_EMPTY_SLOT 2
#define COUNTER_EMERGENCY_STEERED 3
#define COUNTER_EMERGENCY_TO_NORMAL 4
#define COUNTERS 5

#define UDP_HEADER 8
#define WINDOW 1400
#define NAME 8  // "\ncall-id": the LF and the long name, compared as one 64-bit word
#define MAX_SPACE 8
#define MAX_VALUE 128
#define COPY (WINDOW + NAME + MAX_SPACE + 1 + MAX_SPACE + MAX_VALUE)
#define BUF 2048  // a power of two above COPY + 7 (the scratch buffer; see steer())
#define MAX_WORKERS 128

#define FNV_OFFSET 0x811c9dc5u
#define FNV_PRIME 0x01000193u

// "\ncall-id" as a 64-bit load sees it, and the case bit of its letters (not of the LF and
// the '-': '\r' | 0x20 would be '-').
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define CALL_ID_WORD 0x64692d6c6c61630aULL
#define CALL_ID_FOLD 0x2020002020202000ULL
#else
#define CALL_ID_WORD 0x0a63616c6c2d6964ULL
#define CALL_ID_FOLD 0x0020202020002020ULL
#endif

struct steering_config {
    u32 workers;
};

struct scratch {
    u8 buf[BUF];  // the payload's first COPY bytes at most
    u32 n;        // how many were copied
    u32 at;       // a position handed from one step to the next (FORGET)
};

BPF_TABLE_PINNED("array", u32, struct steering_config, config, 1, PIN_DIR "/config");
BPF_TABLE_PINNED("hash", struct number_key, u8, emergency, 256, MAPS_DIR "/emergency");
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, COUNTERS, MAPS_DIR "/counters");
BPF_PERCPU_ARRAY(scratch_space, struct scratch, 1);

#define SOCKS ((void *)bpf_pseudo_fd(1, SOCKS_FD))

static __always_inline int count(u32 index) {
    u64 *value = counters.lookup(&index);
    if (value)
        *value += 1;
    return SK_PASS;
}

static __always_inline int is_space(u8 c) {
    return c == ' ' || c == '\t';
}

// Hides a value from the compiler, so it cannot turn the arithmetic below back into
// comparisons and branches.
#define OPAQUE(v) asm volatile("" : "+r"(v))

// 1 when v != 0, without a branch.
static __always_inline u64 nonzero(u64 v) {
    u64 minus = 0 - v;
    OPAQUE(minus);
    return (v | minus) >> 63;
}

// 1 when a header line that may be the Call-ID starts at offset i (the LF before it):
// "\ncall-id" in any case, or "\ni" / "\nI" followed by ':', space or tab.
static __always_inline u64 may_be_call_id(u64 word) {
    u64 long_form = (word | CALL_ID_FOLD) ^ CALL_ID_WORD;
    u64 compact = ((word | 0x2000) & 0xffff) ^ ('\n' | ('i' << 8));
    u64 third = (word >> 16) & 0xff;
    u64 separator = (third ^ ':') * (third ^ ' ') * (third ^ '\t');  // 0: one of them
    return 1 ^ (nonzero(long_form) & nonzero(compact | separator));
}

// 1 when the scan finds a line that may be the Call-ID; s->at is then its LF's offset.
// Eight bytes at a time: a word without a LF (most of them) costs a few instructions; a word
// with one has its eight positions tried in order (may_be_call_id checks the LF itself).
// On the bench a byte-by-byte scan cost 4.6 us per datagram for a full window, this 1.1 us.
static __always_inline int find_call_id_line(struct scratch *s, u32 n) {
#pragma clang loop unroll(disable)
    for (u32 w = 0; w < WINDOW; w += 8) {
        if (w + NAME > n)
            return 0;
        // Nonzero when one of the eight bytes is a LF (the SWAR zero-byte test on word ^ LFs).
        u64 x = *(u64 *)(s->buf + w) ^ 0x0a0a0a0a0a0a0a0aULL;
        u64 lf = (x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL;
        if (lf == 0)
            continue;
#pragma unroll
        for (u32 k = 0; k < 8; k++) {
            u32 p = w + k;
            if (p + NAME > n)
                return 0;
            if (may_be_call_id(*(u64 *)(s->buf + p))) {
                s->at = p;
                return 1;
            }
        }
    }
    return 0;
}

// Stores `value` in the scratch map and reads it back: the verifier then knows only the
// bound checked here, so every way of reaching this point leaves the same state and the code
// after it is verified once (see the rules above).
#define FORGET(s, value, bound)                      \
    do {                                             \
        (s)->at = (value);                           \
        (value) = *(volatile u32 *)&(s)->at;         \
        n = *(volatile u32 *)&(s)->n;                \
        if ((value) > (bound) || n > COPY)           \
            return 0;                                \
    } while (0)

// After the LF of a candidate line: the name, spaces, ':', spaces, the value. 1 with the
// value's hash in *hash, 0 when the line is not a usable Call-ID.
static __always_inline int hash_value(struct scratch *s, u32 *hash) {
    u32 n = *(volatile u32 *)&s->n;
    u32 at = *(volatile u32 *)&s->at;
    if (n > COPY || at >= WINDOW)
        return 0;
    // The long name if its letters match, else the compact one (may_be_call_id said so).
    if ((*(u64 *)(s->buf + at) | CALL_ID_FOLD) == CALL_ID_WORD)
        at += NAME;
    else
        at += 2;
    FORGET(s, at, WINDOW + NAME);
#pragma clang loop unroll(disable)
    for (int k = 0; k < MAX_SPACE; k++) {
        if (at >= n || !is_space(s->buf[at]))
            break;
        at++;
    }
    FORGET(s, at, WINDOW + NAME + MAX_SPACE);
    if (at >= n || s->buf[at] != ':')
        return 0;
    at++;
#pragma clang loop unroll(disable)
    for (int k = 0; k < MAX_SPACE; k++) {
        if (at >= n || !is_space(s->buf[at]))
            break;
        at++;
    }
    FORGET(s, at, WINDOW + NAME + MAX_SPACE + 1 + MAX_SPACE);
    u32 h = FNV_OFFSET;
    u32 length = 0;
#pragma clang loop unroll(disable)
    for (u32 k = 0; k < MAX_VALUE; k++) {
        u32 p = at + k;
        if (p >= n)
            break;
        u8 c = s->buf[p];
        if (c == '\r' || c == '\n' || is_space(c))
            break;
        h = (h ^ c) * FNV_PRIME;
        length++;
    }
    *hash = h;
    return length > 0;
}

// 1 when the datagram is an INVITE to an emergency number (emergency_invite.h's parse, the
// same as xdp_filter.c's), read from the copy below its length n.
static __always_inline int is_emergency_invite(struct scratch *s, u32 n) {
    struct number_key key = {};
    u32 digits = 0;
    int step = NUMBER_MORE;
    if (n < INVITE_PREFIX)
        return 0;
    u32 offset = invite_number_at(s->buf);
    if (!offset)
        return 0;
#pragma unroll
    for (int i = 0; i < NUMBER_SCAN; i++) {
        u32 p = offset + i;
        if (p >= n)
            return 0;
        step = number_byte(&key, &digits, s->buf[p], i);
        if (step != NUMBER_MORE)
            break;
    }
    return step == NUMBER_END && emergency.lookup(&key) != NULL;
}

static __always_inline int select_slot(struct sk_reuseport_md *md, u32 slot) {
    return bpf_sk_select_reuseport(md, SOCKS, &slot, 0) == 0;
}

int steer(struct sk_reuseport_md *md) {
    u32 zero = 0;
    struct scratch *s = scratch_space.lookup(&zero);
    if (!s)
        return SK_PASS;
    if (md->ip_protocol != IPPROTO_UDP || md->len <= UDP_HEADER)
        return count(COUNTER_FALLBACK_NO_CALLID);
    u32 n = md->len - UDP_HEADER;
    if (n > COPY)
        n = COPY;
    // Bounds the verifier can see on the register passed (clang clamps copies otherwise):
    // unchanged for 1..COPY, and 1..BUF whatever the compiler did before the barrier.
    OPAQUE(n);
    n = ((n - 1) & (BUF - 1)) + 1;
    if (bpf_skb_load_bytes(md, UDP_HEADER, s->buf, n) < 0)
        return count(COUNTER_FALLBACK_NO_CALLID);
    s->n = n;

    u32 hash = 0;
    if (!find_call_id_line(s, n) || !hash_value(s, &hash))
        return count(COUNTER_FALLBACK_NO_CALLID);

    struct steering_config *cfg = config.lookup(&zero);
    u32 workers = cfg ? cfg->workers : 0;
    if (workers == 0 || workers > MAX_WORKERS)
        return count(COUNTER_FALLBACK_EMPTY_SLOT);
    u32 owner = hash % workers;
    n = *(volatile u32 *)&s->n;
    if (n <= COPY && is_emergency_invite(s, n)) {
        if (select_slot(md, workers + owner))
            return count(COUNTER_EMERGENCY_STEERED);
        if (select_slot(md, owner))
            return count(COUNTER_EMERGENCY_TO_NORMAL);
        return count(COUNTER_FALLBACK_EMPTY_SLOT);
    }
    if (select_slot(md, owner))
        return count(COUNTER_STEERED);
    return count(COUNTER_FALLBACK_EMPTY_SLOT);
}
