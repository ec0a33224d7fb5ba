//! Reading classic tracepoint records, at the field offsets userspace found in tracefs
//! `format` files and wrote into `CONFIG`.
use aya_ebpf::programs::TracePointContext;
use memleak_common::NO_FIELD;

/// The 8-byte field at `offset`, 0 when the event has no such field.
#[inline(always)]
pub fn read_u64(ctx: &TracePointContext, offset: u16) -> u64 {
    if offset == NO_FIELD {
        return 0;
    }
    unsafe { ctx.read_at::<u64>(offset as usize) }.unwrap_or(0)
}

/// The 4-byte field at `offset`, 0 when the event has no such field.
#[inline(always)]
pub fn read_u32(ctx: &TracePointContext, offset: u16) -> u32 {
    if offset == NO_FIELD {
        return 0;
    }
    unsafe { ctx.read_at::<u32>(offset as usize) }.unwrap_or(0)
}
