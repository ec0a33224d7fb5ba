//! Command-line interface. Doc comments are the help text.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{checks::LeakCheckArgs, duration};

/// Exit status for errors (bad input, missing kernel features, failures to load). Usage errors
/// found by the argument parser exit with the same status.
pub const EXIT_ERROR: u8 = 2;

/// Find kernel memory leaks with eBPF, on kernels without kmemleak.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Say more on standard error: -v for what memleak decides (attach methods, fallbacks),
    /// -vv for debugging. RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace kernel allocations and frees for a window, then report what is still allocated.
    Trace(TraceArgs),
    /// Trace while a command runs (and a grace period after it), report, and exit with the
    /// command's status, or 1 if a leak check (--fail-on-leak) fails.
    Run(RunArgs),
    /// Run a kmemleak scan on a debug kernel (or read a saved report) and group the
    /// unreferenced objects by allocation backtrace.
    Kmemleak(crate::kmemleak::KmemleakArgs),
    /// Sample /proc/meminfo, /proc/slabinfo and /proc/vmallocinfo for a few seconds and say
    /// which kind of kernel memory grows (slab, vmalloc, percpu, pages), which slab caches
    /// grow, and which `memleak trace` to run next.
    ///
    /// A kind, slab cache or vmalloc caller is growing when the least-squares line through its
    /// samples rises at least --min-rate, by at least --noise-floor over the window, and by at
    /// least 3 times the samples' scatter around the line. Reclaimable slab growth is reported
    /// but not blamed unless --blame-reclaimable.
    Classify(crate::classify::ClassifyArgs),
    /// Read every object of a slab cache from kernel memory and find the largest groups of
    /// objects with similar contents: what a long-running leak leaves behind.
    Scan(crate::scan::ScanArgs),
}

/// How and where a report is written; shared by every subcommand that reports.
#[derive(Debug, Args)]
pub struct ReportOptions {
    /// Report format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write the report to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Number of entries (allocation sites, backtraces; groups of similar objects for `scan`,
    /// at most 5) to show.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub top: u32,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// How long to trace, like 200s, 5m or 500ms. Without it, trace until Ctrl-C or SIGTERM
    /// (which also end a timed window early; the report is printed either way).
    #[arg(short, long, value_parser = parse_window)]
    pub duration: Option<Duration>,

    #[command(flatten)]
    pub tracing: TracingOptions,

    #[command(flatten)]
    pub checks: LeakCheckArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// After the command exits, keep tracing this long for deferred frees (RCU callbacks,
    /// work items).
    #[arg(long, value_name = "DUR", default_value = "3s", value_parser = parse_age)]
    pub grace: Duration,

    #[command(flatten)]
    pub tracing: TracingOptions,

    #[command(flatten)]
    pub checks: LeakCheckArgs,

    /// The command to run, after `--`.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// How to trace and how to report, shared by `trace` and `run`.
#[derive(Debug, Args)]
pub struct TracingOptions {
    #[command(flatten)]
    pub report: ReportOptions,

    /// Rank allocation sites by outstanding bytes or by outstanding object count.
    #[arg(long, value_enum, default_value_t = SortKey::Size)]
    pub sort: SortKey,

    /// Hide allocations younger than this at report time (they are likely still in use).
    #[arg(long, value_name = "DUR", value_parser = parse_age)]
    pub min_age: Option<Duration>,

    #[command(flatten)]
    pub similarity: crate::scan::SimilarityOptions,

    /// Track one object in N, chosen by a hash of its address (a power of two up to 65536).
    /// Cuts overhead for continuous use; counts become estimates, scaled by N.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_power_of_two)]
    pub sample_rate: u32,

    /// Capture the full kernel stack of one allocation in N (a power of two up to 65536; with
    /// --sample-rate M >= N, of every tracked object), and of the first allocation from each
    /// call site. Every allocation is still counted
    /// exactly per call site; N=1 gives exact per-stack counts at several times the overhead.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_power_of_two)]
    pub stack_sample_rate: u32,

    /// Kinds of kernel memory to follow, comma-separated. Kinds this kernel cannot trace are
    /// left out, and the report says so.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::Slab, Kind::Page, Kind::Vmalloc, Kind::Percpu])]
    pub kinds: Vec<Kind>,

    /// Record only allocations made by this process (thread-group id).
    #[arg(short, long)]
    pub pid: Option<u32>,

    /// Record only allocations made by tasks with this command name (as in /proc/PID/comm, at
    /// most 15 characters).
    #[arg(long, value_name = "NAME", value_parser = parse_comm)]
    pub comm: Option<String>,

    /// Record only allocations of at least this many bytes (as allocated).
    #[arg(long, value_name = "BYTES")]
    pub min_size: Option<u32>,

