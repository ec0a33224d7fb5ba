//! Finds a cache's slab pages and reads its objects: slab pages from /proc/kpageflags, their
//! `struct slab` from the vmemmap, the cache's `struct kmem_cache`, then the pages themselves.
use std::{fs::File, io::Read as _, os::unix::fs::FileExt as _};

use anyhow::{Context as _, Result};
use hashbrown::{HashMap, HashSet};

use super::{
    bases::{BaseError, KernelBases},
    layout::SlabLayout,
    memory::KernelMemory,
};
use crate::{bpf::reader::KernelReader, kernel::slab_merges::SlabMerges};

use super::PAGE;
pub const KPF_SLAB: u64 = 1 << 7;
pub const KPF_COMPOUND_TAIL: u64 = 1 << 16;
const KPAGEFLAGS: &str = "/proc/kpageflags";

pub fn open_page_flags() -> Result<File> {
    File::open(KPAGEFLAGS).with_context(|| format!("opening {KPAGEFLAGS}"))
}

/// The /proc/kpageflags entries of page frames `first..first + count` (fewer past the last).
pub fn page_flags(file: &File, first: u64, count: u64) -> Result<Vec<u64>> {
    let mut bytes = vec![0u8; (count * 8) as usize];
    let mut filled = 0;
    while filled < bytes.len() {
        let read = file
            .read_at(&mut bytes[filled..], first * 8 + filled as u64)
            .with_context(|| format!("reading {KPAGEFLAGS}"))?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    Ok(bytes[..filled / 8 * 8]
        .as_chunks::<8>()
        .0
        .iter()
        .map(|&entry| u64::from_le_bytes(entry))
        .collect())
}

/// One past the highest page frame number: /proc/kpageflags reads nothing from there on. A
/// binary search over single entries, instead of reading the whole file.
pub fn page_frames() -> Result<u64> {
    let file = open_page_flags()?;
    // 2^40 page frames is 4 PiB of memory, beyond what x86_64 addresses.
    let (mut readable, mut beyond) = (0u64, 1u64 << 40);
    if page_flags(&file, 0, 1)?.is_empty() {
        return Ok(0);
    }
    while beyond - readable > 1 {
        let middle = readable + (beyond - readable) / 2;
        if page_flags(&file, middle, 1)?.is_empty() {
            beyond = middle;
        } else {
            readable = middle;
        }
    }
    Ok(beyond)
}

/// The first page frame of every slab (order-0 slab pages and heads of compound ones), and
/// how many page frames the machine has.
pub struct SlabPages {
    pub heads: Vec<u64>,
    pub max_pfn: u64,
}

pub fn slab_pages() -> Result<SlabPages> {
    let mut file = open_page_flags()?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut heads = Vec::new();
    let mut pfn = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("reading {KPAGEFLAGS}"))?;
        if read == 0 {
            break;
        }
        // The kernel returns whole 8-byte entries.
        for &entry in buffer[..read].as_chunks::<8>().0 {
            let flags = u64::from_le_bytes(entry);
            if flags & KPF_SLAB != 0 && flags & KPF_COMPOUND_TAIL == 0 {
                heads.push(pfn);
            }
            pfn += 1;
        }
    }
    Ok(SlabPages {
        heads,
        max_pfn: pfn,
    })
}

/// What a `struct slab` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slab {
    pub pfn: u64,
    pub cache: u64,
    pub freelist: u64,
    pub inuse: u32,
    pub objects: u32,
    /// Some CPU's slab: its free objects are on that CPU's lockless freelist.
    pub frozen: bool,
}

