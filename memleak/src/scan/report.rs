//! The scan report: built from a [`CacheScan`]; `output` renders it.
use serde::{Deserialize, Serialize};

use super::CacheScan;
use crate::{
    symbols::{Frame, KernelSymbolizer},
    util::build::Producer,
};

#[derive(Debug, Serialize, Deserialize)]
pub struct ScanReport {
    /// The memleak that wrote the report (absent from older reports: `unknown`).
    #[serde(default)]
    pub memleak: Producer,
    pub kernel: String,
    /// The cache as named on the command line.
    pub cache: String,
    /// The `struct kmem_cache` actually scanned: another name when SLUB merged `cache` into it.
    pub scanned_cache: String,
    pub merged: bool,
    /// Other caches whose objects share these slabs (SLUB merged them): their objects are
    /// scanned too.
    pub shares_slabs_with: Vec<String>,
    pub object_size: u32,
    /// Object stride in the slab (object plus metadata and padding).
    pub slot_size: u32,
    pub slabs: u64,
    /// In-use objects read (slots minus those on their slab's freelist).
    pub objects: u64,
    /// Slots on their slab's freelist, left out.
    pub free_objects: u64,
    /// In-use objects according to the slabs' counters (objects cached per CPU count as in
    /// use here but are free).
    pub inuse_by_counters: u64,
    pub unreadable_pages: u64,
    pub broken_freelists: u64,
    /// Reads of `struct slab`s and slab pages that failed (pages freed while the scan ran).
    pub failed_reads: u64,
    /// Objects holding no informative byte (all zeros, say).
    pub empty_objects: u64,
    pub sampled: u64,
    pub similarity_percent: u8,
    #[serde(with = "crate::util::hex")]
    pub page_offset_base: u64,
    #[serde(with = "crate::util::hex")]
    pub vmemmap_base: u64,
    pub read_ms: u64,
    pub scan_ms: u64,
    /// Groups of similar objects, largest first.
    pub groups: Vec<GroupReport>,
    /// After a trace: how the traced allocations in this cache compare with the largest group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marking: Option<Marking>,
    /// The groups' bytes and strings were left out (`--no-contents`).
    #[serde(default)]
    pub contents_withheld: bool,
}

