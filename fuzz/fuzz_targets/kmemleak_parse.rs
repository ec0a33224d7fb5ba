//! Arbitrary bytes through the kmemleak report parser and the clustering: nothing may panic,
//! and the report's counts must add up.
//!
//! memleak is a binary crate, so its parser and clustering are compiled in here from their
//! source files; they name nothing but `crate::frame` and each other.
//!
//! Run from the workspace root, seeded with the test samples:
//! `cargo +nightly fuzz run kmemleak_parse fuzz/corpus/kmemleak_parse memleak/testdata/kmemleak`
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../memleak/src/frame.rs"]
mod frame;

#[path = "../../memleak/src/kmemleak"]
mod kmemleak {
    pub mod cluster;
    pub mod parse;
}

#[path = "../kmemleak_check.rs"]
mod kmemleak_check;

fuzz_target!(|data: &[u8]| kmemleak_check::check(data));
