//! From a series of samples to trends per kind, per slab cache and per vmalloc caller, and the
//! verdict. Pure: the samples come in, the report goes out.
use std::{cmp::Reverse, collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    kernel::{
        procfs::{Meminfo, SlabCache, VmallocUsage},
        slab_merges::SlabMerges,
    },
    util::build::Producer,
};

/// Version of the JSON layout; bumped only for incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// A fitted growth counts only if it is at least this many times the scatter of the samples
/// around the fitted line, so that a kind that goes up and down is not called growing.
pub const SCATTER_FACTOR: f64 = 3.0;

/// kmalloc requests above KMALLOC_MAX_CACHE_SIZE (two pages) skip the kmalloc caches and take
/// pages straight from the page allocator; meminfo counts them in SUnreclaim.
const LARGE_KMALLOC: &str = "large kmalloc";

const UNRECLAIMABLE_KIND: &str = "slab_unreclaimable";
const RECLAIMABLE_KIND: &str = "slab_reclaimable";

/// Caches or callers named per kind in the one-line summary (the JSON lists them all).
const NAMED_IN_SUMMARY: usize = 3;

/// The suggested `memleak trace` runs long enough for the fastest growth seen to reach this.
const TRACE_TARGET_BYTES: f64 = (1 << 20) as f64;
const TRACE_MIN_SECONDS: u64 = 30;
const TRACE_MAX_SECONDS: u64 = 600;

/// One reading of everything classify samples.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the first sample.
    pub at: Duration,
    pub meminfo: Meminfo,
    /// Free pages on the per-CPU lists (from /proc/zoneinfo), in bytes; 0 when unknown.
    pub pcp_free_bytes: u64,
    /// None when no slab statistics could be read for this sample.
    pub slab: Option<Vec<SlabCache>>,
    pub vmalloc: Option<VmallocUsage>,
}

/// What /sys/kernel/slab says about cache names, read once.
#[derive(Debug, Clone, Default)]
pub struct CacheFacts {
    /// SLAB_RECLAIM_ACCOUNT, from /sys/kernel/slab/NAME/reclaim_account.
    pub reclaimable: BTreeMap<String, bool>,
    /// Which names SLUB merged into one cache.
    pub merges: SlabMerges,
}

/// What growth counts as growing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// The fitted growth rate must be at least this.
    pub min_rate_bytes_per_second: u64,
    /// The fitted growth over the window must be at least this.
    pub noise_floor_bytes: u64,
    /// ... and at least this many times the samples' scatter around the fitted line.
    pub scatter_factor: f64,
}

impl Thresholds {
    pub(crate) fn is_growing(&self, trend: &Trend, window_seconds: f64) -> bool {
        let fitted_growth = trend.slope * window_seconds;
        trend.slope >= self.min_rate_bytes_per_second as f64
            && fitted_growth >= self.noise_floor_bytes as f64
            && fitted_growth >= self.scatter_factor * trend.scatter
    }
}

/// A least-squares line through a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trend {
    /// Units per second.
    pub slope: f64,
    /// Root-mean-square distance of the samples from the line.
    pub scatter: f64,
}

impl Trend {
    /// What a series too short to fit is taken as.
    const FLAT: Self = Self {
        slope: 0.0,
        scatter: 0.0,
    };
}

