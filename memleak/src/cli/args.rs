//! Every clap structure: what the command line accepts, with its help text. `convert.rs`
//! turns them into the library's option types; nothing below the commands sees these.
use std::{path::PathBuf, time::Duration};

use clap::Args;
use memleak::{
    bpf::probes::AttachMethod, kinds::Kind, output::Format, trace::aggregate::SortKey,
    util::duration,
};

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

    /// With --user: also follow the processes COMMAND forks (and theirs), from their first
    /// instruction to their exit or their exec of another program. The hooks are then placed
    /// in every process that maps the allocator and record only these: every other process's
    /// allocations on the machine pay a uprobe trap while the command runs.
    #[arg(long, requires = "user")]
    pub follow_forks: bool,

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
    pub similarity: SimilarityOptions,

    /// Track one object in N, chosen by a hash of its address (a power of two up to 65536).
    /// Cuts overhead for continuous use; counts become estimates, scaled by N.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_power_of_two)]
    pub sample_rate: u32,

    /// Capture the full kernel stack of one allocation in N (a power of two up to 65536; with
    /// --sample-rate M >= N, of every tracked object), at most one every 16 ms per CPU, and of
    /// the first allocation from each call site. Every allocation is still counted exactly per
    /// call site; N=1 captures every stack, with no limit: exact per-stack counts at several
    /// times the overhead.
    /// Default 64; 1 with --user, where the stack names the caller of a language runtime's
    /// allocator (Rust's vector growth, C++'s operator new) and the uprobes cost far more.
    #[arg(long, value_name = "N", value_parser = parse_power_of_two)]
    pub stack_sample_rate: Option<u32>,

    /// Kinds of kernel memory to follow, comma-separated. Kinds this kernel cannot trace are
    /// left out, and the report says so.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::Slab, Kind::Page, Kind::Vmalloc, Kind::Percpu])]
    pub kinds: Vec<Kind>,

    /// Record only allocations made by this process (thread-group id). With --user, the
    /// process whose heap `trace` follows.
    #[arg(short, long)]
    pub pid: Option<u32>,

    /// Follow a user-space process's heap instead of kernel memory: malloc, calloc, realloc,
    /// reallocarray, the aligned allocators and free, and anonymous mmap/munmap, by uprobes on
    /// the C library (and on jemalloc, tcmalloc or mimalloc where they define the same
    /// functions). `trace --user --pid PID` follows a running process; `run --user -- COMMAND`
    /// follows COMMAND from its first instruction to its exit (the processes it forks with
    /// --follow-forks).
    #[arg(long, conflicts_with_all = ["kinds", "attach", "comm", "by_process", "cache"])]
    pub user: bool,

    /// With each captured kernel stack, also capture the user-space stack of the task that
    /// made the allocation (its system call or page fault), so that an entry shows the program
    /// lines behind it. Kept only where the kernel stack passes through no interrupt; shown
    /// with symbols for the processes still running at report time.
    #[arg(long, conflicts_with = "user")]
    pub user_stacks: bool,

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

    /// Tests and benchmarks: load the eBPF build for kernels before Linux 5.12, whose object
    /// table claims slots with plain stores checked after writing, on any kernel.
    #[arg(long, hide = true)]
    pub plain_claims: bool,
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

#[derive(Debug, Default, Args)]
pub struct LeakCheckArgs {
    /// Exit with status 1 when the outstanding allocations in scope exceed --max-bytes or
    /// --max-count.
    #[arg(long)]
    pub fail_on_leak: bool,

    /// Count only allocations with a stack frame in this kernel module (again for more than
    /// one: a frame in any of them). Modules unloaded during the window count too: their
    /// symbols are recorded while they are loaded.
    #[arg(long, value_name = "NAME")]
    pub module: Vec<String>,

    #[command(flatten)]
    pub scope: CheckScopeArgs,

    /// Write the check's result as JUnit XML to FILE (implies the check, not the exit status).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

/// What a leak check counts besides the modules, and how much it allows; shared by `trace`,
/// `run` and `vm`.
#[derive(Debug, Default, Args)]
pub struct CheckScopeArgs {
    /// Count only allocations with a stack frame in a function matching GLOB (`*`, `?`).
    #[arg(long, value_name = "GLOB")]
    pub function: Option<String>,

