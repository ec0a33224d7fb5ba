//! Names of the kernel's allocator and tracing functions: the frames a stack passes through
//! before it reaches the code that asked for memory, and the ones that show pages back another
//! kind of memory; and the user-space allocation machinery between a program and `malloc`.
use super::frame::Frame;

/// Name prefixes of the allocators' own functions and their thin wrappers (the caller of
/// `kstrdup` or `kvmalloc` is the code to look at), without leading underscores. Prefixes also
/// cover the `_node`, `_noprof` (memory allocation profiling, 6.10) and `.cold` variants.
const ALLOCATOR_PREFIXES: &[&str] = &[
    "kmemleak_",
    "kmalloc",
    "kmem_cache_alloc",
    "kzalloc",
    "kcalloc",
    "krealloc",
    "kvmalloc",
    "kvzalloc",
    "kvcalloc",
    "kvrealloc",
    "kmemdup",
    "kvmemdup",
    "kstrdup",
    "kstrndup",
    "kasprintf",
    "kvasprintf",
    "do_kmalloc",
    "slab_",
    "alloc_slab",
    "new_slab",
    "allocate_slab",
    "pcpu_alloc",
    "alloc_percpu",
    "alloc_pages",
    "alloc_frozen_pages",
    "get_free_pages",
    "get_zeroed_page",
    "folio_alloc",
    "vmalloc",
    "vzalloc",
    "alloc_vmap_area",
    "get_vm_area",
    "memblock_alloc",
    "memblock_phys_alloc",
];

/// Name prefixes (demangled) of the language runtimes' allocation machinery in user space:
/// Rust's global allocator shims and the growth of its vectors, C++'s `operator new`. Their
/// caller is the code that asked for memory.
const USER_ALLOCATOR_PREFIXES: &[&str] = &[
    "__rust_alloc",
    "__rust_realloc",
    "__rdl_",
    "__rg_",
    "alloc::alloc::",
    "alloc::raw_vec::",
    "<alloc::alloc::Global as core::alloc::Allocator>",
    "<std::alloc::System as core::alloc::global::GlobalAlloc>",
    "std::sys::alloc::",
    "operator new",
    "_Znwm",
    "_Znam",
];

/// Whether a user-space `frame` is in a language runtime's allocation machinery. Rust's
/// demanglers name methods `<alloc::raw_vec::RawVecInner>::finish_grow` (v0 mangling) or
/// `alloc::raw_vec::RawVecInner<A>::finish_grow` (legacy): both match.
pub fn is_user_allocator_internal(frame: &Frame) -> bool {
    frame.symbol.as_deref().is_some_and(|symbol| {
        USER_ALLOCATOR_PREFIXES.iter().any(|prefix| {
            symbol.starts_with(prefix)
                || symbol
                    .strip_prefix('<')
                    .is_some_and(|inner| inner.starts_with(prefix))
        })
    })
}

/// Name prefixes of the tracing machinery between an allocator and a BPF program, without
/// leading underscores: stacks captured in the program start there.
const TRACING_PREFIXES: &[&str] = &["bpf_trace_", "traceiter_", "trace_call_bpf", "perf_trace_"];

