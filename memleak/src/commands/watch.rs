//! `memleak watch`: attach once, snapshot every interval, judge each site from its series,
//! print a line (or a JSON object) per interval, keep the history; `memleak history` reads it.
use std::{cell::OnceCell, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use hashbrown::{HashMap, HashSet};
use memleak::{
    bpf::probes::{self, SlabHooks},
    kernel::{self, privileges, slab_merges::SlabMerges},
    kinds::Kind,
    output::{self, Format, Plain, ReportOptions, ReportSink, profile},
    scan,
    scan::Liveness,
    trace::{
        build::{KernelMemory, check_liveness},
        report::{Entry, merged_caches},
    },
    util::{
        clock::{monotonic_now_ns, unix_now_ms},
        duration,
    },
    watch::{
        self, Interval, Leak, SCHEMA_VERSION, Series, SiteFigures, SiteName,
        history::{History, HistoryError, HistoryReport, StoreChange, StoredObjects},
        snapshot::{SnapshotSite, Snapshotter},
        timeline::TimelinePoint,
        verdict::Severity,
    },
};

use super::{signals::StopSignals, sleep_until};
use crate::cli::{HistoryArgs, WatchArgs};

pub fn run(args: &WatchArgs) -> Result<ExitCode> {
    let options = watch::Options::from(args);
    let report_options = ReportOptions::from(&args.report);
    // With a stack format (folded, svg, pprof), the intervals are text on standard error and
    // the profile of the last snapshot is the report, written when the watch ends.
    let format = report_options.format;
    let plain = format.plain("watch").ok();
    let intervals_to_stderr = plain.is_none();
    let plain = plain.unwrap_or(Plain::Text);
    privileges::require_root()?;
    if let Some(pid) = options.tracer.filter_tgid {
        super::require_process(pid)?;
    }
    privileges::lift_memlock_limit();
    // Text and JSON are a line per interval, appended as they come; the profiles are one
    // report, written whole at the end.
    let output = report_options.output.as_deref();
    let mut sink = if intervals_to_stderr {
        ReportSink::open(output)?
    } else {
        ReportSink::open_lines(output)?
    };
    // Opened before attaching: a store that cannot be used fails the watch now, not later.
    let mut history = options.history.as_deref().map(History::open).transpose()?;
    let mut series = Series::new(options.window_points);
    let window_ms = (options.interval * options.window_points as u32).as_millis() as u64;
    if let Some(history) = &history {
        let restored = history.restore(&mut series, unix_now_ms(), window_ms)?;
        if restored > 0 {
            eprintln!(
                "memleak: continuing the series of {} sites ({restored} points) from {}",
                series.sites(),
                args.history.display()
            );
        }
    }
    let btf = kernel::parse_btf()?;
    let slab_layout = options
        .tracer
        .kinds
        .contains(&Kind::Slab)
        .then(|| scan::slab_layout(btf.as_ref()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let exported = super::listen::Shared::new(std::sync::Mutex::new(super::listen::Exported {
        kernel: kernel::release()?,
        scale: options.scale(),
        ..super::listen::Exported::default()
    }));
    let server = args
        .listen
        .map(|address| runtime.block_on(super::listen::bind(address, exported.clone())))
        .transpose()?;
    if let Some(address) = args.listen {
        eprintln!("memleak: serving the dashboard and /metrics on http://{address}/");
    }
    let mut tracer = probes::attach(&options.tracer, btf.as_ref())?;
    drop(btf);
    eprintln!(
        "memleak: watching the kernel's allocations ({}, 1 object in {}, slab hooks {}% of the \
         time) every {}; {}",
        tracer.attached,
        options.tracer.sample_rate,
        options.duty_percent,
        duration::display(options.interval),
        match options.duration {
            Some(window) => format!("for {}, Ctrl-C ends early", duration::display(window)),
            None => "until Ctrl-C or SIGTERM".to_owned(),
        }
    );
    let boot_id = kernel::boot_id()?;
    let mut memory = KernelMemory::new(None, slab_layout);
    let mut snapshotter = Snapshotter::new(options.scale(), tracer.cache_ids_are_pointers);
    if let Some(history) = &history {
        reseed(
            history,
            &boot_id,
            &tracer.maps,
            &mut memory,
            &mut snapshotter,
            &tracer,
        )?;
    }
    let mut watcher = Watcher {
        snapshotter,
        memory,
        boot_id,
        series,
        history: history.take().map(HistoryKeeper::new),
        started_ns: monotonic_now_ns(),
        previous_ns: monotonic_now_ns(),
        notes: tracer
            .notes
            .iter()
            .cloned()
            .chain(options.duty_window().map(|_| DUTY_NOTE.to_owned()))
            .collect(),
        leaked: false,
        on_leak: args.on_leak.clone(),
        last: None,
    };
    runtime.block_on(async {
        if let Some(server) = server {
            tokio::spawn(async move {
                if let Err(error) = server.await {
                    eprintln!("memleak: --listen: {error}; the watch goes on without it");
                }
            });
        }
        let mut signals = StopSignals::install()?;
        let start = tokio::time::Instant::now();
        let mut ticker = tokio::time::interval_at(start + options.interval, options.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = options.duration.map(|window| start + window);
        // Duty cycling: the slab allocation hooks are attached for the window at the start of
        // each interval, the free hooks all the time. (With the frees detached too, an object
        // freed meanwhile whose slot is taken again before the snapshot looks allocated, and
        // such stale records pile up at busy sites as if they leaked.)
        let mut frees_only_at = options.duty_window().map(|window| start + window);
        loop {
            tokio::select! {
                _ = signals.next() => break,
                () = sleep_until(deadline) => break,
                () = sleep_until(frees_only_at) => {
                    frees_only_at = None;
                    tracer.set_slab_hooks(SlabHooks::FreesOnly)?;
                }
                _ = ticker.tick() => {
                    let (interval, entries, point) =
                        watcher.interval(&mut tracer.maps, &options)?;
                    if let Some(window) = options.duty_window() {
                        tracer.set_slab_hooks(SlabHooks::All)?;
                        frees_only_at = Some(tokio::time::Instant::now() + window);
                    }
                    let line = match plain {
                        Plain::Text => output::text::watch::render_interval(&interval),
                        Plain::Json => output::json::render_json_line(&interval),
                    };
                    if intervals_to_stderr {
                        eprint!("{line}");
                    } else {
                        sink.write(&line)?;
                    }
                    {
                        let mut exported =
                            exported.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        exported.totals.add(&interval);
                        exported.entries = entries;
                        exported.timeline.push(point);
                        exported.last = Some(interval.clone());
                    }
                    watcher.last = Some(interval);
                }
            }
        }
        anyhow::Ok(())
    })?;
    drop(tracer);
    let exported = exported
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let source = super::listen::source(&exported);
    match format {
        Format::Text => {
            sink.write(&output::text::watch::render_final(watcher.last.as_ref()))?;
        }
        Format::Json => {}
        Format::Folded => sink.write(&profile::folded(&exported.entries))?,
        Format::Svg => sink.write(&profile::svg(&exported.entries, source)?)?,
        Format::Pprof => sink.write_bytes(&profile::pprof(&exported.entries, source)?)?,
    }
    Ok(if watcher.leaked && args.fail_on_leak {
        ExitCode::from(memleak::trace::check::EXIT_LEAK)
    } else {
        ExitCode::SUCCESS
    })
}

/// Said in the first interval of a duty-cycled watch.
const DUTY_NOTE: &str = "the slab allocation hooks are attached for part of each interval \
    (--duty), the free hooks all the time: counts are scaled up to match";

/// Everything the watch keeps between intervals.
struct Watcher<'a> {
    snapshotter: Snapshotter,
    memory: KernelMemory<'a>,
    series: Series,
    boot_id: String,
    /// `--history`.
    history: Option<HistoryKeeper>,
    started_ns: u64,
    previous_ns: u64,
    /// What the tracer could not attach, repeated in the first interval.
    notes: Vec<String>,
    /// A site reached warning or critical at some point.
    leaked: bool,
    /// `--on-leak`.
    on_leak: Option<String>,
    last: Option<Interval>,
}

/// The watch's history store, at its path for the whole watch.
struct HistoryKeeper {
    path: PathBuf,
    /// The store while it is open; reopened when it was deleted or replaced.
    store: Option<History>,
    /// Whether writing has failed (said once on standard error).
    failed: bool,
    /// The file at the path was overwritten with something else: it is left as found.
    given_up: bool,
}

impl HistoryKeeper {
    fn new(store: History) -> Self {
        Self {
            path: store.path().to_owned(),
            store: Some(store),
            failed: false,
            given_up: false,
        }
    }

    /// Stores the interval; returns what the interval must say about the store. A store
    /// deleted or replaced while the watch runs is opened again at its path (a new store when
    /// it was deleted; never over a file that is not one); one overwritten in place is left
    /// as found for the rest of the watch (its write-ahead log would still make it read as a
    /// store); one that cannot be written is retried each interval. The watch goes on in
    /// memory meanwhile.
    fn record(
        &mut self,
        at_ms: u64,
        figures: &[&SiteFigures],
        leaks: &[Leak],
        retain_ms: u64,
        objects: StoredObjects<'_>,
    ) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(change) = self.store.as_ref().and_then(History::changed) {
            // Closed before the path is opened again: SQLite then checkpoints and removes
            // the write-ahead log beside the name, which a new store would otherwise take up.
            if let Some(store) = self.store.take() {
                store.close(change);
            }
            self.given_up = change == StoreChange::Overwritten;
            notes.push(format!(
                "history store {} was {change} while the watch ran: {}",
                self.path.display(),
                if self.given_up {
                    "it is left as found"
                } else {
                    "opening it again (a new store holds only the intervals from this one on)"
                }
            ));
        }
        if self.given_up {
            let error = HistoryError::Invalid {
                path: self.path.clone(),
                message: "overwritten with something else while the watch ran".to_owned(),
            };
            self.warn(&error);
            notes.push(format!("history not written: {error}"));
            return notes;
        }
        let store = match self
            .store
            .take()
            .map_or_else(|| History::open(&self.path), Ok)
        {
            Ok(store) => self.store.insert(store),
            Err(error) => {
                self.warn(&error);
                notes.push(format!("history not written: {error}"));
                return notes;
            }
        };
        if let Err(error) =
            store.record_with_objects(at_ms, figures, leaks, retain_ms, Some(objects))
        {
            self.warn(&error);
            notes.push(format!("history not written: {error}"));
        }
        notes
    }

    /// Said once on standard error; each interval's notes say it again.
    fn warn(&mut self, error: &HistoryError) {
        if !self.failed {
            eprintln!("memleak: warning: {error}; the watch goes on, keeping no history meanwhile");
            self.failed = true;
        }
    }
}

impl Watcher<'_> {
    fn interval(
        &mut self,
        maps: &mut memleak::bpf::maps::TracerMaps,
        options: &watch::Options,
    ) -> Result<(Interval, Vec<Entry>, TimelinePoint)> {
        let now_ns = monotonic_now_ns();
        let at_ms = unix_now_ms();
        let snapshot = self
            .snapshotter
            .take(maps, &mut self.memory, now_ns, self.previous_ns)?;
        let pruned = memleak::bpf::maps::prune_stacks(maps, &snapshot.stacks_in_use)?;
        if pruned > 0 {
            log::info!("deleted {pruned} stacks no outstanding object uses");
        }
        let interval_ms = now_ns.saturating_sub(self.previous_ns) / 1_000_000;
        self.previous_ns = now_ns;

        let mut present = HashSet::new();
        for site in &snapshot.sites {
            self.series.add(at_ms, &site.figures);
            present.insert(site.figures.site.clone());
        }
        self.series.mark_absent(at_ms, &present);
        let current: HashMap<&SiteName, &SnapshotSite> = snapshot
            .sites
            .iter()
            .map(|site| (&site.figures.site, site))
            .collect();
        // Read at most once an interval, and only when a judged site is a kmem_cache one.
        let merges = OnceCell::new();
        let leaks: Vec<Leak> = self
            .series
            .judge(at_ms, &options.thresholds)
            .into_iter()
            .map(|(site, judgement, since_ms)| {
                let now = current.get(&site);
                Leak {
                    count: now.map_or(0, |now| now.figures.count),
                    bytes: now.map_or(0, |now| now.figures.bytes),
                    frames: now.map(|now| now.entry.frames.clone()).unwrap_or_default(),
                    cache_merged_with: merged_caches(&site.kind, site.cache.as_deref(), || {
                        merges.get_or_init(SlabMerges::read)
                    }),
                    judgement,
                    since_ms,
                    site,
                }
            })
            .collect();
        self.leaked |= leaks
            .iter()
            .any(|leak| leak.judgement.severity >= Severity::Warning);
        if let Some(command) = &self.on_leak {
            for leak in &leaks {
                if leak.judgement.severity >= Severity::Warning && leak.since_ms == at_ms {
                    run_on_leak(command, leak);
                }
            }
        }

        let mut notes = std::mem::take(&mut self.notes);
        notes.extend(snapshot.notes);
        if let Some(history) = &mut self.history {
            let figures: Vec<_> = snapshot.sites.iter().map(|site| &site.figures).collect();
            let objects = StoredObjects {
                boot_id: &self.boot_id,
                objects: &snapshot.allocated_slab_objects,
                cache_names: self.snapshotter.cache_names(),
            };
            let retain_ms = options.retain.as_millis() as u64;
            notes.extend(history.record(at_ms, &figures, &leaks, retain_ms, objects));
        }
        let sample_rate = options.tracer.sample_rate;
        let interval = Interval {
            memleak: memleak::util::build::Producer::this(),
            schema: SCHEMA_VERSION,
            at_ms,
            elapsed_ms: now_ns.saturating_sub(self.started_ns) / 1_000_000,
            interval_ms,
            sample_rate,
            duty_percent: options.duty_percent,
            estimated: sample_rate > 1 || options.duty_percent < 100,
            stats: snapshot.stats,
            sites: snapshot
                .sites
                .iter()
                .take(options.top)
                .map(|site| site.figures.clone())
                .collect(),
            leaks,
            notes,
        };
        drop(current);
        let judged: Vec<&SiteName> = interval.leaks.iter().map(|leak| &leak.site).collect();
        let point = TimelinePoint::of(
            at_ms,
            snapshot.sites.iter().map(|site| &site.figures),
            &judged,
        );
        let entries = snapshot.sites.into_iter().map(|site| site.entry).collect();
        Ok((interval, entries, point))
    }
}

/// Runs `--on-leak`'s command for a site that has just reached `leak`'s severity, with the leak
/// as JSON on its standard input, on a thread of its own: a slow or stuck command never holds
/// up the watch. Its status and output are logged when it ends.
fn run_on_leak(command: &str, leak: &Leak) {
    let site = leak.site.call_site.clone();
    let input = output::json::render_json_line(leak);
    let command = command.to_owned();
    let started = std::process::Command::new("sh")
        .args(["-c", &command])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match started {
        Ok(child) => child,
        Err(error) => {
            eprintln!("memleak: --on-leak for {site}: cannot start `sh -c {command}`: {error}");
            return;
        }
    };
    let stdin = child.stdin.take();
    let spawned = std::thread::Builder::new()
        .name("on-leak".into())
        .spawn(move || {
            if let Some(mut stdin) = stdin {
                // A command that does not read its input closes the pipe: not an error.
                let _ = std::io::Write::write_all(&mut stdin, input.as_bytes());
            }
            match child.wait_with_output() {
                Ok(output) => {
                    let said = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
                    eprintln!(
                        "memleak: --on-leak for {site} exited {}; stdout: {:?}; stderr: {:?}",
                        output.status,
                        said(&output.stdout),
                        said(&output.stderr)
                    );
                }
                Err(error) => eprintln!("memleak: --on-leak for {site}: {error}"),
            }
        });
    if let Err(error) = spawned {
        eprintln!("memleak: --on-leak for a leak: cannot start a thread: {error}");
    }
}

/// Puts the objects of the last stored interval back into the fresh table, those that kernel
/// memory shows still allocated: their count continues the series, and their frees are seen
/// again. Objects of other kinds cannot be checked, and are left out.
fn reseed(
    history: &History,
    boot_id: &str,
    maps: &memleak::bpf::maps::TracerMaps,
    memory: &mut KernelMemory<'_>,
    snapshotter: &mut Snapshotter,
    tracer: &probes::Tracer,
) -> Result<()> {
    let (objects, cache_names) = history.objects(boot_id)?;
    snapshotter.remember_cache_names(cache_names);
    if objects.is_empty() {
        return Ok(());
    }
    let mut notes = Vec::new();
    let liveness = check_liveness(
        |visit| {
            objects
                .iter()
                .for_each(|(address, record)| visit(*address, record));
            Ok(())
        },
        memory,
        tracer.cache_ids_are_pointers,
        &mut notes,
    )?;
    let allocated: Vec<(u64, memleak_common::AllocRecord)> = objects
        .iter()
        .zip(&liveness.states)
        .filter(|(_, state)| **state == Liveness::Allocated)
        .map(|(object, _)| *object)
        .collect();
    let inserted = memleak::bpf::maps::insert_objects(maps, &allocated)?;
    eprintln!(
        "memleak: {inserted} of the {} objects stored by the last interval are still allocated \
         and tracked again",
        objects.len()
    );
    for note in notes {
        log::info!("re-seeding: {note}");
    }
    Ok(())
}

/// `memleak history`.
pub fn history(args: &HistoryArgs) -> Result<ExitCode> {
    let format = args.format.plain("history")?;
    let history = History::open_existing(&args.history)?;
    let since_ms = unix_now_ms().saturating_sub(args.since.as_millis() as u64);
    let report = HistoryReport {
        verdicts: history.verdicts(since_ms)?,
        series: match &args.site {
            Some(pattern) => history.series(pattern)?,
            None => Vec::new(),
        },
    };
    let mut sink = ReportSink::open(None)?;
    sink.write(&output::render(
        &report,
        format,
        output::text::watch::render_history,
    ))?;
    Ok(ExitCode::SUCCESS)
}
