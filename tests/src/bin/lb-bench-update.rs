//! Update latency: how long a config change takes to be live in the
//! kernel, measured on the real maps. Writes `update.json` and `update.md`
//! into `--out` (default `bench-results`).
//!
//! Library level (plan + write, the data path's part): a full config of
//! 100 VIPs × 100 backends (65537-slot tables) from empty; one backend's
//! weight changed on one VIP of it; one backend removed and added back.
//! A change is timed from the start of planning to the moment the VIP
//! entry was switched to the new table (`Applied::live_at`: from then on
//! every CPU uses it); the whole `apply` call, which then waits an RCU
//! grace period before deactivating departed backends, is reported too.
//!
//! Agent level (end to end): `lbd` running in a private namespace with the
//! same 100 × 100 config, `lbctl backend set-weight` timed from the command
//! start to its answer (process start, control socket, config edit and
//! validation, plan, map writes, file write-back), and the agent's own
//! figures for request → live and request → recorded.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use lb_tests::{
    agent::{Lbd, bin},
    netns::{self, NetNs},
};
use lb_userspace::{
    control::{ChangeReport, Response},
    datapath::{Datapath, LoadOptions},
    model::{
        BackendSpec, BackendState, DataplaneSpec, ForwardingMode, HashMode, MacAddr, Protocol,
        VipSpec,
    },
    plan::{self, IdAllocator},
};

const VIPS: u32 = 100;
const BACKENDS: u32 = 100;
const TABLE: u32 = 65537;

fn vip_addr(v: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100 + (v / 250) as u8, (v % 250) as u8 + 1)
}

fn backend_addr(v: u32, b: u32) -> Ipv4Addr {
    let n = v * BACKENDS + b;
    Ipv4Addr::new(198, 19, (n / 250) as u8, (n % 250) as u8 + 1)
}

fn mac(v: u32, b: u32) -> MacAddr {
    let n = v * BACKENDS + b;
    MacAddr([0x02, 0xbe, 0, (n >> 16) as u8, (n >> 8) as u8, n as u8])
}

