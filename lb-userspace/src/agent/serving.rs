//! The serving policy: which of a VIP's backends get new flows, given
//! their admin state and their health. Health alone would remove every
//! failed backend; the safety valve below keeps a VIP from shrinking to a
//! handful of survivors when many fail at once.
//!
//! [`safety_valve`] is the pure per-VIP decision. If at most
//! `max_unhealthy_share` of a VIP's eligible backends are down, the down
//! ones are removed. If more fail *at once*, the problem is much more
//! likely the probes, the network or the agent than the backends, and
//! removing them would pile the whole load on the few survivors (the outage
//! this project exists because of). The valve then trips: the VIP keeps
//! serving the backends it served before (restricted to those still
//! eligible), and the decision carries a reason for an alert. When
//! **every** eligible backend is down the valve trips as well and fails
//! open (last served set, or all eligible backends): a VIP with no backends
//! drops all traffic, which is never better than trying.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt::Display,
    net::IpAddr,
};

use super::ServeSets;
use crate::{config::Config, model::VipId};

/// Which backends may serve, per VIP, and the VIPs whose valve is holding
/// (with the reason). `is_down` says what the health checks say of a
/// backend; `served` is what each VIP served at the last apply (a VIP not
/// in it counts as having served all its eligible backends).
pub fn serve_sets(
    cfg: &Config,
    is_down: impl Fn(VipId, IpAddr) -> bool,
    served: &BTreeMap<VipId, BTreeSet<IpAddr>>,
) -> (ServeSets, BTreeMap<VipId, String>) {
    let mut out = BTreeMap::new();
    let mut alerts = BTreeMap::new();
    for vip in &cfg.vips {
        let id = vip.id();
        let down: BTreeSet<IpAddr> = vip
            .backends
            .iter()
            .filter(|b| is_down(id, b.address))
            .map(|b| b.address)
            .collect();
        let eligible: Vec<IpAddr> = vip.eligible_backends().map(|b| b.address).collect();
        let last = served
            .get(&id)
            .cloned()
            .unwrap_or_else(|| eligible.iter().copied().collect());
        let decision = safety_valve(ValveInput {
            eligible: &eligible,
            down: &down,
            last_served: &last,
            max_unhealthy_share: cfg.policy.max_unhealthy_share,
        });
        if let Some(reason) = decision.reason.filter(|_| decision.tripped) {
            alerts.insert(id, reason);
        }
        let mut serve = decision.serve;
        // Backends not taking new flows (drain, weight 0) are not the
        // valve's business: they serve while healthy.
        let eligible: HashSet<IpAddr> = eligible.into_iter().collect();
        serve.extend(
            vip.backends
                .iter()
                .filter(|b| !eligible.contains(&b.address) && !down.contains(&b.address))
                .map(|b| b.address),
        );
        out.insert(id, serve);
    }
    (out, alerts)
}

/// Input of [`safety_valve`] for one VIP.
#[derive(Debug)]
pub struct ValveInput<'a, K> {
    /// The VIP's admin-active backends (those that would take new flows if
    /// healthy). Duplicates are ignored.
    pub eligible: &'a [K],
    /// Backends the health checks say are `Health::Down` (may contain
    /// keys that are not eligible; they are ignored).
    pub down: &'a BTreeSet<K>,
    /// The set the VIP served before this decision.
    pub last_served: &'a BTreeSet<K>,
    /// Largest share (0..=1) of eligible backends that may be removed for
    /// failing health checks at once. NaN counts as 0; values are clamped
    /// to 0..=1.
    pub max_unhealthy_share: f64,
}

impl<K> Clone for ValveInput<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for ValveInput<'_, K> {}

/// Output of [`safety_valve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValveDecision<K> {
    /// The backends that get new flows.
    pub serve: BTreeSet<K>,
    /// Whether the valve tripped (too many failed at once): alert.
    pub tripped: bool,
    /// Why it tripped, for the alert; `None` when not tripped.
    pub reason: Option<String>,
}

