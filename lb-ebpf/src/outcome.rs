//! What the program does with a packet, and the counter that says why.

use aya_ebpf::bindings::xdp_action;

/// `Outcome::stat` of a packet whose outcome counter is already counted
/// (with its traffic counters, in one lookup).
pub const COUNTED: u32 = u32::MAX;

#[derive(Clone, Copy)]
pub struct Outcome {
    pub action: u32,
    /// One of the outcome counters of `lb_common::stats`.
    pub stat: u32,
}

impl Outcome {
    #[inline(always)]
    pub const fn pass(stat: u32) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            stat,
        }
    }

    #[inline(always)]
    pub const fn drop(stat: u32) -> Self {
        Self {
            action: xdp_action::XDP_DROP,
            stat,
        }
    }

    #[inline(always)]
    pub const fn tx() -> Self {
        Self {
            action: xdp_action::XDP_TX,
            stat: lb_common::STAT_TX,
        }
    }

    #[inline(always)]
    pub const fn redirect() -> Self {
        Self {
            action: xdp_action::XDP_REDIRECT,
            stat: lb_common::STAT_REDIRECT,
        }
    }
}