    /// Count only allocations from this slab cache (`kmalloc-64`, `filp`, ...); when SLUB
    /// merged it with others, its kmem_cache allocations under any of their names. Also scans
    /// the cache's objects when the window ends, finds its largest group of objects with
    /// similar contents (as `memleak scan` does), and marks the traced allocations that look
    /// like it: their call site is the suspected leaker.
    #[arg(long, value_name = "NAME")]
    pub cache: Option<String>,

    /// Outstanding bytes allowed in scope.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub max_bytes: u64,

    /// Outstanding objects allowed in scope.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_count: u64,
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// The slab cache to scan, by its name in /proc/slabinfo or /sys/kernel/slab
    /// (`kmalloc-64`, `msg_msg-64`, `filp`). A name SLUB made an alias of another cache
    /// (merging) is scanned as that cache, and the report says so.
    #[arg(long, value_name = "NAME")]
    pub cache: String,

    #[command(flatten)]
    pub similarity: SimilarityOptions,

    #[command(flatten)]
    pub report: ReportOptions,
}

/// How similar two objects must be; shared by `scan` and `trace --cache`.
#[derive(Debug, Clone, Copy, Args)]
pub struct SimilarityOptions {
    /// Two slab objects are similar when at least this percentage of their informative bytes
    /// (bytes other than 0x00, 0xff and slab poison values) are equal.
    #[arg(long, value_name = "PERCENT", default_value_t = 65,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub similarity: u8,

    /// Leave the objects' bytes and strings out of the report: slab objects can hold keys,
    /// passwords, paths and user data. Group sizes, addresses and the kernel symbols their
    /// words point to stay.
    #[arg(long)]
    pub no_contents: bool,
}

/// `memleak classify`'s options; the command's help text is in cli.rs.
#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// How long to sample, like 10s or 5m (at least two intervals). Ctrl-C or SIGTERM end the
    /// window early; the report is printed either way.
    #[arg(short, long, default_value = "10s", value_parser = parse_sample_window)]
    pub duration: Duration,

    /// Time between samples, like 1s or 500ms.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,

    /// Growth slower than this many bytes per second is not growth (1024 B/s is about
    /// 3.5 MiB an hour).
    #[arg(long, value_name = "BYTES", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(0..=1 << 40))]
    pub min_rate: u64,

    /// Growth of less than this many bytes over the whole window is noise.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u64).range(0..=1 << 50))]
    pub noise_floor: u64,

    /// Blame growth of reclaimable slab (dentries, inodes: caches the kernel frees under
    /// memory pressure) in the verdict too. Without it, such growth is reported but not
    /// called a leak.
    #[arg(long)]
    pub blame_reclaimable: bool,

    #[command(flatten)]
    pub report: ReportOptions,
}

fn parse_sample_window(text: &str) -> Result<Duration, String> {
    duration::parse_in_range(
        text,
        Duration::from_millis(200),
        Duration::from_secs(86_400),
    )
    .map_err(|error| error.to_string())
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    duration::parse_in_range(text, Duration::from_millis(100), Duration::from_secs(3_600))
        .map_err(|error| error.to_string())
}

#[derive(Debug, Args)]
pub struct KmemleakArgs {
    /// Read a saved report from FILE (`-` for standard input) instead of scanning the running
    /// kernel. Reports copied from dmesg or the journal, with text around them, are fine.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,

    #[command(flatten)]
    pub report: ReportOptions,

    /// After reading the report, tell kmemleak to stop reporting these objects, so that the
    /// next run shows only new suspects.
    #[arg(long, conflicts_with = "from")]
    pub clear: bool,

    /// Set the period of kmemleak's background scans, in whole seconds like 600s or 10m
    /// (0s stops them).
    #[arg(long = "scan-interval", value_name = "DUR", value_parser = parse_scan_interval,
          conflicts_with = "from")]
    pub scan_interval_secs: Option<u32>,

    /// Where debugfs is mounted. By default /sys/kernel/debug, mounted there if needed.
    #[arg(long, value_name = "DIR", conflicts_with = "from")]
    pub debugfs: Option<PathBuf>,
}