/// Tolerance of the share comparison, so that e.g. 3 of 10 down is within
/// a limit of 0.3 despite floating point.
const SHARE_EPSILON: f64 = 1e-9;
/// How many down backends a valve reason names.
const REASON_NAMES: usize = 5;

/// Decides which of a VIP's eligible backends get new flows, given which
/// are down.
///
/// - Let `d` = |down ∩ eligible| and `n` = |eligible|. If `d ≤
///   max_unhealthy_share × n` and `d < n`, serve `eligible − down`, not
///   tripped.
/// - Otherwise the valve trips: serve the eligible backends that were in
///   `last_served` (all eligible backends if none were), with a reason
///   naming how many of how many failed at once.
/// - In particular, if **every** eligible backend is down the valve trips
///   and fails open, whatever the limit: an empty VIP drops all traffic.
/// - No eligible backends: serve nothing, not tripped.
///
/// Hence `serve ⊆ eligible`, and `serve` is empty only if `eligible` is.
pub fn safety_valve<K: Ord + Clone + Display>(input: ValveInput<'_, K>) -> ValveDecision<K> {
    let eligible: BTreeSet<&K> = input.eligible.iter().collect();
    let n = eligible.len();
    let down: Vec<&K> = eligible
        .iter()
        .copied()
        .filter(|k| input.down.contains(*k))
        .collect();
    let d = down.len();
    let limit = if input.max_unhealthy_share.is_nan() {
        0.0
    } else {
        input.max_unhealthy_share.clamp(0.0, 1.0)
    };
    if n == 0 || (d < n && d as f64 <= limit * n as f64 + SHARE_EPSILON) {
        return ValveDecision {
            serve: eligible
                .into_iter()
                .filter(|k| !input.down.contains(*k))
                .cloned()
                .collect(),
            tripped: false,
            reason: None,
        };
    }
    let kept: BTreeSet<K> = eligible
        .iter()
        .copied()
        .filter(|k| input.last_served.contains(*k))
        .cloned()
        .collect();
    let (serve, kept_what) = if kept.is_empty() {
        let all: BTreeSet<K> = eligible.into_iter().cloned().collect();
        let what = format!(
            "no previously served backend is eligible, serving all {} eligible backends",
            all.len()
        );
        (all, what)
    } else {
        let what = format!("keeping the last healthy set of {} backends", kept.len());
        (kept, what)
    };
    let mut names: Vec<String> = down
        .iter()
        .take(REASON_NAMES)
        .map(ToString::to_string)
        .collect();
    if d > REASON_NAMES {
        names.push(format!("… {} more", d - REASON_NAMES));
    }
    let why = if d == n {
        "every backend failed".to_owned()
    } else {
        format!("more than the allowed {:.0}%", limit * 100.0)
    };
    let reason = format!(
        "safety valve: {d} of {n} backends failed health checks at once ({why}): {kept_what}; \
         down: {}",
        names.join(", ")
    );
    ValveDecision {
        serve,
        tripped: true,
        reason: Some(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(keys: &[u32]) -> BTreeSet<u32> {
        keys.iter().copied().collect()
    }

    fn valve(eligible: &[u32], down: &[u32], last: &[u32], share: f64) -> ValveDecision<u32> {
        safety_valve(ValveInput {
            eligible,
            down: &set(down),
            last_served: &set(last),
            max_unhealthy_share: share,
        })
    }

    #[test]
    fn valve_examples() {
        let all = [1, 2, 3, 4];
        // Within the limit: down ones removed.
        let d = valve(&all, &[2, 4], &all, 0.5);
        assert_eq!((d.serve, d.tripped, d.reason), (set(&[1, 3]), false, None));
        // Down backends that are not eligible do not count.
        let d = valve(&all, &[2, 9, 10], &all, 0.25);
        assert!(!d.tripped);
        assert_eq!(d.serve, set(&[1, 3, 4]));
        // Over the limit: keep the last served set.
        let d = valve(&all, &[1, 2, 3], &[1, 2, 3, 4], 0.5);
        assert!(d.tripped);
        assert_eq!(d.serve, set(&all));
        let reason = d.reason.unwrap();
        assert!(reason.contains("3 of 4"), "{reason}");
        assert!(reason.contains("last healthy set"), "{reason}");
        // ... restricted to eligible ones.
        let d = valve(&[1, 2, 3], &[1, 2, 3], &[2, 3, 7], 0.5);
        assert!(d.tripped);
        assert_eq!(d.serve, set(&[2, 3]));
        // All down: fail open, even with a limit of 100%.
        let d = valve(&all, &all, &[], 1.0);
        assert!(d.tripped);
        assert_eq!(d.serve, set(&all));
        assert!(d.reason.unwrap().contains("every backend"));
        // 3 of 10 is within 0.3 despite floating point.
        let ten: Vec<u32> = (0..10).collect();
        assert!(!valve(&ten, &[0, 1, 2], &[], 0.3).tripped);
        assert!(valve(&ten, &[0, 1, 2, 3], &[], 0.3).tripped);
        // No eligible backends: nothing to serve, nothing to alert.
        let d = valve(&[], &[1], &[1], 0.5);
        assert!(d.serve.is_empty() && !d.tripped);
        // NaN limit counts as 0.
        assert!(valve(&all, &[1], &all, f64::NAN).tripped);
    }

    /// xorshift64: a deterministic test-data generator.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn subset(&mut self, universe: u32, percent: u64) -> BTreeSet<u32> {
            (0..universe)
                .filter(|_| self.below(100) < percent)
                .collect()
        }
    }

    #[test]
    fn valve_properties() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut tripped_seen = 0;
        for _ in 0..20_000 {
            let universe = 1 + rng.below(12) as u32;
            let mut eligible: Vec<u32> = rng.subset(universe, 70).into_iter().collect();
            if rng.below(4) == 0 && !eligible.is_empty() {
                eligible.push(eligible[0]); // duplicates are tolerated
            }
            let down_pct = rng.below(101);
            let down = rng.subset(universe, down_pct);
            let last_pct = rng.below(101);
            let last = rng.subset(universe, last_pct);
            let share = match rng.below(6) {
                0 => 0.0,
                1 => 1.0,
                _ => rng.below(1001) as f64 / 1000.0,
            };
            let d = safety_valve(ValveInput {
                eligible: &eligible,
                down: &down,
                last_served: &last,
                max_unhealthy_share: share,
            });
            let el: BTreeSet<u32> = eligible.iter().copied().collect();
            let ctx = format!("el={el:?} down={down:?} last={last:?} share={share} -> {d:?}");
            assert!(d.serve.is_subset(&el), "{ctx}");
            assert_eq!(d.serve.is_empty(), el.is_empty(), "{ctx}");
            assert_eq!(d.tripped, d.reason.is_some(), "{ctx}");
            let n_down = el.intersection(&down).count();
            if d.tripped {
                tripped_seen += 1;
                let over = n_down as f64 / el.len() as f64 > share + 1e-9;
                assert!(over || n_down == el.len(), "{ctx}");
                let kept: BTreeSet<u32> = el.intersection(&last).copied().collect();
                let expect = if kept.is_empty() { el.clone() } else { kept };
                assert_eq!(d.serve, expect, "{ctx}");
            } else {
                let healthy: BTreeSet<u32> = el.difference(&down).copied().collect();
                assert_eq!(d.serve, healthy, "{ctx}");
                assert!(n_down as f64 <= share * el.len() as f64 + 1e-9, "{ctx}");
            }
        }
        assert!(tripped_seen > 1000, "generator too tame: {tripped_seen}");
    }
}
