//! Page allocator hooks: kmem:mm_page_alloc and kmem:mm_page_free, as classic tracepoints
//! (Linux 4.7+ for BPF): their records carry the page frame number, which userspace can check
//! against /proc/kpageflags, where the tp_btf arguments carry only a `struct page *`.
//!
//! Movable pages (user memory and page cache, which the kernel migrates and reclaims) are
//! counted and skipped: a kernel leak holds unmovable or reclaimable pages. Pages allocated
//! for slabs, large kmallocs, vmalloc areas and percpu chunks are recorded here too; userspace
//! recognizes them by their stacks and counts them under their own kind only.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use memleak_common::{AllocKind, Counter, MIGRATE_MOVABLE, PAGE_SIZE, page_key};

use crate::{
    classic::{read_u32, read_u64},
    maps::config,
    tracker::{Allocation, count, on_alloc, on_page_free},
};

/// `mm_page_alloc(pfn, order, gfp_flags, migratetype)`; pfn is -1 for a failed allocation.
#[tracepoint(category = "kmem", name = "mm_page_alloc")]
pub fn page_alloc_classic(ctx: TracePointContext) -> u32 {
    try_page_alloc(&ctx);
    0
}

#[inline(always)]
fn try_page_alloc(ctx: &TracePointContext) {
    let pfn = read_u64(ctx, config!(classic.page_alloc_pfn));
    if pfn == u64::MAX {
        return;
    }
    if read_u32(ctx, config!(classic.page_alloc_migratetype)) == MIGRATE_MOVABLE {
        count(Counter::MovablePages);
        return;
    }
    let describe = || {
        // MAX_PAGE_ORDER is 10; the mask only keeps the shift in range for the verifier.
        let bytes = PAGE_SIZE << (read_u32(ctx, config!(classic.page_alloc_order)) & 15);
        Allocation {
            kind: AllocKind::Page,
            // The event names no caller: every tracked page gets its stack captured.
            call_site: 0,
            cache_id: 0,
            bytes_requested: bytes,
            bytes_allocated: bytes,
            gfp_flags: 0,
        }
    };
    on_alloc(ctx, page_key(pfn), describe, |_| None);
}

/// `mm_page_free(pfn, order)`: every page (or high-order block) returned to the allocator,
/// including those the batched free path (`mm_page_free_batched`) also reports.
#[tracepoint(category = "kmem", name = "mm_page_free")]
pub fn page_free_classic(ctx: TracePointContext) -> u32 {
    on_page_free(page_key(read_u64(&ctx, config!(classic.page_free_pfn))));
    0
}
