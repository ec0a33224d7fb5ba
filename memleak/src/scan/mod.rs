//! Slab content similarity: `memleak scan --cache NAME`, and the content scan that
//! `memleak trace --cache NAME` runs at the end of its window.
//!
//! A leak that has run for months leaves most of its objects in one cache, all with the
//! contents they were last written with. The scanner reads every object of the cache from
//! kernel memory (eBPF, `bpf_probe_read_kernel`, run on demand), finds the largest groups of
//! similar objects, and, after a trace, marks the traced allocations that look like the
//! largest group: their call site is the suspected leaker.
use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Args;
use hashbrown::HashMap;
use memleak_common::AllocRecord;
use serde::Serialize;

use crate::{
    aggregate::{Aggregator, SiteKey},
    cli::{Format, ReportOptions},
    frame::Frame,
    kernel,
    output::ReportSink,
    privileges,
    report::Entry,
};

mod bases;
mod layout;
mod liveness;
mod owners;
mod reader;
mod render;
mod similarity;
mod slabs;

pub use layout::SlabLayout;
pub use liveness::{Check as LivenessCheck, FreeReason, Query as LivenessQuery, State as Liveness};
pub use owners::Object;
pub use render::{Marking, ScanReport, Suspect, render_details, render_text, summary};

use self::{
    bases::KernelBases,
    reader::KernelReader,
    similarity::{ClusterSettings, Pattern},
    slabs::{Cache, CacheObjects, Slab},
};

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// The slab cache to scan, by its name in /proc/slabinfo (`kmalloc-64`, `msg_msg-64`,
    /// `filp`). A cache that SLUB merged into another is scanned as that one, and the report
    /// says so.
    #[arg(long, value_name = "NAME")]
    pub cache: String,

    #[command(flatten)]
    pub similarity: SimilarityOptions,

    #[command(flatten)]
    pub report: ReportOptions,
}

/// How similar two objects must be; shared by `scan` and `trace --cache`.
#[derive(Debug, Clone, Copy, Args)]
pub struct SimilarityOptions {
    /// Two slab objects are similar when at least this percentage of their informative bytes
    /// (bytes other than 0x00, 0xff and slab poison values) are equal.
    #[arg(long, value_name = "PERCENT", default_value_t = 65,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub similarity: u8,
}

impl SimilarityOptions {
    fn threshold(self) -> f64 {
        f64::from(self.similarity) / 100.0
    }
}

/// Groups reported at most, whatever `--top` says: each one past the first costs a pass over
/// the sample.
const MAX_GROUPS: usize = 5;

