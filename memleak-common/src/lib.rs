//! Types shared by memleak's eBPF programs and its userspace loader.
//!
//! Everything here is `repr(C)` plain data: the eBPF side writes it into maps, the userspace
//! side reads the same bytes back. Changing a layout means changing both sides together.
#![no_std]

pub mod scan;

/// Object slots per bucket of the outstanding-allocation table: sixteen `u64` keys, two
/// adjacent cache lines.
pub const SLOTS_PER_BUCKET: usize = 16;

/// Buckets in the group that the objects of one 4 KiB page share (see [`bucket::home`]).
pub const BUCKETS_PER_GROUP: u32 = 16;

/// Overflow buckets an object can go to when its home is full, tried in turn.
pub const OVERFLOW_PROBES: u32 = 2;

/// The key of a slot whose object was freed. A bucket's slots are claimed lowest free first,
/// and a slot once claimed never holds 0 again (a free leaves this mark), so a search of a
/// bucket stops at its first 0: no object was ever put past it. In a table far from full that
/// is a slot or two, not the bucket's sixteen. No key is 1: keys are addresses aligned to 8
/// bytes at least, or page frame numbers shifted by 12, each with tag bits.
pub const FREED_SLOT: u64 = 1;

/// Whether a slot's key is an object's, not a free slot (never used, 0, or freed).
#[inline(always)]
pub const fn holds_object(key: u64) -> bool {
    key > FREED_SLOT
}

/// Where an object lives in the table, and the searches of a bucket, as the programs and
/// userspace both make them.
///
/// The table's lower half holds **home** buckets. An object's home is one of a group of
/// [`BUCKETS_PER_GROUP`] neighbouring buckets chosen by a hash of its address's 4 KiB page
/// (the bucket in the group by the address's hash). The slab allocator hands out a slab
/// page's objects one after another, in an order shuffled within the page, and they are freed
/// in the same neighbourhoods: the events of one page then read and write the same few lines
/// and pages of the table rather than a line anywhere in it (2026-12-06, docs/overhead.md:
/// mixed's slab allocation hook 20 to 30 ns and its free 13 to 20 ns cheaper per run; groups
/// spanning 1 or 2 KiB of addresses kept little of that). A page can hold more objects than
/// its group's 256 slots (512 of 8 bytes), so an object whose home has no free slot goes to
/// the first of [`OVERFLOW_PROBES`] **overflow** buckets, chosen by the address's hash in the
/// table's upper half, that has one; a home half of page groups and an overflow half leave
/// room for more objects before the first is dropped than buckets by hash alone, on pages of
/// small objects as of large ones (the unit test below; docs/design.md). Slots never return
/// to 0 once used, so a bucket with a 0 slot has never been full, and no object went past it
/// to the next bucket of its chain: a search reads the next bucket only behind one all of
/// whose slots have been used.
pub mod bucket {
    use super::{BUCKETS_PER_GROUP, OVERFLOW_PROBES, SLOTS_PER_BUCKET, holds_object};

    /// Multiplies the page number into its group: the golden ratio's, whose products of
    /// consecutive page numbers spread evenly.
    const PAGE_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    /// The home bucket of the object at `key`, whose [`mix64`](super::mix64) is `hash`, in a
    /// table of `mask + 1` buckets (a power of two, at least `2 * BUCKETS_PER_GROUP`).
    #[inline(always)]
    pub const fn home(key: u64, hash: u64, mask: u32) -> u32 {
        let home_mask = mask >> 1;
        // Pages and percpu offsets have no neighbours in their 4 KiB: spread by hash.
        if key >> 63 == 0 {
            return hash as u32 & home_mask;
        }
        let group = ((key >> 12).wrapping_mul(PAGE_MULTIPLIER) >> 32) as u32;
        ((group & !(BUCKETS_PER_GROUP - 1)) | (hash as u32 & (BUCKETS_PER_GROUP - 1))) & home_mask
    }

    /// Overflow bucket `probe` (from 0) of the object whose hash is `hash`: in the table's
    /// upper half, by 16 bits of the hash further on for each probe.
    #[inline(always)]
    pub const fn overflow(hash: u64, mask: u32, probe: u32) -> u32 {
        let half = mask >> 1;
        (half + 1) | ((hash >> (4 + 16 * probe)) as u32 & half)
    }

    /// What a search of one bucket found.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Search {
        /// The key is in this slot.
        Held(usize),
        /// The key is not in the bucket, and nothing was ever put past its first 0.
        Absent,
        /// The key is not in the bucket, every slot of which has been used: of a home bucket,
        /// its objects may also be in their overflow buckets.
        AbsentFromFull,
    }

    /// Searches a bucket for `key`, up to its first slot never used. `key_at` reads slot `i`'s
    /// key (a volatile or atomic load: other CPUs change them meanwhile).
    #[inline(always)]
    pub fn search(key: u64, key_at: impl Fn(usize) -> u64) -> Search {
        for i in 0..SLOTS_PER_BUCKET {
            let found = key_at(i);
            if found == key {
                return Search::Held(i);
            }
            if found == 0 {
                return Search::Absent;
            }
        }
        Search::AbsentFromFull
    }

    /// A slot of the table: its bucket, the caller's handle on the bucket's keys (a pointer
    /// in the programs, the index in userspace), and the slot in the bucket.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Slot<K> {
        pub bucket: u32,
        pub keys: K,
        pub slot: usize,
    }

    /// The slot holding `key`, whose hash is `hash`: in its home bucket, or in one of its
    /// overflow buckets behind buckets all of whose slots have been used. `keys_of` gives a
    /// bucket's keys, `key_at` one key of them.
    #[inline(always)]
    pub fn find<K: Copy>(
        key: u64,
        hash: u64,
        mask: u32,
        keys_of: impl Fn(u32) -> Option<K>,
        key_at: impl Fn(K, usize) -> u64,
    ) -> Option<Slot<K>> {
        // One loop that moves `bucket` along the chain keeps one copy of the bucket's search
        // in the programs: written as `for step in 0..1 + OVERFLOW_PROBES` over a shared chain
        // function with `claim`, LLVM unrolled it into three, and the free hooks grew from
        // 1,536 to 4,576 bytes of BPF (2026-12-06).
        let mut bucket = home(key, hash, mask);
        let mut probe = 0;
        loop {
            let keys = keys_of(bucket)?;
            match search(key, |i| key_at(keys, i)) {
                Search::Held(slot) => return Some(Slot { bucket, keys, slot }),
                Search::Absent => return None,
                Search::AbsentFromFull if probe < OVERFLOW_PROBES => {
                    bucket = overflow(hash, mask, probe);
                    probe += 1;
                }
                Search::AbsentFromFull => return None,
            }
        }
    }

    /// Takes a free slot for `key`, which the table does not hold: its home bucket's lowest
    /// free slot, else the first overflow bucket's that has one; None when all are full.
    /// `try_claim` takes slot `i` of a bucket, seen holding `free` (0 or `FREED_SLOT`), by a
    /// compare-and-swap from that key, and says whether it did (another CPU may have first);
    /// the search goes on past a slot it did not take. An object goes past a bucket only
    /// after every slot of it was seen taken, so that bucket has no 0 left for a search to
    /// stop at.
    #[inline(always)]
    pub fn claim<K: Copy>(
        key: u64,
        hash: u64,
        mask: u32,
        keys_of: impl Fn(u32) -> Option<K>,
        key_at: impl Fn(K, usize) -> u64,
        mut try_claim: impl FnMut(K, usize, u64) -> bool,
    ) -> Option<Slot<K>> {
        let home = home(key, hash, mask);
        if let Some(slot) = claim_lowest_free(home, &keys_of, &key_at, &mut try_claim) {
            return Some(slot);
        }
        for probe in 0..OVERFLOW_PROBES {
            let bucket = overflow(hash, mask, probe);
            if let Some(slot) = claim_lowest_free(bucket, &keys_of, &key_at, &mut try_claim) {
                return Some(slot);
            }
        }
        None
    }

    /// The lowest free slot of `bucket` that `try_claim` takes.
    #[inline(always)]
    fn claim_lowest_free<K: Copy>(
        bucket: u32,
        keys_of: &impl Fn(u32) -> Option<K>,
        key_at: &impl Fn(K, usize) -> u64,
        try_claim: &mut impl FnMut(K, usize, u64) -> bool,
    ) -> Option<Slot<K>> {
        let keys = keys_of(bucket)?;
        for slot in 0..SLOTS_PER_BUCKET {
            let found = key_at(keys, slot);
            if !holds_object(found) && try_claim(keys, slot, found) {
                return Some(Slot { bucket, keys, slot });
            }
        }
        None
    }
}

