//! Arbitrary bytes through memleak's duration parser: it returns errors, never panics, and
//! what it returns is consistent (memleak::kernel::invariants::duration).
//!
//! Run from the workspace root: `./x fuzz duration SECONDS`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| memleak::kernel::invariants::duration(data));