/// Fits `value = a + slope * seconds` by least squares. None with fewer than two distinct
/// times.
pub fn fit(points: &[(f64, f64)]) -> Option<Trend> {
    if points.len() < 2 {
        return None;
    }
    let count = points.len() as f64;
    let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / count;
    let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / count;
    let spread_x: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    if spread_x <= f64::EPSILON {
        return None;
    }
    let covariance: f64 = points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    let slope = covariance / spread_x;
    let squared_residuals: f64 = points
        .iter()
        .map(|(x, y)| (y - (mean_y + slope * (x - mean_x))).powi(2))
        .sum();
    Some(Trend {
        slope,
        scatter: (squared_residuals / count).sqrt(),
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    /// The memleak that wrote the report (absent from older reports: `unknown`).
    #[serde(default)]
    pub memleak: Producer,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// From the first sample to the last.
    pub duration_ms: u64,
    pub samples: usize,
    pub page_size: u64,
    pub thresholds: Thresholds,
    /// Missing sources and fallbacks, in plain words.
    pub notes: Vec<String>,
    /// Every kind, largest first.
    pub kinds: Vec<KindTrend>,
    /// Slab caches that are not reclaimable (or not known to be), largest first.
    pub unreclaimable_caches: Vec<CacheTrend>,
    /// Slab caches that grew above the thresholds, fastest first.
    pub growing_caches: Vec<CacheTrend>,
    /// vmalloc'd memory by allocating function, largest first.
    pub vmalloc_callers: Vec<CallerTrend>,
    pub verdict: Verdict,
}

/// Sizes are from the last sample; growth is the least-squares slope over all samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindTrend {
    pub name: String,
    pub bytes: u64,
    pub growth_bytes_per_second: i64,
    pub growth_bytes_per_hour: i64,
    /// Root-mean-square distance of the samples from the fitted line.
    pub scatter_bytes: u64,
    pub growing: bool,
    /// Derived by subtracting the other counters (see the README), not read directly.
    pub estimate: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheTrend {
    pub name: String,
    /// Other caches SLUB merged with this one: their objects are counted here too.
    pub aliases: Vec<String>,
    /// SLAB_RECLAIM_ACCOUNT; None when /sys/kernel/slab could not be read.
    pub reclaimable: Option<bool>,
    /// Memory in the cache's slabs.
    pub bytes: u64,
    pub active_objects: u64,
    pub object_size: u64,
    pub growth_bytes_per_second: i64,
    pub growth_bytes_per_hour: i64,
    pub growth_objects_per_second: f64,
    pub growing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallerTrend {
    pub caller: String,
    pub bytes: u64,
    pub growth_bytes_per_second: i64,
    pub growth_bytes_per_hour: i64,
    pub growing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether any kind grew above the thresholds, a slab kind also when one of its caches
    /// did (reclaimable slab only with --blame-reclaimable).
    pub growing: bool,
    /// The growing kinds, fastest first.
    pub kinds: Vec<String>,
    /// The growing slab caches of the growing slab kinds, fastest first.
    pub caches: Vec<String>,
    /// Growing reclaimable caches, when reclaimable slab grew but is not blamed.
    pub reclaimable_caches: Vec<String>,
    /// The growing vmalloc callers, when vmalloc grows, fastest first.
    pub vmalloc_callers: Vec<String>,
    pub summary: String,
    /// What to run next.
    pub next_command: Option<String>,
}

/// Everything besides the samples that shapes the report.
#[derive(Debug, Clone)]
pub struct Context {
    pub kernel: String,
    pub page_size: u64,
    pub thresholds: Thresholds,
    pub facts: CacheFacts,
    pub notes: Vec<String>,
    /// Entries shown per table.
    pub top: usize,
    /// Which `memleak trace --kinds` values exist, by kind name (`slab`, `vmalloc`, ...).
    pub traceable: Vec<String>,
    /// The classify window asked for, to suggest a longer one when nothing grew.
    pub requested: Duration,
    /// Whether growth of reclaimable slab counts as growth in the verdict.
    pub blame_reclaimable: bool,
}

/// The kinds, as functions of one sample. The other-pages estimate is what is in use but in
/// none of the other counters (see `other_pages`).
const KINDS: [KindSource; 6] = [
    KindSource {
        name: UNRECLAIMABLE_KIND,
        bytes: |s| s.meminfo.bytes("SUnreclaim"),
        estimate: false,
    },
    KindSource {
        name: RECLAIMABLE_KIND,
        bytes: |s| s.meminfo.bytes("SReclaimable"),
        estimate: false,
    },
    KindSource {
        name: "vmalloc",
        bytes: |s| s.meminfo.bytes("VmallocUsed"),
        estimate: false,
    },
    KindSource {
        name: "percpu",
        bytes: |s| s.meminfo.bytes("Percpu"),
        estimate: false,
    },
    KindSource {
        name: "page_tables",
        bytes: |s| {
            s.meminfo
                .bytes("PageTables")
                .saturating_add(s.meminfo.bytes("SecPageTables"))
        },
        estimate: false,
    },
    KindSource {
        name: "other_pages",
        bytes: |s| other_pages(&s.meminfo, s.pcp_free_bytes),
        estimate: true,
    },
];

struct KindSource {
    name: &'static str,
    bytes: fn(&Sample) -> u64,
    estimate: bool,
}

/// Memory in use (MemTotal - MemFree) that no other counter explains: neither free pages
/// parked on per-CPU lists (`pcp_free_bytes`, from /proc/zoneinfo), nor on the LRU lists (page
/// cache, anonymous, unevictable), nor slab, other reclaimable kernel memory, page tables,
/// vmalloc, percpu, hugetlb pools, zswap's pool or unaccepted memory. What is left is pages
/// taken straight from the page allocator (pipe buffers, network buffers, driver and GPU
/// memory), plus pages in transit (freed but not yet back in the free lists, taken off the LRU
/// for migration). Kernel stacks are not subtracted: with CONFIG_VMAP_STACK (the default on
/// x86-64 and arm64) they are vmalloc'd and already in VmallocUsed.
pub fn other_pages(m: &Meminfo, pcp_free_bytes: u64) -> u64 {
    let in_use = m.bytes("MemTotal").saturating_sub(m.bytes("MemFree"));
    let kernel_reclaimable = m.bytes("KReclaimable").max(m.bytes("SReclaimable"));
    let explained = [
        pcp_free_bytes,
        m.bytes("Active"),
        m.bytes("Inactive"),
        m.bytes("Unevictable"),
        kernel_reclaimable,
        m.bytes("SUnreclaim"),
        m.bytes("PageTables"),
        m.bytes("SecPageTables"),
        m.bytes("VmallocUsed"),
        m.bytes("Percpu"),
        m.bytes("Hugetlb"),
        m.bytes("Zswap"),
        m.bytes("Unaccepted"),
    ]
    .iter()
    .fold(0, |total: u64, bytes| total.saturating_add(*bytes));
    in_use.saturating_sub(explained)
}

fn seconds(at: Duration) -> f64 {
    at.as_secs_f64()
}

fn rounded(value: f64) -> i64 {
    value.round() as i64
}

/// Builds the report from at least two samples (fewer give no trend; the caller ensures it).
pub fn analyze(samples: &[Sample], context: &Context) -> Report {
    let window = samples
        .last()
        .map_or(Duration::ZERO, |last| last.at.saturating_sub(samples[0].at));
    let window_seconds = seconds(window);
    let thresholds = &context.thresholds;
    let mut kinds: Vec<KindTrend> = KINDS
        .iter()
        .map(|kind| {
            let points: Vec<(f64, f64)> = samples
                .iter()
                .map(|sample| (seconds(sample.at), (kind.bytes)(sample) as f64))
                .collect();
            let trend = fit(&points).unwrap_or(Trend::FLAT);
            KindTrend {
                name: kind.name.to_owned(),
                bytes: samples.last().map_or(0, kind.bytes),
                growth_bytes_per_second: rounded(trend.slope),
                growth_bytes_per_hour: rounded(trend.slope * 3600.0),
                scatter_bytes: trend.scatter as u64,
                growing: thresholds.is_growing(&trend, window_seconds),
                estimate: kind.estimate,
            }
        })
        .collect();
    kinds.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));

    let caches = cache_trends(samples, context, window_seconds);
    let mut unreclaimable_caches: Vec<CacheTrend> = caches
        .iter()
        .filter(|cache| cache.reclaimable != Some(true))
        .cloned()
        .collect();
    unreclaimable_caches.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    let mut growing_caches: Vec<CacheTrend> =
        caches.into_iter().filter(|cache| cache.growing).collect();
    growing_caches.sort_by(|a, b| {
        b.growth_bytes_per_second
            .cmp(&a.growth_bytes_per_second)
            .then_with(|| a.name.cmp(&b.name))
    });

    let mut vmalloc_callers = caller_trends(samples, thresholds, window_seconds);
    vmalloc_callers.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.caller.cmp(&b.caller)));

    let verdict = verdict(&kinds, &growing_caches, &vmalloc_callers, context, window);
    unreclaimable_caches.truncate(context.top);
    growing_caches.truncate(context.top);
    vmalloc_callers.truncate(context.top);
    Report {
        schema: SCHEMA_VERSION,
        memleak: Producer::this(),
        kernel: context.kernel.clone(),
        duration_ms: window.as_millis() as u64,
        samples: samples.len(),
        page_size: context.page_size,
        thresholds: *thresholds,
        notes: context.notes.clone(),
        kinds,
        unreclaimable_caches,
        growing_caches,
        vmalloc_callers,
        verdict,
    }
}

