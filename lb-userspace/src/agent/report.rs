//! Builds the answers of `lbctl status` and `lbctl stats` from the agent's
//! live config, the applied plan, the health trackers and the counters.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{STAT_NAMES, TrafficCounters};

use super::Agent;
use crate::{
    control::{BackendStats, BackendStatus, StatsReport, StatusReport, VipStats, VipStatus},
    datapath::DataplaneStats,
    health::Health,
    model::{BackendState, VipId},
    plan::MapPlan,
    policy,
};

/// Share of each backend id in each VIP's lookup table.
pub fn table_shares(plan: &MapPlan) -> BTreeMap<u32, f64> {
    let mut out = BTreeMap::new();
    for v in &plan.vips {
        let n = v.ring.len().max(1) as f64;
        for (id, c) in v.slot_counts.iter() {
            out.insert(*id, f64::from(*c) / n);
        }
    }
    out
}

/// Backend ids by (VIP, address) in the applied plan.
pub fn backend_ids(plan: &MapPlan) -> BTreeMap<(VipId, IpAddr), (u32, BackendState)> {
    plan.backends
        .iter()
        .map(|b| ((b.vip, b.address), (b.id, b.state)))
        .collect()
}

/// `lbctl status`.
pub fn status(agent: &Agent) -> StatusReport {
    let plan = agent.applied();
    let shares = plan.map(table_shares).unwrap_or_default();
    let ids = plan.map(backend_ids).unwrap_or_default();
    let digests: BTreeMap<VipId, u64> = plan
        .map(|p| p.vips.iter().map(|v| (v.vip, v.fleet_digest)).collect())
        .unwrap_or_default();
    let verify_diffs = match plan {
        Some(p) => agent
            .datapath()
            .verify(p)
            .unwrap_or_else(|e| vec![format!("verification failed: {e}")]),
        None => vec!["nothing applied".into()],
    };
    let cfg = agent.config();
    let vips = cfg
        .vips
        .iter()
        .map(|v| {
            let id = v.id();
            VipStatus {
                name: v.name.clone(),
                vip: id.to_string(),
                mode: v.mode,
                hash: v.hash,
                table_size: v.table_size,
                fleet_digest: digests
                    .get(&id)
                    .map(|d| format!("{d:016x}"))
                    .unwrap_or_default(),
                valve_alert: agent.valve_alerts().get(&id).cloned(),
                min_backends: v.min_backends(&cfg.policy),
                backends: v
                    .backends
                    .iter()
                    .map(|b| {
                        let key = (id, b.address);
                        let tracker = agent.trackers().get(&key);
                        let (bid, state) = ids
                            .get(&key)
                            .copied()
                            .unwrap_or((u32::MAX, BackendState::Down));
                        BackendStatus {
                            address: b.address,
                            weight: b.weight,
                            admin: b.state,
                            health: match tracker.map(super::Tracker::health) {
                                None => "unchecked".into(),
                                Some(Health::Up) => "up".into(),
                                Some(Health::Down) => "down".into(),
                            },
                            state,
                            table_share: shares.get(&bid).copied().unwrap_or(0.0),
                            consecutive_ok: tracker.map_or(0, super::Tracker::consecutive_ok),
                            consecutive_fail: tracker.map_or(0, super::Tracker::consecutive_fail),
                            last_error: tracker.and_then(|t| t.last_error().map(str::to_owned)),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    StatusReport {
        config_path: agent.config_path().display().to_string(),
        generation: agent.generation(),
        live_generation: agent.datapath().live_generation().unwrap_or(0),
        interface: cfg.agent.interface.clone(),
        attach_mode: if agent.is_detached() {
            "detached".into()
        } else {
            format!("{:?}", cfg.agent.xdp_mode).to_lowercase()
        },
        adopted: agent.datapath().adopted(),
        verify_diffs,
        uptime_secs: agent.uptime().as_secs(),
        vips,
        events: agent.events().cloned().collect(),
        guard: agent.guard_status(),
        last_change: agent.last_change(),
        guard_rollbacks: agent.guard_rollbacks(),
    }
}

fn rate(new: u64, old: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        new.saturating_sub(old) as f64 / secs
    }
}

/// `lbctl stats`: counters now, rates over the sampled window.
pub fn stats(agent: &Agent, now: &DataplaneStats) -> StatsReport {
    let samples = agent.samples();
    let (window, old) = match samples.front() {
        Some((t, s)) => (t.elapsed().as_secs_f64(), Some(s)),
        None => (0.0, None),
    };
    let zero = TrafficCounters::default();
    let plan = agent.applied();
    let ids = plan.map(backend_ids).unwrap_or_default();
    let vip_ids: BTreeMap<VipId, u32> = plan
        .map(|p| p.vips.iter().map(|v| (v.vip, v.meta.vip_id)).collect())
        .unwrap_or_default();
    let vips = agent
        .config()
        .vips
        .iter()
        .map(|v| {
            let id = v.id();
            let vid = vip_ids.get(&id).copied().unwrap_or(u32::MAX);
            let cur = now.vips.get(&vid).copied().unwrap_or(zero);
            let prev = old.and_then(|o| o.vips.get(&vid)).copied().unwrap_or(cur);
            let backends: Vec<BackendStats> = v
                .backends
                .iter()
                .map(|b| {
                    let bid = ids.get(&(id, b.address)).map_or(u32::MAX, |x| x.0);
                    let c = now.backends.get(&bid).copied().unwrap_or(zero);
                    let p = old.and_then(|o| o.backends.get(&bid)).copied().unwrap_or(c);
                    BackendStats {
                        address: b.address,
                        packets: c.packets,
                        bytes: c.bytes,
                        new_flows: c.new_flows,
                        pps: rate(c.packets, p.packets, window),
                        bps: rate(c.bytes, p.bytes, window) * 8.0,
                        new_flow_share: 0.0,
                    }
                })
                .collect();
            let total: u64 = backends.iter().map(|b| b.new_flows).sum();
            let backends = backends
                .into_iter()
                .map(|mut b| {
                    b.new_flow_share = if total == 0 {
                        0.0
                    } else {
                        b.new_flows as f64 / total as f64
                    };
                    b
                })
                .collect();
            VipStats {
                name: v.name.clone(),
                vip: id.to_string(),
                packets: cur.packets,
                bytes: cur.bytes,
                new_flows: cur.new_flows,
                pps: rate(cur.packets, prev.packets, window),
                bps: rate(cur.bytes, prev.bytes, window) * 8.0,
                backends,
            }
        })
        .collect();
    StatsReport {
        rate_window_secs: window,
        counters: STAT_NAMES
            .iter()
            .zip(&now.global)
            .map(|(n, v)| ((*n).to_owned(), *v))
            .collect(),
        vips,
    }
}

/// Human lines of what a verdict says changed.
pub fn diff_lines(v: &policy::Verdict) -> Vec<String> {
    v.vips
        .iter()
        .filter(|x| x.change != policy::Change::Unchanged)
        .map(|x| {
            let shares: Vec<String> = x
                .backends
                .iter()
                .map(|b| match b.before {
                    Some(before) if (before - b.after).abs() > 1e-9 => format!(
                        "{} {:.1}% → {:.1}%",
                        b.address,
                        before * 100.0,
                        b.after * 100.0
                    ),
                    Some(_) => format!("{} {:.1}%", b.address, b.after * 100.0),
                    None => format!("{} new {:.1}%", b.address, b.after * 100.0),
                })
                .collect();
            let removed: Vec<String> = x
                .removed
                .iter()
                .map(|(a, before)| format!("{a} {:.1}% → removed", before * 100.0))
                .collect();
            format!(
                "{} {} {:?}: {}{}; {:.1}% of flows move",
                x.name,
                x.vip,
                x.change,
                shares.join(", "),
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(", {}", removed.join(", "))
                },
                x.moved * 100.0
            )
            .to_lowercase()
        })
        .collect()
}