/// `memleak scan`.
pub fn run(args: &ScanArgs) -> Result<ExitCode> {
    privileges::require_root()?;
    privileges::lift_memlock_limit();
    let sink = ReportSink::open(args.report.output.as_deref())?;
    let layout = slab_layout(kernel::parse_btf()?.as_ref())?;
    let (mut scanner, slabs) = Scanner::prepare_with_slabs(&args.cache, layout)?;
    let started = Instant::now();
    let groups = (args.report.top as usize).min(MAX_GROUPS);
    let scan = scanner.scan_slabs(&slabs, started, args.similarity, groups)?;
    let report = scan.report(&kernel::release()?, None);
    let text = match args.report.format {
        Format::Text => render_text(&report),
        Format::Json => crate::report::render_json(&report),
    };
    sink.write(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// The kernel memory reader, with proven bases and the slab layout from BTF.
pub struct KernelView {
    reader: KernelReader,
    layout: SlabLayout,
    bases: KernelBases,
    /// Each online CPU's per-CPU offset, once the liveness check has looked for them.
    percpu_offsets: Option<Result<Vec<(u32, u64)>, String>>,
}

/// The slab layout from the kernel's BTF ([`kernel::parse_btf`]); an error saying so where
/// the kernel has none.
pub fn slab_layout(btf: Option<&btf_rs::Btf>) -> Result<SlabLayout> {
    let Some(btf) = btf else {
        bail!(
            "reading slab caches needs kernel BTF ({} not found)",
            kernel::BTF_PATH
        );
    };
    SlabLayout::from_btf(btf)
}

impl KernelView {
    /// Loads the reader and finds and verifies the bases; `max_pfn` is one past the highest
    /// page frame number.
    fn open(layout: SlabLayout, max_pfn: u64) -> Result<Self> {
        let mut reader = KernelReader::load()?;
        let bases = bases::find(&mut reader, &layout, max_pfn)?;
        // Failed reads while looking for the bases are expected; the scan counts its own.
        reader.failed_reads = 0;
        Ok(Self {
            reader,
            layout,
            bases,
            percpu_offsets: None,
        })
    }

    /// [`Self::open`] without reading all of /proc/kpageflags first.
    pub fn open_for_owners(layout: SlabLayout) -> Result<Self> {
        Self::open(layout, slabs::page_frames()?)
    }

    /// The name of the slab cache that holds each object, `None` where it cannot be proven.
    pub fn cache_names(&mut self, objects: &[owners::Object]) -> Result<Vec<Option<String>>> {
        owners::cache_names(&mut self.reader, &self.layout, &self.bases, objects)
    }
}

/// A reader with proven bases, and the cache to scan.
pub struct Scanner {
    view: KernelView,
    wanted: String,
    /// Other names of the cache's slabs (caches SLUB merged with it).
    shares_slabs_with: Vec<String>,
    cache: Cache,
}

impl Scanner {
    /// Loads the reader, finds and verifies the kernel's bases, and finds the cache. Fails,
    /// before any object is read, when a base cannot be proven or the cache does not exist.
    pub fn prepare(wanted: &str, layout: SlabLayout) -> Result<Self> {
        Self::prepare_with_slabs(wanted, layout).map(|(scanner, _)| scanner)
    }

    /// [`Self::prepare`], also returning the slabs it read on the way, for a scan that
    /// follows at once.
    fn prepare_with_slabs(wanted: &str, layout: SlabLayout) -> Result<(Self, Vec<Slab>)> {
        let pages = slabs::slab_pages()?;
        let mut view = KernelView::open(layout, pages.max_pfn)?;
        let KernelView {
            reader,
            layout,
            bases,
            ..
        } = &mut view;
        let slabs = slabs::read_slabs(reader, layout, bases, &pages.heads)?;
        let caches = slabs::read_caches(reader, layout, bases, &slabs)?;
        slabs::verify_slabs_lead_to_caches(&slabs, &caches)?;
        let Some(cache) = slabs::find_cache(&caches, wanted).cloned() else {
            if std::path::Path::new("/sys/kernel/slab")
                .join(wanted)
                .exists()
            {
                bail!("--cache {wanted}: the cache has no slab pages right now (it is empty)");
            }
            bail!("--cache {wanted}: no such slab cache (see /proc/slabinfo)");
        };
        let scanner = Self {
            view,
            wanted: wanted.to_owned(),
            shares_slabs_with: slabs::aliases(wanted),
            cache,
        };
        Ok((scanner, slabs))
    }

    /// The cache as the user named it.
    pub fn cache_name(&self) -> &str {
        &self.wanted
    }

    /// The reader, for other reads after the scan.
    pub fn view(&mut self) -> &mut KernelView {
        &mut self.view
    }

    /// Reads every object of the cache now and finds up to `groups` groups of similar ones.
    pub fn scan(&mut self, similarity: SimilarityOptions, groups: usize) -> Result<CacheScan> {
        let started = Instant::now();
        let pages = slabs::slab_pages()?;
        let view = &mut self.view;
        view.reader.failed_reads = 0;
        let slabs = slabs::read_slabs(&mut view.reader, &view.layout, &view.bases, &pages.heads)?;
        self.scan_slabs(&slabs, started, similarity, groups)
    }

    fn scan_slabs(
        &mut self,
        slabs: &[Slab],
        started: Instant,
        similarity: SimilarityOptions,
        groups: usize,
    ) -> Result<CacheScan> {
        let view = &mut self.view;
        let objects = slabs::read_objects(&mut view.reader, &view.bases, &self.cache, slabs)?;
        let read_time = started.elapsed();
        let settings = ClusterSettings {
            threshold: similarity.threshold(),
            max_groups: groups.max(1),
            ..ClusterSettings::default()
        };
        let clustering = similarity::cluster(&objects.bytes, objects.object_size, &settings);
        let leader = clustering
            .groups
            .first()
            .map(|group| Pattern::new(objects.object(group.representative)));
        let index = objects
            .addresses
            .iter()
            .enumerate()
            .map(|(index, &address)| (address, index))
            .collect();
        Ok(CacheScan {
            wanted: self.wanted.clone(),
            shares_slabs_with: self.shares_slabs_with.clone(),
            cache: self.cache.clone(),
            bases: self.view.bases,
            objects,
            clustering,
            similarity,
            read_time,
            total_time: started.elapsed(),
            failed_reads: self.view.reader.failed_reads,
            index,
            leader,
        })
    }
}

/// One scan's objects and groups.
pub struct CacheScan {
    wanted: String,
    shares_slabs_with: Vec<String>,
    cache: Cache,
    bases: KernelBases,
    objects: CacheObjects,
    clustering: similarity::Clustering,
    similarity: SimilarityOptions,
    read_time: Duration,
    total_time: Duration,
    failed_reads: u64,
    /// Object address to its index in `objects`.
    index: HashMap<u64, usize>,
    /// The largest group's representative.
    leader: Option<Pattern>,
}

/// How a traced object compares with the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Not an in-use object of the scanned cache.
    Elsewhere,
    /// In the cache, not similar to the largest group's representative.
    Dissimilar,
    /// In the cache and similar to the largest group's representative.
    Similar,
}

impl CacheScan {
    /// Compares the object at `address` (a traced, still outstanding allocation) with the
    /// largest group.
    pub fn mark(&self, address: u64) -> Mark {
        let Some(&index) = self.index.get(&address) else {
            return Mark::Elsewhere;
        };
        let Some(pattern) = &self.leader else {
            return Mark::Dissimilar;
        };
        if pattern.similar(self.objects.object(index), self.similarity.threshold()) {
            Mark::Similar
        } else {
            Mark::Dissimilar
        }
    }

    /// The report, with the traced allocations' marks when there was a trace.
    pub fn report(&self, kernel: &str, marking: Option<render::Marking>) -> ScanReport {
        render::build(self, kernel, marking)
    }
}

/// Says on stderr, and returns for the report's notes, that the content scan of a trace was
/// not done. It does not fail the trace: `--cache` also scopes leak checks, which must work
/// where a scan cannot.
pub fn not_done(cache: &str, error: &anyhow::Error) -> String {
    let note = format!("content scan of {cache} not done: {error:#}");
    eprintln!("memleak: {note}");
    note
}

/// Groups a trace's content scan looks for: the report shows a few, marking uses the largest.
pub const TRACE_GROUPS: usize = 3;

/// How one allocation site's outstanding objects compare with the scanned cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SiteMarks {
    /// Objects similar to the largest group's representative.
    pub marked: u64,
    /// Objects found among the scanned cache's in-use objects.
    pub in_scanned_cache: u64,
}

