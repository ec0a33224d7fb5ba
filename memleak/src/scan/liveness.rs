//! Whether the slab objects a trace holds as outstanding are still allocated, checked in kernel
//! memory at report time.
//!
//! The tracer learns of frees from the kmem tracepoints, and some frees fire none: kfree_rcu
//! batches reach the slab allocator through kfree_bulk, bulk frees and slab sheaves (Linux
//! 6.18+) have no per-object event. An object freed that way stays in the tracer's table. So
//! before an object is reported, its slab is read: an object whose page is no longer a slab of
//! its size, or that sits on its slab's freelist, a CPU's lockless freelist, a CPU's sheaf or a
//! node's barn, is free, whatever the tracer believed.
//!
//! The walk races with the allocator; it is read without locks. A freelist that leaves its slab
//! or loops (the slab changed while it was read) makes that slab's objects unverified, never
//! free. What cannot be walked (per-CPU structures when the per-CPU offsets cannot be proven,
//! kfree_rcu batches still waiting for their grace period) is said in the notes.
use anyhow::Result;
use hashbrown::{HashMap, HashSet};

use super::{
    KernelView,
    layout::FreeListLayout,
    owners::{self, Object, PageHead},
    slabs::{self, Cache, Slab},
};

use super::PAGE;
/// Sheaves walked per barn list at most: a barn keeps a handful (MAX_FULL_SHEAVES is 10).
const MAX_BARN_SHEAVES: usize = 256;
/// Page frames whose /proc/kpageflags entries are read at once (32 KiB).
const FLAGS_CHUNK: u64 = 4096;
/// NUMA nodes whose `kmem_cache_node` is read.
const MAX_NODES: usize = 64;

/// An outstanding slab object to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub object: Object,
    /// The `struct kmem_cache *` the tracer saw it allocated from, where the event said.
    pub cache: Option<u64>,
}

/// What the check found of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// A slot of a slab of its cache, on none of the free lists walked.
    Allocated,
    /// Free: the reason says where it was found.
    Free(FreeReason),
    /// Could not be told: unreadable, or its slab changed while it was read.
    Unverified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FreeReason {
    /// Its page is no longer a slab, or is a slab of another cache or slot size.
    SlabGone,
    /// On its slab's freelist.
    SlabFreelist,
    /// On a CPU's lockless freelist (the CPU's current slab).
    CpuFreelist,
    /// In a CPU's sheaf or a node's barn (Linux 6.18+).
    Sheaf,
}

/// The states of the objects asked about, in order, and what the check could not do.
#[derive(Debug, Default)]
pub struct Check {
    pub states: Vec<State>,
    pub notes: Vec<String>,
}

