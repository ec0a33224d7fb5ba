//! Slab hooks: kmem:kmalloc, kmem:kmem_cache_alloc, kmem:kfree, kmem:kmem_cache_free.
//!
//! Each event has three entry points, in the order userspace tries them: a BTF tracepoint
//! (tp_btf, Linux 5.5+, needs kernel BTF), which reads the tracepoint's arguments as typed
//! values; a raw tracepoint (Linux 4.17+), which reads the same arguments as plain words at the
//! same cost; and a classic tracepoint (Linux 4.7+ for BPF), which reads the perf record at
//! offsets userspace found in tracefs `format` files and costs about 2.5 times as much per
//! event. Userspace loads one set.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{
        BtfTracePointContext, RawTracePointContext, TracePointContext, tracing::StackIdContext,
    },
};
use memleak_common::{AllocKind, CacheName, NO_FIELD};

use crate::{
    classic::{read_u32, read_u64},
    maps::config,
    tracker::{Allocation, ThisCpu, on_alloc, on_free},
};

/// A tracepoint's arguments as words: tp_btf and raw tracepoint programs get the same list,
/// typed for the verifier in one, untyped in the other.
trait Arguments: StackIdContext {
    fn word(&self, index: usize) -> u64;
}

impl Arguments for BtfTracePointContext {
    #[inline(always)]
    fn word(&self, index: usize) -> u64 {
        self.arg(index)
    }
}

impl Arguments for RawTracePointContext {
    #[inline(always)]
    fn word(&self, index: usize) -> u64 {
        self.arg(index)
    }
}

/// `kmalloc(call_site, ptr, bytes_req, bytes_alloc, gfp_flags[, node])`: the same order since
/// Linux 4.x (`node` from 6.1, and in `kmalloc_node` before).
#[inline(always)]
fn kmalloc<C: Arguments>(ctx: &C) {
    let describe = |_| Allocation {
        kind: AllocKind::Kmalloc,
        call_site: ctx.word(0),
        cache_id: 0,
        bytes_requested: ctx.word(2) as u32,
        bytes_allocated: ctx.word(3) as u32,
        gfp_flags: ctx.word(4) as u32,
    };
    on_alloc(ctx, ctx.word(1), describe, |_| None);
}

/// `kfree(call_site, ptr)` and `kmem_cache_free(call_site, ptr, ...)`: the object is the second
/// argument on every kernel (a cache name from 5.12, the cache from 6.1 follow it).
#[inline(always)]
fn free<C: Arguments>(ctx: &C) {
    on_free(ctx.word(1));
}

#[btf_tracepoint(function = "kmalloc")]
pub fn kmalloc_btf(ctx: BtfTracePointContext) -> i32 {
    kmalloc(&ctx);
    0
}

/// `kmem_cache_alloc(call_site, ptr, struct kmem_cache *s, gfp_flags, node)` (Linux 6.1+).
#[btf_tracepoint(function = "kmem_cache_alloc")]
pub fn kmem_cache_alloc_btf(ctx: BtfTracePointContext) -> i32 {
    let describe = |cpu| {
        let cache: *const u8 = ctx.arg(2);
        // Direct loads through the BTF-typed pointer: the verifier checks each offset against
        // struct kmem_cache, and no helper call is made.
        let read_u32 = |offset: u32| unsafe { *cache.add(offset as usize).cast::<u32>() };
        Allocation {
            kind: AllocKind::KmemCache,
            call_site: ctx.arg::<u64>(0),
            cache_id: scalar(cpu, cache),
            bytes_requested: read_u32(config!(kmem_cache_object_size_offset)),
            bytes_allocated: read_u32(config!(kmem_cache_size_offset)),
            gfp_flags: 0,
        }
    };
    on_alloc(&ctx, ctx.arg::<u64>(1), describe, cache_name);
    0
}

/// The name of the `struct kmem_cache` at `cache`.
#[inline(always)]
fn cache_name(cache: u64) -> Option<CacheName> {
    let name_ptr = unsafe {
        bpf_probe_read_kernel((cache + config!(kmem_cache_name_offset) as u64) as *const u64)
    }
    .ok()?;
    let mut name = CacheName { bytes: [0; 32] };
    unsafe { bpf_probe_read_kernel_str_bytes(name_ptr as *const u8, &mut name.bytes) }.ok()?;
    Some(name)
}

/// The address in a BTF-typed pointer, as a number the verifier lets us hash. A round trip
/// through a per-CPU word launders the type (storing a kernel pointer in a map needs
/// CAP_PERFMON, which memleak has); it is far cheaper than a probe-read helper call.
#[inline(always)]
fn scalar(cpu: ThisCpu, pointer: *const u8) -> u64 {
    let slot = cpu.scratch();
    unsafe {
        slot.cast::<*const u8>().write_volatile(pointer);
        slot.read_volatile()
    }
}

#[btf_tracepoint(function = "kfree")]
pub fn kfree_btf(ctx: BtfTracePointContext) -> i32 {
    free(&ctx);
    0
}

#[btf_tracepoint(function = "kmem_cache_free")]
pub fn kmem_cache_free_btf(ctx: BtfTracePointContext) -> i32 {
    free(&ctx);
    0
}

