//! Where the workspace lives and how to run cargo in it the way ./x does.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};
pub use memleak::vm::run_quietly;

/// The workspace root (xtask's parent directory).
pub fn root() -> Result<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")
}

/// Cargo's target directory for this workspace.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// A `cargo` command in `root` with the environment scripts/bootstrap.sh prints (the eBPF
/// nightly and bpf-linker), installing them first if needed.
pub fn cargo(root: &Path) -> Result<Command> {
    let bootstrap = Command::new(root.join("scripts/bootstrap.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running scripts/bootstrap.sh")?;
    ensure!(
        bootstrap.status.success(),
        "scripts/bootstrap.sh failed ({})",
        bootstrap.status
    );
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for line in String::from_utf8_lossy(&bootstrap.stdout).lines() {
        if let Some((key, value)) = line.split_once('=') {
            cargo.env(key, value);
        }
    }
    cargo.current_dir(root);
    Ok(cargo)
}
