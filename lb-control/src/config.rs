//! The agent's config file (TOML): schema, parsing with file:line errors,
//! semantic validation with hints, conversion to the data-path model, and
//! in-place edits that keep the operator's comments (CLI write-back).
//!
//! * [`parse`] turns text into a [`Config`]; syntax and type errors carry
//!   `file:line:column`.
//! * [`validate`] checks what the types cannot (duplicates, ranges, Maglev
//!   table sizes, MAC addresses for `dsr`, health-check timing, policy
//!   ranges, interfaces of this host) and reports **every** problem, each
//!   naming the VIP (name and id) and backend it concerns, with a hint.
//! * [`check`] is both; [`load`] reads a file and checks it.
//! * [`Config::dataplane_spec`] is the model the planner programs the data
//!   path from.
//! * [`edit_backend`] changes one backend's `state` or `weight` in the
//!   operator's text without touching anything else.
//!
//! Durations are strings with a unit (`"500ms"`, `"2s"`, `"1m"`, `"1h"`,
//! see [`parse_duration`]); IP-in-IP source prefixes are written
//! `"198.18.250.0/24"` / `"2001:db8:ff::/96"`. [`EXAMPLE`] is a complete,
//! commented config.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS};
use serde::{Deserialize, Serialize};
use toml_edit::{ImDocument, InlineTable, Item, Table, TableLike, Value};

use crate::maglev::{is_prime, next_prime};
use crate::model::{
    BackendSpec, BackendState, DataplaneSpec, ForwardingMode, HashMode, Ipv4Prefix, Ipv6Prefix,
    MacAddr, Protocol, VipId, VipSpec, family_name,
};

// ---------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------

/// The whole file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[agent]`: this node's settings.
    pub agent: AgentSettings,
    /// `[policy]`: limits on what a change may do.
    #[serde(default)]
    pub policy: Policy,
    /// `[[vip]]` tables, in file order.
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Native driver mode (the NIC driver runs the program).
    #[default]
    Driver,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

/// `[agent]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Interface the XDP program is attached to.
    pub interface: String,
    /// How the program is attached (`"driver"` or `"generic"`).
    #[serde(default)]
    pub xdp_mode: XdpAttachMode,
    /// Unix socket of the control API (mode 0600, root-only).
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Prometheus metrics, HTTP; loopback by default.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: SocketAddr,
    /// Seed of the flow hash: the same on every node of a fleet.
    #[serde(default)]
    pub hash_seed: u32,
    /// bpffs directory for pinned maps and links (hitless restart).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Directory for the agent's state (applied generation, ids, history).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Connection table capacity (flows, rounded up to a power of two
    /// number of 8-flow buckets, at most 2^27); only used when the maps are
    /// created, not when adopting pinned ones.
    #[serde(default = "default_conn_table_capacity")]
    pub conn_table_capacity: u32,
    /// Other interfaces IP-in-IP packets may leave by (XDP_REDIRECT).
    #[serde(default)]
    pub egress_interfaces: Vec<String>,
    /// Outer source prefix for IPv4 IP-in-IP, e.g. "198.18.250.0/24".
    #[serde(default, with = "opt_prefix4", skip_serializing_if = "Option::is_none")]
    pub ipip_source_v4: Option<Ipv4Prefix>,
    /// Outer source prefix for IPv6 IP-in-IP (length ≥ 96).
    #[serde(default, with = "opt_prefix6", skip_serializing_if = "Option::is_none")]
    pub ipip_source_v6: Option<Ipv6Prefix>,
    /// MTU of the path to the IP-in-IP backends: an encapsulated packet
    /// longer than this is answered with an ICMP "too big" error.
    #[serde(default = "default_ipip_mtu")]
    pub ipip_mtu: u32,
}

const fn default_ipip_mtu() -> u32 {
    lb_common::DEFAULT_IPIP_MTU
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/lbd/lbd.sock")
}
fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9645))
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lbd")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lbd")
}
const fn default_conn_table_capacity() -> u32 {
    lb_common::CONN_TABLE_CAPACITY
}

/// `[policy]`: what a change may do (checked by validate, plan and the
/// guard). Defaults are safe for production.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Minimum backends eligible for new flows (active, weight > 0) per VIP.
    pub min_backends: u32,
    /// Largest allowed |predicted − expected| share of any backend (0..1).
    pub max_share_deviation: f64,
    /// Largest share of one backend relative to an even split (3.0 = no
    /// backend may get more than 3 × 1/N of a VIP's new flows).
    pub max_share_vs_even: f64,
    /// Largest fraction of the flow space one change may move (0..1].
    pub max_flows_moved: f64,
    /// Most backends one change may remove (or disable) per VIP.
    pub max_backends_removed: u32,
    /// Approvals needed before `lbctl apply` (0 only for labs).
    pub min_approvals: u32,
    /// Safety valve: if more than this share of a VIP's backends fail their
    /// health checks at once, keep the last healthy set and alert (0..1].
    pub max_unhealthy_share: f64,
    /// How long the guard watches a change after it is applied.
    #[serde(with = "duration_str")]
    pub guard_window: Duration,
    /// Guard tolerance: largest observed |share − expected| before rollback.
    pub guard_max_share_deviation: f64,
    /// Guard: fewest new flows per VIP before shares are judged.
    pub guard_min_flows: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_backends: 2,
            max_share_deviation: 0.02,
            max_share_vs_even: 2.0,
            max_flows_moved: 0.5,
            max_backends_removed: 1,
            min_approvals: 1,
            max_unhealthy_share: 0.5,
            guard_window: Duration::from_secs(30),
            guard_max_share_deviation: 0.10,
            guard_min_flows: 200,
        }
    }
}

/// `[[vip]]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// Name for humans and the CLI (`lbctl backend drain web ...`).
    pub name: String,
    /// The virtual address clients connect to.
    pub address: IpAddr,
    /// The service port (not 0).
    pub port: u16,
    /// `"tcp"` or `"udp"`.
    pub protocol: Protocol,
    /// `"dsr"` (default) or `"ipip"`.
    #[serde(default)]
    pub mode: ForwardingMode,
    /// `"five-tuple"` (default) or `"source-address"`.
    #[serde(default)]
    pub hash: HashMode,
    /// Maglev lookup-table size: prime, ≤ 65537, ≥ 100 × backends.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// Overrides `policy.min_backends` for this VIP.
    #[serde(default)]
    pub min_backends: Option<u32>,
    /// How the VIP's backends are probed (none: always healthy).
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// `[[vip.backend]]` tables, in file order.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

const fn default_table_size() -> u32 {
    lb_common::DEFAULT_RING_SIZE
}

/// Operator-set state of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes new and established flows (if healthy).
    #[default]
    Active,
    /// Keeps established flows, takes no new ones.
    Drain,
    /// Takes nothing.
    Disabled,
}

impl AdminState {
    /// The spelling in the config file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Drain => "drain",
            Self::Disabled => "disabled",
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[vip.backend]]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The backend's address (its identity in the VIP).
    pub address: IpAddr,
    /// 0..=MAX_WEIGHT; 0 takes no new flows.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Needed for `dsr`.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Operator-set state (`"active"`, `"drain"`, `"disabled"`).
    #[serde(default)]
    pub state: AdminState,
    /// Overrides the VIP's health check for this backend.
    #[serde(default)]
    pub health: Option<HealthCheck>,
}

const fn default_weight() -> u32 {
    100
}

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// Shortest health-check interval.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

/// `health = { kind = "...", ... }`: how a backend is probed.
///
/// Deserialized through a flat table with `kind` and the fields of every
/// kind; fields that do not belong to the given kind are rejected with a
/// message naming the kind they belong to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawHealthCheck", into = "RawHealthCheck")]
pub struct HealthCheck {
    /// What is sent and what counts as an answer.
    pub probe: Probe,
    /// Port probed; the VIP's port when absent.
    pub port: Option<u16>,
    /// Time between probes (default 1s, at least 10ms).
    pub interval: Duration,
    /// How long a probe may take (default 500ms, less than `interval`).
    pub timeout: Duration,
    /// Consecutive successes before a down backend is up again.
    pub rise: u32,
    /// Consecutive failures before an up backend is down.
    pub fall: u32,
}

/// The probe itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Probe {
    /// A TCP connect that completes.
    Tcp,
    /// An HTTP/1.1 GET answered with `expect_status`.
    Http {
        /// Request path; starts with `/`.
        #[serde(default = "default_http_path")]
        path: String,
        /// The status code that counts as healthy.
        #[serde(default = "default_http_status")]
        expect_status: u16,
    },
    /// A UDP datagram `send` answered by one that contains `expect`
    /// (any answer when `expect` is empty).
    Udp {
        /// The request datagram (non-empty).
        send: String,
        /// A substring the answer must contain (any answer when empty).
        #[serde(default)]
        expect: String,
    },
}

fn default_http_path() -> String {
    "/".into()
}
const fn default_http_status() -> u16 {
    200
}
const fn default_interval() -> Duration {
    Duration::from_secs(1)
}
const fn default_timeout() -> Duration {
    Duration::from_millis(500)
}
const fn default_rise() -> u32 {
    2
}
const fn default_fall() -> u32 {
    3
}

/// The probe kinds, as written in `kind = "..."`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProbeKind {
    Tcp,
    Http,
    Udp,
}

impl ProbeKind {
    const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Udp => "udp",
        }
    }
}

/// A duration as written in the file (`"500ms"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
struct DurationStr(#[serde(with = "duration_str")] Duration);

/// `health` as written: `kind` plus the optional fields of every kind.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    kind: ProbeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<DurationStr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<DurationStr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fall: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    send: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect: Option<String>,
}

impl TryFrom<RawHealthCheck> for HealthCheck {
    type Error = String;

