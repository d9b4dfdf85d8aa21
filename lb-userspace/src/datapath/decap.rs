//! The IP-in-IP decapsulation program for a backend host (lab and tests).

use aya::{
    maps::PerCpuArray,
    programs::{Xdp, XdpMode},
};
use lb_common::{DECAP_STAT_COUNT, MAP_DECAP_STATS, PROG_DECAP};

use super::{DatapathError, loaded::Loaded, map_err};
/// The IP-in-IP decapsulation program for a backend host.
pub struct Decap {
    loaded: Loaded,
}

impl Decap {
    /// Loads `xdp_decap` (with a minimal connection table: it uses none).
    pub fn load() -> Result<Self, DatapathError> {
        Ok(Self {
            loaded: Loaded::load(PROG_DECAP, 1, None)?,
        })
    }

    /// The loaded `xdp_decap` program.
    pub fn program(&mut self) -> Result<&mut Xdp, DatapathError> {
        self.loaded.program()
    }

    /// Attaches to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        self.loaded.attach(iface, mode)
    }

    /// Detaches from every interface this handle attached to.
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        self.loaded.detach()
    }

    /// Decap counters summed over CPUs, indexed by the `DECAP_*` constants.
    pub fn stats(&self) -> Result<Vec<u64>, DatapathError> {
        let stats: PerCpuArray<_, u64> = self.loaded.map(MAP_DECAP_STATS)?;
        (0..DECAP_STAT_COUNT)
            .map(|i| {
                Ok(stats
                    .get(&i, 0)
                    .map_err(map_err(MAP_DECAP_STATS))?
                    .iter()
                    .sum())
            })
            .collect()
    }
}
