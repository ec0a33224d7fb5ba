//! Groups leaked objects by the code that allocated them, so that a report of thousands of
//! objects reads as a handful of call sites.
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::parse::LeakedObject;
use crate::symbols::{allocators::is_allocator_internal, frame::Frame};

/// Objects allocated through the same backtrace below the allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// `percpu` or `phys`, as the kernel labels such objects.
    pub object_type: Option<String>,
    /// The backtrace from the first frame outside the allocators outward, innermost first.
    /// The allocator frames before it are dropped: they vary between objects of one call site
    /// (a larger size takes another path through the allocator) and say nothing about the leak.
    /// All of the first object's frames when every frame is inside the allocators.
    pub frames: Vec<Frame>,
    pub count: u64,
    /// Sum of the object sizes, saturating (a corrupt size must not wrap the total).
    pub bytes: u64,
    /// Object size to number of objects of that size.
    pub sizes: BTreeMap<u64, u64>,
    /// Who allocated the objects, most objects first.
    pub processes: Vec<ProcessCount>,
    pub oldest_age_ms: Option<u64>,
    /// The leading bytes that every hex dump of the cluster shares: often a recognizable
    /// header, magic number or poison pattern. Empty when they share nothing.
    pub hex_prefix: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessCount {
    pub pid: u32,
    pub comm: String,
    pub count: u64,
    pub bytes: u64,
}

impl Cluster {
    /// The function that called into the allocator: the likely culprit.
    pub fn suspect(&self) -> Option<&Frame> {
        self.frames
            .first()
            .filter(|frame| !is_allocator_internal(frame))
    }

    /// Clusters are ranked by count times bytes: many large objects first, so that neither
    /// one huge buffer nor a flood of tiny ones hides the other.
    fn rank(&self) -> u128 {
        u128::from(self.count) * u128::from(self.bytes)
    }
}

/// Groups `objects` by object type and caller frames, ranked (ties keep the report's order).
pub fn cluster(objects: &[LeakedObject]) -> Vec<Cluster> {
    let mut slots: HashMap<ClusterKey<'_>, usize> = HashMap::new();
    let mut groups: Vec<Vec<&LeakedObject>> = Vec::new();
    for object in objects {
        let key = ClusterKey {
            object_type: object.object_type.as_deref(),
            frames: caller_frames(&object.frames)
                .iter()
                .map(SiteFrame::of)
                .collect(),
        };
        match slots.get(&key) {
            Some(&slot) => groups[slot].push(object),
            None => {
                slots.insert(key, groups.len());
                groups.push(vec![object]);
            }
        }
    }
    let mut clusters: Vec<Cluster> = groups.iter().map(|members| summarize(members)).collect();
    clusters.sort_by_key(|cluster| std::cmp::Reverse(cluster.rank()));
    clusters
}

#[derive(PartialEq, Eq, Hash)]
struct ClusterKey<'a> {
    object_type: Option<&'a str>,
    frames: Vec<SiteFrame<'a>>,
}

/// What makes two frames the same place in the code: the symbol and offset when known
/// (addresses move with KASLR between the boots a pasted report may mix), else the address.
#[derive(PartialEq, Eq, Hash)]
struct SiteFrame<'a> {
    symbol: Option<&'a str>,
    offset: Option<u64>,
    module: Option<&'a str>,
    addr: Option<u64>,
}

impl<'a> SiteFrame<'a> {
    fn of(frame: &'a Frame) -> Self {
        Self {
            symbol: frame.symbol.as_deref(),
            offset: frame.offset,
            module: frame.module.as_deref(),
            addr: if frame.symbol.is_some() {
                None
            } else {
                frame.addr
            },
        }
    }
}

/// `members` is never empty: every group starts with one object.
fn summarize(members: &[&LeakedObject]) -> Cluster {
    let first = members.first();
    let mut sizes = BTreeMap::new();
    let mut processes: BTreeMap<(u32, &str), (u64, u64)> = BTreeMap::new();
    let mut hex_prefix: Option<&[u8]> = None;
    for object in members {
        *sizes.entry(object.size).or_insert(0) += 1;
        if let Some(task) = &object.task {
            let (count, bytes) = processes.entry((task.pid, &task.comm)).or_insert((0, 0));
            *count += 1;
            *bytes = bytes.saturating_add(object.size);
        }
        if !object.hex_dump.is_empty() {
            hex_prefix = Some(match hex_prefix {
                Some(prefix) => common_prefix(prefix, &object.hex_dump),
                None => &object.hex_dump,
            });
        }
    }
    let mut processes: Vec<ProcessCount> = processes
        .into_iter()
        .map(|((pid, comm), (count, bytes))| ProcessCount {
            pid,
            comm: comm.to_owned(),
            count,
            bytes,
        })
        .collect();
    processes.sort_by_key(|process| std::cmp::Reverse(process.count));
    Cluster {
        object_type: first.and_then(|object| object.object_type.clone()),
        frames: first.map_or_else(Vec::new, |object| caller_frames(&object.frames).to_vec()),
        count: members.len() as u64,
        bytes: members
            .iter()
            .fold(0, |total: u64, object| total.saturating_add(object.size)),
        sizes,
        processes,
        oldest_age_ms: members.iter().filter_map(|object| object.age_ms).max(),
        hex_prefix: hex_prefix.unwrap_or_default().to_vec(),
    }
}

