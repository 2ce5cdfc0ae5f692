// clearip-inline-proxy: XDP edge filter, compiled and loaded through bcc.
//
// Rules of this file
// - Only UAPI headers, so any installed kernel headers will do.
// - Every packet access is bounds-checked against data_end before it happens; loops have
//   constant bounds so the verifier can unroll them.
// - Maps are pinned under PIN_DIR: a daemon restart or upgrade loads a new program that reuses
//   the same maps, and the old program stays attached until the new one replaces it, so the
//   host is never unprotected.
// - The drop path (untrusted SIP) is what a flood exercises: on most packets it makes no
//   helper call at all, only array lookups the verifier inlines (see "Cost" below).
//
// What it does
// - SIP (a UDP or TCP destination port set in the `sip_ports` bitmap) from a source that is
//   not in the trust list (LPM tries trust_v4 / trust_v6) is dropped and counted. Its source
//   goes into the bounded LRU map `dropped` (top offenders) on a sample of the drops, with
//   the number of drops the sample stands for, so the counts there estimate packets.
// - Everything else passes untouched: non-IP frames, other ports (SSH, DNS), our own
//   connections' return traffic (it comes back to ephemeral ports).
// - IPv4 with options is parsed by IHL. IPv6 whose next header is not UDP/TCP (extension
//   headers) is passed up and counted as a parse give-up: the relay checks sources again.
// - IPv4 fragments: the first fragment (offset 0) carries the ports and is filtered as usual.
//   When it is dropped, its (source, destination, IP ID, protocol) goes into the LRU map
//   `frag_dropped`, and the later fragments of that datagram are dropped too. Other later
//   fragments cannot be matched to a port: from a trusted source they pass (counted
//   passed_trusted); from an untrusted one they pass counted as parse_giveup, because
//   dropping them all would break fragmented non-SIP traffic (large DNS answers) and a later
//   fragment whose first fragment never arrives cannot be reassembled into anything the relay
//   would see. A later fragment that overtakes its first fragment is passed the same way and
//   dies in reassembly once the first is dropped.
// - Emergency marking: a UDP datagram to a SIP port from a trusted source that starts with
//   "INVITE sip:", "INVITE sips:" or "INVITE tel:" (scheme in any case) followed by a number in
//   the `emergency` map (digits only, at most 15, one leading '+' and the visual separators
//   - . ( ) skipped, as relay/policy/emergency.py normalises) and then '@', ';', ' ', '>' or '?'
//   (the parse of emergency_invite.h, shared with reuseport.c) gets DSCP EF (46) in the IPv4
//   TOS (checksum fixed incrementally, ECN bits kept) or the IPv6 traffic class (ECN bits
//   kept), and is counted. Only the first fragment of a fragmented
//   INVITE is marked; the reassembled datagram carries the first fragment's TOS.
//   The relay reads the mark with IP_RECVTOS / IPV6_RECVTCLASS and handles it first.
// - Counters: `counters`, a per-CPU array with one slot per receiving interface (slot =
//   ifindex mod IFACE_SLOTS; the slot records its ifindex, and an interface whose slot another
//   one holds on that CPU is counted in the last slot, IFACE_OTHER), one count per outcome.
//   The totals are the sum over slots.
//
// Cost (BPF_PROG_TEST_RUN: python -m bench.xdp_cost). A helper call costs more than all the
// rest of the drop path on some hosts (kernels with return-thunk mitigations), so the drop
// path avoids them:
// - The port check comes before the trust check: non-SIP traffic never pays for it. Ports are
//   a bitmap in an array map (word = protocol * 1024 + port / 64), one inlined lookup (two
//   hash maps behind one call site, as before, could not be inlined).
// - IPv4 trust: `trust_v4_16`, a bitmap of the /16s any trusted prefix touches, answers
//   "untrusted" for most sources of a spoofed flood; the per-CPU slot remembers the verdict
//   for the last source, valid while `trust_generation` (bumped by the loader after every
//   change) is unchanged, which answers a flood from one source. Only the rest pays for the
//   LPM lookup. IPv6 always uses its LPM trie.
// - Counters are a per-CPU array (inlined lookup, no hashing, no insertion), looked up once
//   per packet.
// - `dropped` is a shared LRU hash whose updates (a hash lookup, and for a new source an
//   insertion that evicts under shared locks) cost more than everything else: it is updated on
//   one drop in SAMPLE per CPU and interface (spread by Fibonacci hashing of the drop count),
//   and a source not in it yet is inserted on one drop in INSERT_SAMPLE, so a spoofed flood
//   with a new source on every packet costs about what a fixed source does.
// - The source key and the fragment key are built only where they are used.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "emergency_invite.h"  // struct number_key, the INVITE parse (shared with reuseport.c)

