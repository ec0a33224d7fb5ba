//! Names of the kernel's allocator and tracing functions: the frames a stack passes through
//! before it reaches the code that asked for memory, and the ones that show pages back another
//! kind of memory.
use super::frame::Frame;

/// Functions of the tracing and allocation machinery that a stack passes through before it
/// reaches the code that asked for memory (for events that do not name their call site).
pub fn is_allocator_internal(frame: &Frame) -> bool {
    const INTERNAL: &[&str] = &[
        "__bpf_trace_run",
        "bpf_trace_run6",
        "bpf_trace_run5",
        "bpf_trace_run4",
        "bpf_trace_run3",
        "bpf_trace_run2",
        "trace_call_bpf",
        "perf_trace_run_bpf_submit",
        "perf_trace_mm_page_alloc",
        "__alloc_pages",
        "__alloc_frozen_pages",
        "alloc_pages",
        "alloc_pages_mpol",
        "alloc_frozen_pages",
        "alloc_pages_node",
        "__alloc_pages_node",
        "alloc_pages_exact",
        "__get_free_pages",
        "get_zeroed_page",
        "__folio_alloc",
        "folio_alloc",
        "folio_alloc_mpol",
        "alloc_vmap_area",
        "__get_vm_area_node",
        "get_vm_area",
        "get_vm_area_caller",
        "__vmalloc_node_range",
        "__vmalloc_node",
        "__vmalloc",
        "vmalloc",
        "vzalloc",
        "vmalloc_user",
        "__kvmalloc_node",
        "kvmalloc_node",
    ];
    let Some(symbol) = frame.symbol.as_deref() else {
        return false;
    };
    // Strip compiler suffixes (`.isra.0`, `.constprop.0`) and allocation-profiling wrappers.
    let base = base_name(symbol);
    INTERNAL.contains(&base) || base.starts_with("__traceiter_") || base.starts_with("__bpf_trace_")
}

/// A function's name without compiler suffixes (`.isra.0`, `.constprop.0`) and the
/// allocation-profiling `_noprof` wrappers.
fn base_name(symbol: &str) -> &str {
    let base = symbol.split('.').next().unwrap_or(symbol);
    base.strip_suffix("_noprof").unwrap_or(base)
}

/// Whether a page allocation's stack shows that the pages back memory another kind
/// accounts for: a new slab, a kmalloc too large for the slab caches, a vmalloc area's pages,
/// a percpu chunk. Counting those as pages too would count the same memory twice.
pub fn backs_another_kind(stack: &[u64], frame: &dyn Fn(u64) -> Frame) -> bool {
    const BACKING: &[&str] = &[
        "allocate_slab",
        "new_slab",
        "___kmalloc_large_node",
        "__kmalloc_large_node",
        "__kmalloc_large",
        "kmalloc_large",
        "kmalloc_large_node",
        "vm_area_alloc_pages",
        "__vmalloc_area_node",
        // Linux 6.18 inlines the two above into it.
        "__vmalloc_node_range",
        "pcpu_alloc_pages",
        "pcpu_populate_chunk",
    ];
    stack.iter().any(|&ip| {
        frame(ip)
            .symbol
            .as_deref()
            .is_some_and(|symbol| BACKING.contains(&base_name(symbol)))
    })
}
