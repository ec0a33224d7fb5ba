//! `memleak trace` and `memleak run`: attach, wait (for a window or a command) with a progress
//! line, detach, report, check.
use std::{
    io::IsTerminal as _,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    process::{ExitCode, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hashbrown::{HashMap, HashSet};

use memleak::{
    bpf::{
        maps::{self as table, TracerMaps},
        probes::{self, Tracer},
        uprobes::{self, FollowedProcesses},
    },
    kernel::{self, privileges, process::ProcessMaps, slab_merges::SlabMerges},
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

use super::{
    signals::StopSignals,
    sleep_until,
    traced_command::{Forks, TracedCommand},
};
use crate::cli::{RunArgs, TraceArgs, TraceOptions};

/// `memleak trace`: traces for the window (or until SIGINT / SIGTERM), then reports.
pub fn trace(args: &TraceArgs) -> Result<ExitCode> {
    let options = TraceOptions::from(&args.tracing);
    let leak_check = LeakCheck::from(&args.checks);
    let mut session = if options.user {
        let Some(pid) = options.trace.tracer.filter_tgid else {
            bail!(
                "--user needs --pid PID, the process whose heap to trace (or `memleak run \
                 --user -- COMMAND` to start one)"
            );
        };
        super::require_process(pid)?;
        let maps = ProcessMaps::read(pid)?;
        let candidates: Vec<PathBuf> = maps
            .executable_files()
            .into_iter()
            .map(Path::to_owned)
            .collect();
        Session::start_user(&options, pid, &candidates, maps, false)?.0
    } else {
        Session::start(&options, leak_check.cache.as_deref())?
    };
    eprintln!(
        "memleak: attached to {} ({}); tracing {}",
        session.target(),
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
        &mut session.polled,
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
    let (program, arguments) = args
        .command
        .split_first()
        .context("no command given after --")?;
    if options.user {
        return run_user(&options, &leak_check, &args.command, args.follow_forks);
    }
    let mut session = Session::start(&options, leak_check.cache.as_deref())?;
    eprintln!(
        "memleak: attached to {} ({}); running {}",
        session.target(),
        session.tracer.attached,
        args.command.join(" ")
    );
    let grace = args.grace;
    // With --user-stacks the command is held as it exits, so that its mappings name the user
    // frames of its kernel allocations after it is gone.
    type Exit = (ExitStatus, Option<ProcessMaps>);
    let (pid, command): (u32, Pin<Box<dyn Future<Output = Result<Exit>>>>) =
        if options.trace.tracer.user_stacks {
            let traced = TracedCommand::start(program, arguments)?;
            let pid = traced.pid;
            let command = async move {
                let exited = tokio::task::spawn_blocking(move || traced.run(None)).await??;
                anyhow::Ok((exited.status, exited.maps))
            };
            (pid, Box::pin(command))
        } else {
            let mut child = std::process::Command::new(program)
                .args(arguments)
                .spawn()
                .with_context(|| format!("starting {program}"))?;
            let pid = child.id();
            let command = async move {
                anyhow::Ok((
                    tokio::task::spawn_blocking(move || child.wait()).await??,
                    None,
                ))
            };
            (pid, Box::pin(command))
        };
    let command_then_grace = async move {
        let exit = command.await;
        tokio::time::sleep(grace).await;
        exit
    };
    let (status, maps) = session
        .runtime
        .block_on(watch(
            &session.tracer.maps,
            &mut session.polled,
            command_then_grace,
            forward_to(pid as libc::pid_t),
        ))?
        .context("signal handling stopped the wait")?
        .with_context(|| format!("running {program}"))?;
    if let Some(maps) = maps {
        session.polled.exited_maps.insert(pid, maps);
    }
    let verdict = session.finish(&options, &leak_check)?;
    Ok(status_or_leak(status, verdict.as_ref(), &leak_check))
}

/// `memleak run --user`: COMMAND's heap from its first instruction to its exit.
fn run_user(
    options: &TraceOptions,
    leak_check: &LeakCheck,
    command: &[String],
    follow_forks: bool,
) -> Result<ExitCode> {
    let (program, arguments) = command.split_first().context("no command given after --")?;
    privileges::require_root()?;
    let path = kernel::process::find_program(program)
        .with_context(|| format!("starting {program}: not found in PATH"))?;
    // The command is held at its first instruction: its libraries are not mapped yet. Its
    // loader lists them (an allocator linked in or preloaded among them); where it cannot,
    // the C library is looked up where the loader looks, and LD_PRELOAD read here.
    let mut candidates = vec![path.clone()];
    let unlisted = match kernel::process::linked_libraries(&path) {
        Ok(libraries) => {
            candidates.extend(libraries);
            None
        }
        Err(error) => {
            if let Ok(preload) = std::env::var("LD_PRELOAD") {
                candidates.extend(
                    preload
                        .split([' ', ':'])
                        .filter(|entry| !entry.is_empty())
                        .map(|entry| {
                            kernel::process::find_library(entry)
                                .unwrap_or_else(|| PathBuf::from(entry))
                        }),
                );
            }
            candidates.extend(kernel::process::find_library("libc.so.6"));
            Some(format!(
                "{program}'s libraries could not be listed ({error:#}): only an allocator in \
                 the program, LD_PRELOAD or the C library is hooked"
            ))
        }
    };
    let traced = TracedCommand::start(program, arguments)?;
    let pid = traced.pid;
    let started = Session::start_user(
        options,
        pid,
        &candidates,
        ProcessMaps::default(),
        follow_forks,
    );
    let (mut session, followed) = match started {
        Ok(started) => started,
        Err(error) => {
            traced.abandon();
            return Err(error);
        }
    };
    session.tracer.notes.extend(unlisted);
    eprintln!(
        "memleak: attached to {} ({}); running {}",
        session.target(),
        session.tracer.attached,
        command.join(" ")
    );
    let exited = async move { tokio::task::spawn_blocking(move || traced.run(followed)).await? };
    let exited = session
        .runtime
        .block_on(watch(
            &session.tracer.maps,
            &mut session.polled,
            exited,
            forward_to(pid as libc::pid_t),
        ))?
        .context("signal handling stopped the wait")?
        .with_context(|| format!("running {program}"))?;
    if let Some(maps) = exited.maps {
        session.polled.user_maps = Some(maps);
    }
    session
        .tracer
        .notes
        .extend(forks_note(&exited.forks, follow_forks));
    session.replaced_processes = exited.forks.replaced;
    session.tracer.notes.push(
        "blocks listed were not freed before the command exited: a record of what was \
         allocated and never freed, not a reachability analysis (valgrind's \"definitely \
         lost\" also needs no pointer to remain)"
            .to_owned(),
    );
    let verdict = session.finish(options, leak_check)?;
    Ok(status_or_leak(exited.status, verdict.as_ref(), leak_check))
}

/// Removes the blocks of `processes` from the table (their program was replaced, and its heap
/// with it), and says how many there were.
fn forget_processes(maps: &TracerMaps, processes: &HashSet<u32>) -> Result<Option<String>> {
    let mut blocks = HashMap::new();
    table::for_each_outstanding(maps, |key, record| {
        if processes.contains(&record.tgid) {
            blocks.insert(key, *record);
        }
    })?;
    let removed = table::remove_objects(maps, &blocks)?;
    Ok((removed > 0).then(|| {
        format!(
            "{removed} blocks of forked processes that exec'ed another program are left out: \
             the exec freed them"
        )
    }))
}

/// What the report says of the processes the command forked, if it forked any.
fn forks_note(forks: &Forks, follow_forks: bool) -> Option<String> {
    if !follow_forks {
        return (forks.not_followed > 0).then(|| {
            format!(
                "the command forked {} processes, whose heaps are not followed \
                 (--follow-forks follows them)",
                forks.not_followed
            )
        });
    }
    let mut said = vec![format!(
        "followed {} processes forked by the command from their first instruction; their \
         frames are named from the command's mappings (a fork's are its parent's)",
        forks.followed
    )];
    if !forks.replaced.is_empty() {
        said.push(format!(
            "{} of them exec'ed another program: their blocks from before are left out (the \
             exec freed them with their old program) and what they ran after is not followed",
            forks.replaced.len()
        ));
    }
    if forks.still_running > 0 {
        said.push(format!(
            "{} were still running when the command exited: their blocks are those not freed \
             by then",
            forks.still_running
        ));
    }
    if forks.command_replaced_after_fork {
        said.push(
            "the command exec'ed another program after forking: its children's frames are \
             named from the new program's mappings, which may not be theirs"
                .to_owned(),
        );
    }
    if forks.not_followed > 0 {
        said.push(format!(
            "{} more could not be followed (the map of followed processes was full)",
            forks.not_followed
        ));
    }
    Some(said.join("; "))
}

/// Signals go to the command; memleak reports once it has exited.
fn forward_to(pid: libc::pid_t) -> impl FnMut(libc::c_int) -> bool {
    move |signal| {
        unsafe { libc::kill(pid, signal) };
        false
    }
}

/// The leak check's status when it failed with `--fail-on-leak`, else the command's.
fn status_or_leak(
    status: ExitStatus,
    verdict: Option<&Verdict>,
    leak_check: &LeakCheck,
) -> ExitCode {
    if let Some(verdict) = verdict
        && verdict.failed
        && leak_check.fail_on_leak
    {
        return ExitCode::from(check::EXIT_LEAK);
    }
    exit_code_of(status)
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
    /// The kernel's counters before attaching, to set the trace against (or why not); `None`
    /// for a user-space trace.
    counts_at_start: Option<Result<accounting::KernelCounts, String>>,
    /// What is read while the trace runs, for symbolizing after it.
    polled: Polled,
    /// Processes whose program exec replaced (`run --user --follow-forks`): their blocks went
    /// with it, and are left out of the report.
    replaced_processes: HashSet<u32>,
}

/// What [`watch`] keeps up to date while the trace runs: the modules seen loaded, and for a
/// user-space trace, the traced process's mappings.
#[derive(Default)]
struct Polled {
    module_symbols: ModuleSymbols,
    user_pid: Option<u32>,
    /// The last mappings read while the process was alive.
    user_maps: Option<ProcessMaps>,
    /// Mappings of processes read as they exited (`run --user-stacks`'s command), by pid.
    exited_maps: HashMap<u32, ProcessMaps>,
}

impl Polled {
    fn refresh(&mut self) {
        match self.user_pid {
            // Gone: the last mappings read stand.
            Some(pid) => {
                if let Ok(maps) = ProcessMaps::read(pid)
                    && !maps.mappings.is_empty()
                {
                    self.user_maps = Some(maps);
                }
            }
            None => self.module_symbols.refresh(),
        }
    }
}

impl Session {
    fn start(options: &TraceOptions, scanned_cache: Option<&str>) -> Result<Self> {
        let TraceOptions {
            trace: trace_options,
            report: report_options,
            ..
        } = options;
        let tracer_settings = &trace_options.tracer;
        if let Some(pid) = tracer_settings.filter_tgid {
            super::require_process(pid)?;
        }
        let prepared = prepare(tracer_settings, report_options)?;
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
        let mut polled = Polled::default();
        polled.refresh();
        let tracer = probes::attach(tracer_settings, btf.as_ref())?;
        Ok(Self {
            scanner,
            scan_notes,
            slab_layout,
            counts_at_start: Some(counts_at_start),
            ..Self::attached(tracer, prepared, polled)
        })
    }

    /// A session of `tracer`, just attached, with nothing of the kernel side.
    fn attached(tracer: Tracer, prepared: Prepared, polled: Polled) -> Self {
        Self {
            tracer,
            runtime: prepared.runtime,
            sink: prepared.sink,
            kernel: prepared.kernel,
            started: Instant::now(),
            scanner: None,
            scan_notes: Vec::new(),
            slab_layout: None,
            counts_at_start: None,
            polled,
            replaced_processes: HashSet::new(),
        }
    }

    /// Attaches to the heap of process `pid`, in those of `candidates` that hold an allocator.
    /// With `follow_forks`, also to those of the processes it forks, as they are added to
    /// the [`FollowedProcesses`] returned.
    fn start_user(
        options: &TraceOptions,
        pid: u32,
        candidates: &[PathBuf],
        maps: ProcessMaps,
        follow_forks: bool,
    ) -> Result<(Self, Option<FollowedProcesses>)> {
        let prepared = prepare(&options.trace.tracer, &options.report)?;
        let allocators = uprobes::allocators(candidates);
        let (tracer, followed) =
            uprobes::attach_user(&options.trace.tracer, pid, &allocators, follow_forks)?;
        let polled = Polled {
            module_symbols: ModuleSymbols::default(),
            user_pid: Some(pid),
            user_maps: (!maps.mappings.is_empty()).then_some(maps),
            exited_maps: HashMap::new(),
        };
        Ok((Self::attached(tracer, prepared, polled), followed))
    }

    /// What the programs are attached to, for the line that says so.
    fn target(&self) -> String {
        match self.polled.user_pid {
            Some(pid) => format!("the heap of process {pid}"),
            None => "the kernel's allocation events".to_owned(),
        }
    }

    /// Detaches, reports and runs the leak check.
    fn finish(
        mut self,
        options: &TraceOptions,
        leak_checks: &LeakCheck,
    ) -> Result<Option<Verdict>> {
        let Tracer {
            mut programs,
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
        // The window ends as detaching starts (an RCU grace period per uprobe link or event:
        // seconds where each function has its own perf event): ages are measured to then, so
        // that none is longer than the window.
        let elapsed = self.started.elapsed();
        let now_ns = monotonic_now_ns();
        // Detach before reading, so the table is a consistent snapshot.
        let detached = probes::detach_allocations_first(&mut programs);
        drop(programs);
        detached?;
        if !self.replaced_processes.is_empty() {
            notes.extend(forget_processes(&maps, &self.replaced_processes)?);
        }
        let counts_at_end = self
            .counts_at_start
            .is_some()
            .then(|| accounting::KernelCounts::read().map_err(|error| format!("{error:#}")));
        // A process still alive may have mapped more since the last poll.
        let user_process = self.polled.user_pid.map(|pid| {
            self.polled.refresh();
            if self.polled.user_maps.is_none() {
                notes.push(format!(
                    "process {pid}'s mappings could not be read while it was alive: its \
                     stacks are bare addresses"
                ));
            }
            self.polled.user_maps.take().unwrap_or_default()
        });
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
            age_resolution: maps.clock().resolution(),
            stack_sample_limit: maps.stack_sample_limit(),
            attach: attached.to_string(),
            methods,
            cache_ids_are_pointers,
            notes,
            free_paths,
            module_symbols: self.polled.module_symbols,
            user_process,
            exited_processes: self.polled.exited_maps,
        };
        // Read as the window ends, for the entries and the check alike: a module under test
        // creates its caches after the check is set up.
        let merges = SlabMerges::read();
        let mut report = report_build::build_report(
            &options.trace,
            &maps,
            now_ns,
            header,
            scan.as_ref(),
            KernelMemory::new(scanner.as_mut().map(scan::Scanner::view), self.slab_layout),
            &merges,
        )?;
        let verdict = leak_checks.enabled().then(|| {
            let verdict = leak_checks
                .clone()
                .with_cache_merges(&merges)
                .evaluate(&report.stacks);
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
            (Some(Ok(start)), Some(Ok(end))) => {
                report_build::compare_with_kernel(&mut report, start, end)
            }
            (Some(Err(error)), _) | (_, Some(Err(error))) => report.notes.push(format!(
                "the trace is not compared with the kernel's counters: {error}"
            )),
            _ => {}
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

/// What every tracing session needs, made before anything is attached.
struct Prepared {
    kernel: String,
    sink: ReportSink,
    runtime: tokio::runtime::Runtime,
}

fn prepare(
    settings: &memleak::bpf::probes::TracerSettings,
    report: &output::ReportOptions,
) -> Result<Prepared> {
    if let (Some(min), Some(max)) = (settings.min_size, settings.max_size)
        && min > max
    {
        bail!("--min-size {min} is larger than --max-size {max}: nothing would be traced");
    }
    privileges::require_root()?;
    privileges::lift_memlock_limit();
    let kernel = kernel::release()?;
    let sink = ReportSink::open(report.output.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(Prepared {
        kernel,
        sink,
        runtime,
    })
}

/// How often /proc/modules is read for modules to record: a module loaded and unloaded
/// within it goes unrecorded (its call sites stay bare addresses).
const MODULE_POLL: Duration = Duration::from_millis(100);

/// Waits for `until`, showing progress on a terminal. On SIGINT or SIGTERM, `on_signal`
/// decides whether to stop waiting (`None`) or to go on.
async fn watch<T>(
    maps: &TracerMaps,
    polled: &mut Polled,
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
            _ = module_ticker.tick() => polled.refresh(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forks_note_says_what_was_and_was_not_followed() {
        let none = Forks::default();
        assert_eq!(forks_note(&none, false), None);
        let let_go = Forks {
            not_followed: 3,
            ..Forks::default()
        };
        assert_eq!(
            forks_note(&let_go, false).as_deref(),
            Some(
                "the command forked 3 processes, whose heaps are not followed \
                 (--follow-forks follows them)"
            )
        );
        let followed = Forks {
            not_followed: 1,
            followed: 4,
            replaced: HashSet::from_iter([7, 8]),
            still_running: 1,
            command_replaced_after_fork: true,
        };
        let note = forks_note(&followed, true).expect("a note");
        for said in [
            "followed 4 processes forked by the command",
            "2 of them exec'ed another program",
            "1 were still running when the command exited",
            "the command exec'ed another program after forking",
            "1 more could not be followed",
        ] {
            assert!(note.contains(said), "{said}: {note}");
        }
        let quiet = Forks {
            followed: 2,
            ..Forks::default()
        };
        let note = forks_note(&quiet, true).expect("a note");
        assert!(
            !note.contains("exec'ed") && !note.contains("still running"),
            "{note}"
        );
    }
}
