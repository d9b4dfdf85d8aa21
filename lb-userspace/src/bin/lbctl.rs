//! `lbctl`: the operator's CLI. `validate` works offline; everything else
//! talks to `lbd` over its control socket.
//!
//! Exit codes: 0 success; 1 the agent refused or failed the request;
//! 64 invalid config or usage; 69 the agent cannot be reached.
use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    config::{self, HostChecks},
    control::{self, BackendOp, ChangeReport, Request, StatsReport, StatusReport},
};

#[derive(Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Operate the XDP load balancer agent (lbd)",
    after_help = "Exit codes: 0 ok, 1 request refused or failed, 64 invalid config or usage, 69 lbd unreachable."
)]
struct Cli {
    /// lbd's control socket.
    #[arg(
        long,
        env = "LBCTL_SOCKET",
        default_value = "/run/lbd/lbd.sock",
        global = true
    )]
    socket: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    /// How long to wait for lbd's answer.
    #[arg(long, default_value_t = 30, global = true, value_name = "SECONDS")]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a config file without touching the kernel (exit 0 valid, 64 invalid).
    Validate {
        file: PathBuf,
        /// Skip checks against this host (interface names), e.g. in CI.
        #[arg(long)]
        offline: bool,
    },
    /// VIPs, backends, weights, health, live config generation, attach mode.
    Status,
    /// Per-VIP and per-backend packets, bytes, rates; drops by reason.
    Stats,
    /// Make lbd re-read its config file (an invalid file, or one the policy
    /// refuses, changes nothing).
    Reload {
        #[command(flatten)]
        force: Force,
    },
    /// Change one backend of a VIP; the change is written back to lbd's config file.
    Backend {
        #[command(subcommand)]
        op: BackendCmd,
    },
    /// The data path itself.
    Datapath {
        #[command(subcommand)]
        op: DatapathCmd,
    },
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Keep established flows, send no new ones.
    Drain(Target),
    /// Return a drained backend to service.
    Undrain(Target),
    /// Send nothing to the backend.
    Disable(Target),
    /// Return a disabled backend to service.
    Enable(Target),
    /// Set the backend's weight (0..=10000; 0 takes no new flows).
    SetWeight {
        #[command(flatten)]
        target: Target,
        weight: u32,
    },
}

/// Overriding the policy.
#[derive(clap::Args)]
struct Force {
    /// Apply even if the policy refuses the change (needs --reason; recorded).
    #[arg(long, requires = "reason")]
    force: bool,
    /// Why the policy is overridden (recorded in the history).
    #[arg(long, requires = "force")]
    reason: Option<String>,
}

impl Force {
    fn reason(self) -> Option<String> {
        self.force.then_some(self.reason).flatten()
    }
}

#[derive(clap::Args)]
struct Target {
    /// VIP name, or address:port/protocol (e.g. 198.18.0.10:80/tcp).
    vip: String,
    /// Backend address.
    backend: IpAddr,
    #[command(flatten)]
    force: Force,
}

#[derive(Subcommand)]
enum DatapathCmd {
    /// Detach the XDP program: forwarding stops until lbd is restarted.
    Detach,
}

const EX_REFUSED: u8 = 1;
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let req = match cli.cmd {
        Cmd::Validate { file, offline } => return validate(&file, offline, cli.output),
        Cmd::Status => Request::Status,
        Cmd::Stats => Request::Stats,
        Cmd::Reload { force } => Request::Reload {
            force: force.reason(),
        },
        Cmd::Backend { op } => {
            let (t, op) = match op {
                BackendCmd::Drain(t) => (t, BackendOp::Drain),
                BackendCmd::Undrain(t) => (t, BackendOp::Undrain),
                BackendCmd::Disable(t) => (t, BackendOp::Disable),
                BackendCmd::Enable(t) => (t, BackendOp::Enable),
                BackendCmd::SetWeight { target, weight } => {
                    (target, BackendOp::SetWeight { weight })
                }
            };
            Request::Backend {
                vip: t.vip,
                backend: t.backend,
                op,
                force: t.force.reason(),
            }
        }
        Cmd::Datapath {
            op: DatapathCmd::Detach,
        } => Request::DatapathDetach,
    };
    let resp = match control::call(&cli.socket, &req, Duration::from_secs(cli.timeout)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&resp).unwrap_or_default()
        );
        return if resp.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EX_REFUSED)
        };
    }
    if !resp.ok {
        eprintln!(
            "lbctl: {}",
            resp.error.as_deref().unwrap_or("request failed")
        );
        return ExitCode::from(EX_REFUSED);
    }
    let rendered = match req {
        Request::Status => {
            serde_json::from_value::<StatusReport>(resp.data).map(|s| render_status(&s))
        }
        Request::Stats => {
            serde_json::from_value::<StatsReport>(resp.data).map(|s| render_stats(&s))
        }
        Request::Reload { .. } | Request::Backend { .. } => {
            serde_json::from_value::<ChangeReport>(resp.data).map(|c| render_change(&c))
        }
        Request::DatapathDetach => {
            Ok("detached: forwarding stopped; restart lbd to attach again".into())
        }
    };
    match rendered {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lbctl: lbd's answer does not match this lbctl: {e}");
            ExitCode::from(EX_REFUSED)
        }
    }
}

