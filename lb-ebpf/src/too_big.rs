//! The answer to a packet that does not fit the path to its IP-in-IP
//! backend once encapsulated: ICMP "fragmentation needed" (RFC 792, 1191)
//! or ICMPv6 "packet too big" (RFC 4443), from the VIP to the sender, built
//! in place and sent back with XDP_TX. Without it the sender's Path MTU
//! Discovery never learns that the tunnel is narrower than its link, and
//! every full-size packet is lost.
//!
//! The message quotes as much of the packet as fits the smallest MTU a
//! path may have: 548 bytes for IPv4 (a 576-byte datagram, RFC 1812
//! 4.3.2.3), 1232 bytes for IPv6 (a 1280-byte packet, RFC 4443 2.4(c)).
//! Every too-big packet is longer than that with the MTUs the config
//! allows (`ipip_mtu` ≥ 1320), so the quote is always that long and the
//! checksums run over constant lengths.
//!
//! No message is sent (counted drop, `drop_too_big`) for an IPv4 packet
//! without DF or a fragment (its sender lets the path fragment it and does
//! not do PMTU discovery for it; XDP cannot fragment), for an ICMP error
//! (never an error about an error, RFC 1122 3.2.2), for a sender address
//! that is not unicast, and for a packet shorter than the quote (only
//! with a route MTU below 596). Messages are rate-limited per CPU
//! (`drop_too_big_rate_limited`).
//!
//! Both builders are BPF subprograms of their own, cold like the other
//! subprograms: the loader resolves calls by offset in the one
//! `.text.unlikely.` section they share (a call into a second text section
//! at the same offset reached the wrong function).

use aya_ebpf::{
    bindings::xdp_md,
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    PROTO_ICMP, PROTO_ICMPV6, STAT_DROP_TOO_BIG, STAT_DROP_TOO_BIG_RATE_LIMITED,
    STAT_TX_ICMP_TOO_BIG,
};

use crate::{
    maps::icmp_budget,
    outcome::Outcome,
    parse::{ETH_HLEN, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, VLAN_HLEN, ptr_at},
};

/// Bytes of the original IPv4 packet quoted: 576 − 20 − 8.
pub const QUOTE_V4: usize = 548;
/// Bytes of the original IPv6 packet quoted: 1280 − 40 − 8.
pub const QUOTE_V6: usize = 1232;
const ICMP_HLEN: usize = 8;
const TTL: u8 = 64;
/// `bpf_csum_diff` sums at most 512 bytes per call.
const CSUM_CHUNK: usize = 512;

const fn answer() -> Outcome {
    Outcome {
        action: aya_ebpf::bindings::xdp_action::XDP_TX,
        stat: STAT_TX_ICMP_TOO_BIG,
    }
}

/// The IP header's offset as the verifier can bound it (14, or 18 with a
/// VLAN tag): a subprogram's argument is otherwise an unknown scalar.
#[inline(always)]
fn bounded_l3_off(l3_off: usize) -> usize {
    if l3_off > ETH_HLEN {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    }
}

/// Whether an IPv4 source (wire-order word) may receive an ICMP error: not
/// 0.0.0.0/8, loopback, multicast, reserved or broadcast.
#[inline(always)]
fn unicast_v4(addr: u32) -> bool {
    let first = addr.to_ne_bytes()[0];
    first != 0 && first != 127 && first < 224
}

/// Whether an IPv6 source may receive an ICMPv6 error: not multicast, not
/// the unspecified address.
#[inline(always)]
fn unicast_v6(addr: &[u32; 4]) -> bool {
    addr[0].to_ne_bytes()[0] != 0xff && (addr[0] | addr[1] | addr[2] | addr[3]) != 0
}

/// One's-complement sum folded to 16 bits and inverted.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// `bpf_csum_diff` over `N` packet bytes at `off`, added to `seed`.
#[inline(always)]
fn csum_chunk<const N: usize>(ctx: &XdpContext, off: usize, seed: u32) -> Option<u32> {
    let p = ptr_at::<[u8; N]>(ctx, off)?;
    // SAFETY: `p` points at N readable packet bytes (ptr_at); nothing is
    // subtracted (no `from`).
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast::<u32>(), N as u32, seed) };
    (r >= 0).then_some(r as u32)
}

