//! Which slab cache holds a kernel object. The object's page frame follows from its direct-map
//! address; /proc/kpageflags says whether the page belongs to a slab and, for a slab of several
//! pages, which page is its head; the head's `struct slab` points to the cache. A name is given
//! only when the object is one of that slab's slots and the cache's slot size is the one the
//! allocator reported, so a page freed and reused for another cache is not taken for the old one.
use std::fs::File;

use anyhow::Result;
use hashbrown::HashMap;

use super::{
    bases::KernelBases,
    layout::SlabLayout,
    slabs::{self, Cache, KPF_COMPOUND_TAIL, KPF_SLAB, Slab},
};
use crate::bpf::reader::KernelReader;

use super::PAGE;
/// Page flags read back from an object's page at first while looking for its slab's head:
/// SLUB's slabs are at most 8 pages (order 3) unless `slub_max_order` says otherwise.
const FIRST_WINDOW: u64 = 16;
/// The most pages a slab can span (order 10, the largest page allocation).
const MAX_SLAB_PAGES: u64 = 1 << 10;

/// An object whose cache is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    pub address: u64,
    /// The size the allocator reported for it (`bytes_alloc`): its cache's slot size.
    pub size: u32,
}

/// Where an object's slab starts, from the page flags of the pages before the object's page
/// and of that page itself (the last one).
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The slab's head is the page at this index.
    At(usize),
    /// The head is not a slab page.
    NotSlab,
    /// Every page given is a compound tail: the head lies further back.
    Further,
}

fn find_head(flags: &[u64]) -> Head {
    match flags
        .iter()
        .rposition(|&page| page & KPF_COMPOUND_TAIL == 0)
    {
        Some(index) if flags[index] & KPF_SLAB != 0 => Head::At(index),
        Some(_) => Head::NotSlab,
        None => Head::Further,
    }
}

/// What the page flags say of the page frame holding an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageHead {
    /// The page belongs to the slab whose first page frame this is.
    Slab(u64),
    /// The page is not part of a slab (any more).
    NotSlab,
    /// The flags could not be read, or the head lies beyond the largest slab.
    Unknown,
}

/// Where the slab holding page frame `pfn` starts, if the page belongs to a slab.
pub fn slab_head(page_flags: &File, pfn: u64) -> Result<PageHead> {
    slab_head_from(
        |first, count| slabs::page_flags(page_flags, first, count),
        pfn,
    )
}

/// [`slab_head`] with the page flags of `count` frames from `first` read by `flags`.
pub fn slab_head_from(
    mut flags: impl FnMut(u64, u64) -> Result<Vec<u64>>,
    pfn: u64,
) -> Result<PageHead> {
    let mut window = FIRST_WINDOW;
    loop {
        let first = pfn.saturating_sub(window - 1);
        let flags = flags(first, pfn - first + 1)?;
        if flags.len() as u64 != pfn - first + 1 {
            return Ok(PageHead::Unknown);
        }
        match find_head(&flags) {
            Head::At(index) => return Ok(PageHead::Slab(first + index as u64)),
            Head::NotSlab => return Ok(PageHead::NotSlab),
            Head::Further if first > 0 && window < MAX_SLAB_PAGES => window *= 4,
            Head::Further => return Ok(PageHead::Unknown),
        }
    }
}

/// Whether `object` is one of the object slots of `slab`, a slab of `cache` starting at
/// `slab_start`, with the slot size the allocator reported.
pub fn holds(slab_start: u64, cache: &Cache, slab: &Slab, object: &Object) -> bool {
    (object.size == cache.size || object.size == cache.object_size)
        && cache.is_slot(slab_start, slab.objects, object.address)
}

/// The name of the cache holding each of `objects`, `None` where it cannot be established.
pub fn cache_names(
    reader: &mut KernelReader,
    layout: &SlabLayout,
    bases: &KernelBases,
    objects: &[Object],
) -> Result<Vec<Option<String>>> {
    let page_flags = slabs::open_page_flags()?;
    let mut heads = Vec::with_capacity(objects.len());
    for object in objects {
        heads.push(if bases.in_direct_map(object.address) {
            match slab_head(&page_flags, (object.address - bases.page_offset) / PAGE)? {
                PageHead::Slab(head) => Some(head),
                PageHead::NotSlab | PageHead::Unknown => None,
            }
        } else {
            None
        });
    }
    let mut wanted: Vec<u64> = heads.iter().flatten().copied().collect();
    wanted.sort_unstable();
    wanted.dedup();
    let slabs = slabs::read_slabs(reader, layout, bases, &wanted)?;
    let caches = slabs::read_caches(reader, layout, bases, &slabs)?;
    let slabs: HashMap<u64, Slab> = slabs.into_iter().map(|slab| (slab.pfn, slab)).collect();
    Ok(objects
        .iter()
        .zip(heads)
        .map(|(object, head)| {
            let slab = slabs.get(&head?)?;
            let cache = caches.get(&slab.cache)?;
            holds(bases.direct(slab.pfn), cache, slab, object).then(|| cache.name.clone())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: u64 = KPF_SLAB | 1 << 15;
    const TAIL: u64 = KPF_SLAB | KPF_COMPOUND_TAIL;

    #[test]
    fn the_head_is_the_last_page_that_is_not_a_compound_tail() {
        assert_eq!(find_head(&[0, KPF_SLAB]), Head::At(1));
        assert_eq!(find_head(&[KPF_SLAB, HEAD, TAIL, TAIL]), Head::At(1));
        assert_eq!(find_head(&[HEAD, TAIL, TAIL, TAIL]), Head::At(0));
        // A compound page that is not a slab (a large kmalloc, a folio).
        assert_eq!(find_head(&[1 << 15, KPF_COMPOUND_TAIL]), Head::NotSlab);
        assert_eq!(find_head(&[0]), Head::NotSlab);
        assert_eq!(find_head(&[TAIL, TAIL]), Head::Further);
    }

    fn cache(size: u32, object_size: u32, red_left_pad: u32) -> Cache {
        Cache {
            address: 0xffff_8880_0100_0000,
            name: "kmalloc-cg-192".into(),
            size,
            object_size,
            offset: 0,
            red_left_pad,
            random: 0,
            cpu_slab: 0,
            cpu_sheaves: 0,
        }
    }

    #[test]
    fn an_object_must_be_a_slot_of_the_slab_with_the_reported_size() {
        let slab = Slab {
            pfn: 0x100,
            cache: 0xffff_8880_0100_0000,
            freelist: 0,
            inuse: 21,
            objects: 21,
            frozen: false,
        };
        let start = 0xffff_8880_0010_0000;
        let object = |address, size| Object { address, size };
        let plain = cache(192, 192, 0);
        assert!(holds(start, &plain, &slab, &object(start, 192)));
        assert!(holds(start, &plain, &slab, &object(start + 20 * 192, 192)));
        assert!(!holds(start, &plain, &slab, &object(start + 21 * 192, 192)));
        assert!(!holds(start, &plain, &slab, &object(start + 64, 192)));
        assert!(!holds(start, &plain, &slab, &object(start - 192, 192)));
        // Reused by a cache of another size.
        assert!(!holds(start, &plain, &slab, &object(start, 256)));
        // With red zones, slots start after the left pad; the allocator reports either size.
        let debug = cache(256, 192, 64);
        assert!(holds(start, &debug, &slab, &object(start + 64 + 256, 256)));
        assert!(holds(start, &debug, &slab, &object(start + 64, 192)));
        assert!(!holds(start, &debug, &slab, &object(start, 192)));
    }
}
