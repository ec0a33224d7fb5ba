//! Parsers for the /proc and /sys texts `memleak classify` samples. Pure functions: they take
//! the text, never touch the file system, and never panic on malformed input.
use std::collections::BTreeMap;

use thiserror::Error;

/// /proc/meminfo's `kB` fields, in bytes, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meminfo {
    fields: BTreeMap<String, u64>,
}

impl Meminfo {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.fields.get(name).copied()
    }

    /// The field, or 0 when this kernel does not have it (fields come and go between
    /// versions: SecPageTables is 6.0+, Unaccepted 6.5+).
    pub fn bytes(&self, name: &str) -> u64 {
        self.get(name).unwrap_or(0)
    }
}

/// Parses `Name:   1234 kB` lines. Fields without the `kB` unit (page counts such as
/// HugePages_Total) and lines that do not parse are left out.
pub fn parse_meminfo(text: &str) -> Meminfo {
    let fields = text
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            let mut words = value.split_whitespace();
            let kib: u64 = words.next()?.parse().ok()?;
            (words.next()? == "kB" && words.next().is_none())
                .then(|| (name.trim().to_owned(), kib.saturating_mul(1024)))
        })
        .collect();
    Meminfo { fields }
}

/// One slab cache as /proc/slabinfo (or /sys/kernel/slab) shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlabCache {
    pub name: String,
    pub active_objects: u64,
    pub objects: u64,
    pub object_size: u64,
    pub pages_per_slab: u64,
    pub slabs: u64,
}

impl SlabCache {
    /// The memory the cache's slabs take, which is what meminfo's SUnreclaim and SReclaimable
    /// add up.
    pub fn bytes(&self, page_size: u64) -> u64 {
        self.slabs
            .saturating_mul(self.pages_per_slab)
            .saturating_mul(page_size)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SlabinfoError {
    #[error("no `slabinfo - version:` header (is this /proc/slabinfo?)")]
    MissingHeader,
    #[error("slabinfo version {version} is not supported (2.x is)")]
    UnsupportedVersion { version: String },
}

/// A parsed /proc/slabinfo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slabinfo {
    pub caches: Vec<SlabCache>,
    /// Lines that looked like cache lines but did not parse (truncated reads, unknown layout).
    pub unparsed_lines: usize,
}

/// Parses /proc/slabinfo version 2.x:
/// `name active_objs num_objs objsize objperslab pagesperslab : tunables L B S : slabdata
/// active_slabs num_slabs sharedavail`, with any further `:` sections (the SLAB allocator's
/// `2.1 (statistics)` adds globalstat and cpustat) ignored. Cache names are read as everything
/// before the five numbers, so a name with spaces still parses.
pub fn parse_slabinfo(text: &str) -> Result<Slabinfo, SlabinfoError> {
    let mut lines = text.lines();
    let header = lines.next().ok_or(SlabinfoError::MissingHeader)?;
    let version = header
        .strip_prefix("slabinfo - version:")
        .ok_or(SlabinfoError::MissingHeader)?
        .trim();
    if !version.starts_with("2.") {
        return Err(SlabinfoError::UnsupportedVersion {
            version: version.to_owned(),
        });
    }
    let mut slabinfo = Slabinfo::default();
    for line in lines {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        match parse_slabinfo_line(line) {
            Some(cache) => slabinfo.caches.push(cache),
            None => slabinfo.unparsed_lines += 1,
        }
    }
    Ok(slabinfo)
}

fn parse_slabinfo_line(line: &str) -> Option<SlabCache> {
    let mut sections = line.split(" : ");
    let head: Vec<&str> = sections.next()?.split_whitespace().collect();
    let [name @ .., active, total, size, _per_slab, pages] = head.as_slice() else {
        return None;
    };
    if name.is_empty() {
        return None;
    }
    let slabdata = sections.find_map(|section| section.trim().strip_prefix("slabdata"))?;
    let mut slab_counts = slabdata.split_whitespace();
    let _active_slabs: u64 = slab_counts.next()?.parse().ok()?;
    Some(SlabCache {
        name: name.join(" "),
        active_objects: active.parse().ok()?,
        objects: total.parse().ok()?,
        object_size: size.parse().ok()?,
        pages_per_slab: pages.parse().ok()?,
        slabs: slab_counts.next()?.parse().ok()?,
    })
}

/// The files of one /sys/kernel/slab/NAME directory that make a [`SlabCache`], as read.
#[derive(Debug, Clone, Default)]
pub struct SysSlabFiles<'a> {
    pub objects: Option<&'a str>,
    pub total_objects: Option<&'a str>,
    pub object_size: Option<&'a str>,
    pub order: Option<&'a str>,
    pub slabs: Option<&'a str>,
}

