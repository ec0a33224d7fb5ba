//! The kernel's own counters beside the trace: for each slab cache in the report, the traced
//! net change over the window against /proc/slabinfo's change in active objects; likewise
//! vmalloc and percpu memory against /proc/meminfo. A free path the tracer does not follow
//! shows here as traced growth the kernel does not have, on any kernel.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::kernel::procfs::{parse_meminfo, parse_slabinfo};

/// What the kernel counted at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Active objects and objects per slab, per cache of /proc/slabinfo.
    pub slabs: BTreeMap<String, SlabCount>,
    /// meminfo's VmallocUsed and Percpu, in bytes.
    pub vmalloc_bytes: Option<u64>,
    pub percpu_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlabCount {
    pub active: u64,
    pub per_slab: u64,
}

impl KernelCounts {
    /// Reads /proc/slabinfo (root only) and /proc/meminfo.
    pub fn read() -> Result<Self> {
        let slabinfo =
            std::fs::read_to_string("/proc/slabinfo").context("reading /proc/slabinfo")?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        Self::parse(&slabinfo, &meminfo)
    }

    pub fn parse(slabinfo: &str, meminfo: &str) -> Result<Self> {
        let slabinfo = parse_slabinfo(slabinfo).context("parsing /proc/slabinfo")?;
        let meminfo = parse_meminfo(meminfo);
        let slabs = slabinfo
            .caches
            .into_iter()
            .map(|cache| {
                let per_slab = cache.objects.checked_div(cache.slabs).unwrap_or(1).max(1);
                let count = SlabCount {
                    active: cache.active_objects,
                    per_slab,
                };
                (cache.name, count)
            })
            .collect();
        Ok(Self {
            slabs,
            vmalloc_bytes: meminfo.get("VmallocUsed"),
            percpu_bytes: meminfo.get("Percpu"),
        })
    }
}

/// One line of the comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounting {
    /// `slab`, `vmalloc` or `percpu`.
    pub kind: String,
    /// The slab cache; `None` for vmalloc and percpu.
    pub cache: Option<String>,
    /// `objects` for slab caches, `bytes` for the others.
    pub unit: String,
    /// Outstanding at the end of the window, allocated during it (scaled by the sample rate).
    pub traced: u64,
    /// The kernel's change over the window (negative when it shrank).
    pub kernel: i64,
    /// How far the two may differ without meaning anything: objects held free per CPU count
    /// as active in /proc/slabinfo, and come and go with the CPUs' caches.
    pub noise: u64,
    /// Traced growth the kernel does not have, beyond the noise, with entries the liveness
    /// check could not verify: those entries may be freed objects.
    pub unreliable: bool,
    /// Traced growth beyond the kernel's, but every traced object verified allocated: objects
    /// older than the window were freed meanwhile (turnover), not a gap in the tracing.
    pub explained_by_turnover: bool,
}

/// What the trace holds of one cache or kind, for the comparison.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traced {
    pub amount: u64,
    /// Whether any of it could not be verified as allocated in kernel memory.
    pub unverified: bool,
}

/// Compares the traced net change per cache and kind with the kernel's between `start` and
/// `end`. `cpus` sizes the per-CPU noise. Caches the kernel does not list (or lists only at
/// one end) are left out: there is nothing to compare with.
pub fn compare(
    start: &KernelCounts,
    end: &KernelCounts,
    slab_caches: &BTreeMap<String, Traced>,
    vmalloc: Traced,
    percpu: Traced,
    cpus: u64,
) -> Vec<Accounting> {
    let mut lines = Vec::new();
    for (cache, traced) in slab_caches {
        let (Some(before), Some(after)) = (start.slabs.get(cache), end.slabs.get(cache)) else {
            continue;
        };
        let kernel = after.active as i64 - before.active as i64;
        // A CPU's slab, its partial slabs and its sheaves hold free objects that count as
        // active: a few slabs' worth per CPU, and a percent for everything else in motion.
        let noise = (after.per_slab * 4 * cpus).max(32) + after.active / 100;
        lines.push(line(
            "slab",
            Some(cache.clone()),
            "objects",
            *traced,
            kernel,
            noise,
        ));
    }
    let mut by_kind = |kind: &'static str, traced: Traced, start: Option<u64>, end: Option<u64>| {
        if let (Some(start), Some(end)) = (start, end)
            && traced.amount > 0
        {
            // Page-granular counters: a few pages per CPU and a percent.
            let noise = 16 * 4096 * cpus + end / 100;
            lines.push(line(
                kind,
                None,
                "bytes",
                traced,
                end as i64 - start as i64,
                noise,
            ));
        }
    };
    by_kind("vmalloc", vmalloc, start.vmalloc_bytes, end.vmalloc_bytes);
    by_kind("percpu", percpu, start.percpu_bytes, end.percpu_bytes);
    lines.sort_by(|a, b| {
        excess(b)
            .cmp(&excess(a))
            .then_with(|| a.kind.cmp(&b.kind))
            .then_with(|| a.cache.cmp(&b.cache))
    });
    lines
}