/// Raw `kmalloc`, and `kmalloc_node` before Linux 6.1.
#[raw_tracepoint(tracepoint = "kmalloc")]
pub fn kmalloc_raw(ctx: RawTracePointContext) -> i32 {
    kmalloc(&ctx);
    0
}

/// Raw `kmem_cache_alloc` (and `kmem_cache_alloc_node` before Linux 6.1). From Linux 6.1 its
/// third argument is the cache, read with probe reads (the word is untyped); before, the
/// arguments are kmalloc's (`call_site, ptr, bytes_req, bytes_alloc, gfp_flags`) and name no
/// cache. Userspace tells which from the kernel's BTF (`raw_cache_alloc_passes_cache`).
#[raw_tracepoint(tracepoint = "kmem_cache_alloc")]
pub fn kmem_cache_alloc_raw(ctx: RawTracePointContext) -> i32 {
    let passes_cache = config!(raw_cache_alloc_passes_cache) != 0;
    let describe = |_| {
        let (cache_id, bytes_requested, bytes_allocated) = if passes_cache {
            let cache = ctx.arg::<u64>(2);
            let read_u32 = |offset: u32| unsafe {
                bpf_probe_read_kernel((cache + offset as u64) as *const u32).unwrap_or(0)
            };
            (
                cache,
                read_u32(config!(kmem_cache_object_size_offset)),
                read_u32(config!(kmem_cache_size_offset)),
            )
        } else {
            (0, ctx.arg::<u64>(2) as u32, ctx.arg::<u64>(3) as u32)
        };
        Allocation {
            kind: AllocKind::KmemCache,
            call_site: ctx.arg::<u64>(0),
            cache_id,
            bytes_requested,
            bytes_allocated,
            gfp_flags: 0,
        }
    };
    on_alloc(&ctx, ctx.arg::<u64>(1), describe, cache_name);
    0
}

#[raw_tracepoint(tracepoint = "kfree")]
pub fn kfree_raw(ctx: RawTracePointContext) -> i32 {
    free(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "kmem_cache_free")]
pub fn kmem_cache_free_raw(ctx: RawTracePointContext) -> i32 {
    free(&ctx);
    0
}

/// Classic `kmem:kmalloc` (and `kmem:kmalloc_node` before Linux 6.1, same fields).
#[tracepoint(category = "kmem", name = "kmalloc")]
pub fn kmalloc_classic(ctx: TracePointContext) -> u32 {
    let describe = |_| Allocation {
        kind: AllocKind::Kmalloc,
        call_site: read_u64(&ctx, config!(classic.kmalloc_call_site)),
        cache_id: 0,
        bytes_requested: read_u64(&ctx, config!(classic.kmalloc_bytes_req)) as u32,
        bytes_allocated: read_u64(&ctx, config!(classic.kmalloc_bytes_alloc)) as u32,
        // 8 bytes on Linux 6.1 and 6.18, 4 (gfp_t) on 5.15: the low half either way.
        gfp_flags: read_u32(&ctx, config!(classic.kmalloc_gfp_flags)),
    };
    let key = read_u64(&ctx, config!(classic.kmalloc_ptr));
    on_alloc(&ctx, key, describe, |_| None);
    0
}

/// Classic `kmem:kmem_cache_alloc` (and `kmem:kmem_cache_alloc_node` before Linux 6.1). The
/// record names the cache but does not point at it, so the cache id is a hash of the name.
#[tracepoint(category = "kmem", name = "kmem_cache_alloc")]
pub fn kmem_cache_alloc_classic(ctx: TracePointContext) -> u32 {
    let name = || {
        let name_field = config!(classic.cache_alloc_name);
        if name_field == NO_FIELD {
            return None;
        }
        // __data_loc: the low 16 bits are the string's offset in the record.
        let data_loc = read_u64(&ctx, name_field) as u32;
        let string = unsafe { ctx.as_ptr().cast::<u8>().add((data_loc & 0xffff) as usize) };
        let mut name = CacheName { bytes: [0; 32] };
        unsafe { bpf_probe_read_kernel_str_bytes(string, &mut name.bytes) }.ok()?;
        Some(name)
    };
    let describe = |_| Allocation {
        kind: AllocKind::KmemCache,
        call_site: read_u64(&ctx, config!(classic.cache_alloc_call_site)),
        cache_id: name().map_or(0, |name| fnv1a(&name.bytes) | 1),
        bytes_requested: read_u64(&ctx, config!(classic.cache_alloc_bytes_req)) as u32,
        bytes_allocated: read_u64(&ctx, config!(classic.cache_alloc_bytes_alloc)) as u32,
        gfp_flags: 0,
    };
    let key = read_u64(&ctx, config!(classic.cache_alloc_ptr));
    on_alloc(&ctx, key, describe, |_| name());
    0
}

#[tracepoint(category = "kmem", name = "kfree")]
pub fn kfree_classic(ctx: TracePointContext) -> u32 {
    on_free(read_u64(&ctx, config!(classic.kfree_ptr)));
    0
}

#[tracepoint(category = "kmem", name = "kmem_cache_free")]
pub fn kmem_cache_free_classic(ctx: TracePointContext) -> u32 {
    on_free(read_u64(&ctx, config!(classic.cache_free_ptr)));
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
