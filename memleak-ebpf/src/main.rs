//! memleak's eBPF programs: they keep a table of outstanding kernel allocations.
//!
//! Entry points are thin: each hook module (slab, page, vmalloc, percpu, user) reads its tracepoint's arguments and hands them to
//! [`tracker`], which owns the table, the sampling decision and the stack capture.
//!
//! This object claims table slots with BPF compare-and-swap (Linux 5.12+); `plain_claims.rs`
//! builds the same programs for older kernels.
#![no_std]
#![no_main]
#![feature(core_intrinsics, asm_experimental_arch)]
#![allow(internal_features)]

/// Whether table slots are claimed with plain stores (see `tracker::claim_held`).
const PLAIN_CLAIMS: bool = false;

// The same modules as plain_claims.rs, declared here so that rustfmt and the compiler
// both follow them from each root.
mod classic;
mod free_paths;
mod maps;
mod page;
mod percpu;
mod runtime;
mod scan;
mod slab;
mod tracker;
mod user;
mod vmalloc;
