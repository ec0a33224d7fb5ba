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
    bases::KernelBases,
    layout::{FreeListLayout, SlabLayout},
    memory::KernelMemory,
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
        let Some(free_layout) = self.layout.free_lists else {
            return Ok(Check {
                states: vec![State::Unverified; queries.len()],
                notes: vec![
                    "outstanding slab objects are not checked in kernel memory: this kernel's \
                     SLUB structures (kmem_cache_cpu, bpf_array) are not known to memleak; \
                     objects freed without a kmem event may be listed"
                        .to_owned(),
                ],
            });
        };
        // Each online CPU's per-CPU offset, looked for once per view.
        let reader = &mut self.reader;
        let percpu_offsets = self
            .percpu_offsets
            .get_or_insert_with(|| {
                reader
                    .percpu_offsets(free_layout.bpf_array_pptrs.offset as u64)
                    .map_err(|error| format!("{error:#}"))
            })
            .clone()
            .map_err(anyhow::Error::msg);
        let page_flags = slabs::open_page_flags()?;
        Walker {
            memory: &mut self.reader,
            layout: &self.layout,
            free_layout: &free_layout,
            bases: &self.bases,
        }
        .check(
            queries,
            |first, count| slabs::page_flags(&page_flags, first, count),
            percpu_offsets,
        )
    }
}

/// The liveness check over some kernel memory: the running kernel's, or a test's image.
struct Walker<'a, M> {
    memory: &'a mut M,
    layout: &'a SlabLayout,
    free_layout: &'a FreeListLayout,
    bases: &'a KernelBases,
}

