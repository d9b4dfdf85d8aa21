#!/usr/bin/env bash
# Idempotent machine set-up for building and testing this project.
# Installs: nightly rust-src (for -Z build-std=core), bpf-linker built against
# the nightly's own libLLVM into .tools/ (see shared/PLATFORM.md), the Debian
# packages the tests and lab use, and mounts bpffs. Safe to run many times.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX="$ROOT/.tools"
BPF_LINKER_VERSION=0.13.0
# nginx: the HTTP server of the large-transfer end-to-end test (started per
# test inside a backend namespace; the package's own service is not used).
DEBIAN_PKGS=(iproute2 ethtool curl bpftool prometheus systemd nginx)

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. rust-src for the nightly toolchain.
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    log "installing rust-src for nightly"
    rustup component add rust-src --toolchain nightly
fi

# 2. bpf-linker linked against the nightly's libLLVM.
if ! "$PREFIX/bin/bpf-linker" --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    log "building bpf-linker $BPF_LINKER_VERSION against the nightly's libLLVM (about a minute)"
    SYSROOT=$(rustc +nightly --print sysroot)
    LIB=$(ls "$SYSROOT"/lib/libLLVM.so.* | head -1)
    mkdir -p "$PREFIX/llvm/lib"
    ln -sf "$LIB" "$PREFIX/llvm/lib/libLLVM.so"
    ln -sf "$LIB" "$PREFIX/llvm/lib/$(basename "$LIB")"
    LLVM_PREFIX="$PREFIX/llvm" cargo +nightly install "bpf-linker@$BPF_LINKER_VERSION" --locked \
        --no-default-features --features llvm-22 --root "$PREFIX"
    "$PREFIX/bin/bpf-linker" --version >&2
fi

# 3. Debian packages (only what is missing).
missing=()
for p in "${DEBIAN_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Packages with a service (nginx) must not start it on the host: deny
    # service starts during the install unless a policy already exists.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if ((own_policy)); then rm -f "$policy"; fi
fi

# 4. bpffs for pinning.
if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
    mount -t bpf bpf /sys/fs/bpf 2>/dev/null || log "could not mount bpffs (pinning tests will say so)"
fi
log "ready: bpf-linker at $PREFIX/bin"
