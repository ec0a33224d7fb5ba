//! memleak's eBPF programs for kernels before Linux 5.12, whose verifiers refuse any program
//! holding a BPF compare-and-swap, even in a branch that never runs ("BPF_STX uses reserved
//! fields", checked over every instruction before the program is walked): the object table
//! claims its slots with plain stores, each checked once its record is written.
#![no_std]
#![no_main]
#![feature(core_intrinsics, asm_experimental_arch)]
#![allow(internal_features)]

/// Whether table slots are claimed with plain stores (see `tracker::claim_held`).
const PLAIN_CLAIMS: bool = true;

// The same modules as main.rs.
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
