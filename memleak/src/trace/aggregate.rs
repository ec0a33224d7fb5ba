//! Groups outstanding objects by allocation site: the function that called the allocator,
//! with the allocation kind and cache. Every tracked object counts exactly toward its site;
//! the sampled stacks of its objects say through which paths the site was reached.
use std::time::Duration;

use hashbrown::HashMap;
use memleak_common::{AllocKind, AllocRecord, STACK_FAILED};

pub const GFP_DMA: u32 = 1 << 0;
pub const GFP_RECLAIMABLE: u32 = 1 << 4;
pub const GFP_ACCOUNT: u32 = 1 << 22;
/// The gfp flags kmalloc_type() chooses a cache variant by (the same bits from Linux 6.1 to
/// 6.18, see the kmem:kmalloc format's print fmt).
pub const CACHE_TYPE_GFP: u32 = GFP_DMA | GFP_RECLAIMABLE | GFP_ACCOUNT;

/// What ranks allocation sites: outstanding bytes or outstanding objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    Size,
    Count,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SiteKey {
    pub kind: AllocKind,
    /// The cache id for kmem_cache objects, the allocated size for kmalloc, the stack id for
    /// objects without a call site.
    pub cache_id: u64,
    pub call_site: u64,
    /// For kmalloc, the gfp flags that choose among the size class's cache variants
    /// (accounted, reclaimable, DMA): a site allocating both kinds shows twice.
    pub kmalloc_gfp: u32,
}

impl SiteKey {
    /// The slot size that stands in for the cache of a site whose cache is not known from the
    /// event: every kmalloc site, and kmem_cache sites without a cache name. Known kmem_cache
    /// ids are kernel pointers or name hashes with the low bit set, never below 2^32.
    pub fn unnamed_slot_size(&self) -> Option<u32> {
        match self.kind {
            AllocKind::Kmalloc | AllocKind::KmemCache => u32::try_from(self.cache_id).ok(),
            AllocKind::Vmalloc | AllocKind::Percpu | AllocKind::Page | AllocKind::User => None,
        }
    }