/// The keys of one bucket: object addresses, 0 for a slot never used, [`FREED_SLOT`] for one
/// whose object was freed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KeyBucket {
    pub keys: [u64; SLOTS_PER_BUCKET],
}

/// The records of one bucket, slot for slot with its [`KeyBucket`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecordBucket {
    pub records: [AllocRecord; SLOTS_PER_BUCKET],
}

/// Stack id stored for allocations whose stack was not captured (not sampled).
pub const STACK_NOT_SAMPLED: i32 = -1;
/// Stack id stored for allocations whose stack capture failed (counted in `StackFailures`).
pub const STACK_FAILED: i32 = -2;

/// Marks an absent field in [`ClassicOffsets`].
pub const NO_FIELD: u16 = u16::MAX;

/// How the kernel handed out the memory an allocation record describes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllocKind {
    Kmalloc = 0,
    KmemCache = 1,
    Vmalloc = 2,
    Percpu = 3,
    Page = 4,
    /// A user-space process's heap block (malloc and its relatives, by uprobes).
    User = 5,
}

impl AllocKind {
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Kmalloc),
            1 => Some(Self::KmemCache),
            2 => Some(Self::Vmalloc),
            3 => Some(Self::Percpu),
            4 => Some(Self::Page),
            5 => Some(Self::User),
            _ => None,
        }
    }
}

/// Percpu pointers are offsets into the percpu area, small numbers that could equal other keys;
/// this bit, never set in a kernel virtual address's tag-free form, keeps them apart.
pub const PERCPU_KEY_TAG: u64 = 1 << 62;

/// Pages are keyed by page frame number, which would collide with other small keys; this tag
/// keeps them apart. The PFN goes in at bit 12, so that each page hashes and samples like an
/// object address of its own.
pub const PAGE_KEY_TAG: u64 = 1 << 61;

/// The table key of the page (or high-order block) starting at `pfn`.
#[inline(always)]
pub const fn page_key(pfn: u64) -> u64 {
    PAGE_KEY_TAG | (pfn << 12)
}

/// The page frame number of a key made by [`page_key`], `None` for other keys.
pub const fn pfn_of_key(key: u64) -> Option<u64> {
    if key & (PAGE_KEY_TAG | 1 << 63 | PERCPU_KEY_TAG) == PAGE_KEY_TAG {
        Some((key & !PAGE_KEY_TAG) >> 12)
    } else {
        None
    }
}

/// Slots of the tracked-page filter: counters of the page records in the table, by the page's
/// frame number ([`page_filter_slot`]). A page free whose slot counts zero is of a page the
/// table does not hold (most are: movable pages are not tracked) and is settled there, in a
/// 128 KiB array that stays in cache, instead of in a bucket of the table, which is tens of
/// megabytes.
pub const PAGE_FILTER_SLOTS: u32 = 1 << 15;

/// An element of the tracked-page filter's array map: two 32-bit counters, slots `2n` and
/// `2n + 1`. An array map pads each element to 8 bytes, so 32-bit elements would take as much
/// room as 64-bit ones; in pairs, sixteen neighbouring frames share a cache line instead of
/// eight (on a compiler workload the page free hook 99-109 ns instead of 117-121).
pub type PageFilterPair = [u32; 2];

/// Elements of the tracked-page filter's array map.
pub const PAGE_FILTER_PAIRS: u32 = PAGE_FILTER_SLOTS / 2;

/// Where the tracked-page filter keeps the counter of the page key `key`: the element of its
/// array map, and the half of that [`PageFilterPair`].
#[inline(always)]
pub const fn page_filter_counter(key: u64) -> (u32, usize) {
    let slot = page_filter_slot(key);
    (slot / 2, (slot & 1) as usize)
}

/// The tracked-page filter's slot of the page key `key`: its page frame number modulo the
/// filter's size. Pages are freed in runs of nearby frames (a process's memory at its exit, a
/// batch from a per-CPU list), whose slots then share cache lines, sixteen to a line; by a hash of
/// the key each free read a line of its own, cold on a compiler workload (the page free hook
/// took 194-201 ns that way, 130-147 this way). Frames `PAGE_FILTER_SLOTS` apart share a slot,
/// as any two frames might by a hash.
#[inline(always)]
pub const fn page_filter_slot(key: u64) -> u32 {
    (key >> 12) as u32 & (PAGE_FILTER_SLOTS - 1)
}

/// `MIGRATE_MOVABLE` in the page allocator's migrate types: user and page-cache pages, which
/// the kernel can move or reclaim, and which memleak does not follow.
pub const MIGRATE_MOVABLE: u32 = 1;

/// x86_64's base page size; page allocations are `PAGE_SIZE << order` bytes.
pub const PAGE_SIZE: u32 = 4096;

