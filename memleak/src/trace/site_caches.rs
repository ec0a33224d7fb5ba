//! The real slab cache of each kmalloc call site. The kmalloc tracepoint does not say which
//! cache served an allocation, and the size alone does not tell `kmalloc-64` from
//! `kmalloc-cg-64`, `kmalloc-rcl-64`, `dma-kmalloc-64` or a dedicated bucket set such as
//! `msg_msg-64`. A call site allocating one size always lands in one cache (its size class, gfp
//! type and bucket set are fixed), so reading the cache of one of its outstanding objects from
//! kernel memory, at report time, names it for the whole site. Where that is impossible, the
//! site's size and gfp flags name it as the kernel's kmalloc_type() would.
//!
//! The same read names the cache of kmem_cache sites on kernels whose classic
//! `kmem_cache_alloc` event has no cache name (before Linux 6.2); where it is impossible they
//! stay unnamed.
use anyhow::Result;
use hashbrown::{HashMap, HashSet};
use memleak_common::AllocKind;

use super::aggregate::{GFP_ACCOUNT, GFP_DMA, GFP_RECLAIMABLE, SiteKey};
use crate::{
    kernel::{procfs::parse_slabinfo, slab_merges::SlabMerges},
    scan::Object,
};

/// The cache that kmalloc_type() picks for an allocation of `size` bytes with `gfp` flags,
/// among the variants `exists`: `__GFP_DMA` goes to `dma-kmalloc-*` (when the kernel has a DMA
/// zone), then `__GFP_RECLAIMABLE` to `kmalloc-rcl-*`, then `__GFP_ACCOUNT` to `kmalloc-cg-*`
/// (when it has memcg accounting). Dedicated bucket sets (`msg_msg-*`) and random kmalloc
/// caches (`kmalloc-rnd-*`) do not follow from the flags.
pub fn size_class_cache(size: u64, gfp: u32, exists: impl Fn(&str) -> bool) -> Option<String> {
    let normal = kmalloc_cache_name(size)?;
    let class = normal.strip_prefix("kmalloc-")?;
    let variant = |prefix: &str| {
        let name = format!("{prefix}{class}");
        exists(&name).then_some(name)
    };
    let chosen = if gfp & GFP_DMA != 0
        && let Some(dma) = variant("dma-kmalloc-")
    {
        Some(dma)
    } else if gfp & GFP_RECLAIMABLE != 0 {
        variant("kmalloc-rcl-")
    } else if gfp & GFP_ACCOUNT != 0 {
        variant("kmalloc-cg-")
    } else {
        None
    };
    Some(chosen.unwrap_or(normal))
}

