//! The kinds of kernel memory memleak follows: what the user chooses (`Kind`) and what the
//! eBPF programs record (`AllocKind`).
use memleak_common::AllocKind;
use serde::{Deserialize, Serialize};

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

impl Kind {
    /// The kind's name in reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Slab => "slab",
            Self::Page => "page",
            Self::Vmalloc => "vmalloc",
            Self::Percpu => "percpu",
        }
    }
}

/// How one kind of memory is followed on this kernel: `tp_btf`, `raw_tp`, `tracepoint`,
/// `fexit/fentry`, or `none`; and, unless it is the cheapest way, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindAttach {
    pub kind: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// For a kind whose event does not name the caller (pages): how it is found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callers: Option<Callers>,
}

impl KindAttach {
    pub fn new(kind: Kind, method: &str, why: Option<String>) -> Self {
        Self {
            kind: kind.label().to_owned(),
            method: method.to_owned(),
            why,
            callers: None,
        }
    }

    pub fn with_callers(self, callers: Callers) -> Self {
        Self {
            callers: Some(callers),
            ..self
        }
    }
}

/// How the callers of allocations whose event names none are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Callers {
    /// By walking the allocator's own frames with the kernel's ORC unwind tables; stacks are
    /// captured for the first allocation from each caller and a sample.
    FrameWalk,
    /// From each allocation's captured stack (about 1 µs each).
    Stacks,
}

/// The name reports give a recorded kind.
pub fn kind_name(kind: AllocKind) -> &'static str {
    match kind {
        AllocKind::Kmalloc => "kmalloc",
        AllocKind::KmemCache => "kmem_cache",
        AllocKind::Vmalloc => "vmalloc",
        AllocKind::Percpu => "percpu",
        AllocKind::Page => "page",
        AllocKind::User => "user",
    }
}
