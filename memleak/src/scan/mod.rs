//! Slab content similarity: `memleak scan --cache NAME`, and the content scan that
//! `memleak trace --cache NAME` runs at the end of its window.
//!
//! A leak that has run for months leaves most of its objects in one cache, all with the
//! contents they were last written with. The scanner reads every object of the cache from
//! kernel memory (eBPF, `bpf_probe_read_kernel`, run on demand), finds the largest groups of
//! similar objects, and, after a trace, marks the traced allocations that look like the
//! largest group: their call site is the suspected leaker.
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hashbrown::HashMap;

use crate::{
    bpf::reader::KernelReader,
    kernel::{self, slab_merges::SlabMerges},
};

/// The base page size the slab layout is read with (x86_64's).
pub const PAGE: u64 = memleak_common::PAGE_SIZE as u64;

mod bases;
mod layout;
mod liveness;
mod memory;
mod owners;
pub mod report;
mod similarity;
mod slabs;

pub use layout::SlabLayout;
pub use liveness::{Check as LivenessCheck, FreeReason, Query as LivenessQuery, State as Liveness};
pub use owners::Object;
pub use report::{Marking, ScanReport, Suspect};

use self::{
    bases::KernelBases,
    similarity::{ClusterSettings, Pattern},
    slabs::{Cache, CacheObjects, Slab},
};

/// How similar two objects must be; shared by `scan` and `trace --cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Similarity {
    /// Two slab objects are similar when at least this percentage of their informative bytes
    /// (bytes other than 0x00, 0xff and slab poison values) are equal (1 to 100).
    pub percent: u8,
}

impl Similarity {
    fn threshold(self) -> f64 {
        f64::from(self.percent) / 100.0
    }
}

/// Groups reported at most, whatever `--top` says: each one past the first costs a pass over
/// the sample.
pub const MAX_GROUPS: usize = 5;

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

/// `memleak scan`: prepares a scanner and scans at once, with the slabs read while preparing.
pub fn scan_cache(
    wanted: &str,
    layout: SlabLayout,
    similarity: Similarity,
    groups: usize,
) -> Result<CacheScan> {
    let (mut scanner, slabs) = Scanner::prepare_with_slabs(wanted, layout)?;
    scanner.scan_slabs(&slabs, Instant::now(), similarity, groups)
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
        let merges = SlabMerges::read();
        let Some(cache) = slabs::find_cache(&caches, wanted, &merges).cloned() else {
            if merges.knows(wanted) {
                bail!("--cache {wanted}: the cache has no slab pages right now (it is empty)");
            }
            bail!("--cache {wanted}: no such slab cache (see /proc/slabinfo)");
        };
        let scanner = Self {
            view,
            wanted: wanted.to_owned(),
            shares_slabs_with: merges.others(wanted),
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
    pub fn scan(&mut self, similarity: Similarity, groups: usize) -> Result<CacheScan> {
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
        similarity: Similarity,
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
    similarity: Similarity,
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
    pub fn report(&self, kernel: &str, marking: Option<Marking>) -> ScanReport {
        report::build(self, kernel, marking)
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
