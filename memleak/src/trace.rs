//! `memleak trace` and `memleak run`: attach, wait (for a window or a command) with a progress
//! line, detach, report, check.
use std::{
    io::IsTerminal as _,
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{ExitCode, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hashbrown::HashMap;

use memleak_common::AllocKind;

use crate::{
    aggregate::{self, Site},
    checks::{self, LeakCheckArgs, Verdict},
    cli::{Format, Kind, RunArgs, TraceArgs, TracingOptions},
    duration, kernel,
    output::ReportSink,
    privileges,
    probes::{self, Tracer, TracerSettings},
    report::{self, Report, Stats},
    scan,
    signals::StopSignals,
    site_caches,
    symbolize::KernelSymbolizer,
    table::{self, TracerMaps},
};

/// `memleak trace`: traces for the window (or until SIGINT / SIGTERM), then reports.
pub fn trace(args: &TraceArgs) -> Result<ExitCode> {
    let session = Session::start(&args.tracing, args.checks.cache.as_deref())?;
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
    session
        .runtime
        .block_on(watch(&session.tracer.maps, sleep_until(deadline), |_| true))?;
    let verdict = session.finish(&args.tracing, &args.checks)?;
    Ok(match verdict {
        Some(verdict) if verdict.failed && args.checks.fail_on_leak => {
            ExitCode::from(checks::EXIT_LEAK)
        }
        _ => ExitCode::SUCCESS,
    })
}

/// `memleak run`: traces while COMMAND runs and for the grace period after it, then reports.
/// Exits with the command's status, unless the leak check fails (1).
pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let session = Session::start(&args.tracing, args.checks.cache.as_deref())?;
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
        .block_on(watch(&session.tracer.maps, command_then_grace, forward))?
        .context("signal handling stopped the wait")?
        .with_context(|| format!("waiting for {program}"))?;
    let verdict = session.finish(&args.tracing, &args.checks)?;
    if let Some(verdict) = verdict
        && verdict.failed
        && args.checks.fail_on_leak
    {
        return Ok(ExitCode::from(checks::EXIT_LEAK));
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
}

impl Session {
    fn start(options: &TracingOptions, scanned_cache: Option<&str>) -> Result<Self> {
        privileges::require_root()?;
        if let Some(pid) = options.pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            bail!("--pid {pid}: no such process");
        }
        privileges::lift_memlock_limit();
        let kernel = kernel::release()?;
        let sink = ReportSink::open(options.report.output.as_deref())?;
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
        let slab_layout = (scanner.is_none() && options.kinds.contains(&Kind::Slab))
            .then(|| scan::slab_layout(btf.as_ref()));
        let tracer = probes::attach(
            &TracerSettings {
                capacity: options.capacity,
                sample_rate: options.sample_rate,
                stack_sample_rate: options.stack_sample_rate,
                filter_tgid: options.pid,
                filter_comm: options.comm.clone(),
                min_size: options.min_size,
                max_size: options.max_size,
                method: options.attach,
                kinds: options.kinds.clone(),
            },
            btf.as_ref(),
        )?;
        Ok(Self {
            tracer,
            runtime,
            sink,
            kernel,
            started: Instant::now(),
            scanner,
            scan_notes,
            slab_layout,
        })
    }

    /// Detaches, reports and runs the leak check.
    fn finish(
        self,
        options: &TracingOptions,
        leak_checks: &LeakCheckArgs,
    ) -> Result<Option<Verdict>> {
        let Tracer {
            programs,
            maps,
            attached,
            mut notes,
        } = self.tracer;
        notes.extend(self.scan_notes);
        let skipped_runs = probes::skipped_runs(&programs);
        // Detach before reading, so the table is a consistent snapshot.
        drop(programs);
        let elapsed = self.started.elapsed();
        let now_ns = monotonic_now_ns();
        let mut scanner = self.scanner;
        let scan = scanner.as_mut().and_then(|scanner| {
            scanner
                .scan(options.similarity, scan::TRACE_GROUPS)
                .map_err(|error| notes.push(scan::not_done(scanner.cache_name(), &error)))
                .ok()
        });

        let header = ReportHeader {
            skipped_runs,
            kernel: self.kernel,
            elapsed,
            attach: attached.to_string(),
            notes,
        };
        let mut report = build_report(
            options,
            &maps,
            now_ns,
            header,
            scan.as_ref(),
            SiteCacheReader {
                view: scanner.as_mut().map(scan::Scanner::view),
                layout: self.slab_layout,
            },
        )?;
        let verdict = leak_checks.enabled().then(|| {
            let verdict = leak_checks.evaluate(&report.stacks);
            eprintln!("memleak: {}", verdict.summary());
            verdict
        });
        if let (Some(verdict), Some(path)) = (&verdict, &leak_checks.junit) {
            std::fs::write(path, verdict.junit_xml(elapsed.as_secs_f64()))
                .with_context(|| format!("writing JUnit XML to {}", path.display()))?;
        }
        report.check.clone_from(&verdict);
        (report.kinds, report.caches) = report::totals(&report.stacks);
        report.stacks.truncate(options.report.top as usize);
        let text = match options.report.format {
            Format::Text => report::render_text(&report),
            Format::Json => report::render_json(&report),
        };
        self.sink.write(&text)?;
        Ok(verdict)
    }
}

struct ReportHeader {
    skipped_runs: u64,
    kernel: String,
    elapsed: Duration,
    attach: String,
    notes: Vec<String>,
}

/// Builds the report with an entry for every site (leak checks see them all; the caller
/// truncates to `--top` for display).
fn build_report(
    args: &TracingOptions,
    maps: &TracerMaps,
    now_ns: u64,
    mut header: ReportHeader,
    scan: Option<&scan::CacheScan>,
    cache_reader: SiteCacheReader<'_>,
) -> Result<Report> {
    let counters = table::read_counters(maps)?;
    let min_age = args.min_age.unwrap_or(Duration::ZERO);
    let mut aggregator = aggregate::Aggregator::new(now_ns, min_age);
    let mut tally = scan.map(|scan| scan::MarkTally::new(scan, now_ns, min_age));
    let mut cache_picks = site_caches::Picks::default();
    let (mut outstanding, mut outstanding_bytes) = (0u64, 0u64);
    table::for_each_outstanding(maps, |key, record| {
        outstanding += 1;
        outstanding_bytes += u64::from(record.bytes_allocated);
        aggregator.add(record);
        if let Some(site) = aggregate::SiteKey::of(record) {
            cache_picks.add(site, key);
        }
        if let Some(tally) = &mut tally {
            tally.add(key, record);
        }
    })?;
    let site_caches = cache_reader.resolve(&cache_picks, &mut header.notes);
    let marks = tally.map(scan::MarkTally::finish);
    let aggregate = aggregator.finish();
    let mut sites = aggregate.sites;
    aggregate::rank(&mut sites, args.sort);

    let stack_ids = sites.iter().flat_map(|site| site.stacks.keys().copied());
    let stacks = table::read_stacks(maps, stack_ids)?;
    let mut symbolizer = KernelSymbolizer::new();
    symbolizer.resolve(report::addresses_to_symbolize(&sites, &stacks))?;
    let cache_names = table::read_cache_names(maps)?;
    let comms = table::read_comms(maps)?;
    let frame = |addr| symbolizer.frame(addr);

    let (backing, sites): (Vec<Site>, Vec<Site>) = sites.into_iter().partition(|site| {
        site.key.kind == AllocKind::Page
            && site.stacks.keys().any(|id| {
                stacks
                    .get(id)
                    .is_some_and(|stack| report::backs_another_kind(stack, &frame))
            })
    });
    let backing_pages: u64 = backing.iter().map(|site| site.count).sum();
    let backing_pages_bytes: u64 = backing.iter().map(|site| site.bytes).sum();
    let site_count = sites.len() as u64;
    let context = report::Context {
        stacks: &stacks,
        cache_names: &cache_names,
        site_caches: &site_caches,
        comms: &comms,
        now_ns,
        sample_rate: args.sample_rate,
        frame: &frame,
    };
    let mut entries: Vec<report::Entry> = sites
        .iter()
        .map(|site| report::entry(site, &context))
        .collect();
    if let Some(marks) = &marks {
        for (site, entry) in sites.iter().zip(&mut entries) {
            entry.marks = marks.get(&site.key).copied();
        }
    }
    let scan = scan.map(|scan| scan.report(&header.kernel, Some(scan::marking(&entries))));
    Ok(Report {
        schema: report::SCHEMA_VERSION,
        kernel: header.kernel,
        duration_ms: header.elapsed.as_millis() as u64,
        attach: header.attach,
        sample_rate: args.sample_rate,
        stack_sample_rate: args.stack_sample_rate,
        stats: Stats {
            counters,
            outstanding: outstanding - backing_pages,
            outstanding_bytes: outstanding_bytes - backing_pages_bytes,
            hidden_younger: aggregate.hidden_younger,
            skipped_runs: header.skipped_runs,
            sites: site_count,
            backing_pages,
            backing_pages_bytes,
        },
        notes: header.notes,
        kinds: Vec::new(),
        caches: Vec::new(),
        processes: args.by_process.then(|| {
            let mut processes = report::processes(&sites, &comms, args.sample_rate);
            processes.truncate(args.report.top as usize);
            processes
        }),
        check: None,
        scan,
        stacks: entries,
    })
}

/// What reads the sites' caches: the content scanner's reader, or one loaded at report
/// time (after detaching, so its loading is not traced) with the layout parsed meanwhile.
struct SiteCacheReader<'a> {
    view: Option<&'a mut scan::KernelView>,
    layout: Option<Result<scan::SlabLayout>>,
}

