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

    /// The key as the five 64-bit words [`flow_hash`] absorbs.
    #[inline(always)]
    #[must_use]
    pub const fn packed(&self) -> FlowWords {
        FlowWords::new(
            crate::addr_words(&self.src),
            crate::addr_words(&self.dst),
            self.src_port,
            self.dst_port,
            self.proto,
            self.family,
        )
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

/// A [`FlowKey`] packed into the five 64-bit words the hash absorbs:
/// source address, destination address (two words each, as
/// [`crate::addr_words`]), then `src_port | dst_port << 16 | proto << 32 |
/// family << 40`. This is how the data path holds a flow: every field is
/// stored and read as whole 64-bit words, never assembled from narrower
/// stores (which would stall the CPU's store-to-load forwarding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowWords(pub [u64; 5]);

impl FlowWords {
    /// A flow from its addresses (as [`crate::addr_words`]), ports (wire
    /// order), protocol and family; the layout of [`FlowKey::words`].
    #[inline(always)]
    #[must_use]
    pub const fn new(
        src: [u64; 2],
        dst: [u64; 2],
        src_port: u16,
        dst_port: u16,
        proto: u8,
        family: u8,
    ) -> Self {
        Self([
            src[0],
            src[1],
            dst[0],
            dst[1],
            (src_port as u64)
                | ((dst_port as u64) << 16)
                | ((proto as u64) << 32)
                | ((family as u64) << 40),
        ])
    }

    /// [`FlowKey::affinity`] of the packed key.
    #[inline(always)]
    #[must_use]
    pub const fn affinity(&self) -> Self {
        Self([self.0[0], self.0[1], 0, 0, self.0[4] & (0xff << 40)])
    }

    /// [`FlowKey::without_ports`] of the packed key.
    #[inline(always)]
    #[must_use]
    pub const fn without_ports(&self) -> Self {
        Self([
            self.0[0],
            self.0[1],
            self.0[2],
            self.0[3],
            self.0[4] & !0xffff_ffff,
        ])
    }

    /// Destination address words.
    #[inline(always)]
    #[must_use]
    pub const fn dst(&self) -> [u64; 2] {
        [self.0[2], self.0[3]]
    }
}

/// Odd multiplier of the absorb step (2⁶⁴ / φ).
const K_MUL: u64 = 0x9e37_79b9_7f4a_7c15;
/// Start state (digits of π), so that seed 0 does not start from zero.
const K_START: u64 = 0x243f_6a88_85a3_08d3;

/// Absorbs one 64-bit word: xor, multiply by an odd constant, xor-shift.
/// Each step is a bijection of the state for a fixed word.
#[inline(always)]
const fn absorb(h: u64, v: u64) -> u64 {
    let h = (h ^ v).wrapping_mul(K_MUL);
    h ^ (h >> 29)
}

/// MurmurHash3's 64-bit finaliser (`fmix64`): a bijection in which every
/// input bit affects every output bit with probability close to one half.
#[inline(always)]
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The flow hash: the key's five 64-bit words absorbed with the fleet's
/// seed, finished by `fmix64` and folded to 32 bits.
#[inline(always)]
#[must_use]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    flow_hash_words(&key.packed(), seed)
}

/// [`flow_hash`] of a packed key. Unrolled by hand so that the BPF code is
/// straight-line on every optimisation level. (The connection table places
/// flows by its own node-local [`crate::conn_hash`], so an established
/// flow's packet never pays for this chain of dependent multiplies.)
#[inline(always)]
#[must_use]
pub const fn flow_hash_words(key: &FlowWords, seed: u32) -> u32 {
    let w = &key.0;
    let mut h = K_START ^ seed as u64;
    h = absorb(h, w[0]);
    h = absorb(h, w[1]);
    h = absorb(h, w[2]);
    h = absorb(h, w[3]);
    h = fmix64(absorb(h, w[4]));
    (h ^ (h >> 32)) as u32
}

/// The lookup-table slot a hash selects in a table of `ring_size` slots.
#[inline(always)]
#[must_use]
pub const fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    hash % ring_size
}

#[cfg(test)]
mod tests {
    //! The flow hash must never change silently (every node of a fleet and
    //! the kernel/userspace pair must agree on it), must mix every input bit
    //! into every output bit, and must spread real-world key sequences
    //! (sequential ports, sequential addresses) evenly over a lookup table.

    extern crate std;

    use std::{vec, vec::Vec};

