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

use kmemleak::{cluster::cluster, parse::parse};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = parse(&text);
    assert!(parsed.truncated_records() <= parsed.objects.len());

    let clusters = cluster(&parsed.objects);
    let clustered: u64 = clusters.iter().map(|cluster| cluster.count).sum();
    assert_eq!(
        clustered,
        parsed.objects.len() as u64,
        "every object in one cluster"
    );
    let mut previous_rank = u128::MAX;
    for cluster in &clusters {
        assert!(cluster.count > 0);
        assert_eq!(cluster.sizes.values().sum::<u64>(), cluster.count);
        assert!(
            cluster
                .processes
                .iter()
                .map(|process| process.count)
                .sum::<u64>()
                <= cluster.count
        );
        let rank = u128::from(cluster.count) * u128::from(cluster.bytes);
        assert!(
            rank <= previous_rank,
            "clusters ranked by count times bytes"
        );
        previous_rank = rank;
        if let Some(suspect) = cluster.suspect() {
            assert_eq!(Some(suspect), cluster.frames.first());
        }
        for frame in &cluster.frames {
            let _ = frame.to_string();
        }
    }

    // Cutting the input anywhere (where the first bytes say) never adds objects.
    if let [high, low, ..] = data {
        let mut end = usize::from(u16::from_be_bytes([*high, *low])) % (text.len() + 1);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        assert!(parse(&text[..end]).objects.len() <= parsed.objects.len());
    }
});
