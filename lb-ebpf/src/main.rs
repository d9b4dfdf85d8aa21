//! XDP programs of the load balancer.
//!
//! - `xdp_lb`: parses Ethernet (one optional VLAN tag), IPv4 (options) and
//!   IPv6 (extension headers), finds the VIP, keeps established flows on
//!   their backend through the connection table, picks new flows' backends
//!   from the VIP's weighted Maglev table, and forwards by L2 DSR or
//!   IP-in-IP. Everything else passes to the host untouched.
//! - `xdp_decap`: strips IP-in-IP on a backend.
#![no_std]
#![no_main]

mod decap;
mod forward;
mod lb;
mod maps;
mod outcome;
mod parse;
mod select;
mod too_big;

use aya_ebpf::{macros::xdp, programs::XdpContext};

// Inlined into the program's entry, so the whole decision is one BPF
// function (a separate one would also need its calls to the cold
// subprograms relocated across text sections).
#[xdp]
#[inline(always)]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    let outcome = lb::process(&ctx);
    // A forwarded packet's outcome is counted with its traffic counters.
    if outcome.stat != outcome::COUNTED {
        maps::count(outcome.stat);
    }
    outcome.action
}

#[xdp]
pub fn xdp_decap(ctx: XdpContext) -> u32 {
    decap::process(&ctx)
}

/// Live-frame benchmark sink: counts and drops what the program under test
/// sent back.
#[xdp]
pub fn bench_sink(_ctx: XdpContext) -> u32 {
    maps::count_bench();
    aya_ebpf::bindings::xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Benchmark floor: the cheapest possible XDP program, measured with the
/// same method as `xdp_lb` so figures are reported as ratios to it.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Throughput ceiling for live-frame benchmarks: swap the MACs and XDP_TX.
#[xdp]
pub fn bench_macswap(ctx: XdpContext) -> u32 {
    let Some(eth) = parse::ptr_at::<[u16; 6]>(&ctx, 0) else {
        return aya_ebpf::bindings::xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let e = &mut *eth;
        e.swap(0, 3);
        e.swap(1, 4);
        e.swap(2, 5);
    }
    aya_ebpf::bindings::xdp_action::XDP_TX
}
