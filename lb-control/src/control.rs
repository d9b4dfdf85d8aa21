//! The control API between `lbctl` and `lbd`: one JSON request per line on
//! a Unix socket, one JSON response line back. The types here are the
//! whole protocol; both sides use them, so they cannot drift apart.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::AdminState,
    model::{BackendState, ForwardingMode, HashMode},
};

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// VIPs, backends, health, generations, attach mode.
    Status,
    /// Counters and rates.
    Stats,
    /// Re-read the config file; an invalid file changes nothing.
    Reload {
        /// Apply even if the policy says no; the reason is recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        force: Option<String>,
    },
    /// Change one backend; written back to the config file.
    Backend {
        vip: String,
        backend: IpAddr,
        op: BackendOp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        force: Option<String>,
    },
    /// Detach the XDP program: forwarding stops until `lbd` starts again.
    DatapathDetach,
    /// Compare a candidate config with the live one (nothing changes).
    Plan {
        /// The candidate config text.
        source: String,
        /// Its file name (for error messages).
        file: String,
        author: String,
    },
    /// Record a review of a plan.
    Approve {
        plan: PlanDoc,
        reviewer: String,
        #[serde(default)]
        comment: String,
    },
    /// Apply exactly the reviewed plan.
    Apply {
        plan: PlanDoc,
        actor: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        force: Option<String>,
    },
    /// Restore an earlier generation's config (default: the one before the
    /// live one); itself a recorded change.
    Rollback {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
        actor: String,
        #[serde(default)]
        reason: String,
    },
    /// The change history.
    History,
}

/// A reviewed change: the candidate config text, what it was planned
/// against, and what it will do. `digest` covers everything an approval
/// vouches for; the agent keeps the digests it issued, so an edited plan
/// file is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanDoc {
    pub version: u32,
    pub digest: String,
    pub author: String,
    pub created_unix: u64,
    pub file: String,
    /// Live generation and config digest the plan was made against.
    pub base_generation: u64,
    pub base_config_digest: String,
    /// The candidate config text that `apply` will make live.
    pub source: String,
    pub verdict: crate::policy::Verdict,
    /// Human lines of what changes.
    pub diff: Vec<String>,
    /// Approvals needed (the live policy's `min_approvals`).
    pub min_approvals: u32,
}

impl PlanDoc {
    /// The digest of the fields an approval vouches for.
    pub fn compute_digest(&self) -> String {
        let text = format!(
            "v{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.version,
            self.author,
            self.created_unix,
            self.file,
            self.base_generation,
            self.base_config_digest,
            self.source
        );
        format!("{:016x}", crate::digest::text_digest(&text))
    }
}

/// One review of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub reviewer: String,
    #[serde(default)]
    pub comment: String,
    pub at_unix: u64,
}

/// Result of `approve`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApproveReport {
    pub digest: String,
    pub approvals: Vec<Approval>,
    pub needed: u32,
}

/// What `lbctl backend ...` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum BackendOp {
    /// Keep established flows, send no new ones.
    Drain,
    /// Back to active after a drain.
    Undrain,
    /// Send nothing.
    Disable,
    /// Back to active after a disable.
    Enable,
    /// New weight (0 takes no new flows).
    SetWeight { weight: u32 },
}

impl std::fmt::Display for BackendOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Drain => f.write_str("drain"),
            Self::Undrain => f.write_str("undrain"),
            Self::Disable => f.write_str("disable"),
            Self::Enable => f.write_str("enable"),
            Self::SetWeight { weight } => write!(f, "set-weight {weight}"),
        }
    }
}

impl BackendOp {
    /// The admin state or weight this op sets in the config file.
    pub const fn edit(self) -> crate::config::BackendEdit {
        use crate::config::BackendEdit;
        match self {
            Self::Drain => BackendEdit::State(AdminState::Drain),
            Self::Disable => BackendEdit::State(AdminState::Disabled),
            Self::Undrain | Self::Enable => BackendEdit::State(AdminState::Active),
            Self::SetWeight { weight } => BackendEdit::Weight(weight),
        }
    }
}

/// What kind of failure an error answer reports: stable names a client can
/// act on (`lbctl` maps them to its exit codes). A kind this client does
/// not know reads as `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The config (file, candidate or edit) is invalid or cannot be planned.
    InvalidConfig,
    /// The request itself is malformed.
    InvalidRequest,
    /// The change policy refused the change.
    PolicyRefused,
    /// The plan was made against a generation that is no longer live.
    StalePlan,
    /// The plan lacks approvals.
    Unapproved,
    /// The plan document is not one the agent issued, unedited.
    PlanRejected,
    /// Another refusal (review, rollback).
    Refused,
    /// The data path is detached.
    Detached,
    /// Writing or reading the data path failed.
    Datapath,
    /// A file, socket or host resource failed.
    Io,
    #[serde(other)]
    Other,
}

/// The agent's answer: `ok` with a payload, or an error for the operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The error's kind (agents before this field sent none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    /// A success carrying `data`.
    pub fn ok<T: Serialize>(data: &T) -> Self {
        match serde_json::to_value(data) {
            Ok(data) => Self {
                ok: true,
                error: None,
                kind: None,
                data,
            },
            Err(e) => Self::err(format!("encoding the answer failed: {e}")),
        }
    }

    /// A failure with a message.
    pub fn err(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            kind: None,
            data: serde_json::Value::Null,
        }
    }

    /// A failure of a known kind.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind: Some(kind),
            ..Self::err(message)
        }
    }
}

