//! The counters, summed over CPUs.

use std::collections::BTreeMap;

use aya::maps::PerCpuArray;
use lb_common::{Counters, MAP_BACKEND_STATS, MAP_COUNTERS, STAT_COUNT, TrafficCounters};

use super::{Datapath, DatapathError, map_err};
/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneStats {
    /// Indexed by the `STAT_*` constants.
    pub global: Vec<u64>,
    /// By VIP id.
    pub vips: BTreeMap<u32, TrafficCounters>,
    /// By backend id.
    pub backends: BTreeMap<u32, TrafficCounters>,
}

pub(super) fn sum(values: impl IntoIterator<Item = TrafficCounters>) -> TrafficCounters {
    values
        .into_iter()
        .fold(TrafficCounters::default(), |a, v| TrafficCounters {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
            new_flows: a.new_flows + v.new_flows,
        })
}

impl Datapath {
    /// Reads the counters (per-VIP and per-backend only for the ids of the
    /// applied plan).
    pub fn stats(&self) -> Result<DataplaneStats, DatapathError> {
        let counters: PerCpuArray<_, Counters> = self.map(MAP_COUNTERS)?;
        let per_cpu = counters.get(&0, 0).map_err(map_err(MAP_COUNTERS))?;
        let mut out = DataplaneStats {
            global: vec![0; STAT_COUNT as usize],
            ..Default::default()
        };
        for (i, slot) in out.global.iter_mut().enumerate() {
            *slot = per_cpu.iter().map(|c| c.global[i]).sum();
        }
        if let Some(plan) = &self.applied {
            for v in &plan.vips {
                let id = v.meta.vip_id;
                let on_cpus = per_cpu
                    .iter()
                    .filter_map(|c| c.vips.get(id as usize).copied());
                out.vips.insert(id, sum(on_cpus));
            }
            let backends: PerCpuArray<_, TrafficCounters> = self.map(MAP_BACKEND_STATS)?;
            for b in &plan.backends {
                let v = backends.get(&b.id, 0).map_err(map_err(MAP_BACKEND_STATS))?;
                out.backends.insert(b.id, sum(v.iter().copied()));
            }
        }
        Ok(out)
    }
}
