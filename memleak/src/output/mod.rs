//! Rendering: the only layer that formats. Models come from the domains (trace, scan,
//! classify, kmemleak) and know nothing of text, JSON or JUnit.
use serde::Serialize;

pub mod json;
pub mod junit;
pub mod sink;
pub mod text;

pub use sink::ReportSink;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// A report as text or JSON: the one place that chooses between them.
pub fn render<Model: Serialize>(
    model: &Model,
    format: Format,
    text: fn(&Model) -> String,
) -> String {
    match format {
        Format::Text => text(model),
        Format::Json => json::render_json(model),
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
