//! `memleak watch`: continuous leak detection. Every interval it snapshots each allocation
//! site's outstanding objects (snapshot.rs), adds them to the site's series, keeps the series
//! in a store that survives restarts (history.rs), and judges each site from its series
//! (verdict.rs) instead of from one window.
pub mod history;
pub mod snapshot;
pub mod timeline;
pub mod verdict;

use std::{path::PathBuf, time::Duration};

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use self::verdict::{Judgement, Point, Severity, Thresholds};
use crate::{bpf::probes::TracerSettings, symbols::Frame, util::build::Producer};

/// Version of the JSON Lines layout; bumped only for incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// What `memleak watch` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub tracer: TracerSettings,
    pub interval: Duration,
    /// Stop after this long; without it, at SIGINT or SIGTERM.
    pub duration: Option<Duration>,
    pub thresholds: Thresholds,
    /// Intervals each verdict looks back over at most.
    pub window_points: usize,
    /// The history store; `None` keeps the series in memory only.
    pub history: Option<PathBuf>,
    /// How long the store keeps points and verdicts.
    pub retain: Duration,
    /// Sites listed per interval.
    pub top: usize,
    /// Percent of each interval the slab allocation hooks are attached (100: always).
    pub duty_percent: u32,
}

impl Options {
    /// How long, from the start of each interval, the slab allocation hooks stay attached (the
    /// free hooks always are); `None` when they are always attached.
    pub fn duty_window(&self) -> Option<Duration> {
        (self.duty_percent < 100).then(|| self.interval * self.duty_percent / 100)
    }

    /// What one tracked object stands for: the sample rate, divided by the share of time the
    /// allocation hooks are attached.
    pub fn scale(&self) -> u32 {
        (f64::from(self.tracer.sample_rate) * 100.0 / f64::from(self.duty_percent)).round() as u32
    }
}

/// A site as the history and the reports name it: stable across restarts of memleak (no
/// addresses, which KASLR moves at each boot).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SiteName {
    pub kind: String,
    pub cache: Option<String>,
    /// `function+0xoff/0xsize [module]`, or the address when it could not be symbolized.
    pub call_site: String,
}

/// One site in one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteFigures {
    #[serde(flatten)]
    pub site: SiteName,
    /// Outstanding objects and bytes, scaled by the sample rate.
    pub count: u64,
    pub bytes: u64,
    /// Of `count`, allocated during this interval.
    pub new: u64,
    /// Of the objects outstanding at the previous snapshot, how many are gone now: freed, or
    /// found free in kernel memory. 0 in a watch's first interval. With `new`, it tells
    /// members being replaced (a pool: both move) from objects piling up (a leak: only `new`).
    #[serde(default)]
    pub freed: u64,
    /// Age of the site's oldest outstanding object.
    pub oldest_age_ms: u64,
    /// Median and 90th percentile of its outstanding objects' ages (of the tracked ones).
    #[serde(default)]
    pub median_age_ms: u64,
    #[serde(default)]
    pub p90_age_ms: u64,
    /// Of `count`, objects the liveness check could not verify as allocated.
    pub unverified: u64,
    /// Objects of this site found free in kernel memory this interval: they left by a path
    /// that fires no free event (kfree_rcu batches, bulk frees, sheaves).
    #[serde(default)]
    pub found_free: u64,
}

#[cfg(test)]
impl SiteFigures {
    /// `count` objects of `bytes` in all at `site`, nothing else known.
    pub(crate) fn of(site: SiteName, count: u64, bytes: u64) -> Self {
        Self {
            site,
            count,
            bytes,
            new: 0,
            freed: 0,
            oldest_age_ms: 0,
            median_age_ms: 0,
            p90_age_ms: 0,
            unverified: 0,
            found_free: 0,
        }
    }
}

/// A site judged growing, with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leak {
    #[serde(flatten)]
    pub site: SiteName,
    /// The other names of a kmem_cache site's cache, SLUB having merged it with them: its
    /// objects may be any of theirs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_merged_with: Vec<String>,
    pub count: u64,
    pub bytes: u64,
    #[serde(flatten)]
    pub judgement: Judgement,
    /// When the site was first judged at this severity or above (Unix milliseconds).
    pub since_ms: u64,
    /// The stack most of its sampled objects came through, innermost first (empty when no
    /// stack was captured).
    pub frames: Vec<Frame>,
}

/// The interval's counters, for the lost-event accounting every report carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalStats {
    /// Events during the interval.
    pub allocs: u64,
    pub frees: u64,
    pub dropped_table_full: u64,
    pub missed_frees: u64,
    pub stack_failures: u64,
    /// Outstanding objects and bytes over all sites, scaled by the sample rate.
    pub outstanding: u64,
    pub outstanding_bytes: u64,
    /// Objects found free in kernel memory (their free was not seen), removed from the table.
    pub found_free: u64,
    /// Objects the liveness check could not verify.
    pub unverified: u64,
    /// Objects the allocators keep for their own slabs and vmalloc areas, left out of the
    /// sites (see the trace report's `bookkeeping_objects`).
    #[serde(default)]
    pub bookkeeping_objects: u64,
    pub sites: u64,
}

