//! The trace report's model: built once from the aggregate; `output` renders it.
use hashbrown::HashMap;
use memleak_common::AllocKind;
use serde::{Deserialize, Serialize};

use super::site_caches::kmalloc_cache_name;
use super::{
    accounting::Accounting,
    aggregate::{Site, SiteKey, trim_to_call_site},
};
use crate::{
    bpf::maps::Counters,
    kernel::slab_merges::SlabMerges,
    kinds::{KindAttach, kind_name},
    scan::{FreeReason, Liveness, ScanReport},
    symbols::{
        Frame,
        allocators::{is_allocator_internal, user_stack_is_the_allocators},
    },
    util::build::Producer,
};

/// Version of the JSON layout; bumped only for incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// The least time between two sampled stacks on one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackSampleLimit {
    /// Clock ticks (jiffies).
    pub ticks: u32,
    /// Those ticks in microseconds; absent where the kernel's tick rate was not measured
    /// (then the ticks were chosen for HZ=250).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_us: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    /// The memleak that wrote the report (absent from older reports: `unknown`).
    #[serde(default)]
    pub memleak: Producer,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    pub duration_ms: u64,
    /// Ages (`oldest_age_ms`) are exact to this many milliseconds, and never longer than the
    /// object's: two ticks where allocations are timed in jiffies, 0 where the programs read
    /// the nanosecond clock (absent from older reports: 0).
    #[serde(default)]
    pub age_resolution_ms: u64,
    /// How the slab events are followed: `tp_btf`, `raw_tp` or `tracepoint`.
    pub attach: String,
    /// How each kind traced is followed, and why not more cheaply.
    #[serde(default)]
    pub methods: Vec<KindAttach>,
    /// The free paths followed as they happen, each with its hook: `kfree (tp_btf)`,
    /// `kvfree_call_rcu (fentry)`. Frees by other paths are found at report time by the
    /// liveness check (slab) or not at all (see `notes`).
    pub free_paths: Vec<String>,
    /// One object in `sample_rate` is tracked; counts and bytes are scaled up by it.
    pub sample_rate: u32,
    pub stack_sample_rate: u32,
    /// With `stack_sample_rate` above 1: at most one sampled stack per CPU in this long
    /// (absent in older reports and where every stack of the sample is taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_sample_limit: Option<StackSampleLimit>,
    pub stats: Stats,
    /// Missing kernel features and fallbacks, in plain words.
    pub notes: Vec<String>,
    /// Outstanding memory per kind, largest first (all sites, not only the shown ones).
    pub kinds: Vec<Total>,
    /// Outstanding memory per slab cache, largest first (at most 10).
    pub caches: Vec<Total>,
    /// With `--by-process`: processes by the outstanding memory they allocated, most first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<Process>>,
    /// The leak check's result, when one was asked for (`--fail-on-leak`, `--junit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Verdict>,
    /// With `--cache`: the content scan of that cache at the end of the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scan: Option<ScanReport>,
    /// Call sites whose objects were allocated again at the same address with no free seen
    /// (`missed_frees`), most first: where objects leave by a path the tracer does not follow.
    pub missed_free_sites: Vec<MissedFreeSite>,
    /// The traced net change per cache and kind beside the kernel's counters over the window,
    /// largest traced excess first.
    pub accounting: Vec<Accounting>,
    pub stacks: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MissedFreeSite {
    pub call_site: Frame,
    pub count: u64,
}

/// Missed-free call sites shown at most.
const MISSED_FREE_SITES_SHOWN: usize = 20;

/// The call sites with the most missed frees, most first, symbolized.
pub fn missed_free_sites(
    counts: &HashMap<u64, u64>,
    frame: &dyn Fn(u64) -> Frame,
) -> Vec<MissedFreeSite> {
    let mut sites: Vec<(u64, u64)> = counts.iter().map(|(&site, &count)| (site, count)).collect();
    sites.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    sites
        .into_iter()
        .take(MISSED_FREE_SITES_SHOWN)
        .map(|(call_site, count)| MissedFreeSite {
            call_site: frame(call_site),
            count,
        })
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    #[serde(flatten)]
    pub counters: Counters,
    /// Objects in the table at the end of the window.
    pub outstanding: u64,
    pub outstanding_bytes: u64,
    /// Outstanding objects hidden by `--min-age`.
    pub hidden_younger: u64,
    /// Program runs the kernel skipped because one of memleak's programs was already running on
    /// that CPU: allocations or frees that were not seen.
    pub skipped_runs: u64,
    /// Allocation sites with outstanding objects (before `--top`).
    pub sites: u64,
    /// Outstanding pages (and their bytes) that back slabs, large kmallocs, vmalloc areas or
    /// percpu chunks: counted under those kinds, left out of `outstanding` and the entries.
    pub backing_pages: u64,
    pub backing_pages_bytes: u64,
    /// Outstanding objects (and bytes) the allocators keep for their own slabs and vmalloc
    /// areas (a slab's object extension vector, a `struct vmap_area`): they live as long as
    /// those, and leave by paths that fire no free event (vmalloc's lazy purge). Left out of
    /// `outstanding` and the entries.
    #[serde(default)]
    pub bookkeeping_objects: u64,
    #[serde(default)]
    pub bookkeeping_bytes: u64,
    /// Page call sites found by the walk through the page allocator's frames that are in none
    /// of the stacks captured with them (each is named in a note): 0 unless the walk is wrong.
    #[serde(default)]
    pub page_sites_contradicted: u64,
    #[serde(flatten)]
    pub liveness: LivenessStats,
}

