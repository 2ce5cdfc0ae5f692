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
// - IPv4 fragments: the first fragment carries the ports and is filtered as usual; later
//   fragments have no ports, so they are dropped when their source is untrusted and passed
//   when it is trusted (the kernel reassembles them for the relay).
// - Emergency marking: a UDP datagram to a SIP port from a trusted source that starts with
//   "INVITE sip:", "INVITE sips:" or "INVITE tel:" followed by a number in the `emergency`
//   map (digits only, at most 15; '+' and visual separators - . ( ) skipped) gets DSCP EF (46)
//   in the IPv4 TOS (checksum fixed incrementally) or IPv6 traffic class, and is counted.
//   The relay reads the mark with IP_RECVTOS / IPV6_RECVTCLASS and handles it first.

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

BPF_TABLE_PINNED("lpm_trie", struct lpm_v4, u8, trust_v4, 65536, PIN_DIR "/trust_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6, u8, trust_v6, 65536, PIN_DIR "/trust_v6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u16, u8, sip_udp_ports, 64, PIN_DIR "/sip_udp_ports");
BPF_TABLE_PINNED("hash", u16, u8, sip_tcp_ports, 64, PIN_DIR "/sip_tcp_ports");
BPF_TABLE_PINNED("hash", struct number_key, u8, emergency, 256, PIN_DIR "/emergency");
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, COUNTERS, PIN_DIR "/counters");
BPF_TABLE_PINNED("lru_hash", struct source_key, u64, dropped, 4096, PIN_DIR "/dropped");

static __always_inline int count(u32 index, int action) {
    u64 *value = counters.lookup(&index);
    if (value)
        *value += 1;
    return action;
}

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
    u32 offset;
    if (payload[7] == 's' && payload[8] == 'i' && payload[9] == 'p' && payload[10] == ':')
        offset = 11;
    else if (payload[7] == 's' && payload[8] == 'i' && payload[9] == 'p' && payload[10] == 's' &&
             payload[11] == ':')
        offset = 12;
    else if (payload[7] == 't' && payload[8] == 'e' && payload[9] == 'l' && payload[10] == ':')
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
        if (c == '+' || c == '-' || c == '.' || c == '(' || c == ')')
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
    u8 tclass = DSCP_EF << 2;
    ip6->priority = tclass >> 4;
    ip6->flow_lbl[0] = (u8)((tclass & 0x0f) << 4) | (ip6->flow_lbl[0] & 0x0f);
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
        if (ip->frag_off & htons(0x1fff)) {
            // A later fragment: no ports to look at.
            if (trusted)
                return count(COUNTER_PASSED_TRUSTED, XDP_PASS);
            note_dropped(&source);
            return count(COUNTER_DROPPED_UNTRUSTED, XDP_DROP);
        }
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
