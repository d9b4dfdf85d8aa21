//! Packet crafting and decoding for the kernel tests (`BPF_PROG_TEST_RUN`
//! fixtures and netns traffic), written by hand on `std` only.
//!
//! # Building
//!
//! [`PacketBuilder`] is a by-value builder. A packet is an Ethernet header,
//! optional VLAN tags, then either a raw L2 payload or a *stack* of IP layers
//! (outer first) ending in one transport:
//!
//! ```text
//! let pkt = PacketBuilder::eth(client_mac, lb_mac)      // (src, dst)
//!     .vlan(100)
//!     .ipv4(client, vip)
//!     .ttl(64)
//!     .tcp(40000, 80, TcpFlags::SYN)
//!     .payload(b"hello")
//!     .build();
//! ```
//!
//! Every call to [`PacketBuilder::ipv4`] / [`PacketBuilder::ipv6`] pushes one
//! IP layer; the layer modifiers (`ttl`, `fragment`, `ipv6_ext`, the
//! overrides, ...) apply to the most recently pushed layer. Pushing two layers
//! builds IP-in-IP (protocol 4 / next header 41 are filled in automatically).
//!
//! All lengths and checksums are computed: IPv4 header checksum, TCP/UDP
//! checksums with the IPv4/IPv6 pseudo-header, ICMP, ICMPv6 with the
//! pseudo-header. The transport checksum always uses the *innermost* layer's
//! addresses and covers exactly the transport bytes present in this packet.
//! For a packet marked as a fragment (`.fragment(..)` or an IPv6
//! [`ExtHeader::Fragment`]) the transport checksum is therefore computed *as
//! if this packet were unfragmented*; it will generally not match a
//! reassembled datagram. To get real fragments of one datagram (first
//! fragment carrying the datagram's true checksum), use
//! [`PacketBuilder::build_fragments`].
//!
//! Frames are not padded to the 60-byte Ethernet minimum.
//!
//! Deliberately broken packets: [`PacketBuilder::ipv4_ihl_override`],
//! [`PacketBuilder::ipv4_total_len_override`],
//! [`PacketBuilder::ipv4_checksum_override`],
//! [`PacketBuilder::ipv6_payload_len_override`],
//! [`PacketBuilder::ip_version_override`], [`PacketBuilder::ip_proto_override`],
//! [`PacketBuilder::udp_len_override`], [`PacketBuilder::l4_checksum_override`];
//! truncation is `Vec::truncate` on the result.
//!
//! # Decoding
//!
//! [`decode`] parses an Ethernet frame into a [`Decoded`]: L2 fields, the
//! stack of IP layers (outer first, IPv4/IPv6 in IPv4/IPv6 followed through
//! protocol 4 and 41), the innermost transport header with checksum validity,
//! and the L4 payload. [`decode_ip`] does the same for a buffer that starts at
//! an IP header (the quoted packet of an ICMP error, `build_ip_only` output).
//!
//! # Flow keys
//!
//! [`ip4_words`], [`ip6_words`], [`port_wire`], [`flow_key_v4`] and
//! [`flow_key_v6`] produce the wire-order representation of `lb_common`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::{BitOr, BitOrAssign};

use lb_common::FlowKey;
use lb_common::flow::{FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// A MAC address.
pub type Mac = [u8; 6];

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// TPID of an 802.1Q VLAN tag.
pub const TPID_8021Q: u16 = 0x8100;
/// TPID of an 802.1ad (QinQ service) tag.
pub const TPID_8021AD: u16 = 0x88A8;
/// Legacy QinQ TPID, also recognised by the decoder.
pub const TPID_QINQ_LEGACY: u16 = 0x9100;

/// IP protocol number of IPv4-in-IP encapsulation.
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6-in-IP encapsulation.
pub const PROTO_IPV6: u8 = 41;
/// IPv6 extension header: hop-by-hop options.
pub const NEXTHDR_HOP: u8 = 0;
/// IPv6 extension header: routing.
pub const NEXTHDR_ROUTING: u8 = 43;
/// IPv6 extension header: fragment.
pub const NEXTHDR_FRAGMENT: u8 = 44;
/// IPv6 extension header: authentication header (length in 4-octet units).
pub const NEXTHDR_AUTH: u8 = 51;
/// IPv6 extension header: destination options.
pub const NEXTHDR_DEST: u8 = 60;

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;

// ---------------------------------------------------------------------------
// Wire-order helpers and flow keys
// ---------------------------------------------------------------------------

/// An IPv4 address as `lb_common` stores it: word 0 is the four address
/// bytes read in native order, words 1..4 are zero.
#[must_use]
pub fn ip4_words(a: Ipv4Addr) -> [u32; 4] {
    [u32::from_ne_bytes(a.octets()), 0, 0, 0]
}

/// An IPv6 address as `lb_common` stores it: each word is four address bytes
/// read in native order.
#[must_use]
pub fn ip6_words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Address words of either family (see [`ip4_words`], [`ip6_words`]).
#[must_use]
pub fn ip_words(a: IpAddr) -> [u32; 4] {
    match a {
        IpAddr::V4(a) => ip4_words(a),
        IpAddr::V6(a) => ip6_words(a),
    }
}

/// A port as `lb_common` stores it: the two wire (big-endian) bytes read as a
/// native `u16`.
#[must_use]
pub fn port_wire(p: u16) -> u16 {
    u16::from_ne_bytes(p.to_be_bytes())
}

/// The [`FlowKey`] the XDP program computes for an IPv4 packet with this
/// 5-tuple (ports in host order here; pass 0 for protocols without ports).
#[must_use]
pub fn flow_key_v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: ip4_words(src),
        dst: ip4_words(dst),
        src_port: port_wire(sport),
        dst_port: port_wire(dport),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// The [`FlowKey`] the XDP program computes for an IPv6 packet with this
/// 5-tuple (ports in host order here; pass 0 for protocols without ports).
#[must_use]
pub fn flow_key_v6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: ip6_words(src),
        dst: ip6_words(dst),
        src_port: port_wire(sport),
        dst_port: port_wire(dport),
        proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

// ---------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------

/// One's-complement sum of `data` as big-endian 16-bit words (an odd trailing
/// byte is padded with zero), added to `acc`, not folded.
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Folds a 64-bit accumulator into a 16-bit one's-complement sum.
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The RFC 1071 Internet checksum of `data`: the one's complement of the
/// one's-complement sum of its big-endian 16-bit words. Write the result with
/// `to_be_bytes()`.
///
/// Computed over data that already contains a correct checksum field, the
/// result is 0.
#[must_use]
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
    let mut acc = sum_words(&src.octets(), 0);
    acc = sum_words(&dst.octets(), acc);
    acc + u64::from(proto) + len as u64
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: usize) -> u64 {
    let mut acc = sum_words(&src.octets(), 0);
    acc = sum_words(&dst.octets(), acc);
    acc + u64::from(next_header) + len as u64
}

/// Checksum of a transport segment (TCP, UDP, ...) over IPv4, including the
/// pseudo-header. `segment` is the whole transport header plus payload, with
/// its checksum field zero (to compute) or filled (then the result is 0).
#[must_use]
pub fn l4_checksum_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    !fold(sum_words(
        segment,
        pseudo_v4(src, dst, proto, segment.len()),
    ))
}

/// Checksum of a transport segment (TCP, UDP, ICMPv6) over IPv6, including
/// the pseudo-header (RFC 8200 section 8.1).
#[must_use]
pub fn l4_checksum_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, segment: &[u8]) -> u16 {
    !fold(sum_words(
        segment,
        pseudo_v6(src, dst, next_header, segment.len()),
    ))
}

/// Whether an IPv4 header (exactly `IHL * 4` bytes) carries a correct header
/// checksum.
#[must_use]
pub fn verify_ipv4_header(header: &[u8]) -> bool {
    header.len() >= IPV4_HLEN && internet_checksum(header) == 0
}

/// Whether a transport segment over IPv4 carries a correct checksum.
#[must_use]
pub fn verify_l4_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> bool {
    l4_checksum_v4(src, dst, proto, segment) == 0
}

/// Whether a transport segment over IPv6 carries a correct checksum.
#[must_use]
pub fn verify_l4_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, segment: &[u8]) -> bool {
    l4_checksum_v6(src, dst, next_header, segment) == 0
}

/// Whether an ICMPv4 message (header plus body) carries a correct checksum.
#[must_use]
pub fn verify_icmpv4(message: &[u8]) -> bool {
    message.len() >= 4 && internet_checksum(message) == 0
}

/// Pseudo-header transport checksum for an address pair of one family.
fn l4_checksum_ip(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => l4_checksum_v4(s, d, proto, segment),
        (IpAddr::V6(s), IpAddr::V6(d)) => l4_checksum_v6(s, d, proto, segment),
        _ => panic!("packet: source and destination of one IP layer have different families"),
    }
}

// ---------------------------------------------------------------------------
// TCP flags
// ---------------------------------------------------------------------------

/// TCP flag bits (byte 13 of the TCP header). Combine with `|`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// No flag set.
    pub const NONE: Self = Self(0);
    /// FIN.
    pub const FIN: Self = Self(0x01);
    /// SYN.
    pub const SYN: Self = Self(0x02);
    /// RST.
    pub const RST: Self = Self(0x04);
    /// PSH.
    pub const PSH: Self = Self(0x08);
    /// ACK.
    pub const ACK: Self = Self(0x10);
    /// URG.
    pub const URG: Self = Self(0x20);
    /// ECE.
    pub const ECE: Self = Self(0x40);
    /// CWR.
    pub const CWR: Self = Self(0x80);

    /// Whether every bit of `other` is set in `self`.
    #[must_use]
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw flag byte.
    #[must_use]
    pub const fn bits(self) -> u8 {
        self.0
    }
}

impl BitOr for TcpFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for TcpFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
        if self.0 == 0 {
            return f.write_str("TcpFlags(NONE)");
        }
        f.write_str("TcpFlags(")?;
        let mut first = true;
        for (bit, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << bit) != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str(")")
    }
}

// ---------------------------------------------------------------------------
// Builder specification types
// ---------------------------------------------------------------------------

/// An IPv6 extension header for [`PacketBuilder::ipv6_ext`].
///
/// Option-carrying headers are filled with padding options (valid TLVs);
/// routing data is zero. `len8` is the header's "Hdr Ext Len" field: the
/// header is `(len8 + 1) * 8` bytes long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtHeader {
    /// Hop-by-hop options (next header 0).
    HopByHop {
        /// Hdr Ext Len (8-octet units beyond the first 8).
        len8: u8,
    },
    /// Routing header (next header 43).
    Routing {
        /// Hdr Ext Len (8-octet units beyond the first 8).
        len8: u8,
        /// Routing type (e.g. 0, 2, 4 = SRH).
        routing_type: u8,
        /// Segments left.
        segments_left: u8,
    },
    /// Destination options (next header 60).
    DestOpts {
        /// Hdr Ext Len (8-octet units beyond the first 8).
        len8: u8,
    },
    /// Fragment header (next header 44), always 8 bytes.
    Fragment {
        /// Fragment offset in 8-byte units (13 bits).
        offset: u16,
        /// M flag: more fragments follow.
        more: bool,
        /// Identification.
        id: u32,
    },
}

impl ExtHeader {
    /// The next-header value that announces this extension header.
    #[must_use]
    pub const fn code(&self) -> u8 {
        match self {
            Self::HopByHop { .. } => NEXTHDR_HOP,
            Self::Routing { .. } => NEXTHDR_ROUTING,
            Self::DestOpts { .. } => NEXTHDR_DEST,
            Self::Fragment { .. } => NEXTHDR_FRAGMENT,
        }
    }

