#!/usr/bin/env bash
# Installs, once and idempotently, everything memleak needs to build:
#   - the pinned stable toolchain for userspace (rust-toolchain.toml), with the musl target,
#   - the pinned nightly with rust-src for the eBPF crate,
#   - bpf-linker built against that nightly's own libLLVM.
# Everything is cached under $MEMLEAK_CACHE (default ~/.cache/memleak) so a fresh clone
# on the same machine finds it. Prints the environment to export on stdout as `KEY=VALUE` lines.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MEMLEAK_CACHE:-$HOME/.cache/memleak}
stable=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$here/rust-toolchain.toml")
nightly=$(sed -n 's/^nightly *= *"\(.*\)"/\1/p' "$here/memleak-ebpf/toolchain.toml")
bpf_linker_version=$(sed -n 's/^bpf-linker *= *"\(.*\)"/\1/p' "$here/memleak-ebpf/toolchain.toml")

log() { printf 'bootstrap: %s\n' "$*" >&2; }

have_toolchain() { rustup run "$1" rustc --version >/dev/null 2>&1; }

if ! command -v rustup >/dev/null 2>&1; then
    log "rustup is required (https://rustup.rs); it is not on PATH"
    exit 1
fi

if ! have_toolchain "$stable"; then
    log "installing Rust $stable (userspace)"
    rustup toolchain install "$stable" --profile minimal -c clippy,rustfmt >&2
fi

# Static musl binaries of memleak run inside the test VMs (cargo xtask vm-test).
if ! rustup target list --installed --toolchain "$stable" | grep -x x86_64-unknown-linux-musl >/dev/null; then
    log "installing the x86_64-unknown-linux-musl target for Rust $stable (VM tests)"
    rustup target add x86_64-unknown-linux-musl --toolchain "$stable" >&2
fi

if ! have_toolchain "$nightly" || [ ! -d "$(rustup run "$nightly" rustc --print sysroot)/lib/rustlib/src/rust" ]; then
    log "installing Rust $nightly with rust-src (eBPF)"
    rustup toolchain install "$nightly" --profile minimal -c rust-src >&2
fi

linker_root="$cache/bpf-linker-$bpf_linker_version-$nightly"
if [ ! -x "$linker_root/bin/bpf-linker" ]; then
    log "building bpf-linker $bpf_linker_version against $nightly's libLLVM (takes a few minutes, once)"
    sysroot=$(rustup run "$nightly" rustc --print sysroot)
    llvm_so=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n1)
    if [ -z "$llvm_so" ]; then
        log "no libLLVM.so.* in $sysroot/lib; cannot build bpf-linker"
        exit 1
    fi
    prefix="$cache/llvm-prefix-$nightly"
    mkdir -p "$prefix/lib"
    ln -sf "$llvm_so" "$prefix/lib/libLLVM.so"
    ln -sf "$llvm_so" "$prefix/lib/$(basename "$llvm_so")"
    LLVM_PREFIX="$prefix" rustup run "$nightly" cargo install bpf-linker \
        --version "$bpf_linker_version" --locked --root "$linker_root.tmp" >&2
    rm -rf "$linker_root"
    mv "$linker_root.tmp" "$linker_root"
fi

echo "MEMLEAK_NIGHTLY=$nightly"
echo "PATH=$linker_root/bin:$PATH"