    fn try_from(raw: RawHealthCheck) -> Result<Self, String> {
        let kind = raw.kind;
        let misplaced = |present: bool, field: &str, owner: ProbeKind| {
            if present {
                Err(format!(
                    "health check field `{field}` does not apply to kind = \"{}\" \
                     (it belongs to kind = \"{}\")",
                    kind.name(),
                    owner.name()
                ))
            } else {
                Ok(())
            }
        };
        let http_fields = |raw: &RawHealthCheck| {
            misplaced(raw.path.is_some(), "path", ProbeKind::Http)?;
            misplaced(
                raw.expect_status.is_some(),
                "expect_status",
                ProbeKind::Http,
            )
        };
        let udp_fields = |raw: &RawHealthCheck| {
            misplaced(raw.send.is_some(), "send", ProbeKind::Udp)?;
            misplaced(raw.expect.is_some(), "expect", ProbeKind::Udp)
        };
        let probe = match kind {
            ProbeKind::Tcp => {
                http_fields(&raw)?;
                udp_fields(&raw)?;
                Probe::Tcp
            }
            ProbeKind::Http => {
                udp_fields(&raw)?;
                Probe::Http {
                    path: raw.path.unwrap_or_else(default_http_path),
                    expect_status: raw.expect_status.unwrap_or_else(default_http_status),
                }
            }
            ProbeKind::Udp => {
                http_fields(&raw)?;
                Probe::Udp {
                    send: raw.send.ok_or_else(|| {
                        "a kind = \"udp\" health check needs `send` (the request datagram)"
                            .to_string()
                    })?,
                    expect: raw.expect.unwrap_or_default(),
                }
            }
        };
        Ok(Self {
            probe,
            port: raw.port,
            interval: raw.interval.map_or_else(default_interval, |d| d.0),
            timeout: raw.timeout.map_or_else(default_timeout, |d| d.0),
            rise: raw.rise.unwrap_or_else(default_rise),
            fall: raw.fall.unwrap_or_else(default_fall),
        })
    }
}

impl From<HealthCheck> for RawHealthCheck {
    fn from(h: HealthCheck) -> Self {
        let mut raw = Self {
            kind: ProbeKind::Tcp,
            port: h.port,
            interval: Some(DurationStr(h.interval)),
            timeout: Some(DurationStr(h.timeout)),
            rise: Some(h.rise),
            fall: Some(h.fall),
            path: None,
            expect_status: None,
            send: None,
            expect: None,
        };
        match h.probe {
            Probe::Tcp => {}
            Probe::Http {
                path,
                expect_status,
            } => {
                raw.kind = ProbeKind::Http;
                raw.path = Some(path);
                raw.expect_status = Some(expect_status);
            }
            Probe::Udp { send, expect } => {
                raw.kind = ProbeKind::Udp;
                raw.send = Some(send);
                raw.expect = (!expect.is_empty()).then_some(expect);
            }
        }
        raw
    }
}

// ---------------------------------------------------------------------------
// Issues
// ---------------------------------------------------------------------------

/// One problem found in a config: where (file:line:col when known), what,
/// which VIP/backend (part of `message`), and a hint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file name as given to [`parse`] / [`validate`] (may be empty).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
    /// What is wrong, starting with the VIP and backend it concerns.
    pub message: String,
    /// What the operator can do about it.
    pub hint: Option<String>,
}

impl ConfigIssue {
    /// An issue without a position or hint.
    pub fn new(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            line: None,
            column: None,
            message: message.into(),
            hint: None,
        }
    }

    /// The same issue with a hint.
    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// `file:line:col: message (hint: ...)`; parts that are unknown are left
/// out (`file: message`, or `line 3, column 5: message` without a file).
impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.file.is_empty(), self.line, self.column) {
            (false, Some(l), Some(c)) => write!(f, "{}:{l}:{c}: ", self.file)?,
            (false, Some(l), None) => write!(f, "{}:{l}: ", self.file)?,
            (false, None, _) => write!(f, "{}: ", self.file)?,
            (true, Some(l), Some(c)) => write!(f, "line {l}, column {c}: ")?,
            (true, Some(l), None) => write!(f, "line {l}: ")?,
            (true, None, _) => {}
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Every problem found in a config (never empty when returned as an error).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

fn display_lines(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigErrors {
    /// Fills in `file` on issues that have none (e.g. from [`edit_backend`],
    /// which does not know the file name).
    #[must_use]
    pub fn with_file(mut self, file: &str) -> Self {
        for issue in &mut self.0 {
            if issue.file.is_empty() {
                issue.file = file.to_string();
            }
        }
        self
    }

    /// The issues.
    pub fn issues(&self) -> &[ConfigIssue] {
        &self.0
    }
}

impl From<ConfigIssue> for ConfigErrors {
    fn from(issue: ConfigIssue) -> Self {
        Self(vec![issue])
    }
}

/// Whether validation may look at this host (interface names).
/// `lbctl validate --offline` skips them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostChecks {
    /// Check that the interfaces exist on this machine.
    Yes,
    /// Skip checks that depend on the machine (validating elsewhere).
    No,
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// Parses TOML (syntax and type errors carry file:line:col, from the toml
/// error span), no semantic checks.
pub fn parse(source: &str, file_name: &str) -> Result<Config, ConfigErrors> {
    toml::from_str::<Config>(source).map_err(|e| {
        let (line, column) = e.span().map_or((None, None), |s| {
            let (l, c) = line_col(source, s.start);
            (Some(l), Some(c))
        });
        // toml puts "expected ..." on a line of its own: keep one line per issue.
        let mut message = one_line(e.message());
        if let Some(context) = e
            .span()
            .and_then(|s| Locator::new(source).context_at(s.start))
        {
            message = format!("{context}: {message}");
        }
        let hint = if message.contains("unknown field") {
            Some(
                "check the spelling; the commented example config in the README lists every key"
                    .into(),
            )
        } else if message.contains("missing field") {
            Some("add the key; the commented example config in the README shows it".into())
        } else {
            None
        };
        ConfigErrors(vec![ConfigIssue {
            file: file_name.to_string(),
            line,
            column,
            message,
            hint,
        }])
    })
}

/// Joins a multi-line message into one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Semantic checks, collecting ALL issues (not just the first).
///
/// `source` is the text `cfg` was parsed from, used to attach line numbers
/// to issues (by the position of the VIP, backend or key concerned); it may
/// be `""`, then issues have no line. Each issue names the VIP by name and
/// id and the backend by address, and carries a hint.
pub fn validate(
    cfg: &Config,
    source: &str,
    file_name: &str,
    host: HostChecks,
) -> Result<(), ConfigErrors> {
    let mut c = Checker {
        file: file_name,
        locator: Locator::new(source),
        issues: Vec::new(),
    };
    check_agent(cfg, host, &mut c);
    check_ipip_mtu(&cfg.agent, &mut c);
    check_policy(&cfg.policy, &mut c);
    check_vips(cfg, &mut c);
    check_fragment_sharing(cfg, &mut c);
    if c.issues.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(c.issues))
    }
}

/// [`parse`] + [`validate`].
pub fn check(source: &str, file_name: &str, host: HostChecks) -> Result<Config, ConfigErrors> {
    let cfg = parse(source, file_name)?;
    validate(&cfg, source, file_name, host)?;
    Ok(cfg)
}

/// Reads the file and runs [`check`] (I/O errors become a [`ConfigIssue`]
/// naming the file and the OS error). Returns the config and its text.
pub fn load(path: &Path, host: HostChecks) -> Result<(Config, String), ConfigErrors> {
    let file = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| {
        ConfigIssue::new(&file, format!("cannot read the config file: {e}"))
            .with_hint("check the path and its permissions")
    })?;
    let cfg = check(&source, &file, host)?;
    Ok((cfg, source))
}

impl Config {
    /// Finds a VIP by name, or by `"198.18.0.10:80/tcp"` /
    /// `"[2001:db8::10]:80/tcp"` (VipId's Display form).
    pub fn find_vip(&self, selector: &str) -> Option<&VipConfig> {
        self.find_vip_index(selector).map(|i| &self.vips[i])
    }

    /// This config with one backend's state or weight changed (what
    /// [`edit_backend`] does to the text, done on the parsed config: no
    /// re-parse). Errors name the known VIPs or backends.
    pub fn with_backend_edit(
        &self,
        vip: &str,
        backend: IpAddr,
        edit: BackendEdit,
    ) -> Result<Self, ConfigErrors> {
        let fail = |message: String, hint: &str| {
            ConfigErrors(vec![ConfigIssue::new("", message).with_hint(hint)])
        };
        let Some(i) = self.find_vip_index(vip) else {
            let known: Vec<String> = self
                .vips
                .iter()
                .map(|v| format!("{:?} ({})", v.name, v.id()))
                .collect();
            return Err(fail(
                format!("no VIP {vip:?}; known VIPs: {}", known.join(", ")),
                "select a VIP by name or as address:port/protocol, e.g. 198.18.0.10:80/tcp",
            ));
        };
        let mut out = self.clone();
        let v = &mut out.vips[i];
        let label = v.label();
        let Some(b) = v.backends.iter_mut().find(|b| b.address == backend) else {
            let known: Vec<String> = self.vips[i]
                .backends
                .iter()
                .map(|b| b.address.to_string())
                .collect();
            return Err(fail(
                format!(
                    "{label}: no backend {backend}; its backends are {}",
                    known.join(", ")
                ),
                "give the backend's address exactly as in the config",
            ));
        };
        match edit {
            BackendEdit::State(st) => b.state = st,
            BackendEdit::Weight(w) if w > MAX_WEIGHT => {
                return Err(fail(
                    format!(
                        "{label}: backend {backend}: weight {w} is out of range 0..={MAX_WEIGHT}"
                    ),
                    "weights are relative: scale them into 0..=10000",
                ));
            }
            BackendEdit::Weight(w) => b.weight = w,
        }
        Ok(out)
    }

    fn find_vip_index(&self, selector: &str) -> Option<usize> {
        if let Some(i) = self.vips.iter().position(|v| v.name == selector) {
            return Some(i);
        }
        let id = parse_vip_id(selector)?;
        self.vips.iter().position(|v| v.id() == id)
    }

    /// The data-path model.
    ///
    /// `serve(vip, backend)` says whether health (after the safety valve)
    /// lets the backend take traffic. Admin `disabled` → [`BackendState::Down`];
    /// otherwise a backend `serve` refuses → `Down` (an unhealthy drained
    /// backend keeps no flows: they would fail anyway); otherwise admin
    /// `drain` → [`BackendState::Drain`], `active` → [`BackendState::Active`].
    /// `serve` is not called for disabled backends. `generation` goes into
    /// [`DataplaneSpec::generation`]; the hash seed and IP-in-IP prefixes
    /// come from `[agent]`.
    pub fn dataplane_spec(
        &self,
        generation: u64,
        serve: &dyn Fn(&VipConfig, &BackendConfig) -> bool,
    ) -> DataplaneSpec {
        let vips = self
            .vips
            .iter()
            .map(|v| VipSpec {
                address: v.address,
                port: v.port,
                protocol: v.protocol,
                mode: v.mode,
                hash: v.hash,
                table_size: v.table_size,
                backends: v
                    .backends
                    .iter()
                    .map(|b| BackendSpec {
                        address: b.address,
                        weight: b.weight,
                        mac: b.mac,
                        state: match b.state {
                            AdminState::Disabled => BackendState::Down,
                            _ if !serve(v, b) => BackendState::Down,
                            AdminState::Drain => BackendState::Drain,
                            AdminState::Active => BackendState::Active,
                        },
                    })
                    .collect(),
            })
            .collect();
        DataplaneSpec {
            hash_seed: self.agent.hash_seed,
            ipip_source_v4: self.agent.ipip_source_v4,
            ipip_source_v6: self.agent.ipip_source_v6,
            ipip_mtu: self.agent.ipip_mtu,
            generation,
            vips,
        }
    }
}

