//! Where a rendered report goes: a file named on the command line, or standard output.
use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

pub enum ReportSink {
    File {
        file: File,
        path: PathBuf,
        /// Bytes of whole writes so far: a write to a regular file that fails (disk full) is
        /// cut back to this, so the file never ends in a partial report or line.
        complete: u64,
        /// Devices and pipes (`/dev/stdout`, a FIFO) are left alone when a write fails.
        regular: bool,
    },
    Stdout,
}

impl ReportSink {
    /// Creates the file right away, so that a bad path fails before any tracing or scanning.
    pub fn open(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self::Stdout);
        };
        let file = File::create(path)
            .with_context(|| format!("creating the report file {}", path.display()))?;
        let regular = file.metadata().is_ok_and(|metadata| metadata.is_file());
        Ok(Self::File {
            file,
            path: path.to_owned(),
            complete: 0,
            regular,
        })
    }

    /// Writes `text`; called again, appends (the watch's lines).
    pub fn write(&mut self, text: &str) -> Result<()> {
        self.write_bytes(text.as_bytes())
    }

    /// Writes `bytes` (a gzipped profile).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Self::File {
                file,
                path,
                complete,
                regular,
            } => match file.write_all(bytes) {
                Ok(()) => {
                    *complete += bytes.len() as u64;
                    Ok(())
                }
                Err(error) => {
                    // Nothing partial stays behind: the file goes back to its last whole write,
                    // or away when there was none.
                    if *regular {
                        let _ = if *complete == 0 {
                            std::fs::remove_file(&*path)
                        } else {
                            file.set_len(*complete)
                        };
                    }
                    Err(error).with_context(|| format!("writing the report to {}", path.display()))
                }
            },
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

impl Drop for ReportSink {
    /// A report file nothing was written to (the command failed after creating it, as when the
    /// kernel refuses memleak's programs) is removed: an empty file left where a report was
    /// asked for would read as a report that found nothing.
    fn drop(&mut self) {
        if let Self::File {
            path,
            complete: 0,
            regular: true,
            ..
        } = self
        {
            let _ = std::fs::remove_file(&*path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_file_is_kept_once_written_and_removed_when_nothing_was() {
        let directory =
            std::env::temp_dir().join(format!("memleak-sink-drop-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let failed = directory.join("failed.json");
        drop(ReportSink::open(Some(&failed)).unwrap());
        assert!(
            !failed.exists(),
            "a report file with nothing written is removed"
        );
        let written = directory.join("written.json");
        let mut sink = ReportSink::open(Some(&written)).unwrap();
        sink.write("{}\n").unwrap();
        drop(sink);
        assert_eq!(std::fs::read_to_string(&written).unwrap(), "{}\n");
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// /dev/full fails every write with ENOSPC: a device, which must be left alone.
    #[test]
    fn a_failed_write_to_a_device_leaves_the_device() {
        let path = Path::new("/dev/full");
        if !path.exists() {
            return;
        }
        let mut sink = ReportSink::open(Some(path)).unwrap();
        let error = sink.write("report").unwrap_err();
        assert!(format!("{error:#}").contains("/dev/full"), "{error:#}");
        assert!(path.exists());
    }

    /// A failed write to a regular file adds nothing to it, and a file with no whole write is
    /// removed. The failure is made by swapping in a read-only handle; a write cut short by a
    /// full disk, which the cut back to the last whole write is for, is tested end to end
    /// (tests/tests/faults.rs, on a tiny tmpfs).
    #[test]
    fn a_failed_write_to_a_regular_file_keeps_only_whole_writes() {
        let directory = std::env::temp_dir().join(format!("memleak-sink-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("report.json");
        let mut sink = ReportSink::open(Some(&path)).unwrap();
        sink.write("{\"line\": 1}\n").unwrap();
        let ReportSink::File { file, .. } = &mut sink else {
            panic!("a file sink");
        };
        // Reopened read-only under the same handle: the next write fails, as on a full disk.
        *file = File::open(&path).unwrap();
        assert!(sink.write("{\"line\": 2}\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"line\": 1}\n");

        let empty = directory.join("empty.json");
        let mut sink = ReportSink::open(Some(&empty)).unwrap();
        let ReportSink::File { file, .. } = &mut sink else {
            panic!("a file sink");
        };
        *file = File::open(&empty).unwrap();
        assert!(sink.write("{}").is_err());
        assert!(
            !empty.exists(),
            "a file with no whole write must be removed"
        );
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