/// What the liveness check found of the outstanding slab objects (tracked objects, before
/// scaling by the sample rate).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LivenessStats {
    /// Objects found free in kernel memory, left out of `outstanding` and the entries.
    pub verified_free: u64,
    /// Where they were found: their page no longer a slab of their cache, their slab's
    /// freelist, a CPU's freelist, a sheaf or barn.
    pub verified_free_where: FreeWhere,
    /// Objects found allocated: slots of a slab of their cache on none of the free lists.
    pub verified_allocated: u64,
    /// Objects that could not be checked (unreadable, a slab changing while read, per-CPU
    /// structures that could not be walked); they stay in the entries, counted in each
    /// entry's `unverified`.
    pub unverified: u64,
    /// How long the check took.
    pub liveness_check_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FreeWhere {
    pub slab_gone: u64,
    pub slab_freelist: u64,
    pub cpu_freelist: u64,
    pub sheaf: u64,
}

impl LivenessStats {
    pub fn count(&mut self, state: Liveness) {
        match state {
            Liveness::Allocated => self.verified_allocated += 1,
            Liveness::Unverified => self.unverified += 1,
            Liveness::Free(reason) => {
                self.verified_free += 1;
                *match reason {
                    FreeReason::SlabGone => &mut self.verified_free_where.slab_gone,
                    FreeReason::SlabFreelist => &mut self.verified_free_where.slab_freelist,
                    FreeReason::CpuFreelist => &mut self.verified_free_where.cpu_freelist,
                    FreeReason::Sheaf => &mut self.verified_free_where.sheaf,
                } += 1;
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    /// Outstanding bytes (as allocated, i.e. rounded up to the slab object size).
    pub bytes: u64,
    pub count: u64,
    pub bytes_requested: u64,
    /// Whether `bytes` and `count` are estimates scaled from a sample (`--sample-rate`).
    pub estimated: bool,
    pub kind: String,
    /// The slab cache as the allocation event names it.
    pub cache: Option<String>,
    /// For kmem_cache entries, the other names of `cache`: caches SLUB merged with it
    /// (aliases of one `struct kmem_cache`). The event names only the cache they share, so
    /// these objects may have been allocated under any of the names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_merged_with: Vec<String>,
    pub oldest_age_ms: u64,
    /// Where the allocator was called from: the frame the stacks below all pass through.
    pub call_site: Frame,
    /// The stack most of this site's sampled objects were allocated through, innermost first,
    /// starting at the call site. Just the call site when no stack was captured.
    pub frames: Vec<Frame>,
    /// How many of this site's objects had their stack captured.
    pub stack_samples: u64,
    /// How many of those were allocated through `frames`.
    pub frames_samples: u64,
    /// Objects of this site whose stack capture failed.
    pub stack_failures: u64,
    /// Further distinct stacks reaching this site, with their sample counts.
    pub other_stacks: Vec<OtherStack>,
    /// Processes that allocated this site's objects, most bytes first (at most 5).
    pub processes: Vec<Process>,
    /// Objects of this entry the liveness check could not verify as still allocated (scaled
    /// like `count`).
    pub unverified: u64,
    /// The kernel's counters for this entry's cache (or kind) grew by less than the trace
    /// says, beyond noise, and some objects could not be verified: the entry may list freed
    /// objects.
    pub unreliable: bool,
    /// With `--cache`: `marked` and `in_scanned_cache`, how this site's objects compare with
    /// the scanned cache's largest group of similar objects.
    #[serde(flatten)]
    pub marks: Option<SiteMarks>,
    /// With `--user-stacks`: the user-space code behind this entry's sampled objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_stacks: Option<UserStacks>,
}

impl Entry {
    /// Lists the other names of a kmem_cache entry's cache, when SLUB merged it with others.
    pub fn name_merged_caches(&mut self, merges: &SlabMerges) {
        self.cache_merged_with = merged_caches(&self.kind, self.cache.as_deref(), || merges);
    }
}

/// The other names of the cache of a `kind` allocation in `cache`, sorted. A kmem_cache
/// allocation may have been made under any name SLUB merged its cache with; a kmalloc one is
/// kmalloc's, whatever caches share its size class. Empty for the other kinds and for a cache
/// SLUB did not merge; `merges` is asked only for a kmem_cache allocation.
pub fn merged_caches<'a>(
    kind: &str,
    cache: Option<&str>,
    merges: impl FnOnce() -> &'a SlabMerges,
) -> Vec<String> {
    match cache {
        Some(cache) if kind == kind_name(AllocKind::KmemCache) => merges().others(cache),
        _ => Vec::new(),
    }
}

/// The user-space stacks captured with an entry's kernel stacks.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct UserStacks {
    /// Sampled objects whose user stack is shown below or among the ones not listed.
    pub samples: u64,
    /// Sampled objects whose user stack was captured but is not the allocating code's: their
    /// kernel stack ran in an interrupt or an exec, or was too deep to tell.
    pub withheld: u64,
    /// The heaviest stacks, most objects first (at most 3).
    pub stacks: Vec<UserStack>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UserStack {
    pub pid: u32,
    pub comm: Option<String>,
    pub samples: u64,
    /// Innermost first: the instruction after the system call (or the faulting one), then the
    /// callers frame pointers lead to.
    pub frames: Vec<Frame>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeakingSite {
    pub call_site: String,
    pub kind: String,
    pub cache: Option<String>,
    pub bytes: u64,
    pub count: u64,
}

/// The result of a leak check, serialized as the report's `check` field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub scope: String,
    /// With `--cache NAME` of a cache SLUB merged with others: their names. The events name
    /// the shared cache by one of them, so its kmem_cache objects count under any of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_merged_with: Vec<String>,
    pub bytes: u64,
    pub count: u64,
    pub max_bytes: u64,
    pub max_count: u64,
    pub failed: bool,
    /// The allocation sites in scope, largest first.
    pub sites: Vec<LeakingSite>,
}

/// How one allocation site's outstanding objects compare with the scanned cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteMarks {
    /// Objects similar to the largest group's representative.
    pub marked: u64,
    /// Objects found among the scanned cache's in-use objects.
    pub in_scanned_cache: u64,
}

/// Bytes and objects outstanding in one kind or one cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Total {
    pub name: String,
    pub bytes: u64,
    pub count: u64,
    /// A cache's other names, SLUB having merged it with them: those of its kmem_cache
    /// entries (`Entry::cache_merged_with`). Empty for a kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_with: Vec<String>,
}

