//! End to end, issue 25 item 1: full-size packets through IP-in-IP VIPs.
//!
//! The lab's links all have MTU 1500, so a client's full-size segment
//! (1500 bytes) no longer fits once the load balancer adds its outer
//! header. The real `lbd` must answer it with ICMP "fragmentation needed"
//! (IPv4) / ICMPv6 "packet too big" from the VIP; the client's kernel then
//! learns the smaller path MTU and the transfer completes.
//!
//! A real client (curl) uploads 1 MiB with POST and downloads 1 MiB with
//! GET through IP-in-IP VIPs, over IPv4 and IPv6, with the default MSS, to
//! a real HTTP server (nginx) on every backend (`xdp_decap` strips the
//! tunnel there). Checked: both transfers complete with the exact bytes;
//! the client's route cache shows the learned MTU (1480 / 1460); the
//! load balancer counted ICMP answers and no drop of any kind.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Output,
    time::Duration,
};

use lb_tests::{
    agent::{LabConfig, Lbd},
    lab::{Family, LabNet, LabOptions, N_BACKENDS, V4, V6},
    netns::NetNs,
    nginx::{self, Nginx},
    pins::PinDir,
};

/// The VIPs' port (the lab's own servers use 80 and 53).
const PORT: u16 = 8081;
/// Bytes moved each way.
const SIZE: usize = 1 << 20;
/// Bound of one curl transfer.
const CURL_TIMEOUT: Duration = Duration::from_secs(30);

/// Deterministic, not compressible, not all one byte.
fn body(seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32 ^ u32::from(seed);
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn url(vip: IpAddr, path: &str) -> String {
    match vip {
        IpAddr::V4(a) => format!("http://{a}:{PORT}{path}"),
        IpAddr::V6(a) => format!("http://[{a}]:{PORT}{path}"),
    }
}

fn curl(client: &NetNs, args: &[&str]) -> Output {
    let max = CURL_TIMEOUT.as_secs().to_string();
    client
        .command("curl")
        .args(["-sS", "--max-time", &max, "--connect-timeout", "5"])
        .args(args)
        .output()
        .expect("running curl (Debian package curl)")
}

/// The lbd metrics' `lb_packets_total` counters, by name.
fn counters(lb: &NetNs, port: u16) -> Vec<(String, u64)> {
    let out = lb
        .command("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("running curl for the metrics");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter_map(|l| l.strip_prefix("lb_packets_total{counter=\""))
        .filter_map(|l| {
            let (name, rest) = l.split_once("\"} ")?;
            Some((name.to_owned(), rest.trim().parse().ok()?))
        })
        .collect()
}

fn counter(all: &[(String, u64)], name: &str) -> u64 {
    all.iter().find(|(n, _)| n == name).map_or_else(
        || panic!("counter {name} missing from the metrics"),
        |c| c.1,
    )
}

/// The path MTU the client's kernel holds for `vip` (`ip route get`), if
/// it learned one.
fn learned_mtu(client: &NetNs, vip: IpAddr) -> Option<u32> {
    let fam = if vip.is_ipv6() { "-6" } else { "-4" };
    let out = client.ip(&[fam, "route", "get", &vip.to_string()]);
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok())
}

