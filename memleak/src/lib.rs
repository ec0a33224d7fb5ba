//! memleak's library: everything below the command line. The binary (main.rs, cli/,
//! commands/) parses options, converts them into the option types defined here, and
//! orchestrates; tests and the fuzz targets use the same types.
//!
//! Layers, each importing only the ones below it (tests/tests/layers.rs checks it):
//!
//! ```text
//! vm                qemu guests with memleak inside (`memleak vm`, the VM test)
//! output            text, JSON and JUnit: the only place that formats
//! watch             continuous detection: snapshots, series, verdicts, history
//! trace             the trace report: aggregation, liveness, accounting, leak checks
//! scan classify kmemleak   the other domains
//! bpf symbols       the eBPF object and its maps; kernel addresses to functions
//! kernel            facts about the running kernel: BTF, tracefs, procfs, privileges
//! kinds util        kinds of memory; units and durations
//! ```
pub mod bpf;
pub mod classify;
pub mod kernel;
pub mod kinds;
pub mod kmemleak;
pub mod output;
pub mod scan;
pub mod symbols;
pub mod trace;
pub mod util;
pub mod vm;
pub mod watch;
