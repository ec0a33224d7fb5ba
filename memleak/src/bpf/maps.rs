//! Reads what the eBPF programs collected: counters, the outstanding-object table, cache names,
//! process names and stacks.
use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, StackTraceMap},
};
use hashbrown::HashMap;
use memleak_common::{
    AllocRecord, COUNTER_COUNT, CacheName, Counter, CpuState, FREED_SLOT, KeyBucket,
    PAGE_FILTER_PAIRS, PageFilterPair, RecordBucket, TaskComm, bucket as table_bucket,
    holds_object, mix64, page_filter_counter, pfn_of_key,
};
use serde::{Deserialize, Serialize};

use super::{
    clock::AllocationClock,
    mmap::{Access, MappedArray},
};

/// Event counters summed over CPUs. Serialized by these names in every report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub allocs: u64,
    pub frees: u64,
    pub tracked_allocs: u64,
    pub tracked_frees: u64,
    pub untracked_frees: u64,
    pub dropped_table_full: u64,
    pub missed_frees: u64,
    pub stack_captures: u64,
    pub stack_failures: u64,
    pub filtered: u64,
    pub movable_pages: u64,
    /// With `--user-stacks`: user-space stacks captured, and captures that found none (kernel
    /// threads) or failed.
    #[serde(default)]
    pub user_stack_captures: u64,
    #[serde(default)]
    pub user_stack_misses: u64,
    /// Before Linux 5.12: allocations dropped because another CPU claimed their table slot at
    /// the same moment (each race drops one or two).
    #[serde(default)]
    pub claim_races: u64,
    /// Allocations the stack sample chose whose stack was not captured: their CPU had captured
    /// one less than 16 ms before.
    #[serde(default)]
    pub stack_samples_over_limit: u64,
    /// Tracked page allocations whose caller the walk through the page allocator's frames did
    /// not find (their stacks were captured instead).
    #[serde(default)]
    pub page_callers_unknown: u64,
}

impl Counters {
    fn from_values(values: &[u64; COUNTER_COUNT as usize]) -> Self {
        let get = |counter: Counter| values[counter as usize];
        Self {
            allocs: get(Counter::Allocs),
            frees: get(Counter::Frees),
            tracked_allocs: get(Counter::TrackedAllocs),
            tracked_frees: get(Counter::TrackedFrees),
            untracked_frees: get(Counter::UntrackedFrees),
            dropped_table_full: get(Counter::DroppedTableFull),
            missed_frees: get(Counter::MissedFrees),
            stack_captures: get(Counter::StackCaptures),
            stack_failures: get(Counter::StackFailures),
            filtered: get(Counter::Filtered),
            movable_pages: get(Counter::MovablePages),
            user_stack_captures: get(Counter::UserStackCaptures),
            user_stack_misses: get(Counter::UserStackMisses),
            claim_races: get(Counter::ClaimRaces),
            stack_samples_over_limit: get(Counter::StackSamplesOverLimit),
            page_callers_unknown: get(Counter::PageCallersUnknown),
        }
    }

    /// Records in the table: each tracked allocation adds one, unless it replaced the record
    /// of an address whose free was missed; each tracked free removes one.
    pub fn outstanding(&self) -> u64 {
        self.tracked_allocs
            .saturating_sub(self.missed_frees)
            .saturating_sub(self.tracked_frees)
    }
}

/// What reading the object table takes beyond its maps.
#[derive(Clone, Copy, Debug)]
pub struct TableFormat {
    pub buckets: u32,
    /// How the programs time allocations.
    pub clock: AllocationClock,
    /// Whether the programs' frees empty slots by compare-and-swap, so that userspace may
    /// remove objects while they run ([`remove_objects`]).
    pub removals_allowed: bool,
    /// Clock ticks the programs leave between two sampled stacks on one CPU; 0 for no limit.
    pub stack_sample_ticks: u32,
}

/// At most one sampled stack per CPU in `ticks` clock ticks (`bpf_jiffies64()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackSampleLimit {
    pub ticks: u32,
    /// How long the ticks last, where the tick was measured.
    pub span: Option<Duration>,
}

/// The maps, taken out of the eBPF object so they outlive its programs: the report is read
/// after every program is detached, from a table that no longer changes.
pub struct TracerMaps {
    cpu_state: Map,
    keys: Map,
    records: Map,
    stacks: Map,
    user_stacks: Map,
    cache_names: Map,
    comms: Map,
    missed_free_sites: Map,
    tracked_pages: Map,
    buckets: u32,
    clock: AllocationClock,
    removals_allowed: bool,
    stack_sample_ticks: u32,
}

