//! The second guest kernel: Debian's kernel source built with a small config that enables
//! kmemleak, which Debian's own kernels leave out. It is cached with its build tree, which
//! modules are built against, under a name that changes with the source version and the config.
use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash as _, Hasher as _},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::workspace::run_quietly;
use memleak::vm::{apt::Apt, kernel::Kernel};

/// Written last: a tree without it is an interrupted build and is started over.
const BUILT_MARKER: &str = ".memleak-vm-built";

/// The `linux-source-SERIES` kernel built with tinyconfig plus `config` (a Kconfig fragment).
pub fn fetch_or_build(apt: &mut Apt, cache: &Path, series: &str, config: &str) -> Result<Kernel> {
    let package = format!("linux-source-{series}");
    let version = match candidate_version(apt, &package) {
        Ok(version) => version,
        Err(_) => {
            apt.update_once()?;
            candidate_version(apt, &package)?
        }
    };
    let mut hasher = DefaultHasher::new();
    config.hash(&mut hasher);
    let build_root = cache.join(format!("{package}-{version}-{:016x}", hasher.finish()));
    let tree = build_root.join(&package);
    if !build_root.join(BUILT_MARKER).exists() {
        build(apt, &package, &build_root, &tree, config)?;
    }
    let release = fs::read_to_string(tree.join("include/config/kernel.release"))
        .context("reading the built kernel's release")?;
    Ok(Kernel {
        release: release.trim().to_owned(),
        tree,
        bzimage: None,
    })
}

/// `6.1.192-2`: the version apt would download.
fn candidate_version(apt: &Apt, package: &str) -> Result<String> {
    let show = apt.cache(&["show", "--no-all-versions", package])?;
    show.lines()
        .find_map(|line| line.strip_prefix("Version: "))
        .map(str::to_owned)
        .with_context(|| format!("apt-cache show {package} names no version"))
}

fn build(apt: &Apt, package: &str, build_root: &Path, tree: &Path, config: &str) -> Result<()> {
    if build_root.exists() {
        fs::remove_dir_all(build_root)
            .with_context(|| format!("removing {}", build_root.display()))?;
    }
    fs::create_dir_all(build_root).with_context(|| format!("creating {}", build_root.display()))?;
    eprintln!("vm-test: downloading {package} and building it with kmemleak (once)");
    apt.download(&[package.to_owned()], build_root)?;
    let deb = fs::read_dir(build_root)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|extension| extension == "deb"))
        .context("apt-get download left no .deb")?;
    // The package holds /usr/src/PACKAGE.tar.xz; only the tarball's contents are wanted.
    let status = Command::new("bash")
        .args([
            "-c",
            r#"set -o pipefail; dpkg-deb --fsys-tarfile "$1" | tar -x -O "./usr/src/$2.tar.xz" | tar -x -J -C "$3""#,
            "unpack",
        ])
        .arg(&deb)
        .arg(package)
        .arg(build_root)
        .status()
        .context("running dpkg-deb | tar")?;
    ensure!(
        status.success(),
        "unpacking {} failed ({status})",
        deb.display()
    );
    fs::remove_file(&deb)?;

    let fragment = build_root.join("kmemleak.config");
    fs::write(&fragment, config).with_context(|| format!("writing {}", fragment.display()))?;
    make(tree, &["tinyconfig"])?;
    run_quietly(
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(tree)
            .args(["-m", ".config"])
            .arg(&fragment),
    )?;
    make(tree, &["olddefconfig"])?;
    // Kconfig drops an option whose dependencies are not met without a word.
    let resolved = fs::read_to_string(tree.join(".config")).context("reading .config")?;
    let dropped: Vec<&str> = config
        .lines()
        .filter(|line| line.starts_with("CONFIG_"))
        .filter(|wanted| !resolved.lines().any(|line| line == *wanted))
        .collect();
    ensure!(
        dropped.is_empty(),
        "the kmemleak kernel's config lost {}",
        dropped.join(" ")
    );
    let jobs = std::thread::available_parallelism().map_or(2, |jobs| jobs.get());
    make(tree, &[&format!("-j{jobs}"), "vmlinux", "modules"])?;
    fs::write(build_root.join(BUILT_MARKER), "")
        .with_context(|| format!("marking {} built", build_root.display()))
}

fn make(tree: &Path, args: &[&str]) -> Result<()> {
    run_quietly(Command::new("make").current_dir(tree).args(args))
}
