//! The kernel memory reader behind `memleak scan` and `trace --cache`: copies kernel memory
//! into a map on request. It is never attached to an event; userspace runs it with
//! `BPF_PROG_TEST_RUN` (raw tracepoint test runs: Linux 5.10+), and only the subcommands that
//! scan slab caches load it.
use aya_ebpf::{
    helpers::{bpf_get_current_task, generated::bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::{Array, PerCpuArray},
    programs::RawTracePointContext,
};
use memleak_common::scan::{MAX_READS_PER_RUN, READ_CHUNK_BYTES, ReadChunk, ReadRequest};

/// `BPF_F_MMAPABLE`: userspace writes the requests and reads the chunks through mappings.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// This run's requests. One entry here is a placeholder; the scanner sizes it at load time,
/// so the tracer, which never runs the reader, pays for one entry.
#[map]
pub static READ_REQUESTS: Array<ReadRequest> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Where the requests' bytes land, one chunk per request (sized at load time, like above).
#[map]
pub static READ_CHUNKS: Array<ReadChunk> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The `struct task_struct *` of the task that ran the reader last: a slab object, so an
/// address in the kernel's direct map, from which userspace starts looking for its base.
#[map]
pub static READER_TASK: Array<u64> = Array::with_max_entries(1, 0);

/// A per-CPU word whose addresses tell userspace where each CPU's per-CPU area lies: the
/// element's address on the CPU the reader runs on is the map's per-CPU pointer plus that CPU's
/// `__per_cpu_offset`, which kallsyms does not show without CONFIG_KALLSYMS_ALL.
#[map]
pub static READER_PERCPU: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `[0]`: this CPU's `READER_PERCPU` element address; `[1]`: the address of that map's
/// `struct bpf_array`, whose `pptrs[0]` is the per-CPU pointer (storing kernel pointers in a
/// map needs CAP_PERFMON, which the reader's users have).
#[map]
pub static READER_PERCPU_ADDRESSES: Array<u64> = Array::with_max_entries(2, 0);

/// Runs `ctx.arg(0)` requests of `READ_REQUESTS` (at most `MAX_READS_PER_RUN`). Linux 5.10+:
/// `BPF_PROG_TEST_RUN` of raw tracepoint programs (mmap-able array maps are 5.5+).
#[raw_tracepoint]
pub fn read_kernel_memory(ctx: RawTracePointContext) -> i32 {
    let requests: u64 = ctx.arg(0);
    if let Some(slot) = READER_TASK.get_ptr_mut(0) {
        unsafe { *slot = bpf_get_current_task() };
    }
    record_percpu_addresses();
    for index in 0..MAX_READS_PER_RUN {
        if u64::from(index) >= requests {
            break;
        }
        try_read(index);
    }
    0
}

#[inline(always)]
fn record_percpu_addresses() {
    let Some(element) = READER_PERCPU.get_ptr_mut(0) else {
        return;
    };
    let map = core::ptr::addr_of!(READER_PERCPU);
    if let Some(slot) = READER_PERCPU_ADDRESSES.get_ptr_mut(0) {
        unsafe { slot.write_volatile(element as u64) };
    }
    if let Some(slot) = READER_PERCPU_ADDRESSES.get_ptr_mut(1) {
        unsafe { slot.write_volatile(map as u64) };
    }
}

/// Copies one request's bytes; a failed read (unmapped address, bad request) zeroes the
/// request's address so that userspace can tell.
#[inline(always)]
fn try_read(index: u32) {
    let Some(request) = READ_REQUESTS.get_ptr_mut(index) else {
        return;
    };
    let (address, chunk, length) =
        unsafe { ((*request).address, (*request).chunk, (*request).length) };
    let copied = match READ_CHUNKS.get_ptr_mut(chunk) {
        Some(destination) if length as usize <= READ_CHUNK_BYTES => unsafe {
            bpf_probe_read_kernel(destination.cast(), length, address as *const _) == 0
        },
        _ => false,
    };
    if !copied {
        unsafe { (*request).address = 0 };
    }
}
