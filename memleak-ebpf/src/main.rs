//! memleak's eBPF programs: they keep a table of outstanding kernel allocations.
//!
//! Entry points are thin: each hook module (slab, page, vmalloc, percpu, user) reads its tracepoint's arguments and hands them to
//! [`tracker`], which owns the table, the sampling decision and the stack capture.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod classic;
mod free_paths;
mod maps;
mod page;
mod percpu;
mod scan;
mod slab;
mod tracker;
mod user;
mod vmalloc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
