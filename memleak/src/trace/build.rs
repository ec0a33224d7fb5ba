//! Builds the trace report from the detached tracer's table: liveness check, aggregation,
//! site caches, symbolization, and the comparison with the kernel's own counters.
use std::time::{Duration, Instant};

use anyhow::Result;
use hashbrown::HashMap;
use memleak_common::AllocKind;

use super::{
    Options, accounting,
    aggregate::{self, Site},
    marks::{self, MarkTally},
    report::{self, LivenessStats, Report, Stats},
    site_caches,
};
use crate::{
    bpf::maps::{self as table, TracerMaps},
    kernel::{process::ProcessMaps, slab_merges::SlabMerges},
    kinds::KindAttach,
    scan,
    symbols::{
        Frame, KernelSymbolizer, ModuleSymbols, StackSymbolizer, UserSymbolizer, allocators,
    },
    util::{build::Producer, units::thousands},
};

pub struct ReportHeader {
    pub skipped_runs: u64,
    pub kernel: String,
    pub elapsed: Duration,
    /// How exact the ages are ([`Report::age_resolution_ms`]).
    pub age_resolution: Duration,
    /// The stack sample's limit per CPU, if it has one.
    pub stack_sample_limit: Option<table::StackSampleLimit>,
    pub attach: String,
    pub methods: Vec<KindAttach>,
    /// kmem_cache records name their cache by its `struct kmem_cache *` (tp_btf, raw_tp from
    /// Linux 6.1), rather than by a hash of its name or not at all.
    pub cache_ids_are_pointers: bool,
    pub notes: Vec<String>,
    pub free_paths: Vec<String>,
    /// Modules seen loaded during the window, with their symbols: names the call sites of
    /// modules unloaded before the report.
    pub module_symbols: ModuleSymbols,
    /// For a user-space trace: the process's mappings, taken while it was alive.
    pub user_process: Option<ProcessMaps>,
    /// Mappings of processes taken as they exited (`run --user-stacks`'s command), by pid:
    /// they name the user frames of processes gone by report time.
    pub exited_processes: HashMap<u32, ProcessMaps>,
}

