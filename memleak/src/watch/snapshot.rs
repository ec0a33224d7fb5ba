//! One interval's snapshot of the live tracer table: every outstanding object checked in
//! kernel memory, grouped by allocation site, named and symbolized like the trace report.
//! Objects found free (their free was not seen: kfree_rcu batches, bulk frees, sheaves) are
//! counted and removed from the table, so that a watch of days does not fill it with them.
use anyhow::Result;
use hashbrown::{HashMap, HashSet};
use memleak_common::AllocRecord;

use super::{IntervalStats, SiteFigures, SiteName};
use crate::{
    bpf::maps::{self as table, Counters, TracerMaps},
    scan::Liveness,
    symbols::{Frame, KernelSymbolizer, allocators},
    trace::{
        aggregate::{Aggregator, SiteKey},
        build::{self, KernelMemory},
        report::{self, Entry},
        site_caches::Picks,
    },
};

/// A site in a snapshot: its figures and the report entry they came from (stack, frames).
#[derive(Debug)]
pub struct SnapshotSite {
    pub figures: SiteFigures,
    pub entry: Entry,
}

/// What one interval found.
#[derive(Debug)]
pub struct Snapshot {
    /// Largest first (bytes, then count).
    pub sites: Vec<SnapshotSite>,
    pub stats: IntervalStats,
    pub notes: Vec<String>,
    /// The slab objects found still allocated, as the table records them: what the history
    /// keeps to re-seed the table after a restart.
    pub allocated_slab_objects: Vec<(u64, AllocRecord)>,
    /// The stack ids the table's objects still use.
    pub stacks_in_use: HashSet<u32>,
}

/// Takes snapshots, keeping what does not change between them: the symbolizer, the caches'
/// names, the counters of the previous interval.
pub struct Snapshotter {
    symbolizer: KernelSymbolizer,
    site_caches: HashMap<SiteKey, String>,
    /// The names of the caches of kmem_cache records, from the programs' map, kept across
    /// intervals and restarts (a re-seeded object's cache may see no allocation again).
    cache_names: HashMap<u64, String>,
    previous: Counters,
    /// Each site's outstanding count at the previous snapshot, for `freed`.
    previous_counts: HashMap<SiteName, u64>,
    sample_rate: u32,
    /// kmem_cache records name their cache by its `struct kmem_cache *` (tp_btf).
    cache_ids_are_pointers: bool,
}

impl Snapshotter {
    pub fn new(sample_rate: u32, cache_ids_are_pointers: bool) -> Self {
        Self {
            symbolizer: KernelSymbolizer::new(),
            site_caches: HashMap::new(),
            cache_names: HashMap::new(),
            previous: Counters::default(),
            previous_counts: HashMap::new(),
            sample_rate,
            cache_ids_are_pointers,
        }
    }

    /// The names of the caches seen so far, by cache id.
    pub fn cache_names(&self) -> &HashMap<u64, String> {
        &self.cache_names
    }

    /// Names learned before (a restarted watch's history).
    pub fn remember_cache_names(&mut self, names: impl IntoIterator<Item = (u64, String)>) {
        self.cache_names.extend(names);
    }

