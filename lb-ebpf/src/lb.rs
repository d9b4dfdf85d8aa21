//! The load balancer's decision for one packet: parse, find the VIP, choose
//! the backend, forward.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FAMILY_V4, FlowWords, GlobalConfig, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    STAT_DROP_MALFORMED_L4, STAT_DROP_NO_CONFIG, STAT_ERR_ICMP_INNER, STAT_ERR_L4_TRUNC,
    STAT_FRAGMENT, STAT_ICMP_NOT_OWN_FLOW, STAT_ICMP_PTB, STAT_PASS_MALFORMED, STAT_PASS_NOT_VIP,
    STAT_PASS_OTHER_HOST, STAT_REDIRECT, STAT_TX, VIP_F_FRAG_ALIAS, VIP_F_IPIP, VIP_INDEX_PROBES,
    VIP_INDEX_SLOTS, VipMeta, addr_words, flow_hash_words, vip_filter_bit_of_words, vip_index_half,
    vip_index_home_of, vip_index_probe, vip_index_salt,
};

use crate::{
    forward,
    maps::{
        CONFIG, VIP_INDEX, VIP_INDEX_LIVE, add_traffic, addressed_to_us, count, count_backend,
        count_in, counters, vip_filter_word,
    },
    outcome::{COUNTED, Outcome},
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_TYPE_OFF, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, L3, TcpHdr,
        addresses, parse_ipv4, parse_ipv6, parse_l2, ptr_at,
    },
    select::{self, Chosen, Conn},
};

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const UDP_HLEN: usize = 8;
/// ICMP "destination unreachable / fragmentation needed" (RFC 792, 1191).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 "packet too big" (RFC 4443).
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMP_HLEN: usize = 8;

#[inline(always)]
pub fn process(ctx: &XdpContext) -> Outcome {
    match try_process(ctx) {
        Ok(o) | Err(o) => o,
    }
}

#[inline(always)]
fn try_process(ctx: &XdpContext) -> Result<Outcome, Outcome> {
    if let Some(plain) = parse_plain_tcp4(ctx) {
        return plain_tcp4(ctx, &plain);
    }
    let l2 = parse_l2(ctx)?;
    // Each family gets its own copy of what follows: with the family known,
    // the compiler keeps the header fields in registers (a shared copy
    // merges them in a stack struct, written field by field and read back
    // in wider words, which stalls store-to-load forwarding).
    if l2.ethertype == ETH_P_IP {
        let l3 = parse_ipv4(ctx, l2.l3_off)?;
        for_l3::<false>(ctx, &l3)
    } else {
        let l3 = parse_ipv6(ctx, l2.l3_off)?;
        for_l3::<true>(ctx, &l3)
    }
}

/// The decision for a parsed IP packet (IPv6 when `V6`).
#[inline(always)]
fn for_l3<const V6: bool>(ctx: &XdpContext, l3: &L3) -> Result<Outcome, Outcome> {
    // The parser has checked that the header is in the packet.
    let (src, dst) = addresses::<V6>(ctx, l3).ok_or(Outcome::pass(STAT_PASS_MALFORMED))?;
    if !maybe_vip(&dst) {
        return Err(Outcome::pass(STAT_PASS_NOT_VIP));
    }
    if l3.fragment {
        return fragment(ctx, l3, src, dst);
    }
    match l3.proto {
        PROTO_TCP | PROTO_UDP => {}
        PROTO_ICMP | PROTO_ICMPV6 => return icmp(ctx, l3, &dst),
        _ => return Err(Outcome::pass(STAT_PASS_NOT_VIP)),
    }
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, l3.l4_off) else {
        return Err(malformed_l4(&dst, l3.proto, l3.family));
    };
    // SAFETY: bounds checked by ptr_at.
    let [sport, dport] = unsafe { *ports };
    let key = FlowWords::new(src, dst, sport, dport, l3.proto, l3.family);
    let syn = transport(ctx, l3).ok_or_else(|| bad_transport(&dst, dport, l3.proto, l3.family))?;
    flow(ctx, l3, &key, &dst, dport, syn)
}