/// Moves the link-layer header `grow` bytes to the front with the MACs
/// swapped (back to the sender, from us), keeping a VLAN tag. The caller
/// re-derives every pointer afterwards.
#[inline(always)]
fn turn_around(ctx: &XdpContext, l3_off: usize, grow: usize) -> Option<()> {
    let l2 = ptr_at::<[u16; 9]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let saved = unsafe { *l2 };
    // SAFETY: ctx.ctx is the program's xdp_md; a negative delta grows the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let eth = ptr_at::<[u16; 9]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let e = &mut *eth;
        e[0] = saved[3];
        e[1] = saved[4];
        e[2] = saved[5];
        e[3] = saved[0];
        e[4] = saved[1];
        e[5] = saved[2];
        e[6] = saved[6];
        if l3_off > ETH_HLEN {
            e[7] = saved[7];
            e[8] = saved[8];
        }
    }
    Some(())
}

/// Cuts the frame to `len` bytes.
#[inline(always)]
fn trim(ctx: &XdpContext, len: usize) -> Option<()> {
    let now = ctx.data_end() - ctx.data();
    // Taken whole through the stack: the compiler would otherwise subtract
    // only the low halves of the two packet pointers, and the verifier
    // refuses 32-bit pointer arithmetic.
    // SAFETY: reading back a local.
    let now = unsafe { core::ptr::read_volatile(&raw const now) };
    // SAFETY: ctx.ctx is the program's xdp_md; a negative delta shrinks.
    (unsafe { bpf_xdp_adjust_tail(ctx.ctx, len as i32 - now as i32) } == 0).then_some(())
}