impl KernelView {
    /// Checks each of `queries` in kernel memory.
    pub fn liveness(&mut self, queries: &[Query]) -> Result<Check> {
        let mut notes = Vec::new();
        let Some(free_layout) = self.layout.free_lists else {
            notes.push(
                "outstanding slab objects are not checked in kernel memory: this kernel's \
                 SLUB structures (kmem_cache_cpu, bpf_array) are not known to memleak; \
                 objects freed without a kmem event may be listed"
                    .to_owned(),
            );
            return Ok(Check {
                states: vec![State::Unverified; queries.len()],
                notes,
            });
        };
        let heads = self.page_heads(queries)?;
        let mut wanted: Vec<u64> = heads
            .iter()
            .filter_map(|head| match head {
                PageHead::Slab(pfn) => Some(*pfn),
                _ => None,
            })
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let slabs = slabs::read_slabs(&mut self.reader, &self.layout, &self.bases, &wanted)?;
        let caches = slabs::read_caches(&mut self.reader, &self.layout, &self.bases, &slabs)?;
        let slabs: HashMap<u64, Slab> = slabs.into_iter().map(|slab| (slab.pfn, slab)).collect();

        // Each object's slab, where the object is one of its slots with its size.
        let owners: Vec<Option<(&Slab, &Cache)>> = queries
            .iter()
            .zip(&heads)
            .map(|(query, head)| {
                let PageHead::Slab(pfn) = head else {
                    return None;
                };
                let slab = slabs.get(pfn)?;
                let cache = caches.get(&slab.cache)?;
                let same_cache = query.cache.is_none_or(|expected| expected == slab.cache);
                (same_cache
                    && owners::holds(self.bases.direct(slab.pfn), cache, slab, &query.object))
                .then_some((slab, cache))
            })
            .collect();

        let mut walks: HashMap<u64, FreelistWalk> = HashMap::new();
        for (slab, cache) in owners.iter().flatten() {
            walks.entry(slab.pfn).or_insert_with(|| {
                FreelistWalk::new(slab, cache, self.bases.direct(slab.pfn), slab.freelist)
            });
        }
        walk_all(self, walks.values_mut())?;
        let slab_free: HashMap<u64, FreeSet> = walks
            .into_iter()
            .map(|(pfn, walk)| (pfn, walk.into_free_set()))
            .collect();

        let used: HashMap<u64, &Cache> = owners
            .iter()
            .flatten()
            .map(|(_, cache)| (cache.address, *cache))
            .collect();
        let per_cpu = match self.percpu_offsets(&free_layout) {
            Ok(offsets) => Some(self.per_cpu_free(&free_layout, &offsets, &used, &slabs)?),
            Err(error) => {
                notes.push(format!(
                    "objects on per-CPU freelists and sheaves are not checked (the per-CPU \
                     offsets could not be proven: {error:#}); objects in CPU slabs and in \
                     caches with sheaves are unverified"
                ));
                None
            }
        };
        let barns = self.barn_objects(&free_layout, &used)?;

        let evidence = Evidence {
            slabs: &slabs,
            caches: &caches,
            slab_free: &slab_free,
            barns: &barns,
            per_cpu: per_cpu.as_ref(),
        };
        let states = queries
            .iter()
            .zip(&heads)
            .zip(&owners)
            .map(|((query, head), owner)| evidence.state(query.object.address, *head, *owner))
            .collect();
        Ok(Check { states, notes })
    }

    /// The slab head of each object's page, reading /proc/kpageflags in chunks of
    /// [`FLAGS_CHUNK`] entries, each once.
    fn page_heads(&self, queries: &[Query]) -> Result<Vec<PageHead>> {
        let page_flags = slabs::open_page_flags()?;
        let mut chunks: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut read = |first: u64, count: u64| -> Result<Vec<u64>> {
            let mut flags = Vec::with_capacity(count as usize);
            for pfn in first..first + count {
                let chunk = pfn / FLAGS_CHUNK;
                if !chunks.contains_key(&chunk) {
                    let entries = slabs::page_flags(&page_flags, chunk * FLAGS_CHUNK, FLAGS_CHUNK)?;
                    chunks.insert(chunk, entries);
                }
                match chunks[&chunk].get((pfn % FLAGS_CHUNK) as usize) {
                    Some(&entry) => flags.push(entry),
                    None => break,
                }
            }
            Ok(flags)
        };
        let mut by_page: HashMap<u64, PageHead> = HashMap::new();
        let mut heads = Vec::with_capacity(queries.len());
        for query in queries {
            let address = query.object.address;
            if !self.bases.in_direct_map(address) {
                heads.push(PageHead::Unknown);
                continue;
            }
            let pfn = (address - self.bases.page_offset) / PAGE;
            let head = match by_page.get(&pfn) {
                Some(&head) => head,
                None => {
                    let head = owners::slab_head_from(&mut read, pfn)?;
                    by_page.insert(pfn, head);
                    head
                }
            };
            heads.push(head);
        }
        Ok(heads)
    }

    /// Each online CPU's per-CPU offset, found once per view.
    fn percpu_offsets(&mut self, layout: &FreeListLayout) -> Result<Vec<(u32, u64)>> {
        if self.percpu_offsets.is_none() {
            let found = self
                .reader
                .percpu_offsets(layout.bpf_array_pptrs.offset as u64)
                .map_err(|error| format!("{error:#}"));
            self.percpu_offsets = Some(found);
        }
        match self.percpu_offsets.as_ref() {
            Some(Ok(offsets)) => Ok(offsets.clone()),
            Some(Err(message)) => Err(anyhow::anyhow!("{message}")),
            None => unreachable!("set above"),
        }
    }

