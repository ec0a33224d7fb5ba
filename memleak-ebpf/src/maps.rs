//! Every map and the read-only configuration. Sizes here are placeholders: userspace sets the
//! real ones at load time from its command-line options.
use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, StackTrace},
};
use memleak_common::{
    CacheName, CpuState, KeyBucket, PAGE_FILTER_PAIRS, PageFilterPair, RecordBucket, TaskComm,
    TracerConfig,
};

/// `BPF_F_MMAPABLE`: userspace maps the table into its address space and reads it in one pass.
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[unsafe(no_mangle)]
pub static CONFIG: Global<TracerConfig> = Global::new(TracerConfig::DEFAULT);

/// Reads one field of `CONFIG`. `Global::load` copies the whole struct (every field a volatile
/// load); hot paths read only what they use.
macro_rules! config {
    ($($field:tt)+) => {{
        // Also used inside other unsafe blocks.
        #[allow(unused_unsafe)]
        let value = unsafe {
            let config = core::ptr::from_ref(&$crate::maps::CONFIG)
                .cast::<memleak_common::TracerConfig>();
            core::ptr::read_volatile(core::ptr::addr_of!((*config).$($field)+))
        };
        value
    }};
}
pub(crate) use config;

/// Object addresses, one bucket per element.
#[map]
pub static OBJECT_KEYS: Array<KeyBucket> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// What is known of each object, slot for slot with `OBJECT_KEYS`.
#[map]
pub static OBJECT_RECORDS: Array<RecordBucket> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The tracked-page filter (`memleak_common::page_filter_counter`): per slot, at least the number
/// of page records in the table. The programs add one for each page record they create and take
/// one away for each they remove; userspace adds one before it puts a page record back, and
/// never takes one away, so a slot can count too many (a free then reads the table's bucket)
/// but never too few (a tracked page's free skipped, and the page reported outstanding).
#[map]
pub static TRACKED_PAGES: Array<PageFilterPair> =
    Array::with_max_entries(PAGE_FILTER_PAIRS, BPF_F_MMAPABLE);
/// Kernel stacks of sampled allocations. Without `BPF_F_REUSE_STACKID`: an id, once handed out,
/// keeps naming the same stack for as long as records point at it.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(1, 0);

/// With `--user-stacks`: user-space stacks of the tasks whose kernel allocations had their
/// kernel stack captured (`AllocRecord::user_stack`). One entry otherwise.
#[map]
pub static USER_STACKS: StackTrace = StackTrace::with_max_entries(1, 0);

#[map]
pub static CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// Cheap direct-mapped filters in front of the hash maps below: a hit means "already handled",
/// a miss (new value or collision) costs one extra hash-map operation.
pub const SEEN_SITES_LEN: u32 = 1 << 14;
#[map]
pub static SEEN_SITES: Array<u64> = Array::with_max_entries(SEEN_SITES_LEN, 0);

pub const SEEN_CACHES_LEN: u32 = 1 << 10;
#[map]
pub static SEEN_CACHES: Array<u64> = Array::with_max_entries(SEEN_CACHES_LEN, 0);

pub const SEEN_TGIDS_LEN: u32 = 1 << 12;
#[map]
pub static SEEN_TGIDS: Array<u32> = Array::with_max_entries(SEEN_TGIDS_LEN, 0);

/// Slab cache id (see `AllocRecord::cache_id`) to name.
#[map]
pub static CACHE_NAMES: HashMap<u64, CacheName> = HashMap::with_max_entries(4096, 0);

/// Thread-group id to the command name of the first thread seen allocating in it.
#[map]
pub static COMMS: HashMap<u32, TaskComm> = HashMap::with_max_entries(16384, 0);

/// Call site to the number of its objects allocated again at the same address with no free
/// seen in between: the sites whose objects leave by a path the tracer does not follow. Per
/// CPU, so increments need no atomics; only the missed-free path touches it.
#[map]
pub static MISSED_FREE_SITES: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// With `TracerConfig::follow_processes`: the processes whose heaps the user-space hooks
/// record (the command and the children it forks), filled by userspace as they start.
#[map]
pub static FOLLOWED_PROCESSES: HashMap<u32, u8> = HashMap::with_max_entries(8192, 0);

/// The page hook's table of the page allocator's frames (`memleak_common::page_callers`),
/// sized and filled by userspace before the page hook is attached.
#[map]
pub static PAGE_CALLERS: Array<u64> = Array::with_max_entries(1, 0);