/// kmemleak takes its scan period in whole seconds, as an unsigned int.
fn parse_scan_interval(text: &str) -> Result<u32, String> {
    let interval = duration::parse(text).map_err(|error| error.to_string())?;
    if interval.subsec_nanos() != 0 {
        return Err(format!("`{text}` is not a whole number of seconds"));
    }
    u32::try_from(interval.as_secs()).map_err(|_| format!("`{text}` is too long"))
}

/// `memleak watch`'s options.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Time between snapshots, like 60s or 5m (at least 200ms).
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_watch_interval)]
    pub interval: Duration,

    /// Stop after this long, like 12h. Without it, watch until Ctrl-C or SIGTERM; the final
    /// verdicts are printed either way.
    #[arg(short, long, value_name = "DUR", value_parser = parse_window)]
    pub duration: Option<Duration>,

    /// Track one object in N, chosen by a hash of its address (a power of two up to 65536).
    /// With the default --duty 10, one allocation in 80 is tracked; counts are estimates,
    /// scaled to match.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = parse_power_of_two)]
    pub sample_rate: u32,

    /// Capture the full kernel stack of one allocation in N (and of the first allocation
    /// from each call site).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_power_of_two)]
    pub stack_sample_rate: u32,

    /// Kinds of kernel memory to follow, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::Slab, Kind::Vmalloc, Kind::Percpu])]
    pub kinds: Vec<Kind>,

    /// Record only allocations made by this process (thread-group id).
    #[arg(short, long)]
    pub pid: Option<u32>,

    /// Outstanding objects the in-kernel table can hold (rounded up to a power of two).
    #[arg(long, value_name = "OBJECTS", default_value_t = 1 << 18,
          value_parser = clap::value_parser!(u32).range(1024..=(1 << 26)))]
    pub capacity: u32,

    /// How to attach to the kernel's allocation events.
    #[arg(long, value_enum, default_value_t = AttachMethod::Auto)]
    pub attach: AttachMethod,

    /// The history store (SQLite), created if missing; a restarted watch continues its series.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/lib/memleak/history.sqlite",
        conflicts_with = "no_history"
    )]
    pub history: PathBuf,

    /// Keep the series in memory only.
    #[arg(long)]
    pub no_history: bool,

    /// How long the store keeps points and verdicts, like 7d.
    #[arg(long, value_name = "DUR", default_value = "7d", value_parser = parse_window)]
    pub retain: Duration,

    /// Intervals each verdict looks back over.
    #[arg(long, value_name = "N", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(4..=10_000))]
    pub window: u32,

    /// Intervals of sustained growth of aging objects before a site is a leak (warning).
    #[arg(long, value_name = "N", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(3..=10_000))]
    pub warning_intervals: u32,

    /// Growth, in objects over the window, below which a site is not reported.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub min_growth: u64,

    /// The Mann-Kendall p-value below which growth is beyond chance.
    #[arg(long, value_name = "P", default_value_t = 0.01, value_parser = parse_probability)]
    pub significance: f64,

    /// A leak is critical past this many leaked bytes...
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub critical_bytes: u64,

    /// ...or once it has grown this long, like 1h.
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_window)]
    pub critical_after: Duration,

    /// Age the oldest object of a site must reach before its growth can be a leak: younger
    /// objects may be waiting for an RCU free that fires no event (kfree_rcu batches drain
    /// every 5 s, lazy RCU defers up to 10 s more).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_age)]
    pub settle: Duration,

    /// Percent of each interval the slab allocation hooks are attached (the free hooks always
    /// are); 100 traces all the time. Counts are scaled up to match.
    #[arg(long, value_name = "PERCENT", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub duty: u32,

    /// Exit with status 1 when a site was judged leaking (warning or critical).
    #[arg(long)]
    pub fail_on_leak: bool,

    /// Run CMD (with `sh -c`, as root) when a site first reaches warning or critical, with the
    /// leak as JSON on its standard input. The watch does not wait for it.
    #[arg(long, value_name = "CMD")]
    pub on_leak: Option<String>,

    /// Serve /metrics (Prometheus) and /api/interval (JSON) on ADDR: `9100` is
    /// 127.0.0.1:9100; any other address must be spelled out, like 0.0.0.0:9100.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub report: ReportOptions,
}