    /// Free objects held per CPU by the caches in `caches`: each CPU's lockless freelist (for
    /// the slabs in `slabs`) and its sheaves.
    fn per_cpu_free(
        &mut self,
        layout: &FreeListLayout,
        offsets: &[(u32, u64)],
        caches: &HashMap<u64, &Cache>,
        slabs: &HashMap<u64, Slab>,
    ) -> Result<PerCpuFree> {
        let mut reads = Vec::new();
        let mut places = Vec::new();
        for cache in caches.values() {
            for &(_, offset) in offsets {
                if cache.cpu_slab != 0 {
                    places.push((cache.address, Place::CpuSlab));
                    reads.push((cache.cpu_slab.wrapping_add(offset), 64));
                }
                if cache.cpu_sheaves != 0 {
                    places.push((cache.address, Place::Sheaves));
                    reads.push((cache.cpu_sheaves.wrapping_add(offset), 64));
                }
            }
        }
        let mut walks = Vec::new();
        let mut sheaves = Vec::new();
        let page_size = self.layout.page_size as u64;
        let vmemmap = self.bases.vmemmap;
        self.reader.read_each(&reads, |index, bytes| {
            let Some(bytes) = bytes else { return };
            let (cache_address, place) = places[index];
            let Some(cache) = caches.get(&cache_address) else {
                return;
            };
            match place {
                Place::CpuSlab => {
                    let freelist = layout.cpu_freelist.read(bytes).unwrap_or(0);
                    let slab_pointer = layout.cpu_slab.read(bytes).unwrap_or(0);
                    let Some(pfn) = slab_pointer
                        .checked_sub(vmemmap)
                        .filter(|offset| offset % page_size == 0)
                        .map(|offset| offset / page_size)
                    else {
                        return;
                    };
                    if let Some(slab) = slabs.get(&pfn)
                        && freelist != 0
                    {
                        walks.push((pfn, slab, *cache, freelist));
                    }
                }
                Place::Sheaves => {
                    if let Some(sheaf_layout) = layout.sheaves {
                        for field in sheaf_layout.percpu_sheaves {
                            let sheaf = field.read(bytes).unwrap_or(0);
                            if sheaf != 0 {
                                sheaves.push(sheaf);
                            }
                        }
                    }
                }
            }
        })?;
        let bases = self.bases;
        let mut freelist_walks: Vec<(u64, FreelistWalk)> = walks
            .into_iter()
            .map(|(pfn, slab, cache, freelist)| {
                (
                    pfn,
                    FreelistWalk::new(slab, cache, bases.direct(slab.pfn), freelist),
                )
            })
            .collect();
        walk_all(self, freelist_walks.iter_mut().map(|(_, walk)| walk))?;
        let mut free = PerCpuFree::default();
        for (pfn, walk) in freelist_walks {
            let set = walk.into_free_set();
            if set.broken {
                free.broken_slabs.insert(pfn);
            }
            free.freelists.extend(set.objects);
        }
        free.sheaves = self.sheaf_objects(layout, &sheaves)?;
        Ok(free)
    }

