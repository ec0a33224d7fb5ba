//! The command line's structures converted once into the library's options (as kunai turns
//! its clap options into a `Config`): below the commands nothing knows about clap.
use memleak::{
    bpf::probes::TracerSettings,
    classify, kmemleak, output,
    scan::Similarity,
    trace::{self, check::LeakCheck},
    watch::{self, verdict::Thresholds},
};

use super::args::{
    ClassifyArgs, KmemleakArgs, LeakCheckArgs, ReportOptions, SimilarityOptions, TracingOptions,
    WatchArgs,
};

impl From<&ReportOptions> for output::ReportOptions {
    fn from(args: &ReportOptions) -> Self {
        Self {
            format: args.format,
            output: args.output.clone(),
            top: args.top as usize,
        }
    }
}

impl From<&SimilarityOptions> for Similarity {
    fn from(args: &SimilarityOptions) -> Self {
        Self {
            percent: args.similarity,
        }
    }
}

impl From<&LeakCheckArgs> for LeakCheck {
    fn from(args: &LeakCheckArgs) -> Self {
        Self {
            fail_on_leak: args.fail_on_leak,
            modules: args.module.clone(),
            function: args.scope.function.clone(),
            cache: args.scope.cache.clone(),
            // Known when the check is evaluated (`LeakCheck::with_cache_merges`).
            cache_merged_with: Vec::new(),
            max_bytes: args.scope.max_bytes,
            max_count: args.scope.max_count,
            junit: args.junit.clone(),
        }
    }
}

/// Kernel traces capture one stack in 64 by default: every allocation is counted exactly at
/// its call site anyway.
const STACK_SAMPLE_RATE: u32 = 64;
/// User-space traces capture every stack: a call site in a runtime's allocator is replaced by
/// the stack's first frame outside it, and a stack walk costs little beside the uprobes.
const USER_STACK_SAMPLE_RATE: u32 = 1;

/// What `trace` and `run` take from their shared options: how to trace and build the report,
/// and how to write it.
pub struct TraceOptions {
    pub trace: trace::Options,
    /// Follow a user-space process's heap (`--user`) rather than kernel memory.
    pub user: bool,
    pub report: output::ReportOptions,
}

impl From<&TracingOptions> for TraceOptions {
    fn from(args: &TracingOptions) -> Self {
        Self {
            trace: trace::Options {
                tracer: TracerSettings {
                    capacity: args.capacity,
                    sample_rate: args.sample_rate,
                    stack_sample_rate: args.stack_sample_rate.unwrap_or(if args.user {
                        USER_STACK_SAMPLE_RATE
                    } else {
                        STACK_SAMPLE_RATE
                    }),
                    filter_tgid: args.pid,
                    filter_comm: args.comm.clone(),
                    min_size: args.min_size,
                    max_size: args.max_size,
                    method: args.attach,
                    kinds: args.kinds.clone(),
                    user_stacks: args.user_stacks,
                    empty_programs: args.empty_programs,
                    plain_claims: args.plain_claims,
                    // `run --user` forgets the heaps of processes that exec another program.
                    userspace_removes_objects: args.user,
                },
                sort: args.sort,
                min_age: args.min_age.unwrap_or_default(),
                similarity: Similarity::from(&args.similarity),
                withhold_contents: args.similarity.no_contents,
                by_process: args.by_process,
                top: args.report.top as usize,
            },
            report: output::ReportOptions::from(&args.report),
            user: args.user,
        }
    }
}

impl From<&ClassifyArgs> for classify::Options {
    fn from(args: &ClassifyArgs) -> Self {
        Self {
            window: args.duration,
            interval: args.interval,
            min_rate_bytes_per_second: args.min_rate,
            noise_floor_bytes: args.noise_floor,
            blame_reclaimable: args.blame_reclaimable,
        }
    }
}

impl From<&KmemleakArgs> for kmemleak::Options {
    fn from(args: &KmemleakArgs) -> Self {
        Self {
            from: args.from.clone(),
            live: kmemleak::live::Options {
                clear: args.clear,
                scan_interval_secs: args.scan_interval_secs,
            },
            debugfs: args.debugfs.clone(),
        }
    }
}

impl From<&WatchArgs> for watch::Options {
    fn from(args: &WatchArgs) -> Self {
        Self {
            tracer: TracerSettings {
                capacity: args.capacity,
                sample_rate: args.sample_rate,
                stack_sample_rate: args.stack_sample_rate,
                filter_tgid: args.pid,
                filter_comm: None,
                min_size: None,
                max_size: None,
                method: args.attach,
                kinds: args.kinds.clone(),
                user_stacks: false,
                empty_programs: false,
                plain_claims: false,
                // Each snapshot removes the objects it found freed by paths no hook follows.
                userspace_removes_objects: true,
            },
            interval: args.interval,
            duration: args.duration,
            thresholds: Thresholds {
                min_points: 4,
                significance: args.significance,
                min_growth_objects: args.min_growth,
                warning_points: args.warning_intervals as usize,
                critical_bytes: args.critical_bytes,
                critical_seconds: args.critical_after.as_secs_f64(),
                settle_seconds: args.settle.as_secs_f64(),
                duty_cycled: args.duty < 100,
            },
            window_points: args.window as usize,
            history: (!args.no_history).then(|| args.history.clone()),
            retain: args.retain,
            top: args.report.top as usize,
            duty_percent: args.duty,
        }
    }
}
