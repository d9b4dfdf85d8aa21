//! lbd under systemd: the shipped unit passes `systemd-analyze verify`, and
//! the real lbd speaks the sd_notify protocol to a real `NOTIFY_SOCKET`:
//! READY=1 only once the data path is attached and verified, watchdog pings
//! at half of `WATCHDOG_USEC`, RELOADING=1 … READY=1 around a SIGHUP, and
//! STOPPING=1 on SIGTERM.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{LabConfig, Lbd, bin},
    lab::LabNet,
};

/// The unit as shipped, with the binaries' paths pointed at this build
/// (systemd-analyze checks that ExecStart and friends are executable).
#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/lbd.service"
    ))
    .expect("read deploy/systemd/lbd.service");
    assert!(
        unit.contains("Type=notify") && unit.contains("WatchdogSec="),
        "{unit}"
    );
    let unit = unit
        .replace("/usr/bin/lbd ", &format!("{} ", bin("lbd").display()))
        .replace("/usr/bin/lbctl ", &format!("{} ", bin("lbctl").display()));
    let dir = std::env::temp_dir().join(format!("xlb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lbd.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze (Debian systemd, installed by scripts/setup.sh)");
    let _ = std::fs::remove_dir_all(&dir);
    // Unknown keys are only warnings (exit 0): any output is a failure.
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Receives notifications until one satisfies `want` or `limit` passes.
fn wait_for(sock: &UnixDatagram, limit: Duration, want: impl Fn(&str) -> bool) -> Vec<String> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = want(&msg);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no matching notification within {limit:?}; got {seen:#?}");
}

fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

#[test]
fn lbd_speaks_sd_notify() {
    let net = LabNet::build("lbd-sd");
    let mut lbd = Lbd::new("lbd-sd");
    lbd.write_config(&lbd.lab_config(&net, &LabConfig::default()));
    let sock_path = lbd.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    let sock_str = sock_path.to_str().unwrap().to_owned();
    lbd.start_with_env(
        &net.lb,
        &[("NOTIFY_SOCKET", &sock_str), ("WATCHDOG_USEC", "400000")],
    );

    let seen = wait_for(&sock, Duration::from_secs(30), |m| has(m, "READY=1"));
    let ready = seen.last().unwrap();
    assert!(
        seen[..seen.len() - 1].iter().all(|m| !has(m, "READY=1")),
        "{seen:#?}"
    );
    assert!(
        ready.contains("STATUS=forwarding generation 1 on eth0; maps verified"),
        "{ready}"
    );
    let st = lbd.status();
    assert_ne!(st.attach_mode, "detached", "{st:#?}");
    assert!(st.verify_diffs.is_empty(), "{:?}", st.verify_diffs);
    assert_eq!(st.generation, st.live_generation);

    // Watchdog: every 200 ms; at least 5 in 1.5 s.
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        let seen = wait_for(&sock, Duration::from_secs(2), |m| has(m, "WATCHDOG=1"));
        pings += seen.iter().filter(|m| has(m, "WATCHDOG=1")).count();
    }
    assert!(pings >= 5, "{pings} watchdog pings in 1.5 s");

    // SIGHUP: RELOADING=1 with the monotonic time, then READY=1 again.
    lbd.signal(libc::SIGHUP);
    let seen = wait_for(&sock, Duration::from_secs(10), |m| has(m, "RELOADING=1"));
    let reloading = seen.last().unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    wait_for(&sock, Duration::from_secs(10), |m| has(m, "READY=1"));

    // SIGTERM: STOPPING=1.
    lbd.stop();
    wait_for(&sock, Duration::from_secs(5), |m| has(m, "STOPPING=1"));
    // The log went to a file, not a terminal: no colour codes for journald.
    let log = lbd.log();
    assert!(log.contains("INFO") && !log.contains('\x1b'), "{log}");
    assert!(!Path::new(&sock_path).exists() || std::fs::remove_file(&sock_path).is_ok());
}
