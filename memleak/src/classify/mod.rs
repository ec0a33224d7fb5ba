//! `memleak classify`: samples /proc/meminfo, /proc/slabinfo (or /sys/kernel/slab) and
//! /proc/vmallocinfo for a few seconds and says which kind of kernel memory grows, without
//! tracing anything.
pub mod analysis;
#[doc(hidden)]
pub mod fixtures;
#[cfg(test)]
mod tests;

use std::{fs, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};

use self::analysis::{CacheFacts, Context, Report, Sample, Thresholds};
use crate::kernel::{
    procfs::{self, Meminfo, SlabCache, SysSlabFiles, VmallocUsage},
    slab_merges::{SYS_SLAB, SlabMerges},
};

/// What `classify` samples and how it judges growth.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long to sample.
    pub window: Duration,
    /// Time between samples.
    pub interval: Duration,
    pub min_rate_bytes_per_second: u64,
    pub noise_floor_bytes: u64,
    /// Blame reclaimable slab growth too.
    pub blame_reclaimable: bool,
}

/// The report over `samples`: which kinds and caches grow. `traceable` names the kinds
/// `memleak trace --kinds` takes, for the suggested next command.
pub fn classify(
    samples: &[Sample],
    sampler: &Sampler,
    options: &Options,
    kernel: String,
    top: usize,
    traceable: Vec<String>,
) -> Report {
    let context = Context {
        kernel,
        page_size: sampler.page_size,
        thresholds: Thresholds {
            min_rate_bytes_per_second: options.min_rate_bytes_per_second,
            noise_floor_bytes: options.noise_floor_bytes,
            scatter_factor: analysis::SCATTER_FACTOR,
        },
        facts: sampler.facts.clone(),
        notes: sampler.notes(),
        top,
        traceable,
        requested: options.window,
        blame_reclaimable: options.blame_reclaimable,
    };
    analysis::analyze(samples, &context)
}

/// The kernel's page size.
pub fn page_size() -> Result<u64> {
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|size| *size > 0)
        .context("sysconf(_SC_PAGESIZE) failed")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlabSource {
    Slabinfo,
    Sysfs,
    Unavailable,
}

/// Reads the sources, remembering after the first sample which slab source works.
pub struct Sampler {
    page_size: u64,
    slab_source: Option<SlabSource>,
    facts: CacheFacts,
    /// Why a source was skipped or replaced, once each.
    problems: Vec<String>,
    slabinfo_unparsed_lines: usize,
    vmallocinfo_unparsed_lines: usize,
    vmalloc_readable: bool,
    pcp_unknown: bool,
}

impl Sampler {
    pub fn new(page_size: u64) -> Self {
        let (facts, problem) = read_cache_facts(Path::new(SYS_SLAB));
        Self {
            page_size,
            slab_source: None,
            facts,
            problems: problem.into_iter().collect(),
            slabinfo_unparsed_lines: 0,
            vmallocinfo_unparsed_lines: 0,
            vmalloc_readable: true,
            pcp_unknown: false,
        }
    }

    pub fn sample(&mut self, at: Duration) -> Result<Sample> {
        let meminfo = read_meminfo()?;
        let pcp_free_bytes = self.read_pcp_free_pages().saturating_mul(self.page_size);
        let slab = self.read_slab();
        let vmalloc = self.read_vmalloc();
        Ok(Sample {
            at,
            meminfo,
            pcp_free_bytes,
            slab,
            vmalloc,
        })
    }

    fn read_pcp_free_pages(&mut self) -> u64 {
        let pages = fs::read_to_string("/proc/zoneinfo")
            .context("reading /proc/zoneinfo")
            .and_then(|text| {
                procfs::parse_zoneinfo_pcp_pages(&text)
                    .context("/proc/zoneinfo has no per-CPU page counts")
            });
        pages.unwrap_or_else(|error| {
            if !self.pcp_unknown {
                self.pcp_unknown = true;
                self.problems.push(format!(
                    "other_pages includes free pages on per-CPU lists ({error:#})"
                ));
            }
            0
        })
    }

    fn read_slab(&mut self) -> Option<Vec<SlabCache>> {
        match self.slab_source {
            Some(SlabSource::Slabinfo) => self.read_slabinfo().ok(),
            Some(SlabSource::Sysfs) => read_sys_slab(Path::new(SYS_SLAB), &self.facts).ok(),
            Some(SlabSource::Unavailable) => None,
            None => {
                let slabinfo_error = match self.read_slabinfo() {
                    Ok(caches) => {
                        self.slab_source = Some(SlabSource::Slabinfo);
                        return Some(caches);
                    }
                    Err(error) => error,
                };
                match read_sys_slab(Path::new(SYS_SLAB), &self.facts) {
                    Ok(caches) => {
                        self.problems.push(format!(
                            "slab caches read from {SYS_SLAB} ({slabinfo_error:#})"
                        ));
                        self.slab_source = Some(SlabSource::Sysfs);
                        Some(caches)
                    }
                    Err(sysfs_error) => {
                        self.problems.push(format!(
                            "no per-cache slab statistics ({slabinfo_error:#}; {sysfs_error:#}); \
                             run as root"
                        ));
                        self.slab_source = Some(SlabSource::Unavailable);
                        None
                    }
                }
            }
        }
    }