const CACHES_SHOWN: usize = 10;

/// Per-kind and per-cache totals of `entries`, largest first.
pub fn totals(entries: &[Entry]) -> (Vec<Total>, Vec<Total>) {
    fn add(totals: &mut HashMap<String, Total>, name: &str, entry: &Entry, merged_with: &[String]) {
        let total = totals.entry_ref(name).or_insert_with(|| Total {
            name: name.to_owned(),
            bytes: 0,
            count: 0,
            merged_with: Vec::new(),
        });
        total.bytes += entry.bytes;
        total.count += entry.count;
        // A cache's entries list the same names, or none (kmalloc's).
        if total.merged_with.is_empty() {
            total.merged_with = merged_with.to_vec();
        }
    }
    fn largest_first(totals: HashMap<String, Total>) -> Vec<Total> {
        let mut totals: Vec<Total> = totals.into_values().collect();
        totals.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
        totals
    }
    let mut kinds = HashMap::new();
    let mut caches = HashMap::new();
    for entry in entries {
        add(&mut kinds, &entry.kind, entry, &[]);
        if let Some(cache) = &entry.cache {
            add(&mut caches, cache, entry, &entry.cache_merged_with);
        }
    }
    let mut caches = largest_first(caches);
    caches.truncate(CACHES_SHOWN);
    (largest_first(kinds), caches)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OtherStack {
    pub samples: u64,
    pub frames: Vec<Frame>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub comm: Option<String>,
    pub count: u64,
    pub bytes: u64,
}

/// Outstanding memory per allocating process over all `sites`, most bytes first.
pub fn processes(sites: &[Site], comms: &HashMap<u32, String>, sample_rate: u32) -> Vec<Process> {
    let scale = u64::from(sample_rate);
    let mut totals: HashMap<u32, Process> = HashMap::new();
    for site in sites {
        for (&pid, share) in &site.processes {
            let process = totals.entry(pid).or_insert_with(|| Process {
                pid,
                comm: comms.get(&pid).cloned(),
                count: 0,
                bytes: 0,
            });
            process.count += share.count * scale;
            process.bytes += share.bytes * scale;
        }
    }
    let mut processes: Vec<Process> = totals.into_values().collect();
    processes.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then(a.pid.cmp(&b.pid)));
    processes
}

const OTHER_STACKS_SHOWN: usize = 3;
const PROCESSES_SHOWN: usize = 5;
const USER_STACKS_SHOWN: usize = 3;