/// The decision for a TCP or UDP packet of a VIP address (not a
/// fragment), its headers checked.
#[inline(always)]
fn flow(
    ctx: &XdpContext,
    l3: &L3,
    key: &FlowWords,
    dst: &[u64; 2],
    dport: u16,
    syn: bool,
) -> Result<Outcome, Outcome> {
    // Only frames sent to us are ours to forward (a frame flooded to us,
    // or broadcast, reaches its real receiver too).
    if !addressed_to_us(ctx) {
        return Err(Outcome::pass(STAT_PASS_OTHER_HOST));
    }
    // An established flow's entry names its backend, and the backend its
    // VIP: no VIP index lookup for such packets.
    let conn = Conn::find(key);
    if !syn && let Some(chosen) = conn.established(key) {
        return Ok(forward(ctx, l3, &chosen, key, None));
    }
    let meta = port_vip(dst, dport, l3.proto, l3.family).ok_or(Outcome::pass(STAT_PASS_NOT_VIP))?;
    let cfg = config()?;
    let chosen = conn.new_flow(&meta, key, cfg.hash_seed, syn)?;
    Ok(forward(ctx, l3, &chosen, key, Some(cfg)))
}

/// What [`parse_plain_tcp4`] read from a packet.
struct PlainTcp4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    ip_len: usize,
    tos: u8,
    syn: bool,
}

/// The most common layout read at constant offsets: untagged IPv4 without
/// options, not a fragment, and a whole TCP header (data offset ≥ 5).
/// Such a packet passes every check of the general parse, and
/// [`plain_tcp4`] decides it as [`for_l3`] would; `None` sends anything
/// else (and anything in doubt) through the general parse.
///
/// The general parse serves every layout, so it carries header offsets in
/// registers and spills them around the map lookups; on this layout it
/// cost ≈ 4 points of the live-frame ceiling (see the README benchmarks).
#[inline(always)]
fn parse_plain_tcp4(ctx: &XdpContext) -> Option<PlainTcp4> {
    const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
    // One bounds check for all three headers.
    ptr_at::<[u8; L4_OFF + size_of::<TcpHdr>()]>(ctx, 0)?;
    let data = ctx.data();
    // SAFETY: all three lie inside the range checked above; reads only.
    let (ethertype, ip, tcp) = unsafe {
        (
            (*((data + ETH_TYPE_OFF) as *const u16)),
            &*((data + ETH_HLEN) as *const Ipv4Hdr),
            &*((data + L4_OFF) as *const TcpHdr),
        )
    };
    let ip_len = u16::from_be(ip.tot_len) as usize;
    let plain = ethertype == ETH_P_IP.to_be()
        && ip.vihl == 0x45
        && ip.proto == PROTO_TCP
        && u16::from_be(ip.frag_off) & 0x3fff == 0
        && ip_len >= IPV4_HLEN
        && tcp.doff_res >> 4 >= 5;
    plain.then_some(PlainTcp4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: tcp.ports[0],
        dport: tcp.ports[1],
        ip_len,
        tos: ip.tos,
        syn: tcp.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN,
    })
}

/// [`for_l3`] for a packet that [`parse_plain_tcp4`] read.
#[inline(always)]
fn plain_tcp4(ctx: &XdpContext, p: &PlainTcp4) -> Result<Outcome, Outcome> {
    let dst = [u64::from(p.daddr), 0];
    if !maybe_vip(&dst) {
        return Err(Outcome::pass(STAT_PASS_NOT_VIP));
    }
    let l3 = L3 {
        family: FAMILY_V4,
        proto: PROTO_TCP,
        l3_off: ETH_HLEN,
        l4_off: ETH_HLEN + IPV4_HLEN,
        ip_len: p.ip_len,
        tos: p.tos,
        fragment: false,
    };
    let key = FlowWords::new(
        [u64::from(p.saddr), 0],
        dst,
        p.sport,
        p.dport,
        PROTO_TCP,
        FAMILY_V4,
    );
    flow(ctx, &l3, &key, &dst, p.dport, p.syn)
}

