//! Where a rendered report goes: a file named on the command line, or standard output.
use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

pub enum ReportSink {
    File { file: File, path: PathBuf },
    Stdout,
}

impl ReportSink {
    /// Creates the file right away, so that a bad path fails before any tracing or scanning.
    pub fn open(path: Option<&Path>) -> Result<Self> {
        match path {
            Some(path) => Ok(Self::File {
                file: File::create(path)
                    .with_context(|| format!("creating the report file {}", path.display()))?,
                path: path.to_owned(),
            }),
            None => Ok(Self::Stdout),
        }
    }

    /// Writes `text`; called again, appends (the watch's lines).
    pub fn write(&mut self, text: &str) -> Result<()> {
        self.write_bytes(text.as_bytes())
    }

    /// Writes `bytes` (a gzipped profile).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Self::File { file, path } => file
                .write_all(bytes)
                .with_context(|| format!("writing the report to {}", path.display())),
            Self::Stdout => {
                let mut stdout = std::io::stdout().lock();
                stdout
                    .write_all(bytes)
                    .and_then(|()| stdout.flush())
                    .context("writing the report to standard output")
            }
        }
    }
}