#[test]
fn full_size_uploads_and_downloads_through_ipip_vips() {
    if let Err(why) = nginx::binary() {
        panic!("{why}");
    }
    let prefix = "e2e-mtu";
    let pins = PinDir::new(prefix);
    let mut opts = LabOptions::test(prefix, pins.path());
    opts.ipip = true;
    let net = LabNet::build_with(opts, Some(pins));

    let mut lbd = Lbd::new(prefix);
    lbd.write_config(&config(&lbd, &net));
    lbd.start(&net.lb);

    // The download file, shared by every backend's nginx.
    let dir = std::env::temp_dir().join(format!("xlb-e2e-mtu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the test directory");
    let _cleanup = RemoveDir(&dir);
    let big = dir.join("big.bin");
    let down = body(1);
    std::fs::write(&big, &down).expect("writing the download file");
    let up_file = dir.join("up.bin");
    std::fs::write(&up_file, body(2)).expect("writing the upload file");
    let listen = [
        SocketAddr::new(V4.vip_ipip(), PORT),
        SocketAddr::new(V6.vip_ipip(), PORT),
    ];
    let servers: Vec<Nginx> = net
        .backends
        .iter()
        .map(|b| Nginx::start(b, b.name(), &listen, &big))
        .collect();

    let before = counters(&net.lb, lbd.metrics_port);
    let mut failures = Vec::new();
    for (fam, want_mtu) in [(V4, 1480), (V6, 1460)] {
        failures.extend(transfers(&net.client, fam, want_mtu, &dir, &up_file, &down));
    }
    let after = counters(&net.lb, lbd.metrics_port);
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    let icmp = delta("tx_icmp_too_big");
    if icmp == 0 {
        failures.push("no ICMP too-big answer was counted (tx_icmp_too_big)".into());
    }
    // Nothing may vanish: every drop counter stays where it was.
    for (name, _) in after.iter().filter(|(n, _)| n.starts_with("drop_")) {
        let d = delta(name);
        if d != 0 {
            failures.push(format!("{name} rose by {d}"));
        }
    }
    let logs: Vec<String> = servers.iter().map(Nginx::error_log).collect();
    drop(servers);
    assert!(
        failures.is_empty(),
        "{} problem(s):\n  {}\ncounters after: {after:?}\nnginx error logs: {logs:?}\nlbd log:\n{}",
        failures.len(),
        failures.join("\n  "),
        lbd.log()
    );
    eprintln!(
        "1 MiB up and down through IP-in-IP over IPv4 and IPv6: ok; ICMP too-big answers sent: {icmp}"
    );
}

/// lbd's config: the lab's (with its IP-in-IP VIPs) plus two IP-in-IP web
/// VIPs on PORT over the three backends (same address, protocol, mode and
/// backends as the lab's port-80 IP-in-IP VIPs, as the fragment rule
/// requires).
fn config(lbd: &Lbd, net: &LabNet) -> String {
    let mut config = lbd.lab_config(
        net,
        &LabConfig {
            ipip: true,
            ..LabConfig::default()
        },
    );
    for (name, fam) in [("big4", V4), ("big6", V6)] {
        let _ = write!(
            config,
            "[[vip]]\nname = \"{name}\"\naddress = \"{}\"\nport = {PORT}\nprotocol = \"tcp\"\nmode = \"ipip\"\n\n",
            fam.vip_ipip()
        );
        for i in 1..=N_BACKENDS {
            let _ = write!(
                config,
                "[[vip.backend]]\naddress = \"{}\"\n\n",
                fam.backend(i)
            );
        }
    }
    config
}

/// Uploads and downloads through `fam`'s IP-in-IP VIP from `client`;
/// returns what went wrong.
fn transfers(
    client: &NetNs,
    fam: Family,
    want_mtu: u32,
    dir: &Path,
    up_file: &Path,
    down: &[u8],
) -> Vec<String> {
    let mut failures = Vec::new();
    let vip = fam.vip_ipip();
    assert_eq!(
        learned_mtu(client, vip),
        None,
        "precondition: the client has no path MTU for {vip} yet"
    );
    // Upload: POST 1 MiB; the server answers once it has read it all.
    let out = curl(
        client,
        &[
            "--data-binary",
            &format!("@{}", up_file.display()),
            "-H",
            "Content-Type: application/octet-stream",
            &url(vip, "/upload"),
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || said.trim() != format!("received {SIZE} bytes") {
        failures.push(format!(
            "{} upload: curl {} said {:?}, stderr {}",
            fam.label(),
            out.status,
            said.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // The client learned the tunnel's MTU from our ICMP answers.
    let mtu = learned_mtu(client, vip);
    if mtu != Some(want_mtu) {
        failures.push(format!(
            "{}: the client's route to {vip} has path MTU {mtu:?}, want {want_mtu}",
            fam.label()
        ));
    }
    // Download: GET 1 MiB, byte for byte.
    let got = dir.join(format!("down-{}.bin", fam.label()));
    let out = curl(
        client,
        &["-o", got.to_str().expect("path"), &url(vip, "/big.bin")],
    );
    let same = std::fs::read(&got).is_ok_and(|b| b == down);
    if !out.status.success() || !same {
        failures.push(format!(
            "{} download: curl {}, content {}; stderr {}",
            fam.label(),
            out.status,
            if same { "equal" } else { "differs" },
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    failures
}

/// Removes a directory on drop (also on panic).
struct RemoveDir<'a>(&'a Path);

impl Drop for RemoveDir<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}