impl SiteCacheReader<'_> {
    /// The real caches of the kmalloc sites and of the kmem_cache sites whose event names no
    /// cache. Where they cannot be read, kmalloc sites are named from their size and gfp flags,
    /// and a note says why.
    fn resolve(
        self,
        picks: &site_caches::Picks,
        notes: &mut Vec<String>,
    ) -> HashMap<aggregate::SiteKey, String> {
        if picks.is_empty() {
            return HashMap::new();
        }
        let mut opened = None;
        let view = match (self.view, self.layout) {
            (Some(view), _) => Ok(view),
            (None, Some(layout)) => layout
                .and_then(scan::KernelView::open_for_owners)
                .map(|view| opened.insert(view)),
            (None, None) => Err(anyhow::anyhow!("no slab layout")),
        };
        let read = match view.and_then(|view| picks.resolve(view)) {
            Ok(resolution) => {
                notes.extend(resolution.note());
                resolution.names
            }
            Err(error) => {
                notes.push(site_caches::not_read(&error));
                HashMap::new()
            }
        };
        picks.names(read)
    }
}

/// Waits for `until`, showing progress on a terminal. On SIGINT or SIGTERM, `on_signal`
/// decides whether to stop waiting (`None`) or to go on.
async fn watch<T>(
    maps: &TracerMaps,
    until: impl Future<Output = T>,
    mut on_signal: impl FnMut(libc::c_int) -> bool,
) -> Result<Option<T>> {
    let mut signals = StopSignals::install()?;
    let started = tokio::time::Instant::now();
    let show_progress = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last_events = 0;
    tokio::pin!(until);
    let outcome = loop {
        tokio::select! {
            signal = signals.next() => if on_signal(signal) { break None },
            output = &mut until => break Some(output),
            _ = ticker.tick() => {
                if show_progress {
                    let counters = table::read_counters(maps)?;
                    let events = counters.allocs + counters.frees;
                    eprint!(
                        "\r\x1b[Ktracing {}: {}/s events, {} outstanding, {} dropped, {} stack failures",
                        duration::display(started.elapsed()),
                        report::thousands(events - last_events),
                        report::thousands(counters.outstanding()),
                        report::thousands(counters.dropped_table_full),
                        report::thousands(counters.stack_failures),
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

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