    use super::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, flow_hash, ring_slot};

    /// An IPv4 address in wire order (word 0 of a key).
    fn v4(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    /// An IPv6 address (eight 16-bit groups) in wire order.
    fn v6(groups: [u16; 8]) -> [u32; 4] {
        let mut b = [0u8; 16];
        for (i, g) in groups.iter().enumerate() {
            b[2 * i..2 * i + 2].copy_from_slice(&g.to_be_bytes());
        }
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        [w(0), w(4), w(8), w(12)]
    }

    /// A port in wire order.
    fn port(p: u16) -> u16 {
        u16::from_ne_bytes(p.to_be_bytes())
    }

    /// 198.51.100.7:40000 → 192.0.2.10:80, TCP.
    fn key_v4() -> FlowKey {
        FlowKey {
            src: v4([198, 51, 100, 7]),
            dst: v4([192, 0, 2, 10]),
            src_port: port(40000),
            dst_port: port(80),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    /// [2001:db8::1]:53000 → [2001:db8:ffff::53]:53, UDP.
    fn key_v6() -> FlowKey {
        FlowKey {
            src: v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]),
            dst: v6([0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x53]),
            src_port: port(53000),
            dst_port: port(53),
            proto: PROTO_UDP,
            family: FAMILY_V6,
            _pad: [0; 2],
        }
    }

    use crate::rng::SplitMix64;

    /// Random flow keys from the shared test generator.
    trait RandomKey {
        fn key(&mut self) -> FlowKey;
    }

    impl RandomKey for SplitMix64 {
        /// A key whose every hashed bit is random (padding zero).
        fn key(&mut self) -> FlowKey {
            let mut k = FlowKey::default();
            for w in k.src.iter_mut().chain(k.dst.iter_mut()) {
                *w = self.next_u32();
            }
            let r = self.next_u64();
            k.src_port = r as u16;
            k.dst_port = (r >> 16) as u16;
            k.proto = (r >> 32) as u8;
            k.family = (r >> 40) as u8;
            k
        }
    }

    /// Number of key bits the hash consumes: 2 × 128 address bits, 2 × 16
    /// port bits, 8 protocol bits, 8 family bits (the padding is not hashed).
    const KEY_BITS: usize = 304;

    /// `k` with hashed bit `bit` (`0..KEY_BITS`) flipped.
    fn flip(mut k: FlowKey, bit: usize) -> FlowKey {
        match bit {
            0..128 => k.src[bit / 32] ^= 1 << (bit % 32),
            128..256 => k.dst[(bit - 128) / 32] ^= 1 << (bit % 32),
            256..272 => k.src_port ^= 1 << (bit - 256),
            272..288 => k.dst_port ^= 1 << (bit - 272),
            288..296 => k.proto ^= 1 << (bit - 288),
            296..KEY_BITS => k.family ^= 1 << (bit - 296),
            _ => unreachable!("bit {bit}"),
        }
        k
    }

    /// Reference flow hash over the key's bytes, written independently of
    /// the unrolled data-path version: little-endian 64-bit words, a loop.
    fn reference_hash(bytes: &[u8], seed: u32) -> u32 {
        let mut h = 0x243f_6a88_85a3_08d3u64 ^ u64::from(seed);
        for c in bytes.chunks_exact(8) {
            let v = u64::from_le_bytes(c.try_into().unwrap());
            h = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        (h ^ (h >> 32)) as u32
    }

    #[test]
    fn golden_values() {
        // Usable in const context, as the BPF side needs.
        const H: u32 = flow_hash(
            &FlowKey {
                src: [1, 0, 0, 0],
                dst: [2, 0, 0, 0],
                src_port: 3,
                dst_port: 4,
                proto: PROTO_TCP,
                family: FAMILY_V4,
                _pad: [0; 2],
            },
            7,
        );
        // Pins the function: a change here changes every backend choice of
        // the fleet and breaks the kernel/userspace (simulator) agreement.
        // Update only with a fleet-wide, versioned migration.
        assert_eq!(flow_hash(&key_v4(), 0), 0x1458_c04c);
        assert_eq!(flow_hash(&key_v4(), 0xdead_beef), 0x12f5_3640);
        assert_eq!(flow_hash(&key_v6(), 0), 0x1164_aa91);
        assert_eq!(flow_hash(&key_v6(), 0xdead_beef), 0x45d9_75a2);
        assert_eq!(H, 0x944b_a7e1);
    }

    /// The packed form the data path hashes is the same key: same hash,
    /// and its affinity / fragment forms match the key's.
    #[test]
    fn packed_key_hashes_alike() {
        use super::{FlowWords, flow_hash_words};
        use crate::addr_words;
        let mut rng = SplitMix64(0x5eed);
        for i in 0..2000 {
            let mut k = rng.key();
            if i % 2 == 0 {
                k.family = FAMILY_V4;
                k.src = [k.src[0], 0, 0, 0];
                k.dst = [k.dst[0], 0, 0, 0];
            }
            let p = FlowWords::new(
                addr_words(&k.src),
                addr_words(&k.dst),
                k.src_port,
                k.dst_port,
                k.proto,
                k.family,
            );
            assert_eq!(p, k.packed());
            assert_eq!(flow_hash_words(&p, i), flow_hash(&k, i));
            assert_eq!(p.affinity(), k.affinity().packed());
            assert_eq!(p.without_ports(), k.without_ports().packed());
            assert_eq!(p.dst(), addr_words(&k.dst));
        }
    }

    #[test]
    fn matches_the_reference_over_the_key_bytes() {
        // So any other implementation can reproduce the hash from the key's
        // forty bytes.
        let mut rng = SplitMix64(1);
        let keys = [key_v4(), key_v6()]
            .into_iter()
            .chain((0..500).map(|_| rng.key()));
        for (i, k) in keys.enumerate() {
            let seed = (i as u32).wrapping_mul(0x9e37_79b9);
            let bytes: Vec<u8> = k.words().iter().flat_map(|w| w.to_le_bytes()).collect();
            assert_eq!(flow_hash(&k, seed), reference_hash(&bytes, seed), "{k:?}");
        }
    }

    #[test]
    fn words_layout() {
        let k = FlowKey {
            src: [0x0101_0101, 0x0202_0202, 0x0303_0303, 0x0404_0404],
            dst: [0x0505_0505, 0x0606_0606, 0x0707_0707, 0x0808_0808],
            src_port: 0x1234,
            dst_port: 0xabcd,
            proto: PROTO_UDP,
            family: FAMILY_V6,
            _pad: [0xff, 0xee],
        };
        assert_eq!(
            k.words(),
            [
                0x0101_0101,
                0x0202_0202,
                0x0303_0303,
                0x0404_0404,
                0x0505_0505,
                0x0606_0606,
                0x0707_0707,
                0x0808_0808,
                0xabcd_1234, // src_port low half, dst_port high half
                0x0000_0611, // proto low byte, family next, padding never hashed
            ]
        );
        assert_eq!(FlowKey::WORDS, 10);
        // The padding does not influence the hash.
        assert_eq!(
            flow_hash(&k, 5),
            flow_hash(&FlowKey { _pad: [0; 2], ..k }, 5)
        );
        // On little-endian hosts (and bpfel), the words are the key's own
        // bytes: the hash is MurmurHash3 over the 40-byte key in memory.
        #[cfg(target_endian = "little")]
        {
            let k = FlowKey { _pad: [0; 2], ..k };
            // SAFETY: FlowKey is repr(C), 40 bytes of integers, no implicit padding.
            let raw: [u8; 40] = unsafe { core::mem::transmute(k) };
            let from_words: Vec<u8> = k.words().iter().flat_map(|w| w.to_le_bytes()).collect();
            assert_eq!(&raw[..], &from_words[..]);
        }
    }

    #[test]
    fn avalanche() {
        // Flipping any one input bit flips each output bit with probability
        // ½; over N = 2000 keys the observed rate has σ ≈ 0.011, so
        // [0.40, 0.60] is a ±9σ band.
        const SAMPLES: u32 = 2000;
        let mut rng = SplitMix64(0x0a7a_1a7c);
        let mut flips = vec![[0u32; 32]; KEY_BITS];
        for _ in 0..SAMPLES {
            let k = rng.key();
            let seed = rng.next_u32();
            let h = flow_hash(&k, seed);
            for (bit, counts) in flips.iter_mut().enumerate() {
                let diff = h ^ flow_hash(&flip(k, bit), seed);
                for (out, c) in counts.iter_mut().enumerate() {
                    *c += (diff >> out) & 1;
                }
            }
        }
        let mut worst = 0.5f64;
        for (bit, counts) in flips.iter().enumerate() {
            for (out, &c) in counts.iter().enumerate() {
                let p = f64::from(c) / f64::from(SAMPLES);
                assert!(
                    (0.40..=0.60).contains(&p),
                    "input bit {bit} flips output bit {out} with probability {p}"
                );
                if (p - 0.5).abs() > (worst - 0.5).abs() {
                    worst = p;
                }
            }
        }
        std::eprintln!("avalanche: worst flip probability {worst:.4}");
    }

    /// Pearson's chi-square of `counts` against a uniform expectation, and
    /// its degrees of freedom.
    fn chi_square(counts: &[u32]) -> (f64, f64) {
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let expected = total as f64 / counts.len() as f64;
        let chi2 = counts
            .iter()
            .map(|&c| {
                let d = f64::from(c) - expected;
                d * d / expected
            })
            .sum();
        (chi2, (counts.len() - 1) as f64)
    }

    /// Hashes `keys` into `slots` buckets with `ring_slot`.
    fn buckets(keys: impl Iterator<Item = FlowKey>, seed: u32, slots: u32) -> Vec<u32> {
        let mut counts = vec![0u32; slots as usize];
        for k in keys {
            counts[ring_slot(flow_hash(&k, seed), slots) as usize] += 1;
        }
        counts
    }

    /// `n` flows of clients counting up their source ports from 1024 (65 536
    /// ports do not make 100 000 flows, so when one client runs out of ports
    /// the next address carries on) to one VIP.
    fn sequential_ports(n: u32) -> impl Iterator<Item = FlowKey> {
        (0..n).map(|i| {
            let n = 1024 + i;
            let client = 0x0a00_0001 + n / 65536; // 10.0.0.1, 10.0.0.2, …
            FlowKey {
                src: v4(client.to_be_bytes()),
                src_port: port(n as u16),
                ..key_v4()
            }
        })
    }

    /// `n` clients with consecutive IPv4 addresses from 100.64.0.0, all with
    /// the same source port, to one VIP.
    fn sequential_addresses(n: u32) -> impl Iterator<Item = FlowKey> {
        (0..n).map(|i| FlowKey {
            src: v4((0x6440_0000 + i).to_be_bytes()),
            ..key_v4()
        })
    }

    fn assert_chi_square(name: &str, counts: &[u32]) {
        let (chi2, df) = chi_square(counts);
        // χ² has mean df and variance 2·df: six standard deviations.
        let bound = 6.0 * (2.0 * df).sqrt();
        std::eprintln!(
            "{name}: chi-square {chi2:.0}, df {df}, allowed {:.0}..{:.0}",
            df - bound,
            df + bound
        );
        assert!(
            chi2 < df + bound,
            "{name}: chi-square {chi2} too large (df {df})"
        );
        // Also not suspiciously regular: that would mean sequential inputs
        // map to a pattern, not to random-looking slots.
        assert!(
            chi2 > df - bound,
            "{name}: chi-square {chi2} too small (df {df})"
        );
    }

    #[test]
    fn spread_of_sequential_ports_over_65537_slots() {
        for seed in [0, 0x5eed_0001] {
            let counts = buckets(sequential_ports(100_000), seed, 65537);
            assert_eq!(counts.iter().sum::<u32>(), 100_000);
            assert_chi_square("sequential ports", &counts);
        }
    }

    #[test]
    fn spread_of_sequential_addresses_over_65537_slots() {
        for seed in [0, 0x5eed_0001] {
            let counts = buckets(sequential_addresses(100_000), seed, 65537);
            assert_eq!(counts.iter().sum::<u32>(), 100_000);
            assert_chi_square("sequential addresses", &counts);
        }
    }

    #[test]
    fn spread_over_10_slots_within_2_percent() {
        // Each of 10 buckets gets 1/10 ± 2 % (relative). With 100 000 keys a
        // bucket's σ is ≈ 0.95 % of its mean, so ±2 % would be only ≈ 2σ and
        // a perfect hash would miss it about a third of the time; 1 000 000
        // keys make it ≈ 6.7σ. The 100 000-key sequences must be within
        // ±10 % (≈ 10σ) of 1/10, and pass the chi-square test.
        for n in [100_000, 1_000_000] {
            let tolerance = if n == 1_000_000 { 0.02 } else { 0.10 };
            for (name, counts) in [
                (
                    "sequential ports",
                    buckets(sequential_ports(n), 0x5eed_0001, 10),
                ),
                (
                    "sequential addresses",
                    buckets(sequential_addresses(n), 0x5eed_0001, 10),
                ),
            ] {
                std::eprintln!("{n} {name} over 10 slots: {counts:?}");
                for (slot, &c) in counts.iter().enumerate() {
                    let share = f64::from(c) / f64::from(n);
                    assert!(
                        (share - 0.1).abs() <= 0.1 * tolerance,
                        "{n} {name}: slot {slot} has share {share}"
                    );
                }
                assert_chi_square(name, &counts);
            }
        }
    }

    #[test]
    fn affinity_keeps_only_source_and_family() {
        let k = FlowKey {
            _pad: [0xaa, 0xbb],
            ..key_v6()
        };
        assert_eq!(
            k.affinity(),
            FlowKey {
                src: k.src,
                family: FAMILY_V6,
                ..FlowKey::default()
            }
        );
        // Every flow of one client hashes alike under affinity…
        let other = FlowKey {
            dst: v6([0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x80]),
            src_port: port(1234),
            dst_port: port(443),
            proto: PROTO_TCP,
            ..k
        };
        assert_ne!(flow_hash(&k, 9), flow_hash(&other, 9));
        assert_eq!(flow_hash(&k.affinity(), 9), flow_hash(&other.affinity(), 9));
        let v4_a = key_v4();
        let v4_b = FlowKey {
            src_port: port(40001),
            ..v4_a
        };
        assert_ne!(flow_hash(&v4_a, 9), flow_hash(&v4_b, 9));
        assert_eq!(
            flow_hash(&v4_a.affinity(), 9),
            flow_hash(&v4_b.affinity(), 9)
        );
        // …while another client does not.
        let stranger = FlowKey {
            src: v4([198, 51, 100, 8]),
            ..v4_a
        };
        assert_ne!(
            flow_hash(&v4_a.affinity(), 9),
            flow_hash(&stranger.affinity(), 9)
        );
    }

    #[test]
    fn without_ports_keeps_addresses_and_protocol() {
        let k = FlowKey {
            _pad: [1, 2],
            ..key_v4()
        };
        assert_eq!(
            k.without_ports(),
            FlowKey {
                src: k.src,
                dst: k.dst,
                proto: PROTO_TCP,
                family: FAMILY_V4,
                ..FlowKey::default()
            }
        );
        // Fragments of one datagram (ports known or not) hash alike…
        let no_ports = FlowKey {
            src_port: 0,
            dst_port: 0,
            ..k
        };
        assert_eq!(
            flow_hash(&k.without_ports(), 3),
            flow_hash(&no_ports.without_ports(), 3)
        );
        // …but the protocol and the addresses still count.
        let udp = FlowKey {
            proto: PROTO_UDP,
            ..k
        };
        assert_ne!(
            flow_hash(&k.without_ports(), 3),
            flow_hash(&udp.without_ports(), 3)
        );
        let other_dst = FlowKey {
            dst: v4([192, 0, 2, 11]),
            ..k
        };
        assert_ne!(
            flow_hash(&k.without_ports(), 3),
            flow_hash(&other_dst.without_ports(), 3)
        );
    }

    #[test]
    fn seed_changes_the_hash() {
        let mut rng = SplitMix64(77);
        let mut keys = vec![key_v4(), key_v6(), FlowKey::default()];
        keys.extend((0..1000).map(|_| rng.key()));
        for k in &keys {
            let h0 = flow_hash(k, 0);
            for seed in [1, 2, 0x8000_0000, 0xdead_beef, u32::MAX] {
                assert_ne!(h0, flow_hash(k, seed), "seed {seed:#x} on {k:?}");
            }
        }
        // And the seed really re-randomises: the slots of 10 000 keys under
        // two seeds agree about as often as chance (1/101), not more.
        let same = (0..10_000)
            .map(|_| rng.key())
            .filter(|k| ring_slot(flow_hash(k, 1), 101) == ring_slot(flow_hash(k, 2), 101))
            .count();
        assert!(
            same < 200,
            "{same} of 10000 keys keep their slot across seeds"
        );
    }

    #[test]
    fn ring_slot_is_modulo() {
        assert_eq!(ring_slot(0, 65537), 0);
        assert_eq!(ring_slot(65537, 65537), 0);
        assert_eq!(ring_slot(65538, 65537), 1);
        assert_eq!(ring_slot(u32::MAX, 65537), u32::MAX % 65537);
        assert_eq!(ring_slot(12345, 7), 12345 % 7);
    }
}
