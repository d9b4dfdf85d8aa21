//! How `lbctl status` and `lbctl stats` show the agent's reports.

use lb_userspace::control::{StatsReport, StatusReport};

pub fn render_status(s: &StatusReport) -> String {
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

pub fn render_stats(s: &StatsReport) -> String {
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
