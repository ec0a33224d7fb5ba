//! vmalloc hooks: vmalloc:alloc_vmap_area and vmalloc:free_vmap_area_noflush (BTF
//! tracepoints, Linux 6.4+), the points where every vmalloc, vmap and module area is reserved
//! and released. They carry no call site, so every tracked area gets its stack captured.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use memleak_common::AllocKind;

use crate::tracker::{Allocation, on_alloc, on_free};

/// `alloc_vmap_area(addr, size, align, vstart, vend, failed)`.
#[btf_tracepoint(function = "alloc_vmap_area")]
pub fn vmap_alloc_btf(ctx: BtfTracePointContext) -> i32 {
    if ctx.arg::<i64>(5) != 0 {
        return 0;
    }
    let describe = || {
        let size = ctx.arg::<u64>(1) as u32;
        Allocation {
            kind: AllocKind::Vmalloc,
            call_site: 0,
            cache_id: 0,
            bytes_requested: size,
            bytes_allocated: size,
            gfp_flags: 0,
        }
    };
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