impl VipConfig {
    /// The VIP's identity (address, port, protocol).
    pub const fn id(&self) -> VipId {
        VipId {
            address: self.address,
            port: self.port,
            protocol: self.protocol,
        }
    }

    /// The fewest eligible backends this VIP may have: its own
    /// `min_backends`, else `policy.min_backends`.
    pub fn min_backends(&self, policy: &Policy) -> u32 {
        self.min_backends.unwrap_or(policy.min_backends)
    }

    /// Backends that may take new flows by config: admin state active and
    /// weight > 0 (health is not considered).
    pub fn eligible_backends(&self) -> impl Iterator<Item = &BackendConfig> {
        self.backends
            .iter()
            .filter(|b| b.state == AdminState::Active && b.weight > 0)
    }

    /// `vip "web" (198.18.0.10:80/tcp)`, the prefix of every issue about it.
    fn label(&self) -> String {
        format!("vip {:?} ({})", self.name, self.id())
    }
}

/// Parses `198.18.0.10:80/tcp` or `[2001:db8::10]:80/udp`.
fn parse_vip_id(s: &str) -> Option<VipId> {
    let (addr, proto) = s.rsplit_once('/')?;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    let sa: SocketAddr = addr.parse().ok()?;
    Some(VipId {
        address: sa.ip(),
        port: sa.port(),
        protocol,
    })
}

// ---------------------------------------------------------------------------
// Locating things in the source text
// ---------------------------------------------------------------------------

/// One step of a path into the document: a key, or an element of an array
/// (of tables).
#[derive(Clone, Copy, Debug)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

use Seg::{Index as I, Key as K};

/// Finds where keys and tables are in the source (toml_edit spans).
struct Locator<'s> {
    text: &'s str,
    doc: Option<ImDocument<&'s str>>,
}

enum Node<'d> {
    Item(&'d Item),
    Table(&'d Table),
    Value(&'d Value),
}

impl<'d> Node<'d> {
    fn table_like(&self) -> Option<&'d dyn TableLike> {
        match *self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(t),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    fn element(&self, n: usize) -> Option<(Option<usize>, Node<'d>)> {
        match *self {
            Node::Item(Item::ArrayOfTables(a)) => a
                .get(n)
                .map(|t| (t.span().map(|s| s.start), Node::Table(t))),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => a
                .get(n)
                .map(|v| (v.span().map(|s| s.start), Node::Value(v))),
            _ => None,
        }
    }
}

impl<'s> Locator<'s> {
    fn new(text: &'s str) -> Self {
        let doc = if text.is_empty() {
            None
        } else {
            ImDocument::parse(text).ok()
        };
        Self { text, doc }
    }

    /// Byte offset of the deepest part of `path` that exists.
    fn offset(&self, path: &[Seg<'_>]) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best = None;
        for seg in path {
            match *seg {
                Seg::Key(k) => {
                    let Some((key, item)) = node.table_like().and_then(|t| t.get_key_value(k))
                    else {
                        break;
                    };
                    if let Some(s) = key.span().or_else(|| item.span()) {
                        best = Some(s.start);
                    }
                    node = Node::Item(item);
                }
                Seg::Index(n) => {
                    let Some((start, next)) = node.element(n) else {
                        break;
                    };
                    best = start.or(best);
                    node = next;
                }
            }
        }
        best
    }

    /// `vip "web" (198.18.0.10:80/tcp): backend 198.18.1.2` for an offset
    /// inside that VIP's (and backend's) tables, as far as the text says
    /// (the VIP's number when it has no name).
    fn context_at(&self, offset: usize) -> Option<String> {
        let doc = self.doc.as_ref()?;
        let inside =
            |n: &Node<'_>| node_extent(n).is_some_and(|r| r.start <= offset && offset <= r.end);
        for table in ["agent", "policy"] {
            if doc
                .as_table()
                .get(table)
                .is_some_and(|t| inside(&Node::Item(t)))
            {
                return Some(table.to_string());
            }
        }
        let vips = Node::Item(doc.as_table().get("vip")?);
        let (i, vip) = (0..)
            .map_while(|i| vips.element(i).map(|(_, n)| (i, n)))
            .find(|(_, n)| inside(n))?;
        let t = vip.table_like()?;
        let text = |t: &dyn TableLike, k: &str| t.get(k).and_then(Item::as_str).map(str::to_string);
        let id = (|| {
            let address: IpAddr = text(t, "address")?.parse().ok()?;
            let port = u16::try_from(t.get("port")?.as_integer()?).ok()?;
            let protocol = match text(t, "protocol")?.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => return None,
            };
            Some(VipId {
                address,
                port,
                protocol,
            })
        })();
        let mut out = match (text(t, "name"), id) {
            (Some(name), Some(id)) => format!("vip {name:?} ({id})"),
            (Some(name), None) => format!("vip {name:?}"),
            (None, Some(id)) => format!("vip {id}"),
            (None, None) => format!("vip #{}", i + 1),
        };
        if let Some(backends) = t.get("backend").map(Node::Item)
            && let Some((j, b)) = (0..)
                .map_while(|j| backends.element(j).map(|(_, n)| (j, n)))
                .find(|(_, n)| inside(n))
        {
            match b.table_like().and_then(|b| text(b, "address")) {
                Some(a) => out = format!("{out}: backend {a}"),
                None => out = format!("{out}: backend #{}", j + 1),
            }
        }
        Some(out)
    }

    fn position(&self, path: &[Seg<'_>]) -> (Option<usize>, Option<usize>) {
        self.offset(path).map_or((None, None), |o| {
            let (l, c) = line_col(self.text, o);
            (Some(l), Some(c))
        })
    }
}

/// The part of the text a node covers: from its header or first key to the
/// end of its last value.
fn node_extent(node: &Node<'_>) -> Option<Range<usize>> {
    match *node {
        Node::Value(v) | Node::Item(Item::Value(v)) => v.span(),
        Node::Table(t) | Node::Item(Item::Table(t)) => table_extent(t),
        Node::Item(Item::ArrayOfTables(a)) => a.iter().filter_map(table_extent).reduce(merge),
        Node::Item(Item::None) => None,
    }
}

fn table_extent(t: &Table) -> Option<Range<usize>> {
    let mut acc = t.span();
    for (k, item) in t {
        for r in [
            t.key(k).and_then(toml_edit::Key::span),
            node_extent(&Node::Item(item)),
        ]
        .into_iter()
        .flatten()
        {
            acc = Some(acc.map_or(r.clone(), |a| merge(a, r)));
        }
    }
    acc
}

fn merge(a: Range<usize>, b: Range<usize>) -> Range<usize> {
    a.start.min(b.start)..a.end.max(b.end)
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

// ---------------------------------------------------------------------------
// Semantic checks
// ---------------------------------------------------------------------------

struct Checker<'a> {
    file: &'a str,
    locator: Locator<'a>,
    issues: Vec<ConfigIssue>,
}

impl Checker<'_> {
    fn push(&mut self, path: &[Seg<'_>], message: String, hint: impl Into<String>) {
        let (line, column) = self.locator.position(path);
        self.issues.push(ConfigIssue {
            file: self.file.to_string(),
            line,
            column,
            message,
            hint: Some(hint.into()),
        });
    }
}

/// Linux `IFNAMSIZ` − 1.
const MAX_IFNAME_LEN: usize = 15;

/// The index of interface `name` in this network namespace, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call;
    // if_nametoindex only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn interface_exists(name: &str) -> bool {
    interface_index(name).is_some()
}

fn check_interface(what: &str, name: &str, path: &[Seg<'_>], host: HostChecks, c: &mut Checker) {
    if name.is_empty() {
        c.push(
            path,
            format!("agent: {what} is empty"),
            "name a network interface, e.g. \"eth0\" (see `ip link`)",
        );
    } else if name.len() > MAX_IFNAME_LEN
        || name.contains(['/', '\0'])
        || name.chars().any(char::is_whitespace)
    {
        c.push(
            path,
            format!("agent: {what} {name:?} is not a valid interface name"),
            "Linux interface names have at most 15 characters and no '/' or spaces; see `ip link`",
        );
    } else if host == HostChecks::Yes && !interface_exists(name) {
        c.push(
            path,
            format!("agent: {what} {name:?} does not exist on this host"),
            "check the name with `ip link`; validate with --offline when checking a config for another machine",
        );
    }
}

fn check_agent(cfg: &Config, host: HostChecks, c: &mut Checker) {
    let a = &cfg.agent;
    check_interface(
        "interface",
        &a.interface,
        &[K("agent"), K("interface")],
        host,
        c,
    );
    for (i, name) in a.egress_interfaces.iter().enumerate() {
        check_interface(
            "egress interface",
            name,
            &[K("agent"), K("egress_interfaces"), I(i)],
            host,
            c,
        );
    }
    // IP-in-IP packets are routed (bpf_fib_lookup), which the kernel only
    // does when forwarding is on for the receiving interface.
    if host == HostChecks::Yes && interface_exists(&a.interface) {
        for (v6, key) in [(false, "net.ipv4.conf"), (true, "net.ipv6.conf")] {
            let needed = cfg
                .vips
                .iter()
                .any(|v| v.mode == crate::model::ForwardingMode::Ipip && v.address.is_ipv6() == v6);
            let path = format!(
                "/proc/sys/{}/{}/forwarding",
                key.replace('.', "/"),
                a.interface
            );
            let on = std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == "1");
            if needed && !on {
                c.push(
                    &[K("agent"), K("interface")],
                    format!(
                        "agent: ipip VIPs of IPv{} need forwarding on {} (the data path routes their packets), and it is off",
                        if v6 { 6 } else { 4 },
                        a.interface
                    ),
                    format!("sysctl -w {key}.{}.forwarding=1 (and persist it)", a.interface),
                );
            }
        }
    }
    if a.conn_table_capacity == 0 || a.conn_table_capacity > lb_common::MAX_CONN_TABLE_CAPACITY {
        c.push(
            &[K("agent"), K("conn_table_capacity")],
            format!(
                "agent: conn_table_capacity must be 1..={} (flows), not {}",
                lb_common::MAX_CONN_TABLE_CAPACITY,
                a.conn_table_capacity
            ),
            format!(
                "remove the key for the default ({})",
                lb_common::CONN_TABLE_CAPACITY
            ),
        );
    }
}

/// `agent.ipip_mtu`: an IPv6 packet of the IPv6 minimum MTU must fit once
/// encapsulated, and the value must fit the IP length field.
fn check_ipip_mtu(a: &AgentSettings, c: &mut Checker) {
    let range = lb_common::MIN_IPIP_MTU..=lb_common::MAX_IPIP_MTU;
    if !range.contains(&a.ipip_mtu) {
        c.push(
            &[K("agent"), K("ipip_mtu")],
            format!(
                "agent: ipip_mtu must be {}..={} (bytes), not {}",
                range.start(),
                range.end(),
                a.ipip_mtu
            ),
            format!(
                "set the MTU of the links to the IP-in-IP backends, or remove the key for the default ({})",
                lb_common::DEFAULT_IPIP_MTU
            ),
        );
    }
}

fn check_policy(p: &Policy, c: &mut Checker) {
    let shares = [
        ("max_share_deviation", p.max_share_deviation),
        ("max_flows_moved", p.max_flows_moved),
        ("max_unhealthy_share", p.max_unhealthy_share),
        ("guard_max_share_deviation", p.guard_max_share_deviation),
    ];
    for (key, v) in shares {
        if !(v > 0.0 && v <= 1.0) {
            c.push(
                &[K("policy"), K(key)],
                format!("policy: {key} = {v} is out of range (0, 1]"),
                "it is a share of the flows or backends: 0.5 means half; remove the key for the safe default",
            );
        }
    }
    if !(p.max_share_vs_even >= 1.0 && p.max_share_vs_even.is_finite()) {
        c.push(
            &[K("policy"), K("max_share_vs_even")],
            format!(
                "policy: max_share_vs_even = {} must be a finite number ≥ 1",
                p.max_share_vs_even
            ),
            "1 means every backend gets at most an even split; the default is 3",
        );
    }
    if p.guard_window.is_zero() {
        c.push(
            &[K("policy"), K("guard_window")],
            "policy: guard_window must be longer than 0s".into(),
            "how long the guard watches a change, e.g. \"30s\" (the default)",
        );
    }
}

/// A prime table size ≥ `min`, as a hint.
fn suggest_table_size(min: u64) -> String {
    match u32::try_from(min).ok().and_then(next_prime) {
        Some(p) if p <= MAX_RING_SIZE => format!("use table_size = {p} (the next prime ≥ {min})"),
        _ => format!(
            "a VIP can have at most {} backends with table_size = {MAX_RING_SIZE}; split the backends across VIPs",
            MAX_RING_SIZE / 100
        ),
    }
}

fn check_vips(cfg: &Config, c: &mut Checker) {
    if cfg.vips.len() > MAX_VIPS as usize {
        c.push(
            &[K("vip"), I(MAX_VIPS as usize)],
            format!(
                "{} VIPs: the data path holds at most {MAX_VIPS}",
                cfg.vips.len()
            ),
            "split the VIPs across nodes",
        );
    }
    let total: usize = cfg.vips.iter().map(|v| v.backends.len()).sum();
    if total > MAX_BACKENDS as usize {
        c.push(
            &[K("vip")],
            format!("{total} backends in all VIPs: the data path holds at most {MAX_BACKENDS}"),
            "split the VIPs across nodes",
        );
    }
    let mut ids: HashMap<VipId, usize> = HashMap::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, v) in cfg.vips.iter().enumerate() {
        let label = v.label();
        if v.name.is_empty() {
            c.push(
                &[K("vip"), I(i), K("name")],
                format!("{label}: name is empty"),
                "give every VIP a short unique name like \"web\"; the CLI selects VIPs by it",
            );
        } else if !v
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-'))
        {
            let suggestion: String = v
                .name
                .chars()
                .map(|ch| {
                    if ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.') {
                        ch
                    } else {
                        '-'
                    }
                })
                .collect();
            c.push(
                &[K("vip"), I(i), K("name")],
                format!("{label}: name may only contain letters, digits, '_', '.' and '-'"),
                format!("rename it, e.g. name = {suggestion:?}"),
            );
        } else if let Some(&first) = names.get(v.name.as_str()) {
            c.push(
                &[K("vip"), I(i), K("name")],
                format!(
                    "{label}: name {:?} is already used by the VIP at {}",
                    v.name,
                    cfg.vips[first].id()
                ),
                "VIP names must be unique; rename one of them",
            );
        } else {
            names.insert(&v.name, i);
        }
        if let Some(&first) = ids.get(&v.id()) {
            c.push(
                &[K("vip"), I(i)],
                format!(
                    "{label}: duplicate VIP: {:?} already has the same address, port and protocol",
                    cfg.vips[first].name
                ),
                "merge the two [[vip]] tables, or change the address, port or protocol of one",
            );
        } else {
            ids.insert(v.id(), i);
        }
        check_vip(cfg, i, v, &label, c);
    }
}

