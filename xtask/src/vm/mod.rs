//! `cargo xtask vm-test`: proves the leak check on a real, different kernel. Boots Debian's
//! current kernel (6.1 on Debian 12) under qemu with an initramfs holding a static memleak,
//! busybox and tests/kmod/leaky built against that kernel's headers; inside, memleak must fail
//! the module's check with the module's exact leaks and pass the check of its clean function.
//! Then the same in a second guest whose kernel, built from the same source, has kmemleak: its
//! report must name the same leaking functions as memleak's. In the first guest, workloads that
//! free all they allocate through kfree_rcu and bulk frees must leave nothing in memleak's
//! reports (false_leaks.rs).
mod false_leaks;
mod guest;
mod initramfs;
mod kernel;
mod source_kernel;
mod verdict;

use std::{
    fs,
    io::BufWriter,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use self::kernel::Kernel;
use crate::{apt::Apt, workspace};

/// Host tools: qemu, the guest's shell and insmod (a static busybox), and what building a module
/// against Debian's headers needs (xz for the kernel image, pahole for module BTF).
const HOST_PACKAGES: [&str; 8] = [
    "qemu-system-x86",
    // musl-gcc: SQLite (rusqlite's bundled C code, for memleak watch's history) in the
    // static guest binary.
    "musl-tools",
    "busybox-static",
    "xz-utils",
    "dwarves",
    "make",
    "gcc-12",
    "libelf1",
];
/// Building a kernel from source (the kmemleak guest) needs these too.
const KERNEL_BUILD_PACKAGES: [&str; 4] = ["flex", "bison", "bc", "libelf-dev"];
const KMEMLEAK_CONFIG: &str = include_str!("../../../tests/vm/kmemleak.config");
const BUSYBOX: &str = "/bin/busybox";
const GUEST_TARGET: &str = "x86_64-unknown-linux-musl";
const GUEST_INIT: &[u8] = include_bytes!("../../../tests/vm/init.sh");
const MODULE: &str = "leaky";

#[derive(clap::Args)]
pub struct VmTestArgs {
    /// Objects the test module leaks from each of its two leaking functions
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    objects: u64,
    /// Seconds each guest may take from boot to power-off
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=3600))]
    timeout: u64,
    /// Skip the second guest: a kernel built from Debian's source with kmemleak, whose report
    /// must name the same leaking functions as memleak (its first build takes minutes)
    #[arg(long)]
    skip_kmemleak: bool,
}

pub fn run(args: &VmTestArgs) -> Result<()> {
    let started = Instant::now();
    let step = |what: &str| eprintln!("vm-test: {what} ({:.1} s)", started.elapsed().as_secs_f64());
    let root = workspace::root()?;

    let mut apt = Apt::default();
    apt.install_missing(&HOST_PACKAGES)?;
    let cache = cache_dir()?;
    let debian = kernel::fetch(&mut apt, &cache)?;
    step(&format!(
        "kernel {} ready in {}",
        debian.release,
        cache.display()
    ));
    let memleak = build_static(root, "memleak", "memleak")?;
    let fixture = build_static(root, "memleak-tests", "memleak-fixture")?;
    step(&format!(
        "built {} and {}",
        memleak.display(),
        fixture.display()
    ));

    let run = GuestRun {
        root,
        memleak: &memleak,
        fixture: &fixture,
        args,
        step: &step,
    };
    let (findings, results) = run.check(&debian)?;
    let mut summary = vec![findings.summary()];
    let churn = false_leaks::judge(&results).with_context(|| {
        format!(
            "on {}: the guest's reports are in {}",
            debian.release,
            work_dir(root, &debian).display()
        )
    })?;
    for line in &churn {
        step(&format!("{}: {line}", debian.release));
    }
    summary.push(format!(
        "free-path churn left nothing ({} workloads)",
        churn.len()
    ));

    if !args.skip_kmemleak {
        apt.install_missing(&KERNEL_BUILD_PACKAGES)?;
        let kmemleak_kernel =
            source_kernel::fetch_or_build(&mut apt, &cache, debian.series()?, KMEMLEAK_CONFIG)?;
        step(&format!(
            "kmemleak kernel {} ready in {}",
            kmemleak_kernel.release,
            kmemleak_kernel.tree.display()
        ));
        let (findings, results) = run.check(&kmemleak_kernel)?;
        let kmemleak = verdict::compare_with_kmemleak(&results).with_context(|| {
            format!(
                "on {}: the guest's reports are in {}",
                kmemleak_kernel.release,
                work_dir(root, &kmemleak_kernel).display()
            )
        })?;
        summary.push(format!("{}; {kmemleak}", findings.summary()));
    }
    println!(
        "vm-test: passed in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    Ok(())
}

/// What every guest shares: the static memleak, the options, the progress lines.
struct GuestRun<'a> {
    root: &'a Path,
    memleak: &'a Path,
    fixture: &'a Path,
    args: &'a VmTestArgs,
    step: &'a dyn Fn(&str),
}

