//! Everything that touches the eBPF object: loading and attaching the tracer (to the kernel,
//! or to a process's allocator), its maps, and the kernel memory reader.
pub mod clock;
pub mod maps;
pub mod mmap;
pub mod object;
pub mod page_callers;
pub mod probes;
pub mod reader;
pub mod uprobes;