#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/clearip"
#endif

#define COUNTER_PASSED_TRUSTED 0
#define COUNTER_DROPPED_UNTRUSTED 1
#define COUNTER_PASSED_NON_SIP 2
#define COUNTER_EMERGENCY_MARKED 3
#define COUNTER_PARSE_GIVEUP 4
#define COUNTERS 5

#define IFACE_SLOTS 256             // a power of two: slot = ifindex & (IFACE_SLOTS - 1)
#define IFACE_OTHER IFACE_SLOTS     // interfaces whose slot another interface holds
#define SAMPLE 64                   // one drop in SAMPLE updates `dropped`, adding SAMPLE
#define INSERT_SAMPLE (4 * SAMPLE)  // a source not in `dropped` yet: inserted on these only
#define SAMPLE_SHIFT 58             // 64 - log2(SAMPLE): a sample when the top 6 bits are 0
#define INSERT_SHIFT 56             // 64 - log2(INSERT_SAMPLE)
#define GOLDEN 0x9e3779b97f4a7c15ULL  // 2^64 / golden ratio
#define PORT_WORDS 1024             // 65536 ports / 64 bits, per protocol
#define PORTS_TCP PORT_WORDS        // TCP words follow the UDP words

#define DSCP_EF 46

struct lpm_v4 {
    u32 prefixlen;
    u32 addr;
};

struct lpm_v6 {
    u32 prefixlen;
    u8 addr[16];
};

struct source_key {
    u8 family;
    u8 pad[3];
    u8 addr[16];
};

struct vlan_hdr {
    __be16 tci;
    __be16 proto;
};

// A dropped first fragment, so its later fragments are dropped too.
struct frag_key {
    u32 saddr;
    u32 daddr;
    u16 id;
    u8 protocol;
    u8 pad;
};

// One interface's counts on one CPU (ifindex 0: the slot is free; no interface has index 0),
// and the trust verdict of the last IPv4 source seen there, valid while `trust_generation`
// still holds the generation it was looked up in.
struct iface_counts {
    u32 ifindex;
    __be32 last_source;
    u32 last_generation;
    u32 last_trusted;
    u64 outcome[COUNTERS];
};