    /// Encoded length in bytes.
    #[must_use]
    pub const fn len(&self) -> usize {
        match self {
            Self::HopByHop { len8 } | Self::DestOpts { len8 } | Self::Routing { len8, .. } => {
                (*len8 as usize + 1) * 8
            }
            Self::Fragment { .. } => 8,
        }
    }

    /// Always false: an extension header is at least 8 bytes.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        false
    }

    fn encode(self, next: u8, out: &mut Vec<u8>) {
        match self {
            Self::HopByHop { len8 } | Self::DestOpts { len8 } => {
                out.extend_from_slice(&[next, len8]);
                push_pad_options(out, self.len() - 2);
            }
            Self::Routing {
                len8,
                routing_type,
                segments_left,
            } => {
                out.extend_from_slice(&[next, len8, routing_type, segments_left]);
                out.resize(out.len() + self.len() - 4, 0);
            }
            Self::Fragment { offset, more, id } => {
                assert!(
                    offset < 0x2000,
                    "ExtHeader::Fragment: offset {offset} exceeds 13 bits"
                );
                out.extend_from_slice(&[next, 0]);
                out.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
    }
}

/// Appends `n` bytes of IPv6 padding options (Pad1 / PadN).
fn push_pad_options(out: &mut Vec<u8>, mut n: usize) {
    while n > 0 {
        if n == 1 {
            out.push(0); // Pad1
            n = 0;
        } else {
            // PadN: type 1, length, zeros; at most 257 bytes per option.
            let chunk = n.min(257);
            out.extend_from_slice(&[1, (chunk - 2) as u8]);
            out.resize(out.len() + chunk - 2, 0);
            n -= chunk;
        }
    }
}

#[derive(Clone, Debug)]
struct Ipv4Spec {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    tos: u8,
    id: u16,
    dont_fragment: bool,
    more_fragments: bool,
    frag_offset: u16,
    options: Vec<u8>,
    ihl_override: Option<u8>,
    total_len_override: Option<u16>,
    checksum_override: Option<u16>,
}

#[derive(Clone, Debug)]
struct Ipv6Spec {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    traffic_class: u8,
    flow_label: u32,
    ext: Vec<ExtHeader>,
    payload_len_override: Option<u16>,
}

#[derive(Clone, Debug)]
enum IpKind {
    V4(Ipv4Spec),
    V6(Ipv6Spec),
}

#[derive(Clone, Debug)]
struct IpSpec {
    kind: IpKind,
    version_override: Option<u8>,
    proto_override: Option<u8>,
}

impl IpSpec {
    fn v4(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            kind: IpKind::V4(Ipv4Spec {
                src,
                dst,
                ttl: 64,
                tos: 0,
                id: 0,
                dont_fragment: false,
                more_fragments: false,
                frag_offset: 0,
                options: Vec::new(),
                ihl_override: None,
                total_len_override: None,
                checksum_override: None,
            }),
            version_override: None,
            proto_override: None,
        }
    }

    fn v6(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self {
            kind: IpKind::V6(Ipv6Spec {
                src,
                dst,
                hop_limit: 64,
                traffic_class: 0,
                flow_label: 0,
                ext: Vec::new(),
                payload_len_override: None,
            }),
            version_override: None,
            proto_override: None,
        }
    }

    fn addrs(&self) -> (IpAddr, IpAddr) {
        match &self.kind {
            IpKind::V4(s) => (s.src.into(), s.dst.into()),
            IpKind::V6(s) => (s.src.into(), s.dst.into()),
        }
    }

    /// Protocol number announcing this layer inside an outer IP layer.
    fn encap_proto(&self) -> u8 {
        match self.kind {
            IpKind::V4(_) => PROTO_IPIP,
            IpKind::V6(_) => PROTO_IPV6,
        }
    }

    fn ethertype(&self) -> u16 {
        match self.kind {
            IpKind::V4(_) => ETHERTYPE_IPV4,
            IpKind::V6(_) => ETHERTYPE_IPV6,
        }
    }

    /// Header length in bytes as built (without overrides).
    fn header_len(&self) -> usize {
        match &self.kind {
            IpKind::V4(s) => IPV4_HLEN + s.options.len(),
            IpKind::V6(s) => IPV6_HLEN + s.ext.iter().map(ExtHeader::len).sum::<usize>(),
        }
    }

    /// Prepends this layer's header to `payload` whose protocol is `upper`.
    fn wrap(&self, upper: u8, payload: &[u8]) -> Vec<u8> {
        let upper = self.proto_override.unwrap_or(upper);
        let mut out = Vec::with_capacity(self.header_len() + payload.len());
        match &self.kind {
            IpKind::V4(s) => {
                let hl = IPV4_HLEN + s.options.len();
                let ihl = s.ihl_override.unwrap_or((hl / 4) as u8);
                assert!(
                    ihl <= 15,
                    "ipv4_ihl_override: IHL {ihl} does not fit in 4 bits"
                );
                let tot = s.total_len_override.unwrap_or_else(|| {
                    u16::try_from(hl + payload.len())
                        .expect("PacketBuilder: IPv4 packet longer than 65535 bytes")
                });
                let frag = (u16::from(s.dont_fragment) << 14)
                    | (u16::from(s.more_fragments) << 13)
                    | s.frag_offset;
                out.push((self.version_override.unwrap_or(4) << 4) | ihl);
                out.push(s.tos);
                out.extend_from_slice(&tot.to_be_bytes());
                out.extend_from_slice(&s.id.to_be_bytes());
                out.extend_from_slice(&frag.to_be_bytes());
                out.extend_from_slice(&[s.ttl, upper, 0, 0]);
                out.extend_from_slice(&s.src.octets());
                out.extend_from_slice(&s.dst.octets());
                out.extend_from_slice(&s.options);
                let csum = s
                    .checksum_override
                    .unwrap_or_else(|| internet_checksum(&out));
                out[10..12].copy_from_slice(&csum.to_be_bytes());
            }
            IpKind::V6(s) => {
                let ext_len: usize = s.ext.iter().map(ExtHeader::len).sum();
                let plen = s.payload_len_override.unwrap_or_else(|| {
                    u16::try_from(ext_len + payload.len()).expect(
                        "PacketBuilder: IPv6 payload longer than 65535 bytes (no jumbograms)",
                    )
                });
                let first = (u32::from(self.version_override.unwrap_or(6)) << 28)
                    | (u32::from(s.traffic_class) << 20)
                    | s.flow_label;
                let next = s.ext.first().map_or(upper, ExtHeader::code);
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&plen.to_be_bytes());
                out.extend_from_slice(&[next, s.hop_limit]);
                out.extend_from_slice(&s.src.octets());
                out.extend_from_slice(&s.dst.octets());
                for (i, e) in s.ext.iter().enumerate() {
                    let next = s.ext.get(i + 1).map_or(upper, ExtHeader::code);
                    e.encode(next, &mut out);
                }
            }
        }
        out.extend_from_slice(payload);
        out
    }
}

#[derive(Clone, Debug)]
enum L4Spec {
    Tcp {
        sport: u16,
        dport: u16,
        flags: TcpFlags,
        seq: u32,
        ack: u32,
        window: u16,
        options: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        len_override: Option<u16>,
    },
    Icmp {
        ty: u8,
        code: u8,
        rest: [u8; 4],
    },
    Icmpv6 {
        ty: u8,
        code: u8,
        rest: [u8; 4],
    },
    Raw {
        proto: u8,
    },
}

// ---------------------------------------------------------------------------
// The builder
// ---------------------------------------------------------------------------

/// Builds Ethernet frames byte for byte. See the [module docs](self).
///
/// Misuse (a layer modifier with no matching layer, a transport before any IP
/// layer, ...) panics with a message naming the method.
#[derive(Clone, Debug)]
#[must_use]
pub struct PacketBuilder {
    src_mac: Mac,
    dst_mac: Mac,
    tags: Vec<(u16, u16)>,
    ethertype: Option<u16>,
    raw_payload: Option<Vec<u8>>,
    layers: Vec<IpSpec>,
    l4: Option<L4Spec>,
    payload: Vec<u8>,
    l4_checksum_override: Option<u16>,
}

impl Default for PacketBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketBuilder {
    /// A builder with all-zero MAC addresses (for packets only used through
    /// [`Self::build_ip_only`], e.g. the quoted packet of an ICMP error).
    pub fn new() -> Self {
        Self::eth([0; 6], [0; 6])
    }

    /// Starts a frame from `src_mac` to `dst_mac` (note the argument order:
    /// source first, like [`Self::ipv4`]; on the wire the destination comes
    /// first).
    pub fn eth(src_mac: Mac, dst_mac: Mac) -> Self {
        Self {
            src_mac,
            dst_mac,
            tags: Vec::new(),
            ethertype: None,
            raw_payload: None,
            layers: Vec::new(),
            l4: None,
            payload: Vec::new(),
            l4_checksum_override: None,
        }
    }

    // ----- L2 -------------------------------------------------------------

    /// Adds an 802.1Q tag (TPID 0x8100, PCP 0, DEI 0). Tags are emitted in
    /// call order, the first call being the outermost tag.
    pub fn vlan(self, vid: u16) -> Self {
        self.vlan_tag(TPID_8021Q, vid)
    }

    /// Adds an 802.1ad service tag (TPID 0x88a8) — alone, a single S-tag; or
    /// call [`Self::vlan`] afterwards for a QinQ stack.
    pub fn vlan_8021ad(self, vid: u16) -> Self {
        self.vlan_tag(TPID_8021AD, vid)
    }

    /// Adds an 802.1ad outer tag (0x88a8, `outer_vid`) then an 802.1Q inner
    /// tag (0x8100, `inner_vid`).
    pub fn qinq(self, outer_vid: u16, inner_vid: u16) -> Self {
        self.vlan_8021ad(outer_vid).vlan(inner_vid)
    }

    /// Adds a tag with any TPID; `vid` must fit in 12 bits (PCP/DEI zero).
    pub fn vlan_tag(self, tpid: u16, vid: u16) -> Self {
        assert!(
            vid < 0x1000,
            "PacketBuilder::vlan: VLAN id {vid} exceeds 12 bits"
        );
        self.vlan_tci(tpid, vid)
    }

    /// Adds a tag with any TPID and a raw TCI (PCP, DEI and VID).
    pub fn vlan_tci(mut self, tpid: u16, tci: u16) -> Self {
        self.tags.push((tpid, tci));
        self
    }

