//! Content similarity of slab objects, and the largest groups of similar objects in a cache.
//!
//! Leaked objects keep the contents they were last written with: pointers to the same ops
//! tables, the same magic values and strings. Two objects are similar when at least a given
//! share of their informative bytes are equal, where the informative bytes are the positions
//! at which either object holds something other than zero, all-ones or a slab poison or red
//! zone value.
//!
//! Clustering is sample, then confirm: among a random sample of a few thousand objects, the
//! object similar to the most others represents the largest group; its sampled neighbours are
//! set aside and the next group is found the same way. One linear pass over every object then
//! counts the members of each group.

/// Default share of informative bytes two similar objects have in common (sysAK's value).
pub const DEFAULT_THRESHOLD: f64 = 0.65;

/// Bytes that say nothing about who wrote an object: zero, all-ones, and SLUB's poison
/// (`POISON_FREE`, `POISON_INUSE`, `POISON_END`) and red zone (`SLUB_RED_ACTIVE`,
/// `SLUB_RED_INACTIVE`) values.
const UNINFORMATIVE: [u8; 7] = [0x00, 0xff, 0x6b, 0x5a, 0xa5, 0xcc, 0xbb];

const INFORMATIVE: [bool; 256] = {
    let mut table = [true; 256];
    let mut index = 0;
    while index < UNINFORMATIVE.len() {
        table[UNINFORMATIVE[index] as usize] = false;
        index += 1;
    }
    table
};

pub fn is_informative(byte: u8) -> bool {
    INFORMATIVE[byte as usize]
}

/// The top bit of every byte of a word: comparisons work on 8 bytes at once and mark each
/// byte's result in its top bit.
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// The top bit of each informative byte of `word`.
fn informative_bytes(word: u64) -> u64 {
    word.to_le_bytes()
        .into_iter()
        .enumerate()
        .filter(|&(_, byte)| is_informative(byte))
        .fold(0, |mask, (index, _)| mask | 0x80 << (index * 8))
}

/// The top bit of each byte where `a` and `b` are equal.
fn equal_bytes(a: u64, b: u64) -> u64 {
    let differ = a ^ b;
    // Per byte: bit 7 is set when the low 7 bits are not all zero (no carry crosses bytes),
    // or when bit 7 itself is set.
    let nonzero = ((differ & !HIGH_BITS).wrapping_add(!HIGH_BITS) | differ) & HIGH_BITS;
    !nonzero & HIGH_BITS
}

/// An object's bytes as little-endian words; a partial last word is padded with zeros, which
/// are not informative and so change no comparison.
fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks(8).map(|chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        u64::from_le_bytes(word)
    })
}

/// An object to compare others with: its words and the informative bytes of each.
#[derive(Debug, Clone)]
pub struct Pattern {
    words: Vec<u64>,
    informative: Vec<u64>,
}

impl Pattern {
    pub fn new(bytes: &[u8]) -> Self {
        let words: Vec<u64> = words(bytes).collect();
        let informative = words.iter().map(|&word| informative_bytes(word)).collect();
        Self { words, informative }
    }

    /// Equal and total informative positions between the pattern and `other` (same length).
    pub fn compare(&self, other: &[u8]) -> (u32, u32) {
        self.count(words(other).map(|word| (word, None)))
    }

    /// [`Self::compare`] with another pattern, whose informative bytes are known.
    fn compare_pattern(&self, other: &Pattern) -> (u32, u32) {
        self.count(
            other
                .words
                .iter()
                .zip(&other.informative)
                .map(|(&word, &informative)| (word, Some(informative))),
        )
    }

    fn count(&self, theirs: impl Iterator<Item = (u64, Option<u64>)>) -> (u32, u32) {
        let (mut equal, mut union) = (0, 0);
        for ((&mine, &my_informative), (their_word, their_informative)) in
            self.words.iter().zip(&self.informative).zip(theirs)
        {
            if mine == their_word {
                let count = my_informative.count_ones();
                equal += count;
                union += count;
                continue;
            }
            let either =
                my_informative | their_informative.unwrap_or_else(|| informative_bytes(their_word));
            union += either.count_ones();
            equal += (equal_bytes(mine, their_word) & either).count_ones();
        }
        (equal, union)
    }