BPF_TABLE_PINNED("lpm_trie", struct lpm_v4, u8, trust_v4, 65536, PIN_DIR "/trust_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6, u8, trust_v6, 65536, PIN_DIR "/trust_v6", BPF_F_NO_PREALLOC);
// Bit n: some trust_v4 entry covers part of the /16 n.0.0.0/16 (n = the top 16 bits).
BPF_TABLE_PINNED("array", u32, u64, trust_v4_16, 1024, PIN_DIR "/trust_v4_16");
// Bumped by the loader after every change to the trust maps; 0 until the first fill.
BPF_TABLE_PINNED("array", u32, u32, trust_generation, 1, PIN_DIR "/trust_generation");
BPF_TABLE_PINNED("array", u32, u64, sip_ports, 2 * PORT_WORDS, PIN_DIR "/sip_ports");
BPF_TABLE_PINNED("hash", struct number_key, u8, emergency, 256, PIN_DIR "/emergency");
BPF_TABLE_PINNED("percpu_array", u32, struct iface_counts, counters, IFACE_SLOTS + 1,
                 PIN_DIR "/counters");
BPF_TABLE_PINNED("lru_hash", struct source_key, u64, dropped, 4096, PIN_DIR "/dropped");
BPF_TABLE_PINNED("lru_hash", struct frag_key, u8, frag_dropped, 4096, PIN_DIR "/frag_dropped");

// This CPU's counts for the receiving interface (NULL only if the map were missing).
static __always_inline struct iface_counts *counts_for(struct xdp_md *ctx) {
    u32 ifindex = ctx->ingress_ifindex;
    u32 slot = ifindex & (IFACE_SLOTS - 1);
    struct iface_counts *counts = counters.lookup(&slot);
    if (!counts || counts->ifindex == ifindex)
        return counts;
    if (counts->ifindex == 0) {  // first packet of this interface on this CPU
        counts->ifindex = ifindex;
        return counts;
    }
    slot = IFACE_OTHER;
    return counters.lookup(&slot);
}

static __always_inline int count(struct iface_counts *counts, u32 index, int action) {
    if (index < COUNTERS)
        counts->outcome[index] += 1;
    return action;
}

// Count a drop; on one drop in SAMPLE add SAMPLE to the source's count in `dropped`. A source
// not there yet is inserted on one sample in INSERT_SAMPLE / SAMPLE only, with INSERT_SAMPLE:
// inserting evicts, which costs more than all the rest, and a spoofed flood brings a new
// source with every packet. Which drops are samples: the slot's drop count times the golden
// ratio (Fibonacci hashing), top bits zero. That is one multiplication, and no period in the
// traffic lines up with it (the sampled counts fall on every residue of any period), so no
// pattern can keep a source out of the samples. The first drop on a CPU and interface is
// noted too (counting 1), so a source that sent one packet can show up.
static __always_inline int drop(struct iface_counts *counts, struct iphdr *ip,
                                struct ipv6hdr *ip6) {
    u64 seen = counts->outcome[COUNTER_DROPPED_UNTRUSTED]++;
    u64 mix = seen * GOLDEN;
    if (mix >> SAMPLE_SHIFT)
        return XDP_DROP;
    struct source_key key = {};
    if (ip) {
        key.family = 4;
        __builtin_memcpy(key.addr, &ip->saddr, 4);
    } else if (ip6) {
        key.family = 6;
        __builtin_memcpy(key.addr, &ip6->saddr, 16);
    } else {
        return XDP_DROP;
    }
    u64 *value = dropped.lookup(&key);
    if (value) {
        __sync_fetch_and_add(value, seen ? SAMPLE : 1);
    } else if (!seen || (mix >> INSERT_SHIFT) == 0) {
        u64 estimate = seen ? INSERT_SAMPLE : 1;
        dropped.update(&key, &estimate);
    }
    return XDP_DROP;
}

static __always_inline int is_sip_port(u8 protocol, __be16 port) {
    u32 host_port = ntohs(port);
    u32 index = (host_port >> 6) + (protocol == IPPROTO_TCP ? PORTS_TCP : 0);
    u64 *word = sip_ports.lookup(&index);
    return word && ((*word >> (host_port & 63)) & 1);
}

static __always_inline int trusted_v4(__be32 saddr) {
    struct lpm_v4 key = {.prefixlen = 32, .addr = saddr};
    return trust_v4.lookup(&key) != NULL;
}

// The same, cheaper where possible: no trusted prefix in the source's /16 (the `trust_v4_16`
// bitmap: a spoofed flood's sources, mostly) means untrusted; the slot's last verdict answers
// when the source and the trust generation are the ones it was made for (a flood from one
// source); only the rest pays for the LPM lookup, a helper call.
static __always_inline int trusted_v4_fast(struct iface_counts *counts, __be32 saddr) {
    u32 top = ntohl(saddr) >> 16;
    u32 index = top >> 6;
    u64 *word = trust_v4_16.lookup(&index);
    if (word && !((*word >> (top & 63)) & 1))
        return 0;
    u32 zero = 0;
    u32 *generation = trust_generation.lookup(&zero);
    if (!generation || *generation == 0)
        return trusted_v4(saddr);
    u32 now = *generation;  // read before the lookup: a change after it bumps it again
    if (counts->last_source == saddr && counts->last_generation == now)
        return counts->last_trusted;
    int trusted = trusted_v4(saddr);
    counts->last_source = saddr;
    counts->last_generation = now;
    counts->last_trusted = trusted;
    return trusted;
}

static __always_inline int trusted_v6(struct ipv6hdr *ip6) {
    struct lpm_v6 key = {.prefixlen = 128};
    __builtin_memcpy(key.addr, &ip6->saddr, 16);
    return trust_v6.lookup(&key) != NULL;
}

static __always_inline struct frag_key fragment_of(struct iphdr *ip) {
    struct frag_key key = {
        .saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .protocol = ip->protocol};
    return key;
}

// A later IPv4 fragment: no ports to look at (see the header comment).
static __always_inline int later_fragment(struct iface_counts *counts, struct iphdr *ip) {
    if (trusted_v4(ip->saddr))
        return count(counts, COUNTER_PASSED_TRUSTED, XDP_PASS);
    struct frag_key key = fragment_of(ip);
    if (frag_dropped.lookup(&key))
        return drop(counts, ip, NULL);
    return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);
}

// 1 when the UDP payload is an INVITE to an emergency number (emergency_invite.h's parse,
// each byte checked against the packet's end before it is read).
static __always_inline int is_emergency_invite(u8 *payload, void *end) {
    if ((void *)(payload + INVITE_PREFIX) > end)
        return 0;
    u32 offset = invite_number_at(payload);
    if (!offset)
        return 0;
    struct number_key key = {};
    u32 digits = 0;
    int step = NUMBER_MORE;
#pragma unroll
    for (int i = 0; i < NUMBER_SCAN; i++) {
        u8 *p = payload + offset + i;
        if ((void *)(p + 1) > end)
            return 0;
        step = number_byte(&key, &digits, *p, i);
        if (step != NUMBER_MORE)
            break;
    }
    return step == NUMBER_END && emergency.lookup(&key) != NULL;
}

