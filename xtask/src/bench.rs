//! `cargo xtask bench`: the tracer's overhead on allocation-heavy workloads.
//!
//! Every round runs each variant (no tracer, the floor, memleak, sampled memleak, the watch,
//! bpftrace) once per workload, in a rotating order, so drift in the machine's speed spreads
//! over all variants. The table compares medians against the same invocation's baseline.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::ValueEnum;
use memleak::vm::apt::Apt;

use crate::{
    bench_stats::{MedianInterval, TargetVerdict, median, median_interval, paired_ratios},
    tracer::{self, TracerExit},
    workspace,
};

/// The bpftrace script the `bpftrace` variant runs.
const BPFTRACE_SCRIPT: &str = include_str!("memleak.bt");
/// bpftrace prints `Attaching N probes...` just before attaching them.
const BPFTRACE_SETTLE: Duration = Duration::from_millis(500);
/// bpftrace's maps hold 4,096 entries by default; memleak's table holds 1,048,576 objects.
const BPFTRACE_MAP_KEYS_MAX: &str = "1048576";
const SAMPLE_RATE: &str = "64";
/// The default kinds but pages, for [`Variant::MemleakWithoutPages`].
const KINDS_WITHOUT_PAGES: &str = "slab,vmalloc,percpu";
/// The watch variant's interval: short enough that the snapshots fall inside a round.
const WATCH_INTERVAL: &str = "2s";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds per workload; each round runs every variant once
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Seconds each run of a workload lasts; at least 3, so that the watch variants, which
    /// write a line every 2 s, write one inside the run
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=3600))]
    seconds: u64,
    /// Runs of each variant with the kernel's statistics on, after the rounds, alternating
    /// with the other variants' like the rounds; the per-program table shows each variant's
    /// median run by its programs' time per operation (a single run carries the machine's
    /// drift: churn's frees once read 10 ns slower in all of one run's programs)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    timing_runs: u32,
    /// Which workload to run
    #[arg(long, value_enum, default_value_t = WorkloadChoice::All)]
    workload: WorkloadChoice,
    /// Leave out the bpftrace variant, a bcc-style script run beside memleak in every round
    /// by default (installed with apt-get when missing)
    #[arg(long)]
    no_bpftrace: bool,
    /// Also run this memleak binary with default settings (an earlier build, for a before and
    /// after in one run)
    #[arg(long, value_name = "PATH")]
    compare_memleak: Option<PathBuf>,
    /// Also run `memleak watch` with these options added to the watch variant's, for tuning
    /// its defaults (`--watch-args "--sample-rate 64"`)
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    watch_args: Option<String>,
    /// Also run the default watch with `--listen`, its dashboard's endpoints and /metrics
    /// fetched every second as a scraper and an open page would: what serving costs
    #[arg(long)]
    serve: bool,
    /// Also trace with the slab events on raw and on classic tracepoints (`--attach raw`,
    /// `--attach classic`), beside the default (tp_btf where the kernel takes it): what each
    /// rung of the attach ladder costs on this kernel
    #[arg(long)]
    attach_modes: bool,
    /// Also trace with `--user-stacks`: what capturing the user stack beside each sampled
    /// kernel stack costs
    #[arg(long)]
    user_stacks: bool,
    /// Also trace every default kind but pages (`--kinds slab,vmalloc,percpu`): the share of
    /// the slowdown that following the page allocator costs, its dispatch included
    #[arg(long)]
    without_pages: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkloadChoice {
    /// eventfd create/close in a loop: the slab allocator at full speed
    Churn,
    /// loopback TCP echo and file create/write/delete
    Mixed,
    /// a small C file compiled with gcc-12, over and over: process trees, page faults
    Build,
    /// churn, mixed, then build
    All,
}

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Churn,
    Mixed,
    Build,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Churn => "churn",
            Workload::Mixed => "mixed",
            Workload::Build => "build",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Baseline,
    /// memleak's programs attached, each returning at once: the kernel's dispatch cost.
    Floor,
    Memleak,
    MemleakSampled,
    /// `memleak trace --attach raw`.
    MemleakRaw,
    /// `memleak trace --attach classic`.
    MemleakClassic,
    /// `memleak trace --user-stacks`.
    MemleakUserStacks,
    /// `memleak trace` without the page kind: [`KINDS_WITHOUT_PAGES`].
    MemleakWithoutPages,
    /// `memleak watch` with its defaults (one object in 8, allocations followed 10% of the
    /// time), snapshotting every [`WATCH_INTERVAL`] so that its snapshots are inside the
    /// measured window.
    Watch,
    /// The same, with the allocation hooks attached all the time (`--duty 100`): what duty
    /// cycling saves.
    WatchContinuous,
    Bpftrace,
    /// The binary given with `--compare-memleak`.
    OtherMemleak,
    /// `memleak watch` with `--watch-args`.
    WatchTuned,
    /// The default watch with `--listen`, fetched every second ([`SCRAPED_PATHS`]).
    WatchServed,
}

