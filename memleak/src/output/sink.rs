//! Where a rendered report goes: a file named on the command line, or standard output.
//!
//! A whole report (trace, run, scan, classify, kmemleak, a watch's final profile) is written
//! beside the file named and renamed onto it once complete: whatever stops memleak meanwhile
//! (SIGKILL, a full disk, a crash, the machine), the name holds the whole new report or what
//! it held before, never part of one. The watch's lines are appended as they come instead,
//! cut back to the last whole line when a write fails.
use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

pub enum ReportSink {
    /// A whole report to a regular file (or a name not taken yet).
    Staged {
        path: PathBuf,
        /// The file the report is written to until it is renamed onto `path`.
        staging: Option<Staging>,
    },
    /// Lines appended to a file, or any write to a device or a pipe (`/dev/stdout`, a FIFO),
    /// which cannot be renamed onto.
    File {
        file: File,
        path: PathBuf,
        /// Bytes of whole writes so far: a write to a regular file that fails (disk full) is
        /// cut back to this, so the file never ends in a partial line.
        complete: u64,
        /// Devices and pipes are left alone when a write fails.
        regular: bool,
    },
    Stdout,
}

impl ReportSink {
    /// For one whole report, written by one [`ReportSink::write`]. The hidden file it is
    /// written to is created right away, so that a bad path fails before any tracing or
    /// scanning.
    pub fn open(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self::Stdout);
        };
        if !is_regular_or_absent(path) {
            return Self::open_lines(Some(path));
        }
        Ok(Self::Staged {
            path: path.to_owned(),
            staging: Some(Staging::create(path)?),
        })
    }

    /// For lines appended as they come (the watch's intervals).
    pub fn open_lines(path: Option<&Path>) -> Result<Self> {
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

    /// Writes `text`: the whole report, or the next lines.
    pub fn write(&mut self, text: &str) -> Result<()> {
        self.write_bytes(text.as_bytes())
    }

    /// Writes `bytes` (a gzipped profile).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Self::Staged { path, staging } => {
                let staged = match staging.take() {
                    Some(open) => open,
                    None => Staging::create(path)?,
                };
                staged
                    .publish(bytes, path)
                    .with_context(|| format!("writing the report to {}", path.display()))
            }
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

/// Whether `path` names a regular file or nothing yet (a report can be renamed onto it).
fn is_regular_or_absent(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(metadata) => metadata.is_file(),
        Err(_) => true,
    }
}

/// Where a whole report is written before it takes its name: a file with no name in the
/// report's directory (`O_TMPFILE`, Linux 3.11+ on ext4, xfs, btrfs, tmpfs), which `kill -9`
/// leaves nothing of; else a hidden `.NAME.memleak-PID` beside it, removed on every exit but
/// that one.
pub enum Staging {
    Unnamed(File),
    Named(File, PathBuf),
}

impl Staging {
    fn create(path: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let creating = || format!("creating the report file {}", path.display());
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(directory)
        {
            Ok(file) => return Ok(Self::Unnamed(file)),
            // The file system has no unnamed files: a named one instead.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) => {}
            Err(error) => return Err(error).with_context(creating),
        }
        let hidden = hidden_name(path).with_context(creating)?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&hidden)
            .with_context(creating)?;
        Ok(Self::Named(file, hidden))
    }

    /// Writes `bytes` and renames them onto `path`; on failure, `path` is left as it was and
    /// nothing else stays behind.
    fn publish(self, bytes: &[u8], path: &Path) -> std::io::Result<()> {
        let (file, named) = match &self {
            Self::Unnamed(file) => (file, None),
            Self::Named(file, hidden) => (file, Some(hidden.as_path())),
        };
        let mut writer = file;
        writer.write_all(bytes)?;
        // On disk before the rename makes it the report: a crash right after leaves the
        // whole report under its name, not an empty file.
        file.sync_data()?;
        let hidden = match named {
            Some(hidden) => hidden.to_owned(),
            None => {
                let hidden = hidden_name(path)?;
                link_unnamed(file, &hidden)?;
                hidden
            }
        };
        // (A named staging file's Drop then finds nothing left to remove.)
        std::fs::rename(&hidden, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&hidden);
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Self::Named(_, hidden) = self {
            let _ = std::fs::remove_file(&*hidden);
        }
    }
}