static __always_inline void mark_ipv4_ef(struct iphdr *ip) {
    // Incremental checksum update (RFC 1624) for the 16-bit word holding version/IHL and TOS.
    u16 old_word = *(u16 *)ip;
    ip->tos = (DSCP_EF << 2) | (ip->tos & 0x3);
    u16 new_word = *(u16 *)ip;
    u32 sum = (u16)~ntohs(ip->check) + (u16)~ntohs(old_word) + ntohs(new_word);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip->check = htons(~sum & 0xffff);
}

static __always_inline void mark_ipv6_ef(struct ipv6hdr *ip6) {
    // Traffic class = priority (its high nibble) : top nibble of flow_lbl[0] (its low
    // nibble, whose two low bits are ECN and stay as they are).
    u8 tclass = DSCP_EF << 2;
    ip6->priority = tclass >> 4;
    ip6->flow_lbl[0] = (u8)(((tclass & 0x0c) << 4) | (ip6->flow_lbl[0] & 0x3f));
}

// Ports, trust, verdict. Inlined once for IPv4 (ip6 NULL) and once for IPv6 (ip NULL), so
// each copy knows its family at compile time: the verifier cannot follow "exactly one of ip
// and ip6 is set" through one shared copy.
static __always_inline int filter_l4(struct iface_counts *counts, void *end, void *l4,
                                     u8 l4_protocol, struct iphdr *ip, struct ipv6hdr *ip6) {
    __be16 dport;
    u8 *payload = NULL;
    if (l4_protocol == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > end)
            return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);
        dport = udp->dest;
        payload = (u8 *)(udp + 1);
    } else {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > end)
            return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);
        dport = tcp->dest;
    }
    if (!is_sip_port(l4_protocol, dport))
        return count(counts, COUNTER_PASSED_NON_SIP, XDP_PASS);
    if (ip ? !trusted_v4_fast(counts, ip->saddr) : !trusted_v6(ip6)) {
        if (ip && (ip->frag_off & htons(0x2000))) {  // a first fragment: more follow
            struct frag_key key = fragment_of(ip);
            u8 one = 1;
            frag_dropped.update(&key, &one);
        }
        return drop(counts, ip, ip6);
    }
    if (payload && is_emergency_invite(payload, end)) {
        if (ip)
            mark_ipv4_ef(ip);
        else
            mark_ipv6_ef(ip6);
        count(counts, COUNTER_EMERGENCY_MARKED, XDP_PASS);
    }
    return count(counts, COUNTER_PASSED_TRUSTED, XDP_PASS);
}

int clearip_xdp(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct iface_counts *counts = counts_for(ctx);
    if (!counts)
        return XDP_PASS;  // cannot happen: the map has every slot
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);

    u16 proto = eth->h_proto;
    void *cursor = eth + 1;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto == htons(ETH_P_8021Q) || proto == htons(ETH_P_8021AD)) {
            struct vlan_hdr *vlan = cursor;
            if ((void *)(vlan + 1) > end)
                return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);
            proto = vlan->proto;
            cursor = vlan + 1;
        }
    }

    if (proto == htons(ETH_P_IP)) {
        struct iphdr *ip = cursor;
        if ((void *)(ip + 1) > end)
            return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);
        u32 header_length = ip->ihl * 4;
        if (header_length < sizeof(*ip) || cursor + header_length > end)
            return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);
        u8 l4_protocol = ip->protocol;
        if (l4_protocol != IPPROTO_UDP && l4_protocol != IPPROTO_TCP)
            return count(counts, COUNTER_PASSED_NON_SIP, XDP_PASS);
        if (ip->frag_off & htons(0x1fff))
            return later_fragment(counts, ip);
        return filter_l4(counts, end, cursor + header_length, l4_protocol, ip, NULL);
    }
    if (proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = cursor;
        if ((void *)(ip6 + 1) > end)
            return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);
        u8 l4_protocol = ip6->nexthdr;
        if (l4_protocol != IPPROTO_UDP && l4_protocol != IPPROTO_TCP) {
            if (l4_protocol == 58)  // ICMPv6: neighbour discovery must flow
                return count(counts, COUNTER_PASSED_NON_SIP, XDP_PASS);
            return count(counts, COUNTER_PARSE_GIVEUP, XDP_PASS);
        }
        return filter_l4(counts, end, ip6 + 1, l4_protocol, NULL, ip6);
    }
    return count(counts, COUNTER_PASSED_NON_SIP, XDP_PASS);
}
