//! Health results into changes: the probe targets follow the live config,
//! and a backend whose health flips re-plans its VIP (through the safety
//! valve, `serving`).

use std::{collections::BTreeSet, net::SocketAddr};

use super::{Agent, BackendKey, Gate, Origin};
use crate::{
    config::AdminState,
    health::{Health, ProbeResult, Target, Tracker},
};

impl Agent {
    /// Starts/stops probe tasks to match the live config.
    pub(super) fn reconcile_probes(&mut self) {
        let mut targets = Vec::new();
        for vip in &self.config.vips {
            for b in &vip.backends {
                if b.state == AdminState::Disabled {
                    continue;
                }
                let Some(check) = b.health.as_ref().or(vip.health.as_ref()) else {
                    continue;
                };
                targets.push(Target {
                    key: (vip.id(), b.address),
                    addr: SocketAddr::new(b.address, check.port.unwrap_or(vip.port)),
                    check: check.clone(),
                });
            }
        }
        let keys: BTreeSet<BackendKey> = targets.iter().map(|t| t.key).collect();
        self.trackers.retain(|k, _| keys.contains(k));
        for t in &targets {
            let initial = if self.initial_down.contains(&t.key) {
                Health::Down
            } else {
                Health::Up
            };
            self.trackers
                .entry(t.key)
                .or_insert_with(|| Tracker::new(t.check.rise, t.check.fall, initial));
        }
        self.monitor.reconcile(targets);
    }

    /// A probe finished: update the backend's state; re-plan if it flipped.
    pub fn on_probe(&mut self, r: ProbeResult<BackendKey>) {
        let Some(tracker) = self.trackers.get_mut(&r.key) else {
            return;
        };
        let Some(t) = tracker.record(r.result, r.at) else {
            return;
        };
        let (vip, addr) = r.key;
        self.event(&format!(
            "VIP {vip} backend {addr}: {:?} -> {:?} ({})",
            t.from, t.to, t.reason
        ));
        let (cfg, source, generation) = (self.config.clone(), self.source.clone(), self.generation);
        if let Err(e) = self.apply(
            cfg,
            source,
            generation,
            &Origin::new("health", "lbd", ""),
            &Gate::Health,
        ) {
            tracing::error!("applying a health change failed: {e}");
            self.event(&format!("health change not applied: {e}"));
        }
    }
}