impl GuestRun<'_> {
    /// Builds the module for `kernel`, boots it, and judges the two checks inside.
    fn check(&self, kernel: &Kernel) -> Result<(verdict::Findings, guest::GuestResults)> {
        let work = work_dir(self.root, kernel);
        let module = kernel::build_module(
            kernel,
            &self.root.join("tests/kmod").join(MODULE),
            &work.join(MODULE),
            MODULE,
        )?;
        (self.step)(&format!("built {}", module.display()));

        let initramfs = work.join("initramfs.cpio");
        pack_initramfs(&initramfs, self.memleak, self.fixture, &module)?;
        let boot = guest::Boot {
            vmlinux: &kernel.vmlinux(),
            initramfs: &initramfs,
            init_environment: &format!(
                "LEAKY_N={} {}",
                self.args.objects,
                false_leaks::command_line()
            ),
            console_log: work.join("console.log"),
            results_log: work.join("results.log"),
            timeout: Duration::from_secs(self.args.timeout),
        };
        let booted = Instant::now();
        let results = boot.run()?;
        (self.step)(&format!(
            "guest {} ran in {:.1} s; console: {}",
            kernel.release,
            booted.elapsed().as_secs_f64(),
            boot.console_log.display()
        ));
        for (name, text) in &results.files {
            let path = work.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let findings = verdict::judge(&results, self.args.objects).with_context(|| {
            format!(
                "on {}: the guest's reports are in {}; its console in {}",
                kernel.release,
                work.display(),
                boot.console_log.display()
            )
        })?;
        for note in &findings.notes {
            (self.step)(&format!("memleak noted on {}: {note}", kernel.release));
        }
        Ok((findings, results))
    }
}

/// Where a guest's module, initramfs, logs and reports go: `target/vm/RELEASE`.
fn work_dir(root: &Path, kernel: &Kernel) -> PathBuf {
    workspace::target_dir(root).join("vm").join(&kernel.release)
}

/// `$MEMLEAK_CACHE/vm`, by default ~/.cache/memleak/vm (where scripts/bootstrap.sh caches too).
fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("MEMLEAK_CACHE") {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/memleak"),
    };
    let cache = base.join("vm");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    Ok(cache)
}

/// Runs `command`, showing the end of its output only when it fails.
fn run_quietly(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        tail(&output.stdout),
        tail(&output.stderr)
    );
    Ok(())
}

/// A static binary of `package` for the guest (memleak's eBPF object inside it does not depend
/// on the target).
fn build_static(root: &Path, package: &str, binary: &str) -> Result<PathBuf> {
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
        .args(["--target", GUEST_TARGET])
        // The cc crate looks for x86_64-linux-musl-gcc; Debian's musl-tools names it musl-gcc.
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .status()
        .context("running cargo build")?;
    ensure!(
        status.success(),
        "cargo build --target {GUEST_TARGET} --bin {binary} failed ({status})"
    );
    Ok(workspace::target_dir(root)
        .join(GUEST_TARGET)
        .join("release")
        .join(binary))
}

fn pack_initramfs(path: &Path, memleak: &Path, fixture: &Path, module: &Path) -> Result<()> {
    let read = |path: &Path| fs::read(path).with_context(|| format!("reading {}", path.display()));
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut archive = initramfs::Initramfs::new(BufWriter::new(file));
    for directory in ["bin", "dev", "proc", "sys", "results"] {
        archive.directory(directory)?;
    }
    // The kernel opens /dev/console for /init's standard streams before anything is mounted.
    archive.character_device("dev/console", 0o600, (5, 1))?;
    archive.file("init", 0o755, GUEST_INIT)?;
    archive.file("bin/busybox", 0o755, &read(Path::new(BUSYBOX))?)?;
    archive.file("bin/memleak", 0o755, &read(memleak)?)?;
    archive.file("bin/memleak-fixture", 0o755, &read(fixture)?)?;
    archive.file(&format!("{MODULE}.ko"), 0o644, &read(module)?)?;
    archive
        .finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
