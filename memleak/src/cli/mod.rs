//! The command line: clap's structures (args.rs) and their conversion into the library's
//! options (convert.rs). Doc comments are the help text. Only main.rs and commands/ import it.
use clap::{Parser, Subcommand};

mod args;
mod convert;

pub use args::{
    ClassifyArgs, CompletionsArgs, HistoryArgs, KmemleakArgs, ManpagesArgs, RunArgs, ScanArgs,
    TraceArgs, VmArgs, WatchArgs,
};
pub use convert::TraceOptions;

/// Exit status for errors (bad input, missing kernel features, failures to load). Usage errors
/// found by the argument parser exit with the same status.
pub const EXIT_ERROR: u8 = 2;

/// Find kernel memory leaks with eBPF, on kernels without kmemleak.
#[derive(Debug, Parser)]
#[command(
    version = memleak::util::build::SHORT_VERSION,
    long_version = memleak::util::build::LONG_VERSION,
    about,
    long_about = None,
    propagate_version = true
)]
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
    Kmemleak(KmemleakArgs),
    /// Sample /proc/meminfo, /proc/slabinfo and /proc/vmallocinfo for a few seconds and say
    /// which kind of kernel memory grows (slab, vmalloc, percpu, pages), which slab caches
    /// grow, and which `memleak trace` to run next.
    ///
    /// A kind, slab cache or vmalloc caller is growing when the least-squares line through its
    /// samples rises at least --min-rate, by at least --noise-floor over the window, and by at
    /// least 3 times the samples' scatter around the line. Reclaimable slab growth is reported
    /// but not blamed unless --blame-reclaimable.
    Classify(ClassifyArgs),
    /// Read every object of a slab cache from kernel memory and find the largest groups of
    /// objects with similar contents: what a long-running leak leaves behind.
    Scan(ScanArgs),
    /// Watch continuously: snapshot every allocation site each interval, keep the series, and
    /// judge which sites leak (growth beyond chance, objects that keep aging, growth that does
    /// not level off) rather than which are merely outstanding. Cheap enough to leave on: by
    /// default one object in 64 is tracked.
    Watch(WatchArgs),
    /// Print the verdicts and series a watch stored.
    History(HistoryArgs),
    /// Boot a kernel in a VM (qemu), load kernel modules, run a test command under a leak check
    /// scoped to them, unload them and check what they left; bring the reports, JUnit files
    /// and console log back. Exits with the command's status, 1 on a leak, 2 on errors.
    ///
    /// Two checks: "tests", around COMMAND with the modules loaded (what their code allocated
    /// during the tests and did not free); "unload", from before insmod to after rmmod (what
    /// their code allocated and is still allocated once they are gone). Needs the static
    /// memleak (./x dist, or the Debian package), qemu-system-x86_64 and a static busybox.
    Vm(VmArgs),
    /// Print a completion script for a shell: `memleak completions bash >
    /// /etc/bash_completion.d/memleak` (the Debian package installs them for bash, zsh and fish).
    Completions(CompletionsArgs),
    /// Write the man pages, memleak(1) and memleak-SUBCOMMAND(1), into a directory (the Debian
    /// package installs them).
    Manpages(ManpagesArgs),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::CommandFactory as _;
    use memleak::{output::Format, trace::aggregate::SortKey};

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        // Checks only in builds with debug assertions; the suite runs release builds, where
        // the completions below are what fails on a dangling argument reference.
        Cli::command().debug_assert();
    }

    /// What `./x dist` generates: an argument that names another one not in its subcommand
    /// (`conflicts_with`) made `completions zsh` panic in the release build.
    #[test]
    fn every_shells_completions_generate() {
        use clap::ValueEnum as _;
        for shell in clap_complete::Shell::value_variants() {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "memleak", &mut script);
            assert!(!script.is_empty(), "{shell}");
        }
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
        assert!(!memleak::trace::check::LeakCheck::from(&args.checks).enabled());
    }

    /// Only the commands whose userspace removes objects from the table while the programs run
    /// load programs whose frees empty slots by compare-and-swap.
    #[test]
    fn only_watch_and_user_runs_remove_objects_from_the_table() {
        let removes = |line: &[&str]| match Cli::try_parse_from(line).unwrap().command {
            Command::Trace(args) => TraceOptions::from(&args.tracing).trace.tracer,
            Command::Run(args) => TraceOptions::from(&args.tracing).trace.tracer,
            Command::Watch(args) => memleak::watch::Options::from(&args).tracer,
            _ => panic!("{line:?}: not a tracing command"),
        }
        .userspace_removes_objects;
        assert!(!removes(&["memleak", "trace"]));
        assert!(!removes(&["memleak", "run", "--", "true"]));
        assert!(removes(&["memleak", "run", "--user", "--", "true"]));
        assert!(removes(&["memleak", "watch"]));
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
        assert_eq!(args.checks.module, ["leaky"]);
        assert!(Cli::try_parse_from(["memleak", "run", "--fail-on-leak"]).is_err());
    }

    #[test]
    fn user_is_for_trace_and_run_alone() {
        for good in [
            &["memleak", "trace", "--user", "--pid", "42"][..],
            &["memleak", "trace", "--user-stacks", "--kinds", "slab"],
            &["memleak", "run", "--user-stacks", "--", "./a.out"],
            &[
                "memleak",
                "run",
                "--user",
                "--fail-on-leak",
                "--",
                "./a.out",
            ],
        ] {
            assert!(Cli::try_parse_from(good).is_ok(), "{good:?} was refused");
        }
        for bad in [
            &["memleak", "trace", "--user", "--kinds", "slab"][..],
            &["memleak", "trace", "--user", "--cache", "filp"],
            &["memleak", "run", "--user", "--comm", "a", "--", "./a.out"],
            &["memleak", "watch", "--user"],
            &["memleak", "trace", "--user", "--user-stacks", "--pid", "42"],
            &["memleak", "watch", "--user-stacks"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} was accepted");
        }
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