    /// Overrides the EtherType after the tags (otherwise derived from the
    /// first IP layer). With [`Self::raw_payload`], builds ARP or unknown
    /// EtherTypes; with IP layers, builds a mislabelled frame.
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }

    /// Sets the bytes following the L2 header verbatim. Excludes IP layers.
    pub fn raw_payload(mut self, bytes: &[u8]) -> Self {
        assert!(
            self.layers.is_empty(),
            "PacketBuilder::raw_payload: the frame already has an IP layer"
        );
        self.raw_payload = Some(bytes.to_vec());
        self
    }

    // ----- IP layers ------------------------------------------------------

    fn push_layer(mut self, layer: IpSpec, what: &str) -> Self {
        assert!(
            self.raw_payload.is_none(),
            "PacketBuilder::{what}: the frame already has a raw payload"
        );
        assert!(
            self.l4.is_none(),
            "PacketBuilder::{what}: IP layers must come before the transport"
        );
        self.layers.push(layer);
        self
    }

    /// Pushes an IPv4 layer (TTL 64, TOS 0, id 0, DF clear). A second IP
    /// layer is encapsulated in this one.
    pub fn ipv4(self, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        self.push_layer(IpSpec::v4(src, dst), "ipv4")
    }

    /// Pushes an IPv6 layer (hop limit 64, traffic class 0, flow label 0).
    pub fn ipv6(self, src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        self.push_layer(IpSpec::v6(src, dst), "ipv6")
    }

    fn layer_mut(&mut self, what: &str) -> &mut IpSpec {
        self.layers.last_mut().unwrap_or_else(|| {
            panic!("PacketBuilder::{what}: no IP layer yet (call .ipv4()/.ipv6())")
        })
    }

    fn v4_mut(&mut self, what: &str) -> &mut Ipv4Spec {
        match &mut self.layer_mut(what).kind {
            IpKind::V4(s) => s,
            IpKind::V6(_) => {
                panic!("PacketBuilder::{what}: the current IP layer is IPv6, not IPv4")
            }
        }
    }

    fn v6_mut(&mut self, what: &str) -> &mut Ipv6Spec {
        match &mut self.layer_mut(what).kind {
            IpKind::V6(s) => s,
            IpKind::V4(_) => {
                panic!("PacketBuilder::{what}: the current IP layer is IPv4, not IPv6")
            }
        }
    }

    /// Sets the TTL (IPv4) or hop limit (IPv6) of the current layer.
    pub fn ttl(mut self, ttl: u8) -> Self {
        match &mut self.layer_mut("ttl").kind {
            IpKind::V4(s) => s.ttl = ttl,
            IpKind::V6(s) => s.hop_limit = ttl,
        }
        self
    }

    /// Alias of [`Self::ttl`].
    pub fn hop_limit(self, hop_limit: u8) -> Self {
        self.ttl(hop_limit)
    }

    /// Sets the TOS byte (IPv4) or traffic class (IPv6) of the current layer.
    pub fn tos(mut self, tos: u8) -> Self {
        match &mut self.layer_mut("tos").kind {
            IpKind::V4(s) => s.tos = tos,
            IpKind::V6(s) => s.traffic_class = tos,
        }
        self
    }

    /// Sets the IPv6 flow label (20 bits) of the current layer.
    pub fn flow_label(mut self, label: u32) -> Self {
        assert!(
            label < 1 << 20,
            "PacketBuilder::flow_label: {label:#x} exceeds 20 bits"
        );
        self.v6_mut("flow_label").flow_label = label;
        self
    }

    /// Sets the IPv4 options of the current layer; padded with zero (End of
    /// Options List) to a multiple of 4 bytes, at most 40 bytes. IHL follows.
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        let mut opts = options.to_vec();
        opts.resize(options.len().div_ceil(4) * 4, 0);
        assert!(
            opts.len() <= 40,
            "PacketBuilder::ipv4_options: more than 40 bytes of options"
        );
        self.v4_mut("ipv4_options").options = opts;
        self
    }

    /// Sets the IPv4 identification of the current layer.
    pub fn ipv4_id(mut self, id: u16) -> Self {
        self.v4_mut("ipv4_id").id = id;
        self
    }

    /// Sets the IPv4 Don't Fragment flag of the current layer.
    pub fn dont_fragment(mut self) -> Self {
        self.v4_mut("dont_fragment").dont_fragment = true;
        self
    }

    /// Marks the current IPv4 layer as a fragment: offset in 8-byte units,
    /// the MF flag, and the identification. The transport (if any) is still
    /// built, with a checksum computed as if the packet were unfragmented;
    /// for a non-first fragment use [`Self::raw_l4`] so that no transport
    /// header is made up. For IPv6 use [`ExtHeader::Fragment`].
    pub fn fragment(mut self, offset: u16, more_fragments: bool, id: u16) -> Self {
        assert!(
            offset < 0x2000,
            "PacketBuilder::fragment: offset {offset} exceeds 13 bits"
        );
        let s = self.v4_mut("fragment");
        s.frag_offset = offset;
        s.more_fragments = more_fragments;
        s.id = id;
        self
    }

    /// Appends an IPv6 extension header to the current layer (repeatable,
    /// emitted in call order; next-header values are chained automatically).
    pub fn ipv6_ext(mut self, ext: ExtHeader) -> Self {
        self.v6_mut("ipv6_ext").ext.push(ext);
        self
    }

    /// Broken packets: writes `ihl` in the IHL field of the current IPv4
    /// layer instead of the real header length (the bytes emitted and the
    /// checksum range are unchanged).
    pub fn ipv4_ihl_override(mut self, ihl: u8) -> Self {
        self.v4_mut("ipv4_ihl_override").ihl_override = Some(ihl);
        self
    }

    /// Broken packets: writes `total_len` in the Total Length field of the
    /// current IPv4 layer (the checksum covers the overridden value).
    pub fn ipv4_total_len_override(mut self, total_len: u16) -> Self {
        self.v4_mut("ipv4_total_len_override").total_len_override = Some(total_len);
        self
    }

    /// Broken packets: writes `checksum` as the IPv4 header checksum of the
    /// current layer.
    pub fn ipv4_checksum_override(mut self, checksum: u16) -> Self {
        self.v4_mut("ipv4_checksum_override").checksum_override = Some(checksum);
        self
    }

    /// Broken packets: writes `len` in the IPv6 Payload Length field of the
    /// current layer.
    pub fn ipv6_payload_len_override(mut self, len: u16) -> Self {
        self.v6_mut("ipv6_payload_len_override")
            .payload_len_override = Some(len);
        self
    }

    /// Broken packets: writes `version` in the version nibble of the current
    /// layer (the rest of the header keeps its family's layout).
    pub fn ip_version_override(mut self, version: u8) -> Self {
        assert!(
            version < 16,
            "PacketBuilder::ip_version_override: {version} exceeds 4 bits"
        );
        self.layer_mut("ip_version_override").version_override = Some(version);
        self
    }

    /// Writes `proto` as the current layer's upper-layer protocol (IPv4
    /// protocol; IPv6 next header of the last header in the chain) instead of
    /// the real one. Transport checksums still use the real protocol.
    pub fn ip_proto_override(mut self, proto: u8) -> Self {
        self.layer_mut("ip_proto_override").proto_override = Some(proto);
        self
    }

    // ----- Transport ------------------------------------------------------

    fn set_l4(mut self, l4: L4Spec, what: &str) -> Self {
        assert!(
            !self.layers.is_empty(),
            "PacketBuilder::{what}: no IP layer yet (call .ipv4()/.ipv6() first)"
        );
        assert!(
            self.l4.is_none(),
            "PacketBuilder::{what}: the transport is already set"
        );
        self.l4 = Some(l4);
        self
    }

    fn inner_is_v6(&self) -> bool {
        matches!(self.layers.last().map(|l| &l.kind), Some(IpKind::V6(_)))
    }

    /// TCP from `sport` to `dport` with `flags` (seq 1, ack 0, window 65535,
    /// no options).
    pub fn tcp(self, sport: u16, dport: u16, flags: TcpFlags) -> Self {
        let l4 = L4Spec::Tcp {
            sport,
            dport,
            flags,
            seq: 1,
            ack: 0,
            window: 65535,
            options: Vec::new(),
        };
        self.set_l4(l4, "tcp")
    }

    fn tcp_mut(&mut self, what: &str) -> (&mut u32, &mut u32, &mut u16, &mut Vec<u8>) {
        match &mut self.l4 {
            Some(L4Spec::Tcp {
                seq,
                ack,
                window,
                options,
                ..
            }) => (seq, ack, window, options),
            _ => panic!("PacketBuilder::{what}: the transport is not TCP (call .tcp() first)"),
        }
    }

    /// Sets the TCP sequence number.
    pub fn tcp_seq(mut self, seq: u32) -> Self {
        *self.tcp_mut("tcp_seq").0 = seq;
        self
    }

    /// Sets the TCP acknowledgment number.
    pub fn tcp_ack(mut self, ack: u32) -> Self {
        *self.tcp_mut("tcp_ack").1 = ack;
        self
    }

    /// Sets the TCP window.
    pub fn tcp_window(mut self, window: u16) -> Self {
        *self.tcp_mut("tcp_window").2 = window;
        self
    }

    /// Sets the TCP options, padded with zero (EOL) to a multiple of 4 bytes,
    /// at most 40 bytes; the data offset follows.
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        let mut opts = options.to_vec();
        opts.resize(options.len().div_ceil(4) * 4, 0);
        assert!(
            opts.len() <= 40,
            "PacketBuilder::tcp_options: more than 40 bytes of options"
        );
        *self.tcp_mut("tcp_options").3 = opts;
        self
    }

    /// UDP from `sport` to `dport`.
    pub fn udp(self, sport: u16, dport: u16) -> Self {
        self.set_l4(
            L4Spec::Udp {
                sport,
                dport,
                len_override: None,
            },
            "udp",
        )
    }

    /// Broken packets: writes `len` in the UDP length field.
    pub fn udp_len_override(mut self, len: u16) -> Self {
        match &mut self.l4 {
            Some(L4Spec::Udp { len_override, .. }) => *len_override = Some(len),
            _ => panic!("PacketBuilder::udp_len_override: the transport is not UDP"),
        }
        self
    }

    /// Any ICMP (v4) message: type, code, the 4 bytes after the checksum;
    /// the body is [`Self::payload`].
    pub fn icmp(self, ty: u8, code: u8, rest: [u8; 4]) -> Self {
        assert!(
            !self.inner_is_v6(),
            "PacketBuilder::icmp: the inner IP layer is IPv6 (use icmpv6)"
        );
        self.set_l4(L4Spec::Icmp { ty, code, rest }, "icmp")
    }

    /// ICMP echo request (type 8) with identifier and sequence number.
    pub fn icmp_echo(self, id: u16, seq: u16) -> Self {
        self.icmp(8, 0, echo_rest(id, seq))
    }

    /// ICMP echo reply (type 0).
    pub fn icmp_echo_reply(self, id: u16, seq: u16) -> Self {
        self.icmp(0, 0, echo_rest(id, seq))
    }

    /// ICMP destination unreachable, fragmentation needed (type 3 code 4)
    /// with the next-hop MTU, quoting `quoted` (an IP header plus the first
    /// bytes of the original datagram, e.g. `builder.build_ip_only()`
    /// truncated). A later [`Self::payload`] replaces the quote.
    pub fn icmp_frag_needed(self, mtu: u16, quoted: &[u8]) -> Self {
        let [hi, lo] = mtu.to_be_bytes();
        self.icmp(3, 4, [0, 0, hi, lo]).payload(quoted)
    }

    /// Any ICMPv6 message: type, code, the 4 bytes after the checksum; the
    /// body is [`Self::payload`].
    pub fn icmpv6(self, ty: u8, code: u8, rest: [u8; 4]) -> Self {
        assert!(
            self.inner_is_v6(),
            "PacketBuilder::icmpv6: the inner IP layer is IPv4 (use icmp)"
        );
        self.set_l4(L4Spec::Icmpv6 { ty, code, rest }, "icmpv6")
    }

    /// ICMPv6 echo request (type 128).
    pub fn icmpv6_echo(self, id: u16, seq: u16) -> Self {
        self.icmpv6(128, 0, echo_rest(id, seq))
    }

    /// ICMPv6 echo reply (type 129).
    pub fn icmpv6_echo_reply(self, id: u16, seq: u16) -> Self {
        self.icmpv6(129, 0, echo_rest(id, seq))
    }

    /// ICMPv6 packet too big (type 2 code 0) with the MTU, quoting `quoted`.
    pub fn icmpv6_packet_too_big(self, mtu: u32, quoted: &[u8]) -> Self {
        self.icmpv6(2, 0, mtu.to_be_bytes()).payload(quoted)
    }

    /// No transport header: the IP payload is [`Self::payload`] verbatim and
    /// the protocol field says `proto`. For non-first fragments, GRE, etc.
    pub fn raw_l4(self, proto: u8) -> Self {
        self.set_l4(L4Spec::Raw { proto }, "raw_l4")
    }

    /// Sets the L4 payload (after the transport header; the ICMP body).
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        bytes.clone_into(&mut self.payload);
        self
    }

    /// Broken packets (or a zero UDP checksum): writes `checksum` as the
    /// transport checksum instead of the computed one.
    pub fn l4_checksum_override(mut self, checksum: u16) -> Self {
        self.l4_checksum_override = Some(checksum);
        self
    }

    // ----- Output ---------------------------------------------------------

    /// Length of the L2 header (Ethernet plus tags).
    pub fn l2_len(&self) -> usize {
        ETH_HLEN + 4 * self.tags.len()
    }

    /// The whole Ethernet frame.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let ethertype = self.ethertype.unwrap_or_else(|| {
            self.layers.first().map_or_else(
                || panic!("PacketBuilder::build: no IP layer and no .ethertype()"),
                IpSpec::ethertype,
            )
        });
        let mut out = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        for &(tpid, tci) in &self.tags {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&tci.to_be_bytes());
        }
        out.extend_from_slice(&ethertype.to_be_bytes());
        if let Some(raw) = &self.raw_payload {
            out.extend_from_slice(raw);
        } else if !self.layers.is_empty() {
            out.extend_from_slice(&self.build_ip_only());
        }
        out
    }

    /// The packet from the outermost IP header on (no L2 header).
    #[must_use]
    pub fn build_ip_only(&self) -> Vec<u8> {
        let inner = self
            .layers
            .last()
            .expect("PacketBuilder::build_ip_only: no IP layer (call .ipv4()/.ipv6())");
        let (mut data, mut proto) = self.build_l4(inner);
        for layer in self.layers.iter().rev() {
            data = layer.wrap(proto, &data);
            proto = layer.encap_proto();
        }
        data
    }

    /// The transport segment and its protocol number.
    fn build_l4(&self, inner: &IpSpec) -> (Vec<u8>, u8) {
        let l4 = self
            .l4
            .as_ref()
            .expect("PacketBuilder: no transport (call .tcp/.udp/.icmp*/.raw_l4)");
        let (src, dst) = inner.addrs();
        let mut seg = Vec::new();
        let (proto, csum_at) = match l4 {
            L4Spec::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
                window,
                options,
            } => {
                let doff = ((TCP_HLEN + options.len()) / 4) as u8;
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                seg.extend_from_slice(&ack.to_be_bytes());
                seg.extend_from_slice(&[doff << 4, flags.0]);
                seg.extend_from_slice(&window.to_be_bytes());
                seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                seg.extend_from_slice(options);
                (PROTO_TCP, Some(16))
            }
            L4Spec::Udp {
                sport,
                dport,
                len_override,
            } => {
                let len = len_override.unwrap_or_else(|| {
                    u16::try_from(UDP_HLEN + self.payload.len())
                        .expect("PacketBuilder: UDP datagram longer than 65535 bytes")
                });
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&len.to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                (PROTO_UDP, Some(6))
            }
            L4Spec::Icmp { ty, code, rest } | L4Spec::Icmpv6 { ty, code, rest } => {
                seg.extend_from_slice(&[*ty, *code, 0, 0]);
                seg.extend_from_slice(rest);
                let proto = if matches!(l4, L4Spec::Icmp { .. }) {
                    PROTO_ICMP
                } else {
                    PROTO_ICMPV6
                };
                (proto, Some(2))
            }
            L4Spec::Raw { proto } => (*proto, None),
        };
        seg.extend_from_slice(&self.payload);
        if let Some(at) = csum_at {
            let csum = self.l4_checksum_override.unwrap_or_else(|| {
                let c = if proto == PROTO_ICMP {
                    internet_checksum(&seg)
                } else {
                    l4_checksum_ip(src, dst, proto, &seg)
                };
                // UDP transmits a computed 0 as 0xffff (0 means "no checksum").
                if proto == PROTO_UDP && c == 0 {
                    0xffff
                } else {
                    c
                }
            });
            seg[at..at + 2].copy_from_slice(&csum.to_be_bytes());
        }
        (seg, proto)
    }

    /// Builds the datagram, then splits its *outermost* IP layer into real
    /// fragments carrying at most `max_fragment_payload` bytes each (rounded
    /// down to a multiple of 8), with identification `id`. The first
    /// fragment thus carries the transport header with the checksum of the
    /// whole datagram.
    ///
    /// IPv4: every fragment copies the header (options included) and gets
    /// Total Length, MF, offset and a fresh checksum (DF is kept); `id` must
    /// fit in 16 bits. IPv6: all extension headers given to the layer are
    /// treated as the unfragmentable part; a Fragment header is inserted
    /// after them. The layer must not already be a fragment.
    #[must_use]
    pub fn build_fragments(&self, max_fragment_payload: usize, id: u32) -> Vec<Vec<u8>> {
        self.build_fragments_after(max_fragment_payload, id, usize::MAX)
    }

    /// [`Self::build_fragments`] with only the first `unfragmentable` IPv6
    /// extension headers in the unfragmentable part: the Fragment header
    /// goes after them, and the others travel in the fragmentable part (in
    /// the first fragment only), as RFC 8200 4.5 allows for destination
    /// options meant for the final destination. IPv4 ignores it.
    #[must_use]
    pub fn build_fragments_after(
        &self,
        max_fragment_payload: usize,
        id: u32,
        unfragmentable: usize,
    ) -> Vec<Vec<u8>> {
        let chunk = max_fragment_payload & !7;
        assert!(
            chunk >= 8,
            "PacketBuilder::build_fragments: fragment payload must be >= 8 bytes"
        );
        let outer = self
            .layers
            .first()
            .expect("PacketBuilder::build_fragments: no IP layer");
        let frame = self.build();
        let l2 = self.l2_len();
        let hl = match &outer.kind {
            IpKind::V6(s) if unfragmentable < s.ext.len() => {
                IPV6_HLEN
                    + s.ext[..unfragmentable]
                        .iter()
                        .map(ExtHeader::len)
                        .sum::<usize>()
            }
            _ => outer.header_len(),
        };
        let (head, body) = frame.split_at(l2 + hl);
        let count = body.len().div_ceil(chunk).max(1);
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let piece = &body[(i * chunk).min(body.len())..((i + 1) * chunk).min(body.len())];
            let more = i + 1 < count;
            let offset = u16::try_from(i * chunk / 8)
                .ok()
                .filter(|&o| o < 0x2000)
                .expect("PacketBuilder::build_fragments: fragment offset exceeds 13 bits");
            let mut f = head.to_vec();
            match &outer.kind {
                IpKind::V4(s) => {
                    assert!(
                        s.frag_offset == 0 && !s.more_fragments,
                        "PacketBuilder::build_fragments: the IPv4 layer is already a fragment"
                    );
                    let id = u16::try_from(id)
                        .expect("PacketBuilder::build_fragments: IPv4 id > 16 bits");
                    let ip = &mut f[l2..];
                    let tot = (hl + piece.len()) as u16;
                    let frag =
                        (u16::from(s.dont_fragment) << 14) | (u16::from(more) << 13) | offset;
                    ip[2..4].copy_from_slice(&tot.to_be_bytes());
                    ip[4..6].copy_from_slice(&id.to_be_bytes());
                    ip[6..8].copy_from_slice(&frag.to_be_bytes());
                    ip[10..12].copy_from_slice(&[0, 0]);
                    let csum = internet_checksum(&ip[..hl]);
                    ip[10..12].copy_from_slice(&csum.to_be_bytes());
                }
                IpKind::V6(s) => {
                    assert!(
                        !s.ext
                            .iter()
                            .any(|e| matches!(e, ExtHeader::Fragment { .. })),
                        "PacketBuilder::build_fragments: the IPv6 layer already has a Fragment header"
                    );
                    // The next-header field of the last header of the
                    // unfragmentable part.
                    let kept = &s.ext[..unfragmentable.min(s.ext.len())];
                    let nh_at = match kept.split_last() {
                        None => l2 + 6,
                        Some((_, before)) => {
                            l2 + IPV6_HLEN + before.iter().map(ExtHeader::len).sum::<usize>()
                        }
                    };
                    let upper = f[nh_at];
                    f[nh_at] = NEXTHDR_FRAGMENT;
                    ExtHeader::Fragment { offset, more, id }.encode(upper, &mut f);
                    let plen = (hl - IPV6_HLEN + 8 + piece.len()) as u16;
                    f[l2 + 4..l2 + 6].copy_from_slice(&plen.to_be_bytes());
                }
            }
            f.extend_from_slice(piece);
            out.push(f);
        }
        out
    }
}

