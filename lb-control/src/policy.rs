//! What a change will do to the traffic, and whether the policy allows it.
//! Pure: computed from the planned lookup tables (the exact contents the
//! kernel will hold), before anything is written.
//!
//! Per VIP it reports each backend's expected share of new flows (its
//! weight among the backends that take new flows), the share the table
//! gives it before and after, and the fraction of the flow space that moves
//! to another backend. The policy (`[policy]` in the config) then says no
//! when: a backend's share deviates from its weight's share by more than
//! `max_share_deviation`; one backend would get more than
//! `max_share_vs_even` × an even split (the weight typo of the outage);
//! more than `max_flows_moved` of the flow space moves; more than
//! `max_backends_removed` backends stop taking new flows at once; or fewer
//! than the VIP's minimum backends remain.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, Policy},
    model::{BackendState, VipId},
    plan::{MapPlan, PlannedBackend, PlannedVip},
};

/// One backend's shares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendShare {
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// Share its weight asks for (0 when it takes no new flows).
    pub expected: f64,
    /// Share of the table before the change (None: not there before).
    pub before: Option<f64>,
    /// Share of the table after the change.
    pub after: f64,
}

/// How a VIP changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Changed,
    Unchanged,
}

/// One VIP's part of the verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipVerdict {
    pub name: String,
    pub vip: String,
    pub change: Change,
    pub backends: Vec<BackendShare>,
    /// Fraction of the flow space whose new flows go to another backend.
    pub moved: f64,
    /// Largest |after − expected| over the backends.
    pub worst_deviation: f64,
    /// Backends the VIP had before and no longer has (with their share
    /// before).
    #[serde(default)]
    pub removed: Vec<(IpAddr, f64)>,
}

/// The whole verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub vips: Vec<VipVerdict>,
    /// Policy violations, each naming the VIP and backend and the rule.
    pub violations: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Backend address by id for one VIP's members.
fn id_addresses(members: &[&PlannedBackend]) -> BTreeMap<u32, IpAddr> {
    members.iter().map(|b| (b.id, b.address)).collect()
}

fn addr_of(ids: &BTreeMap<u32, IpAddr>, id: u32) -> Option<IpAddr> {
    ids.get(&id).copied()
}

/// Shares of each backend address in one VIP's table.
fn table_shares(ids: &BTreeMap<u32, IpAddr>, v: &PlannedVip) -> BTreeMap<IpAddr, f64> {
    let n = v.ring.len().max(1) as f64;
    v.slot_counts
        .iter()
        .filter_map(|(id, c)| addr_of(ids, *id).map(|a| (a, f64::from(*c) / n)))
        .collect()
}

/// Backends of each VIP.
fn by_vip(plan: &MapPlan) -> BTreeMap<VipId, Vec<&PlannedBackend>> {
    let mut m: BTreeMap<VipId, Vec<&PlannedBackend>> = BTreeMap::new();
    for b in &plan.backends {
        m.entry(b.vip).or_default().push(b);
    }
    m
}

/// Fraction of the flow space that lands on another backend. Same size:
/// slot by slot (exact); different sizes: 65536 evenly spread hashes.
fn moved_fraction(
    old_ids: &BTreeMap<u32, IpAddr>,
    old: &PlannedVip,
    new_ids: &BTreeMap<u32, IpAddr>,
    new: &PlannedVip,
) -> f64 {
    const SAMPLES: u32 = 65536;
    // Address by id as dense tables: this runs per slot.
    let dense = |ids: &BTreeMap<u32, IpAddr>| {
        let len = ids.keys().next_back().map_or(0, |&id| id as usize + 1);
        let mut t = vec![None; len];
        for (&id, &a) in ids {
            t[id as usize] = Some(a);
        }
        t
    };
    let (old_t, new_t) = (dense(old_ids), dense(new_ids));
    let old_addr = |id: u32| old_t.get(id as usize).copied().flatten();
    let new_addr = |id: u32| new_t.get(id as usize).copied().flatten();
    let (sa, sb) = (&old.ring, &new.ring);
    if sa.is_empty() || sb.is_empty() {
        return if sa.is_empty() && sb.is_empty() {
            0.0
        } else {
            1.0
        };
    }
    if sa.len() == sb.len() {
        let moved = sa
            .iter()
            .zip(sb.iter())
            .filter(|&(&x, &y)| old_addr(x) != new_addr(y))
            .count();
        return moved as f64 / sa.len() as f64;
    }
    let step = u32::MAX / SAMPLES;
    let moved = (0..SAMPLES)
        .filter(|i| {
            let hash = i * step;
            let x = sa[lb_common::ring_slot(hash, sa.len() as u32) as usize];
            let y = sb[lb_common::ring_slot(hash, sb.len() as u32) as usize];
            old_addr(x) != new_addr(y)
        })
        .count();
    moved as f64 / f64::from(SAMPLES)
}

