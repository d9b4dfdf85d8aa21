//! Health probes (TCP connect, HTTP GET, UDP request/response), the
//! rise/fall state machine and the safety valve.
//!
//! The pieces, from the wire up:
//!
//! - [`probe`] runs one probe against one address and returns its latency
//!   or a [`ProbeError`] an operator can read. The whole probe (connect,
//!   request, answer) is bounded by [`HealthCheck::timeout`]:
//!   - `tcp`: the TCP handshake completes;
//!   - `http`: an HTTP/1.1 `GET` is answered with a status line whose code is
//!     `expect_status` (only the status line is read);
//!   - `udp`: one datagram `send` is answered by one datagram that contains
//!     `expect` (any answer when `expect` is empty). An ICMP port unreachable
//!     is reported as [`ProbeError::Refused`].
//! - [`Tracker`] is the pure per-backend state machine. It counts
//!   **consecutive** results: a success resets the failure streak and a
//!   failure resets the success streak. An `Up` backend goes `Down` after
//!   `fall` consecutive failures; a `Down` backend comes back `Up` after
//!   `rise` consecutive successes. Interleaved results (fail, fail, ok, fail,
//!   fail with `fall = 3`) never flip the state. A backend the agent has
//!   just learned of starts **Up** (the caller passes `initial`, which should
//!   be [`Health::Up`] for new backends): an agent restart must not empty a
//!   VIP while the first probes are still in flight.
//! - [`safety_valve`] is the pure per-VIP decision of which backends get
//!   new flows. If at most `max_unhealthy_share` of a VIP's eligible
//!   backends are down, the down ones are removed. If more fail *at once*,
//!   the problem is much more likely the probes, the network or the agent
//!   than the backends, and removing them would pile the whole load on the
//!   few survivors (the outage this project exists because of). The valve
//!   then trips: the VIP keeps serving the backends it served before
//!   (restricted to those still eligible), and the decision carries a
//!   reason for an alert. When **every** eligible backend is down the valve
//!   trips as well and fails open (last served set, or all eligible
//!   backends): a VIP with no backends drops all traffic, which is never
//!   better than trying.
//! - [`Monitor`] owns one Tokio task per probe target, probes every
//!   `interval` (after a per-key start jitter so that many targets do not
//!   probe in lock step) and sends every result over a channel. The consumer
//!   feeds the results into its [`Tracker`]s and runs the valve.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Debug, Display},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::mpsc,
    task::JoinHandle,
    time::MissedTickBehavior,
};

use crate::config::{HealthCheck, Probe};

// ---------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------

/// Longest HTTP status line accepted (bytes before the first `\n`).
const MAX_STATUS_LINE: usize = 1024;
/// Largest UDP answer read (the largest possible UDP payload).
const MAX_DATAGRAM: usize = 65_536;
/// How many bytes of an unexpected answer an error message quotes.
const PREVIEW_BYTES: usize = 64;

/// Why a probe failed. `Display` is the long, operator-readable message;
/// [`ProbeError::reason`] is a short form for tables and logs.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No (complete) answer within the check's timeout.
    #[error("no answer within {0:?} (probe timeout)")]
    Timeout(Duration),
    /// The connection could not be set up (other than refused), e.g. no
    /// route to the backend.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// Nothing listens on the probed port: a TCP reset to the connect, or
    /// an ICMP port unreachable answering a UDP probe.
    #[error(
        "connection refused: nothing listens on the probed port \
         (TCP reset or ICMP port unreachable)"
    )]
    Refused,
    /// The HTTP server answered with another status code.
    #[error("HTTP status {got}, expected {want}")]
    HttpStatus {
        /// Status code received.
        got: u16,
        /// Status code the check expects.
        want: u16,
    },
    /// The answer was not what the protocol allows (e.g. not an HTTP
    /// status line, or the connection closed without an answer).
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The UDP answer does not contain the expected text.
    #[error("UDP reply {got} does not contain {expected:?}")]
    UdpMismatch {
        /// The text the check expects in the answer.
        expected: String,
        /// The start of the answer received, quoted and escaped.
        got: String,
    },
    /// Another I/O error (local socket, send, receive, connection reset).
    #[error("I/O error: {0}")]
    Io(io::Error),
}

