//! Bounds-checked packet access and header parsing (L2 and L3).
//!
//! Every access goes through [`ptr_at`], which checks the access against
//! `data_end` in the form the verifier understands. Parsers return
//! `Err(Outcome)` with the counter that explains why a packet is not
//! handled; they never return XDP_ABORTED.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FAMILY_V4, FAMILY_V6, STAT_ERR_IPV4_BAD, STAT_ERR_IPV4_TRUNC, STAT_ERR_IPV6_BAD,
    STAT_ERR_IPV6_EXT_LIMIT, STAT_ERR_IPV6_TRUNC, STAT_ERR_L2_TRUNC, STAT_PASS_MALFORMED,
    STAT_PASS_NON_IP, STAT_VLAN, addr_words,
};

use crate::{maps::count, outcome::Outcome};

pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType in an untagged frame.
pub const ETH_TYPE_OFF: usize = 12;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
/// IP protocol numbers of IPv4-in-IPv4 and IPv6-in-IPv6.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// IPv6 extension headers skipped before the transport header.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// How many extension headers the parser follows (bounded for the
/// verifier); a chain longer than this is counted and passed.
const MAX_IPV6_EXT: usize = 4;

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

#[repr(C)]
pub struct TcpHdr {
    /// Source and destination port (wire order).
    pub ports: [u16; 2],
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset (high nibble).
    pub doff_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}
const _: () = assert!(core::mem::size_of::<TcpHdr>() == 20);

/// Returns a pointer to a `T` at `offset` from the start of the packet, or
/// `None` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The link layer: where L3 starts and what it is.
#[derive(Clone, Copy)]
pub struct L2 {
    pub ethertype: u16,
    /// 14, or 18 with one VLAN tag.
    pub l3_off: usize,
}

/// The network layer as far as the load balancer needs it.
#[derive(Clone, Copy)]
pub struct L3 {
    pub family: u8,
    pub proto: u8,
    /// Offset of the IP header (see [`addresses`]).
    pub l3_off: usize,
    /// Offset of the transport header (after options / extension headers).
    pub l4_off: usize,
    /// Length of the IP packet (header included) as the header states it.
    pub ip_len: usize,
    /// IPv4 TOS or IPv6 traffic class, copied to an outer header.
    pub tos: u8,
    /// Part of a fragmented datagram (first fragment included). For IPv6,
    /// `proto` is then the Fragment header's Next Header and `l4_off` the
    /// start of the fragmentable part.
    pub fragment: bool,
}

/// The packet's source and destination addresses as
/// `lb_common::addr_words`, read from the IP header (IPv6 when `V6`).
///
/// They are read from the packet where they are used rather than carried
/// in [`L3`]: a struct on the stack gets its address words written as 32-bit
/// halves and read back as 64-bit words, and such a load cannot take its
/// data from the store buffer (a stall of a dozen cycles per packet).
#[inline(always)]
pub fn addresses<const V6: bool>(ctx: &XdpContext, l3: &L3) -> Option<([u64; 2], [u64; 2])> {
    if V6 {
        let off = l3.l3_off + core::mem::offset_of!(Ipv6Hdr, saddr);
        let a = ptr_at::<[[u32; 4]; 2]>(ctx, off)?;
        // SAFETY: bounds checked by ptr_at.
        let [src, dst] = unsafe { *a };
        Some((addr_words(&src), addr_words(&dst)))
    } else {
        let off = l3.l3_off + core::mem::offset_of!(Ipv4Hdr, saddr);
        let a = ptr_at::<[u32; 2]>(ctx, off)?;
        // SAFETY: bounds checked by ptr_at.
        let [src, dst] = unsafe { *a };
        Some(([u64::from(src), 0], [u64::from(dst), 0]))
    }
}

#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Result<L2, Outcome> {
    let Some(tp) = ptr_at::<u16>(ctx, ETH_TYPE_OFF) else {
        count(STAT_ERR_L2_TRUNC);
        return Err(Outcome::pass(STAT_PASS_MALFORMED));
    };
    // SAFETY: bounds checked by ptr_at.
    let mut ethertype = u16::from_be(unsafe { *tp });
    let mut l3_off = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = ptr_at::<u16>(ctx, 16) else {
            count(STAT_ERR_L2_TRUNC);
            return Err(Outcome::pass(STAT_PASS_MALFORMED));
        };
        count(STAT_VLAN);
        // SAFETY: bounds checked by ptr_at.
        ethertype = u16::from_be(unsafe { *inner });
        l3_off = ETH_HLEN + VLAN_HLEN;
    }
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Err(Outcome::pass(STAT_PASS_NON_IP));
    }
    Ok(L2 { ethertype, l3_off })
}

