//! systemd integration through the sd_notify protocol (the `sd-notify`
//! crate): `READY=1` once the data path is attached and its maps verify
//! against the applied plan, `RELOADING=1` … `READY=1` around a SIGHUP
//! reload, `STOPPING=1` on stop, and `WATCHDOG=1` pings from a task that
//! must take the agent's lock first, so an agent wedged behind its lock
//! stops pinging and systemd restarts it (`WatchdogSec` in the unit).
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

use super::{Agent, server::Shared};

/// Sends `states`; a failure is logged, never fatal (forwarding goes on).
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Why the agent is not ready to serve yet, or a one-line status.
pub fn readiness(agent: &Agent) -> Result<String, String> {
    if agent.is_detached() {
        return Err("the XDP program is detached".into());
    }
    let Some(plan) = agent.applied() else {
        return Err("nothing applied to the data path".into());
    };
    match agent.datapath().verify(plan) {
        Ok(diffs) if diffs.is_empty() => Ok(format!(
            "forwarding generation {} on {}; maps verified",
            agent.generation(),
            agent.config().agent.interface
        )),
        Ok(diffs) => Err(format!(
            "the kernel maps differ from the plan in {} places (first: {})",
            diffs.len(),
            diffs[0]
        )),
        Err(e) => Err(format!("verifying the maps failed: {e}")),
    }
}

/// Tells systemd the agent is ready, or (not ready) why, as its status.
pub fn ready(agent: &Agent) {
    match readiness(agent) {
        Ok(status) => send(&[NotifyState::Ready, NotifyState::Status(&status)]),
        Err(why) => {
            tracing::error!("not signalling readiness to systemd: {why}");
            send(&[NotifyState::Status(&format!("not ready: {why}"))]);
        }
    }
}

/// A SIGHUP reload starts.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!("sd_notify: reading the monotonic clock: {e}"),
    }
}

/// The agent stops.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its period while the agent's lock can be
/// taken within that half. None when systemd asked for no watchdog.
pub fn spawn_watchdog(agent: Shared) -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let half = (period / 2).max(Duration::from_millis(10));
    tracing::info!("systemd watchdog every {period:?}: pinging every {half:?}");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(half);
        loop {
            tick.tick().await;
            if tokio::time::timeout(half, agent.lock()).await.is_ok() {
                send(&[NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    "agent lock held for over {half:?}: not pinging the systemd watchdog"
                );
            }
        }
    }))
}