/// Builds a cache from its sysfs files, or None when one is missing or malformed. Counts read
/// `N N0=n0 N1=n1` (a total, then per NUMA node); `order` is log2 of pages per slab.
pub fn parse_sys_slab(name: &str, files: &SysSlabFiles<'_>) -> Option<SlabCache> {
    fn total(text: Option<&str>) -> Option<u64> {
        text?.split_whitespace().next()?.parse().ok()
    }
    let order = total(files.order)?;
    Some(SlabCache {
        name: name.to_owned(),
        active_objects: total(files.objects)?,
        objects: total(files.total_objects)?,
        object_size: total(files.object_size)?,
        pages_per_slab: 1u64.checked_shl(u32::try_from(order).ok()?)?,
        slabs: total(files.slabs)?,
    })
}

/// vmalloc'd memory by caller, from /proc/vmallocinfo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmallocUsage {
    /// Bytes of pages vmalloc allocated (`pages=N`), by the caller's function name.
    pub by_caller: BTreeMap<String, u64>,
    pub lines_unparsed: usize,
}

/// Parses /proc/vmallocinfo: `0xSTART-0xEND SIZE CALLER+off/len pages=N ... vmalloc ...`.
/// Only areas with `pages=N` hold memory vmalloc allocated (the sum is meminfo's
/// VmallocUsed); ioremap and vmap areas map memory counted elsewhere, and `unpurged vm_area`
/// lines are freed areas not yet unmapped. Callers are grouped by function, without the
/// offset; a caller the kernel could not name is kept as its address.
pub fn parse_vmallocinfo(text: &str, page_size: u64) -> VmallocUsage {
    let mut usage = VmallocUsage::default();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let well_formed = words.len() >= 3
            && words[0].contains('-')
            && words[0].starts_with("0x")
            && words[1].parse::<u64>().is_ok();
        if !well_formed {
            usage.lines_unparsed += 1;
            continue;
        }
        let Some(pages) = words
            .iter()
            .find_map(|word| word.strip_prefix("pages="))
            .and_then(|pages| pages.parse::<u64>().ok())
        else {
            continue;
        };
        let caller = words[2].split('+').next().unwrap_or(words[2]);
        let bytes = usage.by_caller.entry(caller.to_owned()).or_default();
        *bytes = bytes.saturating_add(pages.saturating_mul(page_size));
    }
    usage
}

/// Free pages parked on the per-CPU lists of every zone, from /proc/zoneinfo's `count:` lines
/// (under `pagesets`). The page allocator keeps them out of MemFree until it drains the lists,
/// which a big process exit can fill with hundreds of megabytes. None when no line parses.
pub fn parse_zoneinfo_pcp_pages(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix("count:")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .reduce(u64::saturating_add)
}

