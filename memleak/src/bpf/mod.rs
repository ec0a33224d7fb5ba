//! Everything that touches the eBPF object: loading and attaching the tracer, its maps, and
//! the kernel memory reader.
pub mod maps;
pub mod mmap;
pub mod probes;
pub mod reader;