impl ProbeError {
    /// A short form of the error, e.g. `timeout 500ms`, `refused`,
    /// `http 503 (want 200)`, for status tables and compact logs.
    pub fn reason(&self) -> String {
        match self {
            Self::Timeout(after) => format!("timeout {after:?}"),
            Self::Connect(e) => format!("connect: {e}"),
            Self::Refused => "refused".into(),
            Self::HttpStatus { got, want } => format!("http {got} (want {want})"),
            Self::BadResponse(_) => "bad response".into(),
            Self::UdpMismatch { .. } => "udp reply mismatch".into(),
            Self::Io(e) => format!("io: {e}"),
        }
    }
}

/// Classifies an I/O error of a connect.
fn connect_err(e: io::Error) -> ProbeError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        ProbeError::Refused
    } else {
        ProbeError::Connect(e)
    }
}

/// Classifies an I/O error after the connect (send or receive).
fn io_err(e: io::Error) -> ProbeError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        ProbeError::Refused
    } else {
        ProbeError::Io(e)
    }
}

/// The start of `bytes`, lossily decoded, escaped and quoted, with `…`
/// when it was cut.
fn preview(bytes: &[u8]) -> String {
    let cut = bytes.len().min(PREVIEW_BYTES);
    let text = String::from_utf8_lossy(&bytes[..cut]);
    let ellipsis = if bytes.len() > cut { "…" } else { "" };
    format!("\"{}\"{ellipsis}", text.escape_debug())
}

/// The address a backend is probed at: the check's `port` if set, else the
/// VIP's port.
pub fn probe_addr(backend: IpAddr, vip_port: u16, check: &HealthCheck) -> SocketAddr {
    SocketAddr::new(backend, check.port.unwrap_or(vip_port))
}

/// Runs one probe of `check.probe` against `target` and returns its latency
/// (from the start of the probe to the answer that decided it).
///
/// `target` is the full address probed; [`probe_addr`] derives it from a
/// backend and its VIP. The whole probe is bounded by `check.timeout`
/// ([`ProbeError::Timeout`]); `interval`, `rise` and `fall` are not used
/// here. Must run inside a Tokio runtime.
pub async fn probe(target: SocketAddr, check: &HealthCheck) -> Result<Duration, ProbeError> {
    let start = tokio::time::Instant::now();
    let work = async {
        match &check.probe {
            Probe::Tcp => probe_tcp(target).await,
            Probe::Http {
                path,
                expect_status,
            } => probe_http(target, path, *expect_status).await,
            Probe::Udp { send, expect } => probe_udp(target, send, expect).await,
        }
    };
    match tokio::time::timeout(check.timeout, work).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeError::Timeout(check.timeout)),
    }
}

async fn probe_tcp(target: SocketAddr) -> Result<(), ProbeError> {
    TcpStream::connect(target).await.map_err(connect_err)?;
    Ok(())
}

/// The request an HTTP probe sends.
fn http_request(target: SocketAddr, path: &str) -> String {
    let host = match target.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         User-Agent: lbd-health\r\n\r\n"
    )
}

async fn probe_http(target: SocketAddr, path: &str, want: u16) -> Result<(), ProbeError> {
    if path.is_empty() || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProbeError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("HTTP probe path {path:?} is empty or contains whitespace"),
        )));
    }
    let mut stream = TcpStream::connect(target).await.map_err(connect_err)?;
    stream
        .write_all(http_request(target, path).as_bytes())
        .await
        .map_err(io_err)?;
    let line = read_status_line(&mut stream).await?;
    let got = parse_status_line(&line)?;
    if got == want {
        Ok(())
    } else {
        Err(ProbeError::HttpStatus { got, want })
    }
}

/// Reads up to the first `\n` (without it and a preceding `\r`).
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, ProbeError> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err(ProbeError::BadResponse(format!(
                "no end of the status line within {MAX_STATUS_LINE} bytes: {}",
                preview(&buf)
            )));
        }
        let n = stream.read(&mut chunk).await.map_err(io_err)?;
        if n == 0 {
            if buf.is_empty() {
                return Err(ProbeError::BadResponse(
                    "connection closed without an answer".into(),
                ));
            }
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(buf)
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status_line(line: &[u8]) -> Result<u16, ProbeError> {
    let bad = || ProbeError::BadResponse(format!("not an HTTP status line: {}", preview(line)));
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    code.parse().map_err(|_| bad())
}

async fn probe_udp(target: SocketAddr, send: &str, expect: &str) -> Result<(), ProbeError> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(ProbeError::Io)?;
    socket.connect(target).await.map_err(connect_err)?;
    socket.send(send.as_bytes()).await.map_err(io_err)?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = socket.recv(&mut buf).await.map_err(io_err)?;
    let reply = &buf[..n];
    if expect.is_empty() || contains(reply, expect.as_bytes()) {
        Ok(())
    } else {
        Err(ProbeError::UdpMismatch {
            expected: expect.to_owned(),
            got: preview(reply),
        })
    }
}