/// Checks the transport header past the ports: `Some(true)` for a TCP SYN
/// (without ACK), `Some(false)` for other TCP and for UDP, `None` for a
/// truncated header or a TCP data offset below 5.
#[inline(always)]
fn transport(ctx: &XdpContext, l3: &L3) -> Option<bool> {
    if l3.proto == PROTO_TCP {
        let hdr = ptr_at::<TcpHdr>(ctx, l3.l4_off)?;
        // SAFETY: bounds checked by ptr_at.
        let (doff, flags) = unsafe { ((*hdr).doff_res >> 4, (*hdr).flags) };
        if doff < 5 {
            return None;
        }
        Some(flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN)
    } else {
        ptr_at::<[u8; UDP_HLEN]>(ctx, l3.l4_off)?;
        Some(false)
    }
}

/// A broken transport header (past the ports): dropped and counted if the
/// packet is for a VIP, passed otherwise.
#[cold]
#[inline(never)]
fn bad_transport(dst: &[u64; 2], dport: u16, proto: u8, family: u8) -> Outcome {
    if port_vip(dst, dport, proto, family).is_some() {
        drop_l4()
    } else {
        Outcome::pass(STAT_PASS_NOT_VIP)
    }
}

/// The VIP address prefilter: false means "certainly not a VIP address".
#[inline(always)]
fn maybe_vip(addr: &[u64; 2]) -> bool {
    let (word, mask) = vip_filter_bit_of_words(addr);
    vip_filter_word(word) & mask != 0
}

/// The global config, read in place (only new flows and IP-in-IP read
/// fields of it).
#[inline(always)]
fn config() -> Result<&'static GlobalConfig, Outcome> {
    CONFIG.get(0).ok_or(Outcome::drop(STAT_DROP_NO_CONFIG))
}

/// The VIP on (address, port, protocol): [`find_vip`] without the fragment
/// aliases (port 0 is never a VIP port; an alias entry only routes
/// fragments).
#[inline(always)]
fn port_vip(addr: &[u64; 2], port: u16, proto: u8, family: u8) -> Option<VipMeta> {
    find_vip(addr, port, proto, family).filter(|meta| meta.flags & VIP_F_FRAG_ALIAS == 0)
}

/// The VIP entry of (address, port, protocol), from the live table of the
/// VIP index (inlined array reads; see `lb_common::vip_index`). The address
/// is in `addr_words` form, compared word by word with the slot's.
#[inline(always)]
fn find_vip(addr: &[u64; 2], port: u16, proto: u8, family: u8) -> Option<VipMeta> {
    let live = *VIP_INDEX_LIVE.get(0)?;
    let base = vip_index_half(live) * VIP_INDEX_SLOTS;
    let home = vip_index_home_of(addr, port, proto, family, vip_index_salt(live));
    for i in 0..VIP_INDEX_PROBES {
        let slot = VIP_INDEX.get(base + vip_index_probe(home, i))?;
        let k = &slot.key;
        if k.port == port && k.proto == proto && k.family == family && addr_words(&k.addr) == *addr
        {
            return Some(slot.meta);
        }
        if k.family == 0 {
            return None;
        }
    }
    None
}

/// VIP traffic with a broken transport header is dropped; anything else
/// is passed. Without ports, "is it VIP traffic" means "is there a VIP on
/// this address and protocol", which the fragment alias answers.
#[cold]
#[inline(never)]
fn malformed_l4(dst: &[u64; 2], proto: u8, family: u8) -> Outcome {
    count(STAT_ERR_L4_TRUNC);
    if find_vip(dst, 0, proto, family).is_some() {
        Outcome::drop(STAT_DROP_MALFORMED_L4)
    } else {
        Outcome::pass(STAT_PASS_MALFORMED)
    }
}

