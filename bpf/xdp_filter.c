// clearip-inline-proxy: XDP edge filter, compiled and loaded through bcc.
//
// Rules of this file
// - Only UAPI headers, so any installed kernel headers will do.
// - Every packet access is bounds-checked against data_end before it happens; loops have
//   constant bounds so the verifier can unroll them.
// - Maps are pinned under PIN_DIR: a daemon restart or upgrade loads a new program that reuses
//   the same maps, and the old program stays attached until the new one replaces it, so the
//   host is never unprotected.
//
// What it does
// - SIP (a UDP or TCP destination port in sip_udp_ports / sip_tcp_ports) from a source that is
//   not in the trust list (LPM tries trust_v4 / trust_v6) is dropped and counted; the source
//   goes into the bounded LRU map `dropped` (top offenders).
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
//   - . ( ) skipped, as relay/emergency.py normalises) and then '@', ';', ' ', '>' or '?' gets
//   DSCP EF (46) in the IPv4 TOS (checksum fixed incrementally, ECN bits kept) or the IPv6
//   traffic class (ECN bits kept), and is counted. Only the first fragment of a fragmented
//   INVITE is marked; the reassembled datagram carries the first fragment's TOS.
//   The relay reads the mark with IP_RECVTOS / IPV6_RECVTCLASS and handles it first.
// - Counters: `counters` (per-CPU array, one slot per outcome) and `iface_counters` (per-CPU
//   hash: ingress ifindex -> one slot per outcome) for the per-interface view.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/clearip"
#endif

#define COUNTER_PASSED_TRUSTED 0
#define COUNTER_DROPPED_UNTRUSTED 1
#define COUNTER_PASSED_NON_SIP 2
#define COUNTER_EMERGENCY_MARKED 3
#define COUNTER_PARSE_GIVEUP 4
#define COUNTERS 5

#define MAX_DIGITS 15
#define DSCP_EF 46

struct lpm_v4 {
    u32 prefixlen;
    u32 addr;
};

struct lpm_v6 {
    u32 prefixlen;
    u8 addr[16];
};

// Up to 15 ASCII digits, zero-padded; byte i of the number is byte i of (lo, hi) on the
// little-endian hosts XDP runs on. Built with shifts: the verifier refuses stack writes at a
// variable index.
struct number_key {
    u64 lo;
    u64 hi;
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

struct outcome_counts {
    u64 outcome[COUNTERS];
};

BPF_TABLE_PINNED("lpm_trie", struct lpm_v4, u8, trust_v4, 65536, PIN_DIR "/trust_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6, u8, trust_v6, 65536, PIN_DIR "/trust_v6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u16, u8, sip_udp_ports, 64, PIN_DIR "/sip_udp_ports");
BPF_TABLE_PINNED("hash", u16, u8, sip_tcp_ports, 64, PIN_DIR "/sip_tcp_ports");
BPF_TABLE_PINNED("hash", struct number_key, u8, emergency, 256, PIN_DIR "/emergency");
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, COUNTERS, PIN_DIR "/counters");
BPF_TABLE_PINNED("lru_hash", struct source_key, u64, dropped, 4096, PIN_DIR "/dropped");
BPF_TABLE_PINNED("lru_hash", struct frag_key, u8, frag_dropped, 4096, PIN_DIR "/frag_dropped");
BPF_TABLE_PINNED("percpu_hash", u32, struct outcome_counts, iface_counters, 256,
                 PIN_DIR "/iface_counters");

static __always_inline int count_on(struct xdp_md *ctx, u32 index, int action) {
    u64 *value = counters.lookup(&index);
    if (value)
        *value += 1;
    u32 ifindex = ctx->ingress_ifindex;
    struct outcome_counts *per_iface = iface_counters.lookup(&ifindex);
    if (!per_iface) {
        struct outcome_counts zero = {};
        iface_counters.update(&ifindex, &zero);
        per_iface = iface_counters.lookup(&ifindex);
    }
    if (per_iface && index < COUNTERS)
        per_iface->outcome[index] += 1;
    return action;
}

#define count(index, action) count_on(ctx, (index), (action))

static __always_inline void note_dropped(struct source_key *key) {
    u64 one = 1;
    u64 *value = dropped.lookup(key);
    if (value)
        __sync_fetch_and_add(value, 1);
    else
        dropped.update(key, &one);
}

static __always_inline int is_sip_port(u8 protocol, __be16 port) {
    u16 host_port = ntohs(port);
    if (protocol == IPPROTO_UDP)
        return sip_udp_ports.lookup(&host_port) != NULL;
    return sip_tcp_ports.lookup(&host_port) != NULL;
}

