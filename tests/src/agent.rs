//! Running the real `lbd` and `lbctl` binaries against a [`LabNet`]: a
//! private directory (config, socket, state, log) and bpffs pin directory
//! per harness, `lbd` started inside the LB namespace, and a lab config
//! generator. Everything is removed when the harness drops (also on panic):
//! `lbd` is stopped, the pins (and so the XDP link) are removed.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use lb_userspace::control::StatusReport;

use crate::{
    lab::{
        IPIP_SOURCE_V4, IPIP_SOURCE_V6, LabNet, N_BACKENDS, TCP_PORT, UDP_PORT, V4, V6,
        VIP_IPIP_V4, VIP_IPIP_V6,
    },
    netns::{NetNs, fmt_mac},
    pins::PinDir,
    scenario::{SEED, VIP_V4, VIP_V6},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Time `lbd` gets to come up (load, verify, attach, first apply).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time `lbd` gets to stop after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of a binary of the workspace (`lbd`, `lbctl`), built once per test
/// process so the tests never run a stale one.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test> or target/<profile>/<bin> → target/<profile>
        let mut dir = exe
            .parent()
            .expect("executable has a directory")
            .to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "lb-userspace", "--bins"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build for lbd/lbctl");
        assert!(st.success(), "building lbd/lbctl failed");
        dir
    });
    dir.join(name)
}

/// How the lab config is shaped.
#[derive(Clone, Debug)]
pub struct LabConfig {
    pub weights: [u32; N_BACKENDS as usize],
    /// Health probe interval, in milliseconds (timeout is half of it).
    pub interval_ms: u64,
    pub rise: u32,
    pub fall: u32,
    pub max_unhealthy_share: f64,
    pub min_approvals: u32,
    /// Extra `[policy]` lines.
    pub policy_extra: String,
    /// Also the IP-in-IP VIPs (web4-ipip, dns4-ipip, web6-ipip, dns6-ipip);
    /// the lab must be built with `ipip`.
    pub ipip: bool,
    /// Backends listed per VIP (the first N of the lab's three).
    pub backends: u8,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            weights: [100; N_BACKENDS as usize],
            interval_ms: 200,
            rise: 2,
            fall: 3,
            max_unhealthy_share: 0.5,
            min_approvals: 0,
            policy_extra: String::new(),
            ipip: false,
            backends: N_BACKENDS,
        }
    }
}

/// Where an `lbd` keeps its files.
#[derive(Clone, Debug)]
pub struct LbdFiles {
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub metrics_port: u16,
}

/// The lab's config: DSR VIPs web4/web6 (TCP :80, HTTP health checks) and
/// dns4/dns6 (UDP :53, UDP health checks) over the three backends (MACs
/// `macs`), and with `c.ipip` the same four again over IP-in-IP.
pub fn lab_config(files: &LbdFiles, macs: &[crate::netns::Mac], c: &LabConfig) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# lab config\n[agent]\ninterface = \"eth0\"\nxdp_mode = \"driver\"\ncontrol_socket = \"{}\"\nmetrics_address = \"127.0.0.1:{}\"\nhash_seed = {SEED}\npin_dir = \"{}\"\nstate_dir = \"{}\"\nipip_source_v4 = \"{IPIP_SOURCE_V4}\"\nipip_source_v6 = \"{IPIP_SOURCE_V6}\"\n",
        files.socket.display(),
        files.metrics_port,
        files.pin_dir.display(),
        files.state_dir.display()
    );
    let _ = writeln!(
        t,
        "[policy]\nmin_backends = 1\nmin_approvals = {}\nmax_unhealthy_share = {}\n{}",
        c.min_approvals, c.max_unhealthy_share, c.policy_extra
    );
    let health = |kind: &str| {
        let probe = match kind {
            "http" => "kind = \"http\", path = \"/\", expect_status = 200".to_owned(),
            _ => "kind = \"udp\", send = \"health?\", expect = \"backend\"".to_owned(),
        };
        format!(
            "{{ {probe}, interval = \"{}ms\", timeout = \"{}ms\", rise = {}, fall = {} }}",
            c.interval_ms,
            c.interval_ms / 2,
            c.rise,
            c.fall
        )
    };
    let mut vips = vec![
        ("web4", IpAddr::V4(VIP_V4), TCP_PORT, "tcp", "http", "dsr"),
        ("dns4", IpAddr::V4(VIP_V4), UDP_PORT, "udp", "udp", "dsr"),
        ("web6", IpAddr::V6(VIP_V6), TCP_PORT, "tcp", "http", "dsr"),
        ("dns6", IpAddr::V6(VIP_V6), UDP_PORT, "udp", "udp", "dsr"),
    ];
    if c.ipip {
        vips.extend([
            (
                "web4-ipip",
                IpAddr::V4(VIP_IPIP_V4),
                TCP_PORT,
                "tcp",
                "http",
                "ipip",
            ),
            (
                "dns4-ipip",
                IpAddr::V4(VIP_IPIP_V4),
                UDP_PORT,
                "udp",
                "udp",
                "ipip",
            ),
            (
                "web6-ipip",
                IpAddr::V6(VIP_IPIP_V6),
                TCP_PORT,
                "tcp",
                "http",
                "ipip",
            ),
            (
                "dns6-ipip",
                IpAddr::V6(VIP_IPIP_V6),
                UDP_PORT,
                "udp",
                "udp",
                "ipip",
            ),
        ]);
    }
    for (name, addr, port, proto, kind, mode) in vips {
        let fam = if addr.is_ipv6() { V6 } else { V4 };
        let _ = writeln!(
            t,
            "[[vip]]\nname = \"{name}\"\naddress = \"{addr}\"\nport = {port}\nprotocol = \"{proto}\"\nmode = \"{mode}\"\nhealth = {}\n",
            health(kind)
        );
        for i in 1..=c.backends.min(N_BACKENDS) {
            let mac = if mode == "dsr" {
                format!("mac = \"{}\"\n", fmt_mac(macs[usize::from(i - 1)]))
            } else {
                String::new()
            };
            let _ = writeln!(
                t,
                "[[vip.backend]]\naddress = \"{}\"\nweight = {}\n{mac}",
                fam.backend(i),
                c.weights[usize::from(i - 1)],
            );
        }
    }
    t
}