/// Evaluates `next` (the plan of `cfg`) against `prev` (what is live).
#[allow(clippy::too_many_lines)]
pub fn evaluate(prev: Option<&MapPlan>, next: &MapPlan, cfg: &Config) -> Verdict {
    let p = &cfg.policy;
    let names: BTreeMap<VipId, &str> = cfg.vips.iter().map(|v| (v.id(), v.name.as_str())).collect();
    let next_members = by_vip(next);
    let prev_members = prev.map(by_vip).unwrap_or_default();
    let prev_vips: BTreeMap<VipId, &PlannedVip> = prev
        .map(|pl| pl.vips.iter().map(|v| (v.vip, v)).collect())
        .unwrap_or_default();
    let mut out = Verdict {
        vips: Vec::new(),
        violations: Vec::new(),
    };
    for v in &next.vips {
        let name = names.get(&v.vip).copied().unwrap_or("?");
        let label = format!("VIP {name} ({})", v.vip);
        let before_plan = prev_vips.get(&v.vip).copied();
        let empty = Vec::new();
        let members: &Vec<&PlannedBackend> = next_members.get(&v.vip).unwrap_or(&empty);
        let new_ids = id_addresses(members);
        let old_ids = before_plan.map(|b| id_addresses(prev_members.get(&b.vip).unwrap_or(&empty)));
        let after = table_shares(&new_ids, v);
        // Same table, same owners: nothing to recount.
        let same = before_plan.is_some_and(|b| {
            std::sync::Arc::ptr_eq(&b.ring, &v.ring) && old_ids.as_ref() == Some(&new_ids)
        });
        let before = match (&old_ids, before_plan) {
            _ if same => Some(after.clone()),
            (Some(ids), Some(b)) => Some(table_shares(ids, b)),
            _ => None,
        };
        let taking: Vec<_> = members
            .iter()
            .filter(|b| b.state == BackendState::Active && b.weight > 0)
            .collect();
        let total: f64 = taking.iter().map(|b| f64::from(b.weight)).sum();
        let backends: Vec<BackendShare> = members
            .iter()
            .map(|b| {
                let takes = b.state == BackendState::Active && b.weight > 0;
                BackendShare {
                    address: b.address,
                    weight: b.weight,
                    state: b.state,
                    expected: if takes && total > 0.0 {
                        f64::from(b.weight) / total
                    } else {
                        0.0
                    },
                    before: before
                        .as_ref()
                        .map(|m| m.get(&b.address).copied().unwrap_or(0.0)),
                    after: after.get(&b.address).copied().unwrap_or(0.0),
                }
            })
            .collect();
        let worst = backends
            .iter()
            .map(|b| (b.after - b.expected).abs())
            .fold(0.0, f64::max);
        let moved = match (&old_ids, before_plan) {
            _ if same => 0.0,
            (Some(ids), Some(b)) => moved_fraction(ids, b, &new_ids, v),
            _ => 0.0,
        };
        let change = match before_plan {
            None => Change::Added,
            Some(b) if b.ring_digest == v.ring_digest && moved == 0.0 && b.meta == v.meta => {
                Change::Unchanged
            }
            Some(_) => Change::Changed,
        };
        check_vip(
            p,
            cfg,
            &label,
            v,
            &backends,
            taking.len(),
            moved,
            before_plan.is_some(),
            prev.map(|_| prev_members.get(&v.vip).map_or(&[][..], Vec::as_slice)),
            &mut out.violations,
        );
        let removed: Vec<(IpAddr, f64)> = old_ids
            .as_ref()
            .map(|ids| {
                let now: BTreeSet<IpAddr> = new_ids.values().copied().collect();
                let shares = before_plan
                    .map(|b| table_shares(ids, b))
                    .unwrap_or_default();
                ids.values()
                    .filter(|a| !now.contains(a))
                    .map(|a| (*a, shares.get(a).copied().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        let change = if removed.is_empty() {
            change
        } else {
            Change::Changed
        };
        out.vips.push(VipVerdict {
            name: name.to_owned(),
            vip: v.vip.to_string(),
            change,
            backends,
            moved,
            worst_deviation: worst,
            removed,
        });
    }
    if let Some(pl) = prev {
        let now: BTreeSet<VipId> = next.vips.iter().map(|v| v.vip).collect();
        for v in pl.vips.iter().filter(|v| !now.contains(&v.vip)) {
            out.vips.push(VipVerdict {
                name: "-".into(),
                vip: v.vip.to_string(),
                change: Change::Removed,
                backends: Vec::new(),
                moved: 1.0,
                worst_deviation: 0.0,
                removed: Vec::new(),
            });
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn check_vip(
    p: &Policy,
    cfg: &Config,
    label: &str,
    v: &PlannedVip,
    backends: &[BackendShare],
    taking: usize,
    moved: f64,
    existed: bool,
    prev_members: Option<&[&PlannedBackend]>,
    violations: &mut Vec<String>,
) {
    let min = cfg
        .vips
        .iter()
        .find(|c| c.id() == v.vip)
        .map_or(p.min_backends, |c| c.min_backends(p));
    if (taking as u32) < min {
        violations.push(format!(
            "{label}: only {taking} backends would take new flows, the minimum is {min} (policy min_backends)"
        ));
    }
    for b in backends {
        let dev = (b.after - b.expected).abs();
        if b.expected > 0.0 && dev > p.max_share_deviation {
            violations.push(format!(
                "{label}: backend {} would get {:.1}% of new flows, its weight asks for {:.1}% (off by {:.1} points, policy max_share_deviation {:.1})",
                b.address,
                b.after * 100.0,
                b.expected * 100.0,
                dev * 100.0,
                p.max_share_deviation * 100.0
            ));
        }
        if taking > 0 {
            let even = 1.0 / taking as f64;
            if b.after > p.max_share_vs_even * even + 1e-9 {
                violations.push(format!(
                    "{label}: backend {} would get {:.1}% of new flows, {:.1}× an even split over {taking} backends (policy max_share_vs_even {}); a weight typo?",
                    b.address,
                    b.after * 100.0,
                    b.after / even,
                    p.max_share_vs_even
                ));
            }
        }
    }
    if existed && moved > p.max_flows_moved + 1e-9 {
        violations.push(format!(
            "{label}: {:.1}% of the flow space would move to other backends (policy max_flows_moved {:.1}%)",
            moved * 100.0,
            p.max_flows_moved * 100.0
        ));
    }
    if let Some(members) = prev_members {
        let was: BTreeSet<IpAddr> = members
            .iter()
            .filter(|b| b.state == BackendState::Active && b.weight > 0)
            .map(|b| b.address)
            .collect();
        let still: BTreeSet<IpAddr> = backends
            .iter()
            .filter(|b| b.state == BackendState::Active && b.weight > 0)
            .map(|b| b.address)
            .collect();
        let gone: Vec<String> = was.difference(&still).map(ToString::to_string).collect();
        if gone.len() as u32 > p.max_backends_removed {
            violations.push(format!(
                "{label}: {} backends would stop taking new flows at once ({}), policy max_backends_removed is {}",
                gone.len(),
                gone.join(", "),
                p.max_backends_removed
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::{
        config::{HostChecks, check},
        plan::{IdAllocator, plan},
    };

    fn cfg(weights: &[u32], extra_policy: &str) -> Config {
        let mut t = format!(
            "[agent]\ninterface = \"eth0\"\n[policy]\nmin_backends = 1\n{extra_policy}\n[[vip]]\nname = \"web\"\naddress = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 65537\n"
        );
        for (i, w) in weights.iter().enumerate() {
            let _ = writeln!(
                t,
                "[[vip.backend]]\naddress = \"198.18.1.{}\"\nmac = \"02:00:00:00:00:{:02x}\"\nweight = {w}",
                i + 1,
                i + 1
            );
        }
        check(&t, "t.toml", HostChecks::No).unwrap()
    }

    fn planned(c: &Config, prev: Option<&MapPlan>) -> MapPlan {
        let spec = c.dataplane_spec(1, &|_, _| true);
        match prev {
            Some(p) => crate::plan::plan_next(&spec, p).unwrap(),
            None => plan(&spec, &IdAllocator::default()).unwrap(),
        }
    }

    #[test]
    fn even_weights_pass_and_shares_follow_weights() {
        let c = cfg(&[100, 100, 100], "");
        let p = planned(&c, None);
        let v = evaluate(None, &p, &c);
        assert!(v.passed(), "{:?}", v.violations);
        for b in &v.vips[0].backends {
            assert!((b.after - 1.0 / 3.0).abs() < 0.001, "{b:?}");
            assert!((b.expected - 1.0 / 3.0).abs() < 1e-12);
        }
        assert_eq!(v.vips[0].change, Change::Added);
    }

    #[test]
    fn a_weight_typo_is_refused_with_the_backend_named() {
        let c1 = cfg(&[100, 100, 100], "");
        let p1 = planned(&c1, None);
        let c2 = cfg(&[100, 100, 1000], "max_flows_moved = 1.0");
        let p2 = planned(&c2, Some(&p1));
        let v = evaluate(Some(&p1), &p2, &c2);
        assert!(!v.passed());
        let msg = v.violations.join("\n");
        assert!(
            msg.contains("198.18.1.3") && msg.contains("max_share_vs_even"),
            "{msg}"
        );
        let b3 = &v.vips[0].backends[2];
        assert!((b3.after - 1000.0 / 1200.0).abs() < 0.01);
        assert!((b3.before.unwrap() - 1.0 / 3.0).abs() < 0.01);
    }

    #[test]
    fn moved_fraction_and_removals_are_limited() {
        let c1 = cfg(&[100, 100, 100, 100], "max_backends_removed = 1");
        let p1 = planned(&c1, None);
        // Removing one of four moves about a quarter of the flows.
        let c2 = cfg(&[100, 100, 100], "max_backends_removed = 1");
        let p2 = planned(&c2, Some(&p1));
        let v = evaluate(Some(&p1), &p2, &c2);
        assert!(v.passed(), "{:?}", v.violations);
        let m = v.vips[0].moved;
        assert!((0.2..0.33).contains(&m), "moved {m}");
        assert_eq!(v.vips[0].removed.len(), 1, "{:?}", v.vips[0]);
        assert_eq!(v.vips[0].removed[0].0.to_string(), "198.18.1.4");
        // Removing two at once breaks max_backends_removed and (at 0.3)
        // max_flows_moved.
        let c3 = cfg(
            &[100, 100],
            "max_backends_removed = 1\nmax_flows_moved = 0.3",
        );
        let p3 = planned(&c3, Some(&p1));
        let v = evaluate(Some(&p1), &p3, &c3);
        let msg = v.violations.join("\n");
        assert!(msg.contains("max_backends_removed"), "{msg}");
        assert!(msg.contains("max_flows_moved"), "{msg}");
        // The same plan against itself: nothing moves, unchanged.
        let v = evaluate(Some(&p1), &p1, &c1);
        assert!(v.vips[0].moved.abs() < f64::EPSILON);
        assert_eq!(v.vips[0].change, Change::Unchanged);
    }

    #[test]
    fn moved_fraction_across_table_sizes_is_sampled() {
        let c1 = cfg(&[100, 100, 100], "");
        let p1 = planned(&c1, None);
        let mut c2 = c1.clone();
        c2.vips[0].table_size = 10007;
        let p2 = planned(&c2, Some(&p1));
        let v = evaluate(Some(&p1), &p2, &c2);
        // A new table size rehashes: most flows move (Maglev tables of
        // different sizes are unrelated), and the policy says so.
        assert!(v.vips[0].moved > 0.5, "{}", v.vips[0].moved);
        assert!(!v.passed());
    }
}
