//! User-space heap hooks: uprobes on the entry of glibc's allocator functions (and of any
//! allocator exporting the same names: jemalloc, tcmalloc and mimalloc override them) and
//! uretprobes on their return, attached to one process. One entry program serves every
//! allocator function and one program every function that frees: the attach cookie says which
//! function fired (Linux 5.15+). Each comes twice, for one perf event per function and for one
//! uprobe_multi link per file (6.6+), which is far quicker to detach.
//!
//! The entry saves the request per thread; the return records the block the allocator handed
//! out, with the return address into the caller as call site and the user stack. A call that
//! enters another hooked function before returning (glibc's `realloc(NULL, n)` calls `malloc`,
//! `reallocarray` calls `realloc`) is recorded once, by the outermost call.
//!
//! `realloc` forgets its old block at entry: a block moved by realloc is freed then, and one
//! that failed to move is still allocated but no longer followed. Erring that way leaves a
//! block out of the report; the other way would report one already freed.
//!
//! Blocks are keyed by address and process (`user_key`): a forked child has its parent's
//! layout. With `follow_processes` the hooks are attached in every process that maps the
//! allocator, and each program first checks its process is followed.
//!
//! `mmap` of anonymous memory called by the program itself is a block too, `munmap` of its
//! start frees it. Mappings an allocator makes inside a hooked call (glibc's large blocks and
//! arenas) are nested calls, so they are not recorded twice; thread stacks (`MAP_STACK`,
//! which glibc caches rather than unmaps), file mappings and `MAP_FIXED` replacements are
//! not blocks. `mremap` forgets the mapping it moves or resizes, as realloc does.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use memleak_common::{AllocKind, user_call, user_key};

use crate::{
    maps::{FOLLOWED_PROCESSES, config},
    tracker::{Allocation, on_alloc, on_free},
};

/// A call in progress on one thread.
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingCall {
    bytes: u64,
    /// `posix_memalign`'s `void **memptr`, where the block is returned; 0 for the others.
    out_pointer: u64,
    /// Hooked calls entered inside this one and not yet returned.
    nested: u64,
    /// What the return records: [`RECORDS_BLOCK`], [`RECORDS_MAPPING`] or [`RECORDS_NOTHING`].
    records: u64,
}

/// A heap block, the return value (or the `out_pointer`'s) unless it is 0.
const RECORDS_BLOCK: u64 = 0;
/// An anonymous mapping, the return value unless it is `MAP_FAILED`.
const RECORDS_MAPPING: u64 = 1;
/// Nothing: a mapping that is not a block. The call is still entered, so that its return
/// does not end an outer call, and calls nested in it are not recorded.
const RECORDS_NOTHING: u64 = 2;

/// `mmap`'s `MAP_FAILED`.
const MAP_FAILED: u64 = u64::MAX;
/// `mmap` flags (x86-64 and the generic ABI).
const MAP_FIXED: u64 = 0x10;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_STACK: u64 = 0x2_0000;

/// Thread id to its allocator call in progress. LRU: entries of threads that exited inside a
/// call (or left one by longjmp) make room rather than fill the map.
#[map]
static PENDING_CALLS: LruHashMap<u64, PendingCall> = LruHashMap::with_max_entries(16_384, 0);

/// Whether the current process is one whose heap is recorded.
#[inline(always)]
fn followed() -> bool {
    config!(follow_processes) == 0
        || unsafe { FOLLOWED_PROCESSES.get(&current_process()) }.is_some()
}

#[inline(always)]
fn current_process() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Forgets the current process's block at `address`.
#[inline(always)]
fn free(address: u64) {
    if address != 0 {
        on_free(user_key(address, current_process()));
    }
}

/// Saves a call's request, or counts it as nested in the thread's outer call.
#[inline(always)]
fn enter(bytes: u64, out_pointer: u64, records: u64) -> bool {
    if !followed() {
        return false;
    }
    let thread = bpf_get_current_pid_tgid();
    if let Some(outer) = PENDING_CALLS.get_ptr_mut(&thread) {
        unsafe { (*outer).nested += 1 };
        return false;
    }
    let call = PendingCall {
        bytes,
        out_pointer,
        nested: 0,
        records,
    };
    let _ = PENDING_CALLS.insert(&thread, &call, 0);
    true
}