    /// The objects in the full sheaves of every node's barn of the caches with sheaves.
    fn barn_objects(
        &mut self,
        layout: &FreeListLayout,
        caches: &HashMap<u64, &Cache>,
    ) -> Result<HashSet<u64>> {
        let Some(sheaf_layout) = layout.sheaves else {
            return Ok(HashSet::new());
        };
        let with_sheaves: Vec<u64> = caches
            .values()
            .filter(|cache| cache.cpu_sheaves != 0)
            .map(|cache| cache.address)
            .collect();
        let node_reads: Vec<(u64, u32)> = with_sheaves
            .iter()
            .map(|cache| {
                (
                    cache + layout.cache_node.offset as u64,
                    (MAX_NODES * 8) as u32,
                )
            })
            .collect();
        let mut nodes = Vec::new();
        self.reader.read_each(&node_reads, |_, bytes| {
            for word in bytes.unwrap_or_default().as_chunks::<8>().0 {
                let node = u64::from_le_bytes(*word);
                if node != 0 {
                    nodes.push(node);
                }
            }
        })?;
        let barn_reads: Vec<(u64, u32)> = nodes
            .iter()
            .map(|node| (node + sheaf_layout.node_barn.offset as u64, 8))
            .collect();
        let mut barns = Vec::new();
        self.reader.read_each(&barn_reads, |_, bytes| {
            if let Some(barn) = word(bytes)
                && barn != 0
            {
                barns.push(barn);
            }
        })?;
        // Walk each barn's list of full sheaves, one hop per round for all barns at once.
        let list_offset = sheaf_layout.sheaf_barn_list.offset as u64;
        let mut sheaves = Vec::new();
        let mut cursors: Vec<(u64, u64)> = barns
            .iter()
            .map(|barn| {
                let head = barn + sheaf_layout.barn_sheaves_full.offset as u64;
                (head, head)
            })
            .collect();
        for _ in 0..MAX_BARN_SHEAVES {
            if cursors.is_empty() {
                break;
            }
            let reads: Vec<(u64, u32)> = cursors.iter().map(|&(_, at)| (at, 8)).collect();
            let mut next = Vec::new();
            self.reader.read_each(&reads, |index, bytes| {
                let (head, _) = cursors[index];
                let Some(entry) = word(bytes) else {
                    return;
                };
                if entry != head && entry != 0 {
                    sheaves.push(entry.wrapping_sub(list_offset));
                    next.push((head, entry));
                }
            })?;
            cursors = next;
        }
        self.sheaf_objects(layout, &sheaves)
    }

    /// The objects held by each sheaf at `sheaves`.
    fn sheaf_objects(&mut self, layout: &FreeListLayout, sheaves: &[u64]) -> Result<HashSet<u64>> {
        let Some(sheaf_layout) = layout.sheaves else {
            return Ok(HashSet::new());
        };
        // The header first, for how many objects each holds; then exactly that many pointers,
        // so that no read runs past the sheaf.
        let objects_offset = sheaf_layout.sheaf_objects.offset as u64;
        let headers: Vec<(u64, u32)> = sheaves
            .iter()
            .map(|&sheaf| (sheaf, objects_offset as u32))
            .collect();
        let mut arrays = Vec::new();
        self.reader.read_each(&headers, |index, bytes| {
            let size = bytes
                .and_then(|bytes| sheaf_layout.sheaf_size.read_u32(bytes))
                .unwrap_or(0);
            let length = (u64::from(size) * 8).min(PAGE);
            if length > 0 {
                arrays.push((sheaves[index] + objects_offset, length as u32));
            }
        })?;
        let mut objects = HashSet::new();
        self.reader.read_each(&arrays, |_, bytes| {
            for word in bytes.unwrap_or_default().as_chunks::<8>().0 {
                objects.insert(u64::from_le_bytes(*word));
            }
        })?;
        Ok(objects)
    }
}

/// Everything read about the objects' slabs, from which each object's state is decided.
struct Evidence<'a> {
    /// The slabs read, by first page frame.
    slabs: &'a HashMap<u64, Slab>,
    /// Their caches, by `struct kmem_cache *`.
    caches: &'a HashMap<u64, Cache>,
    /// Each owning slab's own freelist.
    slab_free: &'a HashMap<u64, FreeSet>,
    /// Objects in the nodes' barns (full sheaves).
    barns: &'a HashSet<u64>,
    /// The CPUs' lockless freelists and sheaves; `None` when they could not be read.
    per_cpu: Option<&'a PerCpuFree>,
}