/// One outstanding allocation. The object's address lives in the parallel key array at the
/// same slot index; this is everything else the report needs about it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocRecord {
    /// Return address into the function that called the allocator (the tracepoint's
    /// `call_site`); 0 for kinds whose events have none (vmalloc), which always get a stack.
    pub call_site: u64,
    /// Identifies the slab cache: the `struct kmem_cache *` (tp_btf) or a hash of its name
    /// (classic tracepoints); 0 for kmalloc. Resolved to a name through `CACHE_NAMES`.
    pub cache_id: u64,
    /// When it was allocated. In the kernel's table, the programs' clock reading: jiffies
    /// (`bpf_jiffies64()`) when [`TracerConfig::jiffies_clock`] is set, else CLOCK_MONOTONIC
    /// nanoseconds (`bpf_ktime_get_ns()`); userspace reads records through `bpf::maps`, which
    /// converts it to CLOCK_MONOTONIC nanoseconds.
    pub allocated_at: u64,
    pub bytes_requested: u32,
    pub bytes_allocated: u32,
    /// Id in the `STACKS` map, or [`STACK_NOT_SAMPLED`] / [`STACK_FAILED`].
    pub stack_id: i32,
    /// Thread-group id (userspace "pid") of the task that allocated.
    pub tgid: u32,
    /// An [`AllocKind`].
    pub kind: u16,
    /// With `--user-stacks` on a kernel trace: 1 + the `USER_STACKS` id of the user-space
    /// stack of the task that allocated, captured with the kernel stack; 0 when none was (not
    /// asked, not sampled, a kernel thread, or the capture failed). Two bytes, so that the
    /// record keeps its 48: `USER_STACKS` holds fewer than 65,535 stacks.
    pub user_stack: u16,
    /// The low 32 bits of the allocation's gfp flags for kmalloc (they choose among its cache
    /// variants: `__GFP_DMA`, `__GFP_RECLAIMABLE`, `__GFP_ACCOUNT`); 0 for the other kinds.
    pub gfp_flags: u32,
}

// The table's memory is `--capacity` times this plus the key (docs/design.md: 56 bytes).
const _: () = assert!(core::mem::size_of::<AllocRecord>() == 48);

/// Slab cache name as found in `struct kmem_cache::name` or the tracepoint's `name` field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CacheName {
    pub bytes: [u8; 32],
}

/// Command name of the first thread of a process seen allocating.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TaskComm {
    pub bytes: [u8; 16],
}

/// Per-CPU event counters, indexed by `Counter as usize` in [`CpuState::counters`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Allocation events seen, failed ones (NULL) left out ([`names_no_object`]); with
    /// `--sample-rate`, only allocations at addresses the sample covers (the others return
    /// before touching any map, as frees do).
    Allocs = 0,
    /// Free events seen, `kfree(NULL)` and `kfree(ZERO_SIZE_PTR)` left out; with
    /// `--sample-rate`, only frees of addresses the sample covers (the others return before
    /// touching any map).
    Frees,
    /// Allocations recorded in the table.
    TrackedAllocs,
    /// Frees that removed a recorded allocation.
    TrackedFrees,
    /// Frees of objects the table does not hold: allocated before tracing started, or not
    /// recorded (movable pages, filtered, dropped). Frees at addresses the sample leaves out
    /// are not counted.
    UntrackedFrees,
    /// Allocations dropped because their bucket of the table was full.
    DroppedTableFull,
    /// Allocations of an address already in the table: its free was missed. The old record is
    /// replaced by the new one.
    MissedFrees,
    /// Stack captures attempted.
    StackCaptures,
    /// Stack captures that failed (stack map full or hash collision, or unwinding error).
    StackFailures,
    /// Allocations not recorded because a filter (pid) rejected them.
    Filtered,
    /// Page allocations of movable memory (user and page-cache pages), not followed.
    MovablePages,
    /// With `--user-stacks`: user-space stacks captured beside a kernel stack.
    UserStackCaptures,
    /// User-space stack captures that found no user stack (kernel threads) or failed (the
    /// stack map full, a hash collision, or an unwinding error).
    UserStackMisses,
    /// In the object for kernels before Linux 5.12 (plain claims): allocations whose slot
    /// another CPU claimed at the same moment. The slot is emptied: this object, and possibly
    /// the other, is not followed.
    ClaimRaces,
    /// Allocations the stack sample chose whose stack was not captured: their CPU had captured
    /// a sampled stack less than `stack_sample_ticks` clock ticks before.
    StackSamplesOverLimit,
    /// Tracked page allocations whose caller the frame walk through the page allocator
    /// (`page_callers`) did not find: their stack is captured instead, as for every page when
    /// the walk is off.
    PageCallersUnknown,
}

pub const COUNTER_COUNT: u32 = Counter::PageCallersUnknown as u32 + 1;

/// What each CPU's hooks keep for themselves, in the one entry of the per-CPU `CPU_STATE` map.
/// One struct rather than a map each: a hook looks its CPU's entry up once, and every counter
/// it bumps after that is a plain add on a line it already holds (a per-CPU lookup costs a
/// load of the map's per-CPU pointer and of the CPU's offset; four of them were a tenth of
/// the slab hooks' time on churn).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuState {
    /// Event counters, indexed by `Counter as usize`.
    pub counters: [u64; COUNTER_COUNT as usize],
    /// A word through which a typed kernel pointer becomes a number (`slab::scalar`).
    pub scratch: u64,
    /// The clock tick (jiffies) in which this CPU last captured a sampled stack.
    pub last_sampled_stack: u64,
    /// The word this CPU adds to as a fence when the table's claims are plain stores.
    pub claim_fence: u64,
    /// What the page callers' table said of the return addresses the page hook's walks passed
    /// on this CPU ([`page_callers::cached_frame_size`]).
    pub page_frames: [page_callers::CachedFrame; page_callers::FRAME_CACHE_ENTRIES],
}

/// The record offsets at which the programs load a classic tracepoint's 8-byte fields with an
/// instruction of their own (`memleak-ebpf/src/classic.rs`, which checks its loads against this
/// list when it is built); a field anywhere else costs a `bpf_probe_read_kernel` call. Every
/// offset of the recorded kernels' formats is here (tested in `memleak::kernel::tracefs`).
pub const DIRECT_FIELD_OFFSETS_64: [u16; 6] = [8, 16, 24, 32, 40, 48];
/// The same for the 4-byte fields.
pub const DIRECT_FIELD_OFFSETS_32: [u16; 11] = [8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48];

/// Field offsets in the classic tracepoint records, read from tracefs `format` files at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ClassicOffsets {
    pub kmalloc_call_site: u16,
    pub kmalloc_ptr: u16,
    pub kmalloc_bytes_req: u16,
    pub kmalloc_bytes_alloc: u16,
    pub kmalloc_gfp_flags: u16,
    pub cache_alloc_call_site: u16,
    pub cache_alloc_ptr: u16,
    pub cache_alloc_bytes_req: u16,
    pub cache_alloc_bytes_alloc: u16,
    /// `__data_loc char[] name`, or [`NO_FIELD`] on kernels whose event has no name.
    pub cache_alloc_name: u16,
    pub kfree_ptr: u16,
    pub cache_free_ptr: u16,
    pub page_alloc_pfn: u16,
    pub page_alloc_order: u16,
    pub page_alloc_migratetype: u16,
    pub page_free_pfn: u16,
}

