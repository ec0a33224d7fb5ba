//! Types shared by memleak's eBPF programs and its userspace loader.
//!
//! Everything here is `repr(C)` plain data: the eBPF side writes it into maps, the userspace
//! side reads the same bytes back. Changing a layout means changing both sides together.
#![no_std]

/// Object slots per bucket of the outstanding-allocation table. An object can live only in the
/// bucket its address hashes to, so a free scans one bucket: sixteen `u64` keys, two adjacent
/// cache lines. At a quarter full, fewer than one bucket in a million overflows.
pub const SLOTS_PER_BUCKET: usize = 16;

/// The keys of one bucket: object addresses, 0 for an empty slot.
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
}

impl AllocKind {
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Kmalloc),
            1 => Some(Self::KmemCache),
            _ => None,
        }
    }
}

/// One outstanding allocation. The object's address lives in the parallel key array at the
/// same slot index; this is everything else the report needs about it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocRecord {
    /// Return address into the function that called the allocator (the tracepoint's `call_site`).
    pub call_site: u64,
    /// Identifies the slab cache: the `struct kmem_cache *` (tp_btf) or a hash of its name
    /// (classic tracepoints); 0 for kmalloc. Resolved to a name through `CACHE_NAMES`.
    pub cache_id: u64,
    /// `bpf_ktime_get_ns()` at allocation (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    pub bytes_requested: u32,
    pub bytes_allocated: u32,
    /// Id in the `STACKS` map, or [`STACK_NOT_SAMPLED`] / [`STACK_FAILED`].
    pub stack_id: i32,
    /// Thread-group id (userspace "pid") of the task that allocated.
    pub tgid: u32,
    /// An [`AllocKind`].
    pub kind: u32,
    pub _reserved: u32,
}

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

/// Per-CPU event counters, indexed by `Counter as u32` in the `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Allocation events seen (before sampling).
    Allocs = 0,
    /// Free events seen (before sampling).
    Frees,
    /// Allocations recorded in the table.
    TrackedAllocs,
    /// Frees that removed a recorded allocation.
    TrackedFrees,
    /// Frees of objects the table does not hold (allocated before tracing started, or sampled out).
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
    /// Allocations not recorded because the address hash sampled them out (`--sample-rate`).
    SampledOut,
    /// Allocations not recorded because a filter (pid) rejected them.
    Filtered,
}

pub const COUNTER_COUNT: u32 = Counter::Filtered as u32 + 1;

/// Field offsets in the classic tracepoint records, read from tracefs `format` files at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ClassicOffsets {
    pub kmalloc_call_site: u16,
    pub kmalloc_ptr: u16,
    pub kmalloc_bytes_req: u16,
    pub kmalloc_bytes_alloc: u16,
    pub cache_alloc_call_site: u16,
    pub cache_alloc_ptr: u16,
    pub cache_alloc_bytes_req: u16,
    pub cache_alloc_bytes_alloc: u16,
    /// `__data_loc char[] name`, or [`NO_FIELD`] on kernels whose event has no name.
    pub cache_alloc_name: u16,
    pub kfree_ptr: u16,
    pub cache_free_ptr: u16,
    pub _reserved: u16,
}

impl ClassicOffsets {
    pub const NONE: Self = Self {
        kmalloc_call_site: NO_FIELD,
        kmalloc_ptr: NO_FIELD,
        kmalloc_bytes_req: NO_FIELD,
        kmalloc_bytes_alloc: NO_FIELD,
        cache_alloc_call_site: NO_FIELD,
        cache_alloc_ptr: NO_FIELD,
        cache_alloc_bytes_req: NO_FIELD,
        cache_alloc_bytes_alloc: NO_FIELD,
        cache_alloc_name: NO_FIELD,
        kfree_ptr: NO_FIELD,
        cache_free_ptr: NO_FIELD,
        _reserved: 0,
    };
}

/// Tracer settings, written into the eBPF object's read-only `CONFIG` global before load, so
/// the verifier sees them as constants and prunes the branches they disable.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TracerConfig {
    /// Number of buckets in the object table minus one (the bucket count is a power of two).
    pub bucket_mask: u32,
    /// Track only objects whose address hash has this many low sample bits zero: one object in
    /// `1 << sample_shift` (0 = every object).
    pub sample_shift: u32,
    /// Capture the stack of one tracked object in `1 << stack_shift`, plus the first allocation
    /// seen from each call site.
    pub stack_shift: u32,
    /// Record only allocations by this thread-group id (0 = all).
    pub filter_tgid: u32,
    /// `offsetof(struct kmem_cache, size)` (tp_btf programs), from the kernel's BTF.
    pub kmem_cache_size_offset: u32,
    /// `offsetof(struct kmem_cache, object_size)`.
    pub kmem_cache_object_size_offset: u32,
    /// `offsetof(struct kmem_cache, name)`.
    pub kmem_cache_name_offset: u32,
    pub _reserved: u32,
    pub classic: ClassicOffsets,
}

impl TracerConfig {
    pub const DEFAULT: Self = Self {
        bucket_mask: 0,
        sample_shift: 0,
        stack_shift: 0,
        filter_tgid: 0,
        kmem_cache_size_offset: 0,
        kmem_cache_object_size_offset: 0,
        kmem_cache_name_offset: 0,
        _reserved: 0,
        classic: ClassicOffsets::NONE,
    };
}

/// The object hash's low bits choose its bucket and its top 16 bits decide sampling, so the two
/// are independent and sample rates go up to 65536.
pub const SAMPLE_BITS_SHIFT: u32 = 48;
pub const MAX_SAMPLE_SHIFT: u32 = 16;

/// A 64-bit finalizer (from MurmurHash3) that spreads slab addresses, which share alignment and
/// high bits, over all 64 bits. Both sides use it: eBPF to place and sample objects, userspace
/// to explain which objects a sample rate keeps.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Whether an object with this hash is tracked at `1 << shift` sampling.
#[inline(always)]
pub const fn sampled(hash: u64, shift: u32) -> bool {
    (hash >> SAMPLE_BITS_SHIFT) & ((1u64 << shift) - 1) == 0
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for AllocRecord {}
    unsafe impl aya::Pod for KeyBucket {}
    unsafe impl aya::Pod for RecordBucket {}
    unsafe impl aya::Pod for CacheName {}
    unsafe impl aya::Pod for TaskComm {}
    unsafe impl aya::Pod for TracerConfig {}
}
