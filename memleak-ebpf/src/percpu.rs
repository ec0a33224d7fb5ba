//! Percpu hooks: percpu:percpu_alloc_percpu, percpu:percpu_free_percpu (BTF tracepoints).
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use memleak_common::{AllocKind, PERCPU_KEY_TAG};

use crate::{
    maps::config,
    tracker::{Allocation, on_alloc, on_free},
};

/// `percpu_alloc_percpu(call_site, reserved, is_atomic, size, align, base_addr, off, ptr,
/// bytes_alloc, gfp_flags)` (Linux 6.0+ argument list; tp_btf needs 5.5+).
#[btf_tracepoint(function = "percpu_alloc_percpu")]
pub fn percpu_alloc_btf(ctx: BtfTracePointContext) -> i32 {
    let describe = |_| Allocation {
        kind: AllocKind::Percpu,
        call_site: ctx.arg::<u64>(0),
        cache_id: 0,
        bytes_requested: ctx.arg::<u64>(3) as u32,
        // Across all possible CPUs.
        bytes_allocated: ctx.arg::<u64>(8) as u32,
        gfp_flags: 0,
    };
    let ptr = ctx.arg::<u64>(7);
    if ptr != 0 {
        on_alloc(&ctx, ptr | PERCPU_KEY_TAG, describe, |_| None);
    }
    0
}

/// Before Linux 6.0: `percpu_alloc_percpu(reserved, is_atomic, size, align, base_addr, off,
/// ptr)`. No call site (the record gets a stack, which names it) and no allocated size: the
/// per-CPU size times the possible CPUs stands in for it.
#[btf_tracepoint(function = "percpu_alloc_percpu")]
pub fn percpu_alloc_btf_before_6_0(ctx: BtfTracePointContext) -> i32 {
    let describe = |_| {
        let size = ctx.arg::<u64>(2) as u32;
        Allocation {
            kind: AllocKind::Percpu,
            call_site: 0,
            cache_id: 0,
            bytes_requested: size,
            bytes_allocated: size.saturating_mul(config!(possible_cpus)),
            gfp_flags: 0,
        }
    };
    let ptr = ctx.arg::<u64>(6);
    if ptr != 0 {
        on_alloc(&ctx, ptr | PERCPU_KEY_TAG, describe, |_| None);
    }
    0
}

/// `percpu_free_percpu(base_addr, off, ptr)` (the same from Linux 5.1 on).
#[btf_tracepoint(function = "percpu_free_percpu")]
pub fn percpu_free_btf(ctx: BtfTracePointContext) -> i32 {
    let ptr = ctx.arg::<u64>(2);
    if ptr != 0 {
        on_free(ptr | PERCPU_KEY_TAG);
    }
    0
}