/// Result of a change (reload, backend op).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeReport {
    /// Config generation now live.
    pub generation: u64,
    /// Whether anything changed in the data path.
    pub changed: bool,
    /// Request → maps written (live on every CPU), in milliseconds.
    pub live_ms: f64,
    /// Request → state, history and config file written, in milliseconds.
    pub apply_ms: f64,
    pub summary: String,
    /// Policy violations overridden with --force (empty normally).
    #[serde(default)]
    pub overridden: Vec<String>,
}

/// `lbctl status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub config_path: String,
    /// Generation of the config the agent applied last.
    pub generation: u64,
    /// Generation the data path's own config map carries.
    pub live_generation: u64,
    pub interface: String,
    pub attach_mode: String,
    /// Whether this agent adopted pinned maps of an earlier one.
    pub adopted: bool,
    /// Differences between the kernel's maps and the applied plan (empty:
    /// the data path does exactly what the config says).
    pub verify_diffs: Vec<String>,
    pub uptime_secs: u64,
    pub vips: Vec<VipStatus>,
    /// Recent events (changes, health transitions, alerts), newest last.
    pub events: Vec<String>,
    /// The guard watching the last change, if any.
    #[serde(default)]
    pub guard: Option<String>,
    /// The last config change recorded in the history (not guard verdicts).
    #[serde(default)]
    pub last_change: Option<LastChange>,
    /// Rollbacks the guard made since the agent started.
    #[serde(default)]
    pub guard_rollbacks: u64,
}

/// The last recorded config change: what alerts name as the likely cause.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastChange {
    pub generation: u64,
    /// start, reload, backend, apply, rollback, health, ...
    pub kind: String,
    /// Who asked, as recorded in the history.
    pub actor: String,
    pub at_unix: u64,
}

/// One VIP in `lbctl status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub vip: String,
    pub mode: ForwardingMode,
    pub hash: HashMode,
    pub table_size: u32,
    /// Digest of the table by backend address: equal on every node of a
    /// fleet with the same config and seed.
    pub fleet_digest: String,
    /// Set while the health safety valve holds the last healthy set.
    pub valve_alert: Option<String>,
    /// The fewest serving backends the VIP's policy allows.
    #[serde(default)]
    pub min_backends: u32,
    pub backends: Vec<BackendStatus>,
}

/// One backend in `lbctl status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub weight: u32,
    pub admin: AdminState,
    /// "up", "down", or "unchecked" (no health check).
    pub health: String,
    /// What the data path does with it.
    pub state: BackendState,
    /// Share of the VIP's lookup table (of new flows).
    pub table_share: f64,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    pub last_error: Option<String>,
}

/// `lbctl stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Seconds the rates are averaged over.
    pub rate_window_secs: f64,
    /// Global counters by name (outcomes and reasons).
    pub counters: Vec<(String, u64)>,
    pub vips: Vec<VipStats>,
}

/// Traffic of one VIP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStats {
    pub name: String,
    pub vip: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub pps: f64,
    pub bps: f64,
    pub backends: Vec<BackendStats>,
}

/// Traffic of one backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStats {
    pub address: IpAddr,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub pps: f64,
    pub bps: f64,
    /// Share of the VIP's new flows since the agent started.
    pub new_flow_share: f64,
}

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach lbd at {path}: {source} (is lbd running? is --socket right? are you root?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to lbd failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("lbd sent an answer this lbctl does not understand: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request and waits (up to `timeout`) for the answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let reqs = [
            Request::Status,
            Request::Reload { force: None },
            Request::Backend {
                vip: "web".into(),
                backend: "198.18.1.1".parse().unwrap(),
                op: BackendOp::SetWeight { weight: 7 },
                force: Some("incident 42".into()),
            },
            Request::DatapathDetach,
        ];
        for r in reqs {
            let s = serde_json::to_string(&r).unwrap();
            assert!(!s.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        }
        let s = r#"{"cmd":"backend","vip":"web","backend":"2001:db8::1","op":{"op":"drain"}}"#;
        assert!(matches!(
            serde_json::from_str::<Request>(s).unwrap(),
            Request::Backend {
                op: BackendOp::Drain,
                ..
            }
        ));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
    }

    #[test]
    fn error_kinds_have_stable_names_and_unknown_ones_read_as_other() {
        let r = Response::error(ErrorKind::StalePlan, "plan 1 is stale");
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":false,"error":"plan 1 is stale","kind":"stale-plan"}"#
        );
        let older: Response = serde_json::from_str(r#"{"ok":false,"error":"x"}"#).unwrap();
        assert_eq!(older.kind, None);
        let newer: Response =
            serde_json::from_str(r#"{"ok":false,"error":"x","kind":"brand-new"}"#).unwrap();
        assert_eq!(newer.kind, Some(ErrorKind::Other));
        assert_eq!(
            serde_json::to_string(&Response::ok(&1)).unwrap(),
            r#"{"ok":true,"data":1}"#
        );
    }
}
