//! Rendering: the only layer that formats. Models come from the domains (trace, scan,
//! classify, kmemleak) and know nothing of text, JSON or JUnit.
use serde::Serialize;

pub mod dashboard;
pub mod json;
pub mod junit;
pub mod profile;
pub mod prometheus;
pub mod sink;
pub mod text;

pub use sink::ReportSink;

/// A report's format on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    /// One line per stack, root first, weighted by outstanding bytes (flamegraph.pl, inferno):
    /// trace and run; watch writes its last snapshot's when it ends.
    Folded,
    /// A flame graph of the outstanding bytes: trace, run and watch (its last snapshot).
    Svg,
    /// A gzipped pprof profile (`go tool pprof`): trace, run and watch (its last snapshot).
    Pprof,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
            Self::Folded => "folded",
            Self::Svg => "svg",
            Self::Pprof => "pprof",
        }
    }
}

/// The formats every report has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plain {
    Text,
    Json,
}

/// A format made of a trace's stacks asked of a command that has none.
#[derive(Debug, thiserror::Error)]
#[error(
    "--format {format}: {command} reports text or json; folded, svg and pprof are made of the \
     stacks that trace and run report"
)]
pub struct NotAStackReport {
    pub format: &'static str,
    pub command: &'static str,
}

impl Format {
    /// This format, for a `command` whose report is text or JSON only.
    pub fn plain(self, command: &'static str) -> Result<Plain, NotAStackReport> {
        match self {
            Self::Text => Ok(Plain::Text),
            Self::Json => Ok(Plain::Json),
            Self::Folded | Self::Svg | Self::Pprof => Err(NotAStackReport {
                format: self.name(),
                command,
            }),
        }
    }
}

/// A report as text or JSON: the one place that chooses between them.
pub fn render<Model: Serialize>(
    model: &Model,
    format: Plain,
    text: fn(&Model) -> String,
) -> String {
    match format {
        Plain::Text => text(model),
        Plain::Json => json::render_json(model),
    }
}

/// How and where a report is written: the options every reporting subcommand shares.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub format: Format,
    pub output: Option<std::path::PathBuf>,
    /// Entries to show.
    pub top: usize,
}
