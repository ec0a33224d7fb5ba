//! `memleak classify`: samples /proc/meminfo, /proc/slabinfo (or /sys/kernel/slab) and
//! /proc/vmallocinfo for a few seconds and says which kind of kernel memory grows, without
//! tracing anything.
mod analysis;
pub(crate) mod parse;
mod render;

use std::{
    fs,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum as _;

use self::{
    analysis::{CacheFacts, Context, Sample, Thresholds},
    parse::{Meminfo, SlabCache, SysSlabFiles, VmallocUsage},
};
use crate::{
    cli::{Format, Kind, ReportOptions},
    duration, kernel,
    output::ReportSink,
    signals::StopSignals,
};

const SYS_SLAB: &str = "/sys/kernel/slab";

/// `memleak classify`'s options; the command's help text is in cli.rs.
#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// How long to sample, like 10s or 5m (at least two intervals). Ctrl-C or SIGTERM end the
    /// window early; the report is printed either way.
    #[arg(short, long, default_value = "10s", value_parser = parse_window)]
    pub duration: Duration,

    /// Time between samples, like 1s or 500ms.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,

    /// Growth slower than this many bytes per second is not growth (1024 B/s is about
    /// 3.5 MiB an hour).
    #[arg(long, value_name = "BYTES", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(0..=1 << 40))]
    pub min_rate: u64,

    /// Growth of less than this many bytes over the whole window is noise.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u64).range(0..=1 << 50))]
    pub noise_floor: u64,

    /// Blame growth of reclaimable slab (dentries, inodes: caches the kernel frees under
    /// memory pressure) in the verdict too. Without it, such growth is reported but not
    /// called a leak.
    #[arg(long)]
    pub blame_reclaimable: bool,

    #[command(flatten)]
    pub report: ReportOptions,
}

fn parse_window(text: &str) -> Result<Duration, String> {
    duration::parse_in_range(
        text,
        Duration::from_millis(200),
        Duration::from_secs(86_400),
    )
    .map_err(|error| error.to_string())
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    duration::parse_in_range(text, Duration::from_millis(100), Duration::from_secs(3_600))
        .map_err(|error| error.to_string())
}

pub fn run(args: &ClassifyArgs) -> Result<ExitCode> {
    if args.interval * 2 > args.duration {
        bail!(
            "--duration {} is shorter than two --interval {}: a trend needs at least three samples",
            duration::display(args.duration),
            duration::display(args.interval)
        );
    }
    let sink = ReportSink::open(args.report.output.as_deref())?;
    let kernel = kernel::release()?;
    let page_size = page_size()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut sampler = Sampler::new(page_size);
    let samples = runtime.block_on(sample_window(&mut sampler, args))?;
    if samples.len() < 2 {
        bail!("interrupted before a second sample: no trend to report");
    }
    let context = Context {
        kernel,
        page_size,
        thresholds: Thresholds {
            min_rate_bytes_per_second: args.min_rate,
            noise_floor_bytes: args.noise_floor,
            scatter_factor: analysis::SCATTER_FACTOR,
        },
        facts: sampler.facts.clone(),
        notes: sampler.notes(),
        top: args.report.top as usize,
        traceable: Kind::value_variants()
            .iter()
            .filter_map(|kind| kind.to_possible_value())
            .map(|value| value.get_name().to_owned())
            .collect(),
        requested: args.duration,
        blame_reclaimable: args.blame_reclaimable,
    };
    let report = analysis::analyze(&samples, &context);
    let rendered = match args.report.format {
        Format::Text => render::render_text(&report),
        Format::Json => crate::report::render_json(&report),
    };
    sink.write(&rendered)?;
    Ok(ExitCode::SUCCESS)
}

fn page_size() -> Result<u64> {
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|size| *size > 0)
        .context("sysconf(_SC_PAGESIZE) failed")
}

/// Samples every interval until the window ends or a signal arrives.
async fn sample_window(sampler: &mut Sampler, args: &ClassifyArgs) -> Result<Vec<Sample>> {
    let mut signals = StopSignals::install()?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + args.duration;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = Vec::new();
    loop {
        tokio::select! {
            _ = signals.next() => break,
            _ = ticker.tick() => {
                samples.push(sampler.sample(started.elapsed())?);
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                samples.push(sampler.sample(started.elapsed())?);
                break;
            }
        }
    }
    Ok(samples)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlabSource {
    Slabinfo,
    Sysfs,
    Unavailable,
}

/// Reads the sources, remembering after the first sample which slab source works.
struct Sampler {
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
    fn new(page_size: u64) -> Self {
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

    fn sample(&mut self, at: Duration) -> Result<Sample> {
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
                parse::parse_zoneinfo_pcp_pages(&text)
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
        let slabinfo = parse::parse_slabinfo(&text).context("parsing /proc/slabinfo")?;
        self.slabinfo_unparsed_lines += slabinfo.unparsed_lines;
        Ok(slabinfo.caches)
    }

    fn read_vmalloc(&mut self) -> Option<VmallocUsage> {
        if !self.vmalloc_readable {
            return None;
        }
        match fs::read_to_string("/proc/vmallocinfo") {
            Ok(text) => {
                let usage = parse::parse_vmallocinfo(&text, self.page_size);
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
    let meminfo = parse::parse_meminfo(&text);
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
                facts.reclaimable.insert(name.clone(), text.trim() == "1");
            }
            Err(error) => {
                unreadable.get_or_insert_with(|| format!("{}: {error}", path.display()));
            }
        }
        let target = fs::read_link(&path)
            .ok()
            .and_then(|link| {
                link.file_name()
                    .map(|file| file.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| name.clone());
        facts.merged_into.insert(name, target);
    }
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
                .merged_into
                .iter()
                .find(|(_, target)| **target == directory)
                .map_or(directory.clone(), |(alias, _)| alias.clone())
        } else {
            directory
        };
        if let Some(cache) = parse::parse_sys_slab(&name, &files) {
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

#[cfg(test)]
mod tests;
