//! `memleak vm`: a module's tests under memleak in a qemu guest (memleak::vm::module_ci says
//! what runs inside and what its results mean). Boots Debian's kernel (fetched and cached) or
//! the user's, with an initramfs of busybox, this memleak binary (which must be static: the
//! guest has no C library), the modules and the user's files; writes what comes back into
//! --output-dir.
use std::{
    fs,
    io::BufWriter,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use memleak::{
    output::{self, Plain},
    trace::report::Report,
    vm::{
        self, DebianKernel,
        guest::Boot,
        initramfs::{BUSYBOX, Guest, Initramfs},
        module_ci::{self, Job, ModuleToLoad, Outcome},
    },
};

use crate::cli::VmArgs;

const GUEST_INIT: &[u8] = include_bytes!("../vm/init.sh");
const QEMU: &str = "qemu-system-x86_64";

/// The kernel to boot.
enum KernelChoice {
    Debian(DebianKernel),
    /// A bzImage or an uncompressed vmlinux the user built.
    Image(PathBuf),
}

impl KernelChoice {
    fn parse(text: &str) -> Result<Self> {
        if let Some(debian) = DebianKernel::from_series(text) {
            return Ok(Self::Debian(debian));
        }
        let path = PathBuf::from(text);
        ensure!(
            path.is_file(),
            "--kernel {text}: neither 5.10, 6.1, 6.12 nor a kernel image file"
        );
        Ok(Self::Image(path))
    }
}

pub fn run(args: &VmArgs) -> Result<ExitCode> {
    let kernel_choice = KernelChoice::parse(&args.kernel)?;
    if args.print_headers {
        let KernelChoice::Debian(debian) = kernel_choice else {
            bail!("--print-headers: only Debian's kernels (5.10, 6.1, 6.12) come with headers");
        };
        let kernel = debian.fetch(&vm::cache_dir()?)?;
        println!("{}", kernel.tree.display());
        return Ok(ExitCode::SUCCESS);
    }
    ensure!(!args.command.is_empty(), "no command given after --");
    let job = job(args)?;
    let memleak = static_binary(Path::new("/proc/self/exe"), "this memleak")
        .context("memleak vm puts this binary into the guest, which has no C library: run the static build (./x dist, or the Debian package)")?;
    let busybox = static_binary(Path::new(BUSYBOX), BUSYBOX).context(
        "the guest's shell and insmod are a static busybox: apt-get install busybox-static",
    )?;
    let qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    ensure!(
        qemu.is_ok_and(|status| status.success()),
        "{QEMU} does not run: apt-get install qemu-system-x86"
    );

    let started = Instant::now();
    let step = |what: &str| {
        eprintln!(
            "memleak vm: {what} ({:.1} s)",
            started.elapsed().as_secs_f64()
        )
    };
    let image = match &kernel_choice {
        KernelChoice::Debian(debian) => {
            let kernel = debian.fetch(&vm::cache_dir()?)?;
            step(&format!("kernel {} ready", kernel.release));
            // The uncompressed kernel boots seconds faster under TCG than the bzImage.
            kernel.vmlinux()
        }
        KernelChoice::Image(path) => path.clone(),
    };

    let out = &args.output_dir;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let initramfs = out.join("initramfs.cpio");
    pack_initramfs(&initramfs, &job, args, &memleak, &busybox)?;
    let boot = Boot {
        kernel_image: &image,
        initramfs: &initramfs,
        init_environment: "",
        console_log: out.join("console.log"),
        results_log: out.join("results.log"),
        timeout: args.timeout,
    };
    step(&format!("booting {} under qemu", image.display()));
    let results = boot.run()?;
    step("the guest powered off");
    for (name, text) in &results.files {
        let path = out.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let outcome = Outcome::read(&results)
        .with_context(|| format!("the guest's console is in {}", boot.console_log.display()))?;
    write_text_reports(out, &outcome)?;
    summarize(&outcome, out);
    Ok(ExitCode::from(
        u8::try_from(outcome.exit_status()).unwrap_or(1),
    ))
}

/// The job the guest runs, from the options: modules with their parameters, the check's scope
/// and thresholds, the command.
fn job(args: &VmArgs) -> Result<Job> {
    let mut modules = Vec::new();
    for path in &args.modules {
        ensure!(path.is_file(), "--module {}: no such file", path.display());
        modules.push(ModuleToLoad::from_path(path, Vec::new())?);
    }
    for params in &args.module_params {
        let (name, list) = params
            .split_once(':')
            .with_context(|| format!("--module-params {params:?}: expected NAME:PARAMS"))?;
        let module = modules
            .iter_mut()
            .find(|module| module.name == name.replace('-', "_"))
            .with_context(|| format!("--module-params {params:?}: no --module named {name}"))?;
        module
            .params
            .extend(list.split_whitespace().map(str::to_owned));
    }
    let scope = if args.scope_module.is_empty() {
        modules.iter().map(|module| module.name.clone()).collect()
    } else {
        args.scope_module.clone()
    };
    let mut check_options = Vec::new();
    for module in scope {
        check_options.extend(["--module".to_owned(), module]);
    }
    if let Some(function) = &args.scope.function {
        check_options.extend(["--function".to_owned(), function.clone()]);
    }
    if let Some(cache) = &args.scope.cache {
        check_options.extend(["--cache".to_owned(), cache.clone()]);
    }
    check_options.extend([
        "--max-bytes".to_owned(),
        args.scope.max_bytes.to_string(),
        "--max-count".to_owned(),
        args.scope.max_count.to_string(),
    ]);
    Ok(Job {
        modules,
        command: args.command.clone(),
        check_options,
        grace: format!("{}ms", args.grace.as_millis()),
    })
}

/// The bytes of an executable that runs without a C library.
fn static_binary(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        !vm::needs_interpreter(&bytes).with_context(|| format!("reading {what}"))?,
        "{what} is dynamically linked"
    );
    Ok(bytes)
}

fn pack_initramfs(
    path: &Path,
    job: &Job,
    args: &VmArgs,
    memleak: &[u8],
    busybox: &[u8],
) -> Result<()> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let guest = Guest {
        init: GUEST_INIT,
        busybox,
        memleak,
    };
    let mut archive =
        Initramfs::guest(BufWriter::new(file), &guest, &["vm", "vm/modules", "work"])?;
    archive.file("vm/run.sh", 0o755, job.run_script().as_bytes())?;
    archive.file("vm/phases.sh", 0o755, job.phases_script().as_bytes())?;
    archive.file("vm/command.sh", 0o755, job.command_script().as_bytes())?;
    for (module, path) in job.modules.iter().zip(&args.modules) {
        let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        archive.file(&format!("vm/modules/{}", module.file_name), 0o644, &bytes)?;
    }
    for file in &args.files {
        add_tree(&mut archive, file, "work")?;
    }
    archive
        .finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Adds `source` (a file, or a directory with everything under it) into the archive's
/// `into` directory, keeping its name and whether it is executable.
fn add_tree<W: std::io::Write>(
    archive: &mut Initramfs<W>,
    source: &Path,
    into: &str,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = source
        .file_name()
        .and_then(|name| name.to_str())
        .with_context(|| format!("--file {}: no usable file name", source.display()))?;
    let target = format!("{into}/{name}");
    let metadata = fs::metadata(source).with_context(|| format!("--file {}", source.display()))?;
    if metadata.is_dir() {
        archive.directory(&target)?;
        let mut entries: Vec<PathBuf> = fs::read_dir(source)
            .with_context(|| format!("reading {}", source.display()))?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", source.display()))?;
        entries.sort();
        for entry in entries {
            add_tree(archive, &entry, &target)?;
        }
    } else {
        let bytes = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        let executable = metadata.permissions().mode() & 0o111 != 0;
        archive.file(&target, if executable { 0o755 } else { 0o644 }, &bytes)?;
    }
    Ok(())
}

/// tests.txt and unload.txt beside the JSON reports.
fn write_text_reports(out: &Path, outcome: &Outcome) -> Result<()> {
    for (name, report) in [
        ("tests.txt", &outcome.tests),
        ("unload.txt", &outcome.unload),
    ] {
        let path = out.join(name);
        let text = output::render(report, Plain::Text, output::text::trace::render_text);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn summarize(outcome: &Outcome, out: &Path) {
    let line = |what: &str, report: &Report| match &report.check {
        Some(verdict) => eprintln!(
            "memleak vm: {what}: {}",
            output::text::trace::verdict_summary(verdict)
        ),
        None => eprintln!("memleak vm: {what}: no check in the report"),
    };
    line("during the tests", &outcome.tests);
    line("after unloading", &outcome.unload);
    eprintln!(
        "memleak vm: the command exited {} on Linux {}; reports, JUnit files, its output \
         ({}) and the console log are in {}",
        outcome.command_status,
        outcome.unload.kernel,
        module_ci::COMMAND_LOG,
        out.display()
    );
}