impl ScanReport {
    /// Leaves out every group's bytes and strings (`--no-contents`): slab objects can hold
    /// keys, passwords, paths and user data. Sizes, addresses and the kernel symbols that
    /// words of an object point to stay, as the grouping and the verdict rest on them.
    pub fn withhold_contents(&mut self) {
        for group in &mut self.groups {
            group.contents.clear();
            group.strings.clear();
        }
        self.contents_withheld = true;
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GroupReport {
    /// Objects similar to the representative.
    pub objects: u64,
    /// Share of the cache's in-use objects, in percent.
    pub share_percent: f64,
    pub bytes: u64,
    #[serde(with = "crate::util::hex")]
    pub representative: u64,
    /// Sampled objects similar to the representative, of `sampled`.
    pub sample_support: u64,
    /// The representative's bytes, as hex.
    pub contents: String,
    /// Pointer-sized words of the representative that name kernel symbols.
    pub symbols: Vec<WordSymbol>,
    /// Runs of printable ASCII, 4 characters or more.
    pub strings: Vec<ObjectString>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WordSymbol {
    pub offset: usize,
    pub frame: Frame,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ObjectString {
    pub offset: usize,
    pub text: String,
}

/// How the traced allocations compare with the largest group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marking {
    /// Outstanding traced allocations found among the cache's in-use objects.
    pub traced: u64,
    /// Those similar to the largest group's representative.
    pub marked: u64,
    /// The call site with the most marked allocations (then the most traced), if any is marked.
    pub suspected: Option<Suspect>,
    /// Call sites with allocations in the cache, by marked, then traced allocations (at most 5).
    pub sites: Vec<Suspect>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Suspect {
    pub call_site: Frame,
    pub marked: u64,
    pub traced: u64,
}

pub fn build(scan: &CacheScan, kernel: &str, marking: Option<Marking>) -> ScanReport {
    let objects = &scan.objects;
    let total = objects.len() as u64;
    let mut symbolizer = KernelSymbolizer::new();
    let words: Vec<u64> = scan
        .clustering
        .groups
        .iter()
        .flat_map(|group| kernel_words(objects.object(group.representative)))
        .map(|(_, word)| word)
        .collect();
    if let Err(error) = symbolizer.resolve(words) {
        log::warn!("symbolizing object contents: {error:#}");
    }
    let groups = scan
        .clustering
        .groups
        .iter()
        .map(|group| {
            let bytes = objects.object(group.representative);
            GroupReport {
                objects: group.members,
                share_percent: percent(group.members, total),
                bytes: group.members * u64::from(scan.cache.size),
                representative: objects.addresses[group.representative],
                sample_support: group.sample_support,
                contents: bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
                symbols: kernel_words(bytes)
                    .filter_map(|(offset, word)| {
                        let frame = symbolizer.frame(word);
                        frame
                            .symbol
                            .is_some()
                            .then_some(WordSymbol { offset, frame })
                    })
                    .collect(),
                strings: strings(bytes),
            }
        })
        .collect();
    ScanReport {
        memleak: Producer::this(),
        kernel: kernel.to_owned(),
        cache: scan.wanted.clone(),
        scanned_cache: scan.cache.name.clone(),
        merged: scan.cache.name != scan.wanted,
        shares_slabs_with: scan.shares_slabs_with.clone(),
        object_size: scan.cache.object_size,
        slot_size: scan.cache.size,
        slabs: objects.slabs,
        objects: total,
        free_objects: objects.free,
        inuse_by_counters: objects.inuse,
        unreadable_pages: objects.unreadable_pages,
        broken_freelists: objects.broken_freelists,
        failed_reads: scan.failed_reads,
        empty_objects: scan.clustering.empty,
        sampled: scan.clustering.sampled,
        similarity_percent: scan.similarity.percent,
        page_offset_base: scan.bases.page_offset,
        vmemmap_base: scan.bases.vmemmap,
        read_ms: scan.read_time.as_millis() as u64,
        scan_ms: scan.total_time.as_millis() as u64,
        groups,
        marking,
        contents_withheld: false,
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 1000.0 / whole as f64).round() / 10.0
    }
}

/// Aligned 8-byte words that hold kernel image or module addresses (the top 2 GiB).
fn kernel_words(bytes: &[u8]) -> impl Iterator<Item = (usize, u64)> + '_ {
    bytes
        .as_chunks::<8>()
        .0
        .iter()
        .enumerate()
        .filter_map(|(index, &word)| {
            let word = u64::from_le_bytes(word);
            (word >= 0xffff_ffff_8000_0000 && word != u64::MAX).then_some((index * 8, word))
        })
}

/// Runs of at least 4 printable ASCII characters, except those inside kernel pointers (whose
/// low bytes are often printable by chance).
fn strings(bytes: &[u8]) -> Vec<ObjectString> {
    let (words, _) = bytes.as_chunks::<8>();
    let in_pointer = |first: usize, end: usize| {
        (first / 8..end.div_ceil(8)).all(|word| {
            words
                .get(word)
                .is_some_and(|&word| u64::from_le_bytes(word) >= 0xffff_8000_0000_0000)
        })
    };
    let mut found = Vec::new();
    let mut start = None;
    for (index, &byte) in bytes.iter().chain(std::iter::once(&0)).enumerate() {
        let printable = byte.is_ascii_graphic() || byte == b' ';
        match (printable, start) {
            (true, None) => start = Some(index),
            (false, Some(first)) => {
                if index - first >= 4 && !in_pointer(first, index) {
                    found.push(ObjectString {
                        offset: first,
                        text: String::from_utf8_lossy(&bytes[first..index]).into_owned(),
                    });
                }
                start = None;
            }
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_strings_and_kernel_words() {
        let mut bytes = vec![0u8; 32];
        bytes[8..16].copy_from_slice(&0xffff_ffff_8123_4567u64.to_le_bytes());
        bytes[16..24].copy_from_slice(&0xffff_8880_0000_1000u64.to_le_bytes());
        bytes[24..30].copy_from_slice(b"leaky!");
        // Printable low bytes of a pointer are not a string.
        bytes[16..20].copy_from_slice(b"@nUJ");
        let words: Vec<(usize, u64)> = kernel_words(&bytes).collect();
        assert_eq!(words, [(8, 0xffff_ffff_8123_4567)]);
        let found = strings(&bytes);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].offset, found[0].text.as_str()), (24, "leaky!"));
        assert_eq!(percent(71, 100), 71.0);
        assert_eq!(percent(1, 3), 33.3);
    }
}
