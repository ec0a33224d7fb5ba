//! Builds the eBPF object with aya-build, on the nightly pinned in memleak-ebpf/toolchain.toml
//! (scripts/bootstrap.sh installs it and bpf-linker).
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    build_info()?;
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

/// What `memleak --version` and every report say built them: the git commit of the source
/// (`unknown` outside a git checkout, as in a source tarball) and the versions of aya and
/// blazesym resolved in Cargo.lock, as environment variables for `env!`.
fn build_info() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("no CARGO_MANIFEST_DIR"))?,
    );
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", manifest_dir.display()))?;
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(workspace)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|commit| commit.trim().to_owned())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo::rustc-env=MEMLEAK_GIT_COMMIT={commit}");
    // A new commit moves HEAD (a detached checkout) or the branch's ref (HEAD's text names it),
    // kept as a file of its own or in packed-refs. Cargo reruns a build script on every build
    // while a path it watches is missing, so only paths that exist are watched: a branch with
    // no file of its own yet is watched through its directory, where its first commit adds one.
    let git_dir = workspace.join(".git");
    if git_dir.is_dir() {
        println!("cargo::rerun-if-changed={}", git_dir.join("HEAD").display());
        if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD"))
            && let Some(branch) = head.trim().strip_prefix("ref: ")
        {
            let branch_ref = git_dir.join(branch);
            let watched = if branch_ref.exists() {
                Some(branch_ref.as_path())
            } else {
                branch_ref.parent()
            };
            let packed_refs = git_dir.join("packed-refs");
            for path in watched.into_iter().chain(Some(packed_refs.as_path())) {
                if path.exists() {
                    println!("cargo::rerun-if-changed={}", path.display());
                }
            }
        }
    }

    let lock_path = workspace.join("Cargo.lock");
    println!("cargo::rerun-if-changed={}", lock_path.display());
    let lock = std::fs::read_to_string(&lock_path)
        .with_context(|| format!("reading {}", lock_path.display()))?;
    for (package, variable) in [
        ("aya", "MEMLEAK_AYA_VERSION"),
        ("blazesym", "MEMLEAK_BLAZESYM_VERSION"),
    ] {
        let version = locked_version(&lock, package)
            .ok_or_else(|| anyhow!("{} names no version of {package}", lock_path.display()))?;
        println!("cargo::rustc-env={variable}={version}");
    }
    println!(
        "cargo::rustc-env=MEMLEAK_TARGET={}",
        std::env::var("TARGET").context("no TARGET")?
    );
    Ok(())
}

/// The version of `package` in Cargo.lock: the `version` line after its `name` line.
fn locked_version<'lock>(lock: &'lock str, package: &str) -> Option<&'lock str> {
    let name_line = format!("name = \"{package}\"");
    let mut lines = lock.lines();
    lines.find(|line| *line == name_line)?;
    lines
        .next()?
        .strip_prefix("version = \"")?
        .strip_suffix('"')
}