/// One trend per cache seen in any sample (absent from a sample: empty then), plus the large
/// kmalloc allocations when the cache flags are known.
fn cache_trends(samples: &[Sample], context: &Context, window_seconds: f64) -> Vec<CacheTrend> {
    let with_slab: Vec<(&Sample, &Vec<SlabCache>)> = samples
        .iter()
        .filter_map(|sample| sample.slab.as_ref().map(|caches| (sample, caches)))
        .collect();
    let page_size = context.page_size;
    let facts = &context.facts;
    let mut series: BTreeMap<&str, CacheSeries> = BTreeMap::new();
    for (index, (sample, caches)) in with_slab.iter().enumerate() {
        let at = seconds(sample.at);
        for cache in caches.iter() {
            let entry = series.entry(&cache.name).or_insert_with(|| {
                // Created during the window: empty before.
                let before: Vec<(f64, f64)> = with_slab[..index]
                    .iter()
                    .map(|(earlier, _)| (seconds(earlier.at), 0.0))
                    .collect();
                CacheSeries {
                    bytes: before.clone(),
                    objects: before,
                    last: cache,
                    last_seen: index,
                }
            });
            entry.bytes.push((at, cache.bytes(page_size) as f64));
            entry.objects.push((at, cache.active_objects as f64));
            entry.last = cache;
            entry.last_seen = index;
        }
        for entry in series.values_mut() {
            // Destroyed during the window: empty from then on.
            if entry.bytes.len() < index + 1 {
                entry.bytes.push((at, 0.0));
                entry.objects.push((at, 0.0));
            }
        }
    }
    let mut trends: Vec<CacheTrend> = series
        .iter()
        .map(|(name, series)| {
            let trend = fit(&series.bytes).unwrap_or(Trend::FLAT);
            let objects = fit(&series.objects).unwrap_or(Trend::FLAT);
            let (bytes, active_objects) = if series.last_seen + 1 == with_slab.len() {
                (series.last.bytes(page_size), series.last.active_objects)
            } else {
                (0, 0)
            };
            CacheTrend {
                name: (*name).to_owned(),
                aliases: facts.merges.others(name),
                reclaimable: facts.reclaimable.get(*name).copied(),
                bytes,
                active_objects,
                object_size: series.last.object_size,
                growth_bytes_per_second: rounded(trend.slope),
                growth_bytes_per_hour: rounded(trend.slope * 3600.0),
                growth_objects_per_second: (objects.slope * 10.0).round() / 10.0,
                growing: context.thresholds.is_growing(&trend, window_seconds),
            }
        })
        .collect();
    if !facts.reclaimable.is_empty() && !with_slab.is_empty() {
        trends.push(large_kmalloc(&with_slab, context, window_seconds));
    }
    trends
}

