//! Frees with no per-object tracepoint, followed with fentry (BPF trampolines: Linux 5.5+,
//! kernel BTF and ftrace direct calls): `kvfree_call_rcu`, where every kfree_rcu and
//! kvfree_rcu starts, and `kmem_cache_free_bulk`, which kfree_bulk, kfree_rcu's batches and
//! other bulk frees end in. A kfree_rcu'd object is dead from the call on, so the call is taken
//! as its free; its later bulk free then finds nothing to remove.
//!
//! Arguments are read from the context with a probe read rather than a typed load: Linux 6.1's
//! verifier refuses typed loads of `void **` and function-pointer arguments ("is not a
//! struct"), and the raw words are all these hooks need.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_kernel, generated::bpf_loop},
    macros::fentry,
    programs::FEntryContext,
};

use crate::{maps::config, tracker::on_free};

/// Objects freed by one `kmem_cache_free_bulk` call that are followed; kfree_rcu's batches
/// hand over at most a page of pointers (about 510) at once.
const MAX_BULK: u64 = 512;

/// The `index`th argument of the traced function, as a raw word.
#[inline(always)]
fn argument(ctx: &FEntryContext, index: usize) -> u64 {
    let slot = unsafe { ctx.as_ptr().cast::<u64>().add(index) };
    unsafe { bpf_probe_read_kernel(slot) }.unwrap_or(0)
}

/// Linux 6.3+: `kvfree_call_rcu(struct rcu_head *head, void *ptr)`. Before:
/// `kvfree_call_rcu(struct rcu_head *head, rcu_callback_t func)`, where `func` is the offset of
/// the rcu_head in the object, or the object itself when `head` is NULL (headless kvfree_rcu).
#[fentry(function = "kvfree_call_rcu")]
pub fn kvfree_call_rcu_fentry(ctx: FEntryContext) -> i32 {
    let head = argument(&ctx, 0);
    let second = argument(&ctx, 1);
    let object = if config!(kvfree_rcu_passes_offset) != 0 && head != 0 {
        head.wrapping_sub(second)
    } else {
        second
    };
    on_free(object);
    0
}

/// `kmem_cache_free_bulk(struct kmem_cache *s, size_t size, void **p)`. The objects are
/// forgotten in a `bpf_loop` (Linux 5.17+): a plain loop over hundreds of them, each a bucket
/// scan, is more than the verifier follows.
#[fentry(function = "kmem_cache_free_bulk")]
pub fn kmem_cache_free_bulk_fentry(ctx: FEntryContext) -> i32 {
    let mut bulk = BulkFree {
        objects: argument(&ctx, 2) as *const u64,
        size: argument(&ctx, 1),
    };
    // The callback's address must reach the helper call untouched (a BPF_PSEUDO_FUNC load).
    let callback = unsafe {
        core::mem::transmute::<unsafe extern "C" fn(u64, *mut c_void) -> i64, *mut c_void>(
            forget_one,
        )
    };
    let loops = bulk.size.min(MAX_BULK) as u32;
    unsafe { bpf_loop(loops, callback, core::ptr::addr_of_mut!(bulk).cast(), 0) };
    0
}

/// One `kmem_cache_free_bulk` call, for [`forget_one`].
#[repr(C)]
struct BulkFree {
    objects: *const u64,
    size: u64,
}

/// Forgets object `index` of a bulk free; returns 1 to end the loop.
unsafe extern "C" fn forget_one(index: u64, context: *mut c_void) -> i64 {
    let bulk = context.cast::<BulkFree>();
    let (objects, size) = unsafe { ((*bulk).objects, (*bulk).size) };
    if index >= size {
        return 1;
    }
    match unsafe { bpf_probe_read_kernel(objects.wrapping_add(index as usize)) } {
        Ok(object) => {
            on_free(object);
            0
        }
        Err(_) => 1,
    }
}

/// `kfree(const void *object)`: where classic tracepoints are the slab hooks (Linux 6.1's
/// verifier refuses the tp_btf ones), frees are followed here instead. A classic tracepoint
/// program is skipped whenever any other tracing program runs on its CPU, such as an RCU
/// callback freeing objects in a softirq on top of memleak's allocation hook, while a
/// trampoline is skipped only when the same program is interrupted by itself.
#[fentry(function = "kfree")]
pub fn kfree_fentry(ctx: FEntryContext) -> i32 {
    on_free(argument(&ctx, 0));
    0
}

/// `kmem_cache_free(struct kmem_cache *s, void *object)`, for the same reason.
#[fentry(function = "kmem_cache_free")]
pub fn kmem_cache_free_fentry(ctx: FEntryContext) -> i32 {
    on_free(argument(&ctx, 1));
    0
}
