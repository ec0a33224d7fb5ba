//! Reading classic tracepoint records, at the field offsets userspace found in tracefs
//! `format` files and wrote into `CONFIG`.
//!
//! The verifier accepts a load from a classic tracepoint's record only at an offset written in
//! the instruction: a pointer moved by a register, even one it knows holds a constant (a field
//! of the frozen `CONFIG`), is refused. So each offset a field is found at on the kernels
//! memleak knows is a load of its own, chosen by a branch the verifier settles from `CONFIG`
//! (and removes as dead code); an offset outside them is read with `bpf_probe_read_kernel`,
//! a helper call that cost the page allocation hook about 20 ns a field (docs/overhead.md).
use aya_ebpf::{EbpfContext, programs::TracePointContext};
use memleak_common::{DIRECT_FIELD_OFFSETS_32, DIRECT_FIELD_OFFSETS_64, NO_FIELD};

/// Loads the field of `$width` bits at `$offset` of the record with an instruction of its own
/// when the offset is one of the literals, else through the helper; 0 when the event has no
/// such field. Inline assembly: as plain Rust, LLVM merges the loads into one from the record
/// plus the offset, which the verifier refuses ("dereference of modified ctx ptr").
macro_rules! read_field {
    ($ctx:expr, $offset:expr, $width:literal, [$($known:literal),+] = $list:expr) => {{
        // The literals are the list userspace's tests check the recorded formats against.
        const _: () = assert!(same_offsets(&[$($known),+], &$list));
        let record = $ctx.as_ptr();
        match $offset {
            NO_FIELD => 0,
            $($known => {
                let value: u64;
                unsafe {
                    core::arch::asm!(
                        concat!("{value} = *(u", $width, " *)({record} + ", $known, ")"),
                        value = out(reg) value,
                        record = in(reg) record,
                        options(pure, readonly, nostack),
                    )
                };
                value
            })+
            other => match $width {
                64 => unsafe { $ctx.read_at::<u64>(usize::from(other)) }.unwrap_or(0),
                _ => unsafe { $ctx.read_at::<u32>(usize::from(other)) }.map_or(0, u64::from),
            },
        }
    }};
}

/// The 8-byte field at `offset`, 0 when the event has no such field.
#[inline(always)]
pub fn read_u64(ctx: &TracePointContext, offset: u16) -> u64 {
    read_field!(
        ctx,
        offset,
        64,
        [8, 16, 24, 32, 40, 48] = DIRECT_FIELD_OFFSETS_64
    )
}

/// The 4-byte field at `offset`, 0 when the event has no such field.
#[inline(always)]
pub fn read_u32(ctx: &TracePointContext, offset: u16) -> u32 {
    read_field!(
        ctx,
        offset,
        32,
        [8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48] = DIRECT_FIELD_OFFSETS_32
    ) as u32
}

/// Whether the loads' offsets are the shared list, in order (slices' `==` is not const).
const fn same_offsets(loaded: &[u16], listed: &[u16]) -> bool {
    if loaded.len() != listed.len() {
        return false;
    }
    let mut i = 0;
    while i < loaded.len() {
        if loaded[i] != listed[i] {
            return false;
        }
        i += 1;
    }
    true
}
