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
    accounting,
    aggregate::{self, Site},
    checks::{self, LeakCheckArgs, Verdict},
    cli::{Format, Kind, RunArgs, TraceArgs, TracingOptions},
    duration, kernel,
    output::ReportSink,
    privileges,
    probes::{self, Tracer, TracerSettings},
    report::{self, LivenessStats, Report, Stats},
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
    /// The kernel's counters before attaching, to set the trace against (or why not).
    counts_at_start: Result<accounting::KernelCounts, String>,
}

impl Session {
    fn start(options: &TracingOptions, scanned_cache: Option<&str>) -> Result<Self> {
        if let (Some(min), Some(max)) = (options.min_size, options.max_size)
            && min > max
        {
            bail!("--min-size {min} is larger than --max-size {max}: nothing would be traced");
        }
        privileges::require_root()?;
        if let Some(pid) = options.pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            bail!("--pid {pid}: no such process");
        }
        if let Some(pid) = options.pid
            && let Some(tgid) = thread_group_of(pid)
            && tgid != pid
        {
            bail!(
                "--pid {pid} is a thread of process {tgid}; memleak follows whole processes: \
                 use --pid {tgid}"
            );
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
        let counts_at_start =
            accounting::KernelCounts::read().map_err(|error| format!("{error:#}"));
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
                empty_programs: options.empty_programs,
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
            counts_at_start,
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
            free_paths,
        } = self.tracer;
        notes.extend(self.scan_notes);
        let skipped_runs = probes::skipped_runs(&programs);
        // Detach before reading, so the table is a consistent snapshot.
        drop(programs);
        let elapsed = self.started.elapsed();
        let now_ns = monotonic_now_ns();
        let counts_at_end = accounting::KernelCounts::read().map_err(|error| format!("{error:#}"));
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
            cache_ids_are_pointers: attached == probes::Attached::BtfTracepoints,
            notes,
            free_paths,
        };
        let mut report = build_report(
            options,
            &maps,
            now_ns,
            header,
            scan.as_ref(),
            KernelMemory {
                view: scanner.as_mut().map(scan::Scanner::view),
                layout: self.slab_layout,
                opened: None,
                error: None,
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
        match (&self.counts_at_start, &counts_at_end) {
            (Ok(start), Ok(end)) => compare_with_kernel(&mut report, start, end),
            (Err(error), _) | (_, Err(error)) => report.notes.push(format!(
                "the trace is not compared with the kernel's counters: {error}"
            )),
        }
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
    /// kmem_cache records name their cache by its `struct kmem_cache *` (tp_btf), rather
    /// than by a hash of its name.
    cache_ids_are_pointers: bool,
    notes: Vec<String>,
    free_paths: Vec<String>,
}

/// Builds the report with an entry for every site (leak checks see them all; the caller
/// truncates to `--top` for display).
fn build_report(
    args: &TracingOptions,
    maps: &TracerMaps,
    now_ns: u64,
    mut header: ReportHeader,
    scan: Option<&scan::CacheScan>,
    cache_reader: KernelMemory<'_>,
) -> Result<Report> {
    let counters = table::read_counters(maps)?;
    let min_age = args.min_age.unwrap_or(Duration::ZERO);
    let mut memory = cache_reader;
    let liveness = check_liveness(
        maps,
        &mut memory,
        header.cache_ids_are_pointers,
        &mut header.notes,
    )?;
    let mut aggregator = aggregate::Aggregator::new(now_ns, min_age);
    let mut tally = scan.map(|scan| scan::MarkTally::new(scan, now_ns, min_age));
    let mut cache_picks = site_caches::Picks::default();
    let (mut outstanding, mut outstanding_bytes) = (0u64, 0u64);
    let mut states = liveness.states.iter();
    table::for_each_outstanding(maps, |key, record| {
        let state = if is_slab_object(record) {
            states.next()
        } else {
            None
        };
        match state {
            Some(scan::Liveness::Free(_)) => return,
            Some(scan::Liveness::Unverified) => aggregator.add_unverified(record),
            Some(scan::Liveness::Allocated) | None => aggregator.add(record),
        }
        outstanding += 1;
        outstanding_bytes += u64::from(record.bytes_allocated);
        if let Some(site) = aggregate::SiteKey::of(record) {
            cache_picks.add(site, key);
        }
        if let Some(tally) = &mut tally {
            tally.add(key, record);
        }
    })?;
    let site_caches = memory.resolve(&cache_picks, &mut header.notes);
    let marks = tally.map(scan::MarkTally::finish);
    let aggregate = aggregator.finish();
    let mut sites = aggregate.sites;
    aggregate::rank(&mut sites, args.sort);

    let stack_ids = sites.iter().flat_map(|site| site.stacks.keys().copied());
    let stacks = table::read_stacks(maps, stack_ids)?;
    let missed_free_sites = table::read_missed_free_sites(maps)?;
    let mut symbolizer = KernelSymbolizer::new();
    symbolizer.resolve(
        report::addresses_to_symbolize(&sites, &stacks)
            .into_iter()
            .chain(missed_free_sites.keys().copied()),
    )?;
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
    for (site, entry) in sites.iter().zip(&mut entries) {
        entry.unverified = site.unverified * u64::from(args.sample_rate);
    }
    let scan = scan.map(|scan| scan.report(&header.kernel, Some(scan::marking(&entries))));
    Ok(Report {
        schema: report::SCHEMA_VERSION,
        kernel: header.kernel,
        duration_ms: header.elapsed.as_millis() as u64,
        attach: header.attach,
        free_paths: header.free_paths,
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
            liveness: liveness.stats,
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
        missed_free_sites: report::missed_free_sites(&missed_free_sites, &frame),
        accounting: Vec::new(),
        stacks: entries,
    })
}

/// Puts the traced net change per cache and kind beside the kernel's counters, and flags the
/// entries of the caches and kinds whose traced growth the kernel does not show.
fn compare_with_kernel(
    report: &mut Report,
    start: &accounting::KernelCounts,
    end: &accounting::KernelCounts,
) {
    let mut caches: std::collections::BTreeMap<String, accounting::Traced> = Default::default();
    let (mut vmalloc, mut percpu) = (accounting::Traced::default(), accounting::Traced::default());
    for entry in &report.stacks {
        let traced = match (entry.kind, &entry.cache) {
            ("kmalloc" | "kmem_cache", Some(cache)) => caches.entry(cache.clone()).or_default(),
            ("vmalloc", _) => &mut vmalloc,
            ("percpu", _) => &mut percpu,
            _ => continue,
        };
        traced.amount += if entry.kind == "vmalloc" || entry.kind == "percpu" {
            entry.bytes
        } else {
            entry.count
        };
        traced.unverified |= entry.unverified > 0;
    }
    let cpus = aya::util::nr_cpus().map_or(1, |cpus| cpus.get() as u64);
    let lines = accounting::compare(start, end, &caches, vmalloc, percpu, cpus);
    for entry in &mut report.stacks {
        entry.unreliable = lines.iter().any(|line| {
            line.unreliable
                && match &line.cache {
                    Some(cache) => entry.cache.as_ref() == Some(cache),
                    None => entry.kind == line.kind,
                }
        });
    }
    let flagged: Vec<String> = lines
        .iter()
        .filter(|line| line.unreliable)
        .map(|line| {
            format!(
                "{} (traced {} {}, the kernel counted {:+})",
                line.cache.as_deref().unwrap_or(line.kind),
                report::thousands(line.traced),
                line.unit,
                line.kernel
            )
        })
        .collect();
    if !flagged.is_empty() {
        report.notes.push(format!(
            "traced growth exceeds the kernel's own counters beyond noise in {}: their entries \
             are marked unreliable (objects freed by a path memleak does not follow may be \
             listed)",
            flagged.join(", ")
        ));
    }
    report.accounting = lines;
}

/// Reads kernel memory at report time, for the liveness check and the sites' caches: through
/// the content scanner's reader, or one loaded when first needed (after detaching, so its
/// loading is not traced) with the layout parsed meanwhile.
struct KernelMemory<'a> {
    view: Option<&'a mut scan::KernelView>,
    layout: Option<Result<scan::SlabLayout>>,
    opened: Option<scan::KernelView>,
    /// Why the reader could not be opened, once it has failed.
    error: Option<String>,
}