impl TracerMaps {
    /// The maps of a loaded object whose table reads as `table` says.
    pub fn take(ebpf: &mut Ebpf, table: TableFormat) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("eBPF object has no {name} map"))
        };
        Ok(Self {
            cpu_state: take("CPU_STATE")?,
            keys: take("OBJECT_KEYS")?,
            records: take("OBJECT_RECORDS")?,
            stacks: take("STACKS")?,
            user_stacks: take("USER_STACKS")?,
            cache_names: take("CACHE_NAMES")?,
            comms: take("COMMS")?,
            missed_free_sites: take("MISSED_FREE_SITES")?,
            tracked_pages: take("TRACKED_PAGES")?,
            buckets: table.buckets,
            clock: table.clock,
            removals_allowed: table.removals_allowed,
            stack_sample_ticks: table.stack_sample_ticks,
        })
    }

    /// How the programs time allocations.
    pub fn clock(&self) -> AllocationClock {
        self.clock
    }

    /// The least time the programs leave between two sampled stacks on one CPU, `None` when
    /// every stack of the sample is taken.
    pub fn stack_sample_limit(&self) -> Option<StackSampleLimit> {
        (self.stack_sample_ticks > 0).then(|| StackSampleLimit {
            ticks: self.stack_sample_ticks,
            span: self.clock.span_of(self.stack_sample_ticks),
        })
    }

    /// A record of the table as userspace reads it: its allocation time in CLOCK_MONOTONIC
    /// nanoseconds.
    fn in_monotonic_time(&self, record: &AllocRecord) -> AllocRecord {
        AllocRecord {
            allocated_at: self.clock.to_monotonic_ns(record.allocated_at),
            ..*record
        }
    }
}

pub fn read_counters(maps: &TracerMaps) -> Result<Counters> {
    let map: PerCpuArray<&MapData, CpuState> = PerCpuArray::try_from(&maps.cpu_state)?;
    let per_cpu = map.get(&0, 0).context("reading the CPU_STATE map")?;
    let mut values = [0u64; COUNTER_COUNT as usize];
    for state in per_cpu.iter() {
        for (value, counted) in values.iter_mut().zip(state.counters) {
            *value += counted;
        }
    }
    Ok(Counters::from_values(&values))
}

/// Stack map entries: each holds up to 127 frames (1 KiB), preallocated by the kernel.
pub const STACK_MAP_ENTRIES: u32 = 16_384;
/// The same for user-space stacks (`--user-stacks`): ids must stay below u16::MAX
/// (`AllocRecord::user_stack`).
pub const USER_STACK_MAP_ENTRIES: u32 = 16_384;

/// Buckets read per step: whole pages of both arrays (128 KiB of keys, 768 KiB of records).
const BUCKETS_PER_STEP: usize = 1024;

/// The table's buckets in steps of [`BUCKETS_PER_STEP`].
fn steps(maps: &TracerMaps) -> impl Iterator<Item = std::ops::Range<usize>> {
    let buckets = maps.buckets as usize;
    (0..buckets)
        .step_by(BUCKETS_PER_STEP)
        .map(move |start| start..(start + BUCKETS_PER_STEP).min(buckets))
}

/// Maps buckets `step` of the table: its keys with `keys_access` (written only to clear or
/// claim a slot), its records read-only, or read-write with the keys.
fn map_table(
    maps: &TracerMaps,
    step: std::ops::Range<usize>,
    keys_access: Access,
) -> Result<(MappedArray<KeyBucket>, MappedArray<RecordBucket>)> {
    let keys = MappedArray::new(&maps.keys, step.clone(), keys_access, "the table's keys")?;
    let records = MappedArray::new(&maps.records, step, keys_access, "the table's records")?;
    Ok((keys, records))
}

/// Calls `visit` with the key (the object's address, for slab objects) and the record of
/// every outstanding object in the table, its `allocated_at` in CLOCK_MONOTONIC nanoseconds.
pub fn for_each_outstanding(
    maps: &TracerMaps,
    mut visit: impl FnMut(u64, &AllocRecord),
) -> Result<()> {
    const _: () = assert!(
        size_of::<KeyBucket>().is_multiple_of(8) && size_of::<RecordBucket>().is_multiple_of(8)
    );
    for step in steps(maps) {
        let (keys, records) = map_table(maps, step, Access::Read)?;
        for (key_bucket, record_bucket) in keys.as_slice().iter().zip(records.as_slice()) {
            for (&key, record) in key_bucket.keys.iter().zip(&record_bucket.records) {
                if holds_object(key) {
                    visit(key, &maps.in_monotonic_time(record));
                }
            }
        }
    }
    Ok(())
}

