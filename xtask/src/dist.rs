//! `cargo xtask dist`: what a user copies to a server. One static x86_64 binary (musl, the eBPF
//! object inside, no glibc, libelf or toolchain needed where it runs), a Debian package that
//! installs it with its man pages, shell completions and the watch's systemd unit, and a
//! tarball of the same, with SHA-256 checksums; all in `target/dist/`. The man pages and
//! completions are made by the binary being packaged (`memleak manpages`, `memleak
//! completions`), so they always match its options. `cargo xtask vm-test` boots this same
//! binary in its guests.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use memleak::{
    util::build::{GIT_COMMIT, VERSION},
    vm::apt::Apt,
};

use crate::workspace::{self, run_quietly};

/// musl-gcc builds SQLite (rusqlite's bundled C code, for the watch's history) into the static
/// binary; binutils strips it; dpkg-deb (in dpkg) builds the package.
const DIST_PACKAGES: [&str; 2] = ["musl-tools", "binutils"];
const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";
/// Debian's name for the architecture the static binary runs on.
const DEBIAN_ARCH: &str = "amd64";
const SHELLS: [(&str, &str, &str); 3] = [
    // (shell, where the Debian package puts it, the name in the tarball)
    (
        "bash",
        "usr/share/bash-completion/completions/memleak",
        "memleak.bash",
    ),
    (
        "zsh",
        "usr/share/zsh/vendor-completions/_memleak",
        "_memleak",
    ),
    (
        "fish",
        "usr/share/fish/vendor_completions.d/memleak.fish",
        "memleak.fish",
    ),
];
const WATCH_UNIT: &str = "packaging/memleak-watch.service";
/// Files for a fleet (see docs/fleet.md), shipped as examples.
const EXAMPLES: [&str; 3] = [
    "packaging/memleak-alerts.yml",
    "packaging/memleak-alerts.test.yml",
    "packaging/grafana-memleak.json",
];

#[derive(clap::Args)]
pub struct DistArgs {}

/// What `dist` made.
pub struct Dist {
    /// The stripped static binary.
    pub binary: PathBuf,
    pub deb: PathBuf,
    pub tarball: PathBuf,
    pub checksums: PathBuf,
}

pub fn run(_args: &DistArgs) -> Result<()> {
    let root = workspace::root()?;
    let dist = build(root, &mut Apt::default())?;
    let size = |path: &Path| {
        fs::metadata(path)
            .map(|metadata| metadata.len())
            .unwrap_or(0)
    };
    for path in [&dist.binary, &dist.deb, &dist.tarball, &dist.checksums] {
        println!("{:>10}  {}", size(path), path.display());
    }
    Ok(())
}

/// Builds the static binary and packages it into `target/dist/`.
pub fn build(root: &Path, apt: &mut Apt) -> Result<Dist> {
    apt.install_missing(&DIST_PACKAGES)?;
    let out = workspace::target_dir(root).join("dist");
    fresh_directory(&out)?;
    let built = build_static(root, "memleak", "memleak")?;
    let binary = out.join("memleak");
    run_quietly(
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&binary)
            .arg(&built),
    )?;

    let stage = workspace::target_dir(root).join("dist-stage");
    fresh_directory(&stage)?;
    let generated = Generated::make(&binary, &stage.join("generated"))?;

    let deb = out.join(format!("memleak_{VERSION}_{DEBIAN_ARCH}.deb"));
    package_deb(root, &binary, &generated, &stage.join("deb"), &deb)?;

    let name = format!("memleak-{VERSION}-x86_64-linux-musl");
    let tarball = out.join(format!("{name}.tar.gz"));
    package_tarball(
        root,
        &binary,
        &generated,
        &stage.join("tar").join(&name),
        &tarball,
    )?;

    let checksums = out.join("SHA256SUMS");
    let sums = Command::new("sha256sum")
        .args(["memleak", &file_name(&deb)?, &file_name(&tarball)?])
        .current_dir(&out)
        .output()
        .context("running sha256sum")?;
    ensure!(sums.status.success(), "sha256sum failed ({})", sums.status);
    fs::write(&checksums, &sums.stdout)
        .with_context(|| format!("writing {}", checksums.display()))?;
    Ok(Dist {
        binary,
        deb,
        tarball,
        checksums,
    })
}