/// One cache's readings: (seconds, bytes) and (seconds, active objects) per sample.
struct CacheSeries<'a> {
    bytes: Vec<(f64, f64)>,
    objects: Vec<(f64, f64)>,
    last: &'a SlabCache,
    /// The sample `last` is from: a cache destroyed during the window is not in the last one.
    last_seen: usize,
}

/// SUnreclaim minus the unreclaimable caches' slabs: the large kmalloc allocations.
fn large_kmalloc(
    with_slab: &[(&Sample, &Vec<SlabCache>)],
    context: &Context,
    window_seconds: f64,
) -> CacheTrend {
    let points: Vec<(f64, f64)> = with_slab
        .iter()
        .map(|(sample, caches)| {
            let in_caches = caches
                .iter()
                .filter(|cache| context.facts.reclaimable.get(&cache.name) != Some(&true))
                .fold(0, |total: u64, cache| {
                    total.saturating_add(cache.bytes(context.page_size))
                });
            let unreclaimable = sample.meminfo.bytes("SUnreclaim");
            (
                seconds(sample.at),
                unreclaimable.saturating_sub(in_caches) as f64,
            )
        })
        .collect();
    let trend = fit(&points).unwrap_or(Trend::FLAT);
    CacheTrend {
        name: LARGE_KMALLOC.to_owned(),
        aliases: Vec::new(),
        reclaimable: Some(false),
        bytes: points.last().map_or(0, |(_, bytes)| *bytes as u64),
        active_objects: 0,
        object_size: 0,
        growth_bytes_per_second: rounded(trend.slope),
        growth_bytes_per_hour: rounded(trend.slope * 3600.0),
        growth_objects_per_second: 0.0,
        growing: context.thresholds.is_growing(&trend, window_seconds),
    }
}