/// The names of the kernel's slab caches: /sys/kernel/slab (merged caches too), else
/// /proc/slabinfo.
fn known_caches() -> HashSet<String> {
    let merges = SlabMerges::read();
    if merges.names().next().is_some() {
        return merges.names().map(str::to_owned).collect();
    }
    std::fs::read_to_string("/proc/slabinfo")
        .ok()
        .and_then(|text| parse_slabinfo(&text).ok())
        .map(|slabinfo| {
            slabinfo
                .caches
                .into_iter()
                .map(|cache| cache.name)
                .collect()
        })
        .unwrap_or_default()
}

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
        let served_by_a_slab = match key.kind {
            AllocKind::Kmalloc => kmalloc_cache_name(key.cache_id).is_some(),
            _ => key.unnamed_slot_size().is_some(),
        };
        if !served_by_a_slab {
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

    /// The sites' caches, read by `cache_names` (one name or `None` per object, as
    /// [`crate::scan::KernelView::cache_names`] reads them): one object per site, then another
    /// object for the sites still unnamed, up to [`PICKS_PER_SITE`] rounds of reads.
    pub fn resolve(
        &self,
        mut cache_names: impl FnMut(&[Object]) -> Result<Vec<Option<String>>>,
    ) -> Result<Resolution> {
        let mut names = HashMap::with_capacity(self.sites.len());
        for round in 0..PICKS_PER_SITE {
            let pending = self.round(round, &names);
            if pending.is_empty() {
                break;
            }
            let objects: Vec<Object> = pending.iter().map(|&(_, object)| object).collect();
            for ((key, _), name) in pending.into_iter().zip(cache_names(&objects)?) {
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

    /// A name for every site: `read` where it has one, else from the site's size and gfp flags.
    pub fn names(&self, mut read: HashMap<SiteKey, String>) -> HashMap<SiteKey, String> {
        let mut known = None;
        for key in self.sites.keys() {
            if read.contains_key(key) || key.kind != AllocKind::Kmalloc {
                continue;
            }
            let known = known.get_or_insert_with(known_caches);
            if let Some(name) =
                size_class_cache(key.cache_id, key.kmalloc_gfp, |name| known.contains(name))
            {
                read.insert(*key, name);
            }
        }
        read
    }

    /// The objects to read in round `round`: each unnamed site's pick of that index.
    fn round(&self, round: usize, named: &HashMap<SiteKey, String>) -> Vec<(SiteKey, Object)> {
        self.sites
            .iter()
            .filter(|(key, _)| !named.contains_key(*key))
            .filter_map(|(key, picks)| {
                let object = Object {
                    address: *picks.get(round)?,
                    size: key.unnamed_slot_size()?,
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
    /// The report note for sites named from their size and gfp flags, if any.
    pub fn note(&self) -> Option<String> {
        (self.unnamed > 0).then(|| {
            format!(
                "{} call sites have no cache read from the kernel (none of their objects was \
                 still in a slab of that size at report time): kmalloc ones are named from \
                 their size and gfp flags, kmem_cache ones whose event names no cache stay \
                 unnamed",
                self.unnamed
            )
        })
    }
}

/// The note when no cache could be read at all.
pub fn not_read(error: &anyhow::Error) -> String {
    format!(
        "slab caches are not read from the kernel: kmalloc ones are named from size and gfp \
         flags (dedicated buckets such as msg_msg-* do not show), and kmem_cache ones whose \
         event names no cache stay unnamed: {error:#}"
    )
}

/// The kmalloc size class of an allocation of `bytes_allocated` bytes: sizes below 1 KiB are
/// named in bytes, larger ones in KiB, as in /proc/slabinfo. Above 8 KiB kmalloc goes to the
/// page allocator. It names a site whose real cache could not be read from the kernel.
pub fn kmalloc_cache_name(bytes_allocated: u64) -> Option<String> {
    match bytes_allocated {
        0 => None,
        1..1024 => Some(format!("kmalloc-{bytes_allocated}")),
        1024..=8192 => Some(format!("kmalloc-{}k", bytes_allocated / 1024)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: AllocKind, size: u64, call_site: u64) -> SiteKey {
        SiteKey {
            kind,
            cache_id: size,
            call_site,
            kmalloc_gfp: 0,
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
        // Above 8 KiB kmalloc uses the page allocator; named kmem_cache sites know their cache.
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
    fn each_round_reads_the_next_object_of_the_sites_still_unnamed() {
        let mut picks = Picks::default();
        let (first, second, third) = (
            key(AllocKind::Kmalloc, 64, 0x10),
            key(AllocKind::Kmalloc, 128, 0x20),
            key(AllocKind::Kmalloc, 256, 0x30),
        );
        for address in [0x1000, 0x1001, 0x1002] {
            picks.add(first, address);
        }
        for address in [0x2000, 0x2001] {
            picks.add(second, address);
        }
        for address in [0x3000, 0x3001, 0x3002] {
            picks.add(third, address);
        }
        // Names only the second pick of the first site and the third of the third.
        let mut rounds = Vec::new();
        let resolution = picks
            .resolve(|objects| {
                let mut read: Vec<u64> = objects.iter().map(|object| object.address).collect();
                read.sort_unstable();
                rounds.push(read);
                Ok(objects
                    .iter()
                    .map(|object| match object.address {
                        0x1001 => Some("kmalloc-64".to_owned()),
                        0x3002 => Some("kmalloc-256".to_owned()),
                        _ => None,
                    })
                    .collect())
            })
            .unwrap();
        assert_eq!(
            rounds,
            [
                vec![0x1000, 0x2000, 0x3000],
                vec![0x1001, 0x2001, 0x3001],
                vec![0x3002]
            ]
        );
        assert_eq!(
            resolution.names,
            HashMap::from([
                (first, "kmalloc-64".to_owned()),
                (third, "kmalloc-256".to_owned())
            ])
        );
        assert_eq!(resolution.unnamed, 1);

        // Every site named in the first round: no second round.
        let mut calls = 0;
        let all = picks
            .resolve(|objects| {
                calls += 1;
                Ok(vec![Some("kmalloc-64".to_owned()); objects.len()])
            })
            .unwrap();
        assert_eq!((calls, all.names.len(), all.unnamed), (1, 3, 0));

        // A read that fails is the resolution's error.
        let failed = picks.resolve(|_| Err(anyhow::anyhow!("no reader")));
        assert_eq!(failed.unwrap_err().to_string(), "no reader");
    }

    #[test]
    fn names_the_variant_kmalloc_type_picks_when_the_kernel_has_it() {
        let all = |_: &str| true;
        let name = |size, gfp, exists: &dyn Fn(&str) -> bool| size_class_cache(size, gfp, exists);
        assert_eq!(name(64, 0, &all).as_deref(), Some("kmalloc-64"));
        let gfp_kernel_account = 0xcc0 | GFP_ACCOUNT;
        assert_eq!(
            name(64, gfp_kernel_account, &all).as_deref(),
            Some("kmalloc-cg-64")
        );
        assert_eq!(
            name(2048, GFP_RECLAIMABLE | GFP_ACCOUNT, &all).as_deref(),
            Some("kmalloc-rcl-2k")
        );
        assert_eq!(
            name(192, GFP_DMA | GFP_ACCOUNT, &all).as_deref(),
            Some("dma-kmalloc-192")
        );
        // No DMA zone: the DMA bit does not count, the others still do.
        let no_dma = |name: &str| !name.starts_with("dma-");
        assert_eq!(
            name(192, GFP_DMA | GFP_ACCOUNT, &no_dma).as_deref(),
            Some("kmalloc-cg-192")
        );
        assert_eq!(name(192, GFP_DMA, &no_dma).as_deref(), Some("kmalloc-192"));
        // No memcg accounting: accounted allocations use the plain caches.
        let no_memcg = |name: &str| !name.contains("-cg-");
        assert_eq!(
            name(64, gfp_kernel_account, &no_memcg).as_deref(),
            Some("kmalloc-64")
        );
        // Reclaimable wins over accounted, and without rcl caches it is the plain one.
        let no_rcl = |name: &str| !name.contains("-rcl-");
        assert_eq!(
            name(64, GFP_RECLAIMABLE | GFP_ACCOUNT, &no_rcl).as_deref(),
            Some("kmalloc-64")
        );
        assert_eq!(name(16384, GFP_ACCOUNT, &all), None);
    }

    #[test]
    fn kmem_cache_sites_without_a_cache_name_are_read_by_slot_size_but_never_guessed() {
        let mut picks = Picks::default();
        // A classic event without a name field: the record's slot size stands in for the cache.
        let unnamed = key(AllocKind::KmemCache, 192, 0x20);
        picks.add(unnamed, 0x5000);
        assert_eq!(
            picks.round(0, &HashMap::new()),
            [(
                unnamed,
                Object {
                    address: 0x5000,
                    size: 192
                }
            )]
        );
        // Unread, it is not given a kmalloc name from its size.
        assert!(picks.names(HashMap::new()).is_empty());
        let read = HashMap::from([(unnamed, "leaky_cache".to_owned())]);
        assert_eq!(picks.names(read)[&unnamed], "leaky_cache");
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
                .starts_with("2 call sites have no cache read")
        );
    }

    #[test]
    fn names_unread_kmalloc_sites_from_their_size_and_keeps_what_was_read() {
        let mut picks = Picks::default();
        assert!(picks.is_empty());
        let read_site = key(AllocKind::Kmalloc, 64, 0x10);
        let unread = key(AllocKind::Kmalloc, 128, 0x20);
        picks.add(read_site, 0x1000);
        picks.add(unread, 0x2000);
        assert!(!picks.is_empty());
        let names = picks.names(HashMap::from([(read_site, "msg_msg-64".to_owned())]));
        assert_eq!(names.len(), 2);
        assert_eq!(names[&read_site], "msg_msg-64");
        // gfp 0 picks the plain cache whatever variants this kernel has.
        assert_eq!(names[&unread], "kmalloc-128");
    }

    #[test]
    fn the_note_without_reads_says_why() {
        let note = not_read(&anyhow::anyhow!("no BTF"));
        assert!(note.starts_with("slab caches are not read from the kernel"));
        assert!(note.ends_with(": no BTF"), "{note}");
    }

    #[test]
    fn knows_this_kernels_caches() {
        // SLUB kernels list every cache, merged ones too, in /sys/kernel/slab.
        if std::path::Path::new(crate::kernel::slab_merges::SYS_SLAB)
            .join("kmalloc-64")
            .exists()
        {
            let known = known_caches();
            assert!(known.contains("kmalloc-64"), "{} caches", known.len());
        }
    }

    #[test]
    fn names_kmalloc_size_classes() {
        assert_eq!(kmalloc_cache_name(8).as_deref(), Some("kmalloc-8"));
        assert_eq!(kmalloc_cache_name(192).as_deref(), Some("kmalloc-192"));
        assert_eq!(kmalloc_cache_name(1024).as_deref(), Some("kmalloc-1k"));
        assert_eq!(kmalloc_cache_name(8192).as_deref(), Some("kmalloc-8k"));
        assert_eq!(kmalloc_cache_name(16384), None);
        assert_eq!(kmalloc_cache_name(0), None);
    }
}
