//! The outstanding-allocation table and everything done per allocation and per free.
//!
//! The table is open hashing without a lock: an object lives in its home bucket, near those of
//! the other objects of its page, or when that is full in one of its overflow buckets
//! (`memleak_common::bucket`); the lowest free slot is claimed by compare-and-swap of its key
//! from 0 or `FREED_SLOT`, and a free leaves `FREED_SLOT` in it (see [`release_slot`]). A slot
//! once used never holds 0 again, so searches stop at a bucket's first 0. No helper call and
//! no map lock sits on the free path, and the free of an object the table does not hold
//! (allocated before tracing, filtered or dropped) returns after plain reads of its home
//! bucket's used slots (and of its overflow buckets', behind a home once full), with no
//! atomic operation, or before touching any map when sampling rules the address out.
//!
//! Kernels before Linux 5.12 have no BPF compare-and-swap: in the object built for them
//! (`crate::PLAIN_CLAIMS`) a slot is claimed with a plain store, and the claim is checked once
//! the record is written (see [`claim_held`]).
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    sync::atomic::{Ordering, compiler_fence},
};

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns},
    programs::tracing::StackIdContext,
};
use memleak_common::{
    AllocKind, AllocRecord, CacheName, Counter, CpuState, FREED_SLOT, SLOTS_PER_BUCKET,
    STACK_FAILED, STACK_NOT_SAMPLED, TaskComm, bucket, mix64, names_no_object,
    page_callers::{self, CachedFrame},
    page_filter_counter, sampled, sampled_object,
};

use crate::maps::{
    CACHE_NAMES, COMMS, CPU_STATE, MISSED_FREE_SITES, OBJECT_KEYS, OBJECT_RECORDS, SEEN_CACHES,
    SEEN_CACHES_LEN, SEEN_SITES, SEEN_SITES_LEN, SEEN_TGIDS, SEEN_TGIDS_LEN, STACKS, TRACKED_PAGES,
    USER_STACKS, config,
};

/// What a hook reads about an allocation once it is known to be tracked.
pub struct Allocation {
    pub kind: AllocKind,
    pub call_site: u64,
    pub cache_id: u64,
    pub bytes_requested: u32,
    pub bytes_allocated: u32,
    /// Low 32 bits of the gfp flags (kmalloc only).
    pub gfp_flags: u32,
}

/// This CPU's entry of `CPU_STATE`, looked up once per event and handed down.
#[derive(Clone, Copy)]
pub struct ThisCpu(*mut CpuState);

impl ThisCpu {
    #[inline(always)]
    pub fn get() -> Option<Self> {
        CPU_STATE.get_ptr_mut(0).map(Self)
    }

    #[inline(always)]
    pub fn count(self, counter: Counter) {
        // Per-CPU: no other CPU writes it, and a program does not nest in itself on one CPU.
        unsafe { (*self.0).counters[counter as usize] += 1 };
    }

    /// The word `slab::scalar` launders a typed pointer through.
    #[inline(always)]
    pub fn scratch(self) -> *mut u64 {
        unsafe { &raw mut (*self.0).scratch }
    }

    /// This CPU's cache entry for the page walk's return address `return_address`.
    #[inline(always)]
    pub fn page_frame(self, return_address: u64) -> *mut CachedFrame {
        let index = page_callers::cache_index(return_address);
        unsafe {
            (&raw mut (*self.0).page_frames)
                .cast::<CachedFrame>()
                .add(index)
        }
    }
}

/// Counts an event outside the table's paths, which look their CPU's entry up themselves.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(cpu) = ThisCpu::get() {
        cpu.count(counter);
    }
}

/// The keys of the table's bucket `bucket`.
#[inline(always)]
fn bucket_keys(bucket: u32) -> Option<*mut u64> {
    OBJECT_KEYS
        .get_ptr_mut(bucket)
        .map(|keys| unsafe { (*keys).keys.as_mut_ptr() })
}

#[inline(always)]
fn load_key(keys: *mut u64, slot: usize) -> u64 {
    unsafe { keys.add(slot).read_volatile() }
}