/// A static build of `binary` from `package` (memleak's eBPF object inside it does not depend
/// on the target). The VM test builds its fixture this way too.
pub fn build_static(root: &Path, package: &str, binary: &str) -> Result<PathBuf> {
    let status = workspace::cargo(root)?
        .args([
            "build",
            "--release",
            "--quiet",
            "--package",
            package,
            "--bin",
            binary,
        ])
        .args(["--target", STATIC_TARGET])
        // The cc crate looks for x86_64-linux-musl-gcc; Debian's musl-tools names it musl-gcc.
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .status()
        .context("running cargo build")?;
    ensure!(
        status.success(),
        "cargo build --target {STATIC_TARGET} --bin {binary} failed ({status})"
    );
    Ok(workspace::target_dir(root)
        .join(STATIC_TARGET)
        .join("release")
        .join(binary))
}

/// The man pages and completion scripts the binary writes about itself.
struct Generated {
    /// memleak.1 and memleak-SUBCOMMAND.1.
    man_pages: Vec<PathBuf>,
    /// (shell, script), in the order of [`SHELLS`].
    completions: Vec<(&'static str, Vec<u8>)>,
}

impl Generated {
    fn make(binary: &Path, directory: &Path) -> Result<Self> {
        let man = directory.join("man1");
        run_quietly(Command::new(binary).arg("manpages").arg(&man))?;
        let mut man_pages: Vec<PathBuf> = fs::read_dir(&man)
            .with_context(|| format!("reading {}", man.display()))?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", man.display()))?;
        man_pages.sort();
        ensure!(
            man_pages
                .iter()
                .any(|page| page.ends_with("memleak-trace.1")),
            "memleak manpages wrote no memleak-trace.1 into {}",
            man.display()
        );
        let mut completions = Vec::new();
        for (shell, _, _) in SHELLS {
            let output = Command::new(binary)
                .args(["completions", shell])
                .output()
                .with_context(|| format!("running {} completions {shell}", binary.display()))?;
            ensure!(
                output.status.success() && !output.stdout.is_empty(),
                "memleak completions {shell} failed ({})",
                output.status
            );
            completions.push((shell, output.stdout));
        }
        Ok(Self {
            man_pages,
            completions,
        })
    }
}

/// The Debian package: the binary in /usr/bin, gzipped man pages, completions where each
/// shell looks for them, the watch's unit (not enabled: a continuous watch is the operator's
/// choice) and the fleet files as examples. It depends on nothing: the binary is static.
fn package_deb(
    root: &Path,
    binary: &Path,
    generated: &Generated,
    tree: &Path,
    deb: &Path,
) -> Result<()> {
    install(binary, &tree.join("usr/bin/memleak"), 0o755)?;
    let man = tree.join("usr/share/man/man1");
    for page in &generated.man_pages {
        let target = man.join(file_name(page)?);
        install(page, &target, 0o644)?;
        // Debian's policy: man pages gzipped at -9, without a timestamp in the header (-n).
        run_quietly(Command::new("gzip").args(["-9n", "-f"]).arg(&target))?;
    }
    for ((_, script), (_, place, _)) in generated.completions.iter().zip(SHELLS) {
        write(&tree.join(place), script, 0o644)?;
    }
    let unit = fs::read_to_string(root.join(WATCH_UNIT))
        .with_context(|| format!("reading {WATCH_UNIT}"))?;
    ensure!(
        unit.contains("/usr/local/bin/memleak"),
        "{WATCH_UNIT} no longer runs /usr/local/bin/memleak, which the package moves to /usr/bin"
    );
    // The unit names the binary where a copied binary goes; the package installs it in /usr/bin.
    let unit = unit.replace("/usr/local/bin/memleak", "/usr/bin/memleak");
    write(
        &tree.join("lib/systemd/system/memleak-watch.service"),
        unit.as_bytes(),
        0o644,
    )?;
    let doc = tree.join("usr/share/doc/memleak");
    install(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    for example in EXAMPLES {
        let source = root.join(example);
        install(
            &source,
            &doc.join("examples").join(file_name(&source)?),
            0o644,
        )?;
    }
    write(&doc.join("copyright"), copyright().as_bytes(), 0o644)?;

    let installed_kib = directory_size(tree)?.div_ceil(1024);
    write(
        &tree.join("DEBIAN/control"),
        control(installed_kib).as_bytes(),
        0o644,
    )?;
    run_quietly(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(tree)
            .arg(deb),
    )
}

fn control(installed_kib: u64) -> String {
    format!(
        "Package: memleak\n\
         Version: {VERSION}\n\
         Architecture: {DEBIAN_ARCH}\n\
         Maintainer: memleak developers <memleak@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Section: admin\n\
         Priority: optional\n\
         Description: find kernel memory leaks with eBPF, without a debug kernel\n \
         memleak follows the kernel's slab, page, vmalloc and percpu allocations with eBPF\n \
         and reports which functions hold memory that is never freed, in which slab cache,\n \
         how much, and how sure it is; on kernels without kmemleak (5.10 or later).\n \
         It also classifies which kind of kernel memory grows, scans slab caches for what\n \
         a long-running leak left behind, checks kernel module tests for leaks, and watches\n \
         continuously (memleak-watch.service, not enabled on install).\n \
         .\n \
         Built from commit {GIT_COMMIT}; a static binary with no dependencies.\n"
    )
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: memleak\n\n\
     Files: *\n\
     Copyright: memleak developers\n\
     License: MIT or Apache-2.0\n \
     memleak is licensed under the MIT license or the Apache License 2.0, at your option.\n \
     On Debian systems the Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.\n"
        .to_owned()
}

/// The tarball for machines without dpkg: the binary, man pages (not gzipped: `man -l` and
/// every man directory read them), completions, the unit as written for /usr/local/bin, the
/// fleet files and the README.
fn package_tarball(
    root: &Path,
    binary: &Path,
    generated: &Generated,
    tree: &Path,
    tarball: &Path,
) -> Result<()> {
    install(binary, &tree.join("memleak"), 0o755)?;
    for page in &generated.man_pages {
        install(page, &tree.join("man/man1").join(file_name(page)?), 0o644)?;
    }
    for ((_, script), (_, _, name)) in generated.completions.iter().zip(SHELLS) {
        write(&tree.join("completions").join(name), script, 0o644)?;
    }
    for file in EXAMPLES.iter().chain([&WATCH_UNIT, &"README.md"]) {
        let source = root.join(file);
        install(&source, &tree.join(file_name(&source)?), 0o644)?;
    }
    let parent = tree.parent().context("the tarball's tree has no parent")?;
    run_quietly(
        Command::new("tar")
            .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
            .arg(tarball)
            .arg("-C")
            .arg(parent)
            .arg(file_name(tree)?),
    )
}

fn fresh_directory(path: &Path) -> Result<()> {
    if path.exists() {
        fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    }
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn install(source: &Path, target: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    write(target, &bytes, mode)
}

fn write(target: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(target, bytes).with_context(|| format!("writing {}", target.display()))?;
    fs::set_permissions(target, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", target.display()))
}

/// Bytes of the regular files under `directory`.
fn directory_size(directory: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in
        fs::read_dir(directory).with_context(|| format!("reading {}", directory.display()))?
    {
        let entry = entry.with_context(|| format!("reading {}", directory.display()))?;
        let kind = entry.file_type().context("reading a file type")?;
        if kind.is_dir() {
            total += directory_size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata().context("reading file metadata")?.len();
        }
    }
    Ok(total)
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", path.display()))
}