fn echo_rest(id: u16, seq: u16) -> [u8; 4] {
    let [a, b] = id.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    [a, b, c, d]
}

/// The 28-byte body of an Ethernet/IPv4 ARP request (use with
/// `.ethertype(ETHERTYPE_ARP).raw_payload(..)`).
#[must_use]
pub fn arp_request(sender_mac: Mac, sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut out = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    out.extend_from_slice(&sender_mac);
    out.extend_from_slice(&sender_ip.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target_ip.octets());
    out
}

/// Encapsulates the IP packet of an Ethernet frame (tags kept) in an outer
/// IPv4 or IPv6 header from `src` to `dst`, the way an IP-in-IP tunnel would:
/// outer TTL / hop limit 64, TOS 0, id 0, DF clear, protocol 4 or 41 from the
/// inner version nibble; the EtherType becomes the outer family's.
///
/// Panics if `src` and `dst` are of different families.
pub fn encap_ip(frame: &[u8], src: IpAddr, dst: IpAddr) -> Result<Vec<u8>, DecodeError> {
    let (l2, _, _) = parse_l2(frame)?;
    let inner = &frame[l2..];
    let proto = match inner.first().map(|b| b >> 4) {
        Some(4) => PROTO_IPIP,
        Some(6) => PROTO_IPV6,
        Some(v) => {
            return Err(DecodeError::BadVersion {
                offset: l2,
                expected: None,
                found: v,
            });
        }
        None => {
            return Err(DecodeError::Truncated {
                layer: "ip",
                offset: l2,
                needed: 1,
                available: 0,
            });
        }
    };
    let outer = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpSpec::v4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => IpSpec::v6(s, d),
        _ => panic!("encap_ip: outer source and destination have different families"),
    };
    let mut out = frame[..l2].to_vec();
    out[l2 - 2..l2].copy_from_slice(&outer.ethertype().to_be_bytes());
    out.extend_from_slice(&outer.wrap(proto, inner));
    Ok(out)
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

