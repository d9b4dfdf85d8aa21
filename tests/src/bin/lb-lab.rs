//! `cargo xtask lab up|down|status`: the built-in lab, left running.
//!
//! Namespaces `xlb-sw` (the switch: a bridge), `xlb-c1`, `xlb-c2` (clients),
//! `xlb-lb` (the load balancer, running `lbd` with XDP on eth0) and
//! `xlb-b1`..`xlb-b3` (backends: an HTTP server and a UDP echo that answer
//! with their name, the VIPs on `lo` with ARP/ND suppressed for DSR, and
//! `xdp_decap` for IP-in-IP). Everything lives inside those namespaces:
//! 198.18.0.0/15 and 2001:db8::/32, nothing in the root namespace. Files
//! (config, socket, state, logs, pids) are under /run/xlb-lab, pins under
//! /sys/fs/bpf/xlb-lab. `down` removes everything, also after a crash.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{LabConfig, LbdFiles, bin, lab_config},
    lab::{LabNet, LabOptions, N_BACKENDS, V4, V6, backend_name, serve_process},
    netns::fmt_mac,
};

const PREFIX: &str = "xlb";
const RUN: &str = "/run/xlb-lab";
const PINS: &str = "/sys/fs/bpf/xlb-lab";

fn run_dir() -> PathBuf {
    PathBuf::from(RUN)
}

fn socket() -> PathBuf {
    run_dir().join("lbd.sock")
}

fn namespaces() -> Vec<String> {
    lb_tests::netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .collect()
}

fn kill_pid(pid: i32, sig: i32) {
    // SAFETY: kill with a pid read from our own pid files or `ip netns pids`.
    unsafe { libc::kill(pid, sig) };
}

fn down() -> ExitCode {
    // Processes we started, then anything else left in our namespaces.
    if let Ok(entries) = std::fs::read_dir(run_dir()) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "pid")
                && let Ok(pid) = std::fs::read_to_string(e.path())
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                kill_pid(pid, libc::SIGTERM);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for ns in namespaces() {
        let out = Command::new("ip").args(["netns", "pids", &ns]).output();
        if let Ok(out) = out {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    kill_pid(pid, libc::SIGKILL);
                }
            }
        }
    }
    for ns in namespaces() {
        let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
    }
    let _ = std::fs::remove_dir_all(PINS);
    let _ = std::fs::remove_dir_all(RUN);
    let left = namespaces();
    if left.is_empty() {
        println!("lab down: no xlb-* namespaces, pins or files left");
        ExitCode::SUCCESS
    } else {
        eprintln!("lab down: could not remove {left:?}");
        ExitCode::FAILURE
    }
}

/// Starts `program args` inside `ns` as a process of its own session, with
/// output to `log`; records its pid as `name.pid`. Not waited for: it
/// outlives this command (init reaps it).
#[allow(clippy::zombie_processes)]
fn spawn_in(ns: &lb_tests::netns::NetNs, name: &str, program: &Path, args: &[String]) -> i32 {
    use std::os::unix::process::CommandExt as _;
    let log = std::fs::File::create(run_dir().join(format!("{name}.log"))).expect("log file");
    let mut cmd = ns.command(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child leaves our session so
    // it outlives this command.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let pid = child.id().cast_signed();
    std::fs::write(run_dir().join(format!("{name}.pid")), pid.to_string()).expect("pid file");
    pid
}

fn up() -> ExitCode {
    if !namespaces().is_empty() {
        println!("lab: removing the previous lab first");
        let _ = down();
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(run_dir()).expect("creating /run/xlb-lab");
    let mut net = LabNet::build_with(
        LabOptions {
            prefix: PREFIX.into(),
            persistent: true,
            clients: 2,
            ipip: true,
            thread_servers: false,
            pin_dir: PathBuf::from(PINS).join("lab"),
        },
        None,
    );
    net.keep();
    let me = std::env::current_exe().expect("current_exe");
    for i in 1..=N_BACKENDS {
        let args = vec![
            "serve".to_owned(),
            backend_name(i),
            V4.backend(i).to_string(),
            V6.backend(i).to_string(),
        ];
        spawn_in(
            &net.backends[usize::from(i - 1)],
            &backend_name(i),
            &me,
            &args,
        );
    }
    let files = LbdFiles {
        socket: socket(),
        pin_dir: PathBuf::from(PINS).join("lbd"),
        state_dir: run_dir().join("state"),
        metrics_port: 9645,
    };
    let config = lab_config(
        &files,
        &net.backend_macs,
        &LabConfig {
            weights: [100, 200, 300],
            interval_ms: 500,
            ipip: true,
            ..LabConfig::default()
        },
    );
    let config_path = run_dir().join("lbd.toml");
    std::fs::write(&config_path, config).expect("writing the lab config");
    spawn_in(
        &net.lb,
        "lbd",
        &bin("lbd"),
        &["--config".into(), config_path.display().to_string()],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lbctl(&["status"]).is_ok_and(|o| o.status.success()) {
        if Instant::now() > deadline {
            eprintln!(
                "lab: lbd did not come up; its log:\n{}",
                std::fs::read_to_string(run_dir().join("lbd.log")).unwrap_or_default()
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("lab up in {:.1} s", t0.elapsed().as_secs_f64());
    println!("  namespaces: {}", net.names().join(" "));
    println!(
        "  LB {} / {} (mac {}), lbd config {}",
        V4.lb(),
        V6.lb(),
        fmt_mac(net.lb_mac),
        config_path.display()
    );
    println!(
        "  VIPs: DSR 198.18.0.10 and [2001:db8::10], IP-in-IP 198.18.0.20 and [2001:db8::20]; TCP :80 (HTTP), UDP :53; weights 1:2:3"
    );
    println!("  try:  ip netns exec xlb-c1 curl -s http://198.18.0.10/");
    println!("        lbctl --socket {} status", socket().display());
    println!("  stop: cargo xtask lab down");
    ExitCode::SUCCESS
}

fn lbctl(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(bin("lbctl"))
        .arg("--socket")
        .arg(socket())
        .args(args)
        .stdin(Stdio::null())
        .output()
}

fn status() -> ExitCode {
    let ns = namespaces();
    if ns.is_empty() {
        println!("lab: down (no xlb-* namespaces)");
        return ExitCode::SUCCESS;
    }
    println!("namespaces: {}", ns.join(" "));
    if let Ok(entries) = std::fs::read_dir(run_dir()) {
        let mut procs: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .map(|e| {
                let name = e
                    .path()
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let pid = std::fs::read_to_string(e.path()).unwrap_or_default();
                let alive = Path::new(&format!("/proc/{}", pid.trim())).exists();
                format!(
                    "{name} (pid {}, {})",
                    pid.trim(),
                    if alive { "running" } else { "DEAD" }
                )
            })
            .collect();
        procs.sort();
        println!("processes: {}", procs.join(", "));
    }
    match lbctl(&["status"]) {
        Ok(o) if o.status.success() => {
            print!("{}", String::from_utf8_lossy(&o.stdout));
            ExitCode::SUCCESS
        }
        Ok(o) => {
            eprintln!(
                "lbctl status failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("lbctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("up") => up(),
        Some("down") => down(),
        Some("status") => status(),
        Some("serve") if args.len() >= 2 => {
            let own: Vec<IpAddr> = args[2..].iter().filter_map(|a| a.parse().ok()).collect();
            serve_process(&args[1], &own);
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: lb-lab up|down|status");
            ExitCode::from(64)
        }
    }
}
