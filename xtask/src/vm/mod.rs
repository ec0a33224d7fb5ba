//! `cargo xtask vm-test`: proves the leak check on real, different kernels. Boots Debian's
//! kernels (5.10 from Debian 11, 6.1 from Debian 12, 6.12 from Debian 12's backports) under
//! qemu, each with an initramfs holding a static memleak, busybox and tests/kmod/leaky built
//! against that kernel's headers; inside, memleak must fail the module's check with the
//! module's exact leaks and pass the check of its clean function, and workloads that free all
//! they allocate through kfree_rcu and bulk frees must leave nothing in memleak's reports
//! (false_leaks.rs). Then the same leak check in a guest whose kernel, built from Debian 12's
//! 6.1 source, has kmemleak: its report must name the same leaking functions as memleak's.
//! And `memleak vm`, the module authors' command, on Debian 12's 6.1: a module that leaks
//! during its tests, a clean one, one that leaks only on unload, a failing test command
//! (module_ci.rs). Every guest runs even when one fails; the run ends with a support matrix
//! (`target/vm/support-matrix.md`, matrix.rs).
mod false_leaks;
mod matrix;
mod module_ci;
mod source_kernel;
mod verdict;

use std::{
    fs,
    io::BufWriter,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use memleak::vm::{
    DebianKernel,
    apt::Apt,
    cache_dir, guest, initramfs,
    kernel::{self, Kernel},
};

use crate::{dist, workspace};

/// Host tools: qemu, the guest's shell and insmod (a static busybox), and what building a module
/// against Debian's headers needs (xz and zstd for the kernel image, pahole for module BTF).
const HOST_PACKAGES: [&str; 9] = [
    "qemu-system-x86",
    // musl-gcc: SQLite (rusqlite's bundled C code, for memleak watch's history) in the
    // static guest binary.
    "musl-tools",
    "busybox-static",
    "xz-utils",
    "zstd",
    "dwarves",
    "make",
    "gcc-12",
    "libelf1",
];
/// Building a kernel from source (the kmemleak guest) needs these too.
const KERNEL_BUILD_PACKAGES: [&str; 4] = ["flex", "bison", "bc", "libelf-dev"];
const KMEMLEAK_CONFIG: &str = include_str!("../../../tests/vm/kmemleak.config");
/// The kmemleak kernel is built from the host's (Debian 12's) kernel source.
const KMEMLEAK_SERIES: &str = "6.1";
const GUEST_INIT: &[u8] = include_bytes!("../../../tests/vm/init.sh");
const MODULE: &str = "leaky";

/// The Debian kernels a guest can boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKernel {
    /// Debian 11's 5.10.
    #[value(name = "5.10")]
    Debian11,
    /// Debian 12's 6.1 (and the kmemleak kernel built from its source).
    #[value(name = "6.1")]
    Debian12,
    /// Debian 12's backported 6.12.
    #[value(name = "6.12")]
    Debian12Backports,
    /// All of them.
    All,
}

impl GuestKernel {
    const EACH: [Self; 3] = [Self::Debian11, Self::Debian12, Self::Debian12Backports];

    /// The Debian kernel it boots (`None` for `All`).
    fn debian(self) -> Option<DebianKernel> {
        match self {
            Self::Debian11 => Some(DebianKernel::Bullseye),
            Self::Debian12 => Some(DebianKernel::Bookworm),
            Self::Debian12Backports => Some(DebianKernel::BookwormBackports),
            Self::All => None,
        }
    }

    /// Whether the guest boots Debian's compressed kernel, so that KASLR moves the kernel and
    /// the direct map, which `memleak scan` must then find; the others boot the uncompressed
    /// vmlinux at fixed addresses, 3 s faster under TCG where it is xz (6.12's is zstd).
    fn boots_with_kaslr(self) -> bool {
        self == Self::Debian12Backports
    }

    fn chosen(self) -> Vec<Self> {
        match self {
            Self::All => Self::EACH.to_vec(),
            one => vec![one],
        }
    }
}