impl ClassicOffsets {
    pub const NONE: Self = Self {
        kmalloc_call_site: NO_FIELD,
        kmalloc_ptr: NO_FIELD,
        kmalloc_bytes_req: NO_FIELD,
        kmalloc_bytes_alloc: NO_FIELD,
        kmalloc_gfp_flags: NO_FIELD,
        cache_alloc_call_site: NO_FIELD,
        cache_alloc_ptr: NO_FIELD,
        cache_alloc_bytes_req: NO_FIELD,
        cache_alloc_bytes_alloc: NO_FIELD,
        cache_alloc_name: NO_FIELD,
        kfree_ptr: NO_FIELD,
        cache_free_ptr: NO_FIELD,
        page_alloc_pfn: NO_FIELD,
        page_alloc_order: NO_FIELD,
        page_alloc_migratetype: NO_FIELD,
        page_free_pfn: NO_FIELD,
    };
}

/// Tracer settings, written into the eBPF object's read-only `CONFIG` global before load, so
/// the verifier sees them as constants and prunes the branches they disable.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TracerConfig {
    /// Number of buckets in the object table minus one (the bucket count is a power of two).
    pub bucket_mask: u32,
    /// Capture the stack of one tracked object in `1 << stack_shift`, plus the first allocation
    /// seen from each call site.
    pub stack_shift: u32,
    /// Nonzero: the stack sample takes at most one stack in this many clock ticks per CPU (the
    /// first from each call site and every uncalled page's are taken regardless). Zero with
    /// `--stack-sample-rate 1`.
    pub stack_sample_ticks: u32,
    /// Record only allocations by this thread-group id (0 = all).
    pub filter_tgid: u32,
    /// Record only allocations whose allocated size is within these bounds (inclusive).
    pub min_size: u32,
    pub max_size: u32,
    /// Nonzero: record only allocations by tasks whose command name is `filter_comm`.
    pub filter_comm_enabled: u32,
    /// NUL-padded, as `bpf_get_current_comm` returns it.
    pub filter_comm: [u8; 16],
    /// `offsetof(struct kmem_cache, size)` (tp_btf programs), from the kernel's BTF.
    pub kmem_cache_size_offset: u32,
    /// `offsetof(struct kmem_cache, object_size)`.
    pub kmem_cache_object_size_offset: u32,
    /// `offsetof(struct kmem_cache, name)`.
    pub kmem_cache_name_offset: u32,
    /// Nonzero before Linux 6.3, where `kvfree_call_rcu`'s second argument is the offset of
    /// the object's rcu_head (or the object itself when the head is NULL), not the object.
    pub kvfree_rcu_passes_offset: u32,
    /// Nonzero: every hook returns as soon as it runs (the benchmark's floor).
    pub return_at_once: u32,
    /// Nonzero from Linux 6.1, where the raw `kmem_cache_alloc` tracepoint passes the cache as
    /// its third argument (before, kmalloc's size arguments).
    pub raw_cache_alloc_passes_cache: u32,
    /// How many arguments `alloc_vmap_area` takes (the slot of its return value in an fexit
    /// program's context), from the kernel's BTF.
    pub alloc_vmap_area_arguments: u32,
    /// Nonzero (`--user-stacks`): each captured kernel stack of a kernel allocation comes with
    /// the user-space stack of the task that made it.
    pub user_stacks: u32,
    /// Nonzero (`run --user --follow-forks`): the user-space hooks are attached in every
    /// process and record only the processes listed in `FOLLOWED_PROCESSES`.
    pub follow_processes: u32,
    /// The possible CPUs: a percpu allocation's size across them, before Linux 6.0, whose
    /// event has only the per-CPU size.
    pub possible_cpus: u32,
    /// Nonzero: allocations are timed in jiffies, a load the verifier inlines, instead of the
    /// nanosecond clock, a helper call that costs 50-70 ns on a VM (userspace knows the
    /// conversion; `memleak::bpf::clock`).
    pub jiffies_clock: u32,
    /// Nonzero when sampling or a tgid, comm or size filter is set: only then do the
    /// allocation hooks test each of them, so that at the defaults one load stands for them
    /// all (a few ns of churn's allocation hook, docs/overhead.md). Derived from those fields
    /// by [`TracerConfig::with_allocation_filters_enabled`]; a filter added to the hooks must
    /// be added there.
    pub allocation_filters_enabled: u32,
    /// No setting: keeps `page_callers_base` at its 8-byte boundary without a padding hole,
    /// since the struct is copied into the object as bytes (`aya::Pod`).
    pub reserved: u32,
    /// Nonzero: a free empties its object's slot with a plain store instead of a
    /// compare-and-swap. Set when nothing but the programs empties slots (userspace does in
    /// `watch` and `run --user`): see `tracker::release_slot` for why that is safe.
    pub plain_releases: u32,
    /// Nonzero: the page hook finds each page's caller by walking the page allocator's frames
    /// with the `PAGE_CALLERS` table ([`page_callers`]), which has `1 << page_callers_steps`
    /// entries. Zero: every tracked page has its stack captured.
    pub page_callers_steps: u32,
    /// The address the table's entries count from ([`page_callers::entry`]).
    pub page_callers_base: u64,
    /// Which objects `--sample-rate` keeps, as [`sampled_object`] tests them.
    pub sample: SampleMasks,
    pub classic: ClassicOffsets,
}

impl TracerConfig {
    pub const DEFAULT: Self = Self {
        bucket_mask: 0,
        sample: SampleMasks::EVERY_OBJECT,
        stack_shift: 0,
        stack_sample_ticks: 0,
        filter_tgid: 0,
        min_size: 0,
        max_size: u32::MAX,
        filter_comm_enabled: 0,
        filter_comm: [0; 16],
        kmem_cache_size_offset: 0,
        kmem_cache_object_size_offset: 0,
        kmem_cache_name_offset: 0,
        kvfree_rcu_passes_offset: 0,
        return_at_once: 0,
        raw_cache_alloc_passes_cache: 0,
        alloc_vmap_area_arguments: 0,
        user_stacks: 0,
        follow_processes: 0,
        possible_cpus: 1,
        jiffies_clock: 0,
        allocation_filters_enabled: 0,
        reserved: 0,
        plain_releases: 0,
        page_callers_steps: 0,
        page_callers_base: 0,
        classic: ClassicOffsets::NONE,
    };

    /// This configuration with `allocation_filters_enabled` set from the options it stands
    /// for.
    pub fn with_allocation_filters_enabled(mut self) -> Self {
        let filters = self.sample.slot != 0
            || self.filter_tgid != 0
            || self.filter_comm_enabled != 0
            || self.min_size != 0
            || self.max_size != u32::MAX;
        self.allocation_filters_enabled = filters.into();
        self
    }
}

