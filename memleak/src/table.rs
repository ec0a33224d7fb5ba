//! Reads what the eBPF programs collected: counters, the outstanding-object table, cache names,
//! process names and stacks.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    slice,
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, StackTraceMap},
};
use hashbrown::HashMap;
use memleak_common::{
    AllocRecord, COUNTER_COUNT, CacheName, Counter, KeyBucket, RecordBucket, TaskComm,
};
use serde::Serialize;

/// Event counters summed over CPUs. Serialized by these names in every report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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
    pub sampled_out: u64,
    pub filtered: u64,
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
            sampled_out: get(Counter::SampledOut),
            filtered: get(Counter::Filtered),
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

/// The maps, taken out of the eBPF object so they outlive its programs: the report is read
/// after every program is detached, from a table that no longer changes.
pub struct TracerMaps {
    counters: Map,
    keys: Map,
    records: Map,
    stacks: Map,
    cache_names: Map,
    comms: Map,
    buckets: u32,
}

impl TracerMaps {
    pub fn take(ebpf: &mut Ebpf, buckets: u32) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("eBPF object has no {name} map"))
        };
        Ok(Self {
            counters: take("COUNTERS")?,
            keys: take("OBJECT_KEYS")?,
            records: take("OBJECT_RECORDS")?,
            stacks: take("STACKS")?,
            cache_names: take("CACHE_NAMES")?,
            comms: take("COMMS")?,
            buckets,
        })
    }
}

pub fn read_counters(maps: &TracerMaps) -> Result<Counters> {
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(&maps.counters)?;
    let mut values = [0u64; COUNTER_COUNT as usize];
    for (index, value) in values.iter_mut().enumerate() {
        let per_cpu = map
            .get(&(index as u32), 0)
            .context("reading the COUNTERS map")?;
        *value = per_cpu.iter().sum();
    }
    Ok(Counters::from_values(&values))
}

/// A read-only mapping of a `BPF_F_MMAPABLE` array map: the whole table is read in one pass
/// instead of one syscall per element.
struct MappedArray {
    base: NonNull<libc::c_void>,
    len: usize,
}

impl MappedArray {
    fn new(map: &Map, elements: usize, element_size: usize) -> Result<Self> {
        let Map::Array(data) = map else {
            return Err(anyhow!("expected an array map"));
        };
        // Array maps lay elements out at 8-byte-rounded strides.
        let stride = element_size.next_multiple_of(8);
        let len = elements * stride;
        let fd = data.fd().as_fd().as_raw_fd();
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mmap of the object table");
        }
        let base = NonNull::new(address).ok_or_else(|| anyhow!("mmap returned NULL"))?;
        Ok(Self { base, len })
    }

    /// # Safety
    /// `T` must be the map's value type, with no padding between elements.
    unsafe fn as_slice<T>(&self) -> &[T] {
        unsafe { slice::from_raw_parts(self.base.as_ptr().cast::<T>(), self.len / size_of::<T>()) }
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base.as_ptr(), self.len) };
    }
}

/// The record of every outstanding object in the table.
pub fn read_outstanding(maps: &TracerMaps) -> Result<Vec<AllocRecord>> {
    const _: () = assert!(
        size_of::<KeyBucket>().is_multiple_of(8) && size_of::<RecordBucket>().is_multiple_of(8)
    );
    let buckets = maps.buckets as usize;
    let keys = MappedArray::new(&maps.keys, buckets, size_of::<KeyBucket>())?;
    let records = MappedArray::new(&maps.records, buckets, size_of::<RecordBucket>())?;
    let (keys, records) = unsafe {
        (
            keys.as_slice::<KeyBucket>(),
            records.as_slice::<RecordBucket>(),
        )
    };
    let mut outstanding = Vec::new();
    for (key_bucket, record_bucket) in keys.iter().zip(records) {
        for (&key, record) in key_bucket.keys.iter().zip(&record_bucket.records) {
            if key != 0 {
                outstanding.push(*record);
            }
        }
    }
    Ok(outstanding)
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
    let map: StackTraceMap<&MapData> = StackTraceMap::try_from(&maps.stacks)?;
    let mut stacks = HashMap::new();
    for id in ids {
        if let Ok(trace) = map.get(&id, 0) {
            stacks.insert(id, trace.frames().iter().map(|frame| frame.ip).collect());
        }
    }
    Ok(stacks)
}
