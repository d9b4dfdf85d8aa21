//! Forwarding: L2 direct server return and IP-in-IP encapsulation.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    helpers::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    Backend, FAMILY_V4, GlobalConfig, STAT_DROP_BAD_LENGTH, STAT_DROP_ENCAP, STAT_DROP_NO_ROUTE,
    STAT_DROP_REDIRECT,
};

use crate::{
    maps::TX_PORTS,
    outcome::Outcome,
    parse::{IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN, L3, ptr_at},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const OUTER_TTL: u8 = 64;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// The route's MTU is smaller than the packet (`mtu_result` holds it).
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// L2 DSR: the frame goes to the backend's MAC unchanged above L2; the
/// source MAC becomes the one the client addressed, which the caller has
/// checked is this interface's own (`maps::addressed_to_us`).
#[inline(always)]
pub fn dsr(ctx: &XdpContext, backend: &Backend) -> Outcome {
    let Some(eth) = ptr_at::<[u16; 6]>(ctx, 0) else {
        return Outcome::drop(STAT_DROP_ENCAP);
    };
    let mac = &backend.mac;
    // SAFETY: bounds checked by ptr_at; 2-byte stores into the frame.
    unsafe {
        let e = &mut *eth;
        e[3] = e[0];
        e[4] = e[1];
        e[5] = e[2];
        e[0] = u16::from_ne_bytes([mac[0], mac[1]]);
        e[1] = u16::from_ne_bytes([mac[2], mac[3]]);
        e[2] = u16::from_ne_bytes([mac[4], mac[5]]);
    }
    Outcome::tx()
}

/// One's-complement sum folded to 16 bits.
#[inline(always)]
fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Outer source: the configured prefix with the host bits taken from the
/// flow hash, so receivers spread the tunnel over their queues by flow.
#[inline(always)]
fn vary(prefix: u32, host_mask: u32, hash: u32) -> u32 {
    (prefix & !host_mask) | (hash & host_mask)
}

/// Room for a route lookup request, 8-byte aligned.
#[repr(C, align(8))]
struct FibBuf([u64; size_of::<FibParams>() / 8]);
const _: () = assert!(size_of::<FibBuf>() == size_of::<FibParams>());

/// Zeroes `buf` in place and returns it as a route lookup request. The
/// words are stored one by one (volatile) so the compiler can neither trim
/// the zeroing into an unaligned `memset` nor copy the buffer: either
/// becomes a `memset`/`memcpy` call, which BPF cannot make.
#[inline(always)]
fn zeroed_fib(buf: &mut core::mem::MaybeUninit<FibBuf>) -> &mut FibParams {
    let words = buf.as_mut_ptr().cast::<u64>();
    for i in 0..size_of::<FibBuf>() / 8 {
        // SAFETY: an aligned word inside `buf`.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte is written; same size, stricter alignment, and
    // bpf_fib_lookup is plain data for which all-zero bytes are valid.
    unsafe { &mut *words.cast::<FibParams>() }
}

/// Route lookup for the outer header: next-hop MACs and egress interface.
/// A route whose MTU the encapsulated packet exceeds answers the sender
/// (see [`too_big`]) with that MTU less the outer header.
#[inline(always)]
fn route(ctx: &XdpContext, fib: &mut FibParams, l3: &L3) -> Result<(), Outcome> {
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: fib is a valid, initialised bpf_fib_lookup on the stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast::<c_void>(),
            core::ptr::from_mut(fib),
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        Ok(())
    } else if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // SAFETY: the kernel wrote the route's MTU into the union.
        let route_mtu = u32::from(unsafe { fib.__bindgen_anon_1.mtu_result });
        Err(too_big(ctx, l3, route_mtu))
    } else {
        Err(Outcome::drop(STAT_DROP_NO_ROUTE))
    }
}

