//! vmalloc hooks: vmalloc:alloc_vmap_area and vmalloc:free_vmap_area_noflush (BTF
//! tracepoints, Linux 6.4+), the points where every vmalloc, vmap and module area is reserved
//! and released. They carry no call site, so every tracked area gets its stack captured.
//! Before Linux 6.4 the same two functions are followed with fexit and fentry (BPF trampolines,
//! Linux 5.5+ with kernel BTF), where the kernel has kept them out of line.
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, fentry, fexit},
    programs::{BtfTracePointContext, FEntryContext, FExitContext},
};
use memleak_common::AllocKind;

use crate::{
    maps::config,
    tracker::{Allocation, on_alloc, on_free},
};

/// `struct vmap_area` starts with `unsigned long va_start, va_end` on every kernel.
const VA_END_OFFSET: usize = 8;
/// `IS_ERR`: the top 4095 values of a pointer are error codes.
const MAX_ERRNO: u64 = 4095;

/// A vmalloc area of `size` bytes; areas carry no call site (the stack says who).
#[inline(always)]
fn vmap_area(size: u64) -> Allocation {
    Allocation {
        kind: AllocKind::Vmalloc,
        call_site: 0,
        cache_id: 0,
        bytes_requested: size as u32,
        bytes_allocated: size as u32,
        gfp_flags: 0,
    }
}

/// `alloc_vmap_area(addr, size, align, vstart, vend, failed)`.
#[btf_tracepoint(function = "alloc_vmap_area")]
pub fn vmap_alloc_btf(ctx: BtfTracePointContext) -> i32 {
    if ctx.arg::<i64>(5) != 0 {
        return 0;
    }
    let describe = |_| vmap_area(ctx.arg::<u64>(1));
    on_alloc(&ctx, ctx.arg::<u64>(0), describe, |_| None);
    0
}

/// `free_vmap_area_noflush(va_start, nr_lazy, nr_lazy_max)`: vfree and vunmap release areas
/// here (lazily purged later).
#[btf_tracepoint(function = "free_vmap_area_noflush")]
pub fn vmap_free_btf(ctx: BtfTracePointContext) -> i32 {
    on_free(ctx.arg::<u64>(0));
    0
}

/// `struct vmap_area *alloc_vmap_area(size, align, vstart, vend, node, gfp_mask[, va_flags])`,
/// on return: an area, or an error pointer. Its argument count differs between kernels (6 before
/// Linux 6.3, 7 from it), so the return value's slot comes from userspace, which counts them in
/// the kernel's BTF; a probe read takes a slot the verifier cannot check at load time.
#[fexit(function = "alloc_vmap_area")]
pub fn vmap_alloc_fexit(ctx: FExitContext) -> i32 {
    let slot = config!(alloc_vmap_area_arguments) as usize;
    let area = unsafe { bpf_probe_read_kernel(ctx.as_ptr().cast::<u64>().add(slot)) }.unwrap_or(0);
    if area == 0 || area > u64::MAX - MAX_ERRNO {
        return 0;
    }
    let read = |offset: usize| {
        unsafe { bpf_probe_read_kernel((area as *const u8).add(offset).cast::<u64>()) }.unwrap_or(0)
    };
    let start = read(0);
    let describe = |_| vmap_area(read(VA_END_OFFSET).wrapping_sub(start));
    on_alloc(&ctx, start, describe, |_| None);
    0
}

/// `free_vmap_area_noflush(struct vmap_area *va)`.
#[fentry(function = "free_vmap_area_noflush")]
pub fn vmap_free_fentry(ctx: FEntryContext) -> i32 {
    let area = unsafe { bpf_probe_read_kernel(ctx.as_ptr().cast::<u64>()) }.unwrap_or(0);
    if area != 0
        && let Ok(start) = unsafe { bpf_probe_read_kernel(area as *const u64) }
    {
        on_free(start);
    }
    0
}