/// Removes objects from the table: those found free in kernel memory whose free the tracer
/// did not see, so that a long watch does not fill its table with them. `objects` maps each
/// address to its record as [`for_each_outstanding`] gave it; a slot is cleared only while it
/// still holds that address and that record, by a compare-and-swap on the key like the
/// programs' own, so an object the programs freed or re-recorded meanwhile is left alone. The
/// whole record is compared, not the allocation time alone: the programs' clock may tick as
/// coarsely as a jiffy ([`AllocationClock`]), and an address allocated again within the same
/// tick differs in its call site, process, size or stack unless it is the same allocation in
/// every respect the report shows. Returns how many were removed.
///
/// A removed page keeps its count in the tracked-page filter: the programs' plain-store claims
/// (Linux 5.10's verifier) could clear the same key in the same instant and take one away too,
/// and a count one too low would let a tracked page's free go unseen.
pub fn remove_objects(maps: &TracerMaps, objects: &HashMap<u64, AllocRecord>) -> Result<u64> {
    if objects.is_empty() {
        return Ok(0);
    }
    if !maps.removals_allowed {
        bail!(
            "objects cannot be removed from this table: its programs empty slots with plain \
             stores (the tracer was loaded without userspace_removes_objects)"
        );
    }
    let mut removed = 0;
    for step in steps(maps) {
        let (mut keys, records) = map_table(maps, step, Access::ReadWrite)?;
        for (key_bucket, record_bucket) in keys.as_mut_slice().iter_mut().zip(records.as_slice()) {
            for (key, record) in key_bucket.keys.iter_mut().zip(&record_bucket.records) {
                // SAFETY: the slot is an aligned u64 of the shared mapping, which the programs
                // also change only atomically.
                let slot = unsafe { AtomicU64::from_ptr(key) };
                let address = slot.load(Ordering::Relaxed);
                if !holds_object(address) {
                    continue;
                }
                let Some(expected) = objects.get(&address) else {
                    continue;
                };
                // FREED_SLOT, as a program's free leaves: a 0 would hide the objects past it.
                if maps.in_monotonic_time(record) == *expected
                    && slot
                        .compare_exchange(address, FREED_SLOT, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// Puts objects back into the table, as the programs record them: a watch restarted from its
/// history re-seeds the objects it had (checked still allocated), so that their frees are
/// seen again. A slot is claimed by a compare-and-swap of an empty key, as the programs do;
/// an object whose home and overflow buckets are all full is left out. Returns how many were
/// put back.
///
/// A page's slot in the tracked-page filter gets one more before its key goes in, so that its
/// free, whenever it comes, reads the table; the count stays when the page is left out (one
/// too many only makes frees in that slot read the table).
pub fn insert_objects(maps: &TracerMaps, objects: &[(u64, AllocRecord)]) -> Result<u64> {
    if objects.is_empty() {
        return Ok(0);
    }
    let buckets = maps.buckets as usize;
    let (mut keys, mut records) = map_table(maps, 0..buckets, Access::ReadWrite)?;
    let (keys, records) = (keys.as_mut_slice(), records.as_mut_slice());
    let mut tracked_pages = MappedArray::<PageFilterPair>::new(
        &maps.tracked_pages,
        0..PAGE_FILTER_PAIRS as usize,
        Access::ReadWrite,
        "the tracked-page filter",
    )?;
    let tracked_pages = tracked_pages.as_mut_slice();
    let mask = maps.buckets - 1;
    let key_table = keys.as_mut_ptr();
    // SAFETY: slot `i` of a bucket `keys_of` let through: an aligned u64 of the shared
    // mapping, which the programs also change only atomically.
    let slot_key = |bucket: u32, i: usize| unsafe {
        AtomicU64::from_ptr(&raw mut (*key_table.add(bucket as usize)).keys[i])
    };
    let keys_of = |bucket: u32| ((bucket as usize) < buckets).then_some(bucket);
    let key_at = |bucket: u32, i: usize| slot_key(bucket, i).load(Ordering::Relaxed);
    let mut inserted = 0;
    for (address, record) in objects {
        let hash = mix64(*address);
        if pfn_of_key(*address).is_some() {
            let (pair, half) = page_filter_counter(*address);
            let counter = &mut tracked_pages[pair as usize][half];
            // SAFETY: an aligned u32 of the shared mapping, which the programs change only
            // with atomic adds.
            unsafe { AtomicU32::from_ptr(counter) }.fetch_add(1, Ordering::Relaxed);
        }
        // Searched and claimed as the programs do.
        if table_bucket::find(*address, hash, mask, keys_of, key_at).is_some() {
            continue;
        }
        let claimed =
            table_bucket::claim(*address, hash, mask, keys_of, key_at, |bucket, i, free| {
                slot_key(bucket, i)
                    .compare_exchange(free, *address, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            });
        if let Some(place) = claimed {
            records[place.bucket as usize].records[place.slot] = AllocRecord {
                allocated_at: maps.clock.reading_at(record.allocated_at),
                ..*record
            };
            inserted += 1;
        }
    }
    Ok(inserted)
}

/// Deletes the captured stacks that no outstanding object uses (`in_use`), once the stack
/// map is more than half full: in a long watch, stacks of freed objects would otherwise fill
/// it and stop stack capture. A stack captured between the caller's reading of the table and
/// this pruning may go too; its object then reports its call site alone. Returns how many
/// were deleted.
pub fn prune_stacks(maps: &mut TracerMaps, in_use: &hashbrown::HashSet<u32>) -> Result<u64> {
    let mut map: StackTraceMap<&mut MapData> = StackTraceMap::try_from(&mut maps.stacks)?;
    let ids: Vec<u32> = map
        .stack_ids()
        .collect::<Result<_, _>>()
        .context("listing STACKS")?;
    if (ids.len() as u32) < STACK_MAP_ENTRIES / 2 {
        return Ok(0);
    }
    let mut removed = 0;
    for id in ids.iter().filter(|id| !in_use.contains(*id)) {
        // Gone already (freed by the programs' reuse) is as good as deleted.
        if map.remove(id).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

pub fn read_cache_names(maps: &TracerMaps) -> Result<HashMap<u64, String>> {
    let map: BpfHashMap<&MapData, u64, CacheName> = BpfHashMap::try_from(&maps.cache_names)?;
    map.iter()
        .map(|entry| {
            let (id, name) = entry.context("reading CACHE_NAMES")?;
            Ok((id, c_string(&name.bytes)))
        })
        .collect()
}

/// Missed frees by the call site of the object whose free was missed, summed over CPUs.
pub fn read_missed_free_sites(maps: &TracerMaps) -> Result<HashMap<u64, u64>> {
    let map: aya::maps::PerCpuHashMap<&MapData, u64, u64> =
        aya::maps::PerCpuHashMap::try_from(&maps.missed_free_sites)?;
    map.iter()
        .map(|entry| {
            let (call_site, counts) = entry.context("reading MISSED_FREE_SITES")?;
            Ok((call_site, counts.iter().sum()))
        })
        .collect()
}

/// Process names by thread-group id. The eBPF side records a name when it first sees a
/// process allocate, which for a freshly forked child is its parent's name; a process still
/// alive is named from /proc instead, after any exec.
pub fn read_comms(maps: &TracerMaps) -> Result<HashMap<u32, String>> {
    let map: BpfHashMap<&MapData, u32, TaskComm> = BpfHashMap::try_from(&maps.comms)?;
    map.iter()
        .map(|entry| {
            let (tgid, comm) = entry.context("reading COMMS")?;
            let current = std::fs::read_to_string(format!("/proc/{tgid}/comm"))
                .ok()
                .filter(|_| tgid != 0)
                .map(|name| name.trim_end().to_owned());
            Ok((tgid, current.unwrap_or_else(|| c_string(&comm.bytes))))
        })
        .collect()
}

/// Reads the given stack ids; ids the map no longer holds are left out.
pub fn read_stacks(
    maps: &TracerMaps,
    ids: impl IntoIterator<Item = u32>,
) -> Result<HashMap<u32, Vec<u64>>> {
    read_stack_map(&maps.stacks, ids)
}

/// [`read_stacks`] for the user-space stacks of `--user-stacks`, by `USER_STACKS` id.
pub fn read_user_stacks(
    maps: &TracerMaps,
    ids: impl IntoIterator<Item = u32>,
) -> Result<HashMap<u32, Vec<u64>>> {
    read_stack_map(&maps.user_stacks, ids)
}

fn read_stack_map(map: &Map, ids: impl IntoIterator<Item = u32>) -> Result<HashMap<u32, Vec<u64>>> {
    let map: StackTraceMap<&MapData> = StackTraceMap::try_from(map)?;
    let mut stacks = HashMap::new();
    for id in ids {
        if let Ok(trace) = map.get(&id, 0) {
            stacks.insert(id, trace.frames().iter().map(|frame| frame.ip).collect());
        }
    }
    Ok(stacks)
}
