//! The kinds of kernel memory memleak follows: what the user chooses (`Kind`) and what the
//! eBPF programs record (`AllocKind`).
use memleak_common::AllocKind;

/// Kinds of kernel memory `trace` and `run` can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// kmalloc and kmem_cache objects.
    Slab,
    /// Unmovable and reclaimable pages from the page allocator, other than those backing
    /// slabs, large kmallocs, vmalloc areas and percpu chunks (counted under those kinds).
    Page,
    /// vmalloc, vmap and module areas (Linux 6.4+).
    Vmalloc,
    /// Percpu allocations.
    Percpu,
}

/// The name reports give a recorded kind.
pub fn kind_name(kind: AllocKind) -> &'static str {
    match kind {
        AllocKind::Kmalloc => "kmalloc",
        AllocKind::KmemCache => "kmem_cache",
        AllocKind::Vmalloc => "vmalloc",
        AllocKind::Percpu => "percpu",
        AllocKind::Page => "page",
    }
}
