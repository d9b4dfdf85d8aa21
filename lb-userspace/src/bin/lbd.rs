//! `lbd`: the load-balancer agent. Reads the config, attaches the XDP
//! program (adopting pinned maps and links of an earlier run), programs the
//! maps, runs health probes, and serves the control API (`lbctl`) and
//! Prometheus metrics. SIGHUP reloads the config; SIGTERM/SIGINT stop the
//! agent but not forwarding (unless `--detach-on-exit`).
use std::{path::PathBuf, process::ExitCode};

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
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