fn validate(file: &std::path::Path, offline: bool, output: Output) -> ExitCode {
    let host = if offline {
        HostChecks::No
    } else {
        HostChecks::Yes
    };
    let result = config::load(file, host);
    if output == Output::Json {
        let v = match &result {
            Ok((cfg, _)) => serde_json::json!({
                "valid": true,
                "vips": cfg.vips.len(),
                "backends": cfg.vips.iter().map(|v| v.backends.len()).sum::<usize>(),
            }),
            Err(errs) => serde_json::json!({
                "valid": false,
                "errors": errs.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }),
        };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    match result {
        Ok((cfg, _)) => {
            if output == Output::Text {
                println!(
                    "{}: valid ({} VIPs, {} backends)",
                    file.display(),
                    cfg.vips.len(),
                    cfg.vips.iter().map(|v| v.backends.len()).sum::<usize>()
                );
            }
            ExitCode::SUCCESS
        }
        Err(errs) => {
            if output == Output::Text {
                eprintln!("{errs}");
                eprintln!("{}: invalid ({} problems)", file.display(), errs.0.len());
            }
            ExitCode::from(EX_USAGE)
        }
    }
}

fn render_change(c: &ChangeReport) -> String {
    let mut o = format!("{} (maps written in {:.1} ms)", c.summary, c.apply_ms);
    if !c.overridden.is_empty() {
        o.push_str("\npolicy overridden (recorded):");
        for v in &c.overridden {
            o.push_str("\n  - ");
            o.push_str(v);
        }
    }
    o
}

fn render_status(s: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "config {} generation {} (data path carries {}){}",
        s.config_path,
        s.generation,
        s.live_generation,
        if s.generation == s.live_generation {
            ""
        } else {
            "  MISMATCH"
        }
    );
    let _ = writeln!(
        o,
        "interface {} mode {}{}  uptime {}s",
        s.interface,
        s.attach_mode,
        if s.adopted {
            " (adopted pinned maps)"
        } else {
            ""
        },
        s.uptime_secs
    );
    if s.verify_diffs.is_empty() {
        let _ = writeln!(o, "data path verified: maps match the applied config");
    } else {
        let _ = writeln!(o, "DATA PATH DIFFERS FROM THE APPLIED CONFIG:");
        for d in &s.verify_diffs {
            let _ = writeln!(o, "  - {d}");
        }
    }
    for v in &s.vips {
        let _ = writeln!(
            o,
            "\nVIP {} {} mode {:?} hash {:?} table {} fleet digest {}",
            v.name, v.vip, v.mode, v.hash, v.table_size, v.fleet_digest
        );
        if let Some(a) = &v.valve_alert {
            let _ = writeln!(o, "  ALERT safety valve: {a}");
        }
        let _ = writeln!(
            o,
            "  {:<28} {:>6} {:>9} {:>10} {:>7} {:>8}  last error",
            "backend", "weight", "admin", "health", "state", "share"
        );
        for b in &v.backends {
            let _ = writeln!(
                o,
                "  {:<28} {:>6} {:>9} {:>10} {:>7} {:>7.2}%  {}",
                b.address.to_string(),
                b.weight,
                format!("{:?}", b.admin).to_lowercase(),
                format!("{} {}/{}", b.health, b.consecutive_ok, b.consecutive_fail),
                format!("{:?}", b.state).to_lowercase(),
                b.table_share * 100.0,
                b.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    if !s.events.is_empty() {
        let _ = writeln!(o, "\nrecent events:");
        for e in s.events.iter().rev().take(10).rev() {
            let _ = writeln!(o, "  {e}");
        }
    }
    o
}

fn render_stats(s: &StatsReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "rates over the last {:.1} s", s.rate_window_secs);
    for v in &s.vips {
        let _ = writeln!(
            o,
            "\nVIP {} {}: {} packets, {} bytes, {} new flows, {:.0} pps, {:.0} bit/s",
            v.name, v.vip, v.packets, v.bytes, v.new_flows, v.pps, v.bps
        );
        let _ = writeln!(
            o,
            "  {:<28} {:>12} {:>14} {:>10} {:>10} {:>10}",
            "backend", "packets", "bytes", "new flows", "pps", "new share"
        );
        for b in &v.backends {
            let _ = writeln!(
                o,
                "  {:<28} {:>12} {:>14} {:>10} {:>10.0} {:>9.2}%",
                b.address.to_string(),
                b.packets,
                b.bytes,
                b.new_flows,
                b.pps,
                b.new_flow_share * 100.0
            );
        }
    }
    let _ = writeln!(o, "\ncounters (non-zero):");
    for (name, v) in s.counters.iter().filter(|(_, v)| *v > 0) {
        let _ = writeln!(o, "  {name:<32} {v}");
    }
    o
}