fn line(
    kind: &'static str,
    cache: Option<String>,
    unit: &'static str,
    traced: Traced,
    kernel: i64,
    noise: u64,
) -> Accounting {
    let exceeds = traced.amount as i64 - kernel > noise as i64;
    Accounting {
        kind: kind.to_owned(),
        cache,
        unit: unit.to_owned(),
        traced: traced.amount,
        kernel,
        noise,
        unreliable: exceeds && traced.unverified,
        explained_by_turnover: exceeds && !traced.unverified,
    }
}

/// Traced growth beyond the kernel's.
pub fn excess(line: &Accounting) -> i64 {
    line.traced as i64 - line.kernel
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = include_str!("../../testdata/accounting/start.slabinfo");
    const END: &str = include_str!("../../testdata/accounting/end.slabinfo");
    const MEMINFO_START: &str = include_str!("../../testdata/accounting/start.meminfo");
    const MEMINFO_END: &str = include_str!("../../testdata/accounting/end.meminfo");

    fn counts() -> (KernelCounts, KernelCounts) {
        (
            KernelCounts::parse(START, MEMINFO_START).unwrap(),
            KernelCounts::parse(END, MEMINFO_END).unwrap(),
        )
    }

    fn traced(amount: u64, unverified: bool) -> Traced {
        Traced { amount, unverified }
    }

    /// The comparison of slab caches alone, on 2 CPUs.
    fn compare_caches(
        start: &KernelCounts,
        end: &KernelCounts,
        caches: &BTreeMap<String, Traced>,
    ) -> Vec<Accounting> {
        compare(start, end, caches, Traced::default(), Traced::default(), 2)
    }

    #[test]
    fn reads_active_objects_and_objects_per_slab() {
        let (start, _) = counts();
        let kmalloc_256 = start.slabs["kmalloc-256"];
        assert!(kmalloc_256.active > 0);
        assert!(kmalloc_256.per_slab >= 16);
        assert!(start.vmalloc_bytes.is_some() && start.percpu_bytes.is_some());
    }

    #[test]
    fn growth_the_kernel_does_not_have_is_flagged_only_when_unverified() {
        // Recorded around 3,000 epoll instances created and closed: kmalloc-256 did not grow.
        let (start, end) = counts();
        let caches = BTreeMap::from([("kmalloc-256".to_owned(), traced(2_999, true))]);
        let lines = compare_caches(&start, &end, &caches);
        let [line] = &lines[..] else {
            panic!("one line per traced cache: {lines:?}")
        };
        assert_eq!(line.cache.as_deref(), Some("kmalloc-256"));
        assert!(line.kernel < 300, "kernel growth {}", line.kernel);
        assert!(line.unreliable && !line.explained_by_turnover, "{line:?}");
        // The same growth with every object verified allocated is turnover, not a gap.
        let caches = BTreeMap::from([("kmalloc-256".to_owned(), traced(2_999, false))]);
        let lines = compare_caches(&start, &end, &caches);
        assert!(!lines[0].unreliable && lines[0].explained_by_turnover);
    }

    #[test]
    fn growth_the_kernel_shows_too_is_not_flagged() {
        let (start, end) = counts();
        let grown =
            end.slabs["kmalloc-256"].active as i64 - start.slabs["kmalloc-256"].active as i64;
        let amount = grown.max(0) as u64 + 10;
        let caches = BTreeMap::from([("kmalloc-256".to_owned(), traced(amount, true))]);
        let lines = compare_caches(&start, &end, &caches);
        assert!(
            !lines[0].unreliable && !lines[0].explained_by_turnover,
            "{:?}",
            lines[0]
        );
    }

    #[test]
    fn caches_the_kernel_does_not_list_and_untraced_kinds_are_left_out() {
        let (start, end) = counts();
        let caches = BTreeMap::from([("no-such-cache".to_owned(), traced(5_000, true))]);
        let lines = compare(&start, &end, &caches, Traced::default(), traced(0, true), 2);
        assert!(lines.is_empty(), "{lines:?}");
    }

    #[test]
    fn vmalloc_growth_beyond_meminfo_is_flagged() {
        let (start, end) = counts();
        let lines = compare(
            &start,
            &end,
            &BTreeMap::new(),
            traced(512 << 20, true),
            Traced::default(),
            2,
        );
        assert_eq!(lines.len(), 1);
        assert_eq!(
            (lines[0].kind.as_str(), lines[0].unit.as_str()),
            ("vmalloc", "bytes")
        );
        assert!(lines[0].unreliable, "{:?}", lines[0]);
    }

    fn slab(active: u64, per_slab: u64) -> SlabCount {
        SlabCount { active, per_slab }
    }

    fn kernel_counts(slabs: &[(&str, SlabCount)], vmalloc: u64, percpu: u64) -> KernelCounts {
        KernelCounts {
            slabs: slabs
                .iter()
                .map(|&(name, count)| (name.to_owned(), count))
                .collect(),
            vmalloc_bytes: Some(vmalloc),
            percpu_bytes: Some(percpu),
        }
    }

    #[test]
    fn kernel_change_noise_flags_and_order_are_exact() {
        let start = kernel_counts(
            &[
                ("a", slab(5_000, 32)),
                ("m", slab(1_000, 16)),
                ("z", slab(100, 8)),
            ],
            1_000_000,
            50_000,
        );
        let end = kernel_counts(
            &[
                ("a", slab(5_000, 32)),
                ("m", slab(1_200, 16)),
                ("z", slab(110, 8)),
            ],
            1_100_000,
            40_000,
        );
        let caches = BTreeMap::from([
            // Verified, well within the noise.
            ("a".to_owned(), traced(5, false)),
            // Exactly at the noise: not flagged.
            ("m".to_owned(), traced(340, true)),
            // Beyond the noise, unverified.
            ("z".to_owned(), traced(100, true)),
        ]);
        let lines = compare(
            &start,
            &end,
            &caches,
            traced(300_000, true),
            traced(1_000, false),
            2,
        );
        let summary: Vec<_> = lines
            .iter()
            .map(|line| {
                (
                    line.kind.as_str(),
                    line.cache.as_deref(),
                    line.unit.as_str(),
                    line.traced,
                    line.kernel,
                    line.noise,
                    excess(line),
                    line.unreliable,
                    line.explained_by_turnover,
                )
            })
            .collect();
        // Slab noise: max(per_slab * 4 * cpus, 32) + active / 100; bytes: 16 pages per CPU
        // plus a percent. Largest excess first.
        assert_eq!(
            summary,
            [
                (
                    "vmalloc", None, "bytes", 300_000, 100_000, 142_072, 200_000, true, false
                ),
                (
                    "percpu", None, "bytes", 1_000, -10_000, 131_472, 11_000, false, false
                ),
                (
                    "slab",
                    Some("m"),
                    "objects",
                    340,
                    200,
                    140,
                    140,
                    false,
                    false
                ),
                ("slab", Some("z"), "objects", 100, 10, 65, 90, true, false),
                ("slab", Some("a"), "objects", 5, 0, 306, 5, false, false),
            ]
        );
        // The same excess, verified: turnover.
        let caches = BTreeMap::from([("z".to_owned(), traced(100, false))]);
        let lines = compare_caches(&start, &end, &caches);
        assert!(!lines[0].unreliable && lines[0].explained_by_turnover);
    }

    #[test]
    fn reads_this_kernel_when_allowed() {
        // /proc/slabinfo is root's only: without root there is nothing to check.
        if let Ok(counts) = KernelCounts::read() {
            assert!(counts.slabs.values().any(|count| count.active > 0));
            assert!(counts.vmalloc_bytes.is_some());
        }
    }
}
