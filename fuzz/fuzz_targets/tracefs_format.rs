//! Arbitrary bytes through memleak's tracefs format parser: it returns errors, never panics, and
//! what it returns is consistent (memleak::kernel::invariants::tracefs_format).
//!
//! Run from the workspace root: `./x fuzz tracefs_format SECONDS`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| memleak::kernel::invariants::tracefs_format(data));