/// What the served variant fetches each second: a Prometheus scrape and an open dashboard.
const SCRAPED_PATHS: [&str; 5] = [
    "/metrics",
    "/api/interval",
    "/api/timeline",
    "/profile",
    "/flamegraph.svg",
];

impl Variant {
    /// Whether memleak's programs run under this variant, doing their work (the ratio over
    /// the floor is theirs).
    fn runs_memleak_programs(self) -> bool {
        !matches!(self, Variant::Baseline | Variant::Floor | Variant::Bpftrace)
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Floor => "empty programs (floor)",
            Variant::Memleak => "memleak",
            Variant::MemleakSampled => "memleak --sample-rate 64",
            Variant::MemleakRaw => "memleak --attach raw",
            Variant::MemleakClassic => "memleak --attach classic",
            Variant::MemleakUserStacks => "memleak --user-stacks",
            Variant::MemleakWithoutPages => "memleak --kinds slab,vmalloc,percpu",
            Variant::Watch => "memleak watch (defaults, --interval 2s)",
            Variant::WatchContinuous => "memleak watch --duty 100 (--interval 2s)",
            Variant::Bpftrace => "bpftrace",
            Variant::OtherMemleak => "memleak (--compare-memleak)",
            Variant::WatchTuned => "memleak watch --watch-args (--interval 2s)",
            Variant::WatchServed => "memleak watch --listen, fetched every 1 s (--interval 2s)",
        }
    }
}

struct Binaries {
    memleak: PathBuf,
    fixture: PathBuf,
    other_memleak: Option<PathBuf>,
    watch_args: Vec<String>,
}

/// One run of a workload under one variant.
struct Sample {
    ops_per_second: f64,
    memleak: Option<MemleakCost>,
    /// The tracer's programs, by name, as the kernel's BPF statistics counted them; empty
    /// unless asked for (the measured rounds run with the statistics off).
    programs: BTreeMap<String, ProgramCost>,
}

/// What one workload measured: each variant's rounds, and its programs' costs from a run of
/// its own with the kernel's statistics on.
struct WorkloadResults {
    workload: Workload,
    samples: Vec<Vec<Sample>>,
    programs: Vec<ProgramTimings>,
}

/// A variant's run with the kernel's statistics on: its programs, and the workload's rate in
/// that run (to put the programs' time per operation).
#[derive(Default)]
struct ProgramTimings {
    ops_per_second: f64,
    programs: BTreeMap<String, ProgramCost>,
}

impl ProgramTimings {
    /// All the programs' time in the run.
    fn run_time_ns(&self) -> u64 {
        self.programs.values().map(|cost| cost.run_time_ns).sum()
    }

    /// The programs' nanoseconds per operation of the workload, over a run of `seconds`; None
    /// without timings.
    fn ns_per_op(&self, seconds: u64) -> Option<f64> {
        let ops = self.ops_per_second * seconds as f64;
        (ops > 0.0 && !self.programs.is_empty()).then(|| self.run_time_ns() as f64 / ops)
    }

    /// Of a variant's timed runs, the one whose programs' time per operation is the median
    /// (the lower of the middle two); no timings when none has any.
    fn median_run(runs: Vec<Self>, seconds: u64) -> Self {
        let mut timed: Vec<(f64, Self)> = runs
            .into_iter()
            .filter_map(|run| Some((run.ns_per_op(seconds)?, run)))
            .collect();
        timed.sort_by(|a, b| a.0.total_cmp(&b.0));
        match timed.len() {
            0 => Self::default(),
            len => timed.swap_remove((len - 1) / 2).1,
        }
    }
}

/// What one program cost over a run: how often the kernel ran it and for how long in total
/// (`kernel.bpf_stats_enabled`), from its load to the end of the workload.
#[derive(Clone, Copy, Default)]
struct ProgramCost {
    runs: u64,
    run_time_ns: u64,
}

/// The kernel's per-program run counters (`kernel.bpf_stats_enabled`), restored to their
/// setting when the benchmark ends. They add two clock reads to every program run (tens of
/// nanoseconds on a VM, as much as an empty program's run), a cost no production machine
/// pays: the measured rounds run with them off, and each variant's programs are timed in a
/// run of its own with them on.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn save() -> Result<Self> {
        let before =
            fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        Ok(Self { before })
    }

    fn set(&self, on: bool) -> Result<()> {
        fs::write(BPF_STATS, if on { "1" } else { "0" })
            .with_context(|| format!("writing {BPF_STATS}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.before.trim());
    }
}

/// Every loaded BPF program as `bpftool prog show --json` lists it.
fn loaded_programs() -> Result<Vec<serde_json::Value>> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool prog show")?;
    ensure!(
        output.status.success(),
        "bpftool prog show failed ({})",
        output.status
    );
    serde_json::from_slice(&output.stdout).context("parsing bpftool's JSON")
}

fn program_ids() -> Result<BTreeSet<u64>> {
    Ok(loaded_programs()?
        .iter()
        .filter_map(|program| program["id"].as_u64())
        .collect())
}