/// Builds the report with an entry for every site (leak checks see them all; the caller
/// truncates to `--top` for display). `merges` are the slab caches' as the window ends.
pub fn build_report(
    options: &Options,
    maps: &TracerMaps,
    now_ns: u64,
    mut header: ReportHeader,
    scan: Option<&scan::CacheScan>,
    cache_reader: KernelMemory<'_>,
    merges: &SlabMerges,
) -> Result<Report> {
    let counters = table::read_counters(maps)?;
    let min_age = options.min_age;
    let mut memory = cache_reader;
    let liveness = check_liveness(
        |visit| table::for_each_outstanding(maps, visit),
        &mut memory,
        header.cache_ids_are_pointers,
        &mut header.notes,
    )?;
    let mut symbolizer = match header.user_process.take() {
        Some(maps) => StackSymbolizer::User(UserSymbolizer::new(maps)),
        None => {
            let symbolizer = KernelSymbolizer::new()
                .with_recorded_modules(std::mem::take(&mut header.module_symbols));
            let unloaded = symbolizer.unloaded_modules();
            if !unloaded.is_empty() {
                header.notes.push(format!(
                    "unloaded during the trace: {}; their call sites are named from their \
                     symbols as recorded while they were loaded",
                    unloaded.join(", ")
                ));
            }
            StackSymbolizer::Kernel(symbolizer)
        }
    };
    // User stacks are all read here (every one may rename its call site), and serve below.
    let (user_call_sites, user_stacks) = match &mut symbolizer {
        StackSymbolizer::User(user) => {
            let (call_sites, stacks) = user_call_sites(maps, user)?;
            (call_sites, Some(stacks))
        }
        StackSymbolizer::Kernel(_) => (HashMap::new(), None),
    };
    let mut aggregator = aggregate::Aggregator::new(now_ns, min_age);
    let mut tally = scan.map(|scan| MarkTally::new(scan, now_ns, min_age));
    let mut cache_picks = site_caches::Picks::default();
    let (mut outstanding, mut outstanding_bytes) = (0u64, 0u64);
    let mut states = liveness.states.iter();
    table::for_each_outstanding(maps, |key, record| {
        let rewritten;
        let record = match user_call_sites.get(&record.stack_id) {
            Some(&call_site) => {
                rewritten = memleak_common::AllocRecord {
                    call_site,
                    ..*record
                };
                &rewritten
            }
            None => record,
        };
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
    let marks = tally.map(MarkTally::finish);
    let aggregate = aggregator.finish();
    let mut sites = aggregate.sites;
    aggregate::rank(&mut sites, options.sort);

    let stacks = match user_stacks {
        Some(stacks) => stacks,
        None => {
            let stack_ids = sites.iter().flat_map(|site| site.stacks.keys().copied());
            table::read_stacks(maps, stack_ids)?
        }
    };
    let missed_free_sites = table::read_missed_free_sites(maps)?;
    symbolizer.resolve(
        report::addresses_to_symbolize(&sites, &stacks)
            .into_iter()
            .chain(missed_free_sites.keys().copied()),
    )?;
    let cache_names = table::read_cache_names(maps)?;
    let comms = table::read_comms(maps)?;
    let frame = |addr| symbolizer.frame(addr);

    let page_sites_contradicted = check_page_callers(&sites, &stacks, &frame, &mut header.notes);
    let (backing, sites): (Vec<Site>, Vec<Site>) = sites.into_iter().partition(|site| {
        site.key.kind == AllocKind::Page
            && (allocators::backs_another_kind(&[site.key.call_site], &frame)
                || site.stacks.keys().any(|id| {
                    stacks
                        .get(id)
                        .is_some_and(|stack| allocators::backs_another_kind(stack, &frame))
                }))
    });
    let backing_pages: u64 = backing.iter().map(|site| site.count).sum();
    let backing_pages_bytes: u64 = backing.iter().map(|site| site.bytes).sum();
    let (bookkeeping, sites): (Vec<Site>, Vec<Site>) = sites
        .into_iter()
        .partition(|site| allocators::is_bookkeeping(&frame(site.key.call_site)));
    let bookkeeping_objects: u64 = bookkeeping.iter().map(|site| site.count).sum();
    let bookkeeping_bytes: u64 = bookkeeping.iter().map(|site| site.bytes).sum();
    let site_count = sites.len() as u64;
    let user_stacks = options
        .tracer
        .user_stacks
        .then(|| user_stacks_of(maps, &sites, &header.exited_processes, &mut header.notes))
        .transpose()?;
    let user_frame = user_stacks
        .as_ref()
        .map(|(_, symbolizer)| |pid, addr| symbolizer.frame_in(pid, addr));
    let context = report::Context {
        stacks: &stacks,
        cache_names: &cache_names,
        site_caches: &site_caches,
        comms: &comms,
        now_ns,
        sample_rate: options.tracer.sample_rate,
        frame: &frame,
        user_stacks: user_stacks
            .as_ref()
            .zip(user_frame.as_ref())
            .map(|((stacks, _), frame)| report::UserStackSource { stacks, frame }),
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
        entry.unverified = site.unverified * u64::from(options.tracer.sample_rate);
    }
    for entry in &mut entries {
        entry.name_merged_caches(merges);
    }
    let scan = scan.map(|scan| {
        let mut report = scan.report(&header.kernel, Some(marks::marking(&entries)));
        if options.withhold_contents {
            report.withhold_contents();
        }
        report
    });
    Ok(Report {
        schema: report::SCHEMA_VERSION,
        memleak: Producer::this(),
        kernel: header.kernel,
        duration_ms: header.elapsed.as_millis() as u64,
        age_resolution_ms: header.age_resolution.as_millis() as u64,
        attach: header.attach,
        methods: header.methods,
        free_paths: header.free_paths,
        sample_rate: options.tracer.sample_rate,
        stack_sample_rate: options.tracer.stack_sample_rate,
        stack_sample_limit: header
            .stack_sample_limit
            .map(|limit| report::StackSampleLimit {
                ticks: limit.ticks,
                interval_us: limit.span.map(|span| span.as_micros() as u64),
            }),
        stats: Stats {
            counters,
            outstanding: outstanding - backing_pages - bookkeeping_objects,
            outstanding_bytes: outstanding_bytes - backing_pages_bytes - bookkeeping_bytes,
            hidden_younger: aggregate.hidden_younger,
            skipped_runs: header.skipped_runs,
            sites: site_count,
            backing_pages,
            backing_pages_bytes,
            bookkeeping_objects,
            bookkeeping_bytes,
            page_sites_contradicted,
            liveness: liveness.stats,
        },
        notes: header.notes,
        kinds: Vec::new(),
        caches: Vec::new(),
        processes: options.by_process.then(|| {
            let mut processes = report::processes(&sites, &comms, options.tracer.sample_rate);
            processes.truncate(options.top);
            processes
        }),
        check: None,
        scan,
        missed_free_sites: report::missed_free_sites(&missed_free_sites, &frame),
        accounting: Vec::new(),
        stacks: entries,
    })
}

/// Stacks by id, innermost frame first.
type Stacks = HashMap<u32, Vec<u64>>;

/// For user-space records whose call site is in a language runtime's allocation machinery
/// (Rust's vector growth, C++'s `operator new`): their stack id to the first frame outside it,
/// the code that asked for memory, which stands as their call site. Also returns every stack
/// of the table's records, by id.
fn user_call_sites(
    maps: &TracerMaps,
    symbolizer: &mut UserSymbolizer,
) -> Result<(HashMap<i32, u64>, Stacks)> {
    let mut ids = hashbrown::HashSet::new();
    table::for_each_outstanding(maps, |_, record| {
        if record.stack_id >= 0 {
            ids.insert(record.stack_id as u32);
        }
    })?;
    let stacks = table::read_stacks(maps, ids)?;
    symbolizer.resolve(stacks.values().flatten().copied())?;
    let call_sites = stacks
        .iter()
        .filter_map(|(&id, stack)| {
            let caller = stack.iter().position(|&addr| {
                !allocators::is_user_allocator_internal(&symbolizer.frame(addr))
            })?;
            (caller > 0).then(|| (id as i32, stack[caller]))
        })
        .collect();
    Ok((call_sites, stacks))
}

/// The user-space stacks (`--user-stacks`) of `sites`, read and symbolized in the current
/// mappings of their processes, or those taken as they exited (`exited`). The others leave
/// bare addresses, and a note names them.
fn user_stacks_of(
    maps: &TracerMaps,
    sites: &[Site],
    exited: &HashMap<u32, ProcessMaps>,
    notes: &mut Vec<String>,
) -> Result<(Stacks, UserSymbolizer)> {
    let mut by_process: HashMap<u32, hashbrown::HashSet<u32>> = HashMap::new();
    for key in sites.iter().flat_map(|site| site.user_stacks.keys()) {
        by_process
            .entry(key.tgid)
            .or_default()
            .insert(key.user_stack);
    }
    let ids: hashbrown::HashSet<u32> = by_process.values().flatten().copied().collect();
    let stacks = table::read_user_stacks(maps, ids)?;
    let mut symbolizer = UserSymbolizer::for_processes();
    let mut gone = Vec::new();
    for (&pid, ids) in &by_process {
        let process = ProcessMaps::read(pid)
            .ok()
            .filter(|process| !process.mappings.is_empty())
            .or_else(|| exited.get(&pid).cloned());
        match process {
            Some(process) => {
                symbolizer.add_process(pid, process);
                let addrs = ids.iter().filter_map(|id| stacks.get(id)).flatten();
                symbolizer.resolve_in(pid, addrs.copied())?;
            }
            None => gone.push(pid),
        }
    }
    if !gone.is_empty() {
        gone.sort_unstable();
        const NAMED: usize = 10;
        let named: Vec<String> = gone.iter().take(NAMED).map(u32::to_string).collect();
        notes.push(format!(
            "the user stacks of {} processes that exited before the report are bare addresses \
             (pid {}{})",
            gone.len(),
            named.join(", "),
            if gone.len() > NAMED { ", ..." } else { "" }
        ));
    }
    Ok((stacks, symbolizer))
}

/// Puts the traced net change per cache and kind beside the kernel's counters, and flags the
/// entries of the caches and kinds whose traced growth the kernel does not show.
pub fn compare_with_kernel(
    report: &mut Report,
    start: &accounting::KernelCounts,
    end: &accounting::KernelCounts,
) {
    let mut caches: std::collections::BTreeMap<String, accounting::Traced> = Default::default();
    let (mut vmalloc, mut percpu) = (accounting::Traced::default(), accounting::Traced::default());
    for entry in &report.stacks {
        let traced = match (entry.kind.as_str(), &entry.cache) {
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
                line.cache.as_deref().unwrap_or(&line.kind),
                thousands(line.traced),
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
pub struct KernelMemory<'a> {
    view: Option<&'a mut scan::KernelView>,
    layout: Option<Result<scan::SlabLayout>>,
    opened: Option<scan::KernelView>,
    /// Why the reader could not be opened, once it has failed.
    error: Option<String>,
}

impl<'a> KernelMemory<'a> {
    /// Reads through `view` when there is one (the content scanner's), otherwise through a
    /// reader opened on first use with `layout`.
    pub fn new(
        view: Option<&'a mut scan::KernelView>,
        layout: Option<Result<scan::SlabLayout>>,
    ) -> Self {
        Self {
            view,
            layout,
            opened: None,
            error: None,
        }
    }

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
    pub fn resolve(
        &mut self,
        picks: &site_caches::Picks,
        notes: &mut Vec<String>,
    ) -> HashMap<aggregate::SiteKey, String> {
        if picks.is_empty() {
            return HashMap::new();
        }
        let read = match self
            .view()
            .and_then(|view| picks.resolve(|objects| view.cache_names(objects)))
        {
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
pub struct LivenessResult {
    pub states: Vec<scan::Liveness>,
    pub stats: LivenessStats,
}

/// Whether the liveness check looks at this record: slab objects only.
pub fn is_slab_object(record: &memleak_common::AllocRecord) -> bool {
    match AllocKind::from_u32(u32::from(record.kind)) {
        Some(AllocKind::Kmalloc) => {
            site_caches::kmalloc_cache_name(u64::from(record.bytes_allocated)).is_some()
        }
        Some(AllocKind::KmemCache) => true,
        _ => false,
    }
}

/// Checks `queries` in kernel memory, then those left unverified once more: freelists change
/// while they are read (a CPU's, lockless, all the time), and a walk that met a list mid-change
/// is broken and leaves its slab's objects unverified, where a second read usually is whole.
fn check_twice(
    view: &mut scan::KernelView,
    queries: &[scan::LivenessQuery],
) -> Result<scan::LivenessCheck> {
    let mut check = view.liveness(queries)?;
    let unverified: Vec<usize> = (0..check.states.len())
        .filter(|&index| check.states[index] == scan::Liveness::Unverified)
        .collect();
    if unverified.is_empty() {
        return Ok(check);
    }
    let again: Vec<scan::LivenessQuery> = unverified.iter().map(|&index| queries[index]).collect();
    let second = view.liveness(&again)?;
    let settled = second
        .states
        .iter()
        .filter(|&&state| state != scan::Liveness::Unverified)
        .count();
    log::info!(
        "liveness check: {settled} of {} unverified objects settled on a second look",
        unverified.len()
    );
    for (index, state) in unverified.into_iter().zip(second.states) {
        check.states[index] = state;
    }
    Ok(check)
}

/// Checks in kernel memory that every outstanding slab object is still allocated (see
/// `scan::liveness`); objects found free are left out of the report and counted.
pub fn check_liveness(
    records: impl FnOnce(&mut dyn FnMut(u64, &memleak_common::AllocRecord)) -> Result<()>,
    memory: &mut KernelMemory<'_>,
    cache_ids_are_pointers: bool,
    notes: &mut Vec<String>,
) -> Result<LivenessResult> {
    let mut queries = Vec::new();
    records(&mut |key, record| {
        if is_slab_object(record) {
            queries.push(scan::LivenessQuery {
                object: scan::Object {
                    address: key,
                    size: record.bytes_allocated,
                },
                cache: (record.kind == AllocKind::KmemCache as u16
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
    let check = match memory.view().and_then(|view| check_twice(view, &queries)) {
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

/// Checks the page callers the frame walk found against the stacks captured with them: a
/// page site's caller must be a frame of at least one of its stacks. A site whose stacks all
/// lack it would be a wrong claim (a frame walked with a wrong table); it is counted and named
/// in a note. Returns how many sites that is.
fn check_page_callers(
    sites: &[Site],
    stacks: &HashMap<u32, Vec<u64>>,
    frame: &dyn Fn(u64) -> Frame,
    notes: &mut Vec<String>,
) -> u64 {
    let contradicted: Vec<String> = sites
        .iter()
        .filter(|site| site.key.kind == AllocKind::Page && site.key.call_site != 0)
        .filter(|site| {
            let captured: Vec<&Vec<u64>> =
                site.stacks.keys().filter_map(|id| stacks.get(id)).collect();
            !captured.is_empty()
                && !captured
                    .iter()
                    .any(|stack| stack.contains(&site.key.call_site))
        })
        .map(|site| frame(site.key.call_site).to_string())
        .collect();
    if !contradicted.is_empty() {
        notes.push(format!(
            "{} page call sites found by walking the page allocator's frames are not in the \
             stacks captured with them, and may be wrong: {}",
            contradicted.len(),
            contradicted.join(", ")
        ));
    }
    contradicted.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::aggregate::SiteKey;

    fn page_site(call_site: u64, stack_ids: &[u32]) -> Site {
        Site {
            key: SiteKey {
                kind: AllocKind::Page,
                cache_id: 0,
                call_site,
                kmalloc_gfp: 0,
            },
            count: 10,
            bytes: 40_960,
            bytes_requested: 40_960,
            oldest_timestamp_ns: 0,
            stacks: stack_ids.iter().map(|&id| (id, 1)).collect(),
            failed_stacks: 0,
            processes: HashMap::new(),
            unverified: 0,
            user_stacks: HashMap::new(),
        }
    }

    #[test]
    fn a_page_caller_missing_from_its_stacks_is_counted_and_named() {
        // Stack 1 passes through the caller 0xa5; stack 2 does not.
        let stacks: HashMap<u32, Vec<u64>> =
            [(1, vec![0xa0, 0xa5, 0xb0]), (2, vec![0xa0, 0xc0])].into();
        let frame = |address| Frame::unknown(address);
        let mut notes = Vec::new();
        let sites = [
            page_site(0xa5, &[1]),
            // One stack of the two confirms it.
            page_site(0xa5, &[1, 2]),
            // No stack captured: nothing to check against.
            page_site(0xa5, &[]),
            // Named by its stack (the walk was off or failed).
            page_site(0, &[2]),
        ];
        assert_eq!(check_page_callers(&sites, &stacks, &frame, &mut notes), 0);
        assert!(notes.is_empty());
        let wrong = [page_site(0xa5, &[2]), page_site(0xd0, &[1, 2])];
        assert_eq!(check_page_callers(&wrong, &stacks, &frame, &mut notes), 2);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("2 page call sites"), "{notes:?}");
        assert!(notes[0].contains("0xd0"), "{notes:?}");
    }
}