/// Reads the `struct slab` of every page in `heads`, 64 at a time (one vmemmap page).
pub fn read_slabs(
    reader: &mut impl KernelMemory,
    layout: &SlabLayout,
    bases: &KernelBases,
    heads: &[u64],
) -> Result<Vec<Slab>> {
    let stride = layout.page_size as u64;
    let address = |pfn: u64| bases.vmemmap + pfn * stride;
    let mut pages: Vec<u64> = heads
        .iter()
        .map(|&pfn| address(pfn) / PAGE * PAGE)
        .collect();
    pages.dedup();
    let reads: Vec<(u64, u32)> = pages.iter().map(|&page| (page, PAGE as u32)).collect();
    let mut contents: HashMap<u64, Vec<u8>> = HashMap::with_capacity(pages.len());
    reader.read_each(&reads, |index, bytes| {
        if let Some(bytes) = bytes {
            contents.insert(pages[index], bytes.to_vec());
        }
    })?;
    let mut slabs = Vec::with_capacity(heads.len());
    for &pfn in heads {
        let start = address(pfn);
        let Some(page) = contents.get(&(start / PAGE * PAGE)) else {
            continue;
        };
        let offset = (start % PAGE) as usize;
        let Some(bytes) = page.get(offset..offset + layout.page_size) else {
            continue;
        };
        let read = |field: crate::kernel::btf::Field| field.read(bytes).unwrap_or(0);
        slabs.push(Slab {
            pfn,
            cache: read(layout.slab_cache),
            freelist: read(layout.slab_freelist),
            inuse: read(layout.slab_inuse) as u32,
            objects: read(layout.slab_objects) as u32,
            frozen: layout
                .free_lists
                .is_some_and(|free| read(free.slab_frozen) != 0),
        });
    }
    Ok(slabs)
}

/// What the scanner needs of a `struct kmem_cache`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    pub address: u64,
    pub name: String,
    pub size: u32,
    pub object_size: u32,
    /// Where a free object keeps its free pointer.
    pub offset: u32,
    pub red_left_pad: u32,
    /// Free pointer obfuscation key (CONFIG_SLAB_FREELIST_HARDENED), 0 without.
    pub random: u64,
    /// The per-CPU `struct kmem_cache_cpu *` (0 where the layout is not known).
    pub cpu_slab: u64,
    /// The per-CPU `struct slub_percpu_sheaves *`, 0 when the cache has no sheaves.
    pub cpu_sheaves: u64,
}

impl Cache {
    /// The next object of a freelist, from the free pointer `stored` at `pointer_address`
    /// (an object's address plus `offset`), decoded as SLUB encodes it with
    /// CONFIG_SLAB_FREELIST_HARDENED: `next ^ random ^ swab(pointer_address)`.
    pub fn decode_free_pointer(&self, pointer_address: u64, stored: u64) -> u64 {
        if self.random != 0 {
            stored ^ self.random ^ pointer_address.swap_bytes()
        } else {
            stored
        }
    }

    /// Whether `address` is one of the object slots of the slab of `objects` objects whose
    /// first page is at `slab_start`.
    pub fn is_slot(&self, slab_start: u64, objects: u32, address: u64) -> bool {
        let size = u64::from(self.size);
        address
            .checked_sub(slab_start + u64::from(self.red_left_pad))
            .is_some_and(|offset| offset % size == 0 && offset / size < u64::from(objects))
    }
}