    /// Whether `other` is similar: at least `threshold` of the informative positions equal.
    /// Objects with no informative byte between them are not similar to anything.
    pub fn similar(&self, other: &[u8], threshold: f64) -> bool {
        meets(self.compare(other), threshold)
    }
}

fn meets((equal, union): (u32, u32), threshold: f64) -> bool {
    union > 0 && f64::from(equal) >= threshold * f64::from(union)
}

/// Whether an object holds any informative byte.
pub fn has_content(object: &[u8]) -> bool {
    object.iter().any(|&byte| is_informative(byte))
}

/// One group of similar objects.
#[derive(Debug, Clone)]
pub struct Group {
    /// Index of the representative object.
    pub representative: usize,
    /// Objects similar to the representative (and not to a larger group's).
    pub members: u64,
    /// Sampled objects similar to the representative.
    pub sample_support: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Clustering {
    /// Largest first.
    pub groups: Vec<Group>,
    pub sampled: u64,
    /// Objects without any informative byte (all zeros, say): in no group.
    pub empty: u64,
}

/// Settings of [`cluster`].
#[derive(Debug, Clone, Copy)]
pub struct ClusterSettings {
    pub threshold: f64,
    /// Groups to find at most.
    pub max_groups: usize,
    /// A group needs at least this many similar sampled objects (besides its representative)
    /// and this share of the sample.
    pub min_support: u64,
    pub min_sample_share: f64,
    /// Budget of byte comparisons for the sample's all-pairs pass.
    pub sample_budget: u64,
    pub max_sample: usize,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
            max_groups: 3,
            min_support: 2,
            min_sample_share: 0.01,
            sample_budget: 400_000_000,
            max_sample: 2_000,
        }
    }
}

/// Finds the largest groups of similar objects among the objects in `bytes`, `size` bytes
/// each.
pub fn cluster(bytes: &[u8], size: usize, settings: &ClusterSettings) -> Clustering {
    if size == 0 || bytes.len() < size {
        return Clustering::default();
    }
    let count = bytes.len() / size;
    let object = |index: usize| &bytes[index * size..(index + 1) * size];
    let by_budget = (settings.sample_budget as f64 / size as f64).sqrt() as usize;
    let sample_len = count.min(settings.max_sample.min(by_budget.max(200)));
    let sample: Vec<usize> = sample_indices(count, sample_len)
        .into_iter()
        .filter(|&index| has_content(object(index)))
        .collect();
    let neighbours = Neighbours::of(&sample, object, settings.threshold);
    let needed = settings
        .min_support
        .max((settings.min_sample_share * sample.len() as f64).ceil() as u64);
    let mut taken = BitSet::new(sample.len());
    let mut found: Vec<(usize, u64)> = Vec::new();
    while found.len() < settings.max_groups {
        let best = (0..sample.len())
            .filter(|&i| !taken.contains(i))
            .map(|i| (neighbours.row(i).count_without(&taken), i))
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let Some((support, i)) = best else { break };
        if support < needed {
            break;
        }
        taken.union_with(neighbours.row(i));
        taken.insert(i);
        found.push((sample[i], support));
    }
    let patterns: Vec<Pattern> = found
        .iter()
        .map(|&(index, _)| Pattern::new(object(index)))
        .collect();
    let mut members = vec![0u64; patterns.len()];
    let mut empty = 0;
    for index in 0..count {
        let candidate = object(index);
        if !has_content(candidate) {
            empty += 1;
            continue;
        }
        if let Some(group) = patterns
            .iter()
            .position(|pattern| pattern.similar(candidate, settings.threshold))
        {
            members[group] += 1;
        }
    }
    let mut groups: Vec<Group> = found
        .iter()
        .zip(members)
        .map(|(&(representative, sample_support), members)| Group {
            representative,
            members,
            sample_support,
        })
        .collect();
    groups.sort_by(|a, b| {
        b.members
            .cmp(&a.members)
            .then(a.representative.cmp(&b.representative))
    });
    Clustering {
        groups,
        sampled: sample.len() as u64,
        empty,
    }
}