/// VIPs that share an address and protocol share their IP fragments: a
/// fragment after the first carries no ports, so the data path sends every
/// fragment to that address and protocol through one of them (the lowest
/// port, see `plan::fragment_aliases`). That is only right when they have
/// the same forwarding mode and the same backends; otherwise a fragmented
/// datagram for one VIP reaches a server of the other. Refused, naming both.
fn check_fragment_sharing(cfg: &Config, c: &mut Checker) {
    let mut first: HashMap<(IpAddr, Protocol), usize> = HashMap::new();
    for (i, v) in cfg.vips.iter().enumerate() {
        let Some(&j) = first.get(&(v.address, v.protocol)) else {
            first.insert((v.address, v.protocol), i);
            continue;
        };
        let other = &cfg.vips[j];
        let backends = |v: &VipConfig| {
            let mut a: Vec<IpAddr> = v.backends.iter().map(|b| b.address).collect();
            a.sort_unstable();
            a.dedup();
            a
        };
        if v.mode != other.mode || backends(v) != backends(other) {
            c.push(
                &[K("vip"), I(i)],
                format!(
                    "{}: shares its address and protocol with {}, but not its {}: IP fragments after the first carry no port, so every fragment to this address and protocol goes to one backend set, and datagrams of one VIP would reach the other's servers",
                    v.label(),
                    other.label(),
                    if v.mode == other.mode { "backends" } else { "forwarding mode" },
                ),
                "give both VIPs the same mode and backend addresses, or move one to another address",
            );
        }
    }
}

fn check_vip(cfg: &Config, i: usize, v: &VipConfig, label: &str, c: &mut Checker) {
    if v.port == 0 {
        c.push(
            &[K("vip"), I(i), K("port")],
            format!("{label}: port 0 is reserved (the data path uses it to route IP fragments)"),
            "use the service's real port",
        );
    }
    check_table_size(i, v, label, c);
    let family_prefix = match v.address {
        IpAddr::V4(_) => cfg
            .agent
            .ipip_source_v4
            .is_none()
            .then_some(("ipip_source_v4", "198.18.250.0/24")),
        IpAddr::V6(_) => cfg
            .agent
            .ipip_source_v6
            .is_none()
            .then_some(("ipip_source_v6", "2001:db8:ff::/96")),
    };
    if let (ForwardingMode::Ipip, Some((key, example))) = (v.mode, family_prefix) {
        c.push(
            &[K("vip"), I(i), K("mode")],
            format!("{label}: mode = \"ipip\" needs agent.{key} (outer source addresses), which is not set"),
            format!("add {key} = \"{example}\" to [agent], with a prefix the backends route back to this node"),
        );
    }
    if let Some(h) = &v.health {
        check_health(label, &[K("vip"), I(i), K("health")], h, c);
    }
    check_backends(i, v, label, c);
    let min = v.min_backends(&cfg.policy);
    let source = if v.min_backends.is_some() {
        "min_backends of this VIP"
    } else {
        "policy.min_backends"
    };
    if v.backends.is_empty() {
        c.push(
            &[K("vip"), I(i)],
            format!("{label}: has no backends"),
            format!(
                "add [[vip.backend]] tables, at least {} of them active with weight > 0",
                min.max(1)
            ),
        );
    } else if v.backends.iter().all(|b| b.weight == 0) {
        c.push(
            &[K("vip"), I(i)],
            format!("{label}: every backend has weight 0, so the VIP cannot take new flows"),
            format!(
                "give at least {} backend(s) a weight between 1 and {MAX_WEIGHT}",
                min.max(1)
            ),
        );
    } else {
        let eligible = v.eligible_backends().count();
        if (eligible as u64) < u64::from(min) {
            c.push(
                &[K("vip"), I(i)],
                format!(
                    "{label}: only {eligible} eligible backend(s) (state active, weight > 0); {source} requires {min}"
                ),
                format!(
                    "add or re-activate backends, or lower {source} if this VIP may run on fewer"
                ),
            );
        }
    }
}

fn check_table_size(i: usize, v: &VipConfig, label: &str, c: &mut Checker) {
    let size = v.table_size;
    let needed = 100 * v.backends.len() as u64;
    let path = [K("vip"), I(i), K("table_size")];
    if size > MAX_RING_SIZE {
        c.push(
            &path,
            format!("{label}: table_size {size} is larger than the maximum {MAX_RING_SIZE}"),
            format!("use table_size = {MAX_RING_SIZE} (the default) or a smaller prime"),
        );
    } else if !is_prime(size) {
        c.push(
            &path,
            format!("{label}: table_size {size} is not prime (Maglev needs a prime size)"),
            suggest_table_size(needed.max(u64::from(size))),
        );
    }
    if u64::from(size) < needed {
        c.push(
            &path,
            format!(
                "{label}: table_size {size} is too small for {} backends (needs at least 100 × {} = {needed})",
                v.backends.len(),
                v.backends.len()
            ),
            suggest_table_size(needed),
        );
    }
}