/// ICMP "fragmentation needed" with next-hop MTU `mtu` for the IPv4 packet
/// at `l3_off` (protocol `proto`), or the counted reason for not sending it.
#[cold]
#[inline(never)]
pub fn reply_v4(raw: *mut xdp_md, l3_off: usize, proto: u8, mtu: u32) -> Outcome {
    let ctx = XdpContext::new(raw);
    let l3_off = bounded_l3_off(l3_off);
    let Some(ip) = ptr_at::<Ipv4Hdr>(&ctx, l3_off) else {
        return Outcome::drop(STAT_DROP_TOO_BIG);
    };
    // SAFETY: bounds checked by ptr_at.
    let (frag, tot_len, saddr, daddr) = unsafe {
        (
            u16::from_be((*ip).frag_off),
            u16::from_be((*ip).tot_len) as usize,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    // DF set, not a fragment, not an ICMP error, from a unicast sender, and
    // long enough for the whole quote.
    if frag & 0x7fff != 0x4000
        || proto == PROTO_ICMP
        || !unicast_v4(saddr)
        || tot_len < QUOTE_V4
        || ptr_at::<[u8; QUOTE_V4]>(&ctx, l3_off).is_none()
    {
        return Outcome::drop(STAT_DROP_TOO_BIG);
    }
    if !icmp_budget() {
        return Outcome::drop(STAT_DROP_TOO_BIG_RATE_LIMITED);
    }
    match build_v4(&ctx, l3_off, saddr, daddr, mtu.min(0xffff) as u16) {
        Some(()) => answer(),
        None => Outcome::drop(STAT_DROP_TOO_BIG),
    }
}

#[inline(always)]
fn build_v4(ctx: &XdpContext, l3_off: usize, client: u32, vip: u32, mtu: u16) -> Option<()> {
    const LEN: usize = IPV4_HLEN + ICMP_HLEN + QUOTE_V4;
    turn_around(ctx, l3_off, IPV4_HLEN + ICMP_HLEN)?;
    trim(ctx, l3_off + LEN)?;
    // IPv4 header (as 16-bit words in wire order), then the ICMP header
    // with a zero checksum.
    let mut ip: [u16; 10] = [
        u16::from_ne_bytes([0x45, 0]),
        (LEN as u16).to_be(),
        0,
        0,
        u16::from_ne_bytes([TTL, PROTO_ICMP]),
        0,
        vip as u16,
        (vip >> 16) as u16,
        client as u16,
        (client >> 16) as u16,
    ];
    let mut sum = 0u64;
    let mut i = 0;
    while i < 10 {
        sum += u64::from(ip[i]);
        i += 1;
    }
    ip[5] = fold(sum);
    let icmp: [u16; 4] = [u16::from_ne_bytes([3, 4]), 0, 0, mtu.to_be()];
    let hdr = ptr_at::<[u16; 14]>(ctx, l3_off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let h = &mut *hdr;
        let mut i = 0;
        while i < 10 {
            h[i] = ip[i];
            i += 1;
        }
        h[10] = icmp[0];
        h[11] = icmp[1];
        h[12] = icmp[2];
        h[13] = icmp[3];
    }
    // The ICMP checksum covers the ICMP header and the quote: 556 bytes.
    let icmp_off = l3_off + IPV4_HLEN;
    let s = csum_chunk::<CSUM_CHUNK>(ctx, icmp_off, 0)?;
    let s = csum_chunk::<{ ICMP_HLEN + QUOTE_V4 - CSUM_CHUNK }>(ctx, icmp_off + CSUM_CHUNK, s)?;
    let check = ptr_at::<u16>(ctx, icmp_off + 2)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *check = fold(u64::from(s)) };
    Some(())
}

/// ICMPv6 "packet too big" with MTU `mtu` for the IPv6 packet at `l3_off`
/// (upper-layer protocol `proto`), or the counted reason for not sending
/// it.
#[cold]
#[inline(never)]
pub fn reply_v6(raw: *mut xdp_md, l3_off: usize, proto: u8, mtu: u32) -> Outcome {
    let ctx = XdpContext::new(raw);
    let l3_off = bounded_l3_off(l3_off);
    let Some(ip) = ptr_at::<Ipv6Hdr>(&ctx, l3_off) else {
        return Outcome::drop(STAT_DROP_TOO_BIG);
    };
    // SAFETY: bounds checked by ptr_at.
    let (len, saddr, daddr) = unsafe {
        (
            u16::from_be((*ip).payload_len) as usize + IPV6_HLEN,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    if proto == PROTO_ICMPV6
        || !unicast_v6(&saddr)
        || len < QUOTE_V6
        || ptr_at::<[u8; QUOTE_V6]>(&ctx, l3_off).is_none()
    {
        return Outcome::drop(STAT_DROP_TOO_BIG);
    }
    if !icmp_budget() {
        return Outcome::drop(STAT_DROP_TOO_BIG_RATE_LIMITED);
    }
    match build_v6(&ctx, l3_off, &saddr, &daddr, mtu) {
        Some(()) => answer(),
        None => Outcome::drop(STAT_DROP_TOO_BIG),
    }
}

#[inline(always)]
fn build_v6(
    ctx: &XdpContext,
    l3_off: usize,
    client: &[u32; 4],
    vip: &[u32; 4],
    mtu: u32,
) -> Option<()> {
    const PAYLOAD: usize = ICMP_HLEN + QUOTE_V6;
    turn_around(ctx, l3_off, IPV6_HLEN + ICMP_HLEN)?;
    trim(ctx, l3_off + IPV6_HLEN + PAYLOAD)?;
    let hdr = ptr_at::<Ipv6Hdr>(ctx, l3_off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let h = &mut *hdr;
        h.vtc_flow = (6u32 << 28).to_be();
        h.payload_len = (PAYLOAD as u16).to_be();
        h.nexthdr = PROTO_ICMPV6;
        h.hop_limit = TTL;
        h.saddr = *vip;
        h.daddr = *client;
    }
    let icmp_off = l3_off + IPV6_HLEN;
    let icmp = ptr_at::<[u32; 2]>(ctx, icmp_off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *icmp = [u32::from_ne_bytes([2, 0, 0, 0]), mtu.to_be()] };
    // Pseudo-header (RFC 8200 8.1): addresses, upper-layer length, next
    // header; summed in the packet's own word order, like the rest.
    let mut sum = u64::from((PAYLOAD as u32).to_be()) + u64::from(u32::from(PROTO_ICMPV6).to_be());
    let mut i = 0;
    while i < 4 {
        sum += u64::from(vip[i]) + u64::from(client[i]);
        i += 1;
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    // The message: 1240 bytes in three chunks.
    let s = csum_chunk::<CSUM_CHUNK>(ctx, icmp_off, sum as u32)?;
    let s = csum_chunk::<CSUM_CHUNK>(ctx, icmp_off + CSUM_CHUNK, s)?;
    let s = csum_chunk::<{ PAYLOAD - 2 * CSUM_CHUNK }>(ctx, icmp_off + 2 * CSUM_CHUNK, s)?;
    let check = ptr_at::<u16>(ctx, icmp_off + 2)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *check = fold(u64::from(s)) };
    Some(())
}

// The quotes are whole 32-bit words (bpf_csum_diff sums words).
const _: () = assert!((ICMP_HLEN + QUOTE_V4) % 4 == 0 && (ICMP_HLEN + QUOTE_V6) % 4 == 0);
const _: () = assert!(ICMP_HLEN + QUOTE_V4 > CSUM_CHUNK && ICMP_HLEN + QUOTE_V6 > 2 * CSUM_CHUNK);
const _: () = assert!(ICMP_HLEN + QUOTE_V6 - 2 * CSUM_CHUNK <= CSUM_CHUNK);
