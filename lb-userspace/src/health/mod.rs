//! Health probes (TCP connect, HTTP GET, UDP request/response), the
//! rise/fall state machine and the task that runs the probes. Which
//! backends may serve given their health (the safety valve) is the
//! agent's serving policy: `agent::serving`.
//!
//! The pieces, from the wire up:
//!
//! - [`probe()`] runs one probe against one address and returns its latency
//!   or a [`ProbeError`] an operator can read. The whole probe (connect,
//!   request, answer) is bounded by the check's `timeout`:
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
//! - [`Monitor`] owns one Tokio task per probe target, probes every
//!   `interval` (after a per-key start jitter so that many targets do not
//!   probe in lock step) and sends every result over a channel. The consumer
//!   feeds the results into its [`Tracker`]s and runs the valve.

mod monitor;
mod probe;
mod tracker;

pub use monitor::{Monitor, ProbeResult, Target};
pub use probe::{ProbeError, probe, probe_addr};
pub use tracker::{Health, Tracker, Transition};