/// The programs loaded since `existing` was taken (the tracer's: the benchmark runs one tracer
/// at a time; this bpftool shows no owning pids), by name, with their statistics.
fn program_costs(existing: &BTreeSet<u64>) -> Result<BTreeMap<String, ProgramCost>> {
    let mut costs = BTreeMap::new();
    for program in loaded_programs()? {
        if program["id"]
            .as_u64()
            .is_none_or(|id| existing.contains(&id))
        {
            continue;
        }
        let name = program["name"].as_str().unwrap_or("?").to_owned();
        let cost: &mut ProgramCost = costs.entry(name).or_default();
        cost.runs += program["run_cnt"].as_u64().unwrap_or(0);
        cost.run_time_ns += program["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(costs)
}

/// What memleak itself cost in one run.
struct MemleakCost {
    report_time: Duration,
    max_rss_bytes: u64,
    dropped_table_full: u64,
    stack_failures: u64,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark loads eBPF programs and must run as root (./x bench uses sudo)"
    );
    let root = workspace::root()?;
    build(root)?;
    let release = workspace::target_dir(root).join("release");
    let binaries = Binaries {
        memleak: release.join("memleak"),
        fixture: release.join("memleak-fixture"),
        other_memleak: args.compare_memleak.clone(),
        watch_args: args
            .watch_args
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    };
    let mut variants = vec![
        Variant::Baseline,
        Variant::Floor,
        Variant::Memleak,
        Variant::MemleakSampled,
        Variant::Watch,
        Variant::WatchContinuous,
    ];
    if !args.no_bpftrace {
        Apt::default().install_missing(&["bpftrace"])?;
        variants.push(Variant::Bpftrace);
    }
    if let Some(other) = &args.compare_memleak {
        ensure!(
            other.exists(),
            "--compare-memleak {}: no such file",
            other.display()
        );
        variants.push(Variant::OtherMemleak);
    }
    if args.watch_args.is_some() {
        variants.push(Variant::WatchTuned);
    }
    if args.serve {
        variants.push(Variant::WatchServed);
    }
    if args.attach_modes {
        variants.extend([Variant::MemleakRaw, Variant::MemleakClassic]);
    }
    if args.user_stacks {
        variants.push(Variant::MemleakUserStacks);
    }
    if args.without_pages {
        variants.push(Variant::MemleakWithoutPages);
    }
    let workloads: &[Workload] = match args.workload {
        WorkloadChoice::Churn => &[Workload::Churn],
        WorkloadChoice::Mixed => &[Workload::Mixed],
        WorkloadChoice::Build => &[Workload::Build],
        WorkloadChoice::All => &[Workload::Churn, Workload::Mixed, Workload::Build],
    };

    if matches!(args.workload, WorkloadChoice::Build | WorkloadChoice::All) {
        Apt::default().install_missing(&["gcc-12"])?;
    }
    Apt::default().install_missing(&["bpftool"])?;
    let stats = BpfStats::save()?;

    let mut results = Vec::new();
    for &workload in workloads {
        let run = |variant: Variant, collect_programs: bool| {
            run_once(&binaries, workload, variant, args.seconds, collect_programs)
                .with_context(|| format!("{} under {}", workload.name(), variant.label()))
        };
        stats.set(false)?;
        let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
        for round in 0..args.rounds as usize {
            for index in rotated(round, variants.len()) {
                let sample = run(variants[index], false)?;
                eprintln!(
                    "bench: {} round {}/{}: {} {} ops/s",
                    workload.name(),
                    round + 1,
                    args.rounds,
                    variants[index].label(),
                    rate(sample.ops_per_second),
                );
                samples[index].push(sample);
            }
        }
        stats.set(true)?;
        let mut timed: Vec<Vec<ProgramTimings>> = variants.iter().map(|_| Vec::new()).collect();
        let mut failed = vec![false; variants.len()];
        for pass in 0..args.timing_runs as usize {
            for index in rotated(pass, variants.len()) {
                let variant = variants[index];
                if variant == Variant::Baseline || failed[index] {
                    continue;
                }
                eprintln!(
                    "bench: {}: timing the programs of {} ({}/{})",
                    workload.name(),
                    variant.label(),
                    pass + 1,
                    args.timing_runs,
                );
                // Runs of their own after the rounds: one that fails (bpftrace has hung on
                // SIGINT under mixed) leaves that variant's timings out, not the rounds'
                // results, and the variant is not run again.
                match run(variant, true) {
                    Ok(sample) => timed[index].push(ProgramTimings {
                        ops_per_second: sample.ops_per_second,
                        programs: sample.programs,
                    }),
                    Err(error) => {
                        eprintln!(
                            "bench: {}: no program timings for {}: {error:#}",
                            workload.name(),
                            variant.label()
                        );
                        failed[index] = true;
                    }
                }
            }
        }
        let programs = timed
            .into_iter()
            .map(|runs| ProgramTimings::median_run(runs, args.seconds))
            .collect();
        results.push(WorkloadResults {
            workload,
            samples,
            programs,
        });
    }
    drop(stats);
    print_report(args, &variants, &results)
}

/// The variants' indices in the order round `round` runs them: each round starts one further
/// on, so drift in the machine's speed spreads over all of them.
fn rotated(round: usize, variants: usize) -> impl Iterator<Item = usize> {
    (0..variants).map(move |offset| (round + offset) % variants)
}

/// Builds the tracer and the fixture with the environment scripts/bootstrap.sh prints, as ./x does.
fn build(root: &Path) -> Result<()> {
    let status = workspace::cargo(root)?
        .args(["build", "--release", "-p", "memleak", "-p", "memleak-tests"])
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build failed ({status})");
    Ok(())
}

fn run_once(
    binaries: &Binaries,
    workload: Workload,
    variant: Variant,
    seconds: u64,
    collect_programs: bool,
) -> Result<Sample> {
    let report_path =
        std::env::temp_dir().join(format!("memleak-bench-{}.json", std::process::id()));
    let serve_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let programs_before = if collect_programs {
        program_ids()?
    } else {
        BTreeSet::new()
    };
    let tracer = match variant {
        Variant::Baseline => None,
        Variant::Floor
        | Variant::Memleak
        | Variant::MemleakSampled
        | Variant::MemleakRaw
        | Variant::MemleakClassic
        | Variant::MemleakUserStacks
        | Variant::MemleakWithoutPages
        | Variant::OtherMemleak => {
            let binary = match (variant, &binaries.other_memleak) {
                (Variant::OtherMemleak, Some(other)) => other,
                _ => &binaries.memleak,
            };
            let mut command = Command::new(binary);
            command
                .args(["trace", "--format", "json", "--output"])
                .arg(&report_path);
            if variant == Variant::MemleakSampled {
                command.args(["--sample-rate", SAMPLE_RATE]);
            }
            if variant == Variant::Floor {
                command.arg("--empty-programs");
            }
            match variant {
                Variant::MemleakRaw => command.args(["--attach", "raw"]),
                Variant::MemleakClassic => command.args(["--attach", "classic"]),
                Variant::MemleakUserStacks => command.arg("--user-stacks"),
                Variant::MemleakWithoutPages => command.args(["--kinds", KINDS_WITHOUT_PAGES]),
                _ => &mut command,
            };
            Some(tracer::start(command, "memleak: attached", Duration::ZERO)?)
        }
        Variant::Watch | Variant::WatchContinuous | Variant::WatchTuned | Variant::WatchServed => {
            let mut command = Command::new(&binaries.memleak);
            command
                .args(["watch", "--interval", WATCH_INTERVAL, "--no-history"])
                .args(["--format", "json", "--output"])
                .arg(&report_path);
            if variant == Variant::WatchContinuous {
                command.args(["--duty", "100"]);
            }
            if variant == Variant::WatchTuned {
                command.args(&binaries.watch_args);
            }
            if variant == Variant::WatchServed {
                command.args(["--listen", &serve_port.to_string()]);
            }
            Some(tracer::start(command, "memleak: watching", Duration::ZERO)?)
        }
        Variant::Bpftrace => {
            let mut command = Command::new("bpftrace");
            command
                .args(["-B", "line", "-e", BPFTRACE_SCRIPT])
                .env("BPFTRACE_MAP_KEYS_MAX", BPFTRACE_MAP_KEYS_MAX);
            Some(tracer::start(command, "Attaching", BPFTRACE_SETTLE)?)
        }
    };
    let scraper = (variant == Variant::WatchServed).then(|| Scraper::start(serve_port));
    let ops_per_second = run_workload(&binaries.fixture, workload, seconds);
    if let Some(scraper) = scraper {
        let fetched = scraper.stop();
        eprintln!("bench: the watch answered {fetched} requests");
    }
    // While the programs are still attached.
    let programs = match &tracer {
        Some(_) if collect_programs => program_costs(&programs_before)?,
        _ => BTreeMap::new(),
    };
    let exit = tracer.map(tracer::RunningTracer::stop).transpose()?;
    let ops_per_second = ops_per_second?;
    let memleak = match exit {
        Some(exit) if variant != Variant::Bpftrace => {
            let cost = if matches!(
                variant,
                Variant::Watch
                    | Variant::WatchContinuous
                    | Variant::WatchTuned
                    | Variant::WatchServed
            ) {
                watch_cost(&report_path, exit)
            } else {
                memleak_cost(&report_path, exit)
            };
            let _ = fs::remove_file(&report_path);
            Some(cost?)
        }
        _ => None,
    };
    Ok(Sample {
        ops_per_second,
        memleak,
        programs,
    })
}

/// Fetches [`SCRAPED_PATHS`] from the watch every second on a thread of its own, until stopped.
struct Scraper {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<u64>,
}

impl Scraper {
    fn start(port: u16) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut answered = 0;
            loop {
                for path in SCRAPED_PATHS {
                    if fetch(port, path).is_ok() {
                        answered += 1;
                    }
                }
                if stopped.recv_timeout(Duration::from_secs(1)).is_ok() {
                    return answered;
                }
            }
        });
        Self { stop, thread }
    }

    /// Stops the thread; how many requests were answered.
    fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or(0)
    }
}

