//! Slab hooks: kmem:kmalloc, kmem:kmem_cache_alloc, kmem:kfree, kmem:kmem_cache_free.
//!
//! Each event has two entry points: a BTF tracepoint (tp_btf, Linux 5.5+, needs kernel BTF),
//! which reads the tracepoint's arguments directly, and a classic tracepoint (Linux 4.7+ for
//! BPF), which reads the perf record at offsets userspace found in tracefs `format` files.
//! Userspace loads one set or the other.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use memleak_common::{AllocKind, CacheName, NO_FIELD};

use crate::{
    maps::config,
    tracker::{Allocation, on_alloc, on_free},
};

/// `kmalloc(call_site, ptr, bytes_req, bytes_alloc, gfp_flags, node)` (Linux 6.1+ argument list).
#[btf_tracepoint(function = "kmalloc")]
pub fn kmalloc_btf(ctx: BtfTracePointContext) -> i32 {
    let allocation = Allocation {
        kind: AllocKind::Kmalloc,
        call_site: ctx.arg::<u64>(0),
        key: ctx.arg::<u64>(1),
        cache_id: 0,
        bytes_requested: ctx.arg::<u64>(2) as u32,
        bytes_allocated: ctx.arg::<u64>(3) as u32,
    };
    on_alloc(&ctx, &allocation, || None);
    0
}

/// `kmem_cache_alloc(call_site, ptr, struct kmem_cache *s, gfp_flags, node)` (Linux 6.1+).
#[btf_tracepoint(function = "kmem_cache_alloc")]
pub fn kmem_cache_alloc_btf(ctx: BtfTracePointContext) -> i32 {
    // `ctx.arg(2)` would be typed `struct kmem_cache *` by the verifier, which then refuses to
    // hash it; a probe read of the same slot yields a plain number.
    let cache = unsafe { bpf_probe_read_kernel(ctx.as_ptr().cast::<u64>().add(2)) }.unwrap_or(0);
    let read_u32 = |offset: u32| unsafe {
        bpf_probe_read_kernel((cache + offset as u64) as *const u32).unwrap_or(0)
    };
    let allocation = Allocation {
        kind: AllocKind::KmemCache,
        call_site: ctx.arg::<u64>(0),
        key: ctx.arg::<u64>(1),
        cache_id: cache,
        bytes_requested: read_u32(config!(kmem_cache_object_size_offset)),
        bytes_allocated: read_u32(config!(kmem_cache_size_offset)),
    };
    on_alloc(&ctx, &allocation, || {
        let name_ptr = unsafe {
            bpf_probe_read_kernel((cache + config!(kmem_cache_name_offset) as u64) as *const u64)
        }
        .ok()?;
        let mut name = CacheName { bytes: [0; 32] };
        unsafe { bpf_probe_read_kernel_str_bytes(name_ptr as *const u8, &mut name.bytes) }.ok()?;
        Some(name)
    });
    0
}

/// `kfree(call_site, ptr)`.
#[btf_tracepoint(function = "kfree")]
pub fn kfree_btf(ctx: BtfTracePointContext) -> i32 {
    on_free(ctx.arg::<u64>(1));
    0
}

/// `kmem_cache_free(call_site, ptr, s)`.
#[btf_tracepoint(function = "kmem_cache_free")]
pub fn kmem_cache_free_btf(ctx: BtfTracePointContext) -> i32 {
    on_free(ctx.arg::<u64>(1));
    0
}

#[inline(always)]
fn read_field(ctx: &TracePointContext, offset: u16) -> u64 {
    if offset == NO_FIELD {
        return 0;
    }
    unsafe { ctx.read_at::<u64>(offset as usize) }.unwrap_or(0)
}

/// Classic `kmem:kmalloc` (and `kmem:kmalloc_node` before Linux 6.1, same fields).
#[tracepoint(category = "kmem", name = "kmalloc")]
pub fn kmalloc_classic(ctx: TracePointContext) -> u32 {
    let allocation = Allocation {
        kind: AllocKind::Kmalloc,
        call_site: read_field(&ctx, config!(classic.kmalloc_call_site)),
        key: read_field(&ctx, config!(classic.kmalloc_ptr)),
        cache_id: 0,
        bytes_requested: read_field(&ctx, config!(classic.kmalloc_bytes_req)) as u32,
        bytes_allocated: read_field(&ctx, config!(classic.kmalloc_bytes_alloc)) as u32,
    };
    on_alloc(&ctx, &allocation, || None);
    0
}

/// Classic `kmem:kmem_cache_alloc` (and `kmem:kmem_cache_alloc_node` before Linux 6.1). The
/// record names the cache but does not point at it, so the cache id is a hash of the name.
#[tracepoint(category = "kmem", name = "kmem_cache_alloc")]
pub fn kmem_cache_alloc_classic(ctx: TracePointContext) -> u32 {
    let mut name = CacheName { bytes: [0; 32] };
    let mut cache_id = 0;
    let name_field = config!(classic.cache_alloc_name);
    if name_field != NO_FIELD {
        // __data_loc: the low 16 bits are the string's offset in the record.
        let data_loc = read_field(&ctx, name_field) as u32;
        let string = unsafe { ctx.as_ptr().cast::<u8>().add((data_loc & 0xffff) as usize) };
        if unsafe { bpf_probe_read_kernel_str_bytes(string, &mut name.bytes) }.is_ok() {
            cache_id = fnv1a(&name.bytes) | 1;
        }
    }
    let allocation = Allocation {
        kind: AllocKind::KmemCache,
        call_site: read_field(&ctx, config!(classic.cache_alloc_call_site)),
        key: read_field(&ctx, config!(classic.cache_alloc_ptr)),
        cache_id,
        bytes_requested: read_field(&ctx, config!(classic.cache_alloc_bytes_req)) as u32,
        bytes_allocated: read_field(&ctx, config!(classic.cache_alloc_bytes_alloc)) as u32,
    };
    on_alloc(&ctx, &allocation, || Some(name));
    0
}

#[tracepoint(category = "kmem", name = "kfree")]
pub fn kfree_classic(ctx: TracePointContext) -> u32 {
    on_free(read_field(&ctx, config!(classic.kfree_ptr)));
    0
}

#[tracepoint(category = "kmem", name = "kmem_cache_free")]
pub fn kmem_cache_free_classic(ctx: TracePointContext) -> u32 {
    on_free(read_field(&ctx, config!(classic.cache_free_ptr)));
    0
}

/// FNV-1a over a NUL-terminated name; userspace recomputes it to match names to ids.
#[inline(always)]
fn fnv1a(bytes: &[u8; 32]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        if byte == 0 {
            break;
        }
        hash = (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
