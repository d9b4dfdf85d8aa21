//! `lbctl simulate`: what share of new flows each backend would get under a
//! config, computed two independent ways that must agree.
//!
//! 1. The model: the planned lookup tables (pure userspace) — each
//!    backend's table share, and for every synthetic flow the backend the
//!    flow hash and the table pick.
//! 2. The kernel: the real XDP object, loaded unattached into private maps
//!    programmed with the same plan; every synthetic flow (a TCP SYN or a
//!    UDP datagram from a random client address and port) is run through
//!    it with BPF_PROG_TEST_RUN and the backend read from the output frame.
//!
//! Nothing live is touched. Backend selection does not depend on the
//! forwarding mode, so every VIP is simulated in L2 DSR mode with a
//! synthetic MAC per backend (the MAC names the backend in the output);
//! health is taken as all-up.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{FlowKey, flow_hash, ring_slot};
use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    datapath::{Datapath, DatapathError, LoadOptions},
    model::{ForwardingMode, HashMode, MacAddr, Protocol},
    plan::{self, IdAllocator, port_wire, wire_address},
};

/// One backend's shares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimBackend {
    pub address: IpAddr,
    pub weight: u32,
    /// From the weights (and admin state).
    pub expected: f64,
    /// Share of the planned table.
    pub predicted: f64,
    /// Share of the synthetic flows the kernel sent to it.
    pub observed: f64,
}

/// One VIP's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimVip {
    pub name: String,
    pub vip: String,
    pub flows: u32,
    /// Flows where the kernel's backend differs from the model's (must be 0).
    pub mismatches: u32,
    /// Flows the kernel did not forward (must be 0).
    pub not_forwarded: u32,
    /// Largest |observed − expected| (sampling noise plus table rounding).
    pub worst_deviation: f64,
    pub backends: Vec<SimBackend>,
}

/// The whole simulation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub flows_per_vip: u32,
    /// Model and kernel agree on every flow of every VIP.
    pub agree: bool,
    pub vips: Vec<SimVip>,
}

/// Errors of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("planning: {0}")]
    Plan(#[from] plan::PlanError),
    #[error("{0} (simulate loads the XDP object: run it as root)")]
    Datapath(#[from] DatapathError),
    #[error("BPF_PROG_TEST_RUN failed: {0}")]
    TestRun(String),
}

const XDP_TX: u32 = 3;
const LB_MAC: [u8; 6] = [0x02, 0x51, 0x4d, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [0x02, 0x51, 0x4d, 0, 0, 2];

fn synthetic_mac(i: usize) -> MacAddr {
    let i = i as u32;
    MacAddr([
        0x02,
        0x5e,
        (i >> 24) as u8,
        (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ])
}

/// xorshift64*: deterministic synthetic flows.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying a TCP SYN or a UDP datagram.
fn frame(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: Protocol) -> Vec<u8> {
    let mut l4 = match proto {
        Protocol::Tcp => {
            let mut t = vec![0u8; 20];
            t[12] = 5 << 4;
            t[13] = 0x02; // SYN
            t[14..16].copy_from_slice(&65535u16.to_be_bytes());
            t
        }
        Protocol::Udp => {
            let mut u = vec![0u8; 8];
            u[4..6].copy_from_slice(&8u16.to_be_bytes());
            u
        }
    };
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    let mut f = Vec::with_capacity(80);
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = proto.number();
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            ip[6] = proto.number();
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            f.extend_from_slice(&ip);
        }
        _ => unreachable!("a flow's addresses share the VIP's family"),
    }
    f.extend_from_slice(&l4);
    f
}

/// The key the data path hashes for this flow.
fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: Protocol) -> FlowKey {
    let (s, family) = wire_address(src);
    let (d, _) = wire_address(dst);
    FlowKey {
        src: s,
        dst: d,
        src_port: port_wire(sport),
        dst_port: port_wire(dport),
        proto: proto.number(),
        family,
        _pad: [0; 2],
    }
}