impl Evidence<'_> {
    /// The state of the object at `address`, whose page has slab head `head` and which is a
    /// slot of `owner` when that is known. Anything unsure is unverified, never free.
    fn state(&self, address: u64, head: PageHead, owner: Option<(&Slab, &Cache)>) -> State {
        match (head, owner) {
            (PageHead::Unknown, _) => State::Unverified,
            (PageHead::NotSlab, _) => State::Free(FreeReason::SlabGone),
            (PageHead::Slab(pfn), None) => match self.slabs.get(&pfn) {
                // Read, and not a slot of its cache and size: the page was reused.
                Some(slab) if self.caches.contains_key(&slab.cache) => {
                    State::Free(FreeReason::SlabGone)
                }
                _ => State::Unverified,
            },
            (PageHead::Slab(_), Some((slab, cache))) => {
                let own = self.slab_free.get(&slab.pfn);
                if own.is_some_and(|own| own.broken) {
                    State::Unverified
                } else if own.is_some_and(|own| own.objects.contains(&address)) {
                    State::Free(FreeReason::SlabFreelist)
                } else if self.barns.contains(&address) {
                    State::Free(FreeReason::Sheaf)
                } else if let Some(per_cpu) = self.per_cpu {
                    if per_cpu.sheaves.contains(&address) {
                        State::Free(FreeReason::Sheaf)
                    } else if per_cpu.broken_slabs.contains(&slab.pfn) {
                        State::Unverified
                    } else if per_cpu.freelists.contains(&address) {
                        State::Free(FreeReason::CpuFreelist)
                    } else {
                        State::Allocated
                    }
                } else if slab.frozen || cache.cpu_sheaves != 0 {
                    State::Unverified
                } else {
                    State::Allocated
                }
            }
        }
    }
}

/// The little-endian word at the start of a read, `None` when the read failed.
fn word(bytes: Option<&[u8]>) -> Option<u64> {
    Some(u64::from_le_bytes(bytes?.get(..8)?.try_into().ok()?))
}

#[derive(Debug, Clone, Copy)]
enum Place {
    CpuSlab,
    Sheaves,
}

#[derive(Debug, Default)]
struct PerCpuFree {
    freelists: HashSet<u64>,
    sheaves: HashSet<u64>,
    /// Slabs whose CPU freelist could not be followed to its end.
    broken_slabs: HashSet<u64>,
}

/// The free objects found on one freelist, or that the list could not be followed.
#[derive(Debug, Default)]
pub struct FreeSet {
    pub objects: HashSet<u64>,
    pub broken: bool,
}

/// One freelist being followed: the slab's own, or a CPU's lockless one.
#[derive(Debug)]
struct FreelistWalk<'a> {
    slab_start: u64,
    objects: u32,
    cache: &'a Cache,
    current: u64,
    found: HashSet<u64>,
    broken: bool,
}

impl<'a> FreelistWalk<'a> {
    fn new(slab: &Slab, cache: &'a Cache, slab_start: u64, first: u64) -> Self {
        Self {
            slab_start,
            objects: slab.objects,
            cache,
            current: first,
            found: HashSet::new(),
            broken: false,
        }
    }

    fn pending(&self) -> bool {
        self.current != 0 && !self.broken
    }

    /// Takes the free pointer read at the current object; moves on to the next.
    fn advance(&mut self, stored: Option<u64>) {
        let current = self.current;
        if !self.cache.is_slot(self.slab_start, self.objects, current)
            || !self.found.insert(current)
        {
            self.broken = true;
            return;
        }
        let Some(stored) = stored else {
            self.broken = true;
            return;
        };
        self.current = self
            .cache
            .decode_free_pointer(current + u64::from(self.cache.offset), stored);
    }

    fn into_free_set(self) -> FreeSet {
        FreeSet {
            objects: self.found,
            broken: self.broken,
        }
    }
}