#[inline(always)]
fn drop_l4() -> Outcome {
    count(STAT_ERR_L4_TRUNC);
    Outcome::drop(STAT_DROP_MALFORMED_L4)
}

/// Every fragment of a datagram (the first one included) goes to the
/// backend chosen by hashing addresses and protocol only, through the VIP
/// that the (address, protocol) fragment alias names. Fragments do not use
/// or create connection entries, and are not new flows.
///
/// The protocol is the IPv4 header's, or the IPv6 Fragment header's Next
/// Header, the same in every fragment (the parser stops at the Fragment
/// header). When the IPv6 fragmentable part starts with another extension
/// header (destination options, AH), later fragments cannot show the
/// protocol: such datagrams go through the address's TCP alias, or its UDP
/// alias if it has no TCP VIP, all their fragments alike.
#[inline(always)]
fn fragment(ctx: &XdpContext, l3: &L3, src: [u64; 2], dst: [u64; 2]) -> Result<Outcome, Outcome> {
    let (proto, meta) = match l3.proto {
        PROTO_TCP | PROTO_UDP => (l3.proto, find_vip(&dst, 0, l3.proto, l3.family)),
        PROTO_ICMP | PROTO_ICMPV6 => return Err(Outcome::pass(STAT_PASS_NOT_VIP)),
        _ if l3.family != FAMILY_V4 => match find_vip(&dst, 0, PROTO_TCP, l3.family) {
            Some(m) => (PROTO_TCP, Some(m)),
            None => (PROTO_UDP, find_vip(&dst, 0, PROTO_UDP, l3.family)),
        },
        _ => return Err(Outcome::pass(STAT_PASS_NOT_VIP)),
    };
    let meta = meta.ok_or(Outcome::pass(STAT_PASS_NOT_VIP))?;
    if !addressed_to_us(ctx) {
        return Err(Outcome::pass(STAT_PASS_OTHER_HOST));
    }
    let key = FlowWords::new(src, dst, 0, 0, proto, l3.family);
    let cfg = config()?;
    let mut chosen = select::from_ring(&meta, &key, cfg.hash_seed)?;
    chosen.new_flow = false;
    chosen.detail = STAT_FRAGMENT;
    Ok(forward(ctx, l3, &chosen, &key, Some(cfg)))
}

