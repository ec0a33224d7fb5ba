//! Marks a trace's outstanding allocations against the content scan of `--cache`: per site,
//! how many of its objects are in the scanned cache and look like its largest group.
use std::time::Duration;

use hashbrown::HashMap;
use memleak_common::AllocRecord;

use super::{
    aggregate::{Aggregator, SiteKey},
    report::{Entry, SiteMarks},
};
use crate::{
    scan::{CacheScan, Mark, Marking, Suspect},
    symbols::Frame,
};

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

pub(crate) fn rank_sites<'a>(sites: impl IntoIterator<Item = (&'a Frame, SiteMarks)>) -> Marking {
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

/// Call sites and marks for the tests of marking and of its rendering.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn site(symbol: &str, addr: u64) -> Frame {
        Frame {
            addr: Some(addr),
            symbol: Some(symbol.into()),
            offset: Some(0x41),
            size: Some(0x1e0),
            module: None,
            source: None,
        }
    }

    pub fn marks(marked: u64, in_scanned_cache: u64) -> SiteMarks {
        SiteMarks {
            marked,
            in_scanned_cache,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        fixtures::{marks, site},
        *,
    };

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
}