/// Why a frame could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A header needed to go on is not entirely within the buffer (or within
    /// the enclosing IP packet's length).
    Truncated {
        /// Which header.
        layer: &'static str,
        /// Its offset in the buffer.
        offset: usize,
        /// Bytes needed from `offset`.
        needed: usize,
        /// Bytes available from `offset`.
        available: usize,
    },
    /// An IP header's version nibble is not the one announced (by the
    /// EtherType or the outer protocol), or is neither 4 nor 6.
    BadVersion {
        /// Offset of the IP header.
        offset: usize,
        /// The announced version, if any.
        expected: Option<u8>,
        /// The version nibble found.
        found: u8,
    },
    /// An IPv4 IHL below 5.
    BadIhl {
        /// Offset of the IPv4 header.
        offset: usize,
        /// The IHL found.
        ihl: u8,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated {
                layer,
                offset,
                needed,
                available,
            } => write!(
                f,
                "truncated {layer} header at offset {offset}: need {needed} bytes, have {available}"
            ),
            Self::BadVersion {
                offset,
                expected: Some(e),
                found,
            } => {
                write!(f, "IP version {found} at offset {offset}, expected {e}")
            }
            Self::BadVersion {
                offset,
                expected: None,
                found,
            } => {
                write!(f, "unknown IP version {found} at offset {offset}")
            }
            Self::BadIhl { offset, ihl } => write!(f, "IPv4 IHL {ihl} < 5 at offset {offset}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// One VLAN tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanTag {
    /// Tag protocol identifier (0x8100, 0x88a8, 0x9100).
    pub tpid: u16,
    /// Priority code point.
    pub pcp: u8,
    /// Drop eligible indicator.
    pub dei: bool,
    /// VLAN id.
    pub vid: u16,
}

/// Fragmentation state of an IP layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentInfo {
    /// Offset in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    /// Identification (IPv4: 16 bits; IPv6: Fragment header's 32 bits).
    pub id: u32,
}

/// One decoded IP header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpLayer {
    /// Offset of the header in the decoded buffer.
    pub offset: usize,
    /// 4 or 6.
    pub version: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// TOS byte (IPv4) or traffic class (IPv6).
    pub tos: u8,
    /// IPv6 flow label; 0 for IPv4.
    pub flow_label: u32,
    /// IPv4 protocol, or the next header of the IPv6 fixed header.
    pub next_header: u8,
    /// Upper-layer protocol: the IPv4 protocol, or the IPv6 next header after
    /// all extension headers.
    pub protocol: u8,
    /// Header length: IHL * 4, or 40 plus the extension headers.
    pub header_len: usize,
    /// Declared total length: IPv4 Total Length, IPv6 40 + Payload Length.
    pub total_len: usize,
    /// Declared payload length: IPv4 Total Length - IHL * 4 (saturating),
    /// IPv6 Payload Length (extension headers included).
    pub payload_len: usize,
    /// Bytes present in the buffer from `offset` on (bounded by the
    /// enclosing IP packet): less than `total_len` if truncated.
    pub captured_len: usize,
    /// IPv4 header checksum field; 0 for IPv6.
    pub checksum: u16,
    /// IPv4 header checksum validity; always true for IPv6 (no checksum).
    pub checksum_ok: bool,
    /// IPv4 identification; 0 for IPv6.
    pub ipv4_id: u16,
    /// IPv4 DF flag; false for IPv6.
    pub dont_fragment: bool,
    /// IPv4 with MF set or a non-zero offset, or IPv6 with a Fragment header.
    pub fragment: Option<FragmentInfo>,
    /// IPv4 options bytes.
    pub options: Vec<u8>,
    /// IPv6 extension header codes, in order.
    pub ext_headers: Vec<u8>,
    /// The packet bytes from the header to its declared end (or to the end
    /// of the buffer / enclosing packet if shorter): compare these to check
    /// that an encapsulated packet is unchanged.
    pub bytes: Vec<u8>,
}

impl IpLayer {
    /// Whether the layer is a fragment with a non-zero offset (its payload
    /// does not start with the transport header).
    #[must_use]
    pub fn is_later_fragment(&self) -> bool {
        self.fragment.is_some_and(|f| f.offset != 0)
    }

    /// Whether the declared length exceeds the bytes present.
    #[must_use]
    pub fn is_truncated(&self) -> bool {
        self.captured_len < self.total_len
    }
}

/// A decoded TCP header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpHeader {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Header length in bytes (data offset * 4).
    pub header_len: usize,
    /// Flags.
    pub flags: TcpFlags,
    /// Window.
    pub window: u16,
    /// Checksum field.
    pub checksum: u16,
    /// Checksum validity over the segment present (pseudo-header included).
    pub checksum_ok: bool,
    /// Options bytes.
    pub options: Vec<u8>,
}

/// A decoded UDP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHeader {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Length field.
    pub length: u16,
    /// Checksum field.
    pub checksum: u16,
    /// Checksum validity (pseudo-header included). A zero checksum over IPv4
    /// means "none" and counts as valid; over IPv6 it is invalid.
    pub checksum_ok: bool,
}

/// A decoded ICMP or ICMPv6 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpHeader {
    /// Type.
    pub ty: u8,
    /// Code.
    pub code: u8,
    /// Checksum field.
    pub checksum: u16,
    /// Checksum validity (ICMPv6: pseudo-header included).
    pub checksum_ok: bool,
    /// The 4 bytes after the checksum (echo id/seq, MTU, pointer, unused).
    pub rest: [u8; 4],
}

impl IcmpHeader {
    /// Echo identifier (bytes 4..6).
    #[must_use]
    pub fn echo_id(&self) -> u16 {
        u16::from_be_bytes([self.rest[0], self.rest[1]])
    }

    /// Echo sequence number (bytes 6..8).
    #[must_use]
    pub fn echo_seq(&self) -> u16 {
        u16::from_be_bytes([self.rest[2], self.rest[3]])
    }

    /// ICMPv4 frag-needed next-hop MTU (bytes 6..8).
    #[must_use]
    pub fn mtu_v4(&self) -> u16 {
        u16::from_be_bytes([self.rest[2], self.rest[3]])
    }

    /// ICMPv6 packet-too-big MTU (bytes 4..8).
    #[must_use]
    pub fn mtu_v6(&self) -> u32 {
        u32::from_be_bytes(self.rest)
    }
}

/// The innermost transport header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp(TcpHeader),
    /// UDP.
    Udp(UdpHeader),
    /// ICMP over IPv4.
    Icmp(IcmpHeader),
    /// ICMPv6.
    Icmpv6(IcmpHeader),
}

impl Transport {
    /// Whether the transport checksum is valid.
    #[must_use]
    pub fn checksum_ok(&self) -> bool {
        match self {
            Self::Tcp(h) => h.checksum_ok,
            Self::Udp(h) => h.checksum_ok,
            Self::Icmp(h) | Self::Icmpv6(h) => h.checksum_ok,
        }
    }

    /// `(sport, dport)` for TCP and UDP.
    #[must_use]
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self {
            Self::Tcp(h) => Some((h.sport, h.dport)),
            Self::Udp(h) => Some((h.sport, h.dport)),
            Self::Icmp(_) | Self::Icmpv6(_) => None,
        }
    }
}

/// A decoded frame (or IP packet, see [`decode_ip`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Destination MAC (zero from [`decode_ip`]).
    pub eth_dst: Mac,
    /// Source MAC (zero from [`decode_ip`]).
    pub eth_src: Mac,
    /// VLAN id of the outermost tag.
    pub vlan: Option<u16>,
    /// All tags, outermost first.
    pub vlan_tags: Vec<VlanTag>,
    /// EtherType after the tags ([`decode_ip`]: derived from the version).
    pub ethertype: u16,
    /// Offset of the first byte after the L2 header.
    pub l3_offset: usize,
    /// IP layers, outermost first.
    pub ip: Vec<IpLayer>,
    /// The innermost layer's transport header, if its protocol is TCP, UDP,
    /// ICMP or ICMPv6, the packet is not a later fragment and the whole
    /// header is present.
    pub transport: Option<Transport>,
    /// TCP/UDP ports whenever at least their first 4 bytes are present (also
    /// when the rest of the header is cut, as in an ICMP quote).
    pub ports: Option<(u16, u16)>,
    /// The L4 payload: after the transport header; the whole IP payload when
    /// there is no decoded transport; the L2 payload for non-IP frames.
    pub payload: Vec<u8>,
}

impl Decoded {
    /// The outermost IP layer.
    #[must_use]
    pub fn outer(&self) -> Option<&IpLayer> {
        self.ip.first()
    }

    /// The innermost IP layer.
    #[must_use]
    pub fn inner(&self) -> Option<&IpLayer> {
        self.ip.last()
    }

    /// The TCP header, if the transport is TCP.
    #[must_use]
    pub fn tcp(&self) -> Option<&TcpHeader> {
        match &self.transport {
            Some(Transport::Tcp(h)) => Some(h),
            _ => None,
        }
    }

    /// The UDP header, if the transport is UDP.
    #[must_use]
    pub fn udp(&self) -> Option<&UdpHeader> {
        match &self.transport {
            Some(Transport::Udp(h)) => Some(h),
            _ => None,
        }
    }

    /// The ICMP or ICMPv6 header, if any.
    #[must_use]
    pub fn icmp(&self) -> Option<&IcmpHeader> {
        match &self.transport {
            Some(Transport::Icmp(h) | Transport::Icmpv6(h)) => Some(h),
            _ => None,
        }
    }

    /// For an ICMP error (v4 types 3, 4, 5, 11, 12; v6 types below 128), the
    /// quoted packet decoded with [`decode_ip`]; its `transport` is `None`
    /// when the quote stops inside the transport header, but `ports` is set
    /// as soon as 4 bytes of TCP/UDP are quoted.
    #[must_use]
    pub fn icmp_quoted(&self) -> Option<Result<Decoded, DecodeError>> {
        let is_error = match &self.transport {
            Some(Transport::Icmp(h)) => matches!(h.ty, 3 | 4 | 5 | 11 | 12),
            Some(Transport::Icmpv6(h)) => h.ty < 128,
            _ => false,
        };
        is_error.then(|| decode_ip(&self.payload))
    }
}

fn truncated(
    layer: &'static str,
    buf: &[u8],
    offset: usize,
    needed: usize,
    limit: usize,
) -> DecodeError {
    DecodeError::Truncated {
        layer,
        offset,
        needed,
        available: limit.min(buf.len()).saturating_sub(offset),
    }
}