    /// Snapshots the table at `now_ns` (CLOCK_MONOTONIC); objects allocated after
    /// `interval_start_ns` count as new.
    pub fn take(
        &mut self,
        maps: &TracerMaps,
        memory: &mut KernelMemory<'_>,
        now_ns: u64,
        interval_start_ns: u64,
    ) -> Result<Snapshot> {
        let mut notes = Vec::new();
        // One pass over the live table: the programs keep changing it, so the liveness states
        // are paired with this copy, not with a second pass.
        let mut records: Vec<(u64, AllocRecord)> = Vec::new();
        table::for_each_outstanding(maps, |address, record| records.push((address, *record)))?;
        let liveness = build::check_liveness(
            |visit| {
                records
                    .iter()
                    .for_each(|(address, record)| visit(*address, record));
                Ok(())
            },
            memory,
            self.cache_ids_are_pointers,
            &mut notes,
        )?;

        let mut aggregator = Aggregator::new(now_ns, std::time::Duration::ZERO);
        let mut new_objects: HashMap<SiteKey, u64> = HashMap::new();
        let mut found_free: HashMap<u64, AllocRecord> = HashMap::new();
        let mut found_free_at: HashMap<SiteKey, u64> = HashMap::new();
        let mut ages_ms: HashMap<SiteKey, Vec<u64>> = HashMap::new();
        let mut picks = Picks::default();
        let mut allocated_slab_objects = Vec::new();
        let mut stacks_in_use = HashSet::new();
        let mut states = liveness.states.iter();
        for (address, record) in &records {
            let state = build::is_slab_object(record)
                .then(|| states.next())
                .flatten();
            match state {
                Some(Liveness::Free(_)) => {
                    found_free.insert(*address, *record);
                    if let Some(key) = SiteKey::of(record) {
                        *found_free_at.entry(key).or_default() += 1;
                    }
                    continue;
                }
                Some(Liveness::Unverified) => aggregator.add_unverified(record),
                Some(Liveness::Allocated) => {
                    allocated_slab_objects.push((*address, *record));
                    aggregator.add(record);
                }
                None => aggregator.add(record),
            }
            if let Ok(id) = u32::try_from(record.stack_id) {
                stacks_in_use.insert(id);
            }
            if let Some(key) = SiteKey::of(record) {
                if !self.site_caches.contains_key(&key) {
                    picks.add(key, *address);
                }
                if record.allocated_at > interval_start_ns {
                    *new_objects.entry(key).or_default() += 1;
                }
                ages_ms
                    .entry(key)
                    .or_default()
                    .push(now_ns.saturating_sub(record.allocated_at) / 1_000_000);
            }
        }
        let removed = table::remove_objects(maps, &found_free)?;
        if !picks.is_empty() {
            self.site_caches.extend(memory.resolve(&picks, &mut notes));
        }

        let mut sites = aggregator.finish().sites;
        sites.sort_by(|a, b| {
            b.bytes
                .cmp(&a.bytes)
                .then(b.count.cmp(&a.count))
                .then(a.key.call_site.cmp(&b.key.call_site))
        });
        let stack_ids = sites.iter().flat_map(|site| site.stacks.keys().copied());
        let stacks = table::read_stacks(maps, stack_ids)?;
        self.symbolizer
            .resolve(report::addresses_to_symbolize(&sites, &stacks))?;
        self.cache_names.extend(table::read_cache_names(maps)?);
        let comms = HashMap::new();
        let symbolizer = &self.symbolizer;
        let frame = |address| -> Frame { symbolizer.frame(address) };
        let context = report::Context {
            stacks: &stacks,
            cache_names: &self.cache_names,
            site_caches: &self.site_caches,
            comms: &comms,
            now_ns,
            sample_rate: self.sample_rate,
            frame: &frame,
            user_stacks: None,
        };
        let scale = u64::from(self.sample_rate);
        // Sites the aggregate keeps apart (kmalloc gfp variants, unnamed caches) can share a
        // name: the series are kept per name, so their figures are summed.
        let mut by_name: HashMap<SiteName, usize> = HashMap::new();
        let mut named: Vec<SnapshotSite> = Vec::new();
        let mut ages_by_name: Vec<Vec<u64>> = Vec::new();
        let mut bookkeeping = 0;
        for site in &sites {
            if allocators::is_bookkeeping(&symbolizer.frame(site.key.call_site)) {
                bookkeeping += site.count * scale;
                continue;
            }
            let entry = report::entry(site, &context);
            let name = SiteName {
                kind: entry.kind.clone(),
                cache: entry.cache.clone(),
                call_site: entry.call_site.to_string(),
            };
            let ages = ages_ms.remove(&site.key).unwrap_or_default();
            let figures = SiteFigures {
                site: name.clone(),
                count: entry.count,
                bytes: entry.bytes,
                new: new_objects.get(&site.key).copied().unwrap_or(0) * scale,
                freed: 0,
                oldest_age_ms: entry.oldest_age_ms,
                median_age_ms: 0,
                p90_age_ms: 0,
                unverified: site.unverified * scale,
                found_free: found_free_at.get(&site.key).copied().unwrap_or(0) * scale,
            };
            match by_name.get(&name) {
                Some(&index) => {
                    let merged = &mut named[index].figures;
                    merged.count += figures.count;
                    merged.bytes += figures.bytes;
                    merged.new += figures.new;
                    merged.unverified += figures.unverified;
                    merged.found_free += figures.found_free;
                    merged.oldest_age_ms = merged.oldest_age_ms.max(figures.oldest_age_ms);
                    ages_by_name[index].extend(ages);
                }
                None => {
                    by_name.insert(name, named.len());
                    named.push(SnapshotSite { figures, entry });
                    ages_by_name.push(ages);
                }
            }
        }
        for (site, mut ages) in named.iter_mut().zip(ages_by_name) {
            (site.figures.median_age_ms, site.figures.p90_age_ms) =
                (quantile(&mut ages, 0.5), quantile(&mut ages, 0.9));
            site.figures.freed = freed_since(
                self.previous_counts.get(&site.figures.site).copied(),
                &site.figures,
            );
        }
        self.previous_counts = named
            .iter()
            .map(|site| (site.figures.site.clone(), site.figures.count))
            .collect();
        let sites = named;

        let counters = table::read_counters(maps)?;
        let delta = |now: u64, before: u64| now.saturating_sub(before);
        let stats = IntervalStats {
            allocs: delta(counters.allocs, self.previous.allocs),
            frees: delta(counters.frees, self.previous.frees),
            dropped_table_full: delta(
                counters.dropped_table_full,
                self.previous.dropped_table_full,
            ),
            missed_frees: delta(counters.missed_frees, self.previous.missed_frees),
            stack_failures: delta(counters.stack_failures, self.previous.stack_failures),
            outstanding: sites.iter().map(|site| site.figures.count).sum(),
            outstanding_bytes: sites.iter().map(|site| site.figures.bytes).sum(),
            found_free: removed * scale,
            unverified: liveness.stats.unverified * scale,
            bookkeeping_objects: bookkeeping,
            sites: sites.len() as u64,
        };
        self.previous = counters;
        Ok(Snapshot {
            sites,
            stats,
            notes,
            allocated_slab_objects,
            stacks_in_use,
        })
    }
}

