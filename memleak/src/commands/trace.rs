//! `memleak trace` and `memleak run`: attach, wait (for a window or a command) with a progress
//! line, detach, report, check.
use std::{
    io::IsTerminal as _,
    os::unix::process::ExitStatusExt as _,
    process::{ExitCode, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use memleak::{
    bpf::{
        maps::{self as table, TracerMaps},
        probes::{self, Tracer},
    },
    kernel::{self, privileges},
    kinds::Kind,
    output::{self, Format, Plain, ReportSink, profile},
    scan,
    symbols::ModuleSymbols,
    trace::{
        accounting,
        build::{self as report_build, KernelMemory, ReportHeader},
        check::{self, LeakCheck},
        report::{self, Verdict},
    },
    util::{clock::monotonic_now_ns, duration, units::thousands},
};

use super::{signals::StopSignals, sleep_until};
use crate::cli::{RunArgs, TraceArgs, TraceOptions};

/// `memleak trace`: traces for the window (or until SIGINT / SIGTERM), then reports.
pub fn trace(args: &TraceArgs) -> Result<ExitCode> {
    let options = TraceOptions::from(&args.tracing);
    let leak_check = LeakCheck::from(&args.checks);
    let mut session = Session::start(&options, leak_check.cache.as_deref())?;
    eprintln!(
        "memleak: attached to the kernel's allocation events ({}); tracing {}",
        session.tracer.attached,
        match args.duration {
            Some(window) => format!("for {}, Ctrl-C ends early", duration::display(window)),
            None => "until Ctrl-C".to_owned(),
        }
    );
    let deadline = args
        .duration
        .map(|window| tokio::time::Instant::now() + window);
    session.runtime.block_on(watch(
        &session.tracer.maps,
        &mut session.module_symbols,
        sleep_until(deadline),
        |_| true,
    ))?;
    let verdict = session.finish(&options, &leak_check)?;
    Ok(match verdict {
        Some(verdict) if verdict.failed && leak_check.fail_on_leak => {
            ExitCode::from(check::EXIT_LEAK)
        }
        _ => ExitCode::SUCCESS,
    })
}

/// `memleak run`: traces while COMMAND runs and for the grace period after it, then reports.
/// Exits with the command's status, unless the leak check fails (1).
pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let options = TraceOptions::from(&args.tracing);
    let leak_check = LeakCheck::from(&args.checks);
    let mut session = Session::start(&options, leak_check.cache.as_deref())?;
    let (program, arguments) = args
        .command
        .split_first()
        .context("no command given after --")?;
    eprintln!(
        "memleak: attached to the kernel's allocation events ({}); running {}",
        session.tracer.attached,
        args.command.join(" ")
    );
    let mut child = std::process::Command::new(program)
        .args(arguments)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let pid = child.id() as libc::pid_t;
    let grace = args.grace;
    let command_then_grace = async move {
        let status = tokio::task::spawn_blocking(move || child.wait()).await;
        tokio::time::sleep(grace).await;
        anyhow::Ok(status??)
    };
    // Signals go to the command; memleak reports once it has exited.
    let forward = |signal: libc::c_int| {
        unsafe { libc::kill(pid, signal) };
        false
    };
    let status = session
        .runtime
        .block_on(watch(
            &session.tracer.maps,
            &mut session.module_symbols,
            command_then_grace,
            forward,
        ))?
        .context("signal handling stopped the wait")?
        .with_context(|| format!("waiting for {program}"))?;
    let verdict = session.finish(&options, &leak_check)?;
    if let Some(verdict) = verdict
        && verdict.failed
        && leak_check.fail_on_leak
    {
        return Ok(ExitCode::from(check::EXIT_LEAK));
    }
    Ok(exit_code_of(status))
}

/// The exit status a shell would report for the command: its code, or 128 + the signal.
fn exit_code_of(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Everything a tracing subcommand holds from attach to report.
struct Session {
    tracer: Tracer,
    runtime: tokio::runtime::Runtime,
    sink: ReportSink,
    kernel: String,
    started: Instant,
    /// With `--cache`: the content scanner, ready since before the programs attached.
    scanner: Option<scan::Scanner>,
    /// Why the content scan of `--cache` cannot be done, if it cannot.
    scan_notes: Vec<String>,
    /// Without a scanner, the slab layout for reading the sites' caches at report time.
    slab_layout: Option<Result<scan::SlabLayout>>,
    /// The kernel's counters before attaching, to set the trace against (or why not).
    counts_at_start: Result<accounting::KernelCounts, String>,
    /// Modules seen loaded during the window, kept up to date by [`watch`].
    module_symbols: ModuleSymbols,
}

impl Session {
    fn start(options: &TraceOptions, scanned_cache: Option<&str>) -> Result<Self> {
        let TraceOptions {
            trace: trace_options,
            report: report_options,
        } = options;
        let tracer_settings = &trace_options.tracer;
        if let (Some(min), Some(max)) = (tracer_settings.min_size, tracer_settings.max_size)
            && min > max
        {
            bail!("--min-size {min} is larger than --max-size {max}: nothing would be traced");
        }
        privileges::require_root()?;
        if let Some(pid) = tracer_settings.filter_tgid {
            super::require_process(pid)?;
        }
        privileges::lift_memlock_limit();
        let kernel = kernel::release()?;
        let sink = ReportSink::open(report_options.output.as_deref())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        // Parsed once, before attaching, for the programs and for reading slab caches.
        let btf = kernel::parse_btf()?;
        // Before attaching: a cache that cannot be scanned fails now rather than after the
        // window, and the scanner's own set-up is not traced.
        let mut scan_notes = Vec::new();
        let scanner = scanned_cache.and_then(|cache| {
            scan::slab_layout(btf.as_ref())
                .and_then(|layout| scan::Scanner::prepare(cache, layout))
                .map_err(|error| scan_notes.push(scan::not_done(cache, &error)))
                .ok()
        });
        let slab_layout = (scanner.is_none() && tracer_settings.kinds.contains(&Kind::Slab))
            .then(|| scan::slab_layout(btf.as_ref()));
        let counts_at_start =
            accounting::KernelCounts::read().map_err(|error| format!("{error:#}"));
        let mut module_symbols = ModuleSymbols::default();
        module_symbols.refresh();
        let tracer = probes::attach(tracer_settings, btf.as_ref())?;
        Ok(Self {
            tracer,
            runtime,
            sink,
            kernel,
            started: Instant::now(),
            scanner,
            scan_notes,
            slab_layout,
            counts_at_start,
            module_symbols,
        })
    }

    /// Detaches, reports and runs the leak check.
    fn finish(
        mut self,
        options: &TraceOptions,
        leak_checks: &LeakCheck,
    ) -> Result<Option<Verdict>> {
        let Tracer {
            programs,
            maps,
            attached,
            cache_ids_are_pointers,
            methods,
            mut notes,
            free_paths,
            ..
        } = self.tracer;
        notes.extend(self.scan_notes);
        let skipped_runs = probes::skipped_runs(&programs);
        if skipped_runs > 0 {
            notes.push(format!(
                "the kernel skipped {skipped_runs} runs of memleak's programs (another of them \
                 was running on that CPU, e.g. a softirq freeing inside a traced allocation): \
                 each is an allocation or a free not seen; a free not seen leaves its object \
                 listed as outstanding when its slot was allocated again, so entries of up to \
                 that many objects may be freed ones"
            ));
        }
        // Detach before reading, so the table is a consistent snapshot.
        drop(programs);
        let elapsed = self.started.elapsed();
        let now_ns = monotonic_now_ns();
        let counts_at_end = accounting::KernelCounts::read().map_err(|error| format!("{error:#}"));
        let mut scanner = self.scanner;
        let scan = scanner.as_mut().and_then(|scanner| {
            scanner
                .scan(options.trace.similarity, scan::TRACE_GROUPS)
                .map_err(|error| notes.push(scan::not_done(scanner.cache_name(), &error)))
                .ok()
        });

        let header = ReportHeader {
            skipped_runs,
            kernel: self.kernel,
            elapsed,
            attach: attached.to_string(),
            methods,
            cache_ids_are_pointers,
            notes,
            free_paths,
            module_symbols: self.module_symbols,
        };
        let mut report = report_build::build_report(
            &options.trace,
            &maps,
            now_ns,
            header,
            scan.as_ref(),
            KernelMemory::new(scanner.as_mut().map(scan::Scanner::view), self.slab_layout),
        )?;
        let verdict = leak_checks.enabled().then(|| {
            let verdict = leak_checks.evaluate(&report.stacks);
            eprintln!(
                "memleak: {}",
                output::text::trace::verdict_summary(&verdict)
            );
            verdict
        });
        if let (Some(verdict), Some(path)) = (&verdict, &leak_checks.junit) {
            std::fs::write(path, output::junit::render(verdict, elapsed.as_secs_f64()))
                .with_context(|| format!("writing JUnit XML to {}", path.display()))?;
        }
        report.check.clone_from(&verdict);
        match (&self.counts_at_start, &counts_at_end) {
            (Ok(start), Ok(end)) => report_build::compare_with_kernel(&mut report, start, end),
            (Err(error), _) | (_, Err(error)) => report.notes.push(format!(
                "the trace is not compared with the kernel's counters: {error}"
            )),
        }
        (report.kinds, report.caches) = report::totals(&report.stacks);
        // The stack formats weigh every site, not only the --top ones shown as text or JSON.
        match options.report.format {
            Format::Folded => self.sink.write(&profile::folded(&report.stacks))?,
            Format::Svg => self
                .sink
                .write(&profile::svg(&report.stacks, profile::Source::of(&report))?)?,
            Format::Pprof => self.sink.write_bytes(&profile::pprof(
                &report.stacks,
                profile::Source::of(&report),
            )?)?,
            Format::Text | Format::Json => {
                report.stacks.truncate(options.report.top);
                let plain = if options.report.format == Format::Text {
                    Plain::Text
                } else {
                    Plain::Json
                };
                self.sink.write(&output::render(
                    &report,
                    plain,
                    output::text::trace::render_text,
                ))?;
            }
        }
        Ok(verdict)
    }
}

/// How often /proc/modules is read for modules to record: a module loaded and unloaded
/// within it goes unrecorded (its call sites stay bare addresses).
const MODULE_POLL: Duration = Duration::from_millis(100);

/// Waits for `until`, showing progress on a terminal. On SIGINT or SIGTERM, `on_signal`
/// decides whether to stop waiting (`None`) or to go on.
async fn watch<T>(
    maps: &TracerMaps,
    module_symbols: &mut ModuleSymbols,
    until: impl Future<Output = T>,
    mut on_signal: impl FnMut(libc::c_int) -> bool,
) -> Result<Option<T>> {
    let mut signals = StopSignals::install()?;
    let started = tokio::time::Instant::now();
    let show_progress = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    // A module test script loads, tests and unloads in seconds: its symbols are recorded
    // while it is loaded, so its call sites are still named after the unload.
    let mut module_ticker = tokio::time::interval(MODULE_POLL);
    let mut last_events = 0;
    tokio::pin!(until);
    let outcome = loop {
        tokio::select! {
            signal = signals.next() => if on_signal(signal) { break None },
            output = &mut until => break Some(output),
            _ = module_ticker.tick() => module_symbols.refresh(),
            _ = ticker.tick() => {
                if show_progress {
                    let counters = table::read_counters(maps)?;
                    let events = counters.allocs + counters.frees;
                    eprint!(
                        "\r\x1b[Ktracing {}: {}/s events, {} outstanding, {} dropped, {} stack failures",
                        duration::display(started.elapsed()),
                        thousands(events - last_events),
                        thousands(counters.outstanding()),
                        thousands(counters.dropped_table_full),
                        thousands(counters.stack_failures),
                    );
                    last_events = events;
                }
            }
        }
    };
    if show_progress {
        eprint!("\r\x1b[K");
    }
    Ok(outcome)
}
