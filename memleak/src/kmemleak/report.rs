//! The kmemleak report's model, laid out like `memleak trace`'s report so that
//! scripts and readers handle both alike.
use serde::{Deserialize, Serialize};

use super::{
    cluster::{self, Cluster, ProcessCount},
    parse::ParsedReport,
};
use crate::{symbols::Frame, util::build::Producer};

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    /// Always `kmemleak`: tells this report from `memleak trace`'s.
    pub source: String,
    /// The memleak that wrote the report (absent from older reports: `unknown`).
    #[serde(default)]
    pub memleak: Producer,
    /// Kernel release (`uname -r`) when read live; unknown for a saved report.
    pub kernel: Option<String>,
    pub stats: Stats,
    /// The ranked clusters, at most `--top` of them.
    pub stacks: Vec<Stack>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub objects: u64,
    /// Clusters found (before `--top`).
    pub clusters: u64,
    pub unparsed_records: u64,
    pub truncated_records: u64,
    pub bytes: u64,
}

/// One cluster: objects allocated through one backtrace.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stack {
    pub bytes: u64,
    pub count: u64,
    pub kind: String,
    /// kmemleak does not name the slab cache.
    pub cache: Option<String>,
    /// `percpu` or `phys` for the objects the kernel labels so.
    pub object_type: Option<String>,
    /// The first frame outside the allocators.
    pub suspect: Option<Frame>,
    pub sizes: Sizes,
    pub processes: Vec<ProcessCount>,
    /// Unknown on newer kernels, which print no ages.
    pub oldest_age_ms: Option<u64>,
    /// The bytes all the cluster's hex dumps start with, as `4c 45 41 4b`.
    pub hex_prefix: Option<String>,
    /// From the suspect outward, innermost first.
    pub frames: Vec<Frame>,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    pub min: u64,
    pub max: u64,
    /// Every size seen, smallest first.
    pub distinct: Vec<SizeCount>,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeCount {
    pub size: u64,
    pub count: u64,
}

pub const PROCESSES_SHOWN: usize = 5;
/// Up to this many distinct sizes are listed one by one in text.
pub const SIZES_LISTED: usize = 4;

/// Clusters `parsed` and keeps the `top` highest ranked clusters.
pub fn build(kernel: Option<String>, parsed: &ParsedReport, top: usize) -> Report {
    let clusters = cluster::cluster(&parsed.objects);
    let stats = Stats {
        objects: parsed.objects.len() as u64,
        clusters: clusters.len() as u64,
        unparsed_records: parsed.unparsed_records as u64,
        truncated_records: parsed.truncated_records() as u64,
        bytes: parsed
            .objects
            .iter()
            .fold(0, |total: u64, object| total.saturating_add(object.size)),
    };
    Report {
        source: "kmemleak".to_owned(),
        memleak: Producer::this(),
        kernel,
        stats,
        stacks: clusters.iter().take(top).map(stack).collect(),
    }
}

fn stack(cluster: &Cluster) -> Stack {
    let distinct: Vec<SizeCount> = cluster
        .sizes
        .iter()
        .map(|(&size, &count)| SizeCount { size, count })
        .collect();
    Stack {
        bytes: cluster.bytes,
        count: cluster.count,
        kind: "kmemleak".to_owned(),
        cache: None,
        object_type: cluster.object_type.clone(),
        suspect: cluster.suspect().cloned(),
        sizes: Sizes {
            min: distinct.first().map_or(0, |size| size.size),
            max: distinct.last().map_or(0, |size| size.size),
            distinct,
        },
        processes: cluster.processes.clone(),
        oldest_age_ms: cluster.oldest_age_ms,
        hex_prefix: (!cluster.hex_prefix.is_empty()).then(|| hex_bytes(&cluster.hex_prefix)),
        frames: cluster.frames.clone(),
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmemleak::parse::parse;

    const MODERN: &str = include_str!("../../testdata/kmemleak/modern.txt");

    #[test]
    fn stats_count_everything_top_leaves_out() {
        let report = build(Some("6.12.0-debug".to_owned()), &parse(MODERN), 2);
        assert_eq!(report.stats.objects, 5);
        assert_eq!(report.stats.clusters, 4);
        assert_eq!(report.stats.bytes, 64 + 64 + 1024 + 8 + 4096);
        assert_eq!(report.stacks.len(), 2);
        assert_eq!(report.stacks[0].bytes, 4096);

        // Cut in the middle of a frame line.
        let end = MODERN.find("leaky_init").expect("frame in sample") + "leaky_in".len();
        let text = format!("unreferenced object 0xZ (size 1):\n{}", &MODERN[..end]);
        let report = build(None, &parse(&text), 10);
        assert_eq!(report.stats.unparsed_records, 1);
        assert_eq!(report.stats.truncated_records, 1);
    }
}