impl KernelMemory<'_> {
    fn view(&mut self) -> Result<&mut scan::KernelView> {
        if self.view.is_some() {
            return Ok(self.view.as_deref_mut().expect("checked above"));
        }
        if self.opened.is_none() && self.error.is_none() {
            let opened = match self.layout.take() {
                Some(layout) => layout.and_then(scan::KernelView::open_for_owners),
                None => Err(anyhow::anyhow!("no slab layout")),
            };
            match opened {
                Ok(view) => self.opened = Some(view),
                Err(error) => self.error = Some(format!("{error:#}")),
            }
        }
        match (&mut self.opened, &self.error) {
            (Some(view), _) => Ok(view),
            (None, error) => Err(anyhow::anyhow!(
                "{}",
                error.as_deref().unwrap_or("no kernel memory reader")
            )),
        }
    }

    /// The real caches of the kmalloc sites and of the kmem_cache sites whose event names no
    /// cache. Where they cannot be read, kmalloc sites are named from their size and gfp flags,
    /// and a note says why.
    fn resolve(
        &mut self,
        picks: &site_caches::Picks,
        notes: &mut Vec<String>,
    ) -> HashMap<aggregate::SiteKey, String> {
        if picks.is_empty() {
            return HashMap::new();
        }
        let read = match self.view().and_then(|view| picks.resolve(view)) {
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

/// What the liveness check found of every outstanding slab object, in the order
/// [`table::for_each_outstanding`] visits them (the table no longer changes once detached).
struct LivenessResult {
    states: Vec<scan::Liveness>,
    stats: LivenessStats,
}

/// Whether the liveness check looks at this record: slab objects only.
fn is_slab_object(record: &memleak_common::AllocRecord) -> bool {
    match AllocKind::from_u32(record.kind) {
        Some(AllocKind::Kmalloc) => {
            report::kmalloc_cache_name(u64::from(record.bytes_allocated)).is_some()
        }
        Some(AllocKind::KmemCache) => true,
        _ => false,
    }
}

/// Checks in kernel memory that every outstanding slab object is still allocated (see
/// `scan::liveness`); objects found free are left out of the report and counted.
fn check_liveness(
    maps: &TracerMaps,
    memory: &mut KernelMemory<'_>,
    cache_ids_are_pointers: bool,
    notes: &mut Vec<String>,
) -> Result<LivenessResult> {
    let mut queries = Vec::new();
    table::for_each_outstanding(maps, |key, record| {
        if is_slab_object(record) {
            queries.push(scan::LivenessQuery {
                object: scan::Object {
                    address: key,
                    size: record.bytes_allocated,
                },
                cache: (record.kind == AllocKind::KmemCache as u32
                    && cache_ids_are_pointers
                    && record.cache_id != 0)
                    .then_some(record.cache_id),
            });
        }
    })?;
    let mut stats = LivenessStats::default();
    if queries.is_empty() {
        return Ok(LivenessResult {
            states: Vec::new(),
            stats,
        });
    }
    let started = Instant::now();
    let check = match memory.view().and_then(|view| view.liveness(&queries)) {
        Ok(check) => check,
        Err(error) => {
            notes.push(format!(
                "outstanding slab objects are not checked in kernel memory ({error:#}): objects \
                 freed without a kmem event (kfree_rcu batches, bulk frees, slab sheaves) may be \
                 listed, and every slab entry counts as unverified"
            ));
            scan::LivenessCheck {
                states: vec![scan::Liveness::Unverified; queries.len()],
                notes: Vec::new(),
            }
        }
    };
    notes.extend(check.notes.iter().cloned());
    for state in &check.states {
        stats.count(*state);
    }
    stats.liveness_check_ms = started.elapsed().as_millis() as u64;
    log::info!(
        "liveness check: {} slab objects, {} free, {} allocated, {} unverified, in {} ms",
        queries.len(),
        stats.verified_free,
        stats.verified_allocated,
        stats.unverified,
        stats.liveness_check_ms
    );
    Ok(LivenessResult {
        states: check.states,
        stats,
    })
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

/// The process (thread group) a task id belongs to, from /proc/ID/status.
fn thread_group_of(id: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{id}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
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