/// BPF_CMPXCHG. `AtomicU64::compare_exchange` is not offered on the bpf target (its spec says
/// `atomic-cas: false`, a leftover from before v3), so the intrinsic is called directly.
#[inline(always)]
fn swap_key(keys: *mut u64, slot: usize, expected: u64, new: u64) -> bool {
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
            keys.add(slot),
            expected,
            new,
        )
        .1
    }
}

/// Takes the free slot for `key`, seen holding `free` (0 or `FREED_SLOT`): false when another
/// CPU took it first.
#[inline(always)]
fn claim_slot(keys: *mut u64, slot: usize, free: u64, key: u64) -> bool {
    if crate::PLAIN_CLAIMS {
        unsafe { keys.add(slot).write_volatile(key) };
        true
    } else {
        swap_key(keys, slot, free, key)
    }
}

/// Empties the slot holding `key`: false when it no longer does.
///
/// Only userspace's removals need the compare-and-swap. Every free hook runs before the
/// allocator can hand the address out again (the kmem and page tracepoints fire before the
/// object goes back, the percpu one under the lock its allocations take, the entry probes of
/// the free functions before they run), and an object is freed once: between this read of
/// the key and the store, no program can empty the slot and another claim it. Userspace
/// (`watch` removing objects found free, `run --user` the heaps of exec'ed processes) can,
/// and the store would then erase the new claim; so the plain store is used only where
/// userspace never removes (`plain_releases`), which spares each free about 4 ns.
#[inline(always)]
fn release_slot(keys: *mut u64, slot: usize, key: u64) -> bool {
    if crate::PLAIN_CLAIMS || config!(plain_releases) != 0 {
        unsafe { keys.add(slot).write_volatile(FREED_SLOT) };
        true
    } else {
        swap_key(keys, slot, key, FREED_SLOT)
    }
}

/// With plain claims, whether the slot claimed for `key` is still its own now that its record
/// is written. Two CPUs can both see a slot empty and store their keys; the later key stays,
/// and the records may be interleaved. Each claimant reads its key back after a full fence (on
/// x86-64 the JIT makes BPF_XADD a `lock add`): of two overlapping claims the one whose record
/// was written last then sees the other's key, and empties the slot rather than leave a key
/// beside another object's record. Both objects are lost, never misattributed, and counted
/// (docs/kernels.md says the one interleaving whose loss goes uncounted).
#[inline(always)]
fn claim_held(cpu: ThisCpu, keys: *mut u64, slot: usize, key: u64) -> bool {
    if !crate::PLAIN_CLAIMS {
        return true;
    }
    compiler_fence(Ordering::SeqCst);
    // Relaxed, its result unused: LLVM emits BPF_XADD, which 5.10 verifiers accept (an ordered
    // or fetching form would be the 5.12 atomics this path avoids).
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*cpu.0).claim_fence, 1)
    };
    compiler_fence(Ordering::SeqCst);
    if load_key(keys, slot) == key {
        return true;
    }
    unsafe { keys.add(slot).write_volatile(FREED_SLOT) };
    cpu.count(Counter::ClaimRaces);
    false
}

