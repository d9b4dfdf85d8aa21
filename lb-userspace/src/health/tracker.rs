//! The rise/fall state machine of one backend (pure).

use std::{
    fmt::{self, Display},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