/// Whether `needle` occurs in `haystack` (byte-wise).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Rise/fall state machine
// ---------------------------------------------------------------------------

/// Health of one backend as the probes see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Takes new flows (subject to the safety valve).
    Up,
    /// Failed `fall` consecutive probes and has not yet passed `rise`
    /// consecutive ones since.
    Down,
}

impl Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Down => "down",
        })
    }
}

/// A change of a backend's health, returned by [`Tracker::record`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// Health before the probe result.
    pub from: Health,
    /// Health after it.
    pub to: Health,
    /// Why, for logs and alerts (streak length and the last error).
    pub reason: String,
}

/// The rise/fall state machine of one backend; pure (the caller supplies
/// the results and the time).
///
/// Only consecutive results count: a success resets the failure streak and
/// a failure resets the success streak. `Up` → `Down` after `fall`
/// consecutive failures, `Down` → `Up` after `rise` consecutive successes.
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    health: Health,
    consecutive_ok: u32,
    consecutive_fail: u32,
    last_error: Option<String>,
    last_change: Instant,
    probes_total: u64,
    failures_total: u64,
}

impl Tracker {
    /// A tracker in state `initial`, with no results yet; `last_change` is
    /// now. New backends should start [`Health::Up`] so that an agent
    /// restart does not empty a VIP before the first probes complete.
    /// `rise` and `fall` of 0 are treated as 1.
    pub fn new(rise: u32, fall: u32, initial: Health) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            health: initial,
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_error: None,
            last_change: Instant::now(),
            probes_total: 0,
            failures_total: 0,
        }
    }

    /// Records one probe result (latency, or the error message) observed at
    /// `now`, and returns the transition it caused, if any.
    pub fn record(&mut self, result: Result<Duration, String>, now: Instant) -> Option<Transition> {
        self.probes_total = self.probes_total.saturating_add(1);
        let from = self.health;
        let reason = match result {
            Ok(latency) => {
                self.consecutive_ok = self.consecutive_ok.saturating_add(1);
                self.consecutive_fail = 0;
                if from != Health::Down || self.consecutive_ok < self.rise {
                    return None;
                }
                self.health = Health::Up;
                format!(
                    "{} consecutive successful probes (rise {}), last latency {latency:?}",
                    self.consecutive_ok, self.rise
                )
            }
            Err(error) => {
                self.failures_total = self.failures_total.saturating_add(1);
                self.consecutive_fail = self.consecutive_fail.saturating_add(1);
                self.consecutive_ok = 0;
                let reason = format!(
                    "{} consecutive failed probes (fall {}), last: {error}",
                    self.consecutive_fail, self.fall
                );
                self.last_error = Some(error);
                if from != Health::Up || self.consecutive_fail < self.fall {
                    return None;
                }
                self.health = Health::Down;
                reason
            }
        };
        self.last_change = now;
        Some(Transition {
            from,
            to: self.health,
            reason,
        })
    }

    /// Current health.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Length of the current streak of successful probes (0 after a failure).
    pub fn consecutive_ok(&self) -> u32 {
        self.consecutive_ok
    }

    /// Length of the current streak of failed probes (0 after a success).
    pub fn consecutive_fail(&self) -> u32 {
        self.consecutive_fail
    }

    /// The message of the most recent failed probe, kept after the backend
    /// recovers (compare with [`Tracker::last_change`]); `None` if no probe
    /// has failed yet.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// When the health last changed (creation time if it never did).
    pub fn last_change(&self) -> Instant {
        self.last_change
    }

    /// Probe results recorded.
    pub fn probes_total(&self) -> u64 {
        self.probes_total
    }

    /// Failed probe results recorded.
    pub fn failures_total(&self) -> u64 {
        self.failures_total
    }
}

// ---------------------------------------------------------------------------
// Safety valve
// ---------------------------------------------------------------------------