/// Reads the caches that `slabs` belong to. A cache whose name does not read back as a
/// printable string is left out.
pub fn read_caches(
    reader: &mut impl KernelMemory,
    layout: &SlabLayout,
    bases: &KernelBases,
    slabs: &[Slab],
) -> Result<HashMap<u64, Cache>> {
    // Caches are slab objects themselves. A page freed since /proc/kpageflags was read holds
    // anything where its slab_cache was, and is not followed.
    let mut addresses: Vec<u64> = slabs
        .iter()
        .map(|slab| slab.cache)
        .collect::<HashSet<_>>()
        .into_iter()
        .filter(|&address| bases.in_direct_map(address))
        .collect();
    addresses.sort_unstable();
    let reads: Vec<(u64, u32)> = addresses
        .iter()
        .map(|&address| (address, layout.cache_bytes as u32))
        .collect();
    let mut structs = Vec::new();
    reader.read_each(&reads, |index, bytes| {
        if let Some(bytes) = bytes {
            structs.push((addresses[index], bytes.to_vec()));
        }
    })?;
    let name_reads: Vec<(u64, u32)> = structs
        .iter()
        .map(|(_, bytes)| (layout.cache_name.read(bytes).unwrap_or(0), 64))
        .collect();
    let mut names = vec![None; structs.len()];
    reader.read_each(&name_reads, |index, bytes| {
        names[index] = bytes.and_then(printable_c_string);
    })?;
    let mut caches = HashMap::new();
    for ((address, bytes), name) in structs.into_iter().zip(names) {
        let Some(name) = name else { continue };
        let read_u32 = |field: crate::kernel::btf::Field| field.read_u32(&bytes).unwrap_or(0);
        let cache = Cache {
            address,
            name,
            size: read_u32(layout.cache_size),
            object_size: read_u32(layout.cache_object_size),
            offset: read_u32(layout.cache_offset),
            red_left_pad: read_u32(layout.cache_red_left_pad),
            random: layout
                .cache_random
                .and_then(|field| field.read(&bytes))
                .unwrap_or(0),
            cpu_slab: layout
                .free_lists
                .and_then(|free| free.cache_cpu_slab.read(&bytes))
                .unwrap_or(0),
            cpu_sheaves: layout
                .free_lists
                .and_then(|free| free.sheaves)
                .and_then(|sheaves| sheaves.cache_cpu_sheaves.read(&bytes))
                .unwrap_or(0),
        };
        if cache.size > 0 && cache.object_size > 0 && cache.object_size <= cache.size {
            caches.insert(address, cache);
        }
    }
    Ok(caches)
}

/// A NUL-terminated name of 1 to 63 printable ASCII characters at the start of `bytes`.
fn printable_c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&byte| byte == 0)?;
    let name = &bytes[..end];
    (!name.is_empty() && name.iter().all(|byte| byte.is_ascii_graphic()))
        .then(|| String::from_utf8_lossy(name).into_owned())
}

/// The last check of the bases: most slab pages must lead to a cache with a readable name.
/// Pages freed since /proc/kpageflags was read may not, so a minority is tolerated.
pub fn verify_slabs_lead_to_caches(
    slabs: &[Slab],
    caches: &HashMap<u64, Cache>,
) -> Result<(), BaseError> {
    let valid = slabs
        .iter()
        .filter(|slab| caches.contains_key(&slab.cache))
        .count();
    if slabs.is_empty() || valid * 10 < slabs.len() * 9 {
        return Err(BaseError::Vmemmap {
            reason: format!(
                "only {valid} of {} slab pages' struct slab name a readable slab cache",
                slabs.len()
            ),
        });
    }
    Ok(())
}

/// The cache a user named, found among those read: by name, or as the cache SLUB merged it
/// into (`/sys/kernel/slab/NAME -> :A-0000064`).
pub fn find_cache<'a>(
    caches: &'a HashMap<u64, Cache>,
    wanted: &str,
    merges: &SlabMerges,
) -> Option<&'a Cache> {
    if let Some(cache) = caches.values().find(|cache| cache.name == wanted) {
        return Some(cache);
    }
    caches
        .values()
        .filter(|cache| merges.same_cache(&cache.name, wanted))
        .min_by_key(|cache| cache.address)
}

/// The objects of one cache: addresses, and `object_size` bytes each, back to back.
#[derive(Debug, Default)]
pub struct CacheObjects {
    pub object_size: usize,
    pub addresses: Vec<u64>,
    pub bytes: Vec<u8>,
    pub slabs: u64,
    /// Object slots in those slabs.
    pub slots: u64,
    /// Objects on their slab's freelist, left out.
    pub free: u64,
    /// Objects in use according to the slabs' counters (some may sit in per-CPU caches).
    pub inuse: u64,
    /// Slab pages that could not be read (freed while scanning).
    pub unreadable_pages: u64,
    /// Slabs whose freelist led outside the slab (changed while scanning); all their objects
    /// were kept.
    pub broken_freelists: u64,
}

