//! What a change is made of: its gate (policy, health, rollback), its
//! config text and its origin (for the history), and the prepared (planned
//! and judged, not yet written) form.

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use super::{AgentError, ServeSets, history};
use crate::{
    config,
    model::{DataplaneSpec, VipId},
    plan::{IdAllocator, MapPlan},
    policy,
};

/// Whether a change must pass the policy.
#[derive(Clone, Debug)]
pub enum Gate {
    /// Operator changes: refused when the policy fails, unless forced
    /// with a reason (recorded).
    Policy { force: Option<String> },
    /// Health transitions: the safety valve governs them, not the policy.
    Health,
    /// Restoring a generation that was live before (rollback, undo): not
    /// gated, but recorded.
    Rollback,
}

/// The config text of a change: given, or made from the live text after
/// the maps are written (a CLI edit re-serialises the whole file, which
/// need not delay the data path).
pub enum Source {
    Text(String),
    Edit {
        base: String,
        vip: String,
        backend: IpAddr,
        edit: config::BackendEdit,
    },
}

impl From<String> for Source {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl Source {
    pub(super) fn resolve(self, file: &str) -> Result<String, AgentError> {
        match self {
            Self::Text(t) => Ok(t),
            Self::Edit {
                base,
                vip,
                backend,
                edit,
            } => config::edit_backend(&base, &vip, backend, edit)
                .map_err(|e| AgentError::Config(e.with_file(file))),
        }
    }
}

/// Where a change comes from, for the history.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    /// start, reload, backend, apply, rollback, health, undo.
    pub kind: &'static str,
    pub actor: String,
    pub reason: String,
    pub plan_digest: Option<String>,
    pub approvals: Vec<history::Approval>,
    pub restored: Option<u64>,
    /// When the request arrived (for the end-to-end figures).
    pub started: Option<Instant>,
    /// Refusals other than the policy's that the operator overrode
    /// (stale plan, missing approvals), for the record.
    pub overridden: Vec<String>,
}

impl Origin {
    pub fn new(kind: &'static str, actor: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            kind,
            actor: actor.into(),
            reason: reason.into(),
            ..Self::default()
        }
    }

    /// The same origin, timed from `at`.
    #[must_use]
    pub fn at(mut self, at: Instant) -> Self {
        self.started = Some(at);
        self
    }

    pub(super) fn describe(&self) -> String {
        if self.reason.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{} ({})", self.kind, self.reason)
        }
    }
}

/// A planned change, not yet written.
pub struct Prepared {
    pub(super) serve: ServeSets,
    pub(super) alerts: BTreeMap<VipId, String>,
    pub(super) spec: DataplaneSpec,
    pub(super) before: IdAllocator,
    pub planned: MapPlan,
    pub verdict: policy::Verdict,
}
