//! User-space heap hooks: uprobes on the entry of glibc's allocator functions (and of any
//! allocator exporting the same names: jemalloc, tcmalloc and mimalloc override them) and
//! uretprobes on their return, attached to one process (Linux 4.17+ for BPF on uprobes by
//! perf event, 6.6+ for uprobe_multi links).
//!
//! The entry saves the request per thread; the return records the block the allocator handed
//! out, with the return address into the caller as call site and the user stack. A call that
//! enters another hooked function before returning (glibc's `realloc(NULL, n)` calls `malloc`,
//! `reallocarray` calls `realloc`) is recorded once, by the outermost call.
//!
//! `realloc` forgets its old block at entry: a block moved by realloc is freed then, and one
//! that failed to move is still allocated but no longer followed. Erring that way leaves a
//! block out of the report; the other way would report one already freed.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use memleak_common::AllocKind;

use crate::tracker::{Allocation, on_alloc, on_free};

/// A call in progress on one thread.
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingCall {
    bytes: u64,
    /// `posix_memalign`'s `void **memptr`, where the block is returned; 0 for the others.
    out_pointer: u64,
    /// Hooked calls entered inside this one and not yet returned.
    nested: u64,
}

/// Thread id to its allocator call in progress. LRU: entries of threads that exited inside a
/// call (or left one by longjmp) make room rather than fill the map.
#[map]
static PENDING_CALLS: LruHashMap<u64, PendingCall> = LruHashMap::with_max_entries(16_384, 0);

/// Saves a call's request, or counts it as nested in the thread's outer call.
#[inline(always)]
fn enter(bytes: u64, out_pointer: u64) -> bool {
    let thread = bpf_get_current_pid_tgid();
    if let Some(outer) = PENDING_CALLS.get_ptr_mut(&thread) {
        unsafe { (*outer).nested += 1 };
        return false;
    }
    let call = PendingCall {
        bytes,
        out_pointer,
        nested: 0,
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
    let (bytes, out_pointer) = (call.bytes, call.out_pointer);
    let _ = PENDING_CALLS.remove(&thread);
    let block = if out_pointer == 0 {
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
    let describe = || {
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
    on_alloc(ctx, block, describe, |_| None);
}

#[inline(always)]
fn argument(ctx: &ProbeContext, index: usize) -> u64 {
    ctx.arg::<u64>(index).unwrap_or(0)
}

/// `malloc(size)`, `valloc(size)`, `pvalloc(size)`.
#[uprobe]
pub fn user_malloc(ctx: ProbeContext) -> u32 {
    enter(argument(&ctx, 0), 0);
    0
}

/// `calloc(count, size)`. A product that overflows makes calloc fail, so a block returned
/// has exactly that size (a wrapping multiplication: a checked one needs 128-bit arithmetic,
/// which BPF has not).
#[uprobe]
pub fn user_calloc(ctx: ProbeContext) -> u32 {
    enter(argument(&ctx, 0).wrapping_mul(argument(&ctx, 1)), 0);
    0
}

/// `realloc(pointer, size)`.
#[uprobe]
pub fn user_realloc(ctx: ProbeContext) -> u32 {
    if enter(argument(&ctx, 1), 0) {
        on_free(argument(&ctx, 0));
    }
    0
}

/// `reallocarray(pointer, count, size)`.
#[uprobe]
pub fn user_reallocarray(ctx: ProbeContext) -> u32 {
    if enter(argument(&ctx, 1).wrapping_mul(argument(&ctx, 2)), 0) {
        on_free(argument(&ctx, 0));
    }
    0
}

/// `aligned_alloc(alignment, size)`, `memalign(alignment, size)`.
#[uprobe]
pub fn user_aligned_alloc(ctx: ProbeContext) -> u32 {
    enter(argument(&ctx, 1), 0);
    0
}

/// `posix_memalign(memptr, alignment, size)`.
#[uprobe]
pub fn user_posix_memalign(ctx: ProbeContext) -> u32 {
    enter(argument(&ctx, 2), argument(&ctx, 0));
    0
}

/// The return of every function above.
#[uretprobe]
pub fn user_alloc_return(ctx: RetProbeContext) -> u32 {
    let returned: u64 = ctx.ret();
    leave(&ctx, returned);
    0
}

/// `free(pointer)`.
#[uprobe]
pub fn user_free(ctx: ProbeContext) -> u32 {
    on_free(argument(&ctx, 0));
    0
}