/// Follows every walk to its end, one hop of all of them per batch of reads.
fn walk_all<'a, 'c: 'a>(
    view: &mut KernelView,
    walks: impl Iterator<Item = &'a mut FreelistWalk<'c>>,
) -> Result<()> {
    let mut walks: Vec<&mut FreelistWalk<'c>> = walks.collect();
    loop {
        walks.retain(|walk| walk.pending());
        if walks.is_empty() {
            return Ok(());
        }
        let reads: Vec<(u64, u32)> = walks
            .iter()
            .map(|walk| (walk.current + u64::from(walk.cache.offset), 8))
            .collect();
        let mut stored = vec![None; walks.len()];
        view.reader.read_each(&reads, |index, bytes| {
            stored[index] = word(bytes);
        })?;
        for (walk, stored) in walks.iter_mut().zip(stored) {
            walk.advance(stored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::slabs::tests::cache;

    fn slab(objects: u32) -> Slab {
        Slab {
            pfn: 0x100,
            cache: 0xffff_8880_0100_0000,
            freelist: 0,
            inuse: 0,
            objects,
            frozen: false,
        }
    }

    #[test]
    fn a_walk_follows_hardened_pointers_to_the_end_of_the_list() {
        let start = 0xffff_8880_0010_0000;
        let random = 0x5a5a_1234_dead_beef;
        let cache = cache(random);
        let encode = |object: u64, next: u64| next ^ random ^ (object + 32).swap_bytes();
        let mut walk = FreelistWalk::new(&slab(8), &cache, start, start + 3 * 64);
        walk.advance(Some(encode(start + 3 * 64, start + 6 * 64)));
        walk.advance(Some(encode(start + 6 * 64, 0)));
        assert!(!walk.pending());
        let set = walk.into_free_set();
        assert!(!set.broken);
        assert_eq!(set.objects, HashSet::from([start + 3 * 64, start + 6 * 64]));
    }

    #[test]
    fn a_walk_that_leaves_the_slab_or_loops_is_broken() {
        let start = 0xffff_8880_0010_0000;
        let cache = cache(0);
        let mut leaves = FreelistWalk::new(&slab(8), &cache, start, start + 64);
        leaves.advance(Some(start + 8 * 64));
        leaves.advance(Some(0));
        assert!(leaves.into_free_set().broken);
        let mut loops = FreelistWalk::new(&slab(8), &cache, start, start + 64);
        loops.advance(Some(start + 2 * 64));
        loops.advance(Some(start + 64));
        loops.advance(Some(0));
        assert!(loops.into_free_set().broken);
        let mut unreadable = FreelistWalk::new(&slab(8), &cache, start, start + 64);
        unreadable.advance(None);
        assert!(unreadable.into_free_set().broken);
    }

    /// One object of a slab of `cache(0)`, and evidence about it that each test varies.
    struct Case {
        slabs: HashMap<u64, Slab>,
        caches: HashMap<u64, Cache>,
        slab_free: HashMap<u64, FreeSet>,
        barns: HashSet<u64>,
        per_cpu: Option<PerCpuFree>,
    }

    const OBJECT: u64 = 0xffff_8880_0040_0080;

    impl Case {
        fn new() -> Self {
            let slab = slab(8);
            let cache = cache(0);
            Self {
                slabs: [(slab.pfn, slab)].into(),
                caches: [(cache.address, cache)].into(),
                slab_free: HashMap::new(),
                barns: HashSet::new(),
                per_cpu: Some(PerCpuFree::default()),
            }
        }

        fn state_of_slot(&self) -> State {
            let slab = &self.slabs[&0x100];
            let cache = &self.caches[&slab.cache];
            self.evidence()
                .state(OBJECT, PageHead::Slab(slab.pfn), Some((slab, cache)))
        }

        fn evidence(&self) -> Evidence<'_> {
            Evidence {
                slabs: &self.slabs,
                caches: &self.caches,
                slab_free: &self.slab_free,
                barns: &self.barns,
                per_cpu: self.per_cpu.as_ref(),
            }
        }

        fn free_on_slab_list(mut self, broken: bool) -> Self {
            self.slab_free.insert(
                0x100,
                FreeSet {
                    objects: [OBJECT].into(),
                    broken,
                },
            );
            self
        }
    }

    #[test]
    fn an_object_on_no_free_list_is_allocated() {
        assert_eq!(Case::new().state_of_slot(), State::Allocated);
        // Another object's slab freelist says nothing of this one.
        let mut other = Case::new();
        other.slab_free.insert(
            0x100,
            FreeSet {
                objects: [OBJECT + 64].into(),
                broken: false,
            },
        );
        assert_eq!(other.state_of_slot(), State::Allocated);
    }

    #[test]
    fn each_free_list_frees_the_object_with_its_reason() {
        assert_eq!(
            Case::new().free_on_slab_list(false).state_of_slot(),
            State::Free(FreeReason::SlabFreelist)
        );
        let mut barn = Case::new();
        barn.barns.insert(OBJECT);
        assert_eq!(barn.state_of_slot(), State::Free(FreeReason::Sheaf));
        let mut sheaf = Case::new();
        sheaf.per_cpu.as_mut().unwrap().sheaves.insert(OBJECT);
        assert_eq!(sheaf.state_of_slot(), State::Free(FreeReason::Sheaf));
        let mut cpu = Case::new();
        cpu.per_cpu.as_mut().unwrap().freelists.insert(OBJECT);
        assert_eq!(cpu.state_of_slot(), State::Free(FreeReason::CpuFreelist));
        // Without per-CPU data the barns still count.
        let mut barn_only = Case::new();
        barn_only.per_cpu = None;
        barn_only.barns.insert(OBJECT);
        assert_eq!(barn_only.state_of_slot(), State::Free(FreeReason::Sheaf));
    }

    #[test]
    fn a_list_that_could_not_be_followed_makes_the_object_unverified_not_free() {
        assert_eq!(
            Case::new().free_on_slab_list(true).state_of_slot(),
            State::Unverified
        );
        let mut cpu_broken = Case::new();
        let per_cpu = cpu_broken.per_cpu.as_mut().unwrap();
        per_cpu.broken_slabs.insert(0x100);
        per_cpu.freelists.insert(OBJECT);
        assert_eq!(cpu_broken.state_of_slot(), State::Unverified);
        // A sheaf is not a slab's list: a broken CPU freelist does not hide it.
        cpu_broken.per_cpu.as_mut().unwrap().sheaves.insert(OBJECT);
        assert_eq!(cpu_broken.state_of_slot(), State::Free(FreeReason::Sheaf));
    }

    #[test]
    fn without_per_cpu_data_only_slabs_no_cpu_can_hold_are_verified() {
        let mut plain = Case::new();
        plain.per_cpu = None;
        assert_eq!(plain.state_of_slot(), State::Allocated);
        let mut frozen = Case::new();
        frozen.per_cpu = None;
        frozen.slabs.get_mut(&0x100).unwrap().frozen = true;
        assert_eq!(frozen.state_of_slot(), State::Unverified);
        let mut sheaves = Case::new();
        sheaves.per_cpu = None;
        sheaves.caches.values_mut().next().unwrap().cpu_sheaves = 0xffff_8880_0200_0000;
        assert_eq!(sheaves.state_of_slot(), State::Unverified);
        // With per-CPU data, a frozen slab's object on no list is allocated.
        let mut read = Case::new();
        read.slabs.get_mut(&0x100).unwrap().frozen = true;
        assert_eq!(read.state_of_slot(), State::Allocated);
    }

    #[test]
    fn pages_that_are_no_longer_its_slab_free_the_object() {
        let case = Case::new();
        let evidence = case.evidence();
        assert_eq!(
            evidence.state(OBJECT, PageHead::NotSlab, None),
            State::Free(FreeReason::SlabGone)
        );
        assert_eq!(
            evidence.state(OBJECT, PageHead::Unknown, None),
            State::Unverified
        );
        // A slab that was read, of a known cache, but the object is no slot of it.
        assert_eq!(
            evidence.state(OBJECT, PageHead::Slab(0x100), None),
            State::Free(FreeReason::SlabGone)
        );
        // A slab that could not be read, or whose cache was not: unverified.
        assert_eq!(
            evidence.state(OBJECT, PageHead::Slab(0x200), None),
            State::Unverified
        );
        let mut unknown_cache = Case::new();
        unknown_cache.caches.clear();
        assert_eq!(
            unknown_cache
                .evidence()
                .state(OBJECT, PageHead::Slab(0x100), None),
            State::Unverified
        );
    }
}