impl CacheObjects {
    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    pub fn object(&self, index: usize) -> &[u8] {
        &self.bytes[index * self.object_size..(index + 1) * self.object_size]
    }
}

/// Reads every object of `cache` in `slabs`, leaving out those on their slab's freelist.
pub fn read_objects(
    reader: &mut KernelReader,
    bases: &KernelBases,
    cache: &Cache,
    slabs: &[Slab],
) -> Result<CacheObjects> {
    let span = |slab: &Slab| {
        u64::from(cache.red_left_pad) + u64::from(slab.objects) * u64::from(cache.size)
    };
    // Only slabs that lie within memory: a counter read from a page that stopped being a slab
    // must not send the reader past the end of the direct map.
    let slabs: Vec<&Slab> = slabs
        .iter()
        .filter(|slab| {
            slab.cache == cache.address
                && slab.objects > 0
                && slab.pfn + span(slab).div_ceil(PAGE) <= bases.max_pfn
        })
        .collect();
    let mut reads = Vec::new();
    for slab in &slabs {
        let pages = span(slab).div_ceil(PAGE);
        for page in 0..pages {
            reads.push((bases.direct(slab.pfn + page), PAGE as u32));
        }
    }
    let mut objects = CacheObjects {
        object_size: cache.object_size as usize,
        slabs: slabs.len() as u64,
        ..CacheObjects::default()
    };
    let mut current = Vec::new();
    let mut page_failed = false;
    let mut next_slab = 0;
    reader.read_each(&reads, |_, bytes| {
        match bytes {
            Some(bytes) => current.extend_from_slice(bytes),
            None => {
                objects.unreadable_pages += 1;
                page_failed = true;
                current.resize(current.len() + PAGE as usize, 0);
            }
        }
        let slab = slabs[next_slab];
        if current.len() as u64 >= span(slab) {
            if !page_failed {
                extract_objects(&mut objects, bases, cache, slab, &current);
            }
            current.clear();
            page_failed = false;
            next_slab += 1;
        }
    })?;
    Ok(objects)
}

fn extract_objects(
    objects: &mut CacheObjects,
    bases: &KernelBases,
    cache: &Cache,
    slab: &Slab,
    bytes: &[u8],
) {
    let start = bases.direct(slab.pfn) + u64::from(cache.red_left_pad);
    let count = slab.objects as usize;
    let size = cache.size as u64;
    let free = free_objects(cache, slab, start, bytes);
    objects.slots += count as u64;
    objects.inuse += u64::from(slab.inuse);
    if free.is_none() {
        objects.broken_freelists += 1;
    }
    let free = free.unwrap_or_default();
    for index in 0..count {
        if free.contains(&index) {
            objects.free += 1;
            continue;
        }
        let offset = cache.red_left_pad as usize + index * cache.size as usize;
        let Some(object) = bytes.get(offset..offset + cache.object_size as usize) else {
            continue;
        };
        objects.addresses.push(start + index as u64 * size);
        objects.bytes.extend_from_slice(object);
    }
}

