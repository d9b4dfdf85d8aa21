//! `lbd`: the load-balancer agent. Reads the config, attaches the XDP
//! program (adopting pinned maps and links of an earlier run), programs the
//! maps, runs health probes, and serves the control API (`lbctl`) and
//! Prometheus metrics. SIGHUP reloads the config; SIGTERM/SIGINT stop the
//! agent but not forwarding (unless `--detach-on-exit`). Under systemd
//! (`Type=notify`, deploy/systemd/lbd.service) it reports readiness, reloads
//! and stops, and serves the watchdog.
use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::Parser;
use lb_userspace::agent::{AgentError, AgentOptions, server};

#[derive(Parser)]
#[command(name = "lbd", version, about = "XDP layer-4 load balancer agent")]
struct Args {
    /// Config file (TOML; see the README for a commented example).
    #[arg(short, long, default_value = "/etc/lbd/lbd.toml")]
    config: PathBuf,
    /// Detach the XDP program when lbd stops. By default forwarding goes
    /// on, and the next lbd adopts the pinned program and maps.
    #[arg(long)]
    detach_on_exit: bool,
    /// Log filter (tracing env-filter syntax), e.g. "info" or "lb_userspace=debug".
    #[arg(long, env = "LBD_LOG", default_value = "info")]
    log: String,
    /// Log format on standard error: "text" (colour only on a terminal,
    /// plain under journald or in a file) or "json" (one object per line).
    #[arg(long, env = "LBD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log, args.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lbd: starting the runtime failed: {e}");
            return ExitCode::from(71);
        }
    };
    let opts = AgentOptions {
        config_path: args.config,
        detach_on_exit: args.detach_on_exit,
    };
    match rt.block_on(server::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ AgentError::Config(_)) => {
            eprintln!("lbd: {e}");
            ExitCode::from(78) // EX_CONFIG
        }
        Err(e) => {
            eprintln!("lbd: {e}");
            ExitCode::from(1)
        }
    }
}