/// One `lbd` with its own files.
pub struct Lbd {
    pub dir: PathBuf,
    pub pins: PinDir,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    pub metrics_port: u16,
    child: Option<Child>,
}

impl Lbd {
    /// Files under `/tmp/PREFIX-PID-N/`, pins under `/sys/fs/bpf/PREFIX-PID-N`.
    pub fn new(prefix: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the harness directory");
        Self {
            config_path: dir.join("lbd.toml"),
            socket: dir.join("lbd.sock"),
            log_path: dir.join("lbd.log"),
            pins: PinDir::new(prefix),
            metrics_port: 9645,
            dir,
            child: None,
        }
    }

    /// The lab's config for this harness's files (see [`lab_config`]).
    pub fn lab_config(&self, net: &LabNet, c: &LabConfig) -> String {
        lab_config(
            &LbdFiles {
                socket: self.socket.clone(),
                pin_dir: self.pins.path().to_path_buf(),
                state_dir: self.dir.join("state"),
                metrics_port: self.metrics_port,
            },
            &net.backend_macs,
            c,
        )
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("writing the config");
    }

    pub fn read_config(&self) -> String {
        std::fs::read_to_string(&self.config_path).expect("reading the config")
    }

    /// Starts `lbd` inside `ns` and waits until it answers `status`.
    pub fn start(&mut self, ns: &NetNs) {
        self.start_with_env(ns, &[]);
    }

    /// `start` with extra environment variables (e.g. systemd's
    /// `NOTIFY_SOCKET`).
    pub fn start_with_env(&mut self, ns: &NetNs, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "lbd already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the lbd log");
        let child = ns
            .command(bin("lbd"))
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "LBD_LOG",
                std::env::var("LBD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawning lbd");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("lbd exited at start ({st}); log:\n{}", self.log());
            }
            if self.socket.exists() && self.lbctl(&["status"]).status.success() {
                return;
            }
            assert!(
                t0.elapsed() < START_TIMEOUT,
                "lbd did not answer within {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `lbd` and expects it to fail; returns its exit code and log.
    pub fn start_expect_failure(&mut self, ns: &NetNs) -> (i32, String) {
        let out = ns
            .command(bin("lbd"))
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .output()
            .expect("running lbd");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Sends SIGTERM and waits; returns how long the stop took.
    pub fn stop(&mut self) -> Duration {
        let Some(mut child) = self.child.take() else {
            return Duration::ZERO;
        };
        let t0 = Instant::now();
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return t0.elapsed();
            }
            if t0.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "lbd did not stop within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the running lbd.
    pub fn signal(&self, sig: i32) {
        let child = self.child.as_ref().expect("lbd running");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id().cast_signed(), sig) };
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Runs `lbctl --socket SOCK args...`.
    pub fn lbctl(&self, args: &[&str]) -> Output {
        Command::new(bin("lbctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running lbctl")
    }

    /// `lbctl ARGS` that must succeed; returns stdout.
    pub fn lbctl_ok(&self, args: &[&str]) -> String {
        let out = self.lbctl(args);
        assert!(
            out.status.success(),
            "lbctl {args:?} failed ({}): {}{}\nlbd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `lbctl status -o json`, decoded.
    pub fn status(&self) -> StatusReport {
        let out = self.lbctl_ok(&["status", "-o", "json"]);
        let resp: lb_userspace::control::Response =
            serde_json::from_str(&out).expect("status JSON");
        serde_json::from_value(resp.data).expect("status report")
    }

    /// Polls `cond` on the status until it holds or `timeout` passes;
    /// returns the time it took, or panics with the last status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&StatusReport) -> bool,
    ) -> Duration {
        let t0 = Instant::now();
        loop {
            let st = self.status();
            if cond(&st) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < timeout,
                "{what}: not reached within {timeout:?}; status: {st:#?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id().cast_signed(), libc::SIGTERM) };
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < STOP_TIMEOUT {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // `pins` drops next: removing the link pin detaches the program.
    }
}