/// The table through which the page hook finds the caller of the page allocator without a
/// stack walk (about 1 µs a page): the kernel's ORC unwind entries for the page allocator's own
/// functions, which userspace reads at start-up. The event's `pt_regs` hold the frame address
/// of the tracepoint's handler, and above it the return address into the function that fired
/// the event; each entry says how far above a return address into that code the next return
/// address is, or that the address is outside the page allocator (the caller, which the hook
/// records as the call site), or that the frame cannot be walked (its stack is captured).
///
/// Entries are sorted `u64`s: the code address they start at, as an offset from
/// `TracerConfig::page_callers_base`, in the high half, and what they say in the low half;
/// the table is padded to a power of two with `u64::MAX`. An entry holds from its address to
/// the next entry's, like the ORC entries it comes from.
pub mod page_callers {
    /// From here on the code is outside the page allocator.
    pub const OUTSIDE: u32 = 0;
    /// Code whose frame the table cannot walk (not a plain call frame, or its stack pointer
    /// is not the frame's base).
    pub const UNWALKABLE: u32 = 1;
    /// At most this many steps of binary search: a table of at most 64Ki entries.
    pub const MAX_STEPS: u32 = 16;
    /// Frames walked at most before the walk gives up: the deepest path through the page
    /// allocator is four (tracepoint iterator, `__alloc_frozen_pages`, `alloc_pages_mpol`,
    /// `alloc_pages`), plus the wrappers `__get_free_pages` and `get_zeroed_page`.
    pub const MAX_FRAMES: u32 = 8;
    /// The padding after the last entry.
    pub const PADDING: u64 = u64::MAX;

    /// The entry for code from `offset` (from the table's base) on, saying `what`: [`OUTSIDE`],
    /// [`UNWALKABLE`] or the distance in bytes from a return address's slot to the next one.
    pub const fn entry(offset: u32, what: u32) -> u64 {
        (offset as u64) << 32 | what as u64
    }

    /// The largest entry an entry covering the code at `offset` can be.
    pub const fn search_key(offset: u32) -> u64 {
        entry(offset, u32::MAX)
    }

    /// What a table of `1 << steps` entries from `base` says of the code a return address
    /// returns to: a binary search for the last entry at or before the call instruction (the
    /// byte before the return address). `entry_at` reads one entry; `None` when it cannot.
    /// The page hook searches its map with it, userspace's tests their tables.
    #[inline(always)]
    pub fn frame_size(
        return_address: u64,
        base: u64,
        steps: u32,
        entry_at: impl Fn(u32) -> Option<u64>,
    ) -> Option<u32> {
        if return_address <= base || return_address - 1 - base >= u64::from(u32::MAX) {
            return Some(OUTSIDE);
        }
        let key = search_key((return_address - 1 - base) as u32);
        if entry_at(0)? > key {
            return Some(OUTSIDE);
        }
        let mut low = 0u32;
        // A fixed bound the verifier can follow; the steps beyond the table's are skipped.
        for step in (0..MAX_STEPS).rev() {
            if step < steps {
                let probe = low | 1 << step;
                if entry_at(probe)? <= key {
                    low = probe;
                }
            }
        }
        Some(entry_at(low)? as u32)
    }

    /// Entries of each CPU's cache of what the table said of a return address
    /// (`CpuState::page_frames`). The walk passes the same few return addresses on every page
    /// (the page allocator's own calls), and each search of the table is a chain of dependent
    /// loads: about 60 ns a page event on mixed (docs/overhead.md).
    pub const FRAME_CACHE_ENTRIES: usize = 16;

    /// What the table says of one return address, as the walk keeps it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CachedFrame {
        /// 0 for an empty entry, which [`cached_frame_size`] never matches: a stack word of 0
        /// is searched every time (below the table's base, outside, without a load).
        pub return_address: u64,
        pub what: u64,
    }

    /// The cache entry a return address goes in: its low bits, which tell apart the call
    /// instructions of a few functions.
    #[inline(always)]
    pub const fn cache_index(return_address: u64) -> usize {
        (return_address ^ return_address >> 4 ^ return_address >> 8) as usize % FRAME_CACHE_ENTRIES
    }

    /// [`frame_size`] through `cached`, the cache's entry for the return address
    /// ([`cache_index`]): the entry's answer when it holds this address, else the table's,
    /// which replaces it. The table does not change while the programs run, nor does the
    /// kernel's text, so an answer kept is the table's answer.
    #[inline(always)]
    pub fn cached_frame_size(
        cached: &mut CachedFrame,
        return_address: u64,
        base: u64,
        steps: u32,
        entry_at: impl Fn(u32) -> Option<u64>,
    ) -> Option<u32> {
        if return_address != 0 && cached.return_address == return_address {
            return Some(cached.what as u32);
        }
        let what = frame_size(return_address, base, steps, entry_at)?;
        *cached = CachedFrame {
            return_address,
            what: u64::from(what),
        };
        Some(what)
    }
}

/// The user-space function a hook is attached to, as its attach cookie: one entry program
/// serves every allocator function, one program every function that frees.
pub mod user_call {
    pub const MALLOC: u64 = 0;
    pub const CALLOC: u64 = 1;
    pub const REALLOC: u64 = 2;
    pub const REALLOCARRAY: u64 = 3;
    pub const ALIGNED_ALLOC: u64 = 4;
    pub const POSIX_MEMALIGN: u64 = 5;
    pub const MMAP: u64 = 6;
    pub const FREE: u64 = 7;
    pub const MREMAP: u64 = 8;
}

/// Where a user-space block's process goes in its table key: above the 47 bits of a user
/// address on x86-64.
pub const USER_KEY_PROCESS_SHIFT: u32 = 47;

/// The table key of the user-space block at `address` of process `tgid`. A forked child has its
/// parent's layout, so the same address is another block in each: the key tells them apart.
/// Two processes collide only at the same address with ids equal modulo 2^17.
#[inline(always)]
pub const fn user_key(address: u64, tgid: u32) -> u64 {
    address ^ ((tgid as u64) << USER_KEY_PROCESS_SHIFT)
}

/// The object hash's low bits choose its bucket and its top 16 bits decide whether its stack is
/// sampled ([`sampled`]), so the two are independent and stack sample rates go up to 65536.
pub const SAMPLE_BITS_SHIFT: u32 = 48;
pub const MAX_SAMPLE_SHIFT: u32 = 16;

/// A 64-bit finalizer (from MurmurHash3) that spreads slab addresses, which share alignment and
/// high bits, over all 64 bits. Both sides use it to place objects in the table; the programs
/// also sample stacks by it. (Which objects `--sample-rate` keeps is decided by the page alone,
/// [`sampled_object`].)
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Whether an object with this hash gets its stack captured at `1 << shift` sampling.
#[inline(always)]
pub const fn sampled(hash: u64, shift: u32) -> bool {
    (hash >> SAMPLE_BITS_SHIFT) & ((1u64 << shift) - 1) == 0
}

