//! The mount table, and mounting the pseudo file systems memleak needs (tracefs, debugfs)
//! where the distribution does not mount them at boot.
use std::{ffi::CStr, fs, io, path::Path};

use anyhow::{Context as _, Result};

/// This process's mount table.
pub fn read_table() -> Result<String> {
    fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")
}

/// The `(target, fstype)` of every line of a mount table (`source target fstype options 0 0`).
pub fn entries(table: &str) -> impl Iterator<Item = (&str, &str)> {
    table.lines().filter_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        Some((fields.next()?, fields.next()?))
    })
}

/// Mounts a file system that needs no source device and no data (tracefs, debugfs) at `target`.
pub fn mount_pseudo(fstype: &CStr, target: &CStr) -> io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; these file
    // systems take no mount data.
    let result = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `target` is a mount point of `fstype` in `table`.
pub fn is_mounted_at(table: &str, target: &Path, fstype: &str) -> bool {
    entries(table).any(|(at, kind)| Path::new(at) == target && kind == fstype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_file_system_at_its_mount_point() {
        let table = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tracefs /sys/kernel/tracing tracefs rw,nosuid,nodev,noexec,relatime 0 0
debugfs /sys/kernel/debug debugfs rw,nosuid,nodev,noexec,relatime 0 0
";
        let debug = Path::new("/sys/kernel/debug");
        assert!(is_mounted_at(table, debug, "debugfs"));
        assert!(!is_mounted_at(table, Path::new("/debug"), "debugfs"));
        assert!(!is_mounted_at(
            "none /sys/kernel/debug tmpfs rw 0 0\n",
            debug,
            "debugfs"
        ));
        assert!(!is_mounted_at("", debug, "debugfs"));
        assert_eq!(
            entries(table).nth(1),
            Some(("/sys/kernel/tracing", "tracefs"))
        );
        assert_eq!(entries("truncated\n").count(), 0);
    }
}