/// `len` distinct indices below `count`, chosen by a fixed-seed generator (Floyd's
/// algorithm), in ascending order: the same objects give the same report.
fn sample_indices(count: usize, len: usize) -> Vec<usize> {
    if len >= count {
        return (0..count).collect();
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |bound: usize| {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % bound as u64) as usize
    };
    let mut chosen = hashbrown::HashSet::with_capacity(len);
    for upper in count - len..count {
        let pick = next(upper + 1);
        if !chosen.insert(pick) {
            chosen.insert(upper);
        }
    }
    let mut indices: Vec<usize> = chosen.into_iter().collect();
    indices.sort_unstable();
    indices
}

/// Which sampled objects are similar to which: one bit row per sampled object.
struct Neighbours {
    rows: Vec<BitSet>,
}

impl Neighbours {
    fn of<'a>(sample: &[usize], object: impl Fn(usize) -> &'a [u8], threshold: f64) -> Self {
        let mut rows: Vec<BitSet> = (0..sample.len())
            .map(|_| BitSet::new(sample.len()))
            .collect();
        let patterns: Vec<Pattern> = sample
            .iter()
            .map(|&index| Pattern::new(object(index)))
            .collect();
        for i in 0..sample.len() {
            for j in i + 1..sample.len() {
                if meets(patterns[i].compare_pattern(&patterns[j]), threshold) {
                    rows[i].insert(j);
                    rows[j].insert(i);
                }
            }
        }
        Self { rows }
    }

    fn row(&self, index: usize) -> &BitSet {
        &self.rows[index]
    }
}

struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
        }
    }

    fn insert(&mut self, index: usize) {
        self.words[index / 64] |= 1 << (index % 64);
    }

    fn contains(&self, index: usize) -> bool {
        self.words[index / 64] & (1 << (index % 64)) != 0
    }

    fn union_with(&mut self, other: &BitSet) {
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= theirs;
        }
    }

    /// Members of `self` not in `excluded`.
    fn count_without(&self, excluded: &BitSet) -> u64 {
        self.words
            .iter()
            .zip(&excluded.words)
            .map(|(mine, theirs)| u64::from((mine & !theirs).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-byte object like a leaked one: two per-object pointers, a type, a size, a string.
    fn leaked_like(serial: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(0xffff_8880_1000_0000 + serial * 64).to_le_bytes());
        bytes.extend_from_slice(&(0xffff_8880_2000_0000 + serial * 64).to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&16u64.to_le_bytes());
        bytes.extend_from_slice(&[0; 16]);
        bytes.extend_from_slice(b"memleak-fixture!");
        bytes
    }

    fn random_object(state: &mut u64, size: usize) -> Vec<u8> {
        (0..size)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                *state as u8
            })
            .collect()
    }

    fn flat(objects: &[Vec<u8>]) -> Vec<u8> {
        objects.concat()
    }

    #[test]
    fn uninformative_bytes_are_ignored() {
        let a = [0u8, 0xff, 0x6b, 0x41, 0x42, 0x43, 0x44, 0x45];
        let b = [0x5a, 0xa5, 0xcc, 0x41, 0x42, 0x43, 0x44, 0x46];
        let pattern = Pattern::new(&a);
        assert_eq!(pattern.compare(&b), (4, 5));
        assert!(pattern.similar(&b, 0.65));
        assert!(!pattern.similar(&b, 0.9));
    }

    #[test]
    fn word_comparisons_agree_with_byte_comparisons() {
        let mut state = 11;
        for size in [8, 12, 64, 61] {
            for _ in 0..200 {
                let a = random_object(&mut state, size);
                let mut b = random_object(&mut state, size);
                // Some equal bytes and some uninformative ones on both sides.
                for index in (0..size).step_by(3) {
                    b[index] = a[index];
                }
                for index in (0..size).step_by(5) {
                    b[index] = 0;
                }
                let expected = a.iter().zip(&b).fold((0, 0), |(equal, union), (&x, &y)| {
                    let counts = is_informative(x) || is_informative(y);
                    (
                        equal + u32::from(counts && x == y),
                        union + u32::from(counts),
                    )
                });
                assert_eq!(Pattern::new(&a).compare(&b), expected, "size {size}");
                assert_eq!(
                    Pattern::new(&a).compare_pattern(&Pattern::new(&b)),
                    expected,
                    "size {size}"
                );
            }
        }
    }

    #[test]
    fn comparison_is_symmetric() {
        let mut state = 7;
        for _ in 0..100 {
            let a = random_object(&mut state, 24);
            let mut b = random_object(&mut state, 24);
            b[..8].copy_from_slice(&a[..8]);
            assert_eq!(Pattern::new(&a).compare(&b), Pattern::new(&b).compare(&a));
        }
    }

    #[test]
    fn all_zero_objects_form_no_group() {
        let bytes = vec![0u8; 64 * 5000];
        let clustering = cluster(&bytes, 64, &ClusterSettings::default());
        assert!(clustering.groups.is_empty());
        assert_eq!(clustering.empty, 5000);
        assert!(!Pattern::new(&[0; 8]).similar(&[0; 8], 0.65));
    }

    #[test]
    fn all_random_objects_form_no_group() {
        let mut state = 0x1234_5678;
        let objects: Vec<Vec<u8>> = (0..5000).map(|_| random_object(&mut state, 64)).collect();
        let clustering = cluster(&flat(&objects), 64, &ClusterSettings::default());
        assert!(clustering.groups.is_empty(), "{:?}", clustering.groups);
        assert_eq!(clustering.empty, 0);
    }

    #[test]
    fn finds_the_dominant_pattern_among_noise() {
        let mut state = 99;
        let mut objects = Vec::new();
        for serial in 0..30_000 {
            if serial % 10 < 7 {
                objects.push(leaked_like(serial));
            } else {
                objects.push(random_object(&mut state, 64));
            }
        }
        let bytes = flat(&objects);
        let clustering = cluster(&bytes, 64, &ClusterSettings::default());
        let top = &clustering.groups[0];
        assert_eq!(top.members, 21_000);
        assert!(objects[top.representative].ends_with(b"memleak-fixture!"));
        assert!(clustering.sampled >= 1_000);
    }

    #[test]
    fn two_equal_groups_are_both_found() {
        let mut objects = Vec::new();
        for serial in 0..20_000u64 {
            let mut object = leaked_like(serial);
            if serial % 2 == 1 {
                object[48..].copy_from_slice(b"another-leaker!!");
                object[16..24].copy_from_slice(&7u64.to_le_bytes());
                object[24..32].copy_from_slice(&0x77u64.to_le_bytes());
            }
            objects.push(object);
        }
        let clustering = cluster(&flat(&objects), 64, &ClusterSettings::default());
        assert!(clustering.groups.len() >= 2, "{:?}", clustering.groups);
        assert_eq!(clustering.groups[0].members, 10_000);
        assert_eq!(clustering.groups[1].members, 10_000);
        let texts: Vec<&[u8]> = clustering.groups[..2]
            .iter()
            .map(|group| &objects[group.representative][48..])
            .collect();
        assert!(texts.contains(&&b"memleak-fixture!"[..]));
        assert!(texts.contains(&&b"another-leaker!!"[..]));
    }

    #[test]
    fn objects_alternating_with_the_sample_stride_are_still_found() {
        // Adversarial for stride sampling: every second object holds the pattern.
        let mut state = 5;
        let objects: Vec<Vec<u8>> = (0..40_000u64)
            .map(|serial| {
                if serial % 2 == 0 {
                    leaked_like(serial)
                } else {
                    random_object(&mut state, 64)
                }
            })
            .collect();
        let clustering = cluster(&flat(&objects), 64, &ClusterSettings::default());
        assert_eq!(clustering.groups[0].members, 20_000);
    }

    #[test]
    fn a_single_repeated_pair_is_not_a_group() {
        let mut state = 3;
        let mut objects: Vec<Vec<u8>> = (0..5000).map(|_| random_object(&mut state, 64)).collect();
        objects[10] = objects[20].clone();
        let clustering = cluster(&flat(&objects), 64, &ClusterSettings::default());
        assert!(clustering.groups.is_empty());
    }

    #[test]
    fn the_sample_is_as_large_as_the_comparison_budget_allows_and_at_least_200() {
        let objects: Vec<Vec<u8>> = (0..5_000).map(leaked_like).collect();
        let bytes = flat(&objects);
        // The all-pairs pass compares `sampled² × size` bytes at most: 300 objects of 64 bytes
        // for this budget; never fewer than 200, never more than `max_sample`.
        for (budget, sampled) in [(64 * 300 * 300, 300), (0, 200), (u64::MAX, 2_000)] {
            let settings = ClusterSettings {
                sample_budget: budget,
                ..ClusterSettings::default()
            };
            let clustering = cluster(&bytes, 64, &settings);
            assert_eq!(clustering.sampled, sampled, "budget {budget}");
            assert_eq!(clustering.groups[0].members, 5_000, "budget {budget}");
        }
    }

    #[test]
    fn no_whole_object_makes_an_empty_clustering_and_one_object_is_sampled() {
        let object = leaked_like(1);
        for (bytes, size) in [(&object[..], 0), (&object[..63], 64), (&[][..], 64)] {
            let clustering = cluster(bytes, size, &ClusterSettings::default());
            assert!(clustering.groups.is_empty(), "size {size}");
            assert_eq!(
                (clustering.sampled, clustering.empty),
                (0, 0),
                "size {size}"
            );
        }
        let clustering = cluster(&object, 64, &ClusterSettings::default());
        assert_eq!((clustering.sampled, clustering.empty), (1, 0));
        // Alone, it has no similar object to support a group.
        assert!(clustering.groups.is_empty());
    }

    /// `count` objects: the first `alike` of one pattern, the rest random.
    fn alike_among_random(alike: u64, count: u64) -> Vec<u8> {
        let mut state = 17;
        let objects: Vec<Vec<u8>> = (0..count)
            .map(|serial| {
                if serial < alike {
                    leaked_like(serial)
                } else {
                    random_object(&mut state, 64)
                }
            })
            .collect();
        flat(&objects)
    }

    #[test]
    fn a_group_needs_its_share_of_the_sample_and_exactly_that_is_enough() {
        // Half of the 1,000 sampled objects: 500 besides the representative.
        let settings = ClusterSettings {
            min_sample_share: 0.5,
            ..ClusterSettings::default()
        };
        let found = cluster(&alike_among_random(501, 1_000), 64, &settings);
        assert_eq!(found.sampled, 1_000);
        assert_eq!(found.groups.len(), 1);
        assert_eq!(
            (found.groups[0].sample_support, found.groups[0].members),
            (500, 501)
        );
        let short_by_one = cluster(&alike_among_random(500, 1_000), 64, &settings);
        assert!(short_by_one.groups.is_empty(), "{:?}", short_by_one.groups);
    }

    #[test]
    fn at_most_max_groups_are_found() {
        let objects: Vec<Vec<u8>> = (0..3_000u64)
            .map(|serial| {
                let mut object = leaked_like(serial);
                let variant = serial % 3;
                object[16..32].fill(0x10 + variant as u8);
                object[48..].fill(0x40 + variant as u8);
                object
            })
            .collect();
        let bytes = flat(&objects);
        for max_groups in 1..=3 {
            let settings = ClusterSettings {
                max_groups,
                ..ClusterSettings::default()
            };
            let clustering = cluster(&bytes, 64, &settings);
            assert_eq!(clustering.groups.len(), max_groups);
            assert!(clustering.groups.iter().all(|group| group.members == 1_000));
        }
    }

    #[test]
    fn sample_indices_spread_evenly() {
        // 2,000 of a million: 200 a decile, within 4.5 standard deviations (about 60).
        let indices = sample_indices(1_000_000, 2_000);
        let mut deciles = [0u32; 10];
        for index in indices {
            deciles[index / 100_000] += 1;
        }
        assert!(
            deciles.iter().all(|&count| (140..=260).contains(&count)),
            "{deciles:?}"
        );
    }

    #[test]
    fn sample_indices_are_distinct_sorted_and_in_range() {
        let indices = sample_indices(1_000_000, 2_000);
        assert_eq!(indices.len(), 2_000);
        assert!(indices.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(*indices.last().unwrap() < 1_000_000);
        assert_eq!(sample_indices(10, 50), (0..10).collect::<Vec<_>>());
        // All but one: Floyd's first draw is from 0..=1.
        let nine = sample_indices(10, 9);
        assert_eq!(nine.len(), 9);
        assert!(nine.windows(2).all(|pair| pair[0] < pair[1]) && nine[8] < 10);
    }
}
