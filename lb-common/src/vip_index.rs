//! The VIP index: how the data path finds a VIP entry without a hash-map
//! helper call.
//!
//! `VIP_INDEX` holds two open-addressing tables of [`VIP_INDEX_SLOTS`]
//! slots each; `VIP_INDEX_LIVE` (one `u64`) says which one is live and with
//! which salt it was built. A key lives within [`VIP_INDEX_PROBES`] slots of
//! its home slot ([`vip_index_home`]); userspace builds a table so that this
//! holds (trying other salts if needed; at most a quarter of the slots are
//! used) and a lookup stops at the first empty slot or after that many
//! probes.
//!
//! Userspace writes a whole new table into the idle half, then switches
//! `VIP_INDEX_LIVE` with one aligned 8-byte store: a packet sees the old set
//! of VIPs or the new one, never a slot being written. The half that was
//! live is written again only after an RCU grace period.

use crate::maps::{MAX_VIP_KEYS, VipKey, VipMeta, addr_words, vip_l4_word};

/// Slots of one table: a power of two, four times [`MAX_VIP_KEYS`].
pub const VIP_INDEX_SLOTS: u32 = 4 * MAX_VIP_KEYS;
const _: () = assert!(VIP_INDEX_SLOTS.is_power_of_two());
/// Most slots a lookup reads.
pub const VIP_INDEX_PROBES: u32 = 4;

/// One slot of `VIP_INDEX` (64 bytes: one cache line, as the map is
/// memory-mappable and so page-aligned). An empty slot has `key.family ==
/// 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    pub _pad: u32,
    pub meta: VipMeta,
    pub _reserved: [u32; 6],
}
const _: () = assert!(core::mem::size_of::<VipSlot>() == 64);

/// The `VIP_INDEX_LIVE` word: table `half` (0 or 1) built with `salt`.
#[inline(always)]
#[must_use]
pub const fn vip_index_live(half: u32, salt: u32) -> u64 {
    ((salt as u64) << 32) | (half & 1) as u64
}

/// The table half a `VIP_INDEX_LIVE` word names.
#[inline(always)]
#[must_use]
pub const fn vip_index_half(live: u64) -> u32 {
    (live & 1) as u32
}

/// The salt a `VIP_INDEX_LIVE` word names.
#[inline(always)]
#[must_use]
pub const fn vip_index_salt(live: u64) -> u32 {
    (live >> 32) as u32
}

/// The home slot of `key` in a table built with `salt`: the key folded to
/// 64 bits, multiplied by an odd constant, top bits.
#[inline(always)]
#[must_use]
pub const fn vip_index_home(key: &VipKey, salt: u32) -> u32 {
    vip_index_home_of(
        &addr_words(&key.addr),
        key.port,
        key.proto,
        key.family,
        salt,
    )
}

/// [`vip_index_home`] of a key given by its fields, the address as
/// [`addr_words`] (how the data path holds it).
#[inline(always)]
#[must_use]
pub const fn vip_index_home_of(
    addr: &[u64; 2],
    port: u16,
    proto: u8,
    family: u8,
    salt: u32,
) -> u32 {
    // The four address words, each rotated by 8 more bits than the last,
    // folded into one.
    let (w0, w1) = (addr[0], addr[1]);
    let folded = (w0 as u32)
        ^ ((w0 >> 32) as u32).rotate_left(8)
        ^ (w1 as u32).rotate_left(16)
        ^ ((w1 >> 32) as u32).rotate_left(24);
    let rest = vip_l4_word(port, proto, family);
    let x = (folded as u64) | ((rest as u64) << 32);
    let h =
        (x ^ (salt as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - VIP_INDEX_SLOTS.trailing_zeros())) as u32
}

/// The slot of probe `i` (0-based) from `home`, within one table.
#[inline(always)]
#[must_use]
pub const fn vip_index_probe(home: u32, i: u32) -> u32 {
    (home + i) & (VIP_INDEX_SLOTS - 1)
}

/// An occupied slot.
#[must_use]
pub const fn vip_slot(key: VipKey, meta: VipMeta) -> VipSlot {
    VipSlot {
        key,
        _pad: 0,
        meta,
        _reserved: [0; 6],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_word_round_trip() {
        let w = vip_index_live(1, 0xdead_beef);
        assert_eq!(vip_index_half(w), 1);
        assert_eq!(vip_index_salt(w), 0xdead_beef);
        assert_eq!(vip_index_half(vip_index_live(0, 7)), 0);
    }

    #[test]
    fn homes_are_in_range_and_depend_on_every_field() {
        let k = VipKey {
            addr: [0x0a00_12c6, 0, 0, 0],
            port: 80u16.to_be(),
            proto: 6,
            family: 4,
        };
        let h = vip_index_home(&k, 1);
        assert!(h < VIP_INDEX_SLOTS);
        let mut others = 0;
        for k2 in [
            VipKey {
                port: 81u16.to_be(),
                ..k
            },
            VipKey { proto: 17, ..k },
            VipKey { family: 6, ..k },
            VipKey {
                addr: [0x0b00_12c6, 0, 0, 0],
                ..k
            },
        ] {
            if vip_index_home(&k2, 1) != h {
                others += 1;
            }
        }
        assert!(others >= 3, "homes barely depend on the key");
        // The data path's form (address words, fields) is the same function.
        let w = crate::addr_words(&k.addr);
        assert_eq!(vip_index_home_of(&w, k.port, k.proto, k.family, 1), h);
        let k6 = VipKey {
            addr: [0x0db8_0120, 0x1234_5678, 0x9abc_def0, 0x0f0e_0d0c],
            family: 6,
            ..k
        };
        assert_eq!(
            vip_index_home_of(&crate::addr_words(&k6.addr), k6.port, k6.proto, 6, 9),
            vip_index_home(&k6, 9)
        );
        assert_eq!(vip_index_probe(VIP_INDEX_SLOTS - 1, 1), 0);
    }
}