/// Parses `NAME VALUE` lines, the form record.sh writes /sys/kernel/slab/*/reclaim_account and
/// the alias links in.
pub fn parse_name_values(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.trim().rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE_MEMINFO: &str = include_str!("../../testdata/classify/idle/meminfo.0");
    const IDLE_SLABINFO: &str = include_str!("../../testdata/classify/idle/slabinfo.0");
    const IDLE_VMALLOCINFO: &str = include_str!("../../testdata/classify/idle/vmallocinfo.0");
    const BPF_VMALLOCINFO: &str =
        include_str!("../../testdata/classify/grow-bpf-maps/vmallocinfo.6");
    const RECLAIM_ACCOUNT: &str = include_str!("../../testdata/classify/idle/reclaim_account");
    const PAGE: u64 = memleak_common::PAGE_SIZE as u64;

    #[test]
    fn meminfo_fields_are_bytes() {
        let meminfo = parse_meminfo(IDLE_MEMINFO);
        let total_line = IDLE_MEMINFO.lines().next().unwrap();
        assert!(total_line.starts_with("MemTotal:") && total_line.ends_with(" kB"));
        let kib: u64 = total_line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(meminfo.get("MemTotal"), Some(kib * 1024));
        assert!(meminfo.get("SUnreclaim").is_some_and(|bytes| bytes > 0));
        assert_eq!(
            meminfo.get("Slab"),
            Some(meminfo.bytes("SReclaimable") + meminfo.bytes("SUnreclaim"))
        );
        assert_eq!(meminfo.get("HugePages_Total"), None, "a count, not kB");
        assert_eq!(meminfo.bytes("NoSuchField"), 0);
    }

    #[test]
    fn meminfo_survives_garbage() {
        let meminfo = parse_meminfo(
            "MemTotal: 10 kB\nMemFree:\nPercpu: 12\nCached: x kB\n:::\nSlab: 3 kB extra\n\
             Shmem:        7 kB",
        );
        assert_eq!(meminfo.get("MemTotal"), Some(10 * 1024));
        assert_eq!(
            meminfo.get("Shmem"),
            Some(7 * 1024),
            "last line without newline"
        );
        for missing in ["MemFree", "Percpu", "Cached", "Slab"] {
            assert_eq!(meminfo.get(missing), None, "{missing}");
        }
        assert_eq!(parse_meminfo(""), Meminfo::default());
    }

    #[test]
    fn slabinfo_sums_to_meminfo_slab() {
        let slabinfo = parse_slabinfo(IDLE_SLABINFO).unwrap();
        assert_eq!(slabinfo.unparsed_lines, 0);
        assert_eq!(
            slabinfo.caches.len(),
            IDLE_SLABINFO.lines().count() - 2,
            "every line but the two headers"
        );
        let filp = slabinfo.caches.iter().find(|cache| cache.name == "filp");
        let filp = filp.expect("filp cache");
        assert!(filp.active_objects <= filp.objects && filp.object_size == 192);
        // SLUB accounts every slab page of a cache to SReclaimable or SUnreclaim; the
        // reclaimable caches add up to SReclaimable, within what changed between the two
        // reads and what per-CPU counter deltas meminfo has not folded in yet.
        let reclaimable = parse_name_values(RECLAIM_ACCOUNT);
        let reclaimable_bytes: u64 = slabinfo
            .caches
            .iter()
            .filter(|cache| {
                reclaimable
                    .get(&cache.name)
                    .is_some_and(|value| value == "1")
            })
            .map(|cache| cache.bytes(PAGE))
            .sum();
        let meminfo = parse_meminfo(IDLE_MEMINFO);
        let reported = meminfo.bytes("SReclaimable");
        assert!(
            reclaimable_bytes.abs_diff(reported) < reported / 100,
            "{reclaimable_bytes} vs {reported}"
        );
    }

    #[test]
    fn slabinfo_header_variations() {
        let line = "kmalloc-64    100    128     64   64    1 : tunables    0    0    0 : slabdata      2      2      0";
        let statistics = "size-64  100  128  64  59  1 : tunables  120  60  8 : slabdata  2  2  0 : globalstat  2  1  3  0  0  0  0  0  0 : cpustat  5  6  7  8";
        for text in [
            format!("slabinfo - version: 2.1\n# name <active_objs> ...\n{line}\n"),
            format!("slabinfo - version: 2.0\n{line}"),
            format!("slabinfo - version: 2.1 (statistics)\n# name ...\n{statistics}\n"),
        ] {
            let slabinfo = parse_slabinfo(&text).unwrap();
            assert_eq!(slabinfo.unparsed_lines, 0, "{text}");
            let [cache] = slabinfo.caches.as_slice() else {
                panic!("one cache expected from {text}");
            };
            assert_eq!(
                (cache.active_objects, cache.objects, cache.object_size),
                (100, 128, 64)
            );
            assert_eq!((cache.pages_per_slab, cache.slabs), (1, 2));
        }
    }

    #[test]
    fn slabinfo_cache_names_may_contain_spaces() {
        let text =
            "slabinfo - version: 2.1\nmy cache 1 2 3 4 1 : tunables 0 0 0 : slabdata 1 1 0\n";
        let slabinfo = parse_slabinfo(text).unwrap();
        assert_eq!(slabinfo.caches[0].name, "my cache");
    }

    #[test]
    fn slabinfo_rejects_what_is_not_slabinfo() {
        assert_eq!(parse_slabinfo(""), Err(SlabinfoError::MissingHeader));
        assert_eq!(
            parse_slabinfo(IDLE_MEMINFO),
            Err(SlabinfoError::MissingHeader)
        );
        assert_eq!(
            parse_slabinfo("slabinfo - version: 1.1\n"),
            Err(SlabinfoError::UnsupportedVersion {
                version: "1.1".into()
            })
        );
    }

    #[test]
    fn slabinfo_counts_truncated_and_garbled_lines() {
        let mut text: String = IDLE_SLABINFO
            .lines()
            .take(12)
            .collect::<Vec<_>>()
            .join("\n");
        // A read cut short in the middle of a line.
        let cut = text.rfind(": slabdata").unwrap() + 5;
        text.truncate(cut);
        text.push_str("\nkmalloc-8 1 2 : tunables 0 0 0 : slabdata 1 1 0\n");
        text.push_str("x 1 2 3 4 5 : tunables 0 0 0 : slabdata many 1 0\n");
        text.push_str(" 1 2 3 4 5 : tunables 0 0 0 : slabdata 1 1 0\n");
        text.push_str("y 1 2 3 4 5 : tunables 0 0 0\n");
        text.push_str("z 99999999999999999999999 2 3 4 5 : slabdata 1 1 0\n");
        let slabinfo = parse_slabinfo(&text).unwrap();
        assert_eq!(slabinfo.caches.len(), 9);
        assert_eq!(slabinfo.unparsed_lines, 6);
    }

    #[test]
    fn sys_slab_files_make_a_cache() {
        let files = SysSlabFiles {
            objects: Some("2478 N0=2478\n"),
            total_objects: Some("3328 N0=3328\n"),
            object_size: Some("64\n"),
            order: Some("1\n"),
            slabs: Some("26 N0=26\n"),
        };
        let cache = parse_sys_slab("kmalloc-64", &files).unwrap();
        assert_eq!(
            cache,
            SlabCache {
                name: "kmalloc-64".into(),
                active_objects: 2478,
                objects: 3328,
                object_size: 64,
                pages_per_slab: 2,
                slabs: 26,
            }
        );
        for broken in [
            SysSlabFiles {
                slabs: None,
                ..files.clone()
            },
            SysSlabFiles {
                order: Some("99"),
                ..files.clone()
            },
            SysSlabFiles {
                objects: Some(""),
                ..files.clone()
            },
            SysSlabFiles {
                object_size: Some("N0=1"),
                ..files.clone()
            },
        ] {
            assert_eq!(parse_sys_slab("broken", &broken), None, "{broken:?}");
        }
    }

    #[test]
    fn vmallocinfo_counts_allocated_pages_by_caller() {
        let usage = parse_vmallocinfo(IDLE_VMALLOCINFO, PAGE);
        assert_eq!(usage.lines_unparsed, 0);
        let total: u64 = usage.by_caller.values().sum();
        // Thread stacks: 16 KiB each, 4 pages.
        let stacks = usage.by_caller["kernel_clone"];
        assert!(stacks > 0 && stacks.is_multiple_of(4 * PAGE), "{stacks}");
        assert!(!usage.by_caller.keys().any(|caller| caller.contains('+')));
        // ioremap areas hold no vmalloc'd pages.
        assert!(!usage.by_caller.contains_key("vp_modern_map_capability"));
        // The sum is what meminfo says VmallocUsed is, within what changed between the reads.
        let meminfo = parse_meminfo(IDLE_MEMINFO);
        let used = meminfo.bytes("VmallocUsed");
        assert!(total.abs_diff(used) < used / 20, "{total} vs {used}");
    }

    #[test]
    fn vmallocinfo_of_bpf_arrays() {
        let usage = parse_vmallocinfo(BPF_VMALLOCINFO, PAGE);
        // The fixture made 16 array maps of 1 MiB per second for 7 s.
        let arrays = usage.by_caller["array_map_alloc"];
        assert!(arrays >= 100 << 20, "{arrays}");
    }

    #[test]
    fn vmallocinfo_survives_garbage() {
        let text = "0x1-0x2 8192 unpurged vm_area\n\
                    0x1-0x2 8192 vm_map_ram\n\
                    0x1-0x2 20480 f+0x1/0x2 pages=4 vmalloc N0=4\n\
                    0x1-0x2 20480 f+0x9/0x2 pages=x vmalloc\n\
                    0x1-0x2 20480 0xffffffffc0001234 pages=1 vmalloc\n\
                    0x1-0x2\n\
                    garbage line\n\
                    0x1-0x2 99999999999999999999 g pages=1\n\
                    0x1-0x2 4096 h pages=18446744073709551615 vmalloc\n";
        let usage = parse_vmallocinfo(text, PAGE);
        assert_eq!(usage.by_caller["f"], 4 * PAGE);
        assert_eq!(usage.by_caller["0xffffffffc0001234"], PAGE);
        assert_eq!(usage.by_caller["h"], u64::MAX);
        assert_eq!(usage.lines_unparsed, 3);
        assert_eq!(usage.by_caller.len(), 3);
    }

    #[test]
    fn zoneinfo_per_cpu_free_pages() {
        let text = include_str!("../../testdata/classify/idle/zoneinfo.0");
        let pages = parse_zoneinfo_pcp_pages(text).unwrap();
        let by_hand: u64 = text
            .lines()
            .filter(|line| line.trim_start().starts_with("count:"))
            .map(|line| {
                line.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        assert_eq!(pages, by_hand);
        let text = "Node 0, zone Normal\n  pagesets\n    cpu: 0\n      count: 12\n      \
                    high: 99\n    cpu: 1\n      count: x\n      count:\n    cpu: 2\n  \
                    count: 30";
        assert_eq!(parse_zoneinfo_pcp_pages(text), Some(42));
        assert_eq!(parse_zoneinfo_pcp_pages("nr_free_pages 5\n"), None);
    }
}