/// The kernel's `ZERO_SIZE_PTR`: what `kmalloc(0)` returns, which `kfree` takes and frees
/// nothing.
pub const ZERO_SIZE_PTR: u64 = 16;

/// Whether an event's address names no object: NULL (the event of a failed allocation, or of
/// `kfree(NULL)`, which the kernel traces before its check) or `ZERO_SIZE_PTR`, the kernel's
/// `ZERO_OR_NULL_PTR`. The hooks neither count nor record such events.
#[inline(always)]
pub const fn names_no_object(key: u64) -> bool {
    key <= ZERO_SIZE_PTR
}

/// The page hash's multiplier in [`sampled_object`]: odd, its bits spread like a random
/// number's. Not the table's (`bucket::PAGE_MULTIPLIER`): with the same product, the pages a
/// high rate keeps would all fall in a few of the table's page groups.
const SAMPLE_MULTIPLIER: u64 = 0xff51_afd7_ed55_8ccd;

/// The bit of the page hash where the slot it chooses starts: the product's top six bits, the
/// best mixed (a product's low bits depend only on the page number's low bits).
const SAMPLE_SLOT_SHIFT: u32 = 58;

/// A sample rate as the hooks test it ([`sampled_object`]): userspace makes the masks from
/// the rate once, so an event pays one multiply and no arithmetic on the rate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleMasks {
    /// The bits of an object's 64-byte slot in its page that must equal the page hash's (up
    /// to six); zero without sampling.
    pub slot: u64,
    /// The bits of the page hash, below the slot's, that must be zero beyond rate 64.
    pub page: u64,
}

impl SampleMasks {
    pub const EVERY_OBJECT: Self = Self { slot: 0, page: 0 };

    /// The masks that keep one object in `1 << shift` (`shift` at most [`MAX_SAMPLE_SHIFT`]).
    pub const fn for_shift(shift: u32) -> Self {
        if shift == 0 {
            return Self::EVERY_OBJECT;
        }
        let slot_bits = if shift < 6 { shift } else { 6 };
        let page_bits = shift - slot_bits;
        Self {
            slot: (1 << slot_bits) - 1,
            page: ((1 << page_bits) - 1) << (SAMPLE_SLOT_SHIFT - page_bits),
        }
    }
}

