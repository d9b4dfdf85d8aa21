//! The compiled object loads and passes the kernel verifier.
use lb_userspace::datapath::{Datapath, Decap, LoadOptions};

#[test]
fn lb_and_decap_programs_pass_the_verifier() {
    Datapath::load(LoadOptions::default()).expect("xdp_lb must load (verifier log above)");
    Decap::load().expect("xdp_decap must load");
}

/// Pinned state of an older layout (v7: before the ICMP too-big rate limit,
/// the program's MAC and the MTU in `CONFIG`) is refused with the message
/// that says what to do, not misread.
#[test]
fn pins_of_an_older_layout_are_refused() {
    let pins = lb_tests::pins::PinDir::new("lb-layout");
    let old = format!("layout-v{}", lb_common::LAYOUT_VERSION - 1);
    std::fs::create_dir_all(pins.path().join(&old)).expect("creating an old layout dir in bpffs");
    let Err(e) = Datapath::load(LoadOptions {
        pin_dir: Some(pins.path().to_path_buf()),
        ..LoadOptions::default()
    }) else {
        panic!("an older layout's pins must be refused");
    };
    let msg = e.to_string();
    assert!(
        msg.contains(&old)
            && msg.contains(&format!("this lbd uses {}", lb_common::LAYOUT_VERSION))
            && msg.contains("lbctl datapath detach"),
        "unexpected refusal: {msg}"
    );
}