/// `buf[offset..offset + n]` if it ends within `limit`.
fn take<'a>(
    buf: &'a [u8],
    offset: usize,
    n: usize,
    limit: usize,
    layer: &'static str,
) -> Result<&'a [u8], DecodeError> {
    let end = offset.checked_add(n).filter(|&e| e <= limit.min(buf.len()));
    match end {
        Some(end) => Ok(&buf[offset..end]),
        None => Err(truncated(layer, buf, offset, n, limit)),
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses the L2 header: (length, tags, EtherType).
fn parse_l2(frame: &[u8]) -> Result<(usize, Vec<VlanTag>, u16), DecodeError> {
    let eth = take(frame, 0, ETH_HLEN, frame.len(), "ethernet")?;
    let mut ethertype = be16(eth, 12);
    let mut off = ETH_HLEN;
    let mut tags = Vec::new();
    while matches!(ethertype, TPID_8021Q | TPID_8021AD | TPID_QINQ_LEGACY) {
        let t = take(frame, off, 4, frame.len(), "vlan")?;
        let tci = be16(t, 0);
        tags.push(VlanTag {
            tpid: ethertype,
            pcp: (tci >> 13) as u8,
            dei: tci & 0x1000 != 0,
            vid: tci & 0x0fff,
        });
        ethertype = be16(t, 2);
        off += 4;
    }
    Ok((off, tags, ethertype))
}

/// Decodes an Ethernet frame. Fails only when a header needed to go on is
/// cut or structurally invalid (IP version, IHL); lengths that disagree with
/// the buffer are reported in [`IpLayer`] (`total_len` vs `captured_len`),
/// and checksums in the `checksum_ok` fields.
pub fn decode(frame: &[u8]) -> Result<Decoded, DecodeError> {
    let (l2, tags, ethertype) = parse_l2(frame)?;
    let mut d = Decoded {
        eth_dst: frame[0..6].try_into().unwrap_or_default(),
        eth_src: frame[6..12].try_into().unwrap_or_default(),
        vlan: tags.first().map(|t| t.vid),
        vlan_tags: tags,
        ethertype,
        l3_offset: l2,
        ip: Vec::new(),
        transport: None,
        ports: None,
        payload: Vec::new(),
    };
    match ethertype {
        ETHERTYPE_IPV4 => decode_ip_chain(frame, l2, Some(4), &mut d)?,
        ETHERTYPE_IPV6 => decode_ip_chain(frame, l2, Some(6), &mut d)?,
        _ => frame[l2..].clone_into(&mut d.payload),
    }
    Ok(d)
}

/// Decodes a buffer that starts with an IP header (version from the first
/// nibble), e.g. the quote of an ICMP error or [`PacketBuilder::build_ip_only`]
/// output. L2 fields are zero, `ethertype` follows the version.
pub fn decode_ip(packet: &[u8]) -> Result<Decoded, DecodeError> {
    let version = take(packet, 0, 1, packet.len(), "ip")?[0] >> 4;
    let ethertype = match version {
        4 => ETHERTYPE_IPV4,
        6 => ETHERTYPE_IPV6,
        v => {
            return Err(DecodeError::BadVersion {
                offset: 0,
                expected: None,
                found: v,
            });
        }
    };
    let mut d = Decoded {
        eth_dst: [0; 6],
        eth_src: [0; 6],
        vlan: None,
        vlan_tags: Vec::new(),
        ethertype,
        l3_offset: 0,
        ip: Vec::new(),
        transport: None,
        ports: None,
        payload: Vec::new(),
    };
    decode_ip_chain(packet, 0, None, &mut d)?;
    Ok(d)
}

/// Decodes IP layers from `off`, following IP-in-IP, then the transport.
fn decode_ip_chain(
    buf: &[u8],
    mut off: usize,
    mut expected: Option<u8>,
    d: &mut Decoded,
) -> Result<(), DecodeError> {
    let mut limit = buf.len();
    loop {
        let version = take(buf, off, 1, limit, "ip")?[0] >> 4;
        if let Some(e) = expected
            && e != version
        {
            return Err(DecodeError::BadVersion {
                offset: off,
                expected,
                found: version,
            });
        }
        let (layer, start, end) = match version {
            4 => parse_ipv4(buf, off, limit)?,
            6 => parse_ipv6(buf, off, limit)?,
            v => {
                return Err(DecodeError::BadVersion {
                    offset: off,
                    expected: None,
                    found: v,
                });
            }
        };
        let (proto, src, dst) = (layer.protocol, layer.src, layer.dst);
        let is_later_fragment = layer.is_later_fragment();
        d.ip.push(layer);
        if is_later_fragment {
            buf[start..end].clone_into(&mut d.payload);
            return Ok(());
        }
        match proto {
            PROTO_IPIP => expected = Some(4),
            PROTO_IPV6 => expected = Some(6),
            _ => {
                decode_transport(&buf[start..end], src, dst, proto, d);
                return Ok(());
            }
        }
        off = start;
        limit = end;
    }
}

/// Parses an IPv4 header: the layer, and the payload's start and end.
fn parse_ipv4(
    buf: &[u8],
    off: usize,
    limit: usize,
) -> Result<(IpLayer, usize, usize), DecodeError> {
    let h = take(buf, off, IPV4_HLEN, limit, "ipv4")?;
    let ihl = h[0] & 0x0f;
    if ihl < 5 {
        return Err(DecodeError::BadIhl { offset: off, ihl });
    }
    let hl = usize::from(ihl) * 4;
    let h = take(buf, off, hl, limit, "ipv4 options")?;
    let total_len = usize::from(be16(h, 2));
    let avail_end = limit.min(buf.len());
    let end = (off + total_len).min(avail_end).max(off + hl);
    let frag = be16(h, 6);
    let id = be16(h, 4);
    let (more, frag_offset) = (frag & 0x2000 != 0, frag & 0x1fff);
    let layer = IpLayer {
        offset: off,
        version: 4,
        src: Ipv4Addr::new(h[12], h[13], h[14], h[15]).into(),
        dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]).into(),
        ttl: h[8],
        tos: h[1],
        flow_label: 0,
        next_header: h[9],
        protocol: h[9],
        header_len: hl,
        total_len,
        payload_len: total_len.saturating_sub(hl),
        captured_len: avail_end - off,
        checksum: be16(h, 10),
        checksum_ok: verify_ipv4_header(h),
        ipv4_id: id,
        dont_fragment: frag & 0x4000 != 0,
        fragment: (more || frag_offset != 0).then_some(FragmentInfo {
            offset: frag_offset,
            more,
            id: u32::from(id),
        }),
        options: h[IPV4_HLEN..].to_vec(),
        ext_headers: Vec::new(),
        bytes: buf[off..end].to_vec(),
    };
    Ok((layer, off + hl, end))
}

/// Parses an IPv6 header and its extension headers.
fn parse_ipv6(
    buf: &[u8],
    off: usize,
    limit: usize,
) -> Result<(IpLayer, usize, usize), DecodeError> {
    let h = take(buf, off, IPV6_HLEN, limit, "ipv6")?;
    let first = be32(h, 0);
    let payload_len = usize::from(be16(h, 4));
    let avail_end = limit.min(buf.len());
    let end = (off + IPV6_HLEN + payload_len).min(avail_end);
    let addr = |at: usize| -> IpAddr {
        let o: [u8; 16] = h[at..at + 16].try_into().unwrap_or_default();
        Ipv6Addr::from(o).into()
    };
    let mut next = h[6];
    let mut pos = off + IPV6_HLEN;
    let mut ext_headers = Vec::new();
    let mut fragment = None;
    while matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST | NEXTHDR_AUTH
    ) {
        let e = take(buf, pos, 2, end, "ipv6 extension")?;
        let len = match next {
            NEXTHDR_FRAGMENT => 8,
            NEXTHDR_AUTH => (usize::from(e[1]) + 2) * 4,
            _ => (usize::from(e[1]) + 1) * 8,
        };
        let e = take(buf, pos, len, end, "ipv6 extension")?;
        if next == NEXTHDR_FRAGMENT {
            let word = be16(e, 2);
            fragment = Some(FragmentInfo {
                offset: word >> 3,
                more: word & 1 != 0,
                id: be32(e, 4),
            });
        }
        ext_headers.push(next);
        next = e[0];
        pos += len;
    }
    let layer = IpLayer {
        offset: off,
        version: 6,
        src: addr(8),
        dst: addr(24),
        ttl: h[7],
        tos: ((first >> 20) & 0xff) as u8,
        flow_label: first & 0x000f_ffff,
        next_header: h[6],
        protocol: next,
        header_len: pos - off,
        total_len: IPV6_HLEN + payload_len,
        payload_len,
        captured_len: avail_end - off,
        checksum: 0,
        checksum_ok: true,
        ipv4_id: 0,
        dont_fragment: false,
        fragment,
        options: Vec::new(),
        ext_headers,
        bytes: buf[off..end].to_vec(),
    };
    Ok((layer, pos, end))
}

