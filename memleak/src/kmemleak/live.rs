//! Drives the running kernel's kmemleak through its debugfs file: one command per write
//! (`scan`, `clear`, `scan=<secs>`), the report on read.
use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use thiserror::Error;

use crate::kernel::mounts;

pub const DEFAULT_DEBUGFS: &str = "/sys/kernel/debug";

/// Why kmemleak cannot be used at all; both end in the advice to trace instead.
#[derive(Debug, Error)]
pub enum KmemleakError {
    #[error(
        "kmemleak is not available: {} does not exist (kernel built without CONFIG_DEBUG_KMEMLEAK); use `memleak trace` instead",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error(
        "kmemleak is disabled on this kernel ({action} {}: {error}); it is off when built with CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF (unless booted with kmemleak=on) or booted with kmemleak=off, and turns itself off after an internal error such as an early-log overflow; use `memleak trace` instead",
        path.display()
    )]
    Disabled {
        path: PathBuf,
        action: String,
        error: io::Error,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Write `clear` after reading, so that the next report holds only new suspects.
    pub clear: bool,
    /// Set the period of kmemleak's own background scans (0 stops them).
    pub scan_interval_secs: Option<u32>,
}

/// Runs a scan and returns the report text. The `scan` write returns when the scan is done,
/// so the report read next is fresh.
pub fn collect(debugfs: &Path, options: Options) -> Result<String> {
    let path = debugfs.join("kmemleak");
    if let Some(secs) = options.scan_interval_secs {
        command(&path, &format!("scan={secs}"))?;
    }
    command(&path, "scan")?;
    let report = read_report(&path)?;
    if options.clear {
        command(&path, "clear")?;
    }
    Ok(report)
}

/// Mounts debugfs at its usual place unless it is there already, as distributions that do not
/// mount it at boot require.
pub fn mount_default_debugfs() -> Result<()> {
    if mounts::is_mounted_at(
        &mounts::read_table()?,
        Path::new(DEFAULT_DEBUGFS),
        "debugfs",
    ) {
        return Ok(());
    }
    log::info!("mounting debugfs at {DEFAULT_DEBUGFS}");
    mounts::mount_pseudo(c"debugfs", c"/sys/kernel/debug")
        .with_context(|| format!("mounting debugfs at {DEFAULT_DEBUGFS} to reach kmemleak"))
}

/// Writes one command, with the newline `echo` would add (the kernel accepts both). Opened in
/// append mode: the kernel ignores the position, and a plain file standing in for debugfs in
/// tests then keeps its canned report and records the commands after it.
fn command(path: &Path, command: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|error| access_error(path, Access::Open, error))?;
    file.write_all(format!("{command}\n").as_bytes())
        .map_err(|error| access_error(path, Access::Write(command), error))
}

fn read_report(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|error| access_error(path, Access::Open, error))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|error| access_error(path, Access::Read, error))?;
    // Task names are whatever processes set; one odd byte must not lose the report.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[derive(Debug, Clone, Copy)]
enum Access<'a> {
    Open,
    Write(&'a str),
    Read,
}

/// Tells "kmemleak is missing or off" (the user should trace instead) from other failures.
fn access_error(path: &Path, access: Access<'_>, error: io::Error) -> anyhow::Error {
    let action = match access {
        Access::Open => "opening".to_owned(),
        Access::Write(command) => format!("writing `{command}` to"),
        Access::Read => "reading".to_owned(),
    };
    let disabled = match (access, error.raw_os_error()) {
        // Older kernels refuse to open the file once kmemleak is off.
        (_, Some(libc::EBUSY)) => true,
        // Current kernels open it but refuse every command but `clear`.
        (Access::Write(_), Some(libc::EPERM)) => true,
        _ => false,
    };
    if disabled {
        return KmemleakError::Disabled {
            path: path.to_owned(),
            action,
            error,
        }
        .into();
    }
    match error.kind() {
        io::ErrorKind::NotFound => KmemleakError::Missing {
            path: path.to_owned(),
        }
        .into(),
        io::ErrorKind::PermissionDenied => anyhow::Error::new(error).context(format!(
            "{action} {} (kmemleak needs root, and kernel lockdown closes debugfs)",
            path.display()
        )),
        _ => anyhow::Error::new(error).context(format!("{action} {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::util::scratch::ScratchDir;

    #[test]
    fn scans_reads_and_clears_in_that_order() {
        let scratch = ScratchDir::new("live-order");
        let path = scratch.path().join("kmemleak");
        fs::write(&path, "unreferenced object 0xffff888104a3c000 (size 64):\n")
            .expect("writing the fake report");
        let options = Options {
            clear: true,
            scan_interval_secs: Some(0),
        };

        let report = collect(scratch.path(), options).expect("fake kmemleak works");

        // The read came after the scan and before the clear.
        assert_eq!(
            report,
            "unreferenced object 0xffff888104a3c000 (size 64):\nscan=0\nscan\n"
        );
        assert_eq!(
            fs::read_to_string(&path).expect("reading the fake file"),
            format!("{report}clear\n")
        );
    }

    #[test]
    fn only_scans_by_default() {
        let scratch = ScratchDir::new("live-default");
        fs::write(scratch.path().join("kmemleak"), "").expect("writing the fake report");
        assert_eq!(
            collect(scratch.path(), Options::default()).ok().as_deref(),
            Some("scan\n")
        );
    }

    #[test]
    fn a_missing_file_means_no_kmemleak() {
        let scratch = ScratchDir::new("live-missing");
        let error = collect(scratch.path(), Options::default()).expect_err("nothing to open");
        assert!(matches!(
            error.downcast_ref::<KmemleakError>(),
            Some(KmemleakError::Missing { .. })
        ));
    }

    #[test]
    fn tells_a_disabled_kmemleak_from_other_failures() {
        let path = Path::new("/sys/kernel/debug/kmemleak");
        let classify =
            |access, errno| access_error(path, access, io::Error::from_raw_os_error(errno));
        let is_disabled = |error: &anyhow::Error| {
            matches!(
                error.downcast_ref::<KmemleakError>(),
                Some(KmemleakError::Disabled { .. })
            )
        };

        assert!(is_disabled(&classify(Access::Open, libc::EBUSY)));
        assert!(is_disabled(&classify(Access::Read, libc::EBUSY)));
        assert!(is_disabled(&classify(Access::Write("scan"), libc::EPERM)));
        let message = format!("{:#}", classify(Access::Write("scan"), libc::EPERM));
        assert!(message.starts_with("kmemleak is disabled on this kernel (writing `scan` to /sys/kernel/debug/kmemleak: "), "{message}");
        assert!(
            message.ends_with("use `memleak trace` instead"),
            "{message}"
        );

        // Refused at open: no root, or kernel lockdown; kmemleak itself may be fine.
        let locked = classify(Access::Open, libc::EPERM);
        assert!(!is_disabled(&locked));
        assert!(format!("{locked:#}").contains("needs root"), "{locked:#}");
        let other = classify(Access::Read, libc::EIO);
        assert!(other.downcast_ref::<KmemleakError>().is_none());
        assert!(format!("{other:#}").starts_with("reading /sys/kernel/debug/kmemleak: "));
    }
}