fn check_backends(i: usize, v: &VipConfig, label: &str, c: &mut Checker) {
    let mut seen: HashMap<IpAddr, usize> = HashMap::new();
    for (j, b) in v.backends.iter().enumerate() {
        let bl = format!("{label}: backend {}", b.address);
        let at = |key: &'static str| [K("vip"), I(i), K("backend"), I(j), K(key)];
        if seen.insert(b.address, j).is_some() {
            c.push(
                &[K("vip"), I(i), K("backend"), I(j)],
                format!("{bl}: listed twice in this VIP"),
                "remove one of the two [[vip.backend]] tables (a backend is identified by its address)",
            );
        }
        if b.weight > MAX_WEIGHT {
            c.push(
                &at("weight"),
                format!("{bl}: weight {} is out of range 0..={MAX_WEIGHT}", b.weight),
                "weights are relative: scale them into 0..=10000 (e.g. 100 for a standard server)",
            );
        }
        if v.mode == ForwardingMode::Ipip && b.address.is_ipv4() != v.address.is_ipv4() {
            c.push(
                &at("address"),
                format!(
                    "{bl}: backend is {}, the VIP is {}; ipip needs the same address family",
                    family_name(b.address),
                    family_name(v.address)
                ),
                format!(
                    "use an {} address for this backend, or move it to an {} VIP",
                    family_name(v.address),
                    family_name(b.address)
                ),
            );
        }
        if v.mode == ForwardingMode::Dsr && b.mac.is_none() && b.state != AdminState::Disabled {
            c.push(
                &[K("vip"), I(i), K("backend"), I(j)],
                format!("{bl}: no `mac`, which dsr needs (the data path rewrites the destination MAC to it)"),
                "add mac = \"aa:bb:cc:dd:ee:ff\" (the backend's MAC on this L2 segment; `ip neigh` shows it), or set state = \"disabled\"",
            );
        }
        if let Some(h) = &b.health {
            check_health(
                &bl,
                &[K("vip"), I(i), K("backend"), I(j), K("health")],
                h,
                c,
            );
        }
    }
}

