//! Builds the eBPF object with aya-build, on the nightly pinned in memleak-ebpf/toolchain.toml
//! (scripts/bootstrap.sh installs it and bpf-linker).
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "memleak-ebpf")
        .ok_or_else(|| anyhow!("memleak-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;

    let toolchain_file = root_dir.join("toolchain.toml");
    println!("cargo::rerun-if-changed={toolchain_file}");
    let toolchain_text = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {toolchain_file}"))?;
    let nightly = toolchain_text
        .lines()
        .find_map(|line| line.strip_prefix("nightly = "))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .ok_or_else(|| anyhow!("{toolchain_file} has no `nightly = \"...\"` line"))?;

    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&nightly),
    )
}
