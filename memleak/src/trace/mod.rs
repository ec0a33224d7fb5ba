//! The trace domain: from the tracer's table to the report `trace` and `run` print, with its
//! aggregation, liveness check, kernel accounting and leak check.
pub mod accounting;
pub mod aggregate;
pub mod build;
pub mod check;
pub mod marks;
pub mod report;
pub mod site_caches;

use std::time::Duration;

use crate::{bpf::probes::TracerSettings, scan::Similarity};

/// How to trace and how to build the report, for `trace` and `run`.
#[derive(Debug, Clone)]
pub struct Options {
    pub tracer: TracerSettings,
    pub sort: aggregate::SortKey,
    /// Allocations younger than this at report time are hidden (and counted).
    pub min_age: Duration,
    /// How similar objects must be in the content scan of `--cache`.
    pub similarity: Similarity,
    /// Leave the scanned objects' bytes and strings out (`--no-contents`).
    pub withhold_contents: bool,
    /// Rank processes too.
    pub by_process: bool,
    /// Entries (and processes) shown.
    pub top: usize,
}