/// Input of [`safety_valve`] for one VIP.
#[derive(Debug)]
pub struct ValveInput<'a, K> {
    /// The VIP's admin-active backends (those that would take new flows if
    /// healthy). Duplicates are ignored.
    pub eligible: &'a [K],
    /// Backends the health checks say are [`Health::Down`] (may contain
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

// ---------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------

/// One thing to probe: a key the caller chooses (e.g. VIP and backend), the
/// address probed and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target<K> {
    /// Identifies the target in [`ProbeResult`]s and across
    /// [`Monitor::reconcile`] calls.
    pub key: K,
    /// Address probed (see [`probe_addr`]).
    pub addr: SocketAddr,
    /// The check.
    pub check: HealthCheck,
}

/// One probe's outcome, as sent by the [`Monitor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult<K> {
    /// The target's key.
    pub key: K,
    /// When the probe finished.
    pub at: Instant,
    /// Latency, or the [`ProbeError`]'s message; ready for
    /// [`Tracker::record`].
    pub result: Result<Duration, String>,
}

/// A running probe task.
#[derive(Debug)]
struct Running {
    addr: SocketAddr,
    check: HealthCheck,
    handle: JoinHandle<()>,
}

/// Runs the probes: one Tokio task per target, each probing every
/// `check.interval` and sending a [`ProbeResult`] per probe.
///
/// Probes of one target never overlap: a probe slower than the interval
/// delays the next one. The first probe of a task waits a jitter in
/// `[0, interval)` derived from the key, so that targets spread over the
/// interval. A task ends when the result receiver is dropped. Dropping the
/// monitor stops every task. Results already in the channel stay there
/// after a target is removed or restarted: consumers should ignore keys
/// they no longer track.
#[derive(Debug)]
pub struct Monitor<K> {
    results: mpsc::Sender<ProbeResult<K>>,
    tasks: BTreeMap<K, Running>,
}

impl<K> Monitor<K>
where
    K: Clone + Ord + Send + Sync + Debug + 'static,
{
    /// A monitor with no targets that will send results to `results`.
    pub fn new(results: mpsc::Sender<ProbeResult<K>>) -> Self {
        Self {
            results,
            tasks: BTreeMap::new(),
        }
    }

    /// Makes the running tasks match `targets`: starts tasks for new keys,
    /// restarts those whose address or check changed, stops those whose key
    /// is gone, and leaves the others alone (their schedule continues).
    /// Idempotent. If a key appears more than once, the last one counts.
    ///
    /// Must be called within a Tokio runtime (it spawns tasks).
    pub fn reconcile(&mut self, targets: Vec<Target<K>>) {
        let mut wanted: BTreeMap<K, Target<K>> = BTreeMap::new();
        for target in targets {
            wanted.insert(target.key.clone(), target);
        }
        self.tasks.retain(|key, running| {
            let keep = wanted.contains_key(key);
            if !keep {
                tracing::debug!(?key, addr = %running.addr, "health: stopping probes");
                running.handle.abort();
            }
            keep
        });
        for (key, target) in wanted {
            if let Some(running) = self.tasks.get(&key) {
                if running.addr == target.addr
                    && running.check == target.check
                    && !running.handle.is_finished()
                {
                    continue;
                }
                running.handle.abort();
                tracing::debug!(?key, addr = %target.addr, "health: restarting probes");
            } else {
                tracing::debug!(?key, addr = %target.addr, "health: starting probes");
            }
            let handle = tokio::spawn(run_target(
                key.clone(),
                target.addr,
                target.check.clone(),
                self.results.clone(),
            ));
            self.tasks.insert(
                key,
                Running {
                    addr: target.addr,
                    check: target.check,
                    handle,
                },
            );
        }
    }

    /// Stops every task and forgets every target.
    pub fn shutdown(&mut self) {
        for running in self.tasks.values() {
            running.handle.abort();
        }
        self.tasks.clear();
    }

    /// Number of targets being probed.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no target is being probed.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Whether `key` is being probed.
    pub fn contains(&self, key: &K) -> bool {
        self.tasks.contains_key(key)
    }
}

impl<K> Drop for Monitor<K> {
    fn drop(&mut self) {
        for running in self.tasks.values() {
            running.handle.abort();
        }
    }
}