fn spec() -> DataplaneSpec {
    DataplaneSpec {
        hash_seed: 7,
        ipip_source_v4: None,
        ipip_source_v6: None,
        ipip_mtu: lb_common::DEFAULT_IPIP_MTU,
        generation: 1,
        vips: (0..VIPS)
            .map(|v| VipSpec {
                address: IpAddr::V4(vip_addr(v)),
                port: 80,
                protocol: Protocol::Tcp,
                mode: ForwardingMode::Dsr,
                hash: HashMode::FiveTuple,
                table_size: TABLE,
                backends: (0..BACKENDS)
                    .map(|b| BackendSpec {
                        address: IpAddr::V4(backend_addr(v, b)),
                        weight: 100,
                        mac: Some(mac(v, b)),
                        state: BackendState::Active,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Milliseconds of each measurement.
#[allow(clippy::struct_field_names)]
struct Figures {
    full_plan_ms: f64,
    full_apply_ms: f64,
    weight_ms: Vec<f64>,
    remove_ms: Vec<f64>,
    add_ms: Vec<f64>,
    /// Whole `apply` calls of the changes above (they return after the
    /// grace period that follows the switch).
    returned_ms: Vec<f64>,
    cli_ms: Vec<f64>,
    agent_ms: Vec<f64>,
    agent_total_ms: Vec<f64>,
}

/// Plans `s` after `cur` and applies it; records plan start → live, and
/// the whole call.
fn change(dp: &mut Datapath, s: &DataplaneSpec, cur: &mut plan::MapPlan, f: &mut Figures) -> f64 {
    let t = Instant::now();
    let next = plan::plan_next(s, cur).expect("plan");
    let applied = dp.apply(&next).expect("apply");
    f.returned_ms.push(ms(t));
    *cur = next;
    applied.live_at.duration_since(t).as_secs_f64() * 1e3
}

fn library(f: &mut Figures) {
    let mut dp = Datapath::load(LoadOptions::default()).expect("load xdp_lb (run as root)");
    let mut s = spec();
    let t = Instant::now();
    let mut cur = plan::plan(&s, &IdAllocator::default()).expect("plan");
    f.full_plan_ms = ms(t);
    let t = Instant::now();
    dp.apply(&cur).expect("apply");
    f.full_apply_ms = ms(t);
    for i in 0..20u32 {
        s.vips[42].backends[7].weight = 100 + 50 * (i % 2 + 1);
        s.generation += 1;
        let live = change(&mut dp, &s, &mut cur, f);
        f.weight_ms.push(live);
    }
    for _ in 0..10 {
        let gone = s.vips[17].backends.pop().expect("a backend");
        s.generation += 1;
        let live = change(&mut dp, &s, &mut cur, f);
        f.remove_ms.push(live);
        s.vips[17].backends.push(gone);
        s.generation += 1;
        let live = change(&mut dp, &s, &mut cur, f);
        f.add_ms.push(live);
    }
    assert!(dp.verify(&cur).expect("verify").is_empty());
}

fn config_text(lbd: &Lbd) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "[agent]\ninterface = \"eth0\"\nxdp_mode = \"generic\"\ncontrol_socket = \"{}\"\nmetrics_address = \"127.0.0.1:9645\"\nhash_seed = 7\npin_dir = \"{}\"\nstate_dir = \"{}\"\n\n[policy]\nmin_approvals = 0\n",
        lbd.socket.display(),
        lbd.pins.path().display(),
        lbd.dir.join("state").display()
    );
    for v in 0..VIPS {
        let _ = writeln!(
            t,
            "[[vip]]\nname = \"vip{v}\"\naddress = \"{}\"\nport = 80\nprotocol = \"tcp\"\n",
            vip_addr(v)
        );
        for b in 0..BACKENDS {
            let _ = writeln!(
                t,
                "[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\n",
                backend_addr(v, b),
                mac(v, b)
            );
        }
    }
    t
}

fn agent(f: &mut Figures) {
    let lb = NetNs::new("lbbench-lb");
    let peer = NetNs::new("lbbench-peer");
    netns::veth(&lb, "eth0", &peer, "eth0");
    lb.ip(&["link", "set", "eth0", "up"]);
    let mut lbd = Lbd::new("lbbench");
    lbd.write_config(&config_text(&lbd));
    lbd.start(&lb);
    let lbctl = bin("lbctl");
    for i in 0..10u32 {
        let weight = (150 + 50 * (i % 2)).to_string();
        let t = Instant::now();
        let out = std::process::Command::new(&lbctl)
            .arg("--socket")
            .arg(&lbd.socket)
            .args(["-o", "json", "backend", "set-weight", "vip42"])
            .arg(backend_addr(42, 7).to_string())
            .arg(&weight)
            .output()
            .expect("lbctl");
        f.cli_ms.push(ms(t));
        assert!(
            out.status.success(),
            "lbctl set-weight failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            lbd.log()
        );
        let resp: Response = serde_json::from_slice(&out.stdout).expect("json");
        let report: ChangeReport = serde_json::from_value(resp.data).expect("report");
        f.agent_ms.push(report.live_ms);
        f.agent_total_ms.push(report.apply_ms);
    }
    if std::env::var_os("LB_BENCH_LOG").is_some() {
        eprintln!("{}", lbd.log());
    }
    lbd.stop();
}

fn main() {
    let mut out = PathBuf::from("bench-results");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--out" {
            out = PathBuf::from(args.next().expect("--out takes a directory"));
        } else {
            eprintln!("usage: lb-bench-update [--out DIR]");
            std::process::exit(64);
        }
    }
    let mut f = Figures {
        full_plan_ms: 0.0,
        full_apply_ms: 0.0,
        weight_ms: Vec::new(),
        remove_ms: Vec::new(),
        add_ms: Vec::new(),
        returned_ms: Vec::new(),
        cli_ms: Vec::new(),
        agent_ms: Vec::new(),
        agent_total_ms: Vec::new(),
    };
    library(&mut f);
    agent(&mut f);
    let full = f.full_plan_ms + f.full_apply_ms;
    let rows = [
        (
            "weight change, one VIP: plan + write → live",
            &mut f.weight_ms,
            Some(20.0),
        ),
        (
            "backend removed, one VIP: plan + write → live",
            &mut f.remove_ms,
            Some(20.0),
        ),
        (
            "backend added, one VIP: plan + write → live",
            &mut f.add_ms,
            Some(20.0),
        ),
        (
            "the changes above: apply returns (+ RCU grace period, then departed backends deactivated)",
            &mut f.returned_ms,
            None,
        ),
        (
            "agent: request → live (edit, validate, plan, policy, maps written)",
            &mut f.agent_ms,
            Some(20.0),
        ),
        (
            "agent: request → recorded (+ state, history, config file fsynced)",
            &mut f.agent_total_ms,
            None,
        ),
        (
            "lbctl set-weight, wall clock (process + socket + agent)",
            &mut f.cli_ms,
            None,
        ),
    ];
    let mut md = format!(
        "# Update latency\n\n{VIPS} VIPs × {BACKENDS} backends, {TABLE}-slot tables, IPv4 DSR.\n\n| change | median ms | max ms | target | met |\n|---|---:|---:|---:|:-:|\n| full config from empty (plan {:.0} ms + write {:.0} ms) | {full:.0} | – | < 1000 ms | {} |\n",
        f.full_plan_ms,
        f.full_apply_ms,
        if full < 1000.0 { "yes" } else { "**no**" }
    );
    let mut json_rows = Vec::new();
    for (name, v, target) in rows {
        let (med, mx) = (median(v), max(v));
        let _ = writeln!(
            md,
            "| {name} | {med:.2} | {mx:.2} | {} | {} |",
            target.map_or("–".into(), |t| format!("< {t} ms")),
            target.map_or("–", |t| if med < t { "yes" } else { "**no**" })
        );
        json_rows.push(
            serde_json::json!({"change": name, "median_ms": med, "max_ms": mx, "samples": v.len()}),
        );
    }
    let json = serde_json::json!({
        "vips": VIPS, "backends_per_vip": BACKENDS, "table_size": TABLE,
        "full_config": {"plan_ms": f.full_plan_ms, "write_ms": f.full_apply_ms, "total_ms": full},
        "changes": json_rows,
    });
    std::fs::create_dir_all(&out).expect("creating the output directory");
    std::fs::write(out.join("update.md"), &md).expect("writing update.md");
    std::fs::write(
        out.join("update.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("writing update.json");
    print!("{md}");
}