/// One HTTP/1.1 GET on a connection of its own; the bytes of the answer.
fn fetch(port: u16, path: &str) -> std::io::Result<usize> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(answer.len())
    } else {
        Err(std::io::Error::other("not answered 200"))
    }
}

/// Runs the fixture's `bench-WORKLOAD MILLIS` and returns its ops per second.
fn run_workload(fixture: &Path, workload: Workload, seconds: u64) -> Result<f64> {
    let subcommand = format!("bench-{}", workload.name());
    let output = Command::new(fixture)
        .arg(&subcommand)
        .arg((seconds * 1000).to_string())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", fixture.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "memleak-fixture {subcommand} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_ops_per_second(&stdout)
        .with_context(|| format!("memleak-fixture {subcommand} printed `{}`", stdout.trim()))
}

/// Reads `ops=<N> seconds=<F>`.
fn parse_ops_per_second(line: &str) -> Option<f64> {
    let (ops, seconds) = line.trim().strip_prefix("ops=")?.split_once(" seconds=")?;
    let seconds: f64 = seconds.parse().ok()?;
    (seconds > 0.0).then_some(ops.parse::<u64>().ok()? as f64 / seconds)
}

fn memleak_cost(report_path: &Path, exit: TracerExit) -> Result<MemleakCost> {
    let report = fs::read_to_string(report_path)
        .with_context(|| format!("reading memleak's report {}", report_path.display()))?;
    let report: memleak::trace::report::Report = serde_json::from_str(&report)
        .with_context(|| format!("parsing memleak's report {}", report_path.display()))?;
    Ok(MemleakCost {
        report_time: exit.stop_time,
        max_rss_bytes: exit.max_rss_bytes,
        dropped_table_full: report.stats.counters.dropped_table_full,
        stack_failures: report.stats.counters.stack_failures,
    })
}

