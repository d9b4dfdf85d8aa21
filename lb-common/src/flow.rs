//! The flow key and the flow hash.
//!
//! The hash is the one piece of logic that must be bit-identical in the XDP
//! program and in userspace (simulator, planner, tests): it is a plain `const
//! fn` over a fixed-size input, no loops over variable data, so the BPF
//! verifier sees straight-line code and every node of a fleet with the same
//! seed computes the same value.

/// Address family tags used in keys.
pub const FAMILY_V4: u8 = 4;
/// Address family tag for IPv6.
pub const FAMILY_V6: u8 = 6;

/// IANA protocol numbers the data path handles.
pub const PROTO_ICMP: u8 = 1;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// A flow's 5-tuple plus family: the connection-table key and the input of
/// [`flow_hash`].
///
/// Addresses and ports are in wire order (see the crate docs). For IPv4 only
/// `src[0]` / `dst[0]` are used and the other words are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// Number of 32-bit words the hash consumes.
    pub const WORDS: usize = 10;

    /// The key hashed for client (source-address) affinity: every field but
    /// the source address and the family is zeroed, so all flows of one
    /// client hash alike.
    #[inline(always)]
    #[must_use]
    pub const fn affinity(&self) -> Self {
        Self {
            src: self.src,
            dst: [0; 4],
            src_port: 0,
            dst_port: 0,
            proto: 0,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// The key hashed for IP fragments: ports are not in every fragment, so
    /// all fragments of a datagram (the first one included) hash on
    /// addresses and protocol only, and therefore reach the same backend.
    #[inline(always)]
    #[must_use]
    pub const fn without_ports(&self) -> Self {
        Self {
            src: self.src,
            dst: self.dst,
            src_port: 0,
            dst_port: 0,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// The ten words [`flow_hash`] mixes, in a fixed order.
    #[inline(always)]
    #[must_use]
    pub const fn words(&self) -> [u32; Self::WORDS] {
        [
            self.src[0],
            self.src[1],
            self.src[2],
            self.src[3],
            self.dst[0],
            self.dst[1],
            self.dst[2],
            self.dst[3],
            (self.src_port as u32) | ((self.dst_port as u32) << 16),
            (self.proto as u32) | ((self.family as u32) << 8),
        ]
    }
}

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix_word(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// Final avalanche (MurmurHash3 `fmix32`): every input bit affects every
/// output bit with probability close to one half.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The flow hash: MurmurHash3 (x86, 32-bit) structure over the key's ten
/// words with the fleet's seed. Unrolled by hand so that the BPF code is
/// straight-line on every optimisation level.
#[inline(always)]
#[must_use]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let w = key.words();
    let mut h = seed;
    h = mix_word(h, w[0]);
    h = mix_word(h, w[1]);
    h = mix_word(h, w[2]);
    h = mix_word(h, w[3]);
    h = mix_word(h, w[4]);
    h = mix_word(h, w[5]);
    h = mix_word(h, w[6]);
    h = mix_word(h, w[7]);
    h = mix_word(h, w[8]);
    h = mix_word(h, w[9]);
    fmix32(h ^ (FlowKey::WORDS as u32 * 4))
}

/// The lookup-table slot a hash selects in a table of `ring_size` slots.
#[inline(always)]
#[must_use]
pub const fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    hash % ring_size
}
