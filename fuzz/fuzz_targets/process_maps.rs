//! Arbitrary bytes through memleak's process maps parser: it returns errors, never panics, and
//! what it returns is consistent (memleak::kernel::invariants::process_maps).
//!
//! Run from the workspace root: `./x fuzz process_maps SECONDS`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| memleak::kernel::invariants::process_maps(data));