/// `.NAME.memleak-PID` beside `path`: on the same file system, so that the rename is atomic.
fn hidden_name(path: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(name);
    hidden.push(format!(".memleak-{}", std::process::id()));
    Ok(path.with_file_name(hidden))
}

/// Gives the unnamed file `file` the name `hidden` (linkat through /proc/self/fd, which needs
/// no capability, unlike `AT_EMPTY_PATH`).
fn link_unnamed(file: &File, hidden: &Path) -> std::io::Result<()> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    let source = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let target = std::ffi::CString::new(hidden.as_os_str().as_bytes())?;
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            source.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if linked == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for ReportSink {
    /// A file of lines nothing was written to (the command failed after opening it, as when
    /// the kernel refuses memleak's programs) is removed: an empty file left where a report
    /// was asked for would read as a report that found nothing. (A whole report's staging
    /// goes with it, see [`Staging`].)
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

    /// Until its one write, a whole report is only a hidden file beside the name, which then
    /// holds the report; a failed write leaves what the name held before and no hidden file.
    #[test]
    fn a_whole_report_replaces_the_file_at_once_or_not_at_all() {
        let directory =
            std::env::temp_dir().join(format!("memleak-sink-staged-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("report.json");
        std::fs::write(&path, "previous").unwrap();
        let entries = || {
            let mut names: Vec<String> = std::fs::read_dir(&directory)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };

        let mut sink = ReportSink::open(Some(&path)).unwrap();
        let hidden = format!(".report.json.memleak-{}", std::process::id());
        // An unnamed file where the file system has them, else the hidden one.
        let before = entries();
        assert!(
            before == ["report.json"] || before == [hidden.as_str(), "report.json"],
            "{before:?}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "previous");
        sink.write("{\"whole\": true}\n").unwrap();
        assert_eq!(entries(), ["report.json"]);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"whole\": true}\n"
        );
        drop(sink);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"whole\": true}\n"
        );

        let mut sink = ReportSink::open(Some(&path)).unwrap();
        let ReportSink::Staged {
            staging: Some(Staging::Unnamed(file) | Staging::Named(file, _)),
            ..
        } = &mut sink
        else {
            panic!("a staged sink");
        };
        // A read-only handle in its place: the write fails, as on a full disk.
        *file = File::open("/dev/null").unwrap();
        assert!(sink.write("{\"whole\": false}").is_err());
        assert_eq!(entries(), ["report.json"]);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"whole\": true}\n"
        );

        let never = directory.join("never.json");
        drop(ReportSink::open(Some(&never)).unwrap());
        assert_eq!(entries(), ["report.json"]);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_report_to_a_missing_directory_fails_when_opened() {
        let error = ReportSink::open(Some(Path::new("/nonexistent-memleak/report.json")))
            .err()
            .expect("no such directory");
        assert!(
            format!("{error:#}")
                .contains("creating the report file /nonexistent-memleak/report.json"),
            "{error:#}"
        );
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
        let mut sink = ReportSink::open_lines(Some(&path)).unwrap();
        sink.write("{\"line\": 1}\n").unwrap();
        let ReportSink::File { file, .. } = &mut sink else {
            panic!("a file sink");
        };
        // Reopened read-only under the same handle: the next write fails, as on a full disk.
        *file = File::open(&path).unwrap();
        assert!(sink.write("{\"line\": 2}\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"line\": 1}\n");

        let empty = directory.join("empty.json");
        let mut sink = ReportSink::open_lines(Some(&empty)).unwrap();
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