/// Tallies a trace's outstanding allocations against a scan, per allocation site. It groups
/// them as the report does, so that the tallies line up with the report's entries.
pub struct MarkTally<'a> {
    scan: &'a CacheScan,
    in_cache: Aggregator,
    marked: Aggregator,
}

impl<'a> MarkTally<'a> {
    pub fn new(scan: &'a CacheScan, now_ns: u64, min_age: Duration) -> Self {
        Self {
            scan,
            in_cache: Aggregator::new(now_ns, min_age),
            marked: Aggregator::new(now_ns, min_age),
        }
    }

    /// Adds the outstanding object at `address`.
    pub fn add(&mut self, address: u64, record: &AllocRecord) {
        match self.scan.mark(address) {
            Mark::Elsewhere => {}
            Mark::Dissimilar => self.in_cache.add(record),
            Mark::Similar => {
                self.in_cache.add(record);
                self.marked.add(record);
            }
        }
    }

    pub fn finish(self) -> HashMap<SiteKey, SiteMarks> {
        let mut marks: HashMap<SiteKey, SiteMarks> = HashMap::new();
        for site in self.in_cache.finish().sites {
            marks.entry(site.key).or_default().in_scanned_cache = site.count;
        }
        for site in self.marked.finish().sites {
            marks.entry(site.key).or_default().marked = site.count;
        }
        marks
    }
}

/// Totals of the report entries' marks, and the suspect: the site with the most marked
/// objects, then the most objects in the cache.
pub fn marking(entries: &[Entry]) -> Marking {
    rank_sites(
        entries
            .iter()
            .filter_map(|entry| Some((&entry.call_site, entry.marks?))),
    )
}

/// Sites ranked in a trace's content scan at most.
const RANKED_SITES: usize = 5;

fn rank_sites<'a>(sites: impl IntoIterator<Item = (&'a Frame, SiteMarks)>) -> Marking {
    let mut sites: Vec<(&Frame, SiteMarks)> = sites
        .into_iter()
        .filter(|(_, marks)| marks.in_scanned_cache > 0)
        .collect();
    sites.sort_by(|(a_site, a), (b_site, b)| {
        (b.marked, b.in_scanned_cache)
            .cmp(&(a.marked, a.in_scanned_cache))
            .then_with(|| a_site.addr.cmp(&b_site.addr))
    });
    let ranked: Vec<Suspect> = sites
        .iter()
        .take(RANKED_SITES)
        .map(|(call_site, marks)| Suspect {
            call_site: (*call_site).clone(),
            marked: marks.marked,
            traced: marks.in_scanned_cache,
        })
        .collect();
    Marking {
        traced: sites.iter().map(|(_, marks)| marks.in_scanned_cache).sum(),
        marked: sites.iter().map(|(_, marks)| marks.marked).sum(),
        suspected: ranked.first().filter(|site| site.marked > 0).cloned(),
        sites: ranked,
    }
}