    fn read_slabinfo(&mut self) -> Result<Vec<SlabCache>> {
        let text = fs::read_to_string("/proc/slabinfo").context("reading /proc/slabinfo")?;
        let slabinfo = procfs::parse_slabinfo(&text).context("parsing /proc/slabinfo")?;
        self.slabinfo_unparsed_lines += slabinfo.unparsed_lines;
        Ok(slabinfo.caches)
    }

    fn read_vmalloc(&mut self) -> Option<VmallocUsage> {
        if !self.vmalloc_readable {
            return None;
        }
        match fs::read_to_string("/proc/vmallocinfo") {
            Ok(text) => {
                let usage = procfs::parse_vmallocinfo(&text, self.page_size);
                self.vmallocinfo_unparsed_lines += usage.lines_unparsed;
                Some(usage)
            }
            Err(error) => {
                self.problems.push(format!(
                    "no vmalloc callers (reading /proc/vmallocinfo: {error}); run as root"
                ));
                self.vmalloc_readable = false;
                None
            }
        }
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = self.problems.clone();
        if self.slabinfo_unparsed_lines > 0 {
            notes.push(format!(
                "{} /proc/slabinfo lines did not parse and were left out",
                self.slabinfo_unparsed_lines
            ));
        }
        if self.vmallocinfo_unparsed_lines > 0 {
            notes.push(format!(
                "{} /proc/vmallocinfo lines did not parse and were left out",
                self.vmallocinfo_unparsed_lines
            ));
        }
        notes
    }
}

fn read_meminfo() -> Result<Meminfo> {
    let text = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let meminfo = procfs::parse_meminfo(&text);
    if meminfo.get("MemTotal").is_none() {
        bail!("/proc/meminfo has no MemTotal line");
    }
    Ok(meminfo)
}

/// Reads reclaim_account and the merge links of every name under `root`. Unreadable (not
/// root, no sysfs): empty facts and a note.
fn read_cache_facts(root: &Path) -> (CacheFacts, Option<String>) {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(error) => {
            return (
                CacheFacts::default(),
                Some(format!(
                    "which caches are reclaimable is unknown (reading {}: {error})",
                    root.display()
                )),
            );
        }
    };
    let mut facts = CacheFacts::default();
    let mut unreadable = None;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // SLUB's own names for merged caches, like :0000064; the names users know link there.
        if name.starts_with(':') {
            continue;
        }
        let path = entry.path();
        match fs::read_to_string(path.join("reclaim_account")) {
            Ok(text) => {
                facts.reclaimable.insert(name, text.trim() == "1");
            }
            Err(error) => {
                unreadable.get_or_insert_with(|| format!("{}: {error}", path.display()));
            }
        }
    }
    facts.merges = SlabMerges::read_from(root);
    let which = if facts.reclaimable.is_empty() {
        "any"
    } else {
        "some"
    };
    let problem = unreadable.map(|detail| {
        format!("whether {which} caches are reclaimable is unknown (reading {detail})")
    });
    (facts, problem)
}

/// Reads every cache directory under `root` (links are aliases of a merged cache and would
/// count it twice). A merged cache's directory has a SLUB-made name like :0000064; it is
/// reported under the first of its aliases instead.
fn read_sys_slab(root: &Path, facts: &CacheFacts) -> Result<Vec<SlabCache>> {
    let entries = fs::read_dir(root).with_context(|| format!("reading {}", root.display()))?;
    let mut caches = Vec::new();
    let mut first_error = None;
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().map_or(true, |kind| kind.is_symlink()) {
            continue;
        }
        let directory = entry.file_name().to_string_lossy().into_owned();
        let read = |file: &str| fs::read_to_string(path.join(file));
        let texts = [
            read("objects"),
            read("total_objects"),
            read("object_size"),
            read("order"),
            read("slabs"),
        ];
        if let Some(Err(error)) = texts.iter().find(|text| text.is_err()) {
            first_error.get_or_insert_with(|| format!("{}: {error}", path.display()));
            continue;
        }
        let [objects, total_objects, object_size, order, slabs] =
            texts.each_ref().map(|text| text.as_deref().ok());
        let files = SysSlabFiles {
            objects,
            total_objects,
            object_size,
            order,
            slabs,
        };
        let name = if directory.starts_with(':') {
            facts
                .merges
                .first_name_in(&directory)
                .map_or(directory.clone(), str::to_owned)
        } else {
            directory
        };
        if let Some(cache) = procfs::parse_sys_slab(&name, &files) {
            caches.push(cache);
        }
    }
    if caches.is_empty() {
        bail!(
            "no cache statistics under {}{}",
            root.display(),
            first_error.map_or_else(String::new, |error| format!(" ({error})"))
        );
    }
    Ok(caches)
}
