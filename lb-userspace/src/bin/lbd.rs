//! `lbd`: not implemented yet — the agent and ops CLI are the next
//! increment (config file, control API, health probes). Until then the data
//! path is driven through the `lb_userspace` library (see the README).
fn main() {
    eprintln!(
        "lbd: not implemented yet; the data path is usable through the lb_userspace library (see README)"
    );
    std::process::exit(69); // EX_UNAVAILABLE
}