/// The checks before a packet is encapsulated: its stated length must lie
/// inside the frame (a lying length would go into the outer header), and
/// the encapsulated packet must fit the configured MTU toward the
/// backends.
#[inline(always)]
fn fits(ctx: &XdpContext, l3: &L3, outer_len: usize, cfg: &GlobalConfig) -> Result<(), Outcome> {
    if ctx.data() + l3.l3_off + l3.ip_len > ctx.data_end() {
        return Err(Outcome::drop(STAT_DROP_BAD_LENGTH));
    }
    let mtu = cfg.ipip_mtu;
    if mtu != 0 && outer_len > mtu as usize {
        return Err(too_big(ctx, l3, mtu));
    }
    Ok(())
}

/// A packet that does not fit a path of MTU `path_mtu` once encapsulated:
/// its sender is told the MTU that does fit (see `crate::too_big`).
#[cold]
#[inline(always)]
fn too_big(ctx: &XdpContext, l3: &L3, path_mtu: u32) -> Outcome {
    if l3.family == FAMILY_V4 {
        crate::too_big::reply_v4(ctx.ctx, l3.l3_off, l3.proto, path_mtu.saturating_sub(20))
    } else {
        crate::too_big::reply_v6(ctx.ctx, l3.l3_off, l3.proto, path_mtu.saturating_sub(40))
    }
}

/// Grows the head by `grow` bytes and rewrites the link layer with the
/// route's MACs, keeping a VLAN tag if the frame had one. Returns nothing:
/// the caller re-derives pointers (adjust_head invalidates them).
#[inline(always)]
fn push_l2(ctx: &XdpContext, l3_off: usize, grow: usize, fib: &FibParams) -> Result<(), Outcome> {
    // Keep the VLAN tag (TPID+TCI) and the EtherType: the outer header has
    // the inner one's family, so the EtherType is unchanged.
    let tail = ptr_at::<[u16; 3]>(ctx, 12).ok_or(Outcome::drop(STAT_DROP_ENCAP))?;
    // SAFETY: bounds checked by ptr_at.
    let tail = unsafe { *tail };
    // SAFETY: ctx.ctx is the program's xdp_md; a negative delta grows the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return Err(Outcome::drop(STAT_DROP_ENCAP));
    }
    let eth = ptr_at::<[u16; 9]>(ctx, 0).ok_or(Outcome::drop(STAT_DROP_ENCAP))?;
    let (d, s) = (fib.dmac, fib.smac);
    // SAFETY: bounds checked by ptr_at (the grown head holds ≥ 18 bytes
    // before the IP header plus the new outer header).
    unsafe {
        let e = &mut *eth;
        e[0] = u16::from_ne_bytes([d[0], d[1]]);
        e[1] = u16::from_ne_bytes([d[2], d[3]]);
        e[2] = u16::from_ne_bytes([d[4], d[5]]);
        e[3] = u16::from_ne_bytes([s[0], s[1]]);
        e[4] = u16::from_ne_bytes([s[2], s[3]]);
        e[5] = u16::from_ne_bytes([s[4], s[5]]);
        e[6] = tail[0];
        if l3_off > 14 {
            e[7] = tail[1];
            e[8] = tail[2];
        }
    }
    Ok(())
}

/// Sends the frame out: XDP_TX when the route leaves by the interface it
/// came in on, otherwise XDP_REDIRECT through the egress map.
#[inline(always)]
fn transmit(ctx: &XdpContext, fib: &FibParams) -> Outcome {
    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        return Outcome::tx();
    }
    match TX_PORTS.redirect(fib.ifindex, 0) {
        Ok(_) => Outcome::redirect(),
        Err(_) => Outcome::drop(STAT_DROP_REDIRECT),
    }
}

/// IP-in-IP towards `backend`: IPv4 in IPv4 or IPv6 in IPv6. The outer
/// source varies with the flow's `hash`.
#[inline(always)]
pub fn ipip(
    ctx: &XdpContext,
    l3: &L3,
    backend: &Backend,
    hash: u32,
    cfg: &GlobalConfig,
) -> Outcome {
    let res = if l3.family == FAMILY_V4 {
        ipip4(ctx, l3, backend, hash, cfg)
    } else {
        ipip6(ctx, l3, backend, hash, cfg)
    };
    match res {
        Ok(o) | Err(o) => o,
    }
}

