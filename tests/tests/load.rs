//! The compiled object loads and passes the kernel verifier.
use lb_userspace::datapath::{Datapath, Decap, LoadOptions};

#[test]
fn lb_and_decap_programs_pass_the_verifier() {
    Datapath::load(LoadOptions::default()).expect("xdp_lb must load (verifier log above)");
    Decap::load().expect("xdp_decap must load");
}
