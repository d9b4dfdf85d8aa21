//! IP-in-IP decapsulation for backends: this kernel, like many minimal
//! ones, has no `ipip`/`ip6_tunnel` module, so the backend strips the outer
//! header in XDP and passes the inner packet up its stack.
//!
//! Rule: an IPv4 packet with protocol 4 (IPIP) or an IPv6 packet whose
//! next header is 41 (IPv6) directly after the fixed header loses its outer
//! IP header; everything else passes untouched. An encapsulated packet whose
//! inner header is missing is dropped.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{DECAP_DROP_MALFORMED, DECAP_PASS, DECAP_V4, DECAP_V6};

use crate::{
    maps::DECAP_STATS,
    parse::{
        ETH_P_IP, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, parse_l2,
        ptr_at,
    },
};

#[inline(always)]
fn count(stat: u32) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let (action, stat) = match try_decap(ctx) {
        Ok(stat) => (xdp_action::XDP_PASS, stat),
        Err(stat) => (xdp_action::XDP_DROP, stat),
    };
    count(stat);
    action
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<u32, u32> {
    let Ok(l2) = parse_l2(ctx) else {
        return Ok(DECAP_PASS);
    };
    let l3_off = l2.l3_off;
    let (outer_len, stat) = if l2.ethertype == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
            return Ok(DECAP_PASS);
        };
        // SAFETY: bounds checked by ptr_at.
        let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
        if proto != IPPROTO_IPIP || vihl >> 4 != 4 {
            return Ok(DECAP_PASS);
        }
        let ihl = (vihl & 0x0f) as usize;
        if ihl < 5 {
            return Err(DECAP_DROP_MALFORMED);
        }
        (ihl * 4, DECAP_V4)
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
            return Ok(DECAP_PASS);
        };
        // SAFETY: bounds checked by ptr_at.
        if unsafe { (*ip).nexthdr } != IPPROTO_IPV6 {
            return Ok(DECAP_PASS);
        }
        (IPV6_HLEN, DECAP_V6)
    };
    // The inner header must be there, of the same family.
    let inner_min = if stat == DECAP_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    };
    if ctx.data() + l3_off + outer_len + inner_min > ctx.data_end() {
        return Err(DECAP_DROP_MALFORMED);
    }
    // Move the link-layer header (with its VLAN tag, if any) forward over
    // the outer IP header, then drop the bytes in front of it.
    let l2hdr = ptr_at::<[u16; 9]>(ctx, 0).ok_or(DECAP_DROP_MALFORMED)?;
    // SAFETY: bounds checked by ptr_at.
    let saved = unsafe { *l2hdr };
    // SAFETY: ctx.ctx is the program's xdp_md; a positive delta shrinks.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(DECAP_DROP_MALFORMED);
    }
    let eth = ptr_at::<[u16; 9]>(ctx, 0).ok_or(DECAP_DROP_MALFORMED)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let e = &mut *eth;
        let n = if l3_off > 14 { 9 } else { 7 };
        let mut i = 0;
        while i < n {
            e[i] = saved[i];
            i += 1;
        }
    }
    Ok(stat)
}