/// Records the allocation of the object at `key`. The hook's closures run only when the object
/// is tracked (`describe`), and the first time its cache is seen (`name_of_cache`), so objects
/// that sampling leaves out cost no reads beyond the key.
#[inline(always)]
pub fn on_alloc<C: StackIdContext>(
    ctx: &C,
    key: u64,
    describe: impl FnOnce(ThisCpu) -> Allocation,
    name_of_cache: impl FnOnce(u64) -> Option<CacheName>,
) {
    // A failed allocation's event (NULL) is not an object: not counted.
    if config!(return_at_once) != 0 || names_no_object(key) {
        return;
    }
    // One load for every filter at the defaults; a new filter must also enable this word
    // (`TracerConfig::with_allocation_filters_enabled`).
    let filters = config!(allocation_filters_enabled) != 0;
    // Before any map access, as for frees: with --sample-rate, most allocations end here.
    if filters && !sampled_object(key, config!(sample)) {
        return;
    }
    let Some(cpu) = ThisCpu::get() else {
        return;
    };
    cpu.count(Counter::Allocs);
    let hash = mix64(key);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if filters && !wanted_task(tgid) {
        cpu.count(Counter::Filtered);
        return;
    }
    let allocation = describe(cpu);
    if filters
        && (allocation.bytes_allocated < config!(min_size)
            || allocation.bytes_allocated > config!(max_size))
    {
        cpu.count(Counter::Filtered);
        return;
    }
    let mask = config!(bucket_mask);
    let found = bucket::find(key, hash, mask, bucket_keys, load_key);
    let (place, claimed) = match found {
        Some(place) => (place, false),
        // Plain reads first: a locked compare-and-swap on a slot seen taken would fail
        // anyway, and costs tens of nanoseconds on a contended cache line.
        None => match bucket::claim(key, hash, mask, bucket_keys, load_key, |keys, i, free| {
            claim_slot(keys, i, free, key)
        }) {
            Some(place) => (place, true),
            None => {
                cpu.count(Counter::DroppedTableFull);
                return;
            }
        },
    };
    let Some(records) = OBJECT_RECORDS.get_ptr_mut(place.bucket) else {
        return;
    };
    let (keys, slot) = (place.keys, place.slot);
    // Never taken; it bounds the index for the record's address.
    if slot >= SLOTS_PER_BUCKET {
        return;
    }
    if !claimed {
        cpu.count(Counter::MissedFrees);
        count_missed_free(unsafe { (*records).records[slot].call_site });
    }

    // The first from a site before the sample: an object that gets its site's first stack is
    // not counted as left without one by the sample's limit.
    let (stack_id, user_stack) = if allocation.call_site == 0
        || first_from_site(allocation.call_site)
        || stack_sampled(cpu, hash, config!(stack_shift))
    {
        let stack_id = capture_stack(cpu, ctx, allocation.kind);
        let user_stack = if config!(user_stacks) != 0 && stack_id >= 0 {
            capture_user_stack(cpu, ctx)
        } else {
            0
        };
        (stack_id, user_stack)
    } else {
        (STACK_NOT_SAMPLED, 0)
    };
    if allocation.cache_id != 0 {
        remember_cache(allocation.cache_id, name_of_cache);
    }
    remember_comm(tgid);

    let record = unsafe { &mut (*records).records[slot] };
    *record = AllocRecord {
        call_site: allocation.call_site,
        cache_id: allocation.cache_id,
        allocated_at: allocation_time(),
        bytes_requested: allocation.bytes_requested,
        bytes_allocated: allocation.bytes_allocated,
        stack_id,
        tgid,
        kind: allocation.kind as u16,
        user_stack,
        gfp_flags: allocation.gfp_flags,
    };
    if claimed {
        if !claim_held(cpu, keys, slot, key) {
            return;
        }
        // After the record is in place and before the page reaches its caller, so no free of
        // it can read the filter first. A record replaced in place (missed free) is counted.
        if allocation.kind == AllocKind::Page
            && let Some(counter) = tracked_page_counter(key)
        {
            add_to_tracked_pages(counter, 1);
        }
    }
    cpu.count(Counter::TrackedAllocs);
}

/// Whether the `--pid` and `--comm` filters keep the allocations of the current task, whose
/// thread-group id is `tgid`.
#[inline(always)]
fn wanted_task(tgid: u32) -> bool {
    let filter_tgid = config!(filter_tgid);
    if filter_tgid != 0 && filter_tgid != tgid {
        return false;
    }
    config!(filter_comm_enabled) == 0
        || bpf_get_current_comm().is_ok_and(|comm| comm == config!(filter_comm))
}

/// Adds `delta` (wrapping: `u32::MAX` takes one away) to a counter of the tracked-page filter.
#[inline(always)]
fn add_to_tracked_pages(counter: *mut u32, delta: u32) {
    // Relaxed with its result unused: BPF_XADD (32-bit), which Linux 5.10 accepts.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(counter, delta) };
}

