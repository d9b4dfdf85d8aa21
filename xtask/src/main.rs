//! `cargo xtask <task>`: the project's tasks. Every task first runs the
//! idempotent machine set-up (`scripts/setup.sh`), so each works on a fresh
//! machine with nothing installed by hand.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project tasks for the XDP load balancer"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs: nightly rust-src, bpf-linker (built
    /// against the nightly's LLVM into .tools/), Debian packages, bpffs.
    Setup,
    /// The whole test suite: set-up, rustfmt check, clippy -D warnings, the
    /// Prometheus alert rules (promtool check and unit tests), and every
    /// unit, kernel (BPF_PROG_TEST_RUN) and network-namespace test.
    /// Needs root.
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks of the compiled XDP program (bench-results/results.{json,md}) and of
    /// config updates (bench-results/update.{json,md}).
    /// Needs root.
    Bench {
        /// Runs per class (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// BPF_PROG_TEST_RUN calls per run.
        #[arg(long, default_value_t = 20_000)]
        calls: u32,
    },
    /// Runs the data path on a self-contained network-namespace lab with
    /// real TCP and UDP traffic and shows the per-backend distribution.
    /// Needs root.
    Demo,
    /// The built-in lab left running: `up` (namespaces, servers, lbd),
    /// `down` (removes everything, also after a crash), `status`.
    /// Needs root.
    Lab {
        #[arg(value_parser = ["up", "down", "status"])]
        action: String,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("[xtask] {what}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("could not start: {what}"))?;
    if !status.success() {
        bail!("failed ({status}): {what}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn setup() -> anyhow::Result<()> {
    run(
        "setup (scripts/setup.sh)",
        Command::new("bash").arg(root().join("scripts/setup.sh")),
    )
}

fn require_root(task: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!(
            "`cargo xtask {task}` loads XDP programs and creates network namespaces: run it as root"
        );
    }
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// `cargo xtask test`: the whole suite, in the order CI runs it.
fn test_suite(args: &[String]) -> anyhow::Result<()> {
    require_root("test")?;
    setup()?;
    run("rustfmt check", cargo().args(["fmt", "--all", "--check"]))?;
    run(
        "clippy (warnings are errors)",
        cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "alert rules (promtool check rules)",
        Command::new("promtool").args(["check", "rules", "deploy/prometheus/xlb-rules.yml"]),
    )?;
    run(
        "alert rule unit tests (promtool test rules)",
        Command::new("promtool").args(["test", "rules", "deploy/prometheus/xlb-rules.test.yml"]),
    )?;
    run(
        "tests",
        cargo()
            .args(["test", "--workspace", "--exclude", "lb-ebpf"])
            .args(args),
    )
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Test { args } => test_suite(&args),
        Task::Bench { runs, calls } => {
            require_root("bench")?;
            setup()?;
            run(
                "benchmark",
                cargo()
                    .args([
                        "run",
                        "--release",
                        "-p",
                        "lb-tests",
                        "--bin",
                        "lb-bench",
                        "--",
                    ])
                    .args([
                        "--runs",
                        &runs.to_string(),
                        "--calls",
                        &calls.to_string(),
                        "--out",
                        "bench-results",
                    ]),
            )?;
            run(
                "update-latency benchmark",
                cargo().args([
                    "run",
                    "--release",
                    "-p",
                    "lb-tests",
                    "--bin",
                    "lb-bench-update",
                    "--",
                    "--out",
                    "bench-results",
                ]),
            )
        }
        Task::Lab { action } => {
            require_root("lab")?;
            if action != "down" {
                setup()?;
            }
            run(
                &format!("lab {action}"),
                cargo().args([
                    "run",
                    "--release",
                    "-q",
                    "-p",
                    "lb-tests",
                    "--bin",
                    "lb-lab",
                    "--",
                    &action,
                ]),
            )
        }
        Task::Demo => {
            require_root("demo")?;
            setup()?;
            run(
                "demo",
                cargo().args(["run", "--release", "-p", "lb-tests", "--bin", "lb-demo"]),
            )
        }
    }
}