/// A bare port listens on loopback only; anything else must be a full address.
fn parse_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| {
        format!("`{text}` is neither a port nor an address like 127.0.0.1:9100 or [::1]:9100")
    })
}

fn parse_watch_interval(text: &str) -> Result<Duration, String> {
    duration::parse_in_range(
        text,
        Duration::from_millis(200),
        Duration::from_secs(86_400),
    )
    .map_err(|error| error.to_string())
}

fn parse_probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value > 0.0 && value < 1.0 => Ok(value),
        _ => Err(format!("`{text}` is not a probability between 0 and 1")),
    }
}

/// `memleak history`'s options.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The history store `memleak watch` wrote.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/lib/memleak/history.sqlite"
    )]
    pub history: PathBuf,

    /// Verdicts of this long ago and since, like 1d.
    #[arg(long, value_name = "DUR", default_value = "1d", value_parser = parse_window)]
    pub since: Duration,

    /// Also print the series of the sites whose call site contains TEXT.
    #[arg(long, value_name = "TEXT")]
    pub site: Option<String>,

    /// Report format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct VmArgs {
    /// The kernel to boot: 5.10, 6.1 or 6.12 (Debian's, downloaded once with apt and cached
    /// under ~/.cache/memleak/vm), or the path of a bzImage or vmlinux you built.
    #[arg(long, value_name = "SERIES|PATH", default_value = "6.1")]
    pub kernel: String,

    /// Print the directory of the kernel's headers, to build modules against (`make -C DIR
    /// M=$PWD modules`), fetching them if needed, and exit. Debian's kernels only.
    #[arg(long)]
    pub print_headers: bool,

    /// A module to load before COMMAND and unload after it; again for more, loaded in the order
    /// given and unloaded in reverse. The leak checks are scoped to them unless --scope-module
    /// says otherwise.
    #[arg(long = "module", value_name = "FILE.ko")]
    pub modules: Vec<PathBuf>,

    /// insmod's parameters for one of the modules: `NAME:PARAM=VALUE ...`, like
    /// `mydriver:debug=1 queues=4`.
    #[arg(long = "module-params", value_name = "NAME:PARAMS")]
    pub module_params: Vec<String>,

    /// Scope both leak checks to this module instead of the loaded ones (again for more).
    #[arg(long, value_name = "NAME")]
    pub scope_module: Vec<String>,

    #[command(flatten)]
    pub scope: CheckScopeArgs,

    /// After COMMAND, and after the unload, keep tracing this long for deferred frees.
    #[arg(long, value_name = "DUR", default_value = "3s", value_parser = parse_age)]
    pub grace: Duration,

    /// A file or directory COMMAND needs, copied into the guest's /work (its working directory).
    /// The guest has busybox, memleak and these: bring scripts and static binaries.
    #[arg(long = "file", value_name = "PATH")]
    pub files: Vec<PathBuf>,

    /// How long the guest may run, from boot to power-off.
    #[arg(long, value_name = "DUR", default_value = "10m", value_parser = parse_window)]
    pub timeout: Duration,

    /// Where the reports (text and JSON), the JUnit files, COMMAND's output and the guest's
    /// console log go.
    #[arg(long, value_name = "DIR", default_value = "memleak-vm")]
    pub output_dir: PathBuf,

    /// The command to run in the guest, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete memleak's subcommands and options in.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManpagesArgs {
    /// The directory to write memleak.1 and one memleak-SUBCOMMAND.1 per subcommand into
    /// (created if missing), like /usr/local/share/man/man1.
    #[arg(value_name = "DIR")]
    pub directory: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_scan_interval_in_whole_seconds() {
        assert_eq!(parse_scan_interval("10m"), Ok(600));
        assert_eq!(parse_scan_interval("0s"), Ok(0));
        assert!(parse_scan_interval("1500ms").is_err());
        assert!(parse_scan_interval("200").is_err());
        assert!(parse_scan_interval("50000d").is_err());
    }
}