/// The user-space stacks of `--user-stacks`, for [`entry`].
pub struct UserStackSource<'a> {
    /// By `USER_STACKS` id, innermost first.
    pub stacks: &'a HashMap<u32, Vec<u64>>,
    /// A user-space address of a process as a frame.
    pub frame: &'a dyn Fn(u32, u64) -> Frame,
}

/// Everything `build` needs besides the sites.
pub struct Context<'a> {
    pub stacks: &'a HashMap<u32, Vec<u64>>,
    pub cache_names: &'a HashMap<u64, String>,
    /// The caches of kmalloc sites, and of kmem_cache sites whose event names no cache, read
    /// from kernel memory or (kmalloc only) named from size and gfp flags.
    pub site_caches: &'a HashMap<SiteKey, String>,
    pub comms: &'a HashMap<u32, String>,
    pub now_ns: u64,
    pub sample_rate: u32,
    pub frame: &'a dyn Fn(u64) -> Frame,
    /// With `--user-stacks`.
    pub user_stacks: Option<UserStackSource<'a>>,
}

/// Addresses `entry` will ask symbolization for: call sites and trimmed stacks of `sites`.
pub fn addresses_to_symbolize(sites: &[Site], stacks: &HashMap<u32, Vec<u64>>) -> Vec<u64> {
    let mut addrs = Vec::new();
    for site in sites {
        addrs.push(site.key.call_site);
        for (id, _) in site
            .stacks_by_weight()
            .into_iter()
            .take(1 + OTHER_STACKS_SHOWN)
        {
            if let Some(stack) = stacks.get(&id) {
                addrs.extend_from_slice(trim_to_call_site(stack, site.key.call_site));
            }
        }
        // Whether a user stack is shown depends on every frame of its kernel stack.
        for key in site.user_stacks.keys() {
            if let Some(stack) = stacks.get(&key.kernel_stack) {
                addrs.extend_from_slice(stack);
            }
        }
    }
    addrs
}

/// The user-space stacks of `site`'s sampled objects, where they are the allocating code's.
fn user_stacks(site: &Site, context: &Context<'_>, source: &UserStackSource<'_>) -> UserStacks {
    let mut kept: HashMap<(u32, u32), u64> = HashMap::new();
    let mut withheld = 0;
    for (key, &objects) in &site.user_stacks {
        let in_task_context = context
            .stacks
            .get(&key.kernel_stack)
            .is_some_and(|stack| user_stack_is_the_allocators(stack, context.frame));
        if in_task_context && source.stacks.contains_key(&key.user_stack) {
            *kept.entry((key.tgid, key.user_stack)).or_default() += objects;
        } else {
            withheld += objects;
        }
    }
    let mut heaviest: Vec<((u32, u32), u64)> = kept.into_iter().collect();
    heaviest.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    UserStacks {
        samples: heaviest.iter().map(|(_, objects)| objects).sum(),
        withheld,
        stacks: heaviest
            .into_iter()
            .take(USER_STACKS_SHOWN)
            .map(|((pid, id), samples)| UserStack {
                pid,
                comm: context.comms.get(&pid).cloned(),
                samples,
                frames: source.stacks[&id]
                    .iter()
                    .map(|&ip| (source.frame)(pid, ip))
                    .collect(),
            })
            .collect(),
    }
}

pub fn entry(site: &Site, context: &Context<'_>) -> Entry {
    let scale = u64::from(context.sample_rate);
    let frames_of = |id: u32| -> Option<Vec<Frame>> {
        let stack = context.stacks.get(&id)?;
        let frames: Vec<Frame> = trim_to_call_site(stack, site.key.call_site)
            .iter()
            .map(|&ip| (context.frame)(ip))
            .collect();
        if site.key.call_site != 0 {
            return Some(frames);
        }
        // No call site from the event: the caller is the first frame past the tracing and
        // allocator frames (above them sits the BPF program itself).
        let caller = frames
            .iter()
            .position(is_allocator_internal)
            .and_then(|first| {
                let past = frames[first..]
                    .iter()
                    .position(|frame| !is_allocator_internal(frame))?;
                Some(first + past)
            })
            .unwrap_or(0);
        Some(frames[caller..].to_vec())
    };
    let weighted = site.stacks_by_weight();
    let mut with_frames = weighted
        .iter()
        .filter_map(|&(id, samples)| Some((samples, frames_of(id)?)));
    let representative = with_frames.next();
    let call_site = match (&representative, site.key.call_site) {
        (Some((_, frames)), 0) if !frames.is_empty() => frames[0].clone(),
        _ => (context.frame)(site.key.call_site),
    };
    let (frames_samples, frames) = representative.unwrap_or_else(|| (0, vec![call_site.clone()]));
    let other_stacks = with_frames
        .take(OTHER_STACKS_SHOWN)
        .map(|(samples, frames)| OtherStack { samples, frames })
        .collect();

    let mut processes: Vec<Process> = site
        .processes
        .iter()
        .map(|(&pid, share)| Process {
            pid,
            comm: context.comms.get(&pid).cloned(),
            count: share.count * scale,
            bytes: share.bytes * scale,
        })
        .collect();
    processes.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then(a.pid.cmp(&b.pid)));
    processes.truncate(PROCESSES_SHOWN);

    let cache = match site.key.kind {
        AllocKind::Kmalloc => context
            .site_caches
            .get(&site.key)
            .cloned()
            .or_else(|| kmalloc_cache_name(site.key.cache_id)),
        AllocKind::KmemCache => context
            .cache_names
            .get(&site.key.cache_id)
            .or_else(|| context.site_caches.get(&site.key))
            .cloned(),
        AllocKind::Vmalloc | AllocKind::Percpu | AllocKind::Page | AllocKind::User => None,
    };
    Entry {
        bytes: site.bytes * scale,
        count: site.count * scale,
        bytes_requested: site.bytes_requested * scale,
        estimated: scale > 1,
        kind: kind_name(site.key.kind).to_owned(),
        cache,
        cache_merged_with: Vec::new(),
        oldest_age_ms: context.now_ns.saturating_sub(site.oldest_timestamp_ns) / 1_000_000,
        call_site,
        frames,
        stack_samples: site.stack_samples(),
        frames_samples,
        stack_failures: site.failed_stacks,
        other_stacks,
        processes,
        unverified: 0,
        unreliable: false,
        marks: None,
        user_stacks: context
            .user_stacks
            .as_ref()
            .map(|source| user_stacks(site, context, source)),
    }
}