// 1 when the UDP payload is an INVITE to an emergency number.
static __always_inline int is_emergency_invite(u8 *payload, void *end) {
    // "INVITE " + scheme (at most "sips:") + number with separators.
    if ((void *)(payload + 12) > end)
        return 0;
    if (payload[0] != 'I' || payload[1] != 'N' || payload[2] != 'V' || payload[3] != 'I' ||
        payload[4] != 'T' || payload[5] != 'E' || payload[6] != ' ')
        return 0;
    // URI schemes are case-insensitive (RFC 3261 19.1.4): compare with the ASCII case bit set.
    u8 s0 = payload[7] | 0x20, s1 = payload[8] | 0x20, s2 = payload[9] | 0x20;
    u8 s3 = payload[10] | 0x20;
    u32 offset;
    if (s0 == 's' && s1 == 'i' && s2 == 'p' && payload[10] == ':')
        offset = 11;
    else if (s0 == 's' && s1 == 'i' && s2 == 'p' && s3 == 's' && payload[11] == ':')
        offset = 12;
    else if (s0 == 't' && s1 == 'e' && s2 == 'l' && payload[10] == ':')
        offset = 11;
    else
        return 0;

    struct number_key key = {};
    u32 digits = 0;
    int ended = 0;
#pragma unroll
    for (int i = 0; i < 24; i++) {
        u8 *p = payload + offset + i;
        if ((void *)(p + 1) > end)
            return 0;
        u8 c = *p;
        if (c >= '0' && c <= '9') {
            if (digits >= MAX_DIGITS)
                return 0;
            if (digits < 8)
                key.lo |= (u64)c << (digits * 8);
            else
                key.hi |= (u64)c << ((digits - 8) * 8);
            digits++;
            continue;
        }
        if (c == '+' && i == 0)
            continue;
        if (c == '-' || c == '.' || c == '(' || c == ')')
            continue;
        if (c == '@' || c == ';' || c == ' ' || c == '>' || c == '?') {
            ended = 1;
            break;
        }
        return 0;
    }
    if (!ended || digits == 0)
        return 0;
    return emergency.lookup(&key) != NULL;
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

int xdp_filter(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return count(COUNTER_PARSE_GIVEUP, XDP_PASS);

    u16 proto = eth->h_proto;
    void *cursor = eth + 1;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto == htons(ETH_P_8021Q) || proto == htons(ETH_P_8021AD)) {
            struct vlan_hdr *vlan = cursor;
            if ((void *)(vlan + 1) > end)
                return count(COUNTER_PARSE_GIVEUP, XDP_PASS);
            proto = vlan->proto;
            cursor = vlan + 1;
        }
    }

    struct source_key source = {};
    struct frag_key first_fragment = {};
    u8 l4_protocol;
    void *l4;
    int trusted;
    struct iphdr *ip = NULL;
    struct ipv6hdr *ip6 = NULL;

    if (proto == htons(ETH_P_IP)) {
        ip = cursor;
        if ((void *)(ip + 1) > end)
            return count(COUNTER_PARSE_GIVEUP, XDP_PASS);
        u32 header_length = ip->ihl * 4;
        if (header_length < sizeof(*ip) || cursor + header_length > end)
            return count(COUNTER_PARSE_GIVEUP, XDP_PASS);
        l4_protocol = ip->protocol;
        if (l4_protocol != IPPROTO_UDP && l4_protocol != IPPROTO_TCP)
            return count(COUNTER_PASSED_NON_SIP, XDP_PASS);
        struct lpm_v4 key = {.prefixlen = 32, .addr = ip->saddr};
        trusted = trust_v4.lookup(&key) != NULL;
        source.family = 4;
        __builtin_memcpy(source.addr, &ip->saddr, 4);
        struct frag_key frag = {
            .saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .protocol = l4_protocol};
        if (ip->frag_off & htons(0x1fff)) {
            // A later fragment: no ports to look at (see the header comment).
            if (trusted)
                return count(COUNTER_PASSED_TRUSTED, XDP_PASS);
            if (frag_dropped.lookup(&frag)) {
                note_dropped(&source);
                return count(COUNTER_DROPPED_UNTRUSTED, XDP_DROP);
            }
            return count(COUNTER_PARSE_GIVEUP, XDP_PASS);
        }
        if (ip->frag_off & htons(0x2000))
            first_fragment = frag;  // more fragments follow: remember it if dropped
        l4 = cursor + header_length;
    } else if (proto == htons(ETH_P_IPV6)) {
        ip6 = cursor;
        if ((void *)(ip6 + 1) > end)
            return count(COUNTER_PARSE_GIVEUP, XDP_PASS);
        l4_protocol = ip6->nexthdr;
        if (l4_protocol != IPPROTO_UDP && l4_protocol != IPPROTO_TCP) {
            if (l4_protocol == 58)  // ICMPv6: neighbour discovery must flow
                return count(COUNTER_PASSED_NON_SIP, XDP_PASS);
            return count(COUNTER_PARSE_GIVEUP, XDP_PASS);
        }
        struct lpm_v6 key = {.prefixlen = 128};
        __builtin_memcpy(key.addr, &ip6->saddr, 16);
        trusted = trust_v6.lookup(&key) != NULL;
        source.family = 6;
        __builtin_memcpy(source.addr, &ip6->saddr, 16);
        l4 = ip6 + 1;
    } else {
        return count(COUNTER_PASSED_NON_SIP, XDP_PASS);
    }

    __be16 dport;
    u8 *payload = NULL;
    if (l4_protocol == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > end)
            return count(COUNTER_PARSE_GIVEUP, XDP_PASS);
        dport = udp->dest;
        payload = (u8 *)(udp + 1);
    } else {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > end)
            return count(COUNTER_PARSE_GIVEUP, XDP_PASS);
        dport = tcp->dest;
    }
    if (!is_sip_port(l4_protocol, dport))
        return count(COUNTER_PASSED_NON_SIP, XDP_PASS);
    if (!trusted) {
        note_dropped(&source);
        if (first_fragment.protocol) {
            u8 one = 1;
            frag_dropped.update(&first_fragment, &one);
        }
        return count(COUNTER_DROPPED_UNTRUSTED, XDP_DROP);
    }
    if (payload && is_emergency_invite(payload, end)) {
        if (ip)
            mark_ipv4_ef(ip);
        else if (ip6)
            mark_ipv6_ef(ip6);
        count(COUNTER_EMERGENCY_MARKED, XDP_PASS);
    }
    return count(COUNTER_PASSED_TRUSTED, XDP_PASS);
}