#[inline(always)]
fn malformed(reason: u32) -> Outcome {
    count(reason);
    Outcome::pass(STAT_PASS_MALFORMED)
}

#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext, l3_off: usize) -> Result<L3, Outcome> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or_else(|| malformed(STAT_ERR_IPV4_TRUNC))?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let vihl = ip.vihl;
    let ihl = (vihl & 0x0f) as usize;
    if vihl >> 4 != 4 || ihl < 5 {
        return Err(malformed(STAT_ERR_IPV4_BAD));
    }
    let hdr_len = ihl * 4;
    let ip_len = u16::from_be(ip.tot_len) as usize;
    if ip_len < hdr_len {
        return Err(malformed(STAT_ERR_IPV4_BAD));
    }
    // Options are allowed: the transport header starts after them. The
    // header itself must be in the packet.
    if ctx.data() + l3_off + hdr_len > ctx.data_end() {
        return Err(malformed(STAT_ERR_IPV4_TRUNC));
    }
    // More-fragments flag or a non-zero offset.
    let fragment = u16::from_be(ip.frag_off) & 0x3fff != 0;
    Ok(L3 {
        family: FAMILY_V4,
        proto: ip.proto,
        l3_off,
        l4_off: l3_off + hdr_len,
        ip_len,
        tos: ip.tos,
        fragment,
    })
}

#[inline(always)]
pub fn parse_ipv6(ctx: &XdpContext, l3_off: usize) -> Result<L3, Outcome> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or_else(|| malformed(STAT_ERR_IPV6_TRUNC))?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let vtc = u32::from_be(ip.vtc_flow);
    if vtc >> 28 != 6 {
        return Err(malformed(STAT_ERR_IPV6_BAD));
    }
    let mut nexthdr = ip.nexthdr;
    let mut off = l3_off + IPV6_HLEN;
    let mut fragment = false;
    for _ in 0..MAX_IPV6_EXT {
        match nexthdr {
            NEXTHDR_FRAGMENT => {
                // Fixed 8 bytes: next header, reserved, offset+flags, id.
                let hdr =
                    ptr_at::<[u8; 8]>(ctx, off).ok_or_else(|| malformed(STAT_ERR_IPV6_TRUNC))?;
                // SAFETY: bounds checked by ptr_at.
                let (next, off_hi, off_lo) = unsafe { ((*hdr)[0], (*hdr)[2], (*hdr)[3]) };
                nexthdr = next;
                off += 8;
                // Offset (13 bits) or M flag set. An "atomic fragment"
                // (offset 0, M clear) is a whole packet (RFC 6946).
                if u16::from_be_bytes([off_hi, off_lo]) & 0xfff9 != 0 {
                    // A real fragment: parsing stops here, in the first
                    // fragment as in the others. What follows is the
                    // fragmentable part, whose headers only the first
                    // fragment holds (RFC 8200 4.5); a later fragment's
                    // bytes there are payload. Every fragment of a datagram
                    // then has the same protocol: this header's Next Header.
                    fragment = true;
                    break;
                }
            }
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let hdr =
                    ptr_at::<[u8; 2]>(ctx, off).ok_or_else(|| malformed(STAT_ERR_IPV6_TRUNC))?;
                // SAFETY: bounds checked by ptr_at.
                let (next, len8) = unsafe { ((*hdr)[0], (*hdr)[1]) };
                nexthdr = next;
                off += (len8 as usize + 1) * 8;
            }
            _ => break,
        }
    }
    if !fragment
        && matches!(
            nexthdr,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT
        )
    {
        return Err(malformed(STAT_ERR_IPV6_EXT_LIMIT));
    }
    Ok(L3 {
        family: FAMILY_V6,
        proto: nexthdr,
        l3_off,
        l4_off: off,
        ip_len: u16::from_be(ip.payload_len) as usize + IPV6_HLEN,
        tos: (vtc >> 20) as u8,
        fragment,
    })
}
