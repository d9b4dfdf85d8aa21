//! The probe runner: one Tokio task per target, probing every `interval`
//! after a per-key start jitter, sending every result over a channel.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_control::digest::fnv1a;
use tokio::{sync::mpsc, task::JoinHandle, time::MissedTickBehavior};

use super::probe::probe;
use crate::config::HealthCheck;

/// One thing to probe: a key the caller chooses (e.g. VIP and backend), the
/// address probed and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target<K> {
    /// Identifies the target in [`ProbeResult`]s and across
    /// [`Monitor::reconcile`] calls.
    pub key: K,
    /// Address probed (see [`super::probe_addr`]).
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
    /// Latency, or the [`super::ProbeError`]'s message; ready for
    /// [`super::Tracker::record`].
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
    let hash = fnv1a(format!("{key:?}").as_bytes());
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

#[cfg(test)]
mod tests {
    use tokio::{net::TcpListener, time::timeout};

    use super::{
        super::probe::tests::{WAIT, check, closed_tcp_port},
        *,
    };
    use crate::config::Probe;

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