/// The tracked-page filter's counter of the page at `key`: one half of a pair.
#[inline(always)]
fn tracked_page_counter(key: u64) -> Option<*mut u32> {
    let (pair, half) = page_filter_counter(key);
    let pair = TRACKED_PAGES.get_ptr_mut(pair)?;
    Some(unsafe { pair.cast::<u32>().add(half) })
}

/// Whether the stack of the object whose address hashes to `hash` is captured: one object in
/// `1 << shift` by the hash, and, unless every stack was asked for, at most one in
/// `stack_sample_ticks` clock ticks on each CPU. The slab allocator hands the same few
/// addresses out again and again on busy paths (an skb head per packet, an eventfd context per
/// open): an address the hash chose had its stack walked at every allocation, at 4 to 15 µs a
/// walk on a VM. Userspace sets the ticks to about 16 ms whatever the kernel's HZ, which
/// bounds that at some 60 walks a second per CPU.
#[inline(always)]
fn stack_sampled(cpu: ThisCpu, hash: u64, shift: u32) -> bool {
    if shift != 0 && !sampled(hash, shift) {
        return false;
    }
    let ticks = config!(stack_sample_ticks);
    if ticks == 0 {
        return true;
    }
    let now = unsafe { bpf_jiffies64() };
    unsafe {
        let last = &raw mut (*cpu.0).last_sampled_stack;
        if now.wrapping_sub(*last) < u64::from(ticks) {
            cpu.count(Counter::StackSamplesOverLimit);
            return false;
        }
        *last = now;
    }
    true
}

/// The clock reading a record keeps: jiffies (Linux 5.5+; the verifier inlines the helper
/// into a load) when userspace could learn their conversion, else nanoseconds.
#[inline(always)]
fn allocation_time() -> u64 {
    if config!(jiffies_clock) != 0 {
        unsafe { bpf_jiffies64() }
    } else {
        unsafe { bpf_ktime_get_ns() }
    }
}

/// Forgets a freed object, if the table holds it.
#[inline(always)]
pub fn on_free(key: u64) {
    forget(key, false);
}

/// Forgets a freed page, if the table holds it: the tracked-page filter settles most frees, of
/// pages the table does not hold, before the table is read.
#[inline(always)]
pub fn on_page_free(key: u64) {
    forget(key, true);
}

#[inline(always)]
fn forget(key: u64, page: bool) {
    // kfree(NULL) fires the event too (a third of churn's frees), as does kfree(ZERO_SIZE_PTR):
    // they free nothing, and are not counted.
    if config!(return_at_once) != 0 || names_no_object(key) {
        return;
    }
    // Before any map access: with --sample-rate, most frees end here, at the cost of a hash.
    if !sampled_object(key, config!(sample)) {
        return;
    }
    let Some(cpu) = ThisCpu::get() else {
        return;
    };
    cpu.count(Counter::Frees);
    // A page's counter in the tracked-page filter: zero settles the free here; otherwise it is
    // taken down through the same pointer if the free removes the page's record.
    let tracked_pages = if page {
        let Some(counter) = tracked_page_counter(key) else {
            return;
        };
        if unsafe { counter.read_volatile() } == 0 {
            cpu.count(Counter::UntrackedFrees);
            return;
        }
        Some(counter)
    } else {
        None
    };
    // Most frees are of objects the table does not hold (allocated before tracing, movable
    // pages): plain reads up to the home bucket's first slot never used settle them.
    if let Some(place) = bucket::find(key, mix64(key), config!(bucket_mask), bucket_keys, load_key)
        && release_slot(place.keys, place.slot, key)
    {
        if let Some(counter) = tracked_pages {
            add_to_tracked_pages(counter, u32::MAX);
        }
        cpu.count(Counter::TrackedFrees);
        return;
    }
    cpu.count(Counter::UntrackedFrees);
}