fn caller_trends(
    samples: &[Sample],
    thresholds: &Thresholds,
    window_seconds: f64,
) -> Vec<CallerTrend> {
    let with_vmalloc: Vec<(&Sample, &VmallocUsage)> = samples
        .iter()
        .filter_map(|sample| sample.vmalloc.as_ref().map(|usage| (sample, usage)))
        .collect();
    let callers: std::collections::BTreeSet<&str> = with_vmalloc
        .iter()
        .flat_map(|(_, usage)| usage.by_caller.keys().map(String::as_str))
        .collect();
    callers
        .into_iter()
        .map(|caller| {
            let points: Vec<(f64, f64)> = with_vmalloc
                .iter()
                .map(|(sample, usage)| {
                    let bytes = usage.by_caller.get(caller).copied().unwrap_or(0);
                    (seconds(sample.at), bytes as f64)
                })
                .collect();
            let trend = fit(&points).unwrap_or(Trend::FLAT);
            CallerTrend {
                caller: caller.to_owned(),
                bytes: points.last().map_or(0, |(_, bytes)| *bytes as u64),
                growth_bytes_per_second: rounded(trend.slope),
                growth_bytes_per_hour: rounded(trend.slope * 3600.0),
                growing: thresholds.is_growing(&trend, window_seconds),
            }
        })
        .collect()
}

/// `word` as a shell reads it back: as is when it has no special characters, else quoted.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:+@%/=,".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The `memleak trace --kinds` value that follows a classify kind, if trace has it.
fn trace_kind(kind: &str, traceable: &[String]) -> Option<&'static str> {
    let wanted = match kind {
        UNRECLAIMABLE_KIND | RECLAIMABLE_KIND => "slab",
        "vmalloc" => "vmalloc",
        "percpu" => "percpu",
        "other_pages" | "page_tables" => "page",
        _ => return None,
    };
    traceable
        .iter()
        .any(|known| known == wanted)
        .then_some(wanted)
}

/// A rate in bytes with its sign: "+1.5 KiB", "-512 B".
fn signed_bytes(bytes_per_second: i64) -> String {
    let sign = if bytes_per_second < 0 { "-" } else { "+" };
    format!(
        "{sign}{}",
        crate::util::units::human_bytes(bytes_per_second.unsigned_abs())
    )
}

