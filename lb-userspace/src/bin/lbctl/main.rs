//! `lbctl`: the operator's CLI. `validate` works offline; everything else
//! talks to `lbd` over its control socket.
//!
//! Exit codes: 0 success; 1 the agent refused or failed the request;
//! 64 invalid config or usage; 69 the agent cannot be reached.
use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

mod status;

use status::{render_stats, render_status};

use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::history::Record,
    config::{self, HostChecks},
    control::{
        self, ApproveReport, BackendOp, ChangeReport, ErrorKind, PlanDoc, Request, StatsReport,
        StatusReport,
    },
    simulate,
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
    /// Predict each backend's share of new flows under a config, two ways
    /// that must agree: from the planned tables, and by running synthetic
    /// flows through the real XDP object (loaded unattached; needs root).
    /// Touches nothing live. Exit 0 agree, 1 disagree, 64 invalid config.
    Simulate {
        file: PathBuf,
        /// Synthetic flows per VIP.
        #[arg(long, default_value_t = 20_000)]
        flows: u32,
    },
    /// Compare a candidate config with the live one: changes, shares before
    /// → after, flows moved, policy verdict. Exit 0 pass, 1 policy fails.
    Plan {
        file: PathBuf,
        /// Write the plan (to review, approve and apply) to this file.
        #[arg(short = 'f', long = "plan-file", value_name = "PLAN.json")]
        out: Option<PathBuf>,
        /// Who proposes the change (default: $SUDO_USER or $USER).
        #[arg(long)]
        author: Option<String>,
    },
    /// Record a review of a plan (the author cannot approve their own).
    Approve {
        plan: PathBuf,
        #[arg(long)]
        reviewer: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Apply exactly the reviewed plan (refused if stale, unapproved,
    /// edited or against the policy, unless --force --reason).
    Apply {
        plan: PathBuf,
        /// Who applies (default: $SUDO_USER or $USER).
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        force: Force,
    },
    /// Restore an earlier generation (default: the one before the live one).
    Rollback {
        generation: Option<u64>,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        actor: Option<String>,
    },
    /// Every recorded change: who, when, why, diff, approvals, guard, rollbacks.
    History,
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

/// Who runs this command, as declared by the environment.
fn whoami(explicit: Option<String>) -> String {
    explicit
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn read_plan(path: &std::path::Path) -> Result<PlanDoc, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a plan file: {e}", path.display()))
}

const EX_REFUSED: u8 = 1;
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;

/// The exit code of an error answer: 64 when the config or the request
/// is invalid (the operator must fix what they sent), 1 for every other
/// refusal or failure (and for agents that send no kind).
fn exit_code(resp: &control::Response) -> ExitCode {
    match resp.kind {
        Some(ErrorKind::InvalidConfig | ErrorKind::InvalidRequest) => ExitCode::from(EX_USAGE),
        _ => ExitCode::from(EX_REFUSED),
    }
}

/// The request a command sends, or the exit code of a command that ran
/// locally (validate, simulate) or failed before sending anything.
fn build_request(
    cmd: Cmd,
    output: Output,
    plan_out: &mut Option<PathBuf>,
) -> Result<Request, ExitCode> {
    Ok(match cmd {
        Cmd::Validate { file, offline } => return Err(validate(&file, offline, output)),
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
        Cmd::Simulate { file, flows } => return Err(simulate(&file, flows, output)),
        Cmd::Plan { file, out, author } => {
            let source = match std::fs::read_to_string(&file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("lbctl: {}: {e}", file.display());
                    return Err(ExitCode::from(EX_USAGE));
                }
            };
            *plan_out = out;
            Request::Plan {
                source,
                file: file.display().to_string(),
                author: whoami(author),
            }
        }
        Cmd::Approve {
            plan,
            reviewer,
            comment,
        } => match read_plan(&plan) {
            Ok(plan) => Request::Approve {
                plan,
                reviewer,
                comment,
            },
            Err(e) => {
                eprintln!("lbctl: {e}");
                return Err(ExitCode::from(EX_USAGE));
            }
        },
        Cmd::Apply { plan, actor, force } => match read_plan(&plan) {
            Ok(plan) => Request::Apply {
                plan,
                actor: whoami(actor),
                force: force.reason(),
            },
            Err(e) => {
                eprintln!("lbctl: {e}");
                return Err(ExitCode::from(EX_USAGE));
            }
        },
        Cmd::Rollback {
            generation,
            reason,
            actor,
        } => Request::Rollback {
            generation,
            actor: whoami(actor),
            reason,
        },
        Cmd::History => Request::History,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut plan_out: Option<PathBuf> = None;
    let req = match build_request(cli.cmd, cli.output, &mut plan_out) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let resp = match control::call(&cli.socket, &req, Duration::from_secs(cli.timeout)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let mut code = ExitCode::SUCCESS;
    if resp.ok
        && let Request::Plan { .. } = req
    {
        match serde_json::from_value::<PlanDoc>(resp.data.clone()) {
            Ok(doc) => {
                if let Some(path) = &plan_out {
                    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
                    if let Err(e) = std::fs::write(path, text + "\n") {
                        eprintln!("lbctl: writing {}: {e}", path.display());
                        return ExitCode::from(EX_REFUSED);
                    }
                }
                if !doc.verdict.passed() {
                    code = ExitCode::from(EX_REFUSED);
                }
            }
            Err(e) => {
                eprintln!("lbctl: lbd's answer does not match this lbctl: {e}");
                return ExitCode::from(EX_REFUSED);
            }
        }
    }
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&resp).unwrap_or_default()
        );
        return if resp.ok { code } else { exit_code(&resp) };
    }
    if !resp.ok {
        eprintln!(
            "lbctl: {}",
            resp.error.as_deref().unwrap_or("request failed")
        );
        return exit_code(&resp);
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
        Request::Plan { .. } => serde_json::from_value::<PlanDoc>(resp.data)
            .map(|d| render_plan(&d, plan_out.as_deref())),
        Request::Approve { .. } => serde_json::from_value::<ApproveReport>(resp.data).map(|r| {
            format!(
                "plan {}: {} of {} approvals ({})",
                r.digest,
                r.approvals.len(),
                r.needed,
                r.approvals
                    .iter()
                    .map(|a| a.reviewer.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }),
        Request::Apply { .. } | Request::Rollback { .. } => {
            serde_json::from_value::<ChangeReport>(resp.data).map(|c| render_change(&c))
        }
        Request::History => {
            serde_json::from_value::<Vec<Record>>(resp.data).map(|h| render_history(&h))
        }
    };
    match rendered {
        Ok(text) => {
            println!("{text}");
            code
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

fn render_plan(d: &PlanDoc, file: Option<&std::path::Path>) -> String {
    use std::fmt::Write as _;
    let mut o = format!(
        "plan {} by {} against generation {}: {}\n",
        d.digest,
        d.author,
        d.base_generation,
        if d.verdict.passed() {
            "PASSES the policy"
        } else {
            "FAILS the policy"
        }
    );
    for v in &d.verdict.vips {
        let _ = writeln!(
            o,
            "\nVIP {} {} {:?}: {:.1}% of flows move, worst deviation from weights {:.2} points",
            v.name,
            v.vip,
            v.change,
            v.moved * 100.0,
            v.worst_deviation * 100.0
        );
        for (a, before) in &v.removed {
            let _ = writeln!(
                o,
                "  {:<28} removed                       {:5.1}% →   0.0%",
                a.to_string(),
                before * 100.0
            );
        }
        for b in &v.backends {
            let before = b
                .before
                .map_or_else(|| "   new".to_owned(), |x| format!("{:5.1}%", x * 100.0));
            let _ = writeln!(
                o,
                "  {:<28} weight {:>5} {:<6} expected {:5.1}%  {before} → {:5.1}%",
                b.address.to_string(),
                b.weight,
                format!("{:?}", b.state).to_lowercase(),
                b.expected * 100.0,
                b.after * 100.0
            );
        }
    }
    if !d.verdict.violations.is_empty() {
        let _ = writeln!(o, "\npolicy violations:");
        for v in &d.verdict.violations {
            let _ = writeln!(o, "  - {v}");
        }
    }
    let _ = write!(
        o,
        "\napprovals needed: {}{}",
        d.min_approvals,
        file.map_or_else(
            || " (write the plan with --plan-file to approve and apply it)".to_owned(),
            |f| format!("; plan written to {}", f.display())
        )
    );
    o
}

fn render_history(h: &[Record]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    for r in h {
        let _ = writeln!(
            o,
            "#{} {} gen {} {} by {}: {}{}",
            r.seq,
            r.at_unix,
            r.generation,
            r.kind,
            r.actor,
            r.summary,
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(" — {}", r.reason)
            }
        );
        if let Some(d) = &r.plan_digest {
            let _ = writeln!(
                o,
                "    plan {d}, approved by: {}",
                if r.approvals.is_empty() {
                    "nobody".to_owned()
                } else {
                    r.approvals
                        .iter()
                        .map(|a| a.reviewer.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        if let Some(g) = r.restored {
            let _ = writeln!(o, "    restored generation {g}");
        }
        for d in &r.diff {
            let _ = writeln!(o, "    {d}");
        }
        for v in &r.overridden {
            let _ = writeln!(o, "    OVERRIDDEN: {v}");
        }
    }
    o
}

fn simulate(file: &std::path::Path, flows: u32, output: Output) -> ExitCode {
    let (cfg, _) = match config::load(file, HostChecks::No) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match simulate::run(&cfg, flows) {
        Ok(report) => {
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", simulate::render(&report));
            }
            if report.agree {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EX_REFUSED)
            }
        }
        Err(e) => {
            eprintln!("lbctl: simulate: {e}");
            ExitCode::from(EX_REFUSED)
        }
    }
}

fn render_change(c: &ChangeReport) -> String {
    let mut o = format!(
        "{} (live {:.1} ms after the request, recorded after {:.1} ms)",
        c.summary, c.live_ms, c.apply_ms
    );
    if !c.overridden.is_empty() {
        o.push_str("\npolicy overridden (recorded):");
        for v in &c.overridden {
            o.push_str("\n  - ");
            o.push_str(v);
        }
    }
    o
}