/// Whether the object at `key` is tracked at the sample rate of `masks` (`--sample-rate`).
///
/// Stratified by page: each 4 KiB page has one 64-byte slot, chosen by a hash of the page
/// number, and an object is tracked when it starts in that slot (beyond rate 64, the page hash
/// must also pass more bits). Every object has the same 1-in-rate chance, as with a plain
/// address hash, but small objects packed into slab pages are sampled almost exactly one per
/// 64 slots instead of binomially, so estimates scaled from the sample are much tighter. The
/// decision depends on the address alone: a free knows whether its object was tracked.
///
/// Most events of a sampled trace end here, so it is one multiply: with a full 64-bit mix of
/// the page number ([`mix64`]) the free hook's path to its return was 50 BPF instructions,
/// now 28 (what that saves per event, a nanosecond or so, is under what `bpf_stats` tells
/// apart on churn).
///
/// The NULL page holds no object (the kmem events of failed allocations, `kfree(NULL)` and
/// `kfree(ZERO_SIZE_PTR)` name addresses in it): none of it is sampled, or one in 64 of those
/// events would be counted as events at sampled addresses.
#[inline(always)]
pub const fn sampled_object(key: u64, masks: SampleMasks) -> bool {
    if masks.slot == 0 {
        return true;
    }
    if key < PAGE_SIZE as u64 {
        return false;
    }
    let page_hash = (key >> 12).wrapping_mul(SAMPLE_MULTIPLIER);
    ((key >> 6) ^ (page_hash >> SAMPLE_SLOT_SHIFT)) & masks.slot | page_hash & masks.page == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(keys: impl Iterator<Item = u64>, shift: u32) -> (u64, u64) {
        keys.fold((0, 0), |(total, kept), key| {
            (
                total + 1,
                kept + u64::from(sampled_object(key, SampleMasks::for_shift(shift))),
            )
        })
    }

    const BASE: u64 = 0xffff_8880_0000_0000;

    #[test]
    fn each_filter_enables_the_allocation_filters_and_no_other_setting_does() {
        type Change = fn(&mut TracerConfig);
        let enabled = |change: Change| {
            let mut config = TracerConfig::DEFAULT;
            change(&mut config);
            config
                .with_allocation_filters_enabled()
                .allocation_filters_enabled
        };
        // Each setting alone, and whether it enables the filters.
        let cases: [(Change, u32); 16] = [
            (|_| {}, 0),
            (|c| c.user_stacks = 1, 0),
            (|c| c.stack_shift = 4, 0),
            (|c| c.stack_sample_ticks = 4, 0),
            (|c| c.jiffies_clock = 1, 0),
            (|c| c.plain_releases = 1, 0),
            (|c| c.follow_processes = 1, 0),
            (|c| c.page_callers_steps = 12, 0),
            (|c| c.bucket_mask = 0xffff, 0),
            (|c| c.sample = SampleMasks::for_shift(1), 1),
            (|c| c.sample = SampleMasks::for_shift(6), 1),
            (|c| c.sample = SampleMasks::for_shift(MAX_SAMPLE_SHIFT), 1),
            (|c| c.filter_tgid = 7, 1),
            (|c| c.filter_comm_enabled = 1, 1),
            (|c| c.min_size = 1, 1),
            (|c| c.max_size = 4096, 1),
        ];
        for (change, expected) in cases {
            assert_eq!(enabled(change), expected);
        }
    }

    #[test]
    fn null_and_zero_size_pointers_name_no_object() {
        for key in [0, 1, ZERO_SIZE_PTR] {
            assert!(names_no_object(key), "{key:#x}");
        }
        for key in [ZERO_SIZE_PTR + 1, PAGE_SIZE as u64, BASE, page_key(0)] {
            assert!(!names_no_object(key), "{key:#x}");
        }
    }

    #[test]
    fn the_null_page_is_never_sampled() {
        for shift in [1, 6, 10] {
            for key in [0, 0x10, 0x20, PAGE_SIZE as u64 - 8] {
                assert!(
                    !sampled_object(key, SampleMasks::for_shift(shift)),
                    "key {key:#x} at shift {shift}"
                );
            }
        }
        // Without sampling every address passes (the hooks leave NULL out before asking).
        assert!(sampled_object(0, SampleMasks::EVERY_OBJECT));
    }

    #[test]
    fn packed_small_objects_are_sampled_one_per_64_slots() {
        // 10,000 64-byte objects filling consecutive slab pages.
        let (total, kept) = tracked((0..10_000).map(|i| BASE + i * 64), 6);
        assert_eq!(total, 10_000);
        // 156.25 pages: one object each (plus at most one from the partial page).
        assert!((156..=157).contains(&kept), "kept {kept}");
    }

    #[test]
    fn every_object_size_keeps_one_in_n_on_average() {
        for size in [8u64, 96, 192, 512, 4096, 16384] {
            let count = 200_000;
            let (_, kept) = tracked((0..count).map(|i| BASE + i * size), 6);
            let expected = count as f64 / 64.0;
            let error = (kept as f64 - expected).abs() / expected;
            assert!(error < 0.1, "size {size}: kept {kept}, expected {expected}");
        }
    }

    #[test]
    fn consecutive_pages_choose_every_slot_evenly() {
        // 64,000 consecutive pages, as a slab cache's pages often are: each slot of 64 should be
        // chosen 1,000 times; a multiplier whose top bits follow the page number would repeat
        // a few slots.
        let mut chosen = [0u32; 64];
        for page in 0..64_000u64 {
            let slots = (0..64).filter(|slot| {
                sampled_object(BASE + page * 4096 + slot * 64, SampleMasks::for_shift(6))
            });
            for slot in slots {
                chosen[slot as usize] += 1;
            }
        }
        assert_eq!(chosen.iter().sum::<u32>(), 64_000);
        for (slot, count) in chosen.iter().enumerate() {
            assert!((850..=1150).contains(count), "slot {slot}: {count}");
        }
    }

    #[test]
    fn sample_masks_keep_one_in_the_rate_of_page_hashes() {
        assert_eq!(SampleMasks::for_shift(0), SampleMasks::EVERY_OBJECT);
        for shift in 1..=MAX_SAMPLE_SHIFT {
            let masks = SampleMasks::for_shift(shift);
            // The bits tested are `shift` in all, and the page's never overlap the slot's.
            assert_eq!(masks.slot.count_ones() + masks.page.count_ones(), shift);
            assert_eq!(masks.page >> SAMPLE_SLOT_SHIFT, 0, "shift {shift}");
        }
    }

    #[test]
    fn rates_above_64_use_page_hash_bits() {
        let count = 2_000_000u64;
        let (_, kept) = tracked((0..count).map(|i| BASE + i * 64), 10);
        let expected = count as f64 / 1024.0;
        let error = (kept as f64 - expected).abs() / expected;
        assert!(error < 0.15, "kept {kept}, expected {expected}");
    }

    /// Claims and frees in a bucket, in a random order, as the programs make them: every key
    /// held is found, no freed key is, and a search never reads past the highest slot ever
    /// claimed plus one. Every bucket of the table is the same one, each key's home and
    /// overflow buckets alike.
    #[test]
    fn bucket_searches_find_every_object_held_and_stop_at_the_first_slot_never_used() {
        extern crate std;
        use core::cell::Cell;
        use std::vec::Vec;

        use super::bucket::{claim, find};
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let bucket = [const { Cell::new(0u64) }; SLOTS_PER_BUCKET];
        let reads = Cell::new(0usize);
        const MASK: u32 = 2 * BUCKETS_PER_GROUP - 1;
        let keys_of = |index: u32| (index <= MASK).then_some(0u32);
        let key_at = |_, i: usize| {
            reads.set(reads.get().max(i + 1));
            bucket[i].get()
        };
        let mut held: Vec<u64> = Vec::new();
        let mut freed: Vec<u64> = Vec::new();
        let mut high_water = 0;
        for step in 0..20_000u64 {
            let grow = held.len() < 3 || (held.len() < SLOTS_PER_BUCKET && random() % 2 == 0);
            if grow {
                let key = 0xffff_8880_0000_1000 + 8 * step;
                assert_eq!(find(key, mix64(key), MASK, keys_of, key_at), None);
                let slot = claim(key, mix64(key), MASK, keys_of, key_at, |_, i, seen| {
                    assert!(seen == 0 || seen == FREED_SLOT);
                    bucket[i].set(key);
                    true
                })
                .expect("a free slot")
                .slot;
                assert!(bucket[..slot].iter().all(|key| holds_object(key.get())));
                high_water = high_water.max(slot + 1);
                held.push(key);
            } else {
                let key = held.swap_remove((random() % held.len() as u64) as usize);
                let slot = find(key, mix64(key), MASK, keys_of, key_at)
                    .expect("every key held is found")
                    .slot;
                bucket[slot].set(FREED_SLOT);
                freed.push(key);
            }
            for &key in held.iter().chain(freed.iter().rev().take(4)) {
                reads.set(0);
                let found = find(key, mix64(key), MASK, keys_of, key_at);
                assert_eq!(found.is_some(), held.contains(&key), "{key:#x}");
                assert!(reads.get() <= (high_water + 1).min(SLOTS_PER_BUCKET));
            }
        }
        assert_eq!(
            high_water, SLOTS_PER_BUCKET,
            "the bucket filled at some point"
        );
    }

    /// A table of 4,096 buckets as the programs fill it, slot claims by the same `claim`:
    /// objects of one page share a group of home buckets, a page of small objects spills into
    /// overflow buckets and is still found whole, a search reads past a bucket only once it
    /// has been full, and pages spread by hash.
    #[test]
    fn objects_of_a_page_share_a_group_and_spill_only_from_full_buckets() {
        extern crate std;
        use core::cell::Cell;
        use std::{collections::BTreeSet, vec::Vec};

        use super::bucket::{Search, claim, find, home, overflow, search};
        const MASK: u32 = 4095;
        const HOMES: u32 = (MASK >> 1) + 1;
        let table: Vec<[Cell<u64>; SLOTS_PER_BUCKET]> = (0..=MASK)
            .map(|_| [const { Cell::new(0u64) }; SLOTS_PER_BUCKET])
            .collect();
        let buckets_read = Cell::new(0usize);
        let keys_of = |bucket: u32| {
            buckets_read.set(buckets_read.get() + 1);
            table.get(bucket as usize).map(|_| bucket)
        };
        let key_at = |bucket: u32, i: usize| table[bucket as usize][i].get();
        let put = |key: u64| {
            claim(key, mix64(key), MASK, keys_of, key_at, |bucket, i, _| {
                table[bucket as usize][i].set(key);
                true
            })
        };
        let find_key = |key: u64| find(key, mix64(key), MASK, keys_of, key_at);
        let group_of = |bucket: u32| bucket / BUCKETS_PER_GROUP;

        // 64 objects of 64 bytes in one slab page: one group of homes, about four to a bucket.
        let page = 0xffff_8881_2345_6000_u64;
        let places: Vec<_> = (0..64).map(|i| put(page + 64 * i).expect("room")).collect();
        let groups: BTreeSet<u32> = places.iter().map(|p| group_of(p.bucket)).collect();
        assert_eq!(groups.len(), 1, "{places:?}");
        assert!(
            places.iter().all(|p| p.bucket < HOMES && p.slot < 10),
            "{places:?}"
        );

        // 512 objects of 8 bytes in another page: more than its group's 256 slots.
        let small = 0xffff_8881_2345_7000_u64;
        assert_ne!(
            group_of(home(small, mix64(small), MASK)),
            group_of(places[0].bucket)
        );
        for i in 0..512 {
            assert!(put(small + 8 * i).is_some(), "object {i} dropped");
        }
        let spilled: Vec<u64> = (0..512)
            .map(|i| small + 8 * i)
            .filter(|&key| find_key(key).expect("found").bucket >= HOMES)
            .collect();
        assert!(
            (256..512).contains(&spilled.len()),
            "{} spilled",
            spilled.len()
        );

        // An object freed from an overflow bucket is gone.
        let place = find_key(spilled[0]).unwrap();
        assert_eq!(place.bucket, overflow(mix64(spilled[0]), MASK, 0));
        table[place.bucket as usize][place.slot].set(FREED_SLOT);
        assert_eq!(find_key(spilled[0]), None);

        // The free of an object the table does not hold reads its home alone while that home
        // has a slot never used, and overflow buckets too once the home has been full.
        let absent = page + 8;
        let absent_home = home(absent, mix64(absent), MASK);
        assert_eq!(search(absent, |i| key_at(absent_home, i)), Search::Absent);
        buckets_read.set(0);
        assert_eq!(find_key(absent), None);
        assert_eq!(buckets_read.get(), 1);
        let absent = small + 4;
        let absent_home = home(absent, mix64(absent), MASK);
        assert_eq!(
            search(absent, |i| key_at(absent_home, i)),
            Search::AbsentFromFull
        );
        buckets_read.set(0);
        assert_eq!(find_key(absent), None);
        assert!(buckets_read.get() >= 2);

        // Pages and percpu keys have no neighbours in their 4 KiB: their home is by hash.
        for key in [page_key(0x12_3456), 0x3a000 | PERCPU_KEY_TAG] {
            assert_eq!(home(key, mix64(key), MASK), mix64(key) as u32 & (HOMES - 1));
        }

        // Home and every overflow bucket full: the claim fails and writes nothing.
        let key = 0xffff_8881_2345_9040_u64;
        let chain = [
            home(key, mix64(key), MASK),
            overflow(mix64(key), MASK, 0),
            overflow(mix64(key), MASK, 1),
        ];
        for bucket in chain {
            for (i, slot) in table[bucket as usize].iter().enumerate() {
                slot.set(0xffff_8882_0000_0000 + 8 * i as u64);
            }
        }
        assert_eq!(put(key), None);
        assert_eq!(find_key(key), None);
    }

    /// Dense slab pages, every object held, fill a quarter of a table without a drop whatever
    /// the objects' size: a page of 8-byte objects spills half of its objects, which the
    /// overflow half takes.
    #[test]
    fn dense_pages_fill_a_quarter_of_the_table_without_a_drop() {
        extern crate std;
        use std::vec::Vec;

        use super::bucket::claim;
        const MASK: u32 = 4095;
        for size in [8u64, 16, 64, 256, 4096] {
            let mut table: Vec<[u64; SLOTS_PER_BUCKET]> = std::vec![[0; SLOTS_PER_BUCKET]; 4096];
            let objects = (MASK as usize + 1) * SLOTS_PER_BUCKET / 4;
            let keys = (0..)
                .map(|i: u64| 0xffff_8881_0000_0000 + i * size)
                .take(objects);
            for (i, key) in keys.enumerate() {
                let table_ref = core::cell::RefCell::new(&mut table);
                let placed = claim(
                    key,
                    mix64(key),
                    MASK,
                    |bucket| (bucket <= MASK).then_some(bucket),
                    |bucket, slot| table_ref.borrow()[bucket as usize][slot],
                    |bucket, slot, _| {
                        table_ref.borrow_mut()[bucket as usize][slot] = key;
                        true
                    },
                );
                assert!(
                    placed.is_some(),
                    "{size}-byte objects: object {i} of {objects} dropped"
                );
            }
        }
    }

    #[test]
    fn page_filter_slots_follow_the_frame_number() {
        let mut used = [0u8; PAGE_FILTER_SLOTS as usize];
        // Consecutive page frames, as a buddy allocator hands them out: each slot takes four.
        for pfn in 0x10_0000..0x10_0000 + 4 * u64::from(PAGE_FILTER_SLOTS) {
            used[page_filter_slot(page_key(pfn)) as usize] += 1;
        }
        assert!(used.iter().all(|&count| count == 4), "{used:?}");
        // Sixteen neighbouring frames share one 64-byte line of 32-bit counters.
        let line = |pfn: u64| page_filter_slot(page_key(pfn)) as usize * size_of::<u32>() / 64;
        assert!((0x12_3450..0x12_3460).all(|pfn| line(pfn) == line(0x12_3450)));
        assert_ne!(line(0x12_3460), line(0x12_3450));
        // Pairs are packed: the map's 8-byte elements hold two counters each, no padding, and
        // consecutive slots fill one pair before the next.
        assert_eq!(size_of::<PageFilterPair>(), 8);
        assert_eq!(
            page_filter_counter(page_key(0x12_3456)),
            (0x12_3456 % PAGE_FILTER_SLOTS / 2, 0)
        );
        assert_eq!(
            page_filter_counter(page_key(0x12_3457)),
            (0x12_3456 % PAGE_FILTER_SLOTS / 2, 1)
        );
        assert!(
            page_filter_counter(page_key(u64::from(PAGE_FILTER_SLOTS) - 1)).0 < PAGE_FILTER_PAIRS
        );
        // The key's tag plays no part: a frame's slot is its number modulo the filter's size.
        assert_eq!(
            page_filter_slot(page_key(0x12_3456)),
            0x12_3456 % PAGE_FILTER_SLOTS
        );
    }

    #[test]
    fn page_keys_round_trip_and_stay_apart() {
        for pfn in [0, 1, 0x12_3456, (1 << 40) - 1] {
            assert_eq!(pfn_of_key(page_key(pfn)), Some(pfn));
        }
        assert_eq!(pfn_of_key(BASE + 64), None);
        assert_eq!(pfn_of_key(0x3a000 | PERCPU_KEY_TAG), None);
    }

    #[test]
    fn consecutive_pages_are_sampled_one_in_n() {
        let (_, kept) = tracked((0..100_000).map(page_key), 6);
        let expected = 100_000.0 / 64.0;
        let error = (kept as f64 - expected).abs() / expected;
        assert!(error < 0.1, "kept {kept}, expected {expected}");
    }

    #[test]
    fn rate_one_keeps_everything() {
        assert_eq!(tracked((0..1000).map(|i| BASE + i * 8), 0), (1000, 1000));
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for AllocRecord {}
    unsafe impl aya::Pod for CpuState {}
    unsafe impl aya::Pod for KeyBucket {}
    unsafe impl aya::Pod for RecordBucket {}
    unsafe impl aya::Pod for CacheName {}
    unsafe impl aya::Pod for TaskComm {}
    unsafe impl aya::Pod for TracerConfig {}
}
