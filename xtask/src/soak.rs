//! `cargo xtask soak --minutes N`: memleak watch under churn for a long time, printing what
//! must stay bounded: the watch's RSS, the objects in its table, what it found free and
//! removed, drops and stack failures. With `--trace`, a `memleak trace` with no duration
//! instead: its RSS and the kernel memory of its maps and programs while it runs, then its
//! report's counters. Not part of the test suite: it takes as long as asked.
use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use clap::Args;

use crate::{tracer, workspace};

#[derive(Args)]
pub struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// The watch's interval, in seconds.
    #[arg(long, default_value_t = 10)]
    interval: u64,
    /// How often to print a row, in seconds.
    #[arg(long, default_value_t = 60)]
    every: u64,
    /// Soak `memleak trace` (no duration, ended by SIGINT) rather than `memleak watch`.
    #[arg(long)]
    trace: bool,
}

pub fn run(args: &SoakArgs) -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the soak loads eBPF programs and must run as root"
    );
    let root = workspace::root()?;
    let status = workspace::cargo(root)?
        .args(["build", "--release", "-p", "memleak", "-p", "memleak-tests"])
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build failed ({status})");
    let release = workspace::target_dir(root).join("release");
    let scratch = std::env::temp_dir().join(format!("memleak-soak-{}", std::process::id()));
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    if args.trace {
        return soak_trace(args, &release, &scratch);
    }
    let lines = scratch.join("watch.jsonl");

    let mut command = Command::new(release.join("memleak"));
    command
        .args(["watch", "--interval", &format!("{}s", args.interval)])
        .arg("--history")
        .arg(scratch.join("history.sqlite"))
        .args(["--format", "json", "--output"])
        .arg(&lines);
    let watch = tracer::start(command, "memleak: watching", Duration::ZERO)?;
    let mut churn = start_churn(args, &release)?;

    println!(
        "| minute | watch RSS | table objects | found free (total) | dropped (total) | stack failures (total) | intervals |"
    );
    println!("|---|---|---|---|---|---|---|");
    every_row(args, |minutes| {
        let rss = rss_kib(watch.pid()).unwrap_or(0);
        let text = fs::read_to_string(&lines).unwrap_or_default();
        let (mut found_free, mut dropped, mut stack_failures, mut intervals) = (0, 0, 0, 0);
        let mut outstanding = 0;
        for line in text.lines() {
            // The last line may be half written.
            let Ok(interval) = serde_json::from_str::<memleak::watch::Interval>(line) else {
                continue;
            };
            found_free += interval.stats.found_free;
            dropped += interval.stats.dropped_table_full;
            stack_failures += interval.stats.stack_failures;
            // The table holds one object in `sample_rate` × 100 / `duty_percent` of those
            // counted.
            let scale = u64::from(interval.sample_rate.max(1)) * 100
                / u64::from(interval.duty_percent.clamp(1, 100));
            outstanding = interval.stats.outstanding / scale;
            intervals += 1;
        }
        println!(
            "| {minutes:.0} | {:.1} MB | {outstanding} | {found_free} | {dropped} | {stack_failures} | {intervals} |",
            rss as f64 / 1024.0,
        );
    });
    let _ = churn.kill();
    let _ = churn.wait();
    let exit = watch.stop()?;
    println!(
        "\nwatch stopped in {} ms; max RSS {:.1} MB; its lines: {}",
        exit.stop_time.as_millis(),
        exit.max_rss_bytes as f64 / 1e6,
        lines.display()
    );
    Ok(())
}

/// Calls `row` with the minutes elapsed every `--every` seconds, and once at the end of the
/// soak's `--minutes`.
fn every_row(args: &SoakArgs, mut row: impl FnMut(f64)) {
    let started = Instant::now();
    let end = started + Duration::from_secs(args.minutes * 60);
    let mut next = started;
    while Instant::now() < end {
        next += Duration::from_secs(args.every);
        std::thread::sleep(next.min(end).saturating_duration_since(Instant::now()));
        row(started.elapsed().as_secs_f64() / 60.0);
    }
}

/// Churn for the whole soak: eventfds opened and closed as fast as the fixture can, which
/// fills the table with short-lived objects and the stack map with their stacks. At the
/// lowest priority: the soak measures what stays bounded, not speed, and may share the
/// machine.
fn start_churn(args: &SoakArgs, release: &std::path::Path) -> Result<std::process::Child> {
    let millis = (args.minutes * 60_000).to_string();
    Command::new("nice")
        .args(["-n", "19"])
        .arg(release.join("memleak-fixture"))
        .args(["bench-churn", &millis])
        .stdout(Stdio::null())
        .spawn()
        .context("starting memleak-fixture bench-churn")
}

/// `memleak trace` with no duration under churn: a row of its RSS and BPF memory every
/// `--every` seconds, then its report's counters once SIGINT ends it.
fn soak_trace(args: &SoakArgs, release: &std::path::Path, scratch: &std::path::Path) -> Result<()> {
    let report_path = scratch.join("trace.json");
    let mut command = Command::new(release.join("memleak"));
    command
        .args(["trace", "--format", "json", "--output"])
        .arg(&report_path);
    let trace = tracer::start(command, "attached", Duration::ZERO)?;
    let mut churn = start_churn(args, release)?;
    println!("| minute | trace RSS | BPF memory (maps and programs) |");
    println!("|---|---|---|");
    every_row(args, |minutes| {
        println!(
            "| {minutes:.0} | {:.1} MB | {:.1} MB |",
            rss_kib(trace.pid()).unwrap_or(0) as f64 / 1024.0,
            bpf_memlock_bytes(trace.pid()) as f64 / 1e6,
        );
    });
    let _ = churn.kill();
    let _ = churn.wait();
    let exit = trace.stop()?;
    let text = fs::read_to_string(&report_path)
        .with_context(|| format!("reading {}", report_path.display()))?;
    let report: memleak::trace::report::Report =
        serde_json::from_str(&text).context("parsing the trace's report")?;
    let stats = &report.stats;
    let counters = &stats.counters;
    println!(
        "
trace of {:.0} min reported {} ms after SIGINT; max RSS {:.1} MB; report {} bytes
         allocations {}, recorded {}, dropped (table full) {}, missed frees {}, stack          failures {} of {}, skipped runs {}, outstanding {} (verified free {}, unverified {})
         report: {}",
        report.duration_ms as f64 / 60_000.0,
        exit.stop_time.as_millis(),
        exit.max_rss_bytes as f64 / 1e6,
        text.len(),
        counters.allocs,
        counters.tracked_allocs,
        counters.dropped_table_full,
        counters.missed_frees,
        counters.stack_failures,
        counters.stack_captures,
        stats.skipped_runs,
        stats.outstanding,
        stats.liveness.verified_free,
        stats.liveness.unverified,
        report_path.display()
    );
    Ok(())
}

/// The kernel memory charged to the BPF maps and programs `pid` holds: the `memlock:` lines
/// of its file descriptors' fdinfo.
fn bpf_memlock_bytes(pid: libc::pid_t) -> u64 {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    entries
        .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("memlock:"))
                .and_then(|value| value.trim().parse::<u64>().ok())
        })
        .sum()
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: libc::pid_t) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