/// Shortest probe interval used (a zero interval would spin).
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// The start jitter of a key: a stable hash (FNV-1a 64) of its `Debug`
/// string, reduced to `[0, interval)`.
fn start_jitter(key: &impl Debug, interval: Duration) -> Duration {
    let nanos = interval.as_nanos();
    if nanos == 0 {
        return Duration::ZERO;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{key:?}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // `hash % nanos` < 2^64 because hash < 2^64.
    Duration::from_nanos((u128::from(hash) % nanos) as u64)
}

/// The body of one target's task.
async fn run_target<K: Clone + Debug>(
    key: K,
    addr: SocketAddr,
    check: HealthCheck,
    results: mpsc::Sender<ProbeResult<K>>,
) {
    let period = check.interval.max(MIN_INTERVAL);
    tokio::time::sleep(start_jitter(&key, period)).await;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = probe(addr, &check).await.map_err(|e| e.to_string());
        let sent = results
            .send(ProbeResult {
                key: key.clone(),
                at: Instant::now(),
                result,
            })
            .await;
        if sent.is_err() {
            tracing::debug!(?key, "health: result receiver gone, stopping probes");
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    /// Upper bound of every wait in these tests.
    const WAIT: Duration = Duration::from_secs(5);

    fn check(probe: Probe, timeout: Duration) -> HealthCheck {
        HealthCheck {
            probe,
            port: None,
            interval: Duration::from_millis(30),
            timeout,
            rise: 2,
            fall: 3,
        }
    }

    fn http(expect_status: u16) -> Probe {
        Probe::Http {
            path: "/healthz".into(),
            expect_status,
        }
    }

    fn udp(send: &str, expect: &str) -> Probe {
        Probe::Udp {
            send: send.into(),
            expect: expect.into(),
        }
    }

    const SHORT: Duration = Duration::from_secs(1);

    /// An address on 127.0.0.1 where nothing listens (TCP).
    async fn closed_tcp_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    /// An HTTP server answering every request with `answer`; returns its
    /// address and the first request it received.
    async fn http_server(
        answer: &'static [u8],
    ) -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut request = Vec::new();
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                if let Some(tx) = tx.take() {
                    let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                }
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            }
        });
        (addr, rx)
    }

    /// A UDP server answering every datagram with `answer(request)`, or not
    /// at all when `answer` returns `None`.
    async fn udp_server(answer: fn(&[u8]) -> Option<Vec<u8>>) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some(reply) = answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_connect_succeeds() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let latency = probe(addr, &check(Probe::Tcp, SHORT)).await.unwrap();
        assert!(latency < SHORT);
    }

    #[tokio::test]
    async fn tcp_refused() {
        let addr = closed_tcp_port().await;
        let err = probe(addr, &check(Probe::Tcp, SHORT)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Refused), "{err:?}");
        assert_eq!(err.reason(), "refused");
        assert!(err.to_string().contains("refused"));
    }

    #[tokio::test]
    async fn http_200_sends_the_documented_request() {
        let (addr, request) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        probe(addr, &check(http(200), SHORT)).await.unwrap();
        let request = timeout(WAIT, request).await.unwrap().unwrap();
        assert_eq!(
            request,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             User-Agent: lbd-health\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn http_503_is_a_status_error() {
        let (addr, _) = http_server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let err = probe(addr, &check(http(200), SHORT)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ProbeError::HttpStatus {
                    got: 503,
                    want: 200
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "HTTP status 503, expected 200");
        assert_eq!(err.reason(), "http 503 (want 200)");
        // And 503 passes when it is what the check expects.
        probe(addr, &check(http(503), SHORT)).await.unwrap();
    }

    #[tokio::test]
    async fn http_garbage_is_a_bad_response() {
        let (addr, _) = http_server(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        let err = probe(addr, &check(http(200), SHORT)).await.unwrap_err();
        assert!(matches!(err, ProbeError::BadResponse(_)), "{err:?}");
        assert!(err.to_string().contains("SSH-2.0"), "{err}");

        let (addr, _) = http_server(b"").await;
        let err = probe(addr, &check(http(200), SHORT)).await.unwrap_err();
        assert!(matches!(err, ProbeError::BadResponse(_)), "{err:?}");
        assert!(err.to_string().contains("closed"), "{err}");
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content").unwrap(), 204);
        assert_eq!(parse_status_line(b"HTTP/1.0 404").unwrap(), 404);
        for bad in [
            &b"HTTP/1.1 20 OK"[..],
            b"HTTP/1.1 abc",
            b"",
            b"200 OK",
            b"\xff\xfe",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
        let long = vec![b'x'; 500];
        let msg = parse_status_line(&long).unwrap_err().to_string();
        assert!(msg.ends_with('…') && msg.len() < 120, "{msg}");
    }

    #[test]
    fn ipv6_host_header_is_bracketed() {
        let addr: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert!(http_request(addr, "/").contains("\r\nHost: [2001:db8::1]\r\n"));
    }

    #[tokio::test]
    async fn http_path_with_whitespace_is_rejected() {
        let (addr, _) = http_server(b"HTTP/1.1 200 OK\r\n\r\n").await;
        let probe_kind = Probe::Http {
            path: "/a b\r\nX: y".into(),
            expect_status: 200,
        };
        let err = probe(addr, &check(probe_kind, SHORT)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Io(_)), "{err:?}");
    }

    #[tokio::test]
    async fn http_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and holds connections, never answers.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let limit = Duration::from_millis(100);
        let start = std::time::Instant::now();
        let err = timeout(WAIT, probe(addr, &check(http(200), limit)))
            .await
            .unwrap()
            .unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(err, ProbeError::Timeout(t) if t == limit),
            "{err:?}"
        );
        assert!(took >= limit, "{took:?}");
        assert!(took < limit + Duration::from_millis(400), "{took:?}");
        assert_eq!(err.reason(), "timeout 100ms");
        server.abort();
    }

    #[tokio::test]
    async fn udp_echo_succeeds() {
        let addr = udp_server(|req| Some(req.to_vec())).await;
        probe(addr, &check(udp("ping", "ping"), SHORT))
            .await
            .unwrap();
        // Empty `expect`: any answer will do.
        let addr = udp_server(|_| Some(b"whatever".to_vec())).await;
        probe(addr, &check(udp("ping", ""), SHORT)).await.unwrap();
    }

    #[tokio::test]
    async fn udp_mismatch() {
        let addr = udp_server(|_| Some(b"nope\n".to_vec())).await;
        let err = probe(addr, &check(udp("ping", "pong"), SHORT))
            .await
            .unwrap_err();
        match &err {
            ProbeError::UdpMismatch { expected, got } => {
                assert_eq!(expected, "pong");
                assert_eq!(got, "\"nope\\n\"");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "UDP reply \"nope\\n\" does not contain \"pong\""
        );
    }

    #[tokio::test]
    async fn udp_no_answer_times_out() {
        let addr = udp_server(|_| None).await;
        let limit = Duration::from_millis(80);
        let start = std::time::Instant::now();
        let err = timeout(WAIT, probe(addr, &check(udp("ping", ""), limit)))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(_)), "{err:?}");
        assert!(start.elapsed() < limit + Duration::from_millis(400));
    }

    #[tokio::test]
    async fn udp_port_unreachable_is_refused() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let err = timeout(WAIT, probe(addr, &check(udp("ping", ""), SHORT)))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ProbeError::Refused), "{err:?}");
        assert!(err.to_string().contains("ICMP port unreachable"));
    }

    // --- Tracker -----------------------------------------------------------

    #[allow(clippy::unnecessary_wraps)] // the shape `Tracker::record` takes
    fn ok() -> Result<Duration, String> {
        Ok(Duration::from_millis(1))
    }

    fn fail() -> Result<Duration, String> {
        Err("boom".into())
    }

    #[test]
    fn tracker_falls_after_fall_consecutive_failures() {
        let mut t = Tracker::new(2, 3, Health::Up);
        let now = Instant::now();
        assert_eq!(t.record(fail(), now), None);
        assert_eq!(t.record(fail(), now), None);
        assert_eq!(t.health(), Health::Up);
        assert_eq!(t.consecutive_fail(), 2);
        let later = now + Duration::from_secs(1);
        let tr = t.record(fail(), later).unwrap();
        assert_eq!((tr.from, tr.to), (Health::Up, Health::Down));
        assert!(tr.reason.contains("3 consecutive failed") && tr.reason.contains("boom"));
        assert_eq!(t.health(), Health::Down);
        assert_eq!(t.last_change(), later);
        assert_eq!(t.last_error(), Some("boom"));
        // Further failures do not transition again.
        assert_eq!(t.record(fail(), later), None);
        assert_eq!((t.probes_total(), t.failures_total()), (4, 4));
    }

    #[test]
    fn tracker_rises_after_rise_consecutive_successes() {
        let mut t = Tracker::new(2, 3, Health::Down);
        let now = Instant::now();
        assert_eq!(t.record(ok(), now), None);
        assert_eq!(t.consecutive_ok(), 1);
        let tr = t.record(ok(), now).unwrap();
        assert_eq!((tr.from, tr.to), (Health::Down, Health::Up));
        assert!(tr.reason.contains("2 consecutive successful"));
        assert_eq!(t.record(ok(), now), None);
        assert_eq!(t.health(), Health::Up);
        assert_eq!(t.last_error(), None);
    }

    #[test]
    fn tracker_interleaved_results_do_not_flip() {
        let now = Instant::now();
        // fall = 3: fail, fail, ok, fail, fail stays Up.
        let mut t = Tracker::new(2, 3, Health::Up);
        for r in [fail(), fail(), ok(), fail(), fail()] {
            assert_eq!(t.record(r, now), None);
        }
        assert_eq!(t.health(), Health::Up);
        assert_eq!((t.consecutive_ok(), t.consecutive_fail()), (0, 2));
        assert_eq!((t.probes_total(), t.failures_total()), (5, 4));
        // rise = 3: ok, ok, fail, ok, ok stays Down.
        let mut t = Tracker::new(3, 3, Health::Down);
        for r in [ok(), ok(), fail(), ok(), ok()] {
            assert_eq!(t.record(r, now), None);
        }
        assert_eq!(t.health(), Health::Down);
        // One more success completes the streak.
        assert!(t.record(ok(), now).is_some());
        assert_eq!(t.health(), Health::Up);
        // The last error stays visible after recovery.
        assert_eq!(t.last_error(), Some("boom"));
    }

    #[test]
    fn tracker_zero_rise_fall_act_as_one() {
        let now = Instant::now();
        let mut t = Tracker::new(0, 0, Health::Up);
        assert!(t.record(fail(), now).is_some());
        assert!(t.record(ok(), now).is_some());
    }

    #[test]
    fn health_serializes_lowercase() {
        assert_eq!(serde_json::to_string(&Health::Up).unwrap(), "\"up\"");
        assert_eq!(serde_json::to_string(&Health::Down).unwrap(), "\"down\"");
        assert_eq!(Health::Down.to_string(), "down");
    }

    // --- Safety valve ------------------------------------------------------

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

    // --- Monitor -----------------------------------------------------------

    #[test]
    fn jitter_is_stable_and_below_interval() {
        let interval = Duration::from_millis(50);
        for key in 0..200u32 {
            let j = start_jitter(&key, interval);
            assert!(j < interval);
            assert_eq!(j, start_jitter(&key, interval));
        }
        assert_ne!(start_jitter(&"a", interval), start_jitter(&"b", interval));
        assert_eq!(start_jitter(&1u8, Duration::ZERO), Duration::ZERO);
    }

    fn target(key: &'static str, addr: SocketAddr) -> Target<&'static str> {
        let mut check = check(Probe::Tcp, Duration::from_millis(50));
        check.interval = Duration::from_millis(20);
        Target { key, addr, check }
    }

    async fn next(rx: &mut mpsc::Receiver<ProbeResult<&'static str>>) -> ProbeResult<&'static str> {
        timeout(WAIT, rx.recv())
            .await
            .expect("no probe result in time")
            .expect("channel closed")
    }

    /// A TCP server on 127.0.0.1 that accepts and closes connections;
    /// aborting (and awaiting) the task closes the port.
    async fn tcp_server() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        (addr, task)
    }

    /// Stops a [`tcp_server`]; its port refuses connections afterwards.
    async fn stop(server: JoinHandle<()>) {
        server.abort();
        let _ = timeout(WAIT, server).await.unwrap();
    }

    /// Discards the results already queued. On the current-thread runtime
    /// of `#[tokio::test]`, no task runs between a `reconcile` and this, so
    /// an aborted task cannot have sent anything after it.
    fn drain(rx: &mut mpsc::Receiver<ProbeResult<&'static str>>) {
        while rx.try_recv().is_ok() {}
    }

    /// Asserts that no result arrives for several probe intervals.
    async fn assert_quiet(rx: &mut mpsc::Receiver<ProbeResult<&'static str>>) {
        let got = timeout(Duration::from_millis(150), rx.recv()).await;
        assert!(got.is_err(), "result after the target was removed: {got:?}");
    }

    fn task_id(monitor: &Monitor<&'static str>, key: &str) -> tokio::task::Id {
        monitor.tasks[key].handle.id()
    }

    #[tokio::test]
    async fn monitor_reconcile_start_fail_stop() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut monitor = Monitor::new(tx);
        let (addr, server) = tcp_server().await;
        monitor.reconcile(vec![target("a", addr)]);
        assert!(monitor.contains(&"a"));
        let r = next(&mut rx).await;
        assert_eq!(r.key, "a");
        assert!(r.result.is_ok(), "{r:?}");
        // Idempotent: the same targets keep the same task.
        let id = task_id(&monitor, "a");
        monitor.reconcile(vec![target("a", addr)]);
        assert_eq!(monitor.len(), 1);
        assert_eq!(task_id(&monitor, "a"), id);

        // The target becomes unreachable: failures arrive.
        stop(server).await;
        let err = loop {
            if let Err(e) = next(&mut rx).await.result {
                break e;
            }
        };
        assert!(err.contains("refused"), "{err}");
        // ... and keep arriving.
        for _ in 0..3 {
            assert!(next(&mut rx).await.result.is_err());
        }

        // Removed: no more results.
        monitor.reconcile(Vec::new());
        assert!(monitor.is_empty());
        drain(&mut rx);
        assert_quiet(&mut rx).await;
        // Removing again is a no-op.
        monitor.reconcile(Vec::new());
        assert!(monitor.is_empty());
    }

    #[tokio::test]
    async fn monitor_restarts_changed_targets_and_keeps_others() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut monitor = Monitor::new(tx);
        let (up, server) = tcp_server().await;
        let closed = closed_tcp_port().await;
        monitor.reconcile(vec![target("a", closed), target("b", up)]);
        // "a" fails, "b" succeeds.
        let (mut a_failed, mut b_ok) = (false, false);
        while !(a_failed && b_ok) {
            let r = next(&mut rx).await;
            match r.key {
                "a" => a_failed |= r.result.is_err(),
                "b" => b_ok |= r.result.is_ok(),
                other => panic!("{other}"),
            }
        }
        // Point "a" at the live server: only "a" is restarted, and it
        // succeeds from then on.
        let (a_id, b_id) = (task_id(&monitor, "a"), task_id(&monitor, "b"));
        monitor.reconcile(vec![target("a", up), target("b", up)]);
        assert_ne!(task_id(&monitor, "a"), a_id);
        assert_eq!(task_id(&monitor, "b"), b_id);
        drain(&mut rx);
        let mut a_ok = 0;
        while a_ok < 3 {
            let r = next(&mut rx).await;
            assert!(r.result.is_ok(), "{r:?}");
            a_ok += usize::from(r.key == "a");
        }
        // A changed check restarts too.
        let mut slower = target("b", up);
        slower.check.interval = Duration::from_millis(40);
        monitor.reconcile(vec![target("a", up), slower]);
        assert_ne!(task_id(&monitor, "b"), b_id);

        // Drop "b" only; "a" keeps reporting.
        monitor.reconcile(vec![target("a", up)]);
        drain(&mut rx);
        for _ in 0..5 {
            assert_eq!(next(&mut rx).await.key, "a");
        }
        // Shutdown stops everything.
        monitor.shutdown();
        assert!(monitor.is_empty());
        drain(&mut rx);
        assert_quiet(&mut rx).await;
        stop(server).await;
    }

    #[tokio::test]
    async fn monitor_drop_stops_tasks() {
        let (tx, mut rx) = mpsc::channel(64);
        let (addr, server) = tcp_server().await;
        let mut monitor = Monitor::new(tx);
        monitor.reconcile(vec![target("a", addr)]);
        next(&mut rx).await;
        drop(monitor);
        // Every sender is gone once the aborted task is dropped.
        let closed = timeout(WAIT, async { while rx.recv().await.is_some() {} }).await;
        assert!(closed.is_ok(), "channel still open after drop");
        stop(server).await;
    }

    #[tokio::test]
    async fn monitor_task_ends_when_receiver_is_dropped() {
        let (tx, rx) = mpsc::channel(1);
        let (addr, server) = tcp_server().await;
        let mut monitor = Monitor::new(tx);
        monitor.reconcile(vec![target("a", addr)]);
        drop(rx);
        let finished = timeout(WAIT, async {
            while !monitor.tasks["a"].handle.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(finished.is_ok(), "task still running without a receiver");
        stop(server).await;
    }
}
