//! The guard: after an operator change, watch what the data path really
//! does for `policy.guard_window`. Every second it compares each backend's
//! observed share of a VIP's new flows (from the per-backend counters)
//! with the share its lookup table gives it; once a VIP has seen
//! `guard_min_flows` new flows, a deviation beyond
//! `guard_max_share_deviation` — or drops jumping (more dropped than a
//! tenth of what was forwarded, and at least `guard_min_flows`) — rolls
//! back to the previous generation automatically, and both the verdict and
//! the rollback are recorded in the history.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::STAT_NAMES;

use super::{Agent, history, report};
use crate::{
    datapath::DataplaneStats,
    model::{BackendState, VipId},
    plan::MapPlan,
};

/// A change being watched.
#[derive(Clone, Debug)]
pub struct Guard {
    pub generation: u64,
    /// The generation to return to on a bad verdict.
    pub restore: u64,
    pub started: Instant,
    pub window: Duration,
    baseline: Counters,
}

/// The counters the guard compares.
#[derive(Clone, Debug, Default)]
struct Counters {
    new_flows: BTreeMap<(VipId, IpAddr), u64>,
    drops: u64,
    forwarded: u64,
}

fn counters(plan: &MapPlan, stats: &DataplaneStats) -> Counters {
    let mut c = Counters::default();
    for b in &plan.backends {
        let n = stats.backends.get(&b.id).map_or(0, |t| t.new_flows);
        c.new_flows.insert((b.vip, b.address), n);
    }
    for (name, v) in STAT_NAMES.iter().zip(&stats.global) {
        if name.starts_with("drop_") {
            c.drops += v;
        } else if *name == "tx" || *name == "redirect" {
            c.forwarded += v;
        }
    }
    c
}

impl Agent {
    /// Starts watching generation `generation` (restoring `restore` on a
    /// bad verdict).
    pub(super) fn start_guard(&mut self, generation: u64, restore: u64) {
        let (Some(plan), Ok(stats)) = (self.datapath.applied(), self.datapath.stats()) else {
            return;
        };
        let baseline = counters(plan, &stats);
        let window = self.config.policy.guard_window;
        self.guard = Some(Guard {
            generation,
            restore,
            started: Instant::now(),
            window,
            baseline,
        });
        self.event(&format!(
            "guard: watching generation {generation} for {}s (rollback target {restore})",
            window.as_secs()
        ));
    }

    /// One look at the counters (called every second).
    pub fn guard_tick(&mut self) {
        let Some(g) = self.guard.clone() else {
            return;
        };
        if g.generation != self.generation {
            // Another change superseded the watched one; it has its own guard.
            return;
        }
        let (Some(plan), Ok(stats)) = (self.datapath.applied(), self.datapath.stats()) else {
            return;
        };
        let now = counters(plan, &stats);
        let verdict = judge(&g.baseline, &now, plan, &self.config.policy);
        let flows: u64 = now
            .new_flows
            .iter()
            .map(|(k, v)| v.saturating_sub(g.baseline.new_flows.get(k).copied().unwrap_or(0)))
            .sum();
        match verdict {
            Some(reason) => {
                self.guard = None;
                self.guard_rollbacks += 1;
                self.event(&format!(
                    "ALERT guard: generation {} misbehaves: {reason}; rolling back to {}",
                    g.generation, g.restore
                ));
                self.record_guard(g.generation, &format!("failed: {reason}"));
                if let Err(e) = self.rollback(Some(g.restore), "guard", &reason) {
                    self.event(&format!("ALERT guard: rollback failed: {e}"));
                }
            }
            None if g.started.elapsed() >= g.window => {
                self.guard = None;
                let msg = format!(
                    "passed: {flows} new flows over {}s matched the tables",
                    g.window.as_secs()
                );
                self.event(&format!("guard: generation {} {msg}", g.generation));
                self.record_guard(g.generation, &msg);
            }
            None => {}
        }
    }

    fn record_guard(&self, generation: u64, outcome: &str) {
        self.record(history::Record::new(
            "guard",
            generation,
            "guard",
            outcome,
            &format!("guard {outcome}"),
        ));
    }

    /// The guard's state for `lbctl status`.
    pub fn guard_status(&self) -> Option<String> {
        self.guard.as_ref().map(|g| {
            format!(
                "watching generation {} for {}s more (rollback target {})",
                g.generation,
                g.window.saturating_sub(g.started.elapsed()).as_secs(),
                g.restore
            )
        })
    }
}

/// The verdict on the counters since `base`: a reason to roll back, or
/// None.
fn judge(
    base: &Counters,
    now: &Counters,
    plan: &MapPlan,
    policy: &crate::config::Policy,
) -> Option<String> {
    let shares = report::table_shares(plan);
    for v in &plan.vips {
        let members: Vec<_> = plan.backends.iter().filter(|b| b.vip == v.vip).collect();
        let deltas: Vec<u64> = members
            .iter()
            .map(|b| {
                let k = (b.vip, b.address);
                now.new_flows
                    .get(&k)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(base.new_flows.get(&k).copied().unwrap_or(0))
            })
            .collect();
        let total: u64 = deltas.iter().sum();
        if total < policy.guard_min_flows.max(1) {
            continue;
        }
        for (b, d) in members.iter().zip(&deltas) {
            let expected = if b.state == BackendState::Active {
                shares.get(&b.id).copied().unwrap_or(0.0)
            } else {
                0.0
            };
            let observed = *d as f64 / total as f64;
            if (observed - expected).abs() > policy.guard_max_share_deviation {
                return Some(format!(
                    "VIP {}: backend {} got {:.1}% of {total} new flows, its table share is {:.1}% (guard_max_share_deviation {:.1} points)",
                    v.vip,
                    b.address,
                    observed * 100.0,
                    expected * 100.0,
                    policy.guard_max_share_deviation * 100.0
                ));
            }
        }
    }
    let drops = now.drops.saturating_sub(base.drops);
    let fwd = now.forwarded.saturating_sub(base.forwarded);
    if drops >= policy.guard_min_flows.max(1) && drops * 10 > fwd {
        return Some(format!(
            "drops jumped: {drops} packets dropped against {fwd} forwarded since the change"
        ));
    }
    None
}