/// A small report over recorded-like data, for the report's tests and its renderers'.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::time::Duration;

    use hashbrown::HashMap;
    use memleak_common::{AllocKind, AllocRecord};

    use super::*;
    use crate::{
        bpf::maps::Counters,
        trace::aggregate::{self, SortKey},
    };

    pub fn record(
        call_site: u64,
        kind: AllocKind,
        cache_id: u64,
        stack_id: i32,
        tgid: u32,
    ) -> AllocRecord {
        AllocRecord {
            call_site,
            cache_id,
            allocated_at: 1_000_000_000,
            bytes_requested: 40,
            bytes_allocated: 64,
            stack_id,
            tgid,
            kind: kind as u16,
            user_stack: 0,
            gfp_flags: 0,
        }
    }

    pub fn frame(addr: u64) -> Frame {
        let symbol = match addr {
            0x10 => "alloc_site",
            0x20 => "caller",
            0x30 => "other_caller",
            _ => return Frame::unknown(addr),
        };
        Frame {
            addr: Some(addr),
            symbol: Some(symbol.into()),
            offset: Some(4),
            size: Some(0x40),
            module: None,
            source: None,
        }
    }

    pub fn sample_report(sample_rate: u32) -> Report {
        let records = [
            record(0x10, AllocKind::Kmalloc, 0, 1, 7),
            record(0x10, AllocKind::Kmalloc, 0, 1, 7),
            record(0x10, AllocKind::Kmalloc, 0, 2, 8),
            record(0x10, AllocKind::Kmalloc, 0, -1, 8),
            record(0x99, AllocKind::KmemCache, 0xcafe, -1, 7),
        ];
        let mut aggregator = aggregate::Aggregator::new(3_000_000_000, Duration::ZERO);
        records.iter().for_each(|record| aggregator.add(record));
        let mut sites = aggregator.finish().sites;
        aggregate::rank(&mut sites, SortKey::Size);
        let stacks: HashMap<u32, Vec<u64>> =
            [(1, vec![0x1, 0x2, 0x10, 0x20]), (2, vec![0x1, 0x10, 0x30])].into();
        let cache_names: HashMap<u64, String> = [(0xcafe, "filp".to_owned())].into();
        let comms: HashMap<u32, String> = [(7, "leaker".to_owned())].into();
        let context = Context {
            stacks: &stacks,
            cache_names: &cache_names,
            site_caches: &HashMap::new(),
            comms: &comms,
            now_ns: 3_000_000_000,
            sample_rate,
            frame: &frame,
            user_stacks: None,
        };
        Report {
            memleak: crate::util::build::Producer::default(),
            schema: SCHEMA_VERSION,
            kernel: "6.18.0-test".into(),
            duration_ms: 2_000,
            age_resolution_ms: 8,
            attach: "tp_btf".into(),
            methods: Vec::new(),
            free_paths: Vec::new(),
            sample_rate,
            stack_sample_rate: 64,
            stack_sample_limit: None,
            stats: Stats {
                counters: Counters::default(),
                outstanding: 5,
                outstanding_bytes: 320,
                hidden_younger: 0,
                skipped_runs: 0,
                sites: sites.len() as u64,
                backing_pages: 0,
                backing_pages_bytes: 0,
                bookkeeping_objects: 0,
                bookkeeping_bytes: 0,
                page_sites_contradicted: 0,
                liveness: LivenessStats::default(),
            },
            notes: vec!["kmem:kmem_cache_free missing".into()],
            kinds: Vec::new(),
            caches: Vec::new(),
            processes: None,
            check: None,
            scan: None,
            missed_free_sites: Vec::new(),
            accounting: Vec::new(),
            stacks: sites.iter().map(|site| entry(site, &context)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{
        fixtures::{record, sample_report},
        *,
    };
    use crate::scan::FreeReason;
    use crate::trace::aggregate;

    #[test]
    fn only_kmem_cache_entries_name_the_merged_caches() {
        let merges = SlabMerges::from_directories(
            [("kmalloc-64", ":0000064"), ("Acpi-Namespace", ":0000064")]
                .map(|(name, directory)| (name.to_owned(), directory.to_owned())),
        );
        let mut report = sample_report(1);
        // sample_report's first entry: a kmalloc site in kmalloc-64.
        let entry = &mut report.stacks[0];
        assert_eq!(entry.cache.as_deref(), Some("kmalloc-64"));
        entry.name_merged_caches(&merges);
        assert!(entry.cache_merged_with.is_empty());
        entry.kind = kind_name(AllocKind::KmemCache).to_owned();
        entry.name_merged_caches(&merges);
        assert_eq!(entry.cache_merged_with, ["Acpi-Namespace"]);
    }

    #[test]
    fn user_stacks_are_the_allocating_codes_heaviest_first() {
        let with_user = |stack_id, tgid, user_stack| memleak_common::AllocRecord {
            user_stack,
            ..record(0x10, AllocKind::Kmalloc, 0, stack_id, tgid)
        };
        let records = [
            // USER_STACKS id 4 (stored as 5) from two processes: two stacks.
            with_user(1, 7, 5),
            with_user(1, 7, 5),
            with_user(1, 7, 5),
            with_user(1, 8, 5),
            with_user(1, 7, 6),
            with_user(1, 7, 6),
            with_user(1, 7, 7),
            // Kernel stack 2 ran in a softirq, 3 was not read, user stack 8 was not read.
            with_user(2, 7, 5),
            with_user(2, 7, 5),
            with_user(3, 7, 5),
            with_user(1, 7, 9),
            // No user stack captured: neither kept nor withheld.
            with_user(1, 7, 0),
        ];
        let mut aggregator = aggregate::Aggregator::new(0, Duration::ZERO);
        records.iter().for_each(|record| aggregator.add(record));
        let sites = aggregator.finish().sites;
        let kernel_stacks: HashMap<u32, Vec<u64>> =
            [(1, vec![0x10, 0x20]), (2, vec![0x10, 0x40, 0x20])].into();
        let user_stacks: HashMap<u32, Vec<u64>> =
            [(4, vec![0x100, 0x200]), (5, vec![0x300]), (6, vec![0x400])].into();
        let frame = |addr| match addr {
            0x40 => crate::symbols::frame::named("handle_softirqs"),
            addr => fixtures::frame(addr),
        };
        // Each process's addresses are its own: the frame says whose it was asked for.
        let user_frame = |pid: u32, addr: u64| Frame::unknown(addr + u64::from(pid));
        let comms: HashMap<u32, String> = [(7, "leaker".to_owned())].into();
        let (cache_names, site_caches) = (HashMap::new(), HashMap::new());
        let context = |user_stacks| Context {
            stacks: &kernel_stacks,
            cache_names: &cache_names,
            site_caches: &site_caches,
            comms: &comms,
            now_ns: 0,
            sample_rate: 1,
            frame: &frame,
            user_stacks,
        };
        let with = context(Some(UserStackSource {
            stacks: &user_stacks,
            frame: &user_frame,
        }));
        let user = entry(&sites[0], &with).user_stacks.unwrap();
        assert_eq!((user.samples, user.withheld), (7, 4));
        type Shown<'a> = (u32, Option<&'a str>, u64, Vec<Option<u64>>);
        let shown: Vec<Shown> = user
            .stacks
            .iter()
            .map(|stack| {
                let addrs = stack.frames.iter().map(|frame| frame.addr).collect();
                (stack.pid, stack.comm.as_deref(), stack.samples, addrs)
            })
            .collect();
        // Three shown; of the two with one object, the lower pid.
        assert_eq!(
            shown,
            [
                (7, Some("leaker"), 3, vec![Some(0x107), Some(0x207)]),
                (7, Some("leaker"), 2, vec![Some(0x307)]),
                (7, Some("leaker"), 1, vec![Some(0x407)]),
            ]
        );
        assert!(entry(&sites[0], &context(None)).user_stacks.is_none());
    }

    #[test]
    fn entries_carry_exact_counts_and_the_heaviest_stack() {
        let report = sample_report(1);
        let top = &report.stacks[0];
        assert_eq!((top.count, top.bytes, top.bytes_requested), (4, 256, 160));
        assert_eq!(top.kind, "kmalloc");
        assert_eq!(top.cache.as_deref(), Some("kmalloc-64"));
        assert!(!top.estimated);
        assert_eq!(top.oldest_age_ms, 2_000);
        let symbols: Vec<_> = top.frames.iter().map(ToString::to_string).collect();
        // Trimmed at the call site; the allocator frames 0x1 and 0x2 are gone.
        assert_eq!(symbols, ["alloc_site+0x4/0x40", "caller+0x4/0x40"]);
        assert_eq!((top.stack_samples, top.frames_samples), (3, 2));
        assert_eq!(top.other_stacks.len(), 1);
        assert_eq!(top.other_stacks[0].samples, 1);
        assert_eq!(top.processes[0].pid, 7);
        assert_eq!(top.processes[0].comm.as_deref(), Some("leaker"));
        assert_eq!(top.processes[1].comm, None);
        let cache_entry = &report.stacks[1];
        assert_eq!(cache_entry.cache.as_deref(), Some("filp"));
        assert_eq!(cache_entry.frames, vec![Frame::unknown(0x99)]);
    }

    #[test]
    fn a_cache_total_names_its_merged_caches_whatever_entry_comes_first() {
        // sample_report's entries: a kmalloc site in kmalloc-64, then a kmem_cache site in
        // filp; here the kmem_cache site's cache is kmalloc-64's, which SLUB merged with
        // Acpi-Namespace (the kmalloc entry names no merge: its objects are kmalloc's).
        for kmalloc_first in [true, false] {
            let mut report = sample_report(1);
            report.stacks[1].cache = Some("kmalloc-64".into());
            report.stacks[1].cache_merged_with = vec!["Acpi-Namespace".into()];
            if !kmalloc_first {
                report.stacks.reverse();
            }
            let (_, caches) = totals(&report.stacks);
            assert_eq!(
                caches,
                [Total {
                    name: "kmalloc-64".into(),
                    bytes: 320,
                    count: 5,
                    merged_with: vec!["Acpi-Namespace".into()],
                }],
                "kmalloc entry first: {kmalloc_first}"
            );
        }
    }

    #[test]
    fn totals_per_kind_and_cache() {
        let mut report = sample_report(1);
        // sample_report's second entry: a kmem_cache site in filp, here merged with two others.
        report.stacks[1].cache_merged_with = vec!["file_lock_ctx".into(), "pid".into()];
        let (kinds, caches) = totals(&report.stacks);
        assert_eq!(
            kinds,
            [
                Total {
                    name: "kmalloc".into(),
                    bytes: 256,
                    count: 4,
                    merged_with: Vec::new(),
                },
                Total {
                    name: "kmem_cache".into(),
                    bytes: 64,
                    count: 1,
                    merged_with: Vec::new(),
                },
            ]
        );
        assert_eq!(caches[0].name, "kmalloc-64");
        assert!(caches[0].merged_with.is_empty());
        assert_eq!(
            caches[1],
            Total {
                name: "filp".into(),
                bytes: 64,
                count: 1,
                merged_with: vec!["file_lock_ctx".into(), "pid".into()],
            }
        );
    }

    #[test]
    fn ranks_processes_over_all_sites() {
        let records = [
            record(0x10, AllocKind::Kmalloc, 0, -1, 7),
            record(0x20, AllocKind::Kmalloc, 0, -1, 7),
            record(0x20, AllocKind::Kmalloc, 0, -1, 8),
        ];
        let mut aggregator = aggregate::Aggregator::new(0, Duration::ZERO);
        records.iter().for_each(|record| aggregator.add(record));
        let sites = aggregator.finish().sites;
        let comms: HashMap<u32, String> = [(7, "leaker".to_owned())].into();
        let ranked = processes(&sites, &comms, 2);
        assert_eq!(ranked.len(), 2);
        assert_eq!(
            (ranked[0].pid, ranked[0].count, ranked[0].bytes),
            (7, 4, 256)
        );
        assert_eq!(ranked[0].comm.as_deref(), Some("leaker"));
        assert_eq!((ranked[1].pid, ranked[1].count), (8, 2));
    }

    #[test]
    fn sampled_entries_scale_every_count_and_each_process() {
        let report = sample_report(64);
        let top = &report.stacks[0];
        assert_eq!(top.bytes_requested, 160 * 64);
        assert_eq!(
            (top.processes[0].count, top.processes[0].bytes),
            (2 * 64, 2 * 64 * 64)
        );
    }

    #[test]
    fn liveness_stats_count_each_state_and_where_objects_were_free() {
        let mut stats = LivenessStats::default();
        for state in [
            Liveness::Allocated,
            Liveness::Allocated,
            Liveness::Unverified,
            Liveness::Free(FreeReason::SlabGone),
            Liveness::Free(FreeReason::SlabFreelist),
            Liveness::Free(FreeReason::SlabFreelist),
            Liveness::Free(FreeReason::CpuFreelist),
            Liveness::Free(FreeReason::Sheaf),
            Liveness::Free(FreeReason::Sheaf),
            Liveness::Free(FreeReason::Sheaf),
        ] {
            stats.count(state);
        }
        assert_eq!(
            (
                stats.verified_allocated,
                stats.unverified,
                stats.verified_free
            ),
            (2, 1, 7)
        );
        let found = &stats.verified_free_where;
        assert_eq!(
            (
                found.slab_gone,
                found.slab_freelist,
                found.cpu_freelist,
                found.sheaf
            ),
            (1, 2, 1, 3)
        );
    }

    #[test]
    fn missed_free_sites_most_first_and_at_most_twenty() {
        let counts: HashMap<u64, u64> = (1..=25u64).map(|i| (0x1000 + i, i)).collect();
        let sites = missed_free_sites(&counts, &|addr| Frame::unknown(addr));
        assert_eq!(sites.len(), MISSED_FREE_SITES_SHOWN);
        assert_eq!(
            (sites[0].count, sites[0].call_site.addr),
            (25, Some(0x1019))
        );
        assert_eq!(sites[19].count, 6);
        // Ties go by address, so the order never depends on the hash map.
        let tied: HashMap<u64, u64> = [(0x30, 5), (0x10, 5)].into();
        let sites = missed_free_sites(&tied, &|addr| Frame::unknown(addr));
        assert_eq!(sites[0].call_site.addr, Some(0x10));
    }

    #[test]
    fn symbolization_covers_call_sites_and_the_trimmed_stacks_shown() {
        // Five stacks through one call site, heaviest first: the four shown (one and three
        // others) are symbolized, their frames below the call site are not.
        let mut records = Vec::new();
        for (id, weight) in [(1, 5), (2, 4), (3, 3), (4, 2), (5, 1)] {
            for _ in 0..weight {
                records.push(record(0x10, AllocKind::Kmalloc, 0, id, 7));
            }
        }
        let mut aggregator = aggregate::Aggregator::new(0, Duration::ZERO);
        records.iter().for_each(|record| aggregator.add(record));
        let sites = aggregator.finish().sites;
        let stacks: HashMap<u32, Vec<u64>> = (1..=5u32)
            .map(|id| (id, vec![0x1, 0x10, 0x100 * u64::from(id)]))
            .collect();
        let addresses = addresses_to_symbolize(&sites, &stacks);
        assert!(addresses.contains(&0x10));
        for shown in [0x100, 0x200, 0x300, 0x400] {
            assert!(addresses.contains(&shown), "{shown:#x} in {addresses:x?}");
        }
        assert!(!addresses.contains(&0x500), "the fifth stack is not shown");
        assert!(
            !addresses.contains(&0x1),
            "below the call site: {addresses:x?}"
        );
    }

    #[test]
    fn events_without_a_call_site_take_the_caller_past_the_allocator_frames() {
        let names = |addr: u64| -> Frame {
            let symbol = match addr {
                0x1 => "bpf_prog_1234_page_alloc",
                0x2 => "__bpf_trace_run",
                0x3 => "__alloc_pages",
                0x40 => "grow_buffers",
                0x50 => "outer",
                _ => return Frame::unknown(addr),
            };
            Frame {
                addr: Some(addr),
                symbol: Some(symbol.into()),
                offset: Some(1),
                size: Some(0x10),
                module: None,
                source: None,
            }
        };
        let page = record(0, AllocKind::Page, 0, 3, 7);
        let empty = record(0, AllocKind::Page, 0, 4, 8);
        let mut aggregator = aggregate::Aggregator::new(3_000_000_000, Duration::ZERO);
        aggregator.add(&page);
        let sites = aggregator.finish().sites;
        let stacks: HashMap<u32, Vec<u64>> =
            [(3, vec![0x1, 0x2, 0x3, 0x40, 0x50]), (4, Vec::new())].into();
        let context = Context {
            stacks: &stacks,
            cache_names: &HashMap::new(),
            site_caches: &HashMap::new(),
            comms: &HashMap::new(),
            now_ns: 3_000_000_000,
            sample_rate: 1,
            frame: &names,
            user_stacks: None,
        };
        let entry = entry(&sites[0], &context);
        assert_eq!(entry.call_site.symbol.as_deref(), Some("grow_buffers"));
        let symbols: Vec<_> = entry
            .frames
            .iter()
            .map(|frame| frame.symbol.clone())
            .collect();
        assert_eq!(symbols, [Some("grow_buffers".into()), Some("outer".into())]);
        assert_eq!(entry.cache, None);

        // An empty stack leaves the call site unknown rather than taking a frame of nothing.
        let mut aggregator = aggregate::Aggregator::new(3_000_000_000, Duration::ZERO);
        aggregator.add(&empty);
        let sites = aggregator.finish().sites;
        let entry = super::entry(&sites[0], &context);
        assert_eq!(entry.call_site, Frame::unknown(0));
    }
}