/// Counts a missed free against the call site of the record being replaced.
#[inline(always)]
fn count_missed_free(call_site: u64) {
    match MISSED_FREE_SITES.get_ptr_mut(&call_site) {
        Some(missed) => unsafe { *missed += 1 },
        None => {
            let _ = MISSED_FREE_SITES.insert(&call_site, &1, 0);
        }
    }
}

/// The frames skipped by the second try of [`capture_stack`]: the innermost, which is inside
/// the allocator or the hook (the call site is found further out, or is recorded apart).
const SKIP_ONE_FRAME: u64 = 1;

/// `BPF_F_USER_STACK`: the stack of the user-space code the task was running.
const USER_STACK: u64 = 1 << 8;

#[inline(always)]
fn capture_stack<C: StackIdContext>(cpu: ThisCpu, ctx: &C, kind: AllocKind) -> i32 {
    cpu.count(Counter::StackCaptures);
    let flags = if kind == AllocKind::User {
        USER_STACK
    } else {
        0
    };
    // Without BPF_F_REUSE_STACKID a stack whose hash bucket holds another stack is refused
    // (EEXIST), and would be refused on every later capture. The same stack without its
    // innermost frame hashes elsewhere.
    match ctx
        .get_stackid(&STACKS, flags)
        .or_else(|_| ctx.get_stackid(&STACKS, flags | SKIP_ONE_FRAME))
    {
        Ok(id) => id as i32,
        Err(_) => {
            cpu.count(Counter::StackFailures);
            STACK_FAILED
        }
    }
}

/// The user-space stack of the task beside a kernel allocation's kernel stack, as 1 + its
/// `USER_STACKS` id; 0 when there is none (a kernel thread) or it could not be captured. In an
/// interrupt it is the stack of whichever task was interrupted: userspace keeps it only for
/// kernel stacks that pass through no interrupt.
#[inline(always)]
fn capture_user_stack<C: StackIdContext>(cpu: ThisCpu, ctx: &C) -> u16 {
    cpu.count(Counter::UserStackCaptures);
    match ctx
        .get_stackid(&USER_STACKS, USER_STACK)
        .or_else(|_| ctx.get_stackid(&USER_STACKS, USER_STACK | SKIP_ONE_FRAME))
    {
        // Userspace sizes the map below u16::MAX entries.
        Ok(id) if id < i64::from(u16::MAX) => id as u16 + 1,
        _ => {
            cpu.count(Counter::UserStackMisses);
            0
        }
    }
}

/// Whether this is the first allocation seen from `call_site`, so that every call site in the
/// report has at least one full stack even when its allocations are not sampled.
#[inline(always)]
fn first_from_site(call_site: u64) -> bool {
    let index = (mix64(call_site) as u32) & (SEEN_SITES_LEN - 1);
    let Some(seen) = SEEN_SITES.get_ptr_mut(index) else {
        return false;
    };
    unsafe {
        if *seen == call_site {
            return false;
        }
        *seen = call_site;
    }
    true
}

#[inline(always)]
fn remember_cache(cache_id: u64, name_of_cache: impl FnOnce(u64) -> Option<CacheName>) {
    let index = (mix64(cache_id) as u32) & (SEEN_CACHES_LEN - 1);
    let Some(seen) = SEEN_CACHES.get_ptr_mut(index) else {
        return;
    };
    unsafe {
        if *seen == cache_id {
            return;
        }
        *seen = cache_id;
    }
    if let Some(name) = name_of_cache(cache_id) {
        // BPF_NOEXIST: a collision in SEEN_CACHES must not rewrite a name already known.
        let _ = CACHE_NAMES.insert(&cache_id, &name, 1);
    }
}

#[inline(always)]
fn remember_comm(tgid: u32) {
    let index = tgid & (SEEN_TGIDS_LEN - 1);
    let Some(seen) = SEEN_TGIDS.get_ptr_mut(index) else {
        return;
    };
    unsafe {
        if *seen == tgid {
            return;
        }
        *seen = tgid;
    }
    if let Ok(bytes) = bpf_get_current_comm() {
        let _ = COMMS.insert(&tgid, &TaskComm { bytes }, 1);
    }
}