fn check_health(prefix: &str, path: &[Seg<'_>], h: &HealthCheck, c: &mut Checker) {
    let at = |key: &'static str| {
        let mut p = path.to_vec();
        p.push(K(key));
        p
    };
    if h.interval < MIN_HEALTH_INTERVAL {
        c.push(
            &at("interval"),
            format!(
                "{prefix}: health interval {} is below the minimum {}",
                format_duration(h.interval),
                format_duration(MIN_HEALTH_INTERVAL)
            ),
            "probe at most every 10ms, e.g. interval = \"1s\"",
        );
    }
    if h.timeout.is_zero() {
        c.push(
            &at("timeout"),
            format!("{prefix}: health timeout must be longer than 0ms"),
            "give probes time to answer, e.g. timeout = \"500ms\"",
        );
    } else if h.timeout >= h.interval {
        c.push(
            &at("timeout"),
            format!(
                "{prefix}: health timeout {} must be shorter than the interval {}",
                format_duration(h.timeout),
                format_duration(h.interval)
            ),
            "lower timeout or raise interval: a probe must end before the next one starts",
        );
    }
    for (key, v) in [("rise", h.rise), ("fall", h.fall)] {
        if v == 0 {
            c.push(
                &at(key),
                format!("{prefix}: health {key} must be at least 1"),
                format!(
                    "{key} counts consecutive probe results; use 1 or more (default {})",
                    if key == "rise" {
                        default_rise()
                    } else {
                        default_fall()
                    }
                ),
            );
        }
    }
    if h.port == Some(0) {
        c.push(
            &at("port"),
            format!("{prefix}: health port 0 is not a port"),
            "remove the key to probe the VIP's port, or give the port the service answers probes on",
        );
    }
    match &h.probe {
        Probe::Tcp => {}
        Probe::Http {
            path: p,
            expect_status,
        } => {
            if !p.starts_with('/') {
                c.push(
                    &at("path"),
                    format!("{prefix}: health path {p:?} must start with '/'"),
                    format!("write path = \"/{}\"", p.trim_start_matches('/')),
                );
            }
            if !(100..=599).contains(expect_status) {
                c.push(
                    &at("expect_status"),
                    format!("{prefix}: health expect_status {expect_status} is not an HTTP status (100..=599)"),
                    "use the status a healthy backend answers with, usually 200",
                );
            }
        }
        Probe::Udp { send, .. } => {
            if send.is_empty() {
                c.push(
                    &at("send"),
                    format!("{prefix}: udp health check has an empty `send`"),
                    "set send to a request datagram the service answers (and expect to a substring of the answer)",
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Editing the operator's file
// ---------------------------------------------------------------------------

/// A change from the CLI, written back into the operator's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendEdit {
    /// Set the backend's admin state.
    State(AdminState),
    /// Set the backend's weight (0..=MAX_WEIGHT).
    Weight(u32),
}

/// Applies `edit` to backend `backend` of the VIP selected by `vip` (name or
/// id form, as [`Config::find_vip`]) in `source`, with toml_edit so comments
/// and layout are kept; returns the new text.
///
/// Setting state `Active` removes the `state` key (active is the default)
/// rather than writing `"active"`; a comment on the lines just above that
/// key goes with it. Other values replace the old value in place (keeping a
/// trailing comment) or add the key at the end of the backend's table.
///
/// Errors: the text does not parse, unknown VIP, unknown backend (the
/// messages list the known VIPs / backend addresses), weight out of range.
/// Issues have an empty `file`; see [`ConfigErrors::with_file`].
pub fn edit_backend(
    source: &str,
    vip: &str,
    backend: IpAddr,
    edit: BackendEdit,
) -> Result<String, ConfigErrors> {
    let cfg = parse(source, "")?;
    let locator = Locator::new(source);
    let issue = |path: &[Seg<'_>], message: String, hint: String| {
        let (line, column) = locator.position(path);
        ConfigErrors(vec![ConfigIssue {
            file: String::new(),
            line,
            column,
            message,
            hint: Some(hint),
        }])
    };
    let Some(i) = cfg.find_vip_index(vip) else {
        let known: Vec<String> = cfg
            .vips
            .iter()
            .map(|v| format!("{:?} ({})", v.name, v.id()))
            .collect();
        return Err(issue(
            &[],
            format!(
                "no VIP {vip:?}; known VIPs: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
            "select a VIP by name or as address:port/protocol, e.g. 198.18.0.10:80/tcp".into(),
        ));
    };
    let v = &cfg.vips[i];
    let Some(j) = v.backends.iter().position(|b| b.address == backend) else {
        let known: Vec<String> = v.backends.iter().map(|b| b.address.to_string()).collect();
        return Err(issue(
            &[K("vip"), I(i)],
            format!(
                "{}: no backend {backend}; its backends are {}",
                v.label(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
            "give the backend's address exactly as in the config".into(),
        ));
    };
    if let BackendEdit::Weight(w) = edit
        && w > MAX_WEIGHT
    {
        return Err(issue(
            &[K("vip"), I(i), K("backend"), I(j)],
            format!(
                "{}: backend {backend}: weight {w} is out of range 0..={MAX_WEIGHT}",
                v.label()
            ),
            "weights are relative: scale them into 0..=10000".into(),
        ));
    }
    let mut doc: toml_edit::DocumentMut = source.parse().map_err(|e: toml_edit::TomlError| {
        ConfigErrors::from(ConfigIssue::new("", one_line(e.message())))
    })?;
    let mut table = doc
        .get_mut("vip")
        .and_then(|item| nth_table_mut(item, i))
        .and_then(|t| t.into_item("backend"))
        .and_then(|item| nth_table_mut(item, j))
        .ok_or_else(|| {
            issue(
                &[K("vip"), I(i)],
                format!(
                    "{}: backend {backend}: cannot find its table in the text",
                    v.label()
                ),
                "write VIPs as [[vip]] and backends as [[vip.backend]] tables".into(),
            )
        })?;
    match edit {
        BackendEdit::State(AdminState::Active) => table.remove("state"),
        BackendEdit::State(s) => table.set("state", Value::from(s.as_str())),
        BackendEdit::Weight(w) => table.set("weight", Value::from(i64::from(w))),
    }
    Ok(doc.to_string())
}

/// A backend's table in the document: a `[[vip.backend]]` table or an
/// inline `{ ... }` table.
enum TableMut<'a> {
    Table(&'a mut Table),
    Inline(&'a mut InlineTable),
}

impl<'a> TableMut<'a> {
    fn into_item(self, key: &str) -> Option<&'a mut Item> {
        match self {
            TableMut::Table(t) => t.get_mut(key),
            TableMut::Inline(t) => TableLike::get_mut(t, key),
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Item> {
        match self {
            TableMut::Table(t) => t.get_mut(key),
            TableMut::Inline(t) => TableLike::get_mut(&mut **t, key),
        }
    }

    /// Sets `key` to `value`, keeping the old value's decoration (the
    /// spaces and a trailing comment) when the key exists; otherwise adds
    /// the key at the end of the table.
    fn set(&mut self, key: &str, mut value: Value) {
        if let Some(item) = self.get_mut(key) {
            if let Some(old) = item.as_value() {
                *value.decor_mut() = old.decor().clone();
            }
            *item = Item::Value(value);
            return;
        }
        match self {
            TableMut::Table(t) => {
                t.insert(key, Item::Value(value));
            }
            TableMut::Inline(t) => {
                // `{ a = 1 }`: the space before `}` is the last value's
                // suffix; it moves to the new last value.
                if let Some((_, last)) = t.iter_mut().last() {
                    let suffix = take_suffix(last);
                    value.decor_mut().set_prefix(" ");
                    value.decor_mut().set_suffix(suffix);
                }
                t.insert(key, value);
            }
        }
    }

    /// Removes `key`, keeping the space before an inline table's `}`.
    fn remove(&mut self, key: &str) {
        match self {
            TableMut::Table(t) => {
                t.remove(key);
            }
            TableMut::Inline(t) => {
                let was_last = t.iter().last().is_some_and(|(k, _)| k == key);
                if let Some(mut removed) = t.remove(key)
                    && was_last
                    && let Some((_, last)) = t.iter_mut().last()
                {
                    let suffix = take_suffix(&mut removed);
                    last.decor_mut().set_suffix(suffix);
                }
            }
        }
    }
}

/// A value's suffix decoration (what follows it), leaving it empty.
fn take_suffix(v: &mut Value) -> String {
    let suffix = v
        .decor()
        .suffix()
        .and_then(|r| r.as_str())
        .unwrap_or("")
        .to_string();
    v.decor_mut().set_suffix("");
    suffix
}

/// The `n`th table of an array of tables or of an array of inline tables.
fn nth_table_mut(item: &mut Item, n: usize) -> Option<TableMut<'_>> {
    match item {
        Item::ArrayOfTables(a) => a.get_mut(n).map(TableMut::Table),
        Item::Value(Value::Array(a)) => a.get_mut(n)?.as_inline_table_mut().map(TableMut::Inline),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Durations and prefixes
// ---------------------------------------------------------------------------

/// Parses a duration written as a whole number and a unit: `ms`, `s`, `m`
/// or `h` (`"500ms"`, `"2s"`, `"1m"`). Anything else is an error whose
/// message says what is expected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || {
        format!(
            "invalid duration {s:?}: expected a whole number and a unit (ms, s, m or h), like \"500ms\", \"2s\" or \"1m\""
        )
    };
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        return Err(expected());
    }
    let n: u64 = number.parse().map_err(|_| expected())?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(expected()),
    };
    n.checked_mul(ms_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {s:?}: too large"))
}

/// Writes a duration the way [`parse_duration`] reads it, in the largest
/// unit that represents it exactly (`"1m"`, `"90s"`, `"500ms"`); sub-
/// millisecond parts are rounded up to the next millisecond.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        ms += 1;
    }
    for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms != 0 && ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

mod duration_str {
    use std::{fmt, time::Duration};

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"500ms\", \"2s\" or \"1m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                super::parse_duration(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

fn split_prefix<'a>(s: &'a str, family: &str) -> Result<(&'a str, u8), String> {
    let (addr, len) = s.split_once('/').ok_or_else(|| {
        format!(
            "invalid {family} prefix {s:?}: expected address/length, like {}",
            prefix_example(family)
        )
    })?;
    let len = len.parse::<u8>().map_err(|_| {
        format!("invalid {family} prefix {s:?}: the length {len:?} is not a number")
    })?;
    Ok((addr, len))
}

fn prefix_example(family: &str) -> &'static str {
    if family == "IPv4" {
        "\"198.18.250.0/24\""
    } else {
        "\"2001:db8:ff::/96\""
    }
}

fn parse_prefix4(s: &str) -> Result<Ipv4Prefix, String> {
    let (addr, len) = split_prefix(s, "IPv4")?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("invalid IPv4 prefix {s:?}: {addr:?} is not an IPv4 address"))?;
    if len > 32 {
        return Err(format!(
            "invalid IPv4 prefix {s:?}: the length must be at most 32"
        ));
    }
    Ok(Ipv4Prefix { addr, len })
}

fn parse_prefix6(s: &str) -> Result<Ipv6Prefix, String> {
    let (addr, len) = split_prefix(s, "IPv6")?;
    let addr: Ipv6Addr = addr
        .parse()
        .map_err(|_| format!("invalid IPv6 prefix {s:?}: {addr:?} is not an IPv6 address"))?;
    if !(96..=128).contains(&len) {
        return Err(format!(
            "invalid IPv6 prefix {s:?}: the length must be between 96 and 128 (only the last 32 bits vary)"
        ));
    }
    Ok(Ipv6Prefix { addr, len })
}

mod opt_prefix4 {
    use serde::Deserialize;

    use crate::model::Ipv4Prefix;

    #[allow(clippy::ref_option, clippy::trivially_copy_pass_by_ref)] // serde's `with` passes `&Option<T>`
    pub fn serialize<S: serde::Serializer>(
        p: &Option<Ipv4Prefix>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.collect_str(&format_args!("{}/{}", p.addr, p.len)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Ipv4Prefix>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::parse_prefix4(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod opt_prefix6 {
    use serde::Deserialize;

    use crate::model::Ipv6Prefix;

    #[allow(clippy::ref_option, clippy::trivially_copy_pass_by_ref)] // serde's `with` passes `&Option<T>`
    pub fn serialize<S: serde::Serializer>(
        p: &Option<Ipv6Prefix>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.collect_str(&format_args!("{}/{}", p.addr, p.len)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Ipv6Prefix>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::parse_prefix6(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

// ---------------------------------------------------------------------------
// Example
// ---------------------------------------------------------------------------

/// A complete commented example config (the README embeds the same text);
/// passes `check(.., HostChecks::No)`.
pub const EXAMPLE: &str = r#"# xlb agent (lbd) configuration. Check every change with `lbctl validate`
# before applying it. Keys marked "default" may be left out.

[agent]
# Required: the interface the XDP program attaches to.
interface = "eth0"
# "driver" (native XDP, default) or "generic" (any NIC, slower).
xdp_mode = "driver"
# Control API socket (mode 0600, root only) and Prometheus metrics (defaults).
control_socket = "/run/lbd/lbd.sock"
metrics_address = "127.0.0.1:9645"
# Seed of the flow hash: the same on every node of a fleet, so that all
# nodes build the same lookup tables (default 0).
hash_seed = 20240501
# Pinned maps and links (bpffs), and the agent's state (defaults).
pin_dir = "/sys/fs/bpf/lbd"
state_dir = "/var/lib/lbd"
# Connection-table capacity in flows (default 262144, 8 bytes per flow;
# rounded up to a power of two number of 8-flow buckets, at most 2^27).
# Only used when the maps are created: adopted pinned maps keep their size.
conn_table_capacity = 262144
# Other interfaces IP-in-IP packets may leave by (default none).
egress_interfaces = []
# Outer source addresses of IP-in-IP packets: the prefix's host bits come
# from the flow hash. Every ipip VIP needs the prefix of its family; the
# backends must route these addresses back to this node.
ipip_source_v4 = "198.18.250.0/24"
ipip_source_v6 = "2001:db8:ff::/96"
# MTU of the path from this node to the IP-in-IP backends (default 1500;
# 1320..=65535). A packet that no longer fits once encapsulated (IPv4 over
# 1480 bytes, IPv6 over 1460 at 1500) is answered with ICMP "fragmentation
# needed" / ICMPv6 "packet too big" from the VIP, so clients send smaller
# packets. Raise it only if every link to the backends carries larger frames.
ipip_mtu = 1500

# What a change may do; the defaults are safe for production.
[policy]
# Fewest backends (state active, weight > 0) a VIP may have.
min_backends = 2
# Largest |predicted − expected| share of any backend after a change.
max_share_deviation = 0.02
# No backend may get more than this many times an even split of new flows.
max_share_vs_even = 2.0
# Largest share of the flow space one change may move to other backends.
max_flows_moved = 0.5
# Most backends one change may remove or disable per VIP.
max_backends_removed = 1
# Approvals needed before `lbctl apply` (0 only for labs).
min_approvals = 1
# Safety valve: when more than this share of a VIP's backends fail their
# health checks at once, keep the last healthy set and alert.
max_unhealthy_share = 0.5
# After applying, the guard watches the traffic shares this long and rolls
# back when a share is off by more than guard_max_share_deviation (judged
# once a VIP has seen guard_min_flows new flows).
guard_window = "30s"
guard_max_share_deviation = 0.1
guard_min_flows = 200

# A web service with L2 direct server return: the backends carry the VIP on
# a loopback interface and answer clients directly; the load balancer only
# rewrites the destination MAC, so every backend needs `mac`.
[[vip]]
name = "web"                   # letters, digits, '_', '.', '-'; unique
address = "198.18.0.10"
port = 80
protocol = "tcp"               # "tcp" or "udp"
mode = "dsr"                   # "dsr" (default) or "ipip"
hash = "five-tuple"            # "five-tuple" (default) or "source-address"
# Maglev lookup-table size: a prime, at most 65537 (the default) and at least
# 100 × the number of backends.
table_size = 65537

# How backends are probed; without it every backend counts as healthy.
# kind = "tcp" (connect), "http" (GET path, expect_status) or "udp" (send a
# datagram, expect an answer containing `expect`). Durations: "500ms", "2s", "1m".
[vip.health]
kind = "http"
path = "/healthz"
expect_status = 200
interval = "2s"
timeout = "500ms"
rise = 2                       # successes before a down backend is up again
fall = 3                       # failures before an up backend is down

[[vip.backend]]
address = "198.18.1.1"
mac = "02:00:00:00:01:01"
weight = 100                   # 0..=10000, relative; 0 takes no new flows

[[vip.backend]]
address = "198.18.1.2"
mac = "02:00:00:00:01:02"
weight = 100

[[vip.backend]]
address = "198.18.1.3"
mac = "02:00:00:00:01:03"
weight = 50
# "active" (default), "drain" (keeps its flows, takes no new ones) or
# "disabled" (takes nothing). `lbctl backend drain web 198.18.1.3` edits this.
state = "drain"

# DNS over IP-in-IP: backends may sit in other subnets; they decapsulate
# (xdp_decap or an ipip tunnel device) and answer clients directly.
[[vip]]
name = "dns"
address = "198.18.0.53"
port = 53
protocol = "udp"
mode = "ipip"
hash = "source-address"        # every flow of a client to one backend
table_size = 1009
min_backends = 2               # overrides policy.min_backends for this VIP
health = { kind = "udp", send = "ping", expect = "pong", interval = "1s", timeout = "300ms" }

[[vip.backend]]
address = "198.18.2.1"
weight = 100

[[vip.backend]]
address = "198.18.2.2"
weight = 100
# A backend may override the VIP's health check.
health = { kind = "tcp", port = 5353 }

# An IPv6 service over IP-in-IP.
[[vip]]
name = "api6"
address = "2001:db8::10"
port = 443
protocol = "tcp"
mode = "ipip"
table_size = 1009
health = { kind = "tcp" }

[[vip.backend]]
address = "2001:db8:1::1"

[[vip.backend]]
address = "2001:db8:1::2"
"#;

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const MINIMAL: &str = r#"
[agent]
interface = "eth0"

[[vip]]
name = "web"
address = "198.18.0.10"
port = 80
protocol = "tcp"
table_size = 1009

[[vip.backend]]
address = "198.18.1.1"
mac = "02:00:00:00:00:01"

[[vip.backend]]
address = "198.18.1.2"
mac = "02:00:00:00:00:02"
weight = 50 # half
"#;

    fn messages(e: &ConfigErrors) -> Vec<String> {
        e.0.iter().map(ToString::to_string).collect()
    }

    fn expect_issue(source: &str, needle: &str) -> ConfigIssue {
        let e = check(source, "t.toml", HostChecks::No).expect_err("config should be rejected");
        e.0.iter()
            .find(|i| i.to_string().contains(needle))
            .cloned()
            .unwrap_or_else(|| panic!("no issue containing {needle:?} in {:#?}", messages(&e)))
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_mins(1)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_hours(1)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "5",
            "ms",
            "1.5s",
            "2 s",
            " 2s",
            "2S",
            "2sec",
            "-1s",
            "1d",
            "99999999999999999999s",
        ] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
        assert!(
            parse_duration("18446744073709551615h")
                .unwrap_err()
                .contains("too large")
        );
        for (d, s) in [
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(2), "2s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_mins(2), "2m"),
            (Duration::from_hours(2), "2h"),
            (Duration::ZERO, "0ms"),
            (Duration::from_micros(1500), "2ms"),
        ] {
            assert_eq!(format_duration(d), s);
            if d.subsec_micros() % 1000 == 0 {
                assert_eq!(parse_duration(s), Ok(d));
            }
        }
    }

    #[test]
    fn duration_type_error_names_the_format() {
        let src = MINIMAL.replace("[agent]", "[policy]\nguard_window = 30\n\n[agent]");
        let e = parse(&src, "t.toml").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("a duration string like"), "{s}");
        assert!(s.starts_with("t.toml:3:"), "{s}");
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            parse_prefix4("198.18.250.0/24"),
            Ok(Ipv4Prefix {
                addr: "198.18.250.0".parse().unwrap(),
                len: 24
            })
        );
        assert!(
            parse_prefix4("198.18.250.0/33")
                .unwrap_err()
                .contains("at most 32")
        );
        assert!(
            parse_prefix4("198.18.250.0")
                .unwrap_err()
                .contains("address/length")
        );
        assert!(
            parse_prefix4("2001:db8::/120")
                .unwrap_err()
                .contains("not an IPv4")
        );
        assert_eq!(parse_prefix6("2001:db8:ff::/96").unwrap().len, 96);
        assert_eq!(parse_prefix6("2001:db8:ff::1/128").unwrap().len, 128);
        assert!(
            parse_prefix6("2001:db8:ff::/64")
                .unwrap_err()
                .contains("between 96 and 128")
        );
        assert!(
            parse_prefix6("2001:db8:ff::/129")
                .unwrap_err()
                .contains("between 96 and 128")
        );
        assert!(
            parse_prefix6("2001:db8:ff::/x")
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn minimal_parses_with_defaults() {
        let cfg = check(MINIMAL, "t.toml", HostChecks::No).unwrap();
        assert_eq!(cfg.policy, Policy::default());
        assert_eq!(cfg.agent.xdp_mode, XdpAttachMode::Driver);
        assert_eq!(
            cfg.agent.conn_table_capacity,
            lb_common::CONN_TABLE_CAPACITY
        );
        let v = &cfg.vips[0];
        assert_eq!(v.mode, ForwardingMode::Dsr);
        assert_eq!(v.hash, HashMode::FiveTuple);
        assert_eq!(v.backends[0].weight, 100);
        assert_eq!(v.backends[1].weight, 50);
        assert_eq!(v.backends[0].state, AdminState::Active);
        assert_eq!(v.min_backends(&cfg.policy), 2);
        assert_eq!(v.eligible_backends().count(), 2);
    }

    #[test]
    fn example_passes_and_round_trips() {
        let cfg = check(EXAMPLE, "example.toml", HostChecks::No).unwrap();
        assert_eq!(cfg.vips.len(), 3);
        let web = cfg.find_vip("web").unwrap();
        assert_eq!(web.backends[2].state, AdminState::Drain);
        let h = web.health.as_ref().unwrap();
        assert_eq!(
            h.probe,
            Probe::Http {
                path: "/healthz".into(),
                expect_status: 200
            }
        );
        assert_eq!(h.interval, Duration::from_secs(2));
        let dns = cfg.find_vip("198.18.0.53:53/udp").unwrap();
        assert_eq!(dns.name, "dns");
        assert_eq!(dns.backends[1].health.as_ref().unwrap().port, Some(5353));
        assert_eq!(cfg.find_vip("[2001:db8::10]:443/tcp").unwrap().name, "api6");
        assert!(cfg.find_vip("198.18.0.53:53/tcp").is_none());
        assert!(cfg.find_vip("nope").is_none());
        // Serializing and parsing again gives the same config.
        let text = toml::to_string(&cfg).unwrap();
        let again = check(&text, "again.toml", HostChecks::No).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn health_fields_are_checked_against_kind() {
        let with_health = |h: &str| {
            MINIMAL.replace(
                "table_size = 1009",
                &format!("table_size = 1009\nhealth = {h}"),
            )
        };
        let cfg = parse(&with_health(r#"{ kind = "tcp" }"#), "t").unwrap();
        let h = cfg.vips[0].health.clone().unwrap();
        assert_eq!(h.probe, Probe::Tcp);
        assert_eq!(
            (h.interval, h.timeout, h.rise, h.fall),
            (default_interval(), default_timeout(), 2, 3)
        );
        let cfg = parse(&with_health(r#"{ kind = "http" }"#), "t").unwrap();
        assert_eq!(
            cfg.vips[0].health.as_ref().unwrap().probe,
            Probe::Http {
                path: "/".into(),
                expect_status: 200
            }
        );
        let e = parse(&with_health(r#"{ kind = "tcp", path = "/x" }"#), "t").unwrap_err();
        assert!(
            e.to_string()
                .contains("`path` does not apply to kind = \"tcp\""),
            "{e}"
        );
        let e = parse(&with_health(r#"{ kind = "http", send = "x" }"#), "t").unwrap_err();
        assert!(
            e.to_string()
                .contains("`send` does not apply to kind = \"http\""),
            "{e}"
        );
        let e = parse(&with_health(r#"{ kind = "udp" }"#), "t").unwrap_err();
        assert!(e.to_string().contains("needs `send`"), "{e}");
        let e = parse(&with_health(r#"{ kind = "tcp", colour = "red" }"#), "t").unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        let e = parse(&with_health(r#"{ kind = "icmp" }"#), "t").unwrap_err();
        assert!(e.to_string().contains("unknown variant `icmp`"), "{e}");
        // The error points at the health table's line.
        assert_eq!(e.0[0].line, Some(11), "{e}");
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let src = MINIMAL.replace("port = 80", "port = = 80");
        let e = parse(&src, "lb.toml").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].line, Some(8), "{e}");
        assert!(e.0[0].column.is_some());
        assert!(e.to_string().starts_with("lb.toml:8:"), "{e}");
    }

    #[test]
    fn semantic_issues_carry_location_vip_and_hint() {
        let src = MINIMAL.replace("weight = 50", "weight = 20000");
        let issue = expect_issue(&src, "weight 20000 is out of range 0..=10000");
        assert_eq!(issue.line, Some(19));
        assert_eq!(issue.column, Some(1));
        assert!(issue.hint.is_some());
        assert_eq!(
            issue.to_string().split(" (hint").next().unwrap(),
            "t.toml:19:1: vip \"web\" (198.18.0.10:80/tcp): backend 198.18.1.2: weight 20000 is out of range 0..=10000"
        );
        // Without the source there is no line.
        let cfg = parse(&src, "t.toml").unwrap();
        let e = validate(&cfg, "", "t.toml", HostChecks::No).unwrap_err();
        assert_eq!(e.0[0].line, None);
        assert!(e.to_string().starts_with("t.toml: vip \"web\""), "{e}");
    }

    #[test]
    fn all_issues_are_collected() {
        let src = MINIMAL
            .replace("port = 80", "port = 0")
            .replace("table_size = 1009", "table_size = 1000")
            .replace("weight = 50 # half", "weight = 20000")
            .replace("mac = \"02:00:00:00:00:01\"\n", "");
        let e = check(&src, "t.toml", HostChecks::No).unwrap_err();
        let all = e.to_string();
        for needle in ["port 0", "not prime", "weight 20000", "no `mac`"] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
        assert_eq!(e.0.len(), 4, "{all}");
        assert_eq!(all.lines().count(), 4);
    }

    #[test]
    fn table_size_hints_name_the_next_prime() {
        let src = MINIMAL.replace("table_size = 1009", "table_size = 101");
        let i = expect_issue(&src, "too small for 2 backends");
        assert!(i.hint.unwrap().contains("table_size = 211"));
        let src = MINIMAL.replace("table_size = 1009", "table_size = 1000");
        let i = expect_issue(&src, "not prime");
        assert!(i.hint.unwrap().contains("table_size = 1009"));
        let src = MINIMAL.replace("table_size = 1009", "table_size = 70001");
        expect_issue(&src, "larger than the maximum 65537");
    }

    #[test]
    fn too_many_vips_and_backends() {
        let base = parse(MINIMAL, "t").unwrap();
        let mut cfg = base.clone();
        let template = cfg.vips[0].clone();
        cfg.vips = (0..=MAX_VIPS)
            .map(|n| {
                let mut v = template.clone();
                v.name = format!("v{n}");
                v.port = 1000 + n as u16;
                v
            })
            .collect();
        let e = validate(&cfg, "", "t", HostChecks::No).unwrap_err();
        assert!(
            e.to_string()
                .contains("257 VIPs: the data path holds at most 256"),
            "{e}"
        );

        let mut cfg = base;
        let per_vip = 200;
        let vips = MAX_BACKENDS as usize / per_vip + 1;
        cfg.vips = (0..vips)
            .map(|n| {
                let mut v = template.clone();
                v.name = format!("v{n}");
                v.port = 1000 + n as u16;
                v.table_size = 65537;
                v.backends = (0..per_vip)
                    .map(|k| {
                        let mut b = template.backends[0].clone();
                        b.address = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + k as u32));
                        b
                    })
                    .collect();
                v
            })
            .collect();
        let e = validate(&cfg, "", "t", HostChecks::No).unwrap_err();
        assert!(
            e.to_string().contains("the data path holds at most 16384"),
            "{e}"
        );
        assert_eq!(e.0.len(), 1, "{e}");
    }

    #[test]
    fn interfaces_are_checked_only_with_host_checks() {
        let src = MINIMAL.replace(
            "\"eth0\"",
            "\"lo\"\negress_interfaces = [\"lo\", \"xlb-nope-9\"]",
        );
        let cfg = parse(&src, "t").unwrap();
        assert!(validate(&cfg, &src, "t", HostChecks::No).is_ok());
        let e = validate(&cfg, &src, "t", HostChecks::Yes).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(
            e.to_string()
                .contains("egress interface \"xlb-nope-9\" does not exist"),
            "{e}"
        );
        assert_eq!(e.0[0].line, Some(4));
        let src = MINIMAL.replace("\"eth0\"", "\"a-very-long-interface-name\"");
        expect_issue(&src, "is not a valid interface name");
    }

    #[test]
    fn dataplane_spec_maps_states() {
        let src = MINIMAL.replace(
            "weight = 50 # half",
            "weight = 50\n\n[[vip.backend]]\naddress = \"198.18.1.3\"\nstate = \"drain\"\nmac = \"02:00:00:00:00:03\"\n\n[[vip.backend]]\naddress = \"198.18.1.4\"\nstate = \"disabled\"\n\n[[vip.backend]]\naddress = \"198.18.1.5\"\nmac = \"02:00:00:00:00:05\"\n\n[[vip.backend]]\naddress = \"198.18.1.6\"\nmac = \"02:00:00:00:00:06\"\nstate = \"drain\"",
        ).replace("[agent]\n", "[agent]\nhash_seed = 77\nipip_source_v4 = \"198.18.250.0/24\"\n");
        let cfg = check(&src, "t", HostChecks::No).unwrap();
        // .5 and .6 are unhealthy; disabled .4 must not even be asked.
        let serve = |_: &VipConfig, b: &BackendConfig| {
            assert_ne!(
                b.address,
                ip("198.18.1.4"),
                "serve called for a disabled backend"
            );
            !matches!(b.address.to_string().as_str(), "198.18.1.5" | "198.18.1.6")
        };
        let spec = cfg.dataplane_spec(42, &serve);
        assert_eq!(spec.generation, 42);
        assert_eq!(spec.hash_seed, 77);
        assert_eq!(spec.ipip_source_v4.unwrap().len, 24);
        assert_eq!(spec.ipip_source_v6, None);
        let v = &spec.vips[0];
        assert_eq!(v.table_size, 1009);
        assert_eq!(v.port, 80);
        let states: Vec<(String, BackendState, u32)> = v
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.state, b.weight))
            .collect();
        assert_eq!(
            states,
            [
                ("198.18.1.1".into(), BackendState::Active, 100),
                ("198.18.1.2".into(), BackendState::Active, 50),
                ("198.18.1.3".into(), BackendState::Drain, 100),
                ("198.18.1.4".into(), BackendState::Down, 100),
                ("198.18.1.5".into(), BackendState::Down, 100),
                ("198.18.1.6".into(), BackendState::Down, 100),
            ]
        );
        assert_eq!(v.backends[0].mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        // The planner accepts what a valid config produces.
        crate::plan::plan(&spec, &crate::plan::IdAllocator::default()).unwrap();
    }

    #[test]
    fn edit_keeps_comments_and_reparses() {
        let src = EXAMPLE;
        let out = edit_backend(
            src,
            "web",
            ip("198.18.1.1"),
            BackendEdit::State(AdminState::Drain),
        )
        .unwrap();
        // Only the backend's table changed: one line added.
        assert_eq!(out.lines().count(), src.lines().count() + 1);
        assert!(out.contains("# Outer source addresses of IP-in-IP packets"));
        assert!(out.contains("weight = 100                   # 0..=10000, relative; 0 takes no new flows\nstate = \"drain\"\n"), "{out}");
        let cfg = parse(&out, "t").unwrap();
        assert_eq!(cfg.vips[0].backends[0].state, AdminState::Drain);
        // Draining a second backend of "web" leaves one: validation says so.
        let e = check(&out, "t", HostChecks::No).unwrap_err();
        assert!(e.to_string().contains("only 1 eligible backend(s)"), "{e}");

        // Back to active removes the key again: the original text.
        let back = edit_backend(
            &out,
            "198.18.0.10:80/tcp",
            ip("198.18.1.1"),
            BackendEdit::State(AdminState::Active),
        )
        .unwrap();
        assert_eq!(back, src);

        // Weight in place, keeping the trailing comment.
        let w = edit_backend(src, "web", ip("198.18.1.1"), BackendEdit::Weight(7)).unwrap();
        assert!(
            w.contains("weight = 7                   # 0..=10000, relative; 0 takes no new flows"),
            "{w}"
        );
        assert_eq!(
            check(&w, "t", HostChecks::No).unwrap().vips[0].backends[0].weight,
            7
        );
        assert_eq!(w.lines().count(), src.lines().count());

        // A backend without `weight` gets one; IPv6 VIP by id.
        let w = edit_backend(
            src,
            "[2001:db8::10]:443/tcp",
            ip("2001:db8:1::2"),
            BackendEdit::Weight(300),
        )
        .unwrap();
        let cfg = check(&w, "t", HostChecks::No).unwrap();
        assert_eq!(cfg.vips[2].backends[1].weight, 300);
        assert_eq!(cfg.vips[2].backends[0].weight, 100);

        // Disabled over drained, in place.
        let d = edit_backend(
            src,
            "web",
            ip("198.18.1.3"),
            BackendEdit::State(AdminState::Disabled),
        )
        .unwrap();
        assert_eq!(d, src.replace("state = \"drain\"", "state = \"disabled\""));
    }

    #[test]
    fn edit_inline_tables() {
        let src = r#"# the only VIP
vip = [
  { name = "web", address = "198.18.0.10", port = 80, protocol = "tcp", mode = "ipip", table_size = 1009, backend = [
    { address = "198.18.1.1" }, # first
    { address = "198.18.1.2", state = "drain" },
  ] },
]
[policy]
min_backends = 1
[agent]
interface = "eth0" # main NIC
"#;
        let src = src.replace(
            "[agent]\n",
            "[agent]\nipip_source_v4 = \"198.18.250.0/24\"\n",
        );
        check(&src, "t", HostChecks::No).unwrap();
        let out = edit_backend(
            &src,
            "web",
            ip("198.18.1.1"),
            BackendEdit::State(AdminState::Disabled),
        )
        .unwrap();
        assert!(
            out.contains("# first") && out.contains("# main NIC") && out.contains("# the only VIP")
        );
        assert!(
            out.contains(r#"{ address = "198.18.1.1", state = "disabled" }, # first"#),
            "{out}"
        );
        let cfg = parse(&out, "t").unwrap();
        assert_eq!(cfg.vips[0].backends[0].state, AdminState::Disabled);
        let out = edit_backend(
            &out,
            "web",
            ip("198.18.1.2"),
            BackendEdit::State(AdminState::Active),
        )
        .unwrap();
        let cfg = parse(&out, "t").unwrap();
        assert_eq!(cfg.vips[0].backends[1].state, AdminState::Active);
        assert!(out.contains(r#"{ address = "198.18.1.2" },"#), "{out}");
        let out = edit_backend(&out, "web", ip("198.18.1.2"), BackendEdit::Weight(5)).unwrap();
        assert!(
            out.contains(r#"{ address = "198.18.1.2", weight = 5 },"#),
            "{out}"
        );
    }

    #[test]
    fn edit_errors_list_what_exists() {
        let e =
            edit_backend(EXAMPLE, "mail", ip("198.18.1.1"), BackendEdit::Weight(1)).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("no VIP \"mail\"")
                && s.contains("\"web\" (198.18.0.10:80/tcp)")
                && s.contains("\"api6\""),
            "{s}"
        );
        let e = edit_backend(EXAMPLE, "web", ip("10.9.9.9"), BackendEdit::Weight(1)).unwrap_err();
        let s = e.with_file("lb.toml").to_string();
        assert!(
            s.contains("no backend 10.9.9.9; its backends are 198.18.1.1, 198.18.1.2, 198.18.1.3"),
            "{s}"
        );
        assert!(s.starts_with("lb.toml:"), "{s}");
        let e = edit_backend(
            EXAMPLE,
            "web",
            ip("198.18.1.1"),
            BackendEdit::Weight(10_001),
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e =
            edit_backend("[agent", "web", ip("198.18.1.1"), BackendEdit::Weight(1)).unwrap_err();
        assert_eq!(e.0[0].line, Some(1));
    }

    #[test]
    fn load_reports_io_errors() {
        let e = load(Path::new("/nonexistent/xlb/lb.toml"), HostChecks::No).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("/nonexistent/xlb/lb.toml: cannot read the config file:"),
            "{s}"
        );
        let dir = std::env::temp_dir().join(format!("xlb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let (cfg, text) = load(&path, HostChecks::No).unwrap();
        assert_eq!(text, MINIMAL);
        assert_eq!(cfg.vips.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Issue 25: `agent.ipip_mtu` and VIPs that share their IP fragments.
#[cfg(test)]
mod datapath_rule_tests {
    use std::fmt::Write as _;

    use super::{EXAMPLE, HostChecks, check};

    /// A web VIP on 198.18.0.10 over IP-in-IP with the given backends.
    fn second_vip(port: u16, mode: &str, backends: &[&str]) -> String {
        let mut t = format!(
            "\n[[vip]]\nname = \"web{port}\"\naddress = \"198.18.0.10\"\nport = {port}\nprotocol = \"tcp\"\nmode = \"{mode}\"\n"
        );
        for b in backends {
            let _ = write!(
                t,
                "\n[[vip.backend]]\naddress = \"{b}\"\nmac = \"02:00:00:00:01:09\"\n"
            );
        }
        t
    }

    fn messages(text: &str) -> Vec<String> {
        match check(text, "t.toml", HostChecks::No) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|i| i.message).collect(),
        }
    }

    #[test]
    fn ipip_mtu_defaults_to_1500_and_is_range_checked() {
        let cfg = check(EXAMPLE, "t.toml", HostChecks::No).expect("the example is valid");
        assert_eq!(cfg.agent.ipip_mtu, 1500);
        let without = EXAMPLE.replace("ipip_mtu = 1500\n", "");
        let cfg = check(&without, "t.toml", HostChecks::No).expect("the default applies");
        assert_eq!(cfg.agent.ipip_mtu, lb_common::DEFAULT_IPIP_MTU);
        for bad in [0, 1319, 65536] {
            let text = EXAMPLE.replace("ipip_mtu = 1500", &format!("ipip_mtu = {bad}"));
            let m = messages(&text);
            assert!(
                m.len() == 1 && m[0].contains("ipip_mtu must be 1320..=65535"),
                "{bad}: {m:?}"
            );
        }
        let jumbo = EXAMPLE.replace("ipip_mtu = 1500", "ipip_mtu = 9000");
        let cfg = check(&jumbo, "t.toml", HostChecks::No).expect("jumbo frames are fine");
        assert_eq!(cfg.dataplane_spec(1, &|_, _| true).ipip_mtu, 9000);
    }

    #[test]
    fn vips_sharing_address_and_protocol_must_share_mode_and_backends() {
        // The example's "web" VIP: 198.18.0.10:80/tcp, DSR, backends
        // 198.18.1.1-3.
        let same = ["198.18.1.3", "198.18.1.1", "198.18.1.2"];
        let ok = format!("{EXAMPLE}{}", second_vip(8080, "dsr", &same));
        assert_eq!(messages(&ok), Vec::<String>::new());
        let other_backends = format!(
            "{EXAMPLE}{}",
            second_vip(8080, "dsr", &["198.18.1.1", "198.18.1.2"])
        );
        let m = messages(&other_backends);
        assert!(
            m.len() == 1
                && m[0].contains("\"web8080\"")
                && m[0].contains("\"web\"")
                && m[0].contains("not its backends")
                && m[0].contains("fragments"),
            "{m:?}"
        );
        let other_mode = format!("{EXAMPLE}{}", second_vip(8080, "ipip", &same));
        let m = messages(&other_mode);
        assert!(
            m.iter().any(|m| m.contains("not its forwarding mode")),
            "{m:?}"
        );
    }
}