    /// The site `record` belongs to; `None` for an unknown kind.
    pub fn of(record: &AllocRecord) -> Option<Self> {
        let kind = AllocKind::from_u32(u32::from(record.kind))?;
        // kmalloc records carry no cache; their size class names it, so a call site that
        // allocates several sizes shows once per cache. So do kmem_cache records from kernels
        // whose classic event does not name the cache (before Linux 6.2): their slot size stands
        // in for the cache (see `unnamed_slot_size`). Records without a call site (vmalloc,
        // pages) always have a stack, and group by it.
        let cache_id = match kind {
            AllocKind::Kmalloc => u64::from(record.bytes_allocated),
            AllocKind::KmemCache if record.cache_id == 0 => u64::from(record.bytes_allocated),
            AllocKind::KmemCache => record.cache_id,
            AllocKind::Vmalloc | AllocKind::Percpu | AllocKind::Page if record.call_site == 0 => {
                u64::from(record.stack_id as u32)
            }
            AllocKind::Vmalloc | AllocKind::Percpu | AllocKind::Page | AllocKind::User => 0,
        };
        let kmalloc_gfp = match kind {
            AllocKind::Kmalloc => record.gfp_flags & CACHE_TYPE_GFP,
            _ => 0,
        };
        Some(Self {
            kind,
            cache_id,
            call_site: record.call_site,
            kmalloc_gfp,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessShare {
    pub count: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub key: SiteKey,
    pub count: u64,
    pub bytes: u64,
    pub bytes_requested: u64,
    pub oldest_timestamp_ns: u64,
    /// Objects per captured stack id.
    pub stacks: HashMap<u32, u64>,
    /// Objects whose stack capture failed.
    pub failed_stacks: u64,
    pub processes: HashMap<u32, ProcessShare>,
    /// Objects the liveness check could not verify as still allocated.
    pub unverified: u64,
    /// With `--user-stacks`: objects per user-space stack and the kernel stack it came with.
    pub user_stacks: HashMap<UserStackKey, u64>,
}

/// A user-space stack captured beside a kernel stack: it means something only in the process
/// that allocated, and only if that kernel stack ran in the process's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserStackKey {
    pub kernel_stack: u32,
    pub tgid: u32,
    /// The `USER_STACKS` id.
    pub user_stack: u32,
}

impl Site {
    fn new(key: SiteKey) -> Self {
        Self {
            key,
            count: 0,
            bytes: 0,
            bytes_requested: 0,
            oldest_timestamp_ns: u64::MAX,
            stacks: HashMap::new(),
            failed_stacks: 0,
            processes: HashMap::new(),
            unverified: 0,
            user_stacks: HashMap::new(),
        }
    }

    /// Stack ids by how many objects they hold, most first (ties by id, for stable output).
    pub fn stacks_by_weight(&self) -> Vec<(u32, u64)> {
        let mut stacks: Vec<(u32, u64)> = self.stacks.iter().map(|(&id, &n)| (id, n)).collect();
        stacks.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        stacks
    }

    pub fn stack_samples(&self) -> u64 {
        self.stacks.values().sum()
    }
}

/// What aggregation kept and what `--min-age` hid.
#[derive(Debug, Default)]
pub struct Aggregate {
    pub sites: Vec<Site>,
    pub hidden_younger: u64,
}

/// Groups objects by site as they are fed in, leaving out those allocated less than
/// `min_age` before `now_ns`.
pub struct Aggregator {
    now_ns: u64,
    min_age_ns: u64,
    sites: HashMap<SiteKey, Site>,
    hidden_younger: u64,
}

impl Aggregator {
    pub fn new(now_ns: u64, min_age: Duration) -> Self {
        Self {
            now_ns,
            min_age_ns: u64::try_from(min_age.as_nanos()).unwrap_or(u64::MAX),
            sites: HashMap::new(),
            hidden_younger: 0,
        }
    }

    pub fn add(&mut self, record: &AllocRecord) {
        if self.now_ns.saturating_sub(record.allocated_at) < self.min_age_ns {
            self.hidden_younger += 1;
            return;
        }
        let Some(key) = SiteKey::of(record) else {
            return;
        };
        let site = self.sites.entry(key).or_insert_with(|| Site::new(key));
        let bytes = u64::from(record.bytes_allocated);
        site.count += 1;
        site.bytes += bytes;
        site.bytes_requested += u64::from(record.bytes_requested);
        site.oldest_timestamp_ns = site.oldest_timestamp_ns.min(record.allocated_at);
        match u32::try_from(record.stack_id) {
            Ok(id) => {
                *site.stacks.entry(id).or_default() += 1;
                if let Some(user_stack) = record.user_stack.checked_sub(1) {
                    let key = UserStackKey {
                        kernel_stack: id,
                        tgid: record.tgid,
                        user_stack: u32::from(user_stack),
                    };
                    *site.user_stacks.entry(key).or_default() += 1;
                }
            }
            Err(_) if record.stack_id == STACK_FAILED => site.failed_stacks += 1,
            Err(_) => {}
        }
        let process = site.processes.entry(record.tgid).or_default();
        process.count += 1;
        process.bytes += bytes;
    }

    /// [`Self::add`] for an object that the liveness check could not verify as allocated.
    pub fn add_unverified(&mut self, record: &AllocRecord) {
        let hidden = self.hidden_younger;
        self.add(record);
        if self.hidden_younger == hidden
            && let Some(site) = SiteKey::of(record).and_then(|key| self.sites.get_mut(&key))
        {
            site.unverified += 1;
        }
    }

    pub fn finish(self) -> Aggregate {
        Aggregate {
            sites: self.sites.into_values().collect(),
            hidden_younger: self.hidden_younger,
        }
    }
}

/// Sorts sites, largest first; ties broken by the other measure, then by call site, so the
/// order never depends on hash-map iteration.
pub fn rank(sites: &mut [Site], sort: SortKey) {
    sites.sort_unstable_by(|a, b| {
        let primary = match sort {
            SortKey::Size => b.bytes.cmp(&a.bytes).then(b.count.cmp(&a.count)),
            SortKey::Count => b.count.cmp(&a.count).then(b.bytes.cmp(&a.bytes)),
        };
        primary
            .then(a.key.call_site.cmp(&b.key.call_site))
            .then(a.key.cache_id.cmp(&b.key.cache_id))
    });
}

/// The innermost frames of a captured stack are the tracepoint and the allocator itself;
/// the caller's frame returns to `call_site`, so everything inside it is cut. Stacks that do
/// not contain `call_site` (inlined allocator wrappers, truncated unwinds) are kept whole.
pub fn trim_to_call_site(stack: &[u64], call_site: u64) -> &[u64] {
    match stack.iter().position(|&ip| ip == call_site) {
        Some(index) => &stack[index..],
        None => stack,
    }
}

#[cfg(test)]
mod tests {
    use memleak_common::STACK_NOT_SAMPLED;

    use super::*;

    fn by_site(objects: &[AllocRecord], now_ns: u64, min_age: Duration) -> Aggregate {
        let mut aggregator = Aggregator::new(now_ns, min_age);
        objects.iter().for_each(|record| aggregator.add(record));
        aggregator.finish()
    }

    fn object(call_site: u64, bytes: u32, stack_id: i32, tgid: u32, ts: u64) -> AllocRecord {
        AllocRecord {
            call_site,
            cache_id: 0,
            allocated_at: ts,
            bytes_requested: bytes - 1,
            bytes_allocated: bytes,
            stack_id,
            tgid,
            kind: AllocKind::Kmalloc as u16,
            user_stack: 0,
            gfp_flags: 0,
        }
    }

    #[test]
    fn groups_by_site_and_counts_exactly() {
        let objects = [
            object(0xa, 64, 7, 100, 10),
            object(0xa, 64, STACK_NOT_SAMPLED, 100, 20),
            object(0xa, 64, 7, 200, 30),
            object(0xb, 512, STACK_FAILED, 100, 40),
        ];
        let aggregate = by_site(&objects, 1_000, Duration::ZERO);
        let mut sites = aggregate.sites;
        rank(&mut sites, SortKey::Size);
        assert_eq!(sites.len(), 2);
        assert_eq!(sites[0].key.call_site, 0xb);
        assert_eq!((sites[0].count, sites[0].bytes), (1, 512));
        assert_eq!(sites[0].failed_stacks, 1);
        let a = &sites[1];
        assert_eq!((a.count, a.bytes, a.bytes_requested), (3, 192, 189));
        assert_eq!(a.oldest_timestamp_ns, 10);
        assert_eq!(a.stacks_by_weight(), vec![(7, 2)]);
        assert_eq!(a.stack_samples(), 2);
        assert_eq!(
            a.processes[&100],
            ProcessShare {
                count: 2,
                bytes: 128
            }
        );
        assert_eq!(
            a.processes[&200],
            ProcessShare {
                count: 1,
                bytes: 64
            }
        );
    }

    #[test]
    fn user_stacks_count_per_kernel_stack_and_process() {
        let with_user = |stack_id, tgid, user_stack| AllocRecord {
            user_stack,
            ..object(0xa, 64, stack_id, tgid, 10)
        };
        let objects = [
            with_user(7, 100, 1),
            with_user(7, 100, 1),
            with_user(7, 200, 1),
            with_user(8, 100, 3),
            // No user stack captured, and no kernel stack (the user one is never alone).
            with_user(7, 100, 0),
            with_user(STACK_NOT_SAMPLED, 100, 0),
        ];
        let sites = by_site(&objects, 1_000, Duration::ZERO).sites;
        let key = |kernel_stack, tgid, user_stack| UserStackKey {
            kernel_stack,
            tgid,
            user_stack,
        };
        let mut counted: Vec<(UserStackKey, u64)> = sites[0]
            .user_stacks
            .iter()
            .map(|(&key, &count)| (key, count))
            .collect();
        counted.sort_unstable();
        assert_eq!(
            counted,
            [
                (key(7, 100, 0), 2),
                (key(7, 200, 0), 1),
                (key(8, 100, 2), 1)
            ]
        );
    }

    #[test]
    fn ranks_by_count_when_asked() {
        let objects = [
            object(0xa, 64, -1, 1, 0),
            object(0xa, 64, -1, 1, 0),
            object(0xb, 4096, -1, 1, 0),
        ];
        let mut sites = by_site(&objects, 0, Duration::ZERO).sites;
        rank(&mut sites, SortKey::Count);
        assert_eq!(sites[0].key.call_site, 0xa);
        rank(&mut sites, SortKey::Size);
        assert_eq!(sites[0].key.call_site, 0xb);
    }

    #[test]
    fn min_age_hides_young_objects() {
        let objects = [object(0xa, 64, -1, 1, 100), object(0xa, 64, -1, 1, 900)];
        let aggregate = by_site(&objects, 1_000, Duration::from_nanos(500));
        assert_eq!(aggregate.hidden_younger, 1);
        assert_eq!(aggregate.sites[0].count, 1);
    }

    #[test]
    fn trims_allocator_frames() {
        let stack = [0x1, 0x2, 0xa, 0xb, 0xc];
        assert_eq!(trim_to_call_site(&stack, 0xa), &[0xa, 0xb, 0xc]);
        assert_eq!(trim_to_call_site(&stack, 0xf), &stack);
    }

    #[test]
    fn aggregates_a_million_objects() {
        let objects: Vec<AllocRecord> = (0..1_000_000u64)
            .map(|i| object(0x1000 + i % 5_000, 64, (i % 97) as i32, (i % 300) as u32, i))
            .collect();
        let aggregate = by_site(&objects, u64::MAX, Duration::ZERO);
        assert_eq!(aggregate.sites.len(), 5_000);
        assert_eq!(
            aggregate.sites.iter().map(|s| s.count).sum::<u64>(),
            1_000_000
        );
    }

    fn record(
        kind: AllocKind,
        call_site: u64,
        cache_id: u64,
        bytes: u32,
        stack_id: i32,
    ) -> AllocRecord {
        AllocRecord {
            call_site,
            cache_id,
            allocated_at: 0,
            bytes_requested: bytes,
            bytes_allocated: bytes,
            stack_id,
            tgid: 1,
            kind: kind as u16,
            user_stack: 0,
            gfp_flags: 0x0040_0cd1,
        }
    }

    #[test]
    fn site_keys_by_kind() {
        let key = |record: &AllocRecord| SiteKey::of(record).unwrap();
        // kmalloc: the size class and the gfp bits that choose the cache variant.
        let kmalloc = key(&record(AllocKind::Kmalloc, 0xa, 0, 64, 3));
        assert_eq!((kmalloc.cache_id, kmalloc.kmalloc_gfp), (64, 0x0040_0011));
        assert_eq!(kmalloc.unnamed_slot_size(), Some(64));
        // kmem_cache: the cache id, or the slot size when the event names no cache.
        let named = key(&record(
            AllocKind::KmemCache,
            0xa,
            0xffff_8880_0000_1001,
            192,
            3,
        ));
        assert_eq!(
            (named.cache_id, named.kmalloc_gfp),
            (0xffff_8880_0000_1001, 0)
        );
        let unnamed = key(&record(AllocKind::KmemCache, 0xa, 0, 192, 3));
        assert_eq!(unnamed.cache_id, 192);
        assert_eq!(unnamed.unnamed_slot_size(), Some(192));
        assert_eq!(named.unnamed_slot_size(), None);
        // No call site: the stack; with one: the call site alone.
        let by_stack = key(&record(AllocKind::Vmalloc, 0, 0, 8192, 9));
        assert_eq!((by_stack.cache_id, by_stack.call_site), (9, 0));
        let by_site = key(&record(AllocKind::Page, 0xb, 0, 4096, 9));
        assert_eq!((by_site.cache_id, by_site.call_site), (0, 0xb));
        assert_eq!(by_site.unnamed_slot_size(), None);
        let mut unknown = record(AllocKind::Kmalloc, 0xa, 0, 64, 3);
        unknown.kind = 99;
        assert_eq!(SiteKey::of(&unknown), None);
    }

    #[test]
    fn unverified_objects_count_only_when_kept() {
        let mut aggregator = Aggregator::new(1_000, Duration::from_nanos(500));
        let old = object(0xa, 64, 1, 1, 500);
        aggregator.add_unverified(&old);
        aggregator.add(&old);
        // Exactly min_age old counts; younger is hidden, unverified or not, and marks no
        // site (not even one of another object).
        aggregator.add_unverified(&object(0xa, 64, 1, 1, 501));
        aggregator.add(&object(0xb, 64, 1, 1, 500));
        aggregator.add_unverified(&object(0xb, 64, 1, 1, 501));
        let aggregate = aggregator.finish();
        assert_eq!(aggregate.hidden_younger, 2);
        let mut sites = aggregate.sites;
        rank(&mut sites, SortKey::Count);
        let counts: Vec<_> = sites
            .iter()
            .map(|site| (site.key.call_site, site.count, site.unverified))
            .collect();
        assert_eq!(counts, [(0xa, 2, 1), (0xb, 1, 0)]);
    }

    #[test]
    fn stacks_by_weight_most_first_then_by_id() {
        let objects = [
            object(0xa, 64, 5, 1, 0),
            object(0xa, 64, 9, 1, 0),
            object(0xa, 64, 9, 1, 0),
            object(0xa, 64, 2, 1, 0),
        ];
        let sites = by_site(&objects, 0, Duration::ZERO).sites;
        assert_eq!(sites[0].stacks_by_weight(), vec![(9, 2), (2, 1), (5, 1)]);
        assert_eq!(sites[0].stack_samples(), 4);
    }

    #[test]
    fn ranks_ties_by_the_other_measure_then_by_site() {
        let objects = [
            object(0xc, 64, -1, 1, 0),
            object(0xc, 64, -1, 1, 0),
            object(0xb, 128, -1, 1, 0),
            object(0xa, 128, -1, 1, 0),
            object(0xd, 32, -1, 1, 0),
            object(0xd, 32, -1, 1, 0),
            object(0xd, 32, -1, 1, 0),
            object(0xd, 32, -1, 1, 0),
        ];
        let mut sites = by_site(&objects, 0, Duration::ZERO).sites;
        // Unsampled stacks are not failed captures.
        assert!(sites.iter().all(|site| site.failed_stacks == 0));
        let order = |sites: &[Site]| sites.iter().map(|s| s.key.call_site).collect::<Vec<_>>();
        rank(&mut sites, SortKey::Size);
        assert_eq!(order(&sites), [0xd, 0xc, 0xa, 0xb]);
        rank(&mut sites, SortKey::Count);
        assert_eq!(order(&sites), [0xd, 0xc, 0xa, 0xb]);
    }
}