fn verdict(
    kinds: &[KindTrend],
    growing_caches: &[CacheTrend],
    vmalloc_callers: &[CallerTrend],
    context: &Context,
    window: Duration,
) -> Verdict {
    let caches_of = |reclaimable: bool| -> Vec<&CacheTrend> {
        growing_caches
            .iter()
            .filter(|cache| cache.reclaimable.is_none_or(|flag| flag == reclaimable))
            .collect()
    };
    // The fastest growing cache of a slab kind. A cache's own series is sharper than the
    // kind's total, in which other caches' frees (processes exiting, say) can hide it.
    let fastest_cache = |kind: &KindTrend| -> Option<i64> {
        let caches = match kind.name.as_str() {
            UNRECLAIMABLE_KIND => caches_of(false),
            RECLAIMABLE_KIND => caches_of(true)
                .into_iter()
                .filter(|cache| cache.reclaimable.is_some())
                .collect(),
            _ => Vec::new(),
        };
        caches
            .iter()
            .map(|cache| cache.growth_bytes_per_second)
            .max()
    };
    let grows = |kind: &KindTrend| kind.growing || fastest_cache(kind).is_some();
    let blamed = |kind: &KindTrend| {
        grows(kind) && (context.blame_reclaimable || kind.name != RECLAIMABLE_KIND)
    };
    let rate_of = |kind: &KindTrend| {
        kind.growth_bytes_per_second
            .max(fastest_cache(kind).unwrap_or(i64::MIN))
    };
    let mut growing: Vec<&KindTrend> = kinds.iter().filter(|kind| blamed(kind)).collect();
    growing.sort_by_key(|kind| Reverse(rate_of(kind)));
    let reclaimable_growth = kinds
        .iter()
        .find(|kind| kind.name == RECLAIMABLE_KIND && kind.growing && !blamed(kind));
    let is_blamed = |name: &str| growing.iter().any(|kind| kind.name == name);
    let mut caches: Vec<&CacheTrend> = Vec::new();
    if is_blamed(UNRECLAIMABLE_KIND) {
        caches.extend(caches_of(false));
    }
    if is_blamed(RECLAIMABLE_KIND) {
        caches.extend(
            caches_of(true)
                .into_iter()
                .filter(|cache| cache.reclaimable.is_some()),
        );
    }
    caches.sort_by_key(|cache| Reverse(cache.growth_bytes_per_second));
    let reclaimable_caches: Vec<&CacheTrend> = if reclaimable_growth.is_some() {
        growing_caches
            .iter()
            .filter(|cache| cache.reclaimable == Some(true))
            .collect()
    } else {
        Vec::new()
    };
    let callers: Vec<&CallerTrend> = if is_blamed("vmalloc") {
        let mut callers: Vec<&CallerTrend> = vmalloc_callers
            .iter()
            .filter(|caller| caller.growing)
            .collect();
        callers.sort_by_key(|caller| Reverse(caller.growth_bytes_per_second));
        callers
    } else {
        Vec::new()
    };

    let rate = |bytes_per_second: i64| {
        format!(
            "+{}/s",
            crate::util::units::human_bytes(bytes_per_second.max(0) as u64)
        )
    };
    let named_caches = |caches: &[&CacheTrend]| -> String {
        let names: Vec<String> = caches
            .iter()
            .take(NAMED_IN_SUMMARY)
            .map(|cache| format!("{} {}", cache.name, rate(cache.growth_bytes_per_second)))
            .collect();
        if names.is_empty() {
            String::new()
        } else {
            format!(" ({})", names.join(", "))
        }
    };
    let window_text = crate::util::duration::display(window);
    let mut summary = if growing.is_empty() {
        format!("no growth: no kind of kernel memory grew above the thresholds in {window_text}")
    } else {
        let parts: Vec<String> = growing
            .iter()
            .map(|kind| {
                let named = match kind.name.as_str() {
                    UNRECLAIMABLE_KIND => named_caches(&caches_of(false)),
                    RECLAIMABLE_KIND => named_caches(&caches_of(true)),
                    "vmalloc" => {
                        let names: Vec<String> = callers
                            .iter()
                            .take(NAMED_IN_SUMMARY)
                            .map(|caller| {
                                format!(
                                    "{} {}",
                                    caller.caller,
                                    rate(caller.growth_bytes_per_second)
                                )
                            })
                            .collect();
                        if names.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", names.join(", "))
                        }
                    }
                    _ => String::new(),
                };
                if kind.growing {
                    format!(
                        "{} {}{named}",
                        kind.name,
                        rate(kind.growth_bytes_per_second)
                    )
                } else {
                    format!(
                        "{}{named}, while its total moved {}/s (other caches shrank)",
                        kind.name,
                        signed_bytes(kind.growth_bytes_per_second)
                    )
                }
            })
            .collect();
        format!("growing in {window_text}: {}", parts.join("; "))
    };
    if let Some(kind) = reclaimable_growth {
        summary.push_str(&format!(
            "; {RECLAIMABLE_KIND} grew{}, {}{}, which the kernel frees under memory \
             pressure: usually cache, not a leak (drop caches with \
             `echo 2 > /proc/sys/vm/drop_caches` and classify again, or pass \
             --blame-reclaimable)",
            if growing.is_empty() { "" } else { " too" },
            rate(kind.growth_bytes_per_second),
            named_caches(&reclaimable_caches)
        ));
    }

    let next_command = if growing.is_empty() {
        let longer =
            (context.requested * 6).clamp(Duration::from_secs(60), Duration::from_secs(3600));
        Some(format!("memleak classify --duration {}s", longer.as_secs()))
    } else {
        let mut trace_kinds: Vec<&'static str> = Vec::new();
        for kind in &growing {
            if let Some(trace) = trace_kind(&kind.name, &context.traceable)
                && !trace_kinds.contains(&trace)
            {
                trace_kinds.push(trace);
            }
        }
        if trace_kinds.is_empty() {
            summary.push_str("; memleak trace cannot follow this kind yet");
        }
        (!trace_kinds.is_empty()).then(|| {
            let fastest = rate_of(growing[0]).max(1) as f64;
            let seconds = ((TRACE_TARGET_BYTES / fastest).ceil() as u64)
                .clamp(TRACE_MIN_SECONDS, TRACE_MAX_SECONDS);
            let mut command = format!(
                "memleak trace --kinds {} --duration {seconds}s",
                trace_kinds.join(",")
            );
            match caches.first() {
                Some(cache) if trace_kinds == ["slab"] && cache.name == LARGE_KMALLOC => {
                    // kmalloc caches hold objects of up to two pages; larger requests are
                    // large kmallocs.
                    command.push_str(&format!(" --min-size {}", 2 * context.page_size + 1));
                }
                // trace --cache scopes the report's leak check to the cache and looks for the
                // largest group of similar objects in it.
                Some(cache) if trace_kinds == ["slab"] => {
                    command.push_str(&format!(" --cache {}", shell_word(&cache.name)));
                }
                _ => {}
            }
            command
        })
    };
    Verdict {
        growing: !growing.is_empty(),
        kinds: growing.iter().map(|kind| kind.name.clone()).collect(),
        caches: caches.iter().map(|cache| cache.name.clone()).collect(),
        reclaimable_caches: reclaimable_caches
            .iter()
            .map(|cache| cache.name.clone())
            .collect(),
        vmalloc_callers: callers.iter().map(|caller| caller.caller.clone()).collect(),
        summary,
        next_command,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_bytes_keeps_the_sign_of_a_shrinking_total() {
        assert_eq!(signed_bytes(-512), "-512 B");
        assert_eq!(signed_bytes(1536), "+1.5 KiB");
        assert_eq!(signed_bytes(0), "+0 B");
    }

    #[test]
    fn each_kind_points_to_the_trace_kind_that_follows_it() {
        let all: Vec<String> = ["slab", "page", "vmalloc", "percpu"]
            .map(String::from)
            .to_vec();
        for (kind, wanted) in [
            (UNRECLAIMABLE_KIND, Some("slab")),
            (RECLAIMABLE_KIND, Some("slab")),
            ("vmalloc", Some("vmalloc")),
            ("percpu", Some("percpu")),
            ("other_pages", Some("page")),
            ("page_tables", Some("page")),
            ("kernel_stack", None),
        ] {
            assert_eq!(trace_kind(kind, &all), wanted, "{kind}");
        }
        assert_eq!(trace_kind("percpu", &["slab".to_owned()]), None);
    }
}
