//! What the dashboard draws over time: outstanding bytes per kind and those of the largest
//! sites, one point per interval, for the last intervals only (in memory; the history store is
//! what survives restarts).
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{SiteFigures, SiteName};

/// Sites kept per point: the dashboard's chart of the top sites draws at most these.
pub const SITES_PER_POINT: usize = 10;

/// Points kept: 12 hours at the default 60 s interval, in about a megabyte.
pub const DEFAULT_CAPACITY: usize = 720;

/// One interval's totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// When the snapshot was taken (Unix milliseconds).
    pub at_ms: u64,
    /// Outstanding bytes per kind, over every site (scaled like the sites' figures).
    pub kinds: BTreeMap<String, u64>,
    /// The interval's largest sites by outstanding bytes, largest first, then the judged
    /// sites (growing or leaking) that are not among them.
    pub sites: Vec<SiteBytes>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteBytes {
    #[serde(flatten)]
    pub site: SiteName,
    pub bytes: u64,
}

impl TimelinePoint {
    /// Totals of `sites`, every site of a snapshot in any order; the sites in `judged` are
    /// kept whatever their size, so that a small leak has its line on the dashboard.
    pub fn of<'a>(
        at_ms: u64,
        sites: impl IntoIterator<Item = &'a SiteFigures>,
        judged: &[&SiteName],
    ) -> Self {
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        let mut largest: Vec<&SiteFigures> = Vec::new();
        for figures in sites {
            *kinds.entry(figures.site.kind.clone()).or_default() += figures.bytes;
            largest.push(figures);
        }
        largest.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.site.cmp(&b.site)));
        let kept = largest
            .iter()
            .enumerate()
            .filter(|(rank, figures)| *rank < SITES_PER_POINT || judged.contains(&&figures.site));
        Self {
            at_ms,
            kinds,
            sites: kept
                .map(|(_, figures)| SiteBytes {
                    site: figures.site.clone(),
                    bytes: figures.bytes,
                })
                .collect(),
        }
    }
}

/// The last `capacity` points, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    capacity: usize,
    points: VecDeque<TimelinePoint>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl Timeline {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            points: VecDeque::new(),
        }
    }

    pub fn push(&mut self, point: TimelinePoint) {
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back(point);
    }

    pub fn points(&self) -> impl Iterator<Item = &TimelinePoint> {
        self.points.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(kind: &str, call_site: &str, bytes: u64) -> SiteFigures {
        let name = SiteName {
            kind: kind.to_owned(),
            cache: None,
            call_site: call_site.to_owned(),
        };
        SiteFigures::of(name, bytes / 64, bytes)
    }

    #[test]
    fn a_point_totals_every_site_per_kind_and_keeps_the_largest_sites() {
        let mut sites: Vec<SiteFigures> = (1..=12)
            .map(|n| figures("kmalloc", &format!("site_{n:02}"), n * 100))
            .collect();
        sites.push(figures("page", "alloc_pipe", 4096));
        let point = TimelinePoint::of(7, &sites, &[]);
        assert_eq!(point.at_ms, 7);
        // 100 + 200 + ... + 1200: the sites beyond the top ten count in their kind's total.
        assert_eq!(point.kinds["kmalloc"], 7800);
        assert_eq!(point.kinds["page"], 4096);
        assert_eq!(point.sites.len(), SITES_PER_POINT);
        let names: Vec<&str> = point
            .sites
            .iter()
            .map(|site| site.site.call_site.as_str())
            .collect();
        assert_eq!(names[..3], ["alloc_pipe", "site_12", "site_11"]);
        assert_eq!(names[9], "site_04");
        assert_eq!(point.sites[0].bytes, 4096);

        // A judged site is kept, however small; the others beyond the ten are not.
        let judged = figures("kmalloc", "site_02", 0).site;
        let point = TimelinePoint::of(8, &sites, &[&judged]);
        assert_eq!(point.sites.len(), SITES_PER_POINT + 1);
        assert_eq!(point.sites[SITES_PER_POINT].site, judged);
        assert_eq!(point.sites[SITES_PER_POINT].bytes, 200);
    }

    #[test]
    fn equal_sites_are_ordered_by_name_and_an_empty_snapshot_has_no_kinds() {
        let sites = [figures("slab", "b", 64), figures("slab", "a", 64)];
        let point = TimelinePoint::of(1, &sites, &[]);
        assert_eq!(point.sites[0].site.call_site, "a");
        let empty = TimelinePoint::of(2, &[], &[]);
        assert!(empty.kinds.is_empty() && empty.sites.is_empty());
    }

    #[test]
    fn the_timeline_keeps_the_last_points_oldest_first() {
        let mut timeline = Timeline::new(3);
        for at_ms in 1..=5 {
            timeline.push(TimelinePoint::of(at_ms, &[], &[]));
        }
        let kept: Vec<u64> = timeline.points().map(|point| point.at_ms).collect();
        assert_eq!(kept, [3, 4, 5]);
        assert_eq!(Timeline::new(0).capacity, 1);
    }
}
