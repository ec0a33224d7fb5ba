//! Page allocator hooks: kmem:mm_page_alloc and kmem:mm_page_free, as classic tracepoints
//! (Linux 4.7+ for BPF): their records carry the page frame number, which userspace can check
//! against /proc/kpageflags, where the tp_btf arguments carry only a `struct page *`.
//!
//! Movable pages (user memory and page cache, which the kernel migrates and reclaims) are
//! counted and skipped: a kernel leak holds unmovable or reclaimable pages. Pages allocated
//! for slabs, large kmallocs, vmalloc areas and percpu chunks are recorded here too; userspace
//! recognizes them by their call sites (or stacks) and counts them under their own kind only.
//!
//! The event names no caller. Where userspace could read the kernel's ORC unwind tables, the
//! hook finds it by walking the page allocator's few frames (`page_callers`), and captures a
//! stack only for the first page from each caller and a sample, as the slab hooks do; else
//! every tracked page has its stack captured (about 1 µs each).
use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::tracepoint, programs::TracePointContext};
use memleak_common::{AllocKind, Counter, MIGRATE_MOVABLE, PAGE_SIZE, page_callers, page_key};

use crate::{
    classic::{read_u32, read_u64},
    maps::{PAGE_CALLERS, config},
    tracker::{Allocation, ThisCpu, count, on_alloc, on_page_free},
};

/// `mm_page_alloc(pfn, order, gfp_flags, migratetype)`; pfn is -1 for a failed allocation.
#[tracepoint(category = "kmem", name = "mm_page_alloc")]
pub fn page_alloc_classic(ctx: TracePointContext) -> u32 {
    try_page_alloc(&ctx);
    0
}

#[inline(always)]
fn try_page_alloc(ctx: &TracePointContext) {
    // The floor returns before the movable check, which bumps a counter: the tracker's own
    // check would come after it.
    if config!(return_at_once) != 0 {
        return;
    }
    let pfn = read_u64(ctx, config!(classic.page_alloc_pfn));
    if pfn == u64::MAX {
        return;
    }
    if read_u32(ctx, config!(classic.page_alloc_migratetype)) == MIGRATE_MOVABLE {
        count(Counter::MovablePages);
        return;
    }
    let describe = |cpu| {
        // MAX_PAGE_ORDER is 10; the mask only keeps the shift in range for the verifier.
        let bytes = PAGE_SIZE << (read_u32(ctx, config!(classic.page_alloc_order)) & 15);
        Allocation {
            kind: AllocKind::Page,
            // 0 (unknown): the page gets its stack captured.
            call_site: page_caller(cpu, ctx),
            cache_id: 0,
            bytes_requested: bytes,
            bytes_allocated: bytes,
            gfp_flags: 0,
        }
    };
    on_alloc(ctx, page_key(pfn), describe, |_| None);
}

/// The last fields of x86-64's `struct pt_regs`, from `ip` (at byte 128) on.
#[repr(C)]
struct RegsFromIp {
    ip: u64,
    cs: u64,
    flags: u64,
    sp: u64,
}
const PT_REGS_IP_OFFSET: u64 = 128;

/// The return address out of the page allocator, or 0 (counted) when the walk is off or
/// fails.
#[inline(always)]
fn page_caller(cpu: ThisCpu, ctx: &TracePointContext) -> u64 {
    let steps = config!(page_callers_steps);
    if steps == 0 {
        return 0;
    }
    match walk_page_allocator(cpu, ctx, steps) {
        Some(caller) => caller,
        None => {
            cpu.count(Counter::PageCallersUnknown);
            0
        }
    }
}

/// Linux 5.5+ (`bpf_probe_read_kernel`); memleak runs on 5.10 and later.
#[inline(always)]
fn walk_page_allocator(cpu: ThisCpu, ctx: &TracePointContext, steps: u32) -> Option<u64> {
    // perf_trace_run_bpf_submit stores the event's `pt_regs *` over the record's first word
    // (the common fields), which the program cannot load directly. perf_fetch_caller_regs
    // filled them with the handler's return address and its frame address
    // (`__builtin_frame_address(0)`), above which that return address must be.
    let regs = unsafe { ctx.read_at::<u64>(0) }.ok()?;
    let regs = unsafe {
        bpf_probe_read_kernel((regs.wrapping_add(PT_REGS_IP_OFFSET)) as *const RegsFromIp)
    }
    .ok()?;
    let mut slot = regs.sp.wrapping_add(8);
    let mut return_address = read_word(slot)?;
    if return_address != regs.ip {
        return None;
    }
    for _ in 0..page_callers::MAX_FRAMES {
        // The page hook does not nest in itself on a CPU, so no other walk writes the entry.
        let cached = unsafe { &mut *cpu.page_frame(return_address) };
        let size = page_callers::cached_frame_size(
            cached,
            return_address,
            config!(page_callers_base),
            steps,
            |index| PAGE_CALLERS.get(index).copied(),
        );
        match size? {
            page_callers::OUTSIDE => return Some(return_address),
            page_callers::UNWALKABLE => return None,
            distance => {
                slot = slot.wrapping_add(u64::from(distance));
                return_address = read_word(slot)?;
            }
        }
    }
    None
}

#[inline(always)]
fn read_word(address: u64) -> Option<u64> {
    unsafe { bpf_probe_read_kernel(address as *const u64) }.ok()
}

/// `mm_page_free(pfn, order)`: every page (or high-order block) returned to the allocator,
/// including those the batched free path (`mm_page_free_batched`) also reports.
#[tracepoint(category = "kmem", name = "mm_page_free")]
pub fn page_free_classic(ctx: TracePointContext) -> u32 {
    on_page_free(page_key(read_u64(&ctx, config!(classic.page_free_pfn))));
    0
}
