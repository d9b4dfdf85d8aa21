//! Why the agent could not do something, as types a caller can match (a
//! stale plan is not an unapproved one, nor a policy refusal, nor an
//! invalid config), and the stable [`ErrorKind`] each is sent as over the
//! control protocol (`lbctl` maps kinds to exit codes).

use crate::{config, control::ErrorKind, datapath::DatapathError, plan};

/// Why a request was refused (nothing changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The plan was made against a generation that is no longer live.
    StalePlan,
    /// The plan has fewer approvals than the policy needs.
    Unapproved,
    /// The plan document is not one this agent issued, unedited
    /// (malformed digest, edited, unknown, differs from the record).
    PlanRejected,
    /// The review itself is refused (no reviewer, the author approving).
    Review,
    /// Nothing to roll back to (no earlier generation kept, already live).
    Rollback,
}

/// Why the agent could not do something. Every variant leaves the live
/// config and the data path as they were.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("config rejected, nothing changed:\n{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("config cannot be planned, nothing changed: {0}")]
    Plan(#[from] plan::PlanError),
    #[error("data path: {0}")]
    Datapath(#[from] DatapathError),
    /// A file, socket or host resource failed; `context` says which and
    /// what the agent was doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("refused by policy, nothing changed:\n  {}\n(fix the change, or override with --force --reason \"...\"; overrides are recorded)", .0.join("\n  "))]
    Policy(Vec<String>),
    /// Refused for `reason`; `message` says what and what to do.
    #[error("{message}")]
    Refused { reason: Refusal, message: String },
    #[error("the data path is detached (`lbctl datapath detach`); restart lbd to attach again")]
    Detached,
}

impl AgentError {
    /// A refusal.
    pub fn refused(reason: Refusal, message: impl Into<String>) -> Self {
        Self::Refused {
            reason,
            message: message.into(),
        }
    }

    /// An I/O failure while doing `context`. `source` may be any error
    /// (it is kept as the I/O error's inner error).
    pub fn io(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Io {
            context: context.into(),
            source: std::io::Error::other(source),
        }
    }

    /// The stable kind the control protocol carries.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config(_) | Self::Plan(_) => ErrorKind::InvalidConfig,
            Self::Datapath(_) => ErrorKind::Datapath,
            Self::Io { .. } => ErrorKind::Io,
            Self::Policy(_) => ErrorKind::PolicyRefused,
            Self::Refused { reason, .. } => match reason {
                Refusal::StalePlan => ErrorKind::StalePlan,
                Refusal::Unapproved => ErrorKind::Unapproved,
                Refusal::PlanRejected => ErrorKind::PlanRejected,
                Refusal::Review | Refusal::Rollback => ErrorKind::Refused,
            },
            Self::Detached => ErrorKind::Detached,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_the_kind_a_client_acts_on() {
        let refused = |r| AgentError::refused(r, "x").kind();
        assert_eq!(refused(Refusal::StalePlan), ErrorKind::StalePlan);
        assert_eq!(refused(Refusal::Unapproved), ErrorKind::Unapproved);
        assert_eq!(refused(Refusal::PlanRejected), ErrorKind::PlanRejected);
        assert_eq!(refused(Refusal::Review), ErrorKind::Refused);
        assert_eq!(refused(Refusal::Rollback), ErrorKind::Refused);
        assert_eq!(
            AgentError::Policy(vec!["x".into()]).kind(),
            ErrorKind::PolicyRefused
        );
        assert_eq!(
            AgentError::Config(config::ConfigErrors(Vec::new())).kind(),
            ErrorKind::InvalidConfig
        );
        assert_eq!(AgentError::Detached.kind(), ErrorKind::Detached);
        let io = AgentError::io("recording the plan", "disk full");
        assert_eq!(io.kind(), ErrorKind::Io);
        assert_eq!(io.to_string(), "recording the plan: disk full");
    }
}
