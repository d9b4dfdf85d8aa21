//! Builds the XDP object (lb-ebpf) with aya-build and lets the crate embed
//! it. bpf-linker comes from the project-local prefix that
//! `scripts/setup.sh` fills (see shared/PLATFORM.md), or from PATH.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("workspace root")?;
    let tools = root.join(".tools/bin");
    println!(
        "cargo:rerun-if-changed={}",
        tools.join("bpf-linker").display()
    );
    if tools.join("bpf-linker").exists() {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![tools];
        dirs.extend(env::split_paths(&path));
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
    } else if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker not found in {} nor on PATH: run `scripts/setup.sh` (or `cargo xtask setup`) first",
            tools.display()
        ));
    }
    let ebpf_dir = root.join("lb-ebpf");
    // The object is linked for BPF ISA v3 (see the script).
    let linker = ebpf_dir.join("bpf-linker-cpu");
    println!("cargo:rerun-if-changed={}", linker.display());
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker) };
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.exists())
}
