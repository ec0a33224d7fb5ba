//! Arbitrary bytes through the kmemleak report parser and the clustering: nothing may panic,
//! and the report's counts must add up.
//!
//! Run from the workspace root, seeded with the test samples:
//! `cargo +nightly fuzz run kmemleak_parse fuzz/corpus/kmemleak_parse memleak/testdata/kmemleak`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| memleak::kmemleak::invariants::check(data));
