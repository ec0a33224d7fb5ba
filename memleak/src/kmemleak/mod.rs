//! `memleak kmemleak`: runs a kmemleak scan on a debug kernel, or reads a saved report, and
//! groups the unreferenced objects by allocation backtrace.
pub mod cluster;
#[doc(hidden)]
pub mod invariants;
pub mod live;
pub mod parse;
pub mod report;

use std::{
    fs,
    io::{self, Read as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::kernel;

/// Where the kmemleak report comes from.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A saved report (`-` for standard input) instead of the running kernel's.
    pub from: Option<PathBuf>,
    /// What to tell kmemleak when reading the running kernel's report.
    pub live: live::Options,
    /// Where debugfs is mounted; by default /sys/kernel/debug, mounted there if needed.
    pub debugfs: Option<PathBuf>,
}

/// Reads the report (saved, or from the running kernel's kmemleak) and groups its objects by
/// backtrace; `top` groups are kept.
pub fn read(options: &Options, top: usize) -> Result<report::Report> {
    let (text, kernel) = match &options.from {
        Some(path) => (read_saved_report(path)?, None),
        None => {
            let debugfs = match &options.debugfs {
                Some(dir) => dir.clone(),
                None => {
                    live::mount_default_debugfs()?;
                    PathBuf::from(live::DEFAULT_DEBUGFS)
                }
            };
            let text = live::collect(&debugfs, options.live)?;
            let kernel = kernel::release()
                .inspect_err(|error| log::debug!("kernel release unknown: {error:#}"))
                .ok();
            (text, kernel)
        }
    };
    let parsed = parse::parse(&text);
    if let Some(path) = &options.from
        && parsed.objects.is_empty()
        && parsed.unparsed_records == 0
        && !text.trim().is_empty()
    {
        // An empty report means no leak; text without a single record is another file.
        bail!(
            "{}: not a kmemleak report (no `unreferenced object 0x...` record in it)",
            path.display()
        );
    }
    Ok(report::build(kernel, &parsed, top))
}

/// Reads the whole report; invalid UTF-8 (a task name is arbitrary bytes) is replaced rather
/// than refused.
fn read_saved_report(path: &Path) -> Result<String> {
    let bytes = if path == Path::new("-") {
        let mut bytes = Vec::new();
        io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .context("reading the report from standard input")?;
        bytes
    } else {
        fs::read(path).with_context(|| format!("reading {}", path.display()))?
    };
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