fn common_prefix<'a>(left: &'a [u8], right: &[u8]) -> &'a [u8] {
    let shared = left.iter().zip(right).take_while(|(a, b)| a == b).count();
    &left[..shared]
}

/// The frames from the first one outside the allocators on; all of them if there is none.
fn caller_frames(frames: &[Frame]) -> &[Frame] {
    match frames
        .iter()
        .position(|frame| !is_allocator_internal(frame))
    {
        Some(first_caller) => &frames[first_caller..],
        None => frames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmemleak::parse::{Task, parse};

    fn frame(symbol: &str) -> Frame {
        crate::symbols::frame::named(symbol)
    }

    fn object(size: u64, symbols: &[&str]) -> LeakedObject {
        LeakedObject {
            object_type: None,
            size,
            task: None,
            age_ms: None,
            hex_dump: Vec::new(),
            frames: symbols.iter().map(|symbol| frame(symbol)).collect(),
            truncated: false,
        }
    }

    fn suspects(clusters: &[Cluster]) -> Vec<Option<&str>> {
        clusters
            .iter()
            .map(|cluster| cluster.suspect().and_then(|frame| frame.symbol.as_deref()))
            .collect()
    }

    #[test]
    fn identical_backtraces_merge() {
        let parsed = parse(include_str!("../../testdata/kmemleak/modern.txt"));
        let clusters = cluster(&parsed.objects);
        assert_eq!(
            suspects(&clusters),
            [
                Some("reserve_crashkernel_generic"),
                Some("alloc_fdtable"),
                Some("leaky_alloc"),
                Some("leaky_percpu_init"),
            ]
        );
        let leaky = &clusters[2];
        assert_eq!(leaky.count, 2);
        assert_eq!(leaky.bytes, 128);
        assert_eq!(leaky.sizes, BTreeMap::from([(64, 2)]));
        assert_eq!(
            leaky.processes,
            [ProcessCount {
                pid: 4242,
                comm: "insmod".to_owned(),
                count: 2,
                bytes: 128
            }]
        );
        assert_eq!(leaky.frames.len(), 7);
        assert_eq!(
            leaky.suspect().map(Frame::to_string).as_deref(),
            Some("leaky_alloc+0x1c/0x40 [leaky]")
        );
    }

    #[test]
    fn different_backtraces_stay_apart() {
        let objects = [
            object(32, &["kmalloc_trace", "leaky_alloc", "leaky_init"]),
            object(32, &["kmalloc_trace", "leaky_alloc", "leaky_ioctl"]),
            object(32, &["kmalloc_trace", "other_alloc", "leaky_init"]),
        ];
        assert_eq!(cluster(&objects).len(), 3);
        let percpu = LeakedObject {
            object_type: Some("percpu".to_owned()),
            ..objects[0].clone()
        };
        assert_eq!(cluster(&[objects[0].clone(), percpu]).len(), 2);
    }

    #[test]
    fn allocator_frames_are_skipped_for_the_suspect_and_the_grouping() {
        let objects = [
            object(
                64,
                &[
                    "kmemleak_alloc",
                    "slab_post_alloc_hook",
                    "kmem_cache_alloc_lru_noprof",
                    "leaky_alloc",
                    "leaky_init",
                ],
            ),
            // A larger size from the same call site takes another way through the allocator.
            object(
                16384,
                &[
                    "kmemleak_alloc",
                    "___slab_alloc.isra.0",
                    "__kmalloc_large_node_noprof",
                    "__kvmalloc_node_noprof",
                    "kvmalloc_node",
                    "leaky_alloc",
                    "leaky_init",
                ],
            ),
            object(
                8,
                &[
                    "kmemleak_alloc_percpu",
                    "pcpu_alloc_noprof",
                    "__alloc_percpu",
                ],
            ),
        ];
        let clusters = cluster(&objects);
        assert_eq!(clusters.len(), 2);
        assert_eq!(suspects(&clusters), [Some("leaky_alloc"), None]);
        assert_eq!(clusters[0].count, 2);
        assert_eq!(clusters[0].sizes, BTreeMap::from([(64, 1), (16384, 1)]));
        assert_eq!(
            clusters[0].frames,
            [frame("leaky_alloc"), frame("leaky_init")]
        );
        // Nothing but allocator frames: all of them are kept, none is a suspect.
        assert_eq!(clusters[1].frames.len(), 3);
    }

    #[test]
    fn ranks_by_count_times_bytes_keeping_report_order_on_ties() {
        let mut objects = Vec::new();
        objects.extend((0..3).map(|_| object(100, &["three_hundreds"]))); // 3 x 300
        objects.push(object(1000, &["one_thousand"])); // 1 x 1000
        objects.extend((0..10).map(|_| object(8, &["ten_eights"]))); // 10 x 80
        objects.push(object(700, &["tie_first"])); // 1 x 700
        objects.push(object(700, &["tie_second"])); // 1 x 700
        let clusters = cluster(&objects);
        assert_eq!(
            suspects(&clusters),
            [
                Some("one_thousand"),
                Some("three_hundreds"),
                Some("ten_eights"),
                Some("tie_first"),
                Some("tie_second"),
            ]
        );
    }

    #[test]
    fn hex_prefix_is_what_every_dump_shares() {
        let with_dump = |dump: &[u8]| LeakedObject {
            hex_dump: dump.to_vec(),
            ..object(64, &["leaky_alloc"])
        };
        let objects = [
            with_dump(&[0xde, 0xad, 0xbe, 0xef, 1]),
            with_dump(&[0xde, 0xad, 0xbe, 0xef, 2]),
            // No dump (a physical object, or one cut short): it constrains nothing.
            with_dump(&[]),
            with_dump(&[0xde, 0xad, 0xbe]),
        ];
        assert_eq!(cluster(&objects)[0].hex_prefix, [0xde, 0xad, 0xbe]);
        assert_eq!(
            cluster(&objects[..2])[0].hex_prefix,
            [0xde, 0xad, 0xbe, 0xef]
        );
        let disagreeing = [with_dump(&[1, 2]), with_dump(&[2, 2])];
        assert!(cluster(&disagreeing)[0].hex_prefix.is_empty());
        assert!(cluster(&objects[2..3])[0].hex_prefix.is_empty());
    }

    #[test]
    fn frames_match_by_symbol_whatever_their_address() {
        let at = |addr: u64, symbol: Option<&str>| LeakedObject {
            frames: vec![Frame {
                addr: Some(addr),
                symbol: symbol.map(str::to_owned),
                ..frame("")
            }],
            ..object(64, &[])
        };
        // Two boots, two KASLR offsets, one call site.
        let symbolized = [
            at(0xffff_ffff_8100_0010, Some("leaky_alloc")),
            at(0xffff_ffff_9100_0010, Some("leaky_alloc")),
        ];
        assert_eq!(cluster(&symbolized).len(), 1);
        let bare = [
            at(0xffff_ffff_c000_0010, None),
            at(0xffff_ffff_c100_0010, None),
        ];
        assert_eq!(cluster(&bare).len(), 2);
    }

    #[test]
    fn sums_processes_and_ages() {
        let by = |comm: &str, pid: u32, size: u64, age_ms: Option<u64>| LeakedObject {
            task: Some(Task {
                comm: comm.to_owned(),
                pid,
            }),
            age_ms,
            ..object(size, &["leaky_alloc"])
        };
        let objects = [
            by("insmod", 10, 64, Some(5_000)),
            by("leakd", 20, 64, None),
            by("leakd", 20, 128, Some(302_000)),
            by("insmod", 10, u64::MAX, Some(1_000)),
            by("insmod", 10, 64, None),
        ];
        let clusters = cluster(&objects);
        let only = &clusters[0];
        assert_eq!(only.count, 5);
        assert_eq!(only.bytes, u64::MAX);
        assert_eq!(only.oldest_age_ms, Some(302_000));
        let processes: Vec<(u32, &str, u64)> = only
            .processes
            .iter()
            .map(|process| (process.pid, process.comm.as_str(), process.count))
            .collect();
        assert_eq!(processes, [(10, "insmod", 3), (20, "leakd", 2)]);
        assert_eq!(only.processes[0].bytes, u64::MAX);
        assert_eq!(only.processes[1].bytes, 192);
    }

    #[test]
    fn no_objects_no_clusters() {
        assert!(cluster(&[]).is_empty());
    }
}
