//! Prometheus text exposition of the agent's state and the data path's
//! counters (`GET /metrics` on the metrics address).

use std::fmt::Write as _;

use crate::control::{StatsReport, StatusReport};

/// Renders one backend's value of a gauge family.
type Value = fn(&crate::control::BackendStatus) -> String;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric.
#[expect(clippy::too_many_lines, reason = "one metric family after another")]
pub fn render(status: &StatusReport, traffic: &StatsReport) -> String {
    let mut o = String::new();
    header(
        &mut o,
        "lb_config_generation",
        "gauge",
        "Generation of the config the agent applied last.",
    );
    let _ = writeln!(o, "lb_config_generation {}", status.generation);
    header(
        &mut o,
        "lb_datapath_generation",
        "gauge",
        "Generation the data path's config map carries (must equal lb_config_generation).",
    );
    let _ = writeln!(o, "lb_datapath_generation {}", status.live_generation);
    header(
        &mut o,
        "lb_datapath_verify_differences",
        "gauge",
        "Differences between the kernel maps and the applied plan (0 = accurate).",
    );
    let _ = writeln!(
        o,
        "lb_datapath_verify_differences {}",
        status.verify_diffs.len()
    );
    header(
        &mut o,
        "lb_datapath_attached",
        "gauge",
        "1 while the XDP program is attached.",
    );
    let _ = writeln!(
        o,
        "lb_datapath_attached{{interface=\"{}\",mode=\"{}\"}} {}",
        esc(&status.interface),
        esc(&status.attach_mode),
        u8::from(status.attach_mode != "detached")
    );
    header(
        &mut o,
        "lb_guard_rollbacks_total",
        "counter",
        "Changes the guard rolled back since the agent started.",
    );
    let _ = writeln!(o, "lb_guard_rollbacks_total {}", status.guard_rollbacks);
    if let Some(c) = &status.last_change {
        header(
            &mut o,
            "lb_last_change_info",
            "gauge",
            "The last config change in the history: its generation, kind and actor (value 1).",
        );
        let _ = writeln!(
            o,
            "lb_last_change_info{{generation=\"{}\",kind=\"{}\",actor=\"{}\"}} 1",
            c.generation,
            esc(&c.kind),
            esc(&c.actor)
        );
        header(
            &mut o,
            "lb_last_change_timestamp_seconds",
            "gauge",
            "When the last config change was recorded (Unix time).",
        );
        let _ = writeln!(o, "lb_last_change_timestamp_seconds {}", c.at_unix);
    }
    header(
        &mut o,
        "lb_packets_total",
        "counter",
        "Packets by outcome or reason (see README, counters).",
    );
    for (name, v) in &traffic.counters {
        let _ = writeln!(o, "lb_packets_total{{counter=\"{}\"}} {v}", esc(name));
    }
    header(
        &mut o,
        "lb_vip_valve_tripped",
        "gauge",
        "1 while the health safety valve keeps a VIP's last healthy set.",
    );
    for v in &status.vips {
        let _ = writeln!(
            o,
            "lb_vip_valve_tripped{{vip=\"{}\",name=\"{}\"}} {}",
            esc(&v.vip),
            esc(&v.name),
            u8::from(v.valve_alert.is_some())
        );
    }
    header(
        &mut o,
        "lb_vip_min_backends",
        "gauge",
        "The fewest serving backends the VIP's policy allows (min_backends).",
    );
    for v in &status.vips {
        let _ = writeln!(
            o,
            "lb_vip_min_backends{{vip=\"{}\",name=\"{}\"}} {}",
            esc(&v.vip),
            esc(&v.name),
            v.min_backends
        );
    }
    header(
        &mut o,
        "lb_vip_table_info",
        "gauge",
        "Lookup table of a VIP; fleet_digest is equal on every node with the same config.",
    );
    for v in &status.vips {
        let _ = writeln!(
            o,
            "lb_vip_table_info{{vip=\"{}\",name=\"{}\",size=\"{}\",fleet_digest=\"{}\"}} 1",
            esc(&v.vip),
            esc(&v.name),
            v.table_size,
            v.fleet_digest
        );
    }
    for (metric, help) in [
        ("lb_vip_packets_total", "Packets forwarded for a VIP."),
        ("lb_vip_bytes_total", "Bytes forwarded for a VIP."),
        ("lb_vip_new_flows_total", "New flows of a VIP."),
    ] {
        header(&mut o, metric, "counter", help);
        for v in &traffic.vips {
            let val = match metric {
                "lb_vip_packets_total" => v.packets,
                "lb_vip_bytes_total" => v.bytes,
                _ => v.new_flows,
            };
            let _ = writeln!(
                o,
                "{metric}{{vip=\"{}\",name=\"{}\"}} {val}",
                esc(&v.vip),
                esc(&v.name)
            );
        }
    }
    for (metric, help) in [
        ("lb_backend_packets_total", "Packets sent to a backend."),
        ("lb_backend_bytes_total", "Bytes sent to a backend."),
        ("lb_backend_new_flows_total", "New flows sent to a backend."),
    ] {
        header(&mut o, metric, "counter", help);
        for v in &traffic.vips {
            for b in &v.backends {
                let val = match metric {
                    "lb_backend_packets_total" => b.packets,
                    "lb_backend_bytes_total" => b.bytes,
                    _ => b.new_flows,
                };
                let _ = writeln!(
                    o,
                    "{metric}{{vip=\"{}\",backend=\"{}\"}} {val}",
                    esc(&v.vip),
                    b.address
                );
            }
        }
    }
    let families: [(&str, &str, Value); 4] = [
        (
            "lb_backend_up",
            "Health of a backend: 1 up, 0 down, -1 unchecked.",
            |b| match b.health.as_str() {
                "up" => "1".into(),
                "down" => "0".into(),
                _ => "-1".into(),
            },
        ),
        (
            "lb_backend_serving",
            "1 if the data path sends the backend new flows, 0.5 draining, 0 not at all.",
            |b| match b.state {
                crate::model::BackendState::Active => "1".into(),
                crate::model::BackendState::Drain => "0.5".into(),
                crate::model::BackendState::Down => "0".into(),
            },
        ),
        (
            "lb_backend_table_share",
            "Share of the VIP's lookup table (the expected share of new flows).",
            |b| b.table_share.to_string(),
        ),
        ("lb_backend_weight", "Configured weight.", |b| {
            b.weight.to_string()
        }),
    ];
    for (metric, help, value) in families {
        header(&mut o, metric, "gauge", help);
        for v in &status.vips {
            for b in &v.backends {
                let _ = writeln!(
                    o,
                    "{metric}{{vip=\"{}\",backend=\"{}\"}} {}",
                    esc(&v.vip),
                    b.address,
                    value(b)
                );
            }
        }
    }
    o
}