/// Of `previous` objects outstanding at the last snapshot, those gone now: the outstanding
/// ones now that are not new survived, the rest left. None when the site was not there.
fn freed_since(previous: Option<u64>, now: &SiteFigures) -> u64 {
    let survivors = now.count.saturating_sub(now.new);
    previous.map_or(0, |previous| previous.saturating_sub(survivors))
}

/// The `q` quantile (nearest rank) of `values`; 0 with none.
fn quantile(values: &mut [u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::{SiteFigures, SiteName, freed_since, quantile};

    fn now(count: u64, new: u64) -> SiteFigures {
        let name = SiteName {
            kind: "kmalloc".to_owned(),
            cache: None,
            call_site: "f".to_owned(),
        };
        SiteFigures {
            new,
            ..SiteFigures::of(name, count, count * 64)
        }
    }

    #[test]
    fn freed_objects_are_the_previous_ones_that_did_not_survive() {
        // A pool of 300 replacing 100 a snapshot: 200 survived, 100 left.
        assert_eq!(freed_since(Some(300), &now(300, 100)), 100);
        // A leak: everything survived, the new ones came on top.
        assert_eq!(freed_since(Some(300), &now(320, 20)), 0);
        // All gone, new ones only.
        assert_eq!(freed_since(Some(300), &now(50, 50)), 300);
        // A site first seen now, and figures that do not add up (scaled estimates).
        assert_eq!(freed_since(None, &now(300, 100)), 0);
        assert_eq!(freed_since(Some(10), &now(5, 10)), 10);
        assert_eq!(freed_since(Some(10), &now(40, 0)), 0);
    }

    #[test]
    fn quantiles_are_nearest_ranks() {
        let mut ages: Vec<u64> = (1..=10).rev().collect();
        assert_eq!(quantile(&mut ages, 0.5), 5);
        assert_eq!(quantile(&mut ages, 0.9), 9);
        assert_eq!(quantile(&mut ages, 1.0), 10);
        assert_eq!(quantile(&mut [7], 0.9), 7);
        assert_eq!(quantile(&mut [], 0.5), 0);
    }
}