/// Decodes the transport header of `seg` (the innermost IP payload).
fn decode_transport(seg: &[u8], src: IpAddr, dst: IpAddr, proto: u8, d: &mut Decoded) {
    let v6 = src.is_ipv6();
    if matches!(proto, PROTO_TCP | PROTO_UDP) && seg.len() >= 4 {
        d.ports = Some((be16(seg, 0), be16(seg, 2)));
    }
    let header_len = match proto {
        PROTO_TCP if seg.len() >= TCP_HLEN => {
            let hl = usize::from(seg[12] >> 4) * 4;
            (hl >= TCP_HLEN && hl <= seg.len()).then_some(hl)
        }
        PROTO_UDP if seg.len() >= UDP_HLEN => Some(UDP_HLEN),
        PROTO_ICMP if !v6 && seg.len() >= ICMP_HLEN => Some(ICMP_HLEN),
        PROTO_ICMPV6 if v6 && seg.len() >= ICMP_HLEN => Some(ICMP_HLEN),
        _ => None,
    };
    let Some(hl) = header_len else {
        seg.clone_into(&mut d.payload);
        return;
    };
    let pseudo_ok = || l4_checksum_ip(src, dst, proto, seg) == 0;
    let transport = match proto {
        PROTO_TCP => Transport::Tcp(TcpHeader {
            sport: be16(seg, 0),
            dport: be16(seg, 2),
            seq: be32(seg, 4),
            ack: be32(seg, 8),
            header_len: hl,
            flags: TcpFlags(seg[13]),
            window: be16(seg, 14),
            checksum: be16(seg, 16),
            checksum_ok: pseudo_ok(),
            options: seg[TCP_HLEN..hl].to_vec(),
        }),
        PROTO_UDP => {
            let length = be16(seg, 4);
            let checksum = be16(seg, 6);
            // Verify over the datagram as the UDP length declares it, if sane.
            let udp_len = usize::from(length);
            let dgram = if (UDP_HLEN..=seg.len()).contains(&udp_len) {
                &seg[..udp_len]
            } else {
                seg
            };
            let checksum_ok = if checksum == 0 {
                !v6
            } else {
                l4_checksum_ip(src, dst, proto, dgram) == 0
            };
            d.payload = dgram[UDP_HLEN..].to_vec();
            d.transport = Some(Transport::Udp(UdpHeader {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                length,
                checksum,
                checksum_ok,
            }));
            return;
        }
        _ => {
            let h = IcmpHeader {
                ty: seg[0],
                code: seg[1],
                checksum: be16(seg, 2),
                checksum_ok: if v6 { pseudo_ok() } else { verify_icmpv4(seg) },
                rest: [seg[4], seg[5], seg[6], seg[7]],
            };
            if v6 {
                Transport::Icmpv6(h)
            } else {
                Transport::Icmp(h)
            }
        }
    };
    d.transport = Some(transport);
    seg[hl..].clone_into(&mut d.payload);
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: Mac = [0x02, 0, 0, 0, 0, 0x0a];
    const MAC_B: Mac = [0x02, 0, 0, 0, 0, 0x0b];
    const C4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    const B4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 7);
    const L4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7);
    const L6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the one's-complement sum of these bytes is
        // 0xddf2, so the checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), !0xddf2);
        assert_eq!(internet_checksum(&data), 0x220d);
        // Odd length: trailing byte padded with zero.
        assert_eq!(internet_checksum(&[0x01]), !0x0100);
    }

    #[test]
    fn well_known_ipv4_header_checksum() {
        // The classic example header 192.168.0.1 -> 192.168.0.199, UDP,
        // total length 0x73, DF, TTL 64: checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861_u16.to_be_bytes());
        assert!(verify_ipv4_header(&h));
        // The builder produces the same header.
        let pkt = PacketBuilder::new()
            .ipv4(
                Ipv4Addr::new(192, 168, 0, 1),
                Ipv4Addr::new(192, 168, 0, 199),
            )
            .dont_fragment()
            .raw_l4(PROTO_UDP)
            .payload(&[0; 0x73 - 20])
            .build_ip_only();
        assert_eq!(&pkt[..20], &h);
    }

    #[test]
    fn v4_tcp_syn_bytes_and_checksums() {
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .ttl(63)
            .tcp(40000, 80, TcpFlags::SYN)
            .tcp_seq(0x0102_0304)
            .payload(b"hello")
            .build();
        assert_eq!(pkt.len(), 14 + 20 + 20 + 5);
        assert_eq!(&pkt[0..6], &MAC_B, "destination MAC first on the wire");
        assert_eq!(&pkt[6..12], &MAC_A);
        assert_eq!(&pkt[12..14], &[0x08, 0x00]);
        let ip = &pkt[14..34];
        assert_eq!(ip[0], 0x45);
        assert_eq!(be16(ip, 2), 45);
        assert_eq!(ip[8], 63);
        assert_eq!(ip[9], 6);
        assert_eq!(&ip[12..16], &C4.octets());
        assert_eq!(&ip[16..20], &V4.octets());
        assert_eq!(internet_checksum(ip), 0, "IPv4 header checksum verifies");
        let tcp = &pkt[34..];
        assert_eq!(&tcp[0..4], &[0x9c, 0x40, 0x00, 0x50]);
        assert_eq!(&tcp[4..8], &[1, 2, 3, 4]);
        assert_eq!(tcp[12], 0x50, "data offset 5");
        assert_eq!(tcp[13], 0x02, "SYN");
        assert_eq!(&tcp[20..], b"hello");
        assert!(verify_l4_v4(C4, V4, PROTO_TCP, tcp));
        // Values computed independently (Python, struct + manual RFC 1071).
        assert_eq!(be16(ip, 10), 0x8f8c);
        assert_eq!(be16(tcp, 16), 0xdf35);

        let d = decode(&pkt).expect("decodes");
        assert_eq!(d.ip.len(), 1);
        let l = &d.ip[0];
        assert_eq!(
            (l.version, l.src, l.dst, l.ttl, l.protocol),
            (4, C4.into(), V4.into(), 63, 6)
        );
        assert_eq!((l.total_len, l.header_len, l.captured_len), (45, 20, 45));
        assert!(l.checksum_ok && l.fragment.is_none());
        let t = d.tcp().expect("tcp");
        assert_eq!(
            (t.sport, t.dport, t.seq, t.flags),
            (40000, 80, 0x0102_0304, TcpFlags::SYN)
        );
        assert!(t.checksum_ok);
        assert_eq!(d.payload, b"hello");
        assert_eq!(d.ports, Some((40000, 80)));
    }

    #[test]
    fn v4_options_and_tcp_options() {
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .ipv4_options(&[0x94, 0x04, 0, 0, 0x01]) // router alert + NOP, padded to 8
            .tcp(1, 2, TcpFlags::SYN | TcpFlags::ACK)
            .tcp_options(&[2, 4, 0x05, 0xb4]) // MSS 1460
            .build();
        assert_eq!(pkt[14], 0x47);
        let d = decode(&pkt).unwrap();
        assert_eq!(d.ip[0].header_len, 28);
        assert_eq!(d.ip[0].options, [0x94, 4, 0, 0, 1, 0, 0, 0]);
        assert!(d.ip[0].checksum_ok);
        let t = d.tcp().unwrap();
        assert_eq!(t.header_len, 24);
        assert_eq!(t.options, [2, 4, 5, 0xb4]);
        assert!(t.flags.contains(TcpFlags::ACK) && t.checksum_ok);
        assert_eq!(format!("{:?}", t.flags), "TcpFlags(SYN|ACK)");
    }

    #[test]
    fn v6_udp_with_hop_by_hop_and_fragment() {
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv6(C6, V6)
            .flow_label(0x12345)
            .tos(0xb8)
            .ipv6_ext(ExtHeader::HopByHop { len8: 0 })
            .ipv6_ext(ExtHeader::Fragment {
                offset: 0,
                more: true,
                id: 0xdead_beef,
            })
            .udp(5353, 53)
            .payload(b"query")
            .build();
        let ip = &pkt[14..];
        assert_eq!(&pkt[12..14], &[0x86, 0xdd]);
        assert_eq!(
            be32(ip, 0),
            0x6b81_2345,
            "version, traffic class, flow label"
        );
        assert_eq!(
            be16(ip, 4),
            8 + 8 + 8 + 5,
            "payload length covers the extension headers"
        );
        assert_eq!(ip[6], NEXTHDR_HOP);
        assert_eq!(
            &ip[40..48],
            &[NEXTHDR_FRAGMENT, 0, 1, 4, 0, 0, 0, 0],
            "HBH: next, len, PadN(4)"
        );
        assert_eq!(&ip[48..56], &[PROTO_UDP, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]);
        let udp = &ip[56..];
        assert_eq!(be16(udp, 4), 13);
        assert!(verify_l4_v6(C6, V6, PROTO_UDP, udp));

        let d = decode(&pkt).unwrap();
        let l = &d.ip[0];
        assert_eq!(
            (l.version, l.next_header, l.protocol),
            (6, NEXTHDR_HOP, PROTO_UDP)
        );
        assert_eq!(
            (l.flow_label, l.tos, l.header_len, l.total_len),
            (0x12345, 0xb8, 56, 69)
        );
        assert_eq!(l.ext_headers, [NEXTHDR_HOP, NEXTHDR_FRAGMENT]);
        assert_eq!(
            l.fragment,
            Some(FragmentInfo {
                offset: 0,
                more: true,
                id: 0xdead_beef
            })
        );
        let u = d.udp().unwrap();
        assert_eq!((u.sport, u.dport, u.length), (5353, 53, 13));
        assert!(u.checksum_ok);
        assert_eq!(d.payload, b"query");
    }

    #[test]
    fn v6_routing_destopts_and_long_options() {
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv6(C6, V6)
            .ipv6_ext(ExtHeader::HopByHop { len8: 40 }) // 328 bytes: several PadN
            .ipv6_ext(ExtHeader::Routing {
                len8: 2,
                routing_type: 4,
                segments_left: 0,
            })
            .ipv6_ext(ExtHeader::DestOpts { len8: 1 })
            .tcp(1000, 443, TcpFlags::ACK)
            .build();
        let d = decode(&pkt).unwrap();
        let l = &d.ip[0];
        assert_eq!(l.ext_headers, [NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_DEST]);
        assert_eq!(l.header_len, 40 + 328 + 24 + 16);
        assert!(d.tcp().unwrap().checksum_ok);
        // The hop-by-hop options are a valid TLV sequence filling the header.
        let opts = &pkt[14 + 40 + 2..14 + 40 + 328];
        let mut i = 0;
        while i < opts.len() {
            i += if opts[i] == 0 {
                1
            } else {
                2 + usize::from(opts[i + 1])
            };
        }
        assert_eq!(i, opts.len());
    }

    #[test]
    fn vlan_offsets() {
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .vlan(100)
            .ipv4(C4, V4)
            .udp(1, 2)
            .build();
        assert_eq!(&pkt[12..18], &[0x81, 0x00, 0x00, 100, 0x08, 0x00]);
        assert_eq!(pkt[18], 0x45);
        let d = decode(&pkt).unwrap();
        assert_eq!(
            (d.vlan, d.ethertype, d.l3_offset, d.ip[0].offset),
            (Some(100), 0x0800, 18, 18)
        );

        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .qinq(10, 4000)
            .ipv6(C6, V6)
            .udp(1, 2)
            .build();
        assert_eq!(
            &pkt[12..22],
            &[0x88, 0xa8, 0x00, 10, 0x81, 0x00, 0x0f, 0xa0, 0x86, 0xdd]
        );
        let d = decode(&pkt).unwrap();
        assert_eq!(d.vlan, Some(10));
        assert_eq!(d.vlan_tags.len(), 2);
        assert_eq!(
            (d.vlan_tags[1].tpid, d.vlan_tags[1].vid),
            (TPID_8021Q, 4000)
        );
        assert_eq!(d.l3_offset, 22);
        assert!(d.udp().unwrap().checksum_ok);

        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .vlan_8021ad(7)
            .ipv4(C4, V4)
            .udp(1, 2)
            .build();
        assert_eq!(&pkt[12..16], &[0x88, 0xa8, 0, 7]);
        assert_eq!(decode(&pkt).unwrap().vlan_tags[0].tpid, TPID_8021AD);
    }

    #[test]
    fn icmp_frag_needed_quoting_tcp() {
        // A backend's reply VIP -> client, as seen by a router with MTU 1400.
        let original = PacketBuilder::new()
            .ipv4(V4, C4)
            .tcp(80, 40000, TcpFlags::ACK)
            .payload(&[0xaa; 1460]);
        let mut quoted = original.build_ip_only();
        quoted.truncate(20 + 8);
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(Ipv4Addr::new(203, 0, 113, 1), V4)
            .icmp_frag_needed(1400, &quoted)
            .build();
        let d = decode(&pkt).unwrap();
        let icmp = d.icmp().expect("icmp");
        assert_eq!((icmp.ty, icmp.code, icmp.mtu_v4()), (3, 4, 1400));
        assert!(icmp.checksum_ok);
        assert_eq!(d.payload, quoted);
        let q = d
            .icmp_quoted()
            .expect("is an error")
            .expect("quote decodes");
        let ql = &q.ip[0];
        assert_eq!(
            (ql.src, ql.dst, ql.protocol, ql.total_len),
            (V4.into(), C4.into(), PROTO_TCP, 1500)
        );
        assert!(ql.is_truncated() && ql.checksum_ok);
        assert!(
            q.transport.is_none(),
            "8 bytes of TCP is not a whole header"
        );
        assert_eq!(q.ports, Some((80, 40000)));

        // A longer quote exposes the whole TCP header.
        let mut quoted = original.build_ip_only();
        quoted.truncate(20 + 20 + 8);
        let pkt = PacketBuilder::new()
            .ipv4(L4, V4)
            .icmp_frag_needed(1280, &quoted)
            .build();
        let q = decode(&pkt).unwrap().icmp_quoted().unwrap().unwrap();
        let t = q.tcp().expect("tcp");
        assert_eq!((t.sport, t.dport, t.flags), (80, 40000, TcpFlags::ACK));
        assert!(
            !t.checksum_ok,
            "checksum over a partial segment cannot verify"
        );
    }

    #[test]
    fn icmpv6_echo_and_packet_too_big() {
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv6(C6, V6)
            .icmpv6_echo(0x1234, 7)
            .payload(b"ping")
            .build();
        let d = decode(&pkt).unwrap();
        let h = d.icmp().unwrap();
        assert!(matches!(d.transport, Some(Transport::Icmpv6(_))));
        assert_eq!((h.ty, h.echo_id(), h.echo_seq()), (128, 0x1234, 7));
        assert!(h.checksum_ok);
        assert!(d.icmp_quoted().is_none());

        let mut quoted = PacketBuilder::new()
            .ipv6(V6, C6)
            .udp(53, 5353)
            .payload(&[0; 1400])
            .build_ip_only();
        quoted.truncate(1232);
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv6(L6, V6)
            .icmpv6_packet_too_big(1280, &quoted)
            .build();
        let d = decode(&pkt).unwrap();
        let h = d.icmp().unwrap();
        assert_eq!((h.ty, h.code, h.mtu_v6()), (2, 0, 1280));
        assert!(h.checksum_ok);
        let q = d.icmp_quoted().unwrap().unwrap();
        assert_eq!(q.ports, Some((53, 5353)));
        assert!(q.ip[0].is_truncated());

        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .icmp_echo(9, 1)
            .build();
        let h = *decode(&pkt).unwrap().icmp().unwrap();
        assert_eq!((h.ty, h.echo_id(), h.echo_seq()), (8, 9, 1));
        assert!(h.checksum_ok);
    }

    #[test]
    fn ipip4_hand_built_builder_and_encap_agree() {
        let inner = PacketBuilder::new()
            .ipv4(C4, V4)
            .tcp(40000, 80, TcpFlags::SYN)
            .payload(b"x")
            .build_ip_only();
        // Outer header written by hand.
        let mut outer = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_IPIP, 0, 0];
        outer[2..4].copy_from_slice(&((20 + inner.len()) as u16).to_be_bytes());
        outer.extend_from_slice(&L4.octets());
        outer.extend_from_slice(&B4.octets());
        let csum = internet_checksum(&outer);
        outer[10..12].copy_from_slice(&csum.to_be_bytes());
        let mut hand = vec![0; 12];
        hand[..6].copy_from_slice(&MAC_B);
        hand[6..].copy_from_slice(&MAC_A);
        hand.extend_from_slice(&[0x08, 0x00]);
        hand.extend_from_slice(&outer);
        hand.extend_from_slice(&inner);

        let stacked = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(L4, B4)
            .ipv4(C4, V4)
            .tcp(40000, 80, TcpFlags::SYN)
            .payload(b"x");
        assert_eq!(stacked.build(), hand);
        let plain = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .tcp(40000, 80, TcpFlags::SYN)
            .payload(b"x");
        assert_eq!(
            encap_ip(&plain.build(), L4.into(), B4.into()).unwrap(),
            hand
        );

        let d = decode(&hand).unwrap();
        assert_eq!(d.ip.len(), 2);
        let (o, i) = (&d.ip[0], &d.ip[1]);
        assert_eq!(
            (o.src, o.dst, o.protocol),
            (L4.into(), B4.into(), PROTO_IPIP)
        );
        assert!(o.checksum_ok && i.checksum_ok);
        assert_eq!(o.total_len, i.total_len + 20);
        assert_eq!(i.bytes, inner, "inner packet unchanged");
        assert_eq!(i.bytes, decode(&plain.build()).unwrap().ip[0].bytes);
        assert_eq!(i.offset, 34);
        assert!(d.tcp().unwrap().checksum_ok);
        assert_eq!(d.payload, b"x");
    }

    #[test]
    fn ipip6_and_mixed_families() {
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv6(L6, B6)
            .ipv6(C6, V6)
            .udp(1, 2)
            .payload(b"abc")
            .build();
        let d = decode(&pkt).unwrap();
        assert_eq!(d.ip.len(), 2);
        assert_eq!(
            (d.ip[0].protocol, d.ip[0].payload_len),
            (PROTO_IPV6, d.ip[1].total_len)
        );
        assert!(d.udp().unwrap().checksum_ok);

        // IPv4 inside IPv6 and IPv6 inside IPv4.
        let v4 = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .udp(1, 2)
            .build();
        let e = encap_ip(&v4, L6.into(), B6.into()).unwrap();
        assert_eq!(&e[12..14], &[0x86, 0xdd]);
        let d = decode(&e).unwrap();
        assert_eq!(
            (d.ip[0].version, d.ip[0].protocol, d.ip[1].version),
            (6, PROTO_IPIP, 4)
        );
        let v6 = PacketBuilder::eth(MAC_A, MAC_B)
            .vlan(5)
            .ipv6(C6, V6)
            .tcp(1, 2, TcpFlags::RST)
            .build();
        let d = decode(&encap_ip(&v6, L4.into(), B4.into()).unwrap()).unwrap();
        assert_eq!(
            (d.vlan, d.ip[0].version, d.ip[0].protocol, d.ip[1].version),
            (Some(5), 4, PROTO_IPV6, 6)
        );
        assert!(d.tcp().unwrap().checksum_ok);
    }

    #[test]
    fn real_fragments_reassemble() {
        let b = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .dont_fragment()
            .udp(7, 9)
            .payload(&[0x5a; 100]);
        let whole = b.build_ip_only();
        let frags = b.build_fragments(50, 0x4242);
        assert_eq!(frags.len(), 3); // 108 bytes of UDP in 48-byte pieces
        let mut reassembled = Vec::new();
        for (n, f) in frags.iter().enumerate() {
            let d = decode(f).unwrap();
            let l = &d.ip[0];
            let fi = l.fragment.expect("is a fragment");
            assert!(l.checksum_ok && l.dont_fragment);
            assert_eq!((fi.offset as usize, fi.more, fi.id), (n * 6, n < 2, 0x4242));
            assert_eq!(l.total_len, f.len() - 14);
            if n == 0 {
                assert_eq!(d.ports, Some((7, 9)));
            } else {
                assert!(d.transport.is_none() && d.ports.is_none());
            }
            reassembled.extend_from_slice(&f[34..]);
        }
        assert_eq!(reassembled, whole[20..]);
        assert!(verify_l4_v4(C4, V4, PROTO_UDP, &reassembled));

        let b = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv6(C6, V6)
            .ipv6_ext(ExtHeader::HopByHop { len8: 0 })
            .tcp(7, 9, TcpFlags::PSH | TcpFlags::ACK)
            .payload(&[1; 30]);
        let whole = b.build_ip_only();
        let frags = b.build_fragments(24, 77);
        assert_eq!(frags.len(), 3);
        let mut reassembled = Vec::new();
        for (n, f) in frags.iter().enumerate() {
            let d = decode(f).unwrap();
            let l = &d.ip[0];
            assert_eq!(l.ext_headers, [NEXTHDR_HOP, NEXTHDR_FRAGMENT]);
            assert_eq!(l.protocol, PROTO_TCP);
            assert_eq!(
                l.fragment,
                Some(FragmentInfo {
                    offset: (n * 3) as u16,
                    more: n < 2,
                    id: 77
                })
            );
            assert_eq!(l.total_len, f.len() - 14);
            reassembled.extend_from_slice(&f[14 + 56..]);
        }
        assert_eq!(reassembled, whole[48..]);
        assert!(verify_l4_v6(C6, V6, PROTO_TCP, &reassembled));
    }

    #[test]
    fn marked_fragments() {
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .fragment(0, true, 9)
            .tcp(1, 2, TcpFlags::ACK)
            .build();
        let d = decode(&pkt).unwrap();
        assert_eq!(
            d.ip[0].fragment,
            Some(FragmentInfo {
                offset: 0,
                more: true,
                id: 9
            })
        );
        assert!(d.tcp().unwrap().checksum_ok, "computed as if unfragmented");
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .fragment(185, false, 9)
            .raw_l4(PROTO_TCP)
            .payload(&[7; 16])
            .build();
        let d = decode(&pkt).unwrap();
        assert!(d.ip[0].is_later_fragment());
        assert_eq!(
            (d.ip[0].protocol, d.transport.as_ref(), d.payload.len()),
            (PROTO_TCP, None, 16)
        );
    }

    #[test]
    fn broken_packets() {
        let base = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .udp(1, 2)
            .payload(b"data");
        let pkt = base.clone().ipv4_ihl_override(4).build();
        assert_eq!(pkt[14], 0x44);
        assert_eq!(
            decode(&pkt),
            Err(DecodeError::BadIhl { offset: 14, ihl: 4 })
        );

        let pkt = base.clone().ipv4_ihl_override(15).build();
        assert!(matches!(
            decode(&pkt),
            Err(DecodeError::Truncated {
                layer: "ipv4 options",
                ..
            })
        ));

        let pkt = base.clone().ipv4_total_len_override(1000).build();
        let d = decode(&pkt).unwrap();
        assert!(d.ip[0].is_truncated() && d.ip[0].checksum_ok);
        assert_eq!(d.ip[0].total_len, 1000);

        let pkt = base.clone().ipv4_checksum_override(0x1234).build();
        assert!(!decode(&pkt).unwrap().ip[0].checksum_ok);

        let pkt = base.clone().l4_checksum_override(0xbeef).build();
        assert!(!decode(&pkt).unwrap().udp().unwrap().checksum_ok);
        let pkt = base.clone().l4_checksum_override(0).build();
        assert!(
            decode(&pkt).unwrap().udp().unwrap().checksum_ok,
            "zero UDP checksum is valid on IPv4"
        );

        let pkt = base.clone().ip_version_override(6).build();
        assert!(matches!(
            decode(&pkt),
            Err(DecodeError::BadVersion {
                expected: Some(4),
                found: 6,
                ..
            })
        ));

        let mut pkt = base.build();
        pkt.truncate(14 + 10);
        assert!(matches!(
            decode(&pkt),
            Err(DecodeError::Truncated { layer: "ipv4", .. })
        ));
        assert!(matches!(
            decode(&pkt[..13]),
            Err(DecodeError::Truncated {
                layer: "ethernet",
                ..
            })
        ));

        // Ethernet minimum-size padding is not payload.
        let mut pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .udp(1, 2)
            .payload(b"x")
            .build();
        pkt.resize(60, 0);
        let d = decode(&pkt).unwrap();
        assert_eq!(d.payload, b"x");
        assert!(d.udp().unwrap().checksum_ok && !d.ip[0].is_truncated());
    }

    #[test]
    fn arp_and_unknown_ethertype() {
        let arp = arp_request(MAC_A, C4, V4);
        let pkt = PacketBuilder::eth(MAC_A, [0xff; 6])
            .ethertype(ETHERTYPE_ARP)
            .raw_payload(&arp)
            .build();
        assert_eq!(pkt.len(), 14 + 28);
        let d = decode(&pkt).unwrap();
        assert_eq!(
            (d.ethertype, d.ip.len(), d.payload.len()),
            (ETHERTYPE_ARP, 0, 28)
        );
        assert_eq!(d.eth_dst, [0xff; 6]);
    }

    #[test]
    fn wire_words_and_flow_keys() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(ip4_words(a), [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0]);
        assert_eq!(port_wire(80).to_ne_bytes(), [0, 80]);
        let k = flow_key_v4(C4, 40000, V4, 80, PROTO_TCP);
        assert_eq!(k.src[0].to_ne_bytes(), C4.octets());
        assert_eq!(k.dst[0].to_ne_bytes(), V4.octets());
        assert_eq!(k.src_port.to_ne_bytes(), 40000_u16.to_be_bytes());
        assert_eq!((k.proto, k.family), (PROTO_TCP, FAMILY_V4));
        let k = flow_key_v6(C6, 1, V6, 443, PROTO_UDP);
        let bytes: Vec<u8> = k.dst.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, V6.octets());
        assert_eq!((k.dst_port.to_ne_bytes(), k.family), ([1, 187], FAMILY_V6));
        assert_eq!(ip_words(C6.into()), k.src);
        // The packet's bytes at the port offsets read natively are the key's ports.
        let pkt = PacketBuilder::eth(MAC_A, MAC_B)
            .ipv4(C4, V4)
            .tcp(40000, 80, TcpFlags::SYN)
            .build();
        assert_eq!(u16::from_ne_bytes([pkt[34], pkt[35]]), port_wire(40000));
        assert_eq!(
            u32::from_ne_bytes(pkt[26..30].try_into().unwrap()),
            ip4_words(C4)[0]
        );
    }

    #[test]
    #[should_panic(expected = "PacketBuilder::flow_label: the current IP layer is IPv4")]
    fn misuse_panics_with_message() {
        let _ = PacketBuilder::new().ipv4(C4, V4).flow_label(1);
    }
}
