//! The real slab cache of each kmalloc call site. The kmalloc tracepoint does not say which
//! cache served an allocation, and the size alone does not tell `kmalloc-64` from
//! `kmalloc-cg-64`, `kmalloc-rcl-64`, `dma-kmalloc-64` or a dedicated bucket set such as
//! `msg_msg-64`. A call site allocating one size always lands in one cache (its size class, gfp
//! type and bucket set are fixed), so reading the cache of one of its outstanding objects from
//! kernel memory, at report time, names it for the whole site.
use anyhow::Result;
use hashbrown::HashMap;
use memleak_common::AllocKind;

use crate::{
    aggregate::SiteKey,
    report,
    scan::{KernelView, Object},
};

/// Objects kept per site: when the first one's slab cannot be read or has changed (the object
/// was freed after the window and its page reused), the next one is tried.
const PICKS_PER_SITE: usize = 3;

/// A few outstanding objects of every kmalloc site that kmalloc serves from a slab.
#[derive(Debug, Default)]
pub struct Picks {
    sites: HashMap<SiteKey, Vec<u64>>,
}

impl Picks {
    pub fn add(&mut self, key: SiteKey, address: u64) {
        if key.kind != AllocKind::Kmalloc || report::kmalloc_cache_name(key.cache_id).is_none() {
            return;
        }
        let picks = self.sites.entry(key).or_default();
        if picks.len() < PICKS_PER_SITE {
            picks.push(address);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// The sites' caches, read through `view`: one object per site, then another object for
    /// the sites still unnamed, up to [`PICKS_PER_SITE`] rounds of reads.
    pub fn resolve(&self, view: &mut KernelView) -> Result<Resolution> {
        let mut names = HashMap::with_capacity(self.sites.len());
        for round in 0..PICKS_PER_SITE {
            let pending = self.round(round, &names);
            if pending.is_empty() {
                break;
            }
            let objects: Vec<Object> = pending.iter().map(|&(_, object)| object).collect();
            for ((key, _), name) in pending.into_iter().zip(view.cache_names(&objects)?) {
                if let Some(name) = name {
                    names.insert(key, name);
                }
            }
        }
        Ok(Resolution {
            unnamed: self.sites.len() - names.len(),
            names,
        })
    }

    /// The objects to read in round `round`: each unnamed site's pick of that index.
    fn round(&self, round: usize, named: &HashMap<SiteKey, String>) -> Vec<(SiteKey, Object)> {
        self.sites
            .iter()
            .filter(|(key, _)| !named.contains_key(*key))
            .filter_map(|(key, picks)| {
                let object = Object {
                    address: *picks.get(round)?,
                    size: u32::try_from(key.cache_id).ok()?,
                };
                Some((*key, object))
            })
            .collect()
    }
}

/// The cache names read, by site, and how many sites stay unnamed.
#[derive(Debug, Default)]
pub struct Resolution {
    pub names: HashMap<SiteKey, String>,
    pub unnamed: usize,
}

impl Resolution {
    /// The report note for sites that keep their size class name, if any.
    pub fn note(&self) -> Option<String> {
        (self.unnamed > 0).then(|| {
            format!(
                "{} kmalloc call sites are named by size class (kmalloc-N): none of their \
                 objects was still in a slab of that size when the report was made",
                self.unnamed
            )
        })
    }
}

/// The note when no kmalloc cache could be read at all.
pub fn not_read(error: &anyhow::Error) -> String {
    format!(
        "kmalloc caches are named by size class (kmalloc-N), not read from the kernel: {error:#}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: AllocKind, size: u64, call_site: u64) -> SiteKey {
        SiteKey {
            kind,
            cache_id: size,
            call_site,
        }
    }

    #[test]
    fn keeps_a_few_objects_of_each_kmalloc_site_served_by_a_slab() {
        let mut picks = Picks::default();
        let site = key(AllocKind::Kmalloc, 64, 0x10);
        for address in 0..10 {
            picks.add(site, 0x1000 + address);
        }
        picks.add(key(AllocKind::Kmalloc, 128, 0x10), 0x2000);
        // Above 8 KiB kmalloc uses the page allocator; other kinds name their cache already.
        picks.add(key(AllocKind::Kmalloc, 16384, 0x10), 0x3000);
        picks.add(
            key(AllocKind::KmemCache, 0xffff_8880_0000_1000, 0x10),
            0x4000,
        );
        assert_eq!(picks.sites.len(), 2);
        assert_eq!(picks.sites[&site], [0x1000, 0x1001, 0x1002]);

        let first = picks.round(0, &HashMap::new());
        assert_eq!(first.len(), 2);
        let named = HashMap::from([(site, "msg_msg-64".to_owned())]);
        let second = picks.round(1, &named);
        assert!(second.is_empty(), "the 128-byte site has one object only");
        let retry = picks.round(1, &HashMap::new());
        assert_eq!(
            retry,
            [(
                site,
                Object {
                    address: 0x1001,
                    size: 64
                }
            )]
        );
    }

    #[test]
    fn notes_only_unnamed_sites() {
        let resolution = Resolution {
            names: HashMap::new(),
            unnamed: 0,
        };
        assert_eq!(resolution.note(), None);
        let resolution = Resolution {
            names: HashMap::new(),
            unnamed: 2,
        };
        assert!(
            resolution
                .note()
                .unwrap()
                .starts_with("2 kmalloc call sites")
        );
    }
}
