//! What must hold for any input to the kmemleak parser and clustering: the fuzz target's
//! checks (fuzz/fuzz_targets/kmemleak_parse.rs), replayed over the corpus on stable Rust in
//! every `./x test` (tests/tests/fuzz_corpus.rs). They panic on a violation, as fuzzers expect.
use super::{cluster::cluster, parse::parse};

/// Nothing panics, and the report's counts add up.
pub fn check(data: &[u8]) {
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
}