/// Indices of the objects on the slab's own freelist, following the free pointers in the
/// slab's bytes (decoded as SLUB encodes them with CONFIG_SLAB_FREELIST_HARDENED). `None` when
/// the list leaves the slab or loops: the slab changed while it was read.
fn free_objects(cache: &Cache, slab: &Slab, start: u64, bytes: &[u8]) -> Option<HashSet<usize>> {
    let mut free = HashSet::new();
    let mut object = slab.freelist;
    let size = u64::from(cache.size);
    while object != 0 {
        let index = object.checked_sub(start)? / size;
        if object.checked_sub(start)? % size != 0
            || index >= u64::from(slab.objects)
            || !free.insert(index as usize)
        {
            return None;
        }
        let pointer_address = object + u64::from(cache.offset);
        let at = (pointer_address - start + u64::from(cache.red_left_pad)) as usize;
        let stored = u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?);
        object = cache.decode_free_pointer(pointer_address, stored);
    }
    Some(free)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A cache of 64-byte objects whose free pointer sits at 32, hardened with `random`.
    pub(in crate::scan) fn cache(random: u64) -> Cache {
        Cache {
            address: 0xffff_8880_0100_0000,
            name: "test".into(),
            size: 64,
            object_size: 64,
            offset: 32,
            red_left_pad: 0,
            random,
            cpu_slab: 0,
            cpu_sheaves: 0,
        }
    }

    /// A slab of 8 objects at `start` whose objects 5 -> 2 -> 7 are free, encoded with `random`.
    fn slab_bytes(start: u64, random: u64) -> (Slab, Vec<u8>) {
        let mut bytes = vec![0x11u8; 8 * 64];
        let chain = [5u64, 2, 7];
        for (position, &index) in chain.iter().enumerate() {
            let next = chain.get(position + 1).map_or(0, |&next| start + next * 64);
            let pointer_address = start + index * 64 + 32;
            let stored = if random != 0 {
                next ^ random ^ pointer_address.swap_bytes()
            } else {
                next
            };
            let at = (index * 64 + 32) as usize;
            bytes[at..at + 8].copy_from_slice(&stored.to_le_bytes());
        }
        let slab = Slab {
            pfn: 0x100,
            cache: 0xffff_8880_0100_0000,
            freelist: start + 5 * 64,
            inuse: 5,
            objects: 8,
            frozen: false,
        };
        (slab, bytes)
    }

    #[test]
    fn follows_plain_and_hardened_freelists() {
        let start = 0xffff_8880_0010_0000;
        for random in [0, 0x1234_5678_9abc_def0] {
            let (slab, bytes) = slab_bytes(start, random);
            let free = free_objects(&cache(random), &slab, start, &bytes).unwrap();
            assert_eq!(free, HashSet::from([5, 2, 7]), "random {random:#x}");
        }
    }

    #[test]
    fn a_freelist_leaving_the_slab_is_broken() {
        let start = 0xffff_8880_0010_0000;
        let (slab, bytes) = slab_bytes(start, 0x1234);
        // Decoding with the wrong key sends the list elsewhere.
        assert_eq!(free_objects(&cache(0x9999), &slab, start, &bytes), None);
    }

    #[test]
    fn extracts_only_objects_in_use() {
        let bases = KernelBases {
            page_offset: 0xffff_8880_0000_0000,
            vmemmap: 0xffff_ea00_0000_0000,
            max_pfn: 0x1000,
        };
        let start = bases.direct(0x100);
        let (slab, bytes) = slab_bytes(start, 0);
        let mut objects = CacheObjects {
            object_size: 64,
            ..CacheObjects::default()
        };
        extract_objects(&mut objects, &bases, &cache(0), &slab, &bytes);
        assert_eq!(objects.len(), 5);
        assert_eq!(objects.free, 3);
        assert_eq!(objects.addresses[0], start);
        assert_eq!(objects.addresses[2], start + 3 * 64);
        assert_eq!(objects.object(1), &bytes[64..128]);
    }

    #[test]
    fn the_binary_search_for_page_frames_agrees_with_reading_every_entry() {
        // /proc/kpageflags opens for root only.
        if open_page_flags().is_err() {
            return;
        }
        assert_eq!(page_frames().unwrap(), slab_pages().unwrap().max_pfn);
    }

    #[test]
    fn names_must_be_printable() {
        assert_eq!(
            printable_c_string(b"kmalloc-64\0junk").as_deref(),
            Some("kmalloc-64")
        );
        assert_eq!(printable_c_string(b"\0"), None);
        assert_eq!(printable_c_string(b"bad\x01name\0"), None);
        assert_eq!(printable_c_string(b"no terminator"), None);
    }
}