    /// Record only allocations of at most this many bytes (as allocated).
    #[arg(long, value_name = "BYTES")]
    pub max_size: Option<u32>,

    /// Also rank processes by the outstanding kernel memory they allocated (a "top" for
    /// kernel allocations).
    #[arg(long)]
    pub by_process: bool,

    /// Outstanding objects the in-kernel table can hold (rounded up to a power of two).
    /// The table takes 56 bytes of kernel memory per object; allocations that do not fit are
    /// counted as dropped.
    #[arg(long, value_name = "OBJECTS", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(1024..=(1 << 26)))]
    pub capacity: u32,

    /// How to attach to the kernel's allocation events: BTF tracepoints (cheapest, needs kernel
    /// BTF and a verifier that accepts them), classic tracepoints, or the first that works.
    #[arg(long, value_enum, default_value_t = AttachMethod::Auto)]
    pub attach: AttachMethod,

    /// Benchmark floor: attach the same programs, but make each return as soon as it runs, so
    /// the report stays empty. What remains is the kernel's cost of running them
    /// (`cargo xtask bench` prints it beside memleak's).
    #[arg(long, hide = true)]
    pub empty_programs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    Size,
    Count,
}

/// Kinds of kernel memory `trace` and `run` can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// kmalloc and kmem_cache objects.
    Slab,
    /// Unmovable and reclaimable pages from the page allocator, other than those backing
    /// slabs, large kmallocs, vmalloc areas and percpu chunks (counted under those kinds).
    Page,
    /// vmalloc, vmap and module areas (Linux 6.4+).
    Vmalloc,
    /// Percpu allocations.
    Percpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachMethod {
    Auto,
    Btf,
    Classic,
}

const MAX_WINDOW: Duration = Duration::from_secs(30 * 86_400);

fn parse_window(text: &str) -> Result<Duration, String> {
    duration::parse_in_range(text, Duration::from_millis(100), MAX_WINDOW)
        .map_err(|error| error.to_string())
}

fn parse_age(text: &str) -> Result<Duration, String> {
    duration::parse_in_range(text, Duration::ZERO, MAX_WINDOW).map_err(|error| error.to_string())
}

/// The kernel keeps 15 characters of a command name (TASK_COMM_LEN - 1).
fn parse_comm(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 15 {
        return Err(format!(
            "`{text}` is not a command name as the kernel stores it (1 to 15 bytes)"
        ));
    }
    Ok(text.to_owned())
}

fn parse_power_of_two(text: &str) -> Result<u32, String> {
    let value: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    if value == 0 || !value.is_power_of_two() || value > 1 << memleak_common::MAX_SAMPLE_SHIFT {
        return Err(format!("`{text}` must be a power of two from 1 to 65536"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_typical_trace_command() {
        let cli = Cli::try_parse_from([
            "memleak",
            "trace",
            "--duration",
            "200s",
            "--format",
            "json",
            "--top",
            "5",
            "--sort",
            "count",
            "--min-age",
            "500ms",
        ])
        .unwrap();
        let Command::Trace(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.duration, Some(Duration::from_secs(200)));
        assert_eq!(args.tracing.report.format, Format::Json);
        assert_eq!(args.tracing.report.top, 5);
        assert_eq!(args.tracing.sort, SortKey::Count);
        assert_eq!(args.tracing.min_age, Some(Duration::from_millis(500)));
        assert_eq!(args.tracing.sample_rate, 1);
        assert!(!args.checks.enabled());
    }

    #[test]
    fn parses_a_ci_run_command() {
        let cli = Cli::try_parse_from([
            "memleak",
            "run",
            "--fail-on-leak",
            "--module",
            "leaky",
            "--junit",
            "out.xml",
            "--grace",
            "1s",
            "--",
            "insmod",
            "leaky.ko",
            "n=100",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.command, ["insmod", "leaky.ko", "n=100"]);
        assert_eq!(args.grace, Duration::from_secs(1));
        assert!(args.checks.fail_on_leak);
        assert_eq!(args.checks.module.as_deref(), Some("leaky"));
        assert!(Cli::try_parse_from(["memleak", "run", "--fail-on-leak"]).is_err());
    }

    #[test]
    fn rejects_absurd_values() {
        for bad in [
            &["memleak", "trace", "--duration", "0s"][..],
            &["memleak", "trace", "--duration", "400d"],
            &["memleak", "trace", "--duration", "10"],
            &["memleak", "trace", "--top", "0"],
            &["memleak", "trace", "--sample-rate", "3"],
            &["memleak", "trace", "--sample-rate", "131072"],
            &["memleak", "trace", "--capacity", "10"],
            &["memleak", "trace", "--no-such-flag"],
            &["memleak", "trace", "--comm", "a-name-longer-than-15"],
            &["memleak", "trace", "--min-size", "-1"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