/// One line of `watch --format json`: one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub schema: u32,
    /// The memleak that wrote the report (absent from older reports: `unknown`).
    #[serde(default)]
    pub memleak: Producer,
    /// When the snapshot was taken (Unix milliseconds).
    pub at_ms: u64,
    /// Since the watch started.
    pub elapsed_ms: u64,
    pub interval_ms: u64,
    pub sample_rate: u32,
    /// Percent of each interval the slab allocation hooks were attached.
    #[serde(default = "always")]
    pub duty_percent: u32,
    /// Counts are estimates, scaled by `sample_rate` and by 100 / `duty_percent`.
    pub estimated: bool,
    pub stats: IntervalStats,
    /// The largest sites by bytes (`--top`).
    pub sites: Vec<SiteFigures>,
    /// Sites judged growing, most severe first.
    pub leaks: Vec<Leak>,
    /// What the watch could not do this interval, in plain words.
    pub notes: Vec<String>,
}

/// Intervals written before `duty_percent` existed traced all the time.
fn always() -> u32 {
    100
}

/// Every site's series, oldest point first, and when each first reached each severity.
#[derive(Debug, Default)]
pub struct Series {
    points: HashMap<SiteName, Vec<(u64, Point)>>,
    since: HashMap<(SiteName, Severity), u64>,
    /// Points kept per site (the verdict's window).
    window_points: usize,
}

impl Series {
    pub fn new(window_points: usize) -> Self {
        Self {
            window_points: window_points.max(3),
            ..Self::default()
        }
    }

    /// Adds a site's figures at `at_ms` (Unix milliseconds).
    pub fn add(&mut self, at_ms: u64, figures: &SiteFigures) {
        self.add_point(
            figures.site.clone(),
            at_ms,
            Point {
                at_seconds: 0.0,
                count: figures.count,
                bytes: figures.bytes,
                oldest_age_seconds: figures.oldest_age_ms as f64 / 1000.0,
                found_free: figures.found_free,
            },
        );
    }

    /// Adds one point at `at_ms` (its `at_seconds` is set when judged); the history store
    /// replays its points through this on a restart.
    pub fn add_point(&mut self, site: SiteName, at_ms: u64, point: Point) {
        let series = self.points.entry(site).or_default();
        if series.last().is_some_and(|(last, _)| *last >= at_ms) {
            return;
        }
        series.push((at_ms, point));
        if series.len() > self.window_points {
            let excess = series.len() - self.window_points;
            series.drain(..excess);
        }
    }

    /// Sites seen before but absent at `at_ms` have no outstanding object left: they get a
    /// point of zero, so that their series shows the fall.
    pub fn mark_absent(&mut self, at_ms: u64, present: &hashbrown::HashSet<SiteName>) {
        let absent: Vec<SiteName> = self
            .points
            .iter()
            .filter(|(site, series)| {
                !present.contains(*site) && series.last().is_some_and(|(_, point)| point.count > 0)
            })
            .map(|(site, _)| site.clone())
            .collect();
        for site in absent {
            self.add_point(site, at_ms, Point::default());
        }
        // A site that stayed empty for a whole window is forgotten.
        self.points
            .retain(|_, series| series.iter().any(|(_, point)| point.count > 0));
    }

    /// Judges every site; records when each first reached its severity.
    pub fn judge(
        &mut self,
        at_ms: u64,
        thresholds: &Thresholds,
    ) -> Vec<(SiteName, Judgement, u64)> {
        let mut judged = Vec::new();
        for (site, series) in &self.points {
            let Some(&(origin, _)) = series.first() else {
                continue;
            };
            let points: Vec<Point> = series
                .iter()
                .map(|&(at, point)| Point {
                    at_seconds: at.saturating_sub(origin) as f64 / 1000.0,
                    ..point
                })
                .collect();
            if let Some(judgement) = verdict::judge(&points, thresholds) {
                let since = *self
                    .since
                    .entry((site.clone(), judgement.severity))
                    .or_insert(at_ms);
                judged.push((site.clone(), judgement, since));
            }
        }
        judged.sort_by(|a, b| {
            b.1.severity
                .cmp(&a.1.severity)
                .then(b.1.grown_bytes.cmp(&a.1.grown_bytes))
                .then_with(|| a.0.cmp(&b.0))
        });
        judged
    }

    pub fn sites(&self) -> usize {
        self.points.len()
    }

    /// A site's points (Unix milliseconds, point), oldest first.
    pub fn of(&self, site: &SiteName) -> &[(u64, Point)] {
        self.points.get(site).map_or(&[], Vec::as_slice)
    }
}