/// ICMP "fragmentation needed" / ICMPv6 "packet too big" to a VIP about
/// one of that VIP's own flows: sent to the backend of the flow quoted
/// inside (its addresses and ports swapped back into the client → VIP
/// direction). Other ICMP (and an error to an address that is not the
/// quoted flow's VIP) is not VIP traffic and is passed to the host.
#[inline(always)]
fn icmp(ctx: &XdpContext, l3: &L3, outer_dst: &[u64; 2]) -> Result<Outcome, Outcome> {
    let hdr = ptr_at::<[u8; ICMP_HLEN]>(ctx, l3.l4_off).ok_or(Outcome::pass(STAT_PASS_NOT_VIP))?;
    // SAFETY: bounds checked by ptr_at.
    let (ty, code) = unsafe { ((*hdr)[0], (*hdr)[1]) };
    let inner_off = l3.l4_off + ICMP_HLEN;
    // The quoted packet went from the VIP to the client: its source is the
    // flow's destination.
    let (src, dst, proto, inner_l4) = if l3.family == FAMILY_V4 {
        if l3.proto != PROTO_ICMP || ty != ICMP_DEST_UNREACH || code != ICMP_FRAG_NEEDED {
            return Err(Outcome::pass(STAT_PASS_NOT_VIP));
        }
        let ip = ptr_at::<Ipv4Hdr>(ctx, inner_off).ok_or_else(|| bad_quote())?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let ihl = (ip.vihl & 0x0f) as usize;
        if ihl < 5 {
            return Err(bad_quote());
        }
        (
            [u64::from(ip.daddr), 0],
            [u64::from(ip.saddr), 0],
            ip.proto,
            inner_off + ihl * 4,
        )
    } else {
        if l3.proto != PROTO_ICMPV6 || ty != ICMPV6_PKT_TOOBIG {
            return Err(Outcome::pass(STAT_PASS_NOT_VIP));
        }
        let ip = ptr_at::<Ipv6Hdr>(ctx, inner_off).ok_or_else(|| bad_quote())?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        (
            addr_words(&ip.daddr),
            addr_words(&ip.saddr),
            ip.nexthdr,
            inner_off + IPV6_HLEN,
        )
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Outcome::pass(STAT_PASS_NOT_VIP));
    }
    let ports = ptr_at::<[u16; 2]>(ctx, inner_l4).ok_or_else(|| bad_quote())?;
    // SAFETY: bounds checked by ptr_at.
    let [quoted_sport, quoted_dport] = unsafe { *ports };
    // Swapped back into the client → VIP direction.
    let key = FlowWords::new(src, dst, quoted_dport, quoted_sport, proto, l3.family);
    let meta =
        port_vip(&dst, quoted_sport, proto, l3.family).ok_or(Outcome::pass(STAT_PASS_NOT_VIP))?;
    // The error must be addressed to the VIP whose flow it quotes: an
    // address that only shares the prefilter's bit, or another VIP, does
    // not get to steer another VIP's flow.
    if dst != *outer_dst {
        count(STAT_ICMP_NOT_OWN_FLOW);
        return Err(Outcome::pass(STAT_PASS_NOT_VIP));
    }
    if !addressed_to_us(ctx) {
        return Err(Outcome::pass(STAT_PASS_OTHER_HOST));
    }
    let cfg = config()?;
    let mut chosen = select::lookup_only(&meta, &key, cfg.hash_seed)?;
    chosen.new_flow = false;
    chosen.detail = STAT_ICMP_PTB;
    Ok(forward(ctx, l3, &chosen, &key, Some(cfg)))
}

#[cold]
#[inline(never)]
fn bad_quote() -> Outcome {
    count(STAT_ERR_ICMP_INNER);
    Outcome::pass(STAT_PASS_MALFORMED)
}

/// Sends the packet to the chosen backend in its VIP's forwarding mode, and
/// counts it if it was sent: the chosen path's detail counter (a
/// connection-table hit, a fragment, an ICMP error), the VIP's and the
/// backend's traffic and the outcome (the returned outcome is then
/// `COUNTED`). A packet that was not sent counts only its outcome. `cfg` is the global config when
/// the caller has already read it (IP-in-IP needs it; an established flow's
/// packet has not read it, and DSR never does).
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    l3: &L3,
    chosen: &Chosen,
    key: &FlowWords,
    cfg: Option<&'static GlobalConfig>,
) -> Outcome {
    let backend = chosen.backend;
    // Counted before forwarding changes the frame, credited only if sent.
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let outcome = if backend.vip.flags & VIP_F_IPIP != 0 {
        match cfg.map_or_else(config, Ok) {
            Ok(cfg) => {
                let hash = match chosen.hash {
                    Some(h) => h,
                    None => flow_hash_words(key, cfg.hash_seed),
                };
                forward::ipip(ctx, l3, backend, hash, cfg)
            }
            Err(o) => o,
        }
    } else {
        forward::dsr(ctx, backend)
    };
    // One lookup for everything this CPU counts about the packet except
    // its backend: the detail (connection-table hit ...), the VIP's
    // traffic and the outcome. A packet counted here goes back as
    // `COUNTED`. (An ICMP "too big" answer is XDP_TX too, but not sent to
    // the backend.)
    let mut outcome = outcome;
    if outcome.stat == STAT_TX || outcome.stat == STAT_REDIRECT {
        if let Some(c) = counters() {
            count_in(c, chosen.detail);
            if let Some(v) = c.vips.get_mut(backend.vip_id as usize) {
                add_traffic(v, bytes, chosen.new_flow);
            }
            count_in(c, outcome.stat);
            outcome.stat = COUNTED;
        }
        count_backend(chosen.id, bytes, chosen.new_flow);
    }
    outcome
}