/// Whether `frame` is inside an allocator or the tracing machinery (or is kmemleak's hook in
/// an allocator): the frames a stack passes through before the code that asked for memory.
pub fn is_allocator_internal(frame: &Frame) -> bool {
    let Some(symbol) = frame.symbol.as_deref() else {
        return false;
    };
    let name = symbol.trim_start_matches('_');
    ALLOCATOR_PREFIXES
        .iter()
        .chain(TRACING_PREFIXES)
        .any(|prefix| name.starts_with(prefix))
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

/// Functions through which the allocators allocate bookkeeping for their own slabs and
/// areas: a new slab's object extension vector (memcg accounting, allocation profiling) and a
/// vmalloc area's `struct vmap_area`. Such an object lives as long as its slab or area, and
/// leaves by paths that fire no free event for the code that needed the slab or area (a slab's
/// discard; vmalloc's lazy purge, which keeps thousands of areas of exited processes' stacks,
/// and its per-node pools of free `vmap_area`s). The slabs and areas themselves are followed as
/// slab and vmalloc memory; their bookkeeping is counted apart, never as a leak.
const BOOKKEEPING: &[&str] = &["alloc_slab_obj_exts", "alloc_vmap_area"];

/// Whether an allocation at `call_site` is an allocator's bookkeeping ([`BOOKKEEPING`]).
pub fn is_bookkeeping(call_site: &Frame) -> bool {
    call_site
        .symbol
        .as_deref()
        .is_some_and(|symbol| BOOKKEEPING.contains(&base_name(symbol)))
}

/// Name prefixes, without leading underscores, of the functions through which the kernel
/// runs work for no task in particular on whichever task it interrupted: hardware interrupts
/// and IPIs (`common_interrupt`, `sysvec_*`), softirqs (run on leaving an interrupt or on
/// re-enabling them, `handle_softirqs` from Linux 6.10, `__do_softirq` before), NMIs.
const INTERRUPT_PREFIXES: &[&str] = &[
    "asm_common_interrupt",
    "common_interrupt",
    "asm_sysvec_",
    "sysvec_",
    "irq_exit",
    "handle_irq_event",
    "handle_softirqs",
    "do_softirq",
    "asm_exc_nmi",
    "exc_nmi",
];

/// Functions of exec that allocate before the new program's mappings replace the old ones:
/// the user stack they capture is the old program's, and cannot be read against the new one.
const EXEC_PREFIXES: &[&str] = &[
    "bprm_execve",
    "do_execveat_common",
    "load_elf_binary",
    "begin_new_exec",
];

/// The deepest stack the kernel captures (`PERF_MAX_STACK_DEPTH`): a stack this long may have
/// lost its outer frames.
const MAX_STACK_FRAMES: usize = 127;

/// Whether the user-space stack captured with a kernel `stack` is that of the code that made
/// the allocation: the kernel stack ran in its task's own context (a system call, a page
/// fault), through no interrupt and no exec, and is whole. Otherwise the user stack belongs
/// to whatever the task was doing when something else allocated on top of it.
pub fn user_stack_is_the_allocators(stack: &[u64], frame: &dyn Fn(u64) -> Frame) -> bool {
    stack.len() < MAX_STACK_FRAMES
        && !stack.iter().any(|&ip| {
            frame(ip).symbol.as_deref().is_some_and(|symbol| {
                let name = symbol.trim_start_matches('_');
                INTERRUPT_PREFIXES
                    .iter()
                    .chain(EXEC_PREFIXES)
                    .any(|prefix| name.starts_with(prefix))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(symbol: &str) -> Frame {
        crate::symbols::frame::named(symbol)
    }

    #[test]
    fn recognizes_runtime_allocation_machinery_in_user_space() {
        for internal in [
            "alloc::raw_vec::RawVecInner<A>::finish_grow",
            "<alloc::raw_vec::RawVecInner>::finish_grow",
            "alloc::raw_vec::RawVec<T,A>::grow_one",
            "__rust_alloc",
            "__rdl_realloc",
            "<alloc::alloc::Global as core::alloc::Allocator>::allocate",
            "operator new(unsigned long)",
        ] {
            assert!(is_user_allocator_internal(&frame(internal)), "{internal}");
        }
        for caller in [
            "leaky_user::leak_grown",
            "alloc_table",
            "main",
            "std::collections::hash::map::HashMap<K,V,S>::insert",
            "operator_newline",
        ] {
            assert!(!is_user_allocator_internal(&frame(caller)), "{caller}");
        }
    }

    #[test]
    fn recognizes_allocator_entry_points_across_kernel_versions() {
        for internal in [
            "kmemleak_alloc",
            "__kmalloc",
            "__kmalloc_cache_noprof",
            "kmalloc_trace",
            "kmalloc_node_trace_noprof",
            "__do_kmalloc_node",
            "kmem_cache_alloc_node",
            "__kmem_cache_alloc_node",
            "slab_alloc_node.constprop.0",
            "kvmalloc_node_noprof",
            "__vmalloc_node_range_noprof",
            "vzalloc",
            "pcpu_alloc",
            "__alloc_pages",
            "alloc_pages_mpol_noprof",
            "__get_free_pages",
            "kstrdup",
            "kmemdup_noprof",
            "__bpf_trace_run",
            "bpf_trace_run4",
            "__traceiter_kmalloc",
            "perf_trace_mm_page_alloc",
            "alloc_vmap_area",
            "get_zeroed_page",
        ] {
            assert!(is_allocator_internal(&frame(internal)), "{internal}");
        }
        for caller in [
            "leaky_alloc",
            "alloc_fdtable",
            "dup_fd",
            "skb_clone",
            "do_slab_free",
        ] {
            assert!(!is_allocator_internal(&frame(caller)), "{caller}");
        }
        assert!(!is_allocator_internal(&Frame::unknown(
            0xffff_ffff_c000_0000
        )));
    }

    #[test]
    fn user_stacks_are_kept_only_for_stacks_in_their_tasks_context() {
        // Recorded shapes (Linux 6.18): an eventfd from a system call, and a socket buffer
        // allocated in network receive processing, a softirq on top of an unrelated task.
        let symbols = [
            "__kmalloc_cache_noprof",
            "do_eventfd",
            "do_syscall_64",
            "entry_SYSCALL_64_after_hwframe",
            "kmem_cache_alloc_node_noprof",
            "__alloc_skb",
            "tcp_rcv_established",
            "net_rx_action",
            "handle_softirqs",
            "__irq_exit_rcu",
            "sysvec_apic_timer_interrupt",
            "asm_sysvec_apic_timer_interrupt",
            "copy_process",
            "__do_softirq",
            "bprm_execve",
            "exc_nmi",
            "asm_common_interrupt",
        ];
        let frame = |ip: u64| match symbols.get(ip as usize) {
            Some(symbol) => frame(symbol),
            None => Frame::unknown(ip),
        };
        assert!(user_stack_is_the_allocators(&[0, 1, 2, 3], &frame));
        assert!(user_stack_is_the_allocators(&[0, 12, 2, 3, 99], &frame));
        for interrupted in [
            vec![4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3],
            vec![4, 5, 6, 7, 8],
            vec![4, 5, 9, 2, 3],
            vec![4, 5, 10, 1, 2],
            vec![4, 5, 11],
            vec![0, 13, 2],
            vec![0, 14, 2, 3],
            vec![0, 15],
            vec![0, 16, 2],
        ] {
            assert!(
                !user_stack_is_the_allocators(&interrupted, &frame),
                "{interrupted:?}"
            );
        }
        let whole = vec![1; MAX_STACK_FRAMES - 1];
        assert!(user_stack_is_the_allocators(&whole, &frame));
        assert!(!user_stack_is_the_allocators(
            &vec![1; MAX_STACK_FRAMES],
            &frame
        ));
    }

    #[test]
    fn bookkeeping_is_the_slab_and_vmalloc_metadata_only() {
        for bookkeeping in [
            "alloc_slab_obj_exts",
            "alloc_slab_obj_exts.isra.0",
            "alloc_vmap_area",
        ] {
            assert!(is_bookkeeping(&frame(bookkeeping)), "{bookkeeping}");
        }
        for other in [
            "alloc_slab_page",
            "alloc_vmap_area_node",
            "do_eventfd",
            "__vmalloc_node_range_noprof",
        ] {
            assert!(!is_bookkeeping(&frame(other)), "{other}");
        }
        assert!(!is_bookkeeping(&Frame::unknown(0xffff_ffff_c000_0000)));
    }
}