/// `similar: 62 of 66 objects in kmalloc-64 look like its largest group` for one entry.
pub fn describe_marks(marks: &SiteMarks, scan: &ScanReport) -> String {
    format!(
        "similar: {} of {} objects in {} look like its largest group",
        crate::report::thousands(marks.marked),
        crate::report::thousands(marks.in_scanned_cache),
        scan.cache
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(symbol: &str, addr: u64) -> Frame {
        Frame {
            addr: Some(addr),
            symbol: Some(symbol.into()),
            offset: Some(0x41),
            size: Some(0x1e0),
            module: None,
        }
    }

    fn marks(marked: u64, in_scanned_cache: u64) -> SiteMarks {
        SiteMarks {
            marked,
            in_scanned_cache,
        }
    }

    #[test]
    fn the_suspect_has_the_most_marked_objects_then_the_most_in_the_cache() {
        let (a, b, c) = (site("a", 0x10), site("b", 0x20), site("c", 0x30));
        let ranked = rank_sites([
            (&a, marks(3, 100)),
            (&b, marks(62, 66)),
            (&c, marks(62, 70)),
        ]);
        let suspect = ranked.suspected.unwrap();
        assert_eq!(suspect.call_site, c);
        assert_eq!((suspect.marked, suspect.traced), (62, 70));
        assert_eq!((ranked.marked, ranked.traced), (127, 236));
        let order: Vec<&Frame> = ranked.sites.iter().map(|site| &site.call_site).collect();
        assert_eq!(order, [&c, &b, &a]);
    }

    #[test]
    fn no_marked_object_means_no_suspect() {
        let a = site("a", 0x10);
        let ranked = rank_sites([(&a, marks(0, 40))]);
        assert!(ranked.suspected.is_none());
        assert_eq!(ranked.traced, 40);
        assert!(rank_sites([]).suspected.is_none());
    }

    fn report(groups: u64, marking: Option<Marking>) -> ScanReport {
        ScanReport {
            kernel: "6.18.0-test".into(),
            cache: "kmalloc-64".into(),
            scanned_cache: "kmalloc-64".into(),
            merged: false,
            shares_slabs_with: vec!["anon_vma_chain".into()],
            object_size: 64,
            slot_size: 64,
            slabs: 10,
            objects: 640,
            free_objects: 0,
            inuse_by_counters: 640,
            unreadable_pages: 0,
            broken_freelists: 0,
            failed_reads: 0,
            empty_objects: 0,
            sampled: 640,
            similarity_percent: 65,
            page_offset_base: 0xffff_8880_0000_0000,
            vmemmap_base: 0xffff_ea00_0000_0000,
            read_ms: 1,
            scan_ms: 2,
            groups: (0..groups)
                .map(|_| render::GroupReport {
                    objects: 455,
                    share_percent: 71.1,
                    bytes: 455 * 64,
                    representative: 0xffff_8880_0123_4000,
                    sample_support: 455,
                    contents: "6d".repeat(64),
                    symbols: Vec::new(),
                    strings: Vec::new(),
                })
                .collect(),
            marking,
        }
    }

    #[test]
    fn summary_names_the_suspect() {
        let a = site("bond_vminfo_add", 0x10);
        let marking = rank_sites([(&a, marks(62, 66))]);
        assert_eq!(
            render::summary(&report(1, Some(marking))),
            "kmalloc-64: 455 similar objects (71% of cache); suspected: \
             bond_vminfo_add+0x41/0x1e0 (62 of 66 traced allocations similar)"
        );
        let unmarked = rank_sites([(&a, marks(0, 66))]);
        assert!(
            render::summary(&report(1, Some(unmarked)))
                .ends_with("; none of the 66 traced allocations in this cache is similar")
        );
        assert!(
            render::summary(&report(1, Some(rank_sites([]))))
                .ends_with("; no traced allocation is still in this cache")
        );
        assert_eq!(
            render::summary(&report(0, None)),
            "kmalloc-64: no group of similar objects among 640 objects"
        );
        let text = render_text(&report(1, None));
        assert!(text.contains("0000  6d 6d 6d"), "{text}");
        assert!(
            text.contains("64-byte objects, read in 1ms; shares its slabs with anon_vma_chain"),
            "{text}"
        );
    }
}