/// The watch's cost: its lines (JSON Lines, one per interval) carry each interval's drops and
/// stack failures; there is no report at the end.
fn watch_cost(lines_path: &Path, exit: TracerExit) -> Result<MemleakCost> {
    let text = fs::read_to_string(lines_path)
        .with_context(|| format!("reading memleak watch's output {}", lines_path.display()))?;
    let (mut dropped_table_full, mut stack_failures, mut intervals) = (0, 0, 0);
    for line in text.lines() {
        let interval: memleak::watch::Interval = serde_json::from_str(line)
            .with_context(|| format!("parsing memleak watch's line `{line}`"))?;
        dropped_table_full += interval.stats.dropped_table_full;
        stack_failures += interval.stats.stack_failures;
        intervals += 1;
    }
    ensure!(intervals > 0, "memleak watch printed no interval");
    Ok(MemleakCost {
        report_time: exit.stop_time,
        max_rss_bytes: exit.max_rss_bytes,
        dropped_table_full,
        stack_failures,
    })
}

fn print_report(args: &BenchArgs, variants: &[Variant], results: &[WorkloadResults]) -> Result<()> {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|cpuinfo| {
            let line = cpuinfo
                .lines()
                .find(|line| line.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    println!();
    println!(
        "memleak overhead, {}: kernel {}, {cpus} CPUs ({cpu_model}), {} round{} of {} s per variant",
        today()?,
        kernel.trim(),
        args.rounds,
        if args.rounds == 1 { "" } else { "s" },
        args.seconds
    );
    println!();

    let header = [
        "workload",
        "variant",
        "median ops/s",
        "slowdown",
        "over floor",
        "min ops/s",
        "max ops/s",
        "report time",
        "max RSS",
        "table-full drops",
        "stack failures",
    ];
    // Each workload's ratios, for the main table and the targets.
    let ratios = results
        .iter()
        .map(|result| RoundRatios::new(variants, &result.samples))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    let mut coverage = None;
    for (
        WorkloadResults {
            workload, samples, ..
        },
        ratios,
    ) in results.iter().zip(&ratios)
    {
        for (index, (variant, samples)) in variants.iter().zip(samples).enumerate() {
            let ops = &ratios.ops[index];
            let slowdown = ratios.slowdown(index);
            let over_floor = ratios.over_floor(index);
            coverage = coverage.or(slowdown.map(|interval| interval.coverage));
            let costs: Vec<&MemleakCost> =
                samples.iter().filter_map(|s| s.memleak.as_ref()).collect();
            let mut row = vec![
                workload.name().to_owned(),
                variant.label().to_owned(),
                rate(median(ops.iter().copied())),
                interval_cell(slowdown),
                interval_cell(over_floor),
                rate(ops.iter().copied().fold(f64::INFINITY, f64::min)),
                rate(ops.iter().copied().fold(0.0, f64::max)),
            ];
            if costs.is_empty() {
                row.extend(["-"; 4].map(str::to_owned));
            } else {
                let report_ms = median(costs.iter().map(|c| c.report_time.as_secs_f64() * 1e3));
                let max_of = |field: fn(&MemleakCost) -> u64| {
                    costs.iter().map(|&c| field(c)).max().unwrap_or(0)
                };
                row.extend([
                    format!("{report_ms:.0} ms"),
                    format!("{:.1} MB", max_of(|c| c.max_rss_bytes) as f64 / 1e6),
                    thousands(max_of(|c| c.dropped_table_full) as f64),
                    thousands(max_of(|c| c.stack_failures) as f64),
                ]);
            }
            rows.push(row);
        }
    }
    print_markdown_table(&header, &rows, 2);
    println!();
    print_targets(variants, results, &ratios);
    println!();
    print_program_costs(args.timing_runs, variants, results);
    println!();
    print_program_time_per_op(args.seconds, variants, results, &ratios);
    println!();
    println!(
        "slowdown: in each round, the baseline's ops/s over the variant's (the two ran in the \
         same round, so what drifts between rounds cancels); the median over the rounds, and in \
         parentheses {} over \
         floor: the same with the floor (memleak's programs returning at once) in place of the \
         baseline: what memleak's programs cost beyond the kernel's dispatch. report time: \
         median time from SIGINT to exit (detach, read the table, symbolize, write JSON). max \
         RSS, drops and stack failures: the largest of any round.",
        interval_meaning(coverage)
    );
    Ok(())
}

/// What the parentheses of the slowdown columns mean for a run whose intervals hold the median
/// with probability `coverage`: none at all with one round.
fn interval_meaning(coverage: Option<f64>) -> String {
    match coverage {
        Some(coverage) if coverage > 0.0 => format!(
            "the order statistics that hold the median with probability {:.1}% or more whatever \
             the rounds' distribution (the lowest and highest round below 8 rounds).",
            100.0 * coverage
        ),
        _ => "the lowest and highest round, which with one round say nothing of the spread: \
              run at least 5 rounds for an interval."
            .to_owned(),
    }
}

/// The interval the bench aims for; five rounds reach 93.8% with their lowest and highest.
const CONFIDENCE: f64 = 0.9;

/// Each variant's per-round ratios against the baseline and the floor of one workload.
struct RoundRatios<'a> {
    ops: Vec<Vec<f64>>,
    baseline: usize,
    floor: Option<usize>,
    variants: &'a [Variant],
}

impl<'a> RoundRatios<'a> {
    fn new(variants: &'a [Variant], samples: &[Vec<Sample>]) -> Result<Self> {
        let position = |wanted: Variant| variants.iter().position(|&variant| variant == wanted);
        Ok(Self {
            ops: samples
                .iter()
                .map(|samples| samples.iter().map(|s| s.ops_per_second).collect())
                .collect(),
            baseline: position(Variant::Baseline).context("no baseline variant")?,
            floor: position(Variant::Floor),
            variants,
        })
    }

    fn slowdown(&self, index: usize) -> Option<MedianInterval> {
        median_interval(
            &paired_ratios(&self.ops[self.baseline], &self.ops[index]),
            CONFIDENCE,
        )
    }

    /// None for the variants that are not memleak's programs (no tracer, the floor, bpftrace).
    fn over_floor(&self, index: usize) -> Option<MedianInterval> {
        let floor = self.floor?;
        if !self.variants[index].runs_memleak_programs() {
            return None;
        }
        median_interval(
            &paired_ratios(&self.ops[floor], &self.ops[index]),
            CONFIDENCE,
        )
    }
}

/// `1.12x (1.05-1.20)`, or `-` for no interval.
fn interval_cell(interval: Option<MedianInterval>) -> String {
    match interval {
        None => "-".to_owned(),
        Some(interval) if interval.low == interval.high => format!("{:.2}x", interval.median),
        Some(interval) => format!(
            "{:.2}x ({:.2}-{:.2})",
            interval.median, interval.low, interval.high
        ),
    }
}

/// What a target ratio is taken against.
#[derive(Clone, Copy)]
enum Against {
    Baseline,
    Floor,
}

/// A ratio an issue sets: `variant` on `workload`, against no tracer or the floor, at most
/// `at_most`.
struct Target {
    workload: Workload,
    variant: Variant,
    against: Against,
    at_most: f64,
    issue: &'static str,
}

/// #17 (default tracing and `--sample-rate 64`) and #12 (the default watch).
const TARGETS: [Target; 8] = [
    Target {
        workload: Workload::Churn,
        variant: Variant::Memleak,
        against: Against::Floor,
        at_most: 1.10,
        issue: "#17",
    },
    Target {
        workload: Workload::Mixed,
        variant: Variant::Memleak,
        against: Against::Baseline,
        at_most: 1.05,
        issue: "#17",
    },
    Target {
        workload: Workload::Build,
        variant: Variant::Memleak,
        against: Against::Baseline,
        at_most: 1.05,
        issue: "#17",
    },
    Target {
        workload: Workload::Churn,
        variant: Variant::MemleakSampled,
        against: Against::Floor,
        at_most: 1.02,
        issue: "#17",
    },
    Target {
        workload: Workload::Mixed,
        variant: Variant::MemleakSampled,
        against: Against::Floor,
        at_most: 1.02,
        issue: "#17",
    },
    Target {
        workload: Workload::Build,
        variant: Variant::MemleakSampled,
        against: Against::Floor,
        at_most: 1.02,
        issue: "#17",
    },
    Target {
        workload: Workload::Churn,
        variant: Variant::Watch,
        against: Against::Baseline,
        at_most: 1.25,
        issue: "#12",
    },
    Target {
        workload: Workload::Mixed,
        variant: Variant::Watch,
        against: Against::Baseline,
        at_most: 1.02,
        issue: "#12",
    },
];

/// Each target of a workload this run measured, with the run's verdict on it.
fn print_targets(variants: &[Variant], results: &[WorkloadResults], ratios: &[RoundRatios]) {
    let mut rows = Vec::new();
    for (WorkloadResults { workload, .. }, ratios) in results.iter().zip(ratios) {
        for target in TARGETS.iter().filter(|target| target.workload == *workload) {
            let Some(index) = variants.iter().position(|&v| v == target.variant) else {
                continue;
            };
            let (interval, against, judge): (_, _, fn(&_, _, _) -> _) = match target.against {
                Against::Baseline => (ratios.slowdown(index), "slowdown", TargetVerdict::of),
                Against::Floor => (
                    ratios.over_floor(index),
                    "over floor",
                    TargetVerdict::over_floor,
                ),
            };
            let Some(interval) = interval else {
                continue;
            };
            rows.push(vec![
                target.issue.to_owned(),
                workload.name().to_owned(),
                target.variant.label().to_owned(),
                against.to_owned(),
                format!("{:.2}x", target.at_most),
                interval_cell(Some(interval)),
                judge(&interval, target.at_most, CONFIDENCE)
                    .label()
                    .to_owned(),
            ]);
        }
    }
    if rows.is_empty() {
        return;
    }
    println!(
        "Targets: met when the whole interval is at or under the target, missed when it is all \
         above, not shown when the rounds spread across it (more rounds narrow the interval); \
         too few rounds when the interval holds the median with less than {:.0}% (fewer than 5 \
         rounds); too noisy when a ratio over the floor reaches further below 1 than the target \
         lies above it (the programs only add to the floor's work: the rounds measured the \
         machine's own swings)",
        100.0 * CONFIDENCE
    );
    println!();
    print_markdown_table(
        &[
            "issue", "workload", "variant", "ratio", "at most", "measured", "verdict",
        ],
        &rows,
        4,
    );
}

/// Where each variant's time goes: its programs' runs and nanoseconds per run, in its median
/// run timed with the kernel's statistics on.
fn print_program_costs(timing_runs: u32, variants: &[Variant], results: &[WorkloadResults]) {
    let mut rows = Vec::new();
    for WorkloadResults {
        workload, programs, ..
    } in results
    {
        for (variant, timings) in variants.iter().zip(programs) {
            let costs = &timings.programs;
            let all_ns = timings.run_time_ns();
            let mut by_time: Vec<(&String, &ProgramCost)> = costs.iter().collect();
            by_time.sort_by_key(|(_, cost)| std::cmp::Reverse(cost.run_time_ns));
            for (name, cost) in by_time.into_iter().filter(|(_, cost)| cost.runs > 0) {
                rows.push(vec![
                    workload.name().to_owned(),
                    variant.label().to_owned(),
                    name.clone(),
                    thousands(cost.runs as f64),
                    format!("{:.0}", cost.run_time_ns as f64 / cost.runs as f64),
                    format!(
                        "{:.0}%",
                        100.0 * cost.run_time_ns as f64 / all_ns.max(1) as f64
                    ),
                ]);
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    println!(
        "Per program (kernel.bpf_stats_enabled, on for {timing_runs} more runs of each variant \
         after the measured rounds, which ran with it off, alternating; the variant's median \
         run by its programs' time per operation): runs, ns per run, share of the variant's \
         program time"
    );
    println!();
    print_markdown_table(
        &["workload", "variant", "program", "runs", "ns/run", "share"],
        &rows,
        3,
    );
}

/// The programs' own time per operation of each workload, beyond the floor's, against the
/// time an operation takes under the floor: a cost with none of the rounds' noise in it,
/// which the slowdown over the floor would be if all of it lay on the workload's critical
/// path (it leaves out what the programs do to the kernel's caches and memleak's own process).
fn print_program_time_per_op(
    seconds: u64,
    variants: &[Variant],
    results: &[WorkloadResults],
    ratios: &[RoundRatios],
) {
    let mut rows = Vec::new();
    for (result, ratios) in results.iter().zip(ratios) {
        let Some(floor) = ratios.floor else {
            continue;
        };
        let Some(floor_ns) = result.programs[floor].ns_per_op(seconds) else {
            continue;
        };
        let floor_op_ns = 1e9 / median(ratios.ops[floor].iter().copied());
        for (index, variant) in variants.iter().enumerate() {
            if !variant.runs_memleak_programs() {
                continue;
            }
            let Some(ns) = result.programs[index].ns_per_op(seconds) else {
                continue;
            };
            rows.push(vec![
                result.workload.name().to_owned(),
                variant.label().to_owned(),
                format!("{floor_op_ns:.0}"),
                format!("{floor_ns:.0}"),
                format!("{ns:.0}"),
                format!("{:.0}", ns - floor_ns),
                format!("{:.3}x", 1.0 + (ns - floor_ns) / floor_op_ns),
            ]);
        }
    }
    if rows.is_empty() {
        return;
    }
    println!(
        "Program time per operation (the timed runs above): ns an operation takes under the \
         floor (its median rate in the rounds), ns of the floor's programs and of the \
         variant's per operation, the difference, and 1 + the difference over the operation: \
         the slowdown over the floor if all of the programs' extra time lay on the workload's \
         critical path (no noise from the rounds; not what the programs do to the kernel's \
         caches, nor memleak's own process)"
    );
    println!();
    print_markdown_table(
        &[
            "workload",
            "variant",
            "op ns (floor)",
            "floor ns/op",
            "programs ns/op",
            "beyond floor",
            "as slowdown",
        ],
        &rows,
        2,
    );
}

/// A Markdown table, padded to line up in a terminal; the first `text_columns` columns are
/// text (aligned left), the others numbers.
fn print_markdown_table(header: &[&str], rows: &[Vec<String>], text_columns: usize) {
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].len())
                .chain([header[column].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| println!("| {} |", cells.join(" | "));
    let pad = |column: usize, cell: &str| {
        if column < text_columns {
            format!("{cell:<width$}", width = widths[column])
        } else {
            format!("{cell:>width$}", width = widths[column])
        }
    };
    line(
        header
            .iter()
            .enumerate()
            .map(|(column, cell)| pad(column, cell))
            .collect(),
    );
    line(
        widths
            .iter()
            .enumerate()
            .map(|(column, &width)| {
                let dashes = "-".repeat(width.saturating_sub(1));
                if column < text_columns {
                    format!("{dashes}-")
                } else {
                    format!("{dashes}:")
                }
            })
            .collect(),
    );
    for row in rows {
        line(
            row.iter()
                .enumerate()
                .map(|(column, cell)| pad(column, cell))
                .collect(),
        );
    }
}

/// An ops/s figure: `1,234,568` for `1234567.8`, but `20.6` below 100 (the build workload
/// runs about 20 compiles a second, where a whole number hides differences of 5%).
fn rate(value: f64) -> String {
    if value < 100.0 {
        format!("{value:.1}")
    } else {
        thousands(value)
    }
}

/// `1234567.8` as `1,234,568`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn today() -> Result<String> {
    let output = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .context("running date")?;
    ensure!(output.status.success(), "date failed ({})", output.status);
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(ops_per_second: f64, run_time_ns: u64) -> ProgramTimings {
        let cost = ProgramCost {
            runs: 1000,
            run_time_ns,
        };
        ProgramTimings {
            ops_per_second,
            programs: BTreeMap::from([("kfree_btf".to_owned(), cost)]),
        }
    }

    #[test]
    fn the_median_timed_run_is_kept_by_time_per_operation() {
        // 5 s runs of 50, 10, 20 and 30 ns per operation: by the programs' total time (the
        // last run's is lowest, the second and third tie) another run would be kept, and so it
        // would by its place in the list.
        let runs = vec![
            timings(1000.0, 250_000),
            timings(2000.0, 100_000),
            timings(1000.0, 100_000),
            timings(500.0, 75_000),
        ];
        let kept = ProgramTimings::median_run(runs, 5);
        assert_eq!(kept.ns_per_op(5), Some(20.0));
        // A run without timings (a variant that failed) is not a candidate.
        let runs = vec![
            ProgramTimings::default(),
            timings(1000.0, 100_000),
            timings(1000.0, 300_000),
        ];
        assert_eq!(ProgramTimings::median_run(runs, 5).ns_per_op(5), Some(20.0));
        assert!(
            ProgramTimings::median_run(Vec::new(), 5)
                .programs
                .is_empty()
        );
    }

    #[test]
    fn one_round_gives_no_probability_for_its_interval() {
        let coverage =
            |rounds: usize| median_interval(&vec![1.0; rounds], CONFIDENCE).map(|i| i.coverage);
        assert!(interval_meaning(coverage(1)).contains("say nothing of the spread"));
        assert!(!interval_meaning(coverage(1)).contains('%'));
        assert!(interval_meaning(coverage(5)).contains("93.8%"));
        assert!(interval_meaning(None).contains("at least 5 rounds"));
    }
}