/// Records the block an outermost call returned.
#[inline(always)]
fn leave(ctx: &RetProbeContext, returned: u64) {
    let thread = bpf_get_current_pid_tgid();
    let Some(call) = PENDING_CALLS.get_ptr_mut(&thread) else {
        return;
    };
    let call = unsafe { &mut *call };
    if call.nested > 0 {
        call.nested -= 1;
        return;
    }
    let (bytes, out_pointer, records) = (call.bytes, call.out_pointer, call.records);
    let _ = PENDING_CALLS.remove(&thread);
    let block =
        if records == RECORDS_NOTHING || (records == RECORDS_MAPPING && returned == MAP_FAILED) {
            0
        } else if out_pointer == 0 {
            returned
        } else if returned == 0 {
            // posix_memalign returns 0 on success and the block through its first argument.
            unsafe { bpf_probe_read_user(out_pointer as *const u64) }.unwrap_or(0)
        } else {
            0
        };
    if block == 0 {
        return;
    }
    // At a return probe the instruction pointer is the return address into the caller.
    let call_site = unsafe { (*ctx.regs).rip };
    let describe = |_| {
        let bytes = bytes.min(u64::from(u32::MAX)) as u32;
        Allocation {
            kind: AllocKind::User,
            call_site,
            cache_id: 0,
            bytes_requested: bytes,
            bytes_allocated: bytes,
            gfp_flags: 0,
        }
    };
    on_alloc(ctx, user_key(block, current_process()), describe, |_| None);
}

#[inline(always)]
fn argument(ctx: &ProbeContext, index: usize) -> u64 {
    ctx.arg::<u64>(index).unwrap_or(0)
}

/// The entry of an allocator function, which its attach cookie names (`memleak_common::user_call`).
#[inline(always)]
fn allocator_entry(ctx: &ProbeContext) {
    let argument = |index| argument(ctx, index);
    match attach_cookie(ctx) {
        // calloc(count, size), reallocarray's count and size: a product that overflows makes
        // the call fail, so a block returned has exactly that size (a wrapping multiplication:
        // a checked one needs 128-bit arithmetic, which BPF has not).
        user_call::CALLOC => {
            enter(argument(0).wrapping_mul(argument(1)), 0, RECORDS_BLOCK);
        }
        // realloc(pointer, size) forgets its old block at entry.
        user_call::REALLOC => {
            if enter(argument(1), 0, RECORDS_BLOCK) {
                free(argument(0));
            }
        }
        // reallocarray(pointer, count, size).
        user_call::REALLOCARRAY => {
            if enter(argument(1).wrapping_mul(argument(2)), 0, RECORDS_BLOCK) {
                free(argument(0));
            }
        }
        // aligned_alloc(alignment, size), memalign(alignment, size).
        user_call::ALIGNED_ALLOC => {
            enter(argument(1), 0, RECORDS_BLOCK);
        }
        // posix_memalign(memptr, alignment, size).
        user_call::POSIX_MEMALIGN => {
            enter(argument(2), argument(0), RECORDS_BLOCK);
        }
        // mmap(address, length, protection, flags, fd, offset).
        user_call::MMAP => {
            let flags = argument(3);
            let records = if flags & MAP_ANONYMOUS != 0 && flags & (MAP_FIXED | MAP_STACK) == 0 {
                RECORDS_MAPPING
            } else {
                RECORDS_NOTHING
            };
            enter(argument(1), 0, records);
        }
        // malloc(size) and every function whose size comes first: valloc, pvalloc, mallocx,
        // operator new.
        _ => {
            enter(argument(0), 0, RECORDS_BLOCK);
        }
    }
}

/// A function that frees, which its attach cookie names (`memleak_common::user_call`).
#[inline(always)]
fn free_entry(ctx: &ProbeContext) {
    if !followed() {
        return;
    }
    let address = argument(ctx, 0);
    match attach_cookie(ctx) {
        // mremap(address, old_length, new_length, flags, ...): the mapping is forgotten, as
        // realloc forgets its block, unless an allocator call made it (glibc's realloc of a
        // large block moves its own mapping, whose start is not the block's address).
        user_call::MREMAP => {
            if PENDING_CALLS.get_ptr(&bpf_get_current_pid_tgid()).is_none() {
                free(address);
            }
        }
        // free(pointer) and the functions whose pointer comes first (operator delete,
        // dallocx); munmap(address, length), which frees the mapping that starts at `address`
        // (unmapping part of one is not followed: its start forgets all of it, a later part
        // nothing).
        _ => free(address),
    }
}

#[inline(always)]
fn attach_cookie(ctx: &ProbeContext) -> u64 {
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }
}

/// Attached by one perf event per function (Linux 5.15+ for attach cookies).
#[uprobe]
pub fn user_alloc_entry(ctx: ProbeContext) -> u32 {
    allocator_entry(&ctx);
    0
}

/// Attached by one uprobe_multi link per file (Linux 6.6+).
#[uprobe(multi)]
pub fn user_alloc_entry_multi(ctx: ProbeContext) -> u32 {
    allocator_entry(&ctx);
    0
}

/// The return of every allocator function.
#[uretprobe]
pub fn user_alloc_return(ctx: RetProbeContext) -> u32 {
    leave(&ctx, ctx.ret());
    0
}

#[uretprobe(multi)]
pub fn user_alloc_return_multi(ctx: RetProbeContext) -> u32 {
    leave(&ctx, ctx.ret());
    0
}

#[uprobe]
pub fn user_free_entry(ctx: ProbeContext) -> u32 {
    free_entry(&ctx);
    0
}

#[uprobe(multi)]
pub fn user_free_entry_multi(ctx: ProbeContext) -> u32 {
    free_entry(&ctx);
    0
}