impl<M: KernelMemory> Walker<'_, M> {
    /// Checks each of `queries`, with the page flags of `count` frames from `first` read by
    /// `page_flags`, and each online CPU's per-CPU offset where they were found.
    fn check(
        &mut self,
        queries: &[Query],
        page_flags: impl FnMut(u64, u64) -> Result<Vec<u64>>,
        percpu_offsets: Result<Vec<(u32, u64)>>,
    ) -> Result<Check> {
        let mut notes = Vec::new();
        let heads = self.page_heads(queries, page_flags)?;
        let mut wanted: Vec<u64> = heads
            .iter()
            .filter_map(|head| match head {
                PageHead::Slab(pfn) => Some(*pfn),
                _ => None,
            })
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let slabs = slabs::read_slabs(self.memory, self.layout, self.bases, &wanted)?;
        let caches = slabs::read_caches(self.memory, self.layout, self.bases, &slabs)?;
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
        self.walk_all(walks.values_mut())?;
        let slab_free: HashMap<u64, FreeSet> = walks
            .into_iter()
            .map(|(pfn, walk)| (pfn, walk.into_free_set()))
            .collect();

        let used: HashMap<u64, &Cache> = owners
            .iter()
            .flatten()
            .map(|(_, cache)| (cache.address, *cache))
            .collect();
        let per_cpu = match percpu_offsets {
            Ok(offsets) => Some(self.per_cpu_free(&offsets, &used, &slabs)?),
            Err(error) => {
                notes.push(format!(
                    "objects on per-CPU freelists and sheaves are not checked (the per-CPU \
                     offsets could not be proven: {error:#}); objects in CPU slabs and in \
                     caches with sheaves are unverified"
                ));
                None
            }
        };
        let barns = self.barn_objects(&used)?;

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

    /// The slab head of each object's page, reading the page flags in chunks of
    /// [`FLAGS_CHUNK`] entries, each once.
    fn page_heads(
        &self,
        queries: &[Query],
        mut page_flags: impl FnMut(u64, u64) -> Result<Vec<u64>>,
    ) -> Result<Vec<PageHead>> {
        let mut chunks: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut read = |first: u64, count: u64| -> Result<Vec<u64>> {
            let mut flags = Vec::with_capacity(count as usize);
            for pfn in first..first + count {
                let chunk = pfn / FLAGS_CHUNK;
                if !chunks.contains_key(&chunk) {
                    let entries = page_flags(chunk * FLAGS_CHUNK, FLAGS_CHUNK)?;
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

    /// Free objects held per CPU by the caches in `caches`: each CPU's lockless freelist (for
    /// the slabs in `slabs`) and its sheaves.
    fn per_cpu_free(
        &mut self,
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
        let mut unread_cpu_slabs = HashSet::new();
        let mut unread_sheaves = HashSet::new();
        let layout = self.free_layout;
        let page_size = self.layout.page_size as u64;
        let vmemmap = self.bases.vmemmap;
        self.memory.read_each(&reads, |index, bytes| {
            let (cache_address, place) = places[index];
            let Some(bytes) = bytes else {
                match place {
                    Place::CpuSlab => unread_cpu_slabs.insert(cache_address),
                    Place::Sheaves => unread_sheaves.insert(cache_address),
                };
                return;
            };
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
                                sheaves.push((cache_address, sheaf));
                            }
                        }
                    }
                }
            }
        })?;
        let bases = *self.bases;
        let mut freelist_walks: Vec<(u64, FreelistWalk)> = walks
            .into_iter()
            .map(|(pfn, slab, cache, freelist)| {
                (
                    pfn,
                    FreelistWalk::new(slab, cache, bases.direct(slab.pfn), freelist),
                )
            })
            .collect();
        self.walk_all(freelist_walks.iter_mut().map(|(_, walk)| walk))?;
        let mut free = PerCpuFree {
            unread_cpu_slabs,
            ..PerCpuFree::default()
        };
        for (pfn, walk) in freelist_walks {
            let set = walk.into_free_set();
            if set.broken {
                free.broken_slabs.insert(pfn);
            }
            free.freelists.extend(set.objects);
        }
        free.sheaves = self.sheaf_objects(&sheaves)?;
        free.sheaves.unread.extend(unread_sheaves);
        Ok(free)
    }

    /// The objects in the full sheaves of every node's barn of the caches with sheaves.
    fn barn_objects(&mut self, caches: &HashMap<u64, &Cache>) -> Result<SheafObjects> {
        let Some(sheaf_layout) = self.free_layout.sheaves else {
            return Ok(SheafObjects::default());
        };
        let mut unread = HashSet::new();
        let with_sheaves: Vec<u64> = caches
            .values()
            .filter(|cache| cache.cpu_sheaves != 0)
            .map(|cache| cache.address)
            .collect();
        let node_reads: Vec<(u64, u32)> = with_sheaves
            .iter()
            .map(|cache| {
                (
                    cache + self.free_layout.cache_node.offset as u64,
                    (MAX_NODES * 8) as u32,
                )
            })
            .collect();
        let mut nodes = Vec::new();
        self.memory.read_each(&node_reads, |index, bytes| {
            let cache = with_sheaves[index];
            let Some(bytes) = bytes else {
                unread.insert(cache);
                return;
            };
            for word in bytes.as_chunks::<8>().0 {
                let node = u64::from_le_bytes(*word);
                if node != 0 {
                    nodes.push((cache, node));
                }
            }
        })?;
        let barn_reads: Vec<(u64, u32)> = nodes
            .iter()
            .map(|(_, node)| (node + sheaf_layout.node_barn.offset as u64, 8))
            .collect();
        let mut barns = Vec::new();
        self.memory.read_each(&barn_reads, |index, bytes| {
            let cache = nodes[index].0;
            match word(bytes) {
                Some(0) => {}
                Some(barn) => barns.push((cache, barn)),
                None => {
                    unread.insert(cache);
                }
            }
        })?;
        // Walk each barn's list of full sheaves, one hop per round for all barns at once.
        let list_offset = sheaf_layout.sheaf_barn_list.offset as u64;
        let mut sheaves = Vec::new();
        let mut cursors: Vec<BarnCursor> = barns
            .iter()
            .map(|&(cache, barn)| {
                let head = barn + sheaf_layout.barn_sheaves_full.offset as u64;
                BarnCursor {
                    cache,
                    head,
                    at: head,
                }
            })
            .collect();
        for _ in 0..MAX_BARN_SHEAVES {
            if cursors.is_empty() {
                break;
            }
            let reads: Vec<(u64, u32)> = cursors.iter().map(|cursor| (cursor.at, 8)).collect();
            let mut next = Vec::new();
            self.memory.read_each(&reads, |index, bytes| {
                let cursor = cursors[index];
                match word(bytes) {
                    Some(entry) if entry == cursor.head || entry == 0 => {}
                    Some(entry) => {
                        sheaves.push((cursor.cache, entry.wrapping_sub(list_offset)));
                        next.push(BarnCursor {
                            at: entry,
                            ..cursor
                        });
                    }
                    None => {
                        unread.insert(cursor.cache);
                    }
                }
            })?;
            cursors = next;
        }
        // A list longer than any barn keeps: it changed while it was read.
        unread.extend(cursors.iter().map(|cursor| cursor.cache));
        let mut objects = self.sheaf_objects(&sheaves)?;
        objects.unread.extend(unread);
        Ok(objects)
    }

    /// The objects held by each of `sheaves`, `(struct kmem_cache *, struct slab_sheaf *)`.
    fn sheaf_objects(&mut self, sheaves: &[(u64, u64)]) -> Result<SheafObjects> {
        let mut found = SheafObjects::default();
        let Some(sheaf_layout) = self.free_layout.sheaves else {
            return Ok(found);
        };
        // The header first, for how many objects each holds; then exactly that many pointers,
        // so that no read runs past the sheaf.
        let objects_offset = sheaf_layout.sheaf_objects.offset as u64;
        let headers: Vec<(u64, u32)> = sheaves
            .iter()
            .map(|&(_, sheaf)| (sheaf, objects_offset as u32))
            .collect();
        let mut arrays = Vec::new();
        let mut array_caches = Vec::new();
        self.memory.read_each(&headers, |index, bytes| {
            let (cache, sheaf) = sheaves[index];
            let Some(size) = bytes.and_then(|bytes| sheaf_layout.sheaf_size.read_u32(bytes)) else {
                found.unread.insert(cache);
                return;
            };
            let length = u64::from(size) * 8;
            if length > PAGE {
                // More than a sheaf holds: a sheaf reused while it was read.
                found.unread.insert(cache);
            } else if length > 0 {
                arrays.push((sheaf + objects_offset, length as u32));
                array_caches.push(cache);
            }
        })?;
        self.memory.read_each(&arrays, |index, bytes| match bytes {
            Some(bytes) => {
                for word in bytes.as_chunks::<8>().0 {
                    found.objects.insert(u64::from_le_bytes(*word));
                }
            }
            None => {
                found.unread.insert(array_caches[index]);
            }
        })?;
        Ok(found)
    }

    /// Follows every walk to its end, one hop of all of them per batch of reads.
    fn walk_all<'w, 'c: 'w>(
        &mut self,
        walks: impl Iterator<Item = &'w mut FreelistWalk<'c>>,
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
            self.memory.read_each(&reads, |index, bytes| {
                stored[index] = word(bytes);
            })?;
            for (walk, stored) in walks.iter_mut().zip(stored) {
                walk.advance(stored);
            }
        }
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
    barns: &'a SheafObjects,
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
                } else if self.barns.objects.contains(&address) {
                    State::Free(FreeReason::Sheaf)
                } else if self.barns.unread.contains(&cache.address) {
                    State::Unverified
                } else if let Some(per_cpu) = self.per_cpu {
                    if per_cpu.sheaves.objects.contains(&address) {
                        State::Free(FreeReason::Sheaf)
                    } else if per_cpu.sheaves.unread.contains(&cache.address)
                        || per_cpu.broken_slabs.contains(&slab.pfn)
                    {
                        State::Unverified
                    } else if per_cpu.freelists.contains(&address) {
                        State::Free(FreeReason::CpuFreelist)
                    } else if slab.frozen && per_cpu.unread_cpu_slabs.contains(&cache.address) {
                        // Some CPU's slab, and a CPU whose slab could not be read.
                        State::Unverified
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
    sheaves: SheafObjects,
    /// Slabs whose CPU freelist could not be followed to its end.
    broken_slabs: HashSet<u64>,
    /// Caches with a CPU whose `kmem_cache_cpu` could not be read: any of their frozen slabs
    /// may be that CPU's.
    unread_cpu_slabs: HashSet<u64>,
}

/// The objects found in sheaves, and the caches (`struct kmem_cache *`) with a sheaf or a
/// list of sheaves that could not be read: any of their objects may be in it.
#[derive(Debug, Default)]
struct SheafObjects {
    objects: HashSet<u64>,
    unread: HashSet<u64>,
}

/// Where the walk of one barn's list of full sheaves is.
#[derive(Debug, Clone, Copy)]
struct BarnCursor {
    cache: u64,
    /// The list's head in the barn.
    head: u64,
    /// The list entry whose `next` is read next.
    at: u64,
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
        barns: SheafObjects,
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
                barns: SheafObjects::default(),
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
        barn.barns.objects.insert(OBJECT);
        assert_eq!(barn.state_of_slot(), State::Free(FreeReason::Sheaf));
        let mut sheaf = Case::new();
        sheaf
            .per_cpu
            .as_mut()
            .unwrap()
            .sheaves
            .objects
            .insert(OBJECT);
        assert_eq!(sheaf.state_of_slot(), State::Free(FreeReason::Sheaf));
        let mut cpu = Case::new();
        cpu.per_cpu.as_mut().unwrap().freelists.insert(OBJECT);
        assert_eq!(cpu.state_of_slot(), State::Free(FreeReason::CpuFreelist));
        // Without per-CPU data the barns still count.
        let mut barn_only = Case::new();
        barn_only.per_cpu = None;
        barn_only.barns.objects.insert(OBJECT);
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
        cpu_broken
            .per_cpu
            .as_mut()
            .unwrap()
            .sheaves
            .objects
            .insert(OBJECT);
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

/// The whole check over a kernel image built by hand: SLUB's structures laid out as the
/// layout below says, with objects on every kind of free list, and slabs that cannot be told.
#[cfg(test)]
mod image_tests {
    use super::*;
    use crate::{
        kernel::btf::Field,
        scan::{
            layout::SheafLayout,
            memory::image::Image,
            slabs::{KPF_COMPOUND_TAIL, KPF_SLAB},
        },
    };

    const PAGE_OFFSET: u64 = 0xffff_8880_0000_0000;
    const VMEMMAP: u64 = 0xffff_ea00_0000_0000;
    const MAX_PFN: u64 = 0x2000;
    /// `sizeof(struct page)`.
    const STRUCT_PAGE: u64 = 64;
    const RANDOM: u64 = 0x5a5a_1234_dead_beef;
    /// Where a free object of the 64-byte cache keeps its free pointer.
    const FREE_POINTER: u64 = 32;
    /// The per-CPU pointers of the 64-byte cache, before a CPU's offset is added.
    const CPU_SLAB: u64 = 0x1000;
    const CPU_SHEAVES: u64 = 0x1040;

    /// The 64-byte cache, whose objects the queries ask about.
    const CACHE: u64 = direct(0x200);
    /// A 128-byte cache that a page of the 64-byte cache was reused for.
    const OTHER_CACHE: u64 = direct(0x202);
    /// A cache whose name cannot be read: not taken for a cache.
    const NAMELESS_CACHE: u64 = direct(0x203);

    /// A plain slab: free objects 5 -> 2 -> 7 on its own freelist.
    const PLAIN: u64 = 0x1100;
    /// CPU 0's slab (frozen): its free objects 3 -> 9 are on CPU 0's lockless freelist.
    const CPU0_SLAB: u64 = 0x1101;
    /// A slab whose freelist loops (1 -> 4 -> 1): it changed while it was read.
    const TORN: u64 = 0x1102;
    /// A page that is no longer a slab.
    const GONE: u64 = 0x1103;
    /// A slab of [`OTHER_CACHE`].
    const REUSED: u64 = 0x1104;
    /// CPU 1's slab, whose lockless freelist loops (2 -> 6 -> 2).
    const CPU1_SLAB: u64 = 0x1105;
    /// A slab of [`NAMELESS_CACHE`].
    const NAMELESS: u64 = 0x1106;
    /// A plain slab that CPU 2's `kmem_cache_cpu` names through a misaligned pointer.
    const MISALIGNED: u64 = 0x1107;
    /// A slab page whose `struct slab` cannot be read.
    const UNREADABLE: u64 = 0x1800;
    /// A slab of two pages across a boundary of the page flags' chunks: object 65 is free.
    const TWO_PAGES: u64 = FLAGS_CHUNK - 1;

    const fn direct(pfn: u64) -> u64 {
        PAGE_OFFSET + pfn * PAGE
    }

    fn object(pfn: u64, index: u64) -> u64 {
        direct(pfn) + index * 64
    }

    fn layout(sheaves: bool) -> SlabLayout {
        let word = Field::bytes;
        let bits = |offset, bit_shift, bits| Field {
            offset,
            bit_shift,
            bits,
        };
        SlabLayout {
            page_size: STRUCT_PAGE as usize,
            slab_cache: word(8),
            slab_freelist: word(16),
            slab_inuse: bits(24, 0, 16),
            slab_objects: bits(24, 16, 15),
            cache_size: word(8),
            cache_object_size: word(12),
            cache_offset: word(16),
            cache_red_left_pad: word(20),
            cache_name: word(24),
            cache_random: Some(word(32)),
            cache_bytes: 48,
            task_frag_page: word(0),
            task_frag_offset: word(8),
            free_lists: Some(FreeListLayout {
                slab_frozen: bits(24, 31, 1),
                cache_cpu_slab: word(0),
                cpu_freelist: word(0),
                cpu_slab: word(16),
                cache_node: word(48),
                bpf_array_pptrs: word(0),
                sheaves: sheaves.then_some(SheafLayout {
                    cache_cpu_sheaves: word(40),
                    percpu_sheaves: [word(0), word(8), word(16)],
                    sheaf_size: word(24),
                    sheaf_objects: word(32),
                    sheaf_barn_list: word(8),
                    node_barn: word(8),
                    barn_sheaves_full: word(16),
                }),
            }),
        }
    }

    struct Kernel {
        image: Image,
        page_flags: HashMap<u64, u64>,
        vmemmap_pages: HashSet<u64>,
        layout: SlabLayout,
        bases: KernelBases,
        percpu_offsets: Vec<(u32, u64)>,
    }

    impl Kernel {
        /// The image every test starts from; `sheaves`: a kernel with slab sheaves (6.18+).
        fn new(sheaves: bool) -> Self {
            let mut kernel = Self {
                image: Image::default(),
                page_flags: HashMap::new(),
                vmemmap_pages: HashSet::new(),
                layout: layout(sheaves),
                bases: KernelBases {
                    page_offset: PAGE_OFFSET,
                    vmemmap: VMEMMAP,
                    max_pfn: MAX_PFN,
                },
                // CPU 2's per-CPU area holds only its kmem_cache_cpu.
                percpu_offsets: [0x300, 0x301, 0x302]
                    .into_iter()
                    .enumerate()
                    .map(|(cpu, pfn)| (cpu as u32, direct(pfn) - CPU_SLAB))
                    .collect(),
            };
            kernel.caches();
            kernel.slabs();
            kernel.per_cpu();
            kernel.barn();
            kernel
        }

        fn caches(&mut self) {
            let names = direct(0x201);
            self.image.map(names, PAGE as usize);
            self.image.write(names, b"kmalloc-64\0");
            self.image.write(names + 64, b"kmalloc-128\0");
            for (cache, size, name, per_cpu) in [
                (CACHE, 64, names, true),
                (OTHER_CACHE, 128, names + 64, false),
                (NAMELESS_CACHE, 64, direct(0x1f00), false),
            ] {
                self.image.map(cache, PAGE as usize);
                self.image.write_u32(cache + 8, size);
                self.image.write_u32(cache + 12, size);
                self.image.write_u32(cache + 16, FREE_POINTER as u32);
                self.image.write_u64(cache + 24, name);
                self.image.write_u64(cache + 32, RANDOM);
                if per_cpu {
                    self.image.write_u64(cache, CPU_SLAB);
                    self.image.write_u64(cache + 40, CPU_SHEAVES);
                }
            }
        }

        fn slabs(&mut self) {
            self.slab(PLAIN, 1, CACHE, Some(5), false);
            self.free_list(&[object(PLAIN, 5), object(PLAIN, 2), object(PLAIN, 7)], 0);
            self.slab(CPU0_SLAB, 1, CACHE, None, true);
            self.free_list(&[object(CPU0_SLAB, 3), object(CPU0_SLAB, 9)], 0);
            self.slab(TORN, 1, CACHE, Some(1), false);
            self.free_list(&[object(TORN, 1), object(TORN, 4)], object(TORN, 1));
            self.image.map(direct(GONE), PAGE as usize);
            self.slab(REUSED, 1, OTHER_CACHE, None, false);
            self.slab(CPU1_SLAB, 1, CACHE, None, true);
            self.free_list(
                &[object(CPU1_SLAB, 2), object(CPU1_SLAB, 6)],
                object(CPU1_SLAB, 2),
            );
            self.slab(NAMELESS, 1, NAMELESS_CACHE, None, false);
            self.slab(MISALIGNED, 1, CACHE, None, false);
            self.free_list(&[object(MISALIGNED, 3)], 0);
            // A slab page whose vmemmap page is not mapped.
            self.image.map(direct(UNREADABLE), PAGE as usize);
            self.page_flags.insert(UNREADABLE, KPF_SLAB);
            self.slab(TWO_PAGES, 2, CACHE, Some(65), false);
            self.free_list(&[object(TWO_PAGES, 65)], 0);
        }

        /// Maps a slab of `pages` pages at `pfn` with its page flags and its `struct slab`.
        fn slab(
            &mut self,
            pfn: u64,
            pages: u64,
            cache: u64,
            first_free: Option<u64>,
            frozen: bool,
        ) {
            self.image.map(direct(pfn), (pages * PAGE) as usize);
            for page in 0..pages {
                let tail = if page == 0 { 0 } else { KPF_COMPOUND_TAIL };
                self.page_flags.insert(pfn + page, KPF_SLAB | tail);
            }
            let slab = VMEMMAP + pfn * STRUCT_PAGE;
            let vmemmap_page = slab / PAGE * PAGE;
            if self.vmemmap_pages.insert(vmemmap_page) {
                self.image.map(vmemmap_page, PAGE as usize);
            }
            self.image.write_u64(slab + 8, cache);
            self.image
                .write_u64(slab + 16, first_free.map_or(0, |index| object(pfn, index)));
            let objects = (pages * PAGE / 64) as u32;
            self.image
                .write_u32(slab + 24, (objects << 16) | (u32::from(frozen) << 31));
        }

        /// Chains `objects` into a freelist that goes on to `last_next` (0: the end), each free
        /// pointer hardened as SLUB stores it.
        fn free_list(&mut self, objects: &[u64], last_next: u64) {
            for (position, &at) in objects.iter().enumerate() {
                let next = objects.get(position + 1).copied().unwrap_or(last_next);
                let pointer = at + FREE_POINTER;
                self.image
                    .write_u64(pointer, next ^ RANDOM ^ pointer.swap_bytes());
            }
        }

        fn per_cpu(&mut self) {
            let area = |cpu: usize| direct(0x300 + cpu as u64);
            for cpu in 0..3 {
                self.image.map(area(cpu), PAGE as usize);
            }
            // CPU 0: its slab and lockless freelist; a main sheaf and an rcu_free sheaf.
            self.image.write_u64(area(0), object(CPU0_SLAB, 3));
            self.image
                .write_u64(area(0) + 16, VMEMMAP + CPU0_SLAB * STRUCT_PAGE);
            let sheaves = area(0) + (CPU_SHEAVES - CPU_SLAB);
            self.image.write_u64(sheaves, direct(0x500));
            self.image.write_u64(sheaves + 16, direct(0x502));
            self.sheaf(direct(0x500), &[object(PLAIN, 10), object(PLAIN, 11)]);
            self.sheaf(direct(0x502), &[object(PLAIN, 12)]);
            // CPU 1: a slab whose lockless freelist loops, and a main sheaf holding a page of
            // pointers, as many as a read takes.
            self.image.write_u64(area(1), object(CPU1_SLAB, 2));
            let full = [object(PLAIN, 16); (PAGE / 8) as usize];
            self.sheaf(direct(0x50a), &full);
            self.image
                .write_u64(area(1) + (CPU_SHEAVES - CPU_SLAB), direct(0x50a));
            self.image
                .write_u64(area(1) + 16, VMEMMAP + CPU1_SLAB * STRUCT_PAGE);
            // CPU 2: a slab pointer that is no `struct page`; its freelist is not followed.
            self.image.write_u64(area(2), object(MISALIGNED, 3));
            self.image
                .write_u64(area(2) + 16, VMEMMAP + MISALIGNED * STRUCT_PAGE + 8);
        }

        /// Maps a sheaf at `address` holding `objects` (two pages, room for a page of
        /// pointers), with stale pointers after them that are not its objects.
        fn sheaf(&mut self, address: u64, objects: &[u64]) {
            self.image.map(address, 2 * PAGE as usize);
            self.image.write_u32(address + 24, objects.len() as u32);
            for (index, &object) in objects.iter().enumerate() {
                self.image
                    .write_u64(address + 32 + 8 * index as u64, object);
            }
            self.image
                .write_u64(address + 32 + 8 * objects.len() as u64, object(PLAIN, 20));
        }

        /// Two nodes' barns (nodes 0 and 9), with full sheaves listed through their
        /// `barn_list`: node 0's holds one, node 9's two.
        fn barn(&mut self) {
            self.sheaf(direct(0x504), &[object(PLAIN, 13)]);
            self.sheaf(direct(0x506), &[object(PLAIN, 14)]);
            self.sheaf(direct(0x508), &[object(PLAIN, 15)]);
            for (index, node, barn, sheaves) in [
                (0, direct(0x402), direct(0x403), vec![direct(0x504)]),
                (
                    9,
                    direct(0x406),
                    direct(0x407),
                    vec![direct(0x506), direct(0x508)],
                ),
            ] {
                self.image.write_u64(CACHE + 48 + 8 * index, node);
                self.image.map(node, PAGE as usize);
                self.image.write_u64(node + 8, barn);
                self.image.map(barn, PAGE as usize);
                let head = barn + 16;
                let mut previous = head;
                for &sheaf in &sheaves {
                    self.image.write_u64(previous, sheaf + 8);
                    previous = sheaf + 8;
                }
                self.image.write_u64(previous, head);
            }
        }

        /// Checks `queries` with the per-CPU offsets, or with `offsets_error` as the reason
        /// they were not found.
        fn check(&mut self, queries: &[Query], offsets_error: Option<&str>) -> Check {
            let percpu_offsets = match offsets_error {
                None => Ok(self.percpu_offsets.clone()),
                Some(error) => Err(anyhow::anyhow!(error.to_owned())),
            };
            let page_flags = &self.page_flags;
            let free_layout = self.layout.free_lists.unwrap();
            Walker {
                memory: &mut self.image,
                layout: &self.layout,
                free_layout: &free_layout,
                bases: &self.bases,
            }
            .check(
                queries,
                |first, count| Ok(flags_of(page_flags, first, count)),
                percpu_offsets,
            )
            .unwrap()
        }

        /// The state of each `(address, expected)`, asked as a 64-byte object of [`CACHE`],
        /// beside its address (to compare with `expected`), and the check's notes.
        fn states(
            &mut self,
            expected: &[(u64, State)],
            offsets_error: Option<&str>,
        ) -> (Vec<(u64, State)>, Vec<String>) {
            let queries: Vec<Query> = expected
                .iter()
                .map(|&(address, _)| query(address, 64, Some(CACHE)))
                .collect();
            let check = self.check(&queries, offsets_error);
            let states = expected
                .iter()
                .zip(check.states)
                .map(|(&(address, _), state)| (address, state))
                .collect();
            (states, check.notes)
        }
    }

    /// The page flags of `count` frames from `first`, as /proc/kpageflags gives them: no entry
    /// past the last frame.
    fn flags_of(page_flags: &HashMap<u64, u64>, first: u64, count: u64) -> Vec<u64> {
        (first..(first + count).min(MAX_PFN))
            .map(|pfn| page_flags.get(&pfn).copied().unwrap_or(0))
            .collect()
    }

    fn query(address: u64, size: u32, cache: Option<u64>) -> Query {
        Query {
            object: Object { address, size },
            cache,
        }
    }

    use State::{Allocated, Free, Unverified};
    const SLAB_FREELIST: State = Free(FreeReason::SlabFreelist);
    const CPU_FREELIST: State = Free(FreeReason::CpuFreelist);
    const SHEAF: State = Free(FreeReason::Sheaf);
    const SLAB_GONE: State = Free(FreeReason::SlabGone);

    #[test]
    fn every_free_list_of_a_kernel_with_sheaves_is_walked() {
        let expected = [
            (object(PLAIN, 0), Allocated),
            (object(PLAIN, 20), Allocated),
            (object(PLAIN, 5), SLAB_FREELIST),
            (object(PLAIN, 2), SLAB_FREELIST),
            (object(PLAIN, 7), SLAB_FREELIST),
            (object(PLAIN, 10), SHEAF),
            (object(PLAIN, 11), SHEAF),
            (object(PLAIN, 12), SHEAF),
            (object(PLAIN, 13), SHEAF),
            (object(PLAIN, 14), SHEAF),
            (object(PLAIN, 15), SHEAF),
            (object(PLAIN, 16), SHEAF),
            (object(CPU0_SLAB, 3), CPU_FREELIST),
            (object(CPU0_SLAB, 9), CPU_FREELIST),
            (object(CPU0_SLAB, 4), Allocated),
            (object(TORN, 4), Unverified),
            (object(TORN, 20), Unverified),
            (object(GONE, 0), SLAB_GONE),
            (object(REUSED, 2), SLAB_GONE),
            (object(CPU1_SLAB, 6), Unverified),
            (object(CPU1_SLAB, 30), Unverified),
            (object(NAMELESS, 1), Unverified),
            (object(MISALIGNED, 3), Allocated),
            (object(UNREADABLE, 0), Unverified),
            (object(TWO_PAGES, 65), SLAB_FREELIST),
            (object(TWO_PAGES, 70), Allocated),
            (object(TWO_PAGES, 3), Allocated),
            // Not a slot of its slab.
            (object(PLAIN, 0) + 8, SLAB_GONE),
            // Outside the direct map (a vmalloc address), and past its last page frame.
            (0xffff_c900_0000_0000, Unverified),
            (direct(MAX_PFN), Unverified),
        ];
        let mut kernel = Kernel::new(true);
        let (states, notes) = kernel.states(&expected, None);
        assert_eq!(states, expected);
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn an_object_asked_of_another_cache_or_size_is_no_slot_of_its_slab() {
        let mut kernel = Kernel::new(true);
        let address = object(PLAIN, 0);
        let check = kernel.check(
            &[
                query(address, 64, None),
                query(address, 64, Some(OTHER_CACHE)),
                query(address, 32, Some(CACHE)),
                query(address, 128, None),
            ],
            None,
        );
        assert_eq!(check.states, [Allocated, SLAB_GONE, SLAB_GONE, SLAB_GONE]);
    }

    #[test]
    fn without_per_cpu_offsets_what_a_cpu_may_hold_is_unverified_and_said() {
        let expected = [
            // The cache has sheaves: any of its objects could be in one.
            (object(PLAIN, 0), Unverified),
            (object(PLAIN, 10), Unverified),
            (object(PLAIN, 5), SLAB_FREELIST),
            // The barns are no CPU's: still walked.
            (object(PLAIN, 13), SHEAF),
            (object(CPU0_SLAB, 3), Unverified),
            (object(GONE, 0), SLAB_GONE),
        ];
        let mut kernel = Kernel::new(true);
        let (states, notes) = kernel.states(&expected, Some("no bpf_array found"));
        assert_eq!(states, expected);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("per-CPU offsets could not be proven: no bpf_array found"));
    }

    #[test]
    fn a_kernel_without_sheaves_walks_the_freelists_only() {
        let expected = [
            // Pointers in what would be sheaves are not read as free objects.
            (object(PLAIN, 10), Allocated),
            (object(PLAIN, 13), Allocated),
            (object(PLAIN, 5), SLAB_FREELIST),
            (object(CPU0_SLAB, 3), CPU_FREELIST),
            (object(CPU0_SLAB, 4), Allocated),
        ];
        let mut kernel = Kernel::new(false);
        assert_eq!(kernel.states(&expected, None).0, expected);
        // Without per-CPU offsets, a slab no CPU holds is still verified.
        let expected = [
            (object(PLAIN, 0), Allocated),
            (object(CPU0_SLAB, 4), Unverified),
        ];
        let (states, notes) = kernel.states(&expected, Some("none"));
        assert_eq!(states, expected);
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn a_sheaf_that_cannot_be_read_makes_its_caches_objects_unverified() {
        fn unmap(pfn: u64) -> impl Fn(&mut Kernel) {
            move |kernel| kernel.image.unmap(direct(pfn))
        }
        type Breakage = Box<dyn Fn(&mut Kernel)>;
        let breakages: [(&str, Breakage); 6] = [
            ("CPU sheaf", Box::new(unmap(0x502))),
            ("barn sheaf", Box::new(unmap(0x506))),
            ("barn", Box::new(unmap(0x403))),
            ("node", Box::new(unmap(0x402))),
            // A barn list that never comes back to its head: it changed while it was read.
            (
                "endless barn list",
                Box::new(|kernel| kernel.image.write_u64(direct(0x508) + 8, direct(0x506) + 8)),
            ),
            // A sheaf that says it holds more than a page of pointers.
            (
                "oversized sheaf",
                Box::new(|kernel| kernel.image.write_u32(direct(0x500) + 24, 513)),
            ),
        ];
        for (name, breakage) in breakages {
            let mut kernel = Kernel::new(true);
            breakage(&mut kernel);
            let expected = [
                (object(PLAIN, 0), Unverified),
                (object(PLAIN, 5), SLAB_FREELIST),
                (object(CPU0_SLAB, 4), Unverified),
            ];
            assert_eq!(kernel.states(&expected, None).0, expected, "{name}");
            // A cache without sheaves is not concerned.
            let reused = kernel.check(&[query(object(REUSED, 0), 128, None)], None);
            assert_eq!(reused.states, [Allocated], "{name}");
        }
    }

    #[test]
    fn a_cpu_whose_slab_cannot_be_read_leaves_frozen_slabs_unverified() {
        let mut kernel = Kernel::new(false);
        // CPU 1's per-CPU area.
        kernel.image.unmap(direct(0x301));
        let expected = [
            (object(CPU0_SLAB, 4), Unverified),
            (object(CPU1_SLAB, 30), Unverified),
            // CPU 0's freelist was read.
            (object(CPU0_SLAB, 3), CPU_FREELIST),
            // No CPU's slab.
            (object(PLAIN, 0), Allocated),
            (object(MISALIGNED, 3), Allocated),
        ];
        assert_eq!(kernel.states(&expected, None).0, expected);
    }

    #[test]
    fn a_slab_whose_struct_cannot_be_read_is_unverified() {
        let mut kernel = Kernel::new(true);
        kernel
            .image
            .unmap(VMEMMAP + PLAIN * STRUCT_PAGE / PAGE * PAGE);
        let expected = [
            (object(PLAIN, 5), Unverified),
            (object(PLAIN, 0), Unverified),
            (object(TWO_PAGES, 65), SLAB_FREELIST),
        ];
        assert_eq!(kernel.states(&expected, None).0, expected);
    }

    #[test]
    fn the_page_flags_are_read_a_chunk_at_a_time_each_once() {
        let kernel = Kernel::new(true);
        let free_layout = kernel.layout.free_lists.unwrap();
        let mut image = Image::default();
        let walker = Walker {
            memory: &mut image,
            layout: &kernel.layout,
            free_layout: &free_layout,
            bases: &kernel.bases,
        };
        let mut chunks_read = Vec::new();
        let queries: Vec<Query> = [
            object(PLAIN, 0),
            object(PLAIN, 1),
            object(TWO_PAGES, 70),
            object(GONE, 0),
            object(TWO_PAGES, 1),
        ]
        .into_iter()
        .map(|address| query(address, 64, None))
        .collect();
        let heads = walker
            .page_heads(&queries, |first, count| {
                chunks_read.push((first, count));
                Ok(flags_of(&kernel.page_flags, first, count))
            })
            .unwrap();
        assert_eq!(
            heads,
            [
                PageHead::Slab(PLAIN),
                PageHead::Slab(PLAIN),
                PageHead::Slab(TWO_PAGES),
                PageHead::NotSlab,
                PageHead::Slab(TWO_PAGES),
            ]
        );
        assert_eq!(chunks_read, [(FLAGS_CHUNK, FLAGS_CHUNK), (0, FLAGS_CHUNK)]);
    }
}