#[inline(always)]
fn ipip4(
    ctx: &XdpContext,
    l3: &L3,
    backend: &Backend,
    hash: u32,
    cfg: &GlobalConfig,
) -> Result<Outcome, Outcome> {
    let l3_off = l3.l3_off;
    if backend.family != FAMILY_V4 {
        return Err(Outcome::drop(STAT_DROP_ENCAP));
    }
    let outer_len = l3.ip_len + IPV4_HLEN;
    fits(ctx, l3, outer_len, cfg)?;
    if outer_len > 0xffff {
        return Err(Outcome::drop(STAT_DROP_ENCAP));
    }
    let src = vary(cfg.ipip_src_v4, cfg.ipip_src_v4_mask, hash);
    let dst = backend.addr[0];
    let mut buf = core::mem::MaybeUninit::uninit();
    let fib = zeroed_fib(&mut buf);
    fib.family = AF_INET;
    fib.__bindgen_anon_1.tot_len = outer_len as u16;
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    route(ctx, fib, l3)?;
    push_l2(ctx, l3_off, IPV4_HLEN, fib)?;

    // The outer header as ten 16-bit words in wire order.
    let mut w: [u16; 10] = [
        u16::from_ne_bytes([0x45, l3.tos]),
        (outer_len as u16).to_be(),
        0,
        0x4000u16.to_be(), // DF: the tunnel must not be fragmented on the way
        u16::from_ne_bytes([OUTER_TTL, IPPROTO_IPIP]),
        0,
        src as u16,
        (src >> 16) as u16,
        dst as u16,
        (dst >> 16) as u16,
    ];
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += u32::from(w[i]);
        i += 1;
    }
    w[5] = csum_fold(sum);
    let hdr = ptr_at::<[u16; 10]>(ctx, l3_off).ok_or(Outcome::drop(STAT_DROP_ENCAP))?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *hdr = w };
    Ok(transmit(ctx, fib))
}

#[inline(always)]
fn ipip6(
    ctx: &XdpContext,
    l3: &L3,
    backend: &Backend,
    hash: u32,
    cfg: &GlobalConfig,
) -> Result<Outcome, Outcome> {
    let l3_off = l3.l3_off;
    if backend.family == FAMILY_V4 {
        return Err(Outcome::drop(STAT_DROP_ENCAP));
    }
    let payload_len = l3.ip_len;
    fits(ctx, l3, payload_len + IPV6_HLEN, cfg)?;
    if payload_len > 0xffff {
        return Err(Outcome::drop(STAT_DROP_ENCAP));
    }
    let p = cfg.ipip_src_v6;
    let src = [p[0], p[1], p[2], vary(p[3], cfg.ipip_src_v6_mask, hash)];
    let dst = backend.addr;
    let mut buf = core::mem::MaybeUninit::uninit();
    let fib = zeroed_fib(&mut buf);
    fib.family = AF_INET6;
    fib.__bindgen_anon_1.tot_len = (payload_len + IPV6_HLEN) as u16;
    fib.__bindgen_anon_3.ipv6_src = src;
    fib.__bindgen_anon_4.ipv6_dst = dst;
    route(ctx, fib, l3)?;
    push_l2(ctx, l3_off, IPV6_HLEN, fib)?;

    let hdr = ptr_at::<crate::parse::Ipv6Hdr>(ctx, l3_off).ok_or(Outcome::drop(STAT_DROP_ENCAP))?;
    // Version 6, the inner traffic class, and a flow label from the flow
    // hash (receivers hash it to pick a queue).
    let vtc = (6u32 << 28) | (u32::from(l3.tos) << 20) | (hash & 0x000f_ffff);
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let h = &mut *hdr;
        h.vtc_flow = vtc.to_be();
        h.payload_len = (payload_len as u16).to_be();
        h.nexthdr = IPPROTO_IPV6;
        h.hop_limit = OUTER_TTL;
        h.saddr = src;
        h.daddr = dst;
    }
    Ok(transmit(ctx, fib))
}