#[derive(clap::Args)]
pub struct VmTestArgs {
    /// The Debian kernels to boot
    #[arg(long, value_enum, default_value_t = GuestKernel::All)]
    kernel: GuestKernel,
    /// Objects the test module leaks from each of its two leaking functions
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    objects: u64,
    /// Seconds each guest may take from boot to power-off
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=3600))]
    timeout: u64,
    /// Skip the kmemleak guest (run with 6.1): a kernel built from Debian 12's source with
    /// kmemleak, whose report must name the same leaking functions as memleak (its first build
    /// takes minutes)
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
    // The guests run the binary users get: the static one `cargo xtask dist` packages.
    let memleak = dist::build(root, &mut apt)?.binary;
    let fixture = dist::build_static(root, "memleak-tests", "memleak-fixture")?;
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

    // Every guest runs, whatever the others did: the matrix shows them all.
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for guest in args.kernel.chosen() {
        let guest_started = Instant::now();
        let (row, verdict) = run.debian_guest(guest, &cache);
        let seconds = guest_started.elapsed().as_secs_f64();
        let name = row
            .as_ref()
            .map_or_else(|| format!("{guest:?}"), |row| row.kernel.clone());
        match &verdict {
            Ok(summary) => step(&format!("{name} passed in {seconds:.0} s: {summary}")),
            Err(error) => {
                step(&format!("{name} failed in {seconds:.0} s: {error:#}"));
                failures.push(format!("{name}: {error:#}"));
            }
        }
        if let Some(row) = row {
            let verdict = match verdict {
                Ok(_) => row.verdict.clone(),
                Err(_) => "failed".to_owned(),
            };
            rows.push(matrix::Row {
                seconds,
                verdict,
                ..row
            });
        }
    }
    if args.kernel.chosen().contains(&GuestKernel::Debian12) {
        let started = Instant::now();
        match run.module_ci(DebianKernel::Bookworm, &cache) {
            Ok(summaries) => step(&format!(
                "memleak vm passed its {} scenarios in {:.0} s",
                summaries.len(),
                started.elapsed().as_secs_f64()
            )),
            Err(error) => failures.push(format!("memleak vm: {error:#}")),
        }
    }
    if !args.skip_kmemleak && args.kernel.chosen().contains(&GuestKernel::Debian12) {
        let guest_started = Instant::now();
        let outcome = run.kmemleak_guest(&mut apt, &cache);
        let seconds = guest_started.elapsed().as_secs_f64();
        match outcome {
            Ok((row, summary)) => {
                step(&format!(
                    "the kmemleak guest passed in {seconds:.0} s: {summary}"
                ));
                rows.push(matrix::Row { seconds, ..row });
            }
            Err(error) => failures.push(format!("the kmemleak guest: {error:#}")),
        }
    }
    let matrix_path = workspace::target_dir(root).join("vm/support-matrix.md");
    fs::write(&matrix_path, matrix::render(&rows))
        .with_context(|| format!("writing {}", matrix_path.display()))?;
    step(&format!("support matrix in {}", matrix_path.display()));
    ensure!(
        failures.is_empty(),
        "{} of the guests failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "vm-test: passed in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        rows.iter()
            .map(|row| format!("{} {:.0} s", row.kernel, row.seconds))
            .collect::<Vec<_>>()
            .join(", ")
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
    /// One Debian kernel's guest: its row of the matrix, when the guest ran far enough to tell
    /// how memleak attached, and the verdict on its leak checks and churn.
    fn debian_guest(
        &self,
        guest: GuestKernel,
        cache: &Path,
    ) -> (Option<matrix::Row>, Result<String>) {
        let booted = (|| -> Result<_> {
            let debian = guest
                .debian()
                .context("a guest boots one kernel, not all")?
                .fetch(cache)?;
            (self.step)(&format!(
                "kernel {} ready in {}",
                debian.release,
                cache.display()
            ));
            let results = self.boot(&debian, guest.boots_with_kaslr())?;
            Ok((debian, results))
        })();
        let (debian, results) = match booted {
            Ok(booted) => booted,
            Err(error) => return (None, Err(error)),
        };
        let row = matrix::Row::from_results(&debian.release, &results);
        let judged = (|| -> Result<String> {
            verdict::judge_producer(&results)?;
            let findings = verdict::judge(&results, self.args.objects)?;
            for note in &findings.notes {
                (self.step)(&format!("memleak noted on {}: {note}", debian.release));
            }
            let churn = false_leaks::judge(&results)?;
            for line in &churn {
                (self.step)(&format!("{}: {line}", debian.release));
            }
            let scan_and_classify = verdict::judge_scan_and_classify(
                &results,
                self.args.objects,
                guest.boots_with_kaslr(),
            )?;
            Ok(format!(
                "{}; free-path churn left nothing ({} workloads); {scan_and_classify}",
                findings.summary(),
                churn.len()
            ))
        })()
        .with_context(|| self.where_to_look(&debian));
        (Some(row), judged)
    }

    /// The guest whose kernel, built from Debian 12's 6.1 source, has kmemleak: memleak's
    /// leak check there, and kmemleak's report beside it.
    fn kmemleak_guest(&self, apt: &mut Apt, cache: &Path) -> Result<(matrix::Row, String)> {
        apt.install_missing(&KERNEL_BUILD_PACKAGES)?;
        let kernel = source_kernel::fetch_or_build(apt, cache, KMEMLEAK_SERIES, KMEMLEAK_CONFIG)?;
        (self.step)(&format!(
            "kmemleak kernel {} ready in {}",
            kernel.release,
            kernel.tree.display()
        ));
        let results = self.boot(&kernel, false)?;
        verdict::judge_producer(&results).with_context(|| self.where_to_look(&kernel))?;
        let findings = verdict::judge(&results, self.args.objects)
            .with_context(|| self.where_to_look(&kernel))?;
        let scan_and_classify =
            verdict::judge_scan_and_classify(&results, self.args.objects, false)
                .with_context(|| self.where_to_look(&kernel))?;
        let kmemleak = verdict::compare_with_kmemleak(&results)
            .with_context(|| self.where_to_look(&kernel))?;
        let row = matrix::Row::from_results(
            &format!("{} (tinyconfig, kmemleak, no BTF)", kernel.release),
            &results,
        );
        Ok((
            row,
            format!("{}; {kmemleak}; {scan_and_classify}", findings.summary()),
        ))
    }

    /// `memleak vm` as a module author runs it, on `debian`'s kernel with the test module built
    /// against it (module_ci.rs).
    fn module_ci(&self, debian: DebianKernel, cache: &Path) -> Result<Vec<String>> {
        let kernel = debian.fetch(cache)?;
        let work = work_dir(self.root, &kernel);
        let module = kernel::build_module(
            &kernel,
            &self.root.join("tests/kmod").join(MODULE),
            &work.join(MODULE),
            MODULE,
        )?;
        module_ci::run_all(
            self.memleak,
            debian.series(),
            &module,
            &work.join("module-ci"),
            Duration::from_secs(self.args.timeout),
            self.step,
        )
    }

    fn where_to_look(&self, kernel: &Kernel) -> String {
        let work = work_dir(self.root, kernel);
        format!(
            "on {}: the guest's reports are in {}; its console in {}",
            kernel.release,
            work.display(),
            work.join("console.log").display()
        )
    }

    /// Builds the module for `kernel`, boots it (its bzImage with `kaslr`), and returns what the
    /// guest sent.
    fn boot(&self, kernel: &Kernel, kaslr: bool) -> Result<guest::GuestResults> {
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
            kernel_image: &match (kaslr, &kernel.bzimage) {
                (true, Some(bzimage)) => bzimage.clone(),
                (true, None) => anyhow::bail!("{} has no bzImage to boot", kernel.release),
                (false, _) => kernel.vmlinux(),
            },
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
        Ok(results)
    }
}

/// Where a guest's module, initramfs, logs and reports go: `target/vm/RELEASE`.
fn work_dir(root: &Path, kernel: &Kernel) -> PathBuf {
    workspace::target_dir(root).join("vm").join(&kernel.release)
}

fn pack_initramfs(path: &Path, memleak: &Path, fixture: &Path, module: &Path) -> Result<()> {
    let read = |path: &Path| fs::read(path).with_context(|| format!("reading {}", path.display()));
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let guest = initramfs::Guest {
        init: GUEST_INIT,
        busybox: &read(Path::new(initramfs::BUSYBOX))?,
        memleak: &read(memleak)?,
    };
    let mut archive = initramfs::Initramfs::guest(BufWriter::new(file), &guest, &[])?;
    archive.file("bin/memleak-fixture", 0o755, &read(fixture)?)?;
    archive.file(&format!("{MODULE}.ko"), 0o644, &read(module)?)?;
    archive
        .finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
