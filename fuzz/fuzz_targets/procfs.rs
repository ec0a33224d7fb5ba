//! Arbitrary bytes through the /proc and /sys parsers (meminfo, slabinfo, vmallocinfo,
//! zoneinfo, /sys/kernel/slab): they return errors, never panic, and what they return is
//! consistent (memleak::kernel::invariants::procfs).
//!
//! Run from the workspace root: `./x fuzz procfs SECONDS`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| memleak::kernel::invariants::procfs(data));