fn client(rng: &mut Rng, v6: bool) -> IpAddr {
    let r = rng.next();
    if v6 {
        let mut o = [0u8; 16];
        o[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        o[4..6].copy_from_slice(&[0x51, 0x4d]);
        o[8..16].copy_from_slice(&r.to_be_bytes());
        IpAddr::from(o)
    } else {
        // 198.18.128.0/17
        let host = (r as u32) & 0x7fff;
        IpAddr::from([198, 18, 128 | (host >> 8) as u8, host as u8])
    }
}

/// Runs the simulation for every VIP of `cfg` with `flows` flows each.
#[allow(clippy::too_many_lines)]
pub fn run(cfg: &Config, flows: u32) -> Result<SimReport, SimError> {
    let mut spec = cfg.dataplane_spec(1, &|_, _| true);
    let mut mac_to_addr: BTreeMap<(usize, MacAddr), IpAddr> = BTreeMap::new();
    let mut n = 0;
    for (vi, v) in spec.vips.iter_mut().enumerate() {
        v.mode = ForwardingMode::Dsr;
        for b in &mut v.backends {
            let mac = synthetic_mac(n);
            n += 1;
            b.mac = Some(mac);
            mac_to_addr.insert((vi, mac), b.address);
        }
    }
    let planned = plan::plan(&spec, &IdAllocator::default())?;
    let mut dp = Datapath::load(LoadOptions {
        conn_table_capacity: 4096,
        pin_dir: None,
    })?;
    dp.apply(&planned)?;
    // The frames below are addressed to LB_MAC: the program's own MAC.
    dp.set_interface_mac(LB_MAC)?;
    let prog = dp.program()?;
    let mut out = vec![0u8; 256];
    let mut report = SimReport {
        flows_per_vip: flows,
        agree: true,
        vips: Vec::new(),
    };
    for (vi, (v, pv)) in spec.vips.iter().zip(&planned.vips).enumerate() {
        let name = cfg
            .vips
            .iter()
            .find(|c| c.id() == v.id())
            .map_or_else(String::new, |c| c.name.clone());
        let ids: BTreeMap<u32, IpAddr> = planned
            .backends
            .iter()
            .filter(|b| b.vip == pv.vip)
            .map(|b| (b.id, b.address))
            .collect();
        let table: BTreeMap<IpAddr, u64> = pv
            .slot_counts
            .iter()
            .filter_map(|(id, c)| ids.get(id).map(|a| (*a, u64::from(*c))))
            .collect();
        let mut seen: BTreeMap<IpAddr, u64> = BTreeMap::new();
        let (mut mismatches, mut not_forwarded) = (0, 0);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (vi as u64 + 1));
        let v6 = v.address.is_ipv6();
        for _ in 0..flows {
            let src = client(&mut rng, v6);
            let sport = 1024 + (rng.next() % 64000) as u16;
            let key = flow_key(src, sport, v.address, v.port, v.protocol);
            let hashed = if v.hash == HashMode::SourceAddress {
                key.affinity()
            } else {
                key
            };
            let slot = ring_slot(flow_hash(&hashed, spec.hash_seed), pv.meta.ring_size);
            let model = pv
                .ring
                .get(slot as usize)
                .and_then(|id| ids.get(id))
                .copied();
            let pkt = frame(src, sport, v.address, v.port, v.protocol);
            let mut o = TestRunOptions::new();
            o.data_in = Some(&pkt);
            o.data_out = Some(&mut out);
            o.repeat = 1;
            let r = prog
                .test_run(o)
                .map_err(|e| SimError::TestRun(e.to_string()))?;
            let kernel = (r.return_value == XDP_TX && r.data_size_out >= 6)
                .then(|| {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(&out[..6]);
                    mac_to_addr.get(&(vi, MacAddr(m))).copied()
                })
                .flatten();
            match kernel {
                Some(a) => *seen.entry(a).or_default() += 1,
                None => not_forwarded += 1,
            }
            if kernel != model {
                mismatches += 1;
            }
        }
        let total_w: f64 = v
            .backends
            .iter()
            .filter(|b| b.state == crate::model::BackendState::Active)
            .map(|b| f64::from(b.weight))
            .sum();
        let ring_len = pv.ring.len().max(1) as f64;
        let backends: Vec<SimBackend> = v
            .backends
            .iter()
            .map(|b| SimBackend {
                address: b.address,
                weight: b.weight,
                expected: if b.state == crate::model::BackendState::Active && total_w > 0.0 {
                    f64::from(b.weight) / total_w
                } else {
                    0.0
                },
                predicted: table.get(&b.address).copied().unwrap_or(0) as f64 / ring_len,
                observed: seen.get(&b.address).copied().unwrap_or(0) as f64
                    / f64::from(flows.max(1)),
            })
            .collect();
        let worst = backends
            .iter()
            .map(|b| (b.observed - b.expected).abs())
            .fold(0.0, f64::max);
        if mismatches > 0 || not_forwarded > 0 {
            report.agree = false;
        }
        report.vips.push(SimVip {
            name,
            vip: v.id().to_string(),
            flows,
            mismatches,
            not_forwarded,
            worst_deviation: worst,
            backends,
        });
    }
    Ok(report)
}

/// Human-readable report.
pub fn render(r: &SimReport) -> String {
    let mut o = format!(
        "{} synthetic flows per VIP through the real XDP program (unattached, private maps)\n",
        r.flows_per_vip
    );
    for v in &r.vips {
        let _ = writeln!(
            o,
            "\nVIP {} {}: model and kernel {} ({} of {} flows differ, {} not forwarded); worst |observed − expected| {:.2} points",
            v.name,
            v.vip,
            if v.mismatches == 0 && v.not_forwarded == 0 {
                "agree"
            } else {
                "DISAGREE"
            },
            v.mismatches,
            v.flows,
            v.not_forwarded,
            v.worst_deviation * 100.0
        );
        let _ = writeln!(
            o,
            "  {:<28} {:>6} {:>9} {:>10} {:>9}",
            "backend", "weight", "expected", "predicted", "observed"
        );
        for b in &v.backends {
            let _ = writeln!(
                o,
                "  {:<28} {:>6} {:>8.2}% {:>9.2}% {:>8.2}%",
                b.address.to_string(),
                b.weight,
                b.expected * 100.0,
                b.predicted * 100.0,
                b.observed * 100.0
            );
        }
    }
    let _ = writeln!(
        o,
        "\n{}",
        if r.agree {
            "model and kernel agree on every flow"
        } else {
            "MODEL AND KERNEL DISAGREE"
        }
    );
    o
}
