//! Writes an initramfs: an uncompressed cpio archive in the kernel's "newc" format
//! (Documentation/driver-api/early-userspace/buffer-format.rst). Written directly rather than
//! with cpio(1) so that /dev/console can be a device node without mknod and root.
use std::io::{self, Write};

/// File type bits of `st_mode`.
const DIRECTORY: u32 = 0o040_000;
const REGULAR: u32 = 0o100_000;
const CHARACTER_DEVICE: u32 = 0o020_000;

pub struct Initramfs<W: Write> {
    out: W,
    next_inode: u32,
}

/// Debian's busybox-static, which every guest's init and scripts run on.
pub const BUSYBOX: &str = "/bin/busybox";

/// What every guest's archive holds: its init script, busybox and memleak.
pub struct Guest<'a> {
    pub init: &'a [u8],
    pub busybox: &'a [u8],
    pub memleak: &'a [u8],
}

impl<W: Write> Initramfs<W> {
    pub fn new(out: W) -> Self {
        Self { out, next_inode: 1 }
    }

    /// An archive with what every guest needs: bin, dev, proc, sys and results (where the
    /// guest writes what the host reads back), /dev/console, /init, busybox and memleak;
    /// then `directories`, for the caller's own files.
    pub fn guest(out: W, guest: &Guest<'_>, directories: &[&str]) -> io::Result<Self> {
        let mut archive = Self::new(out);
        for directory in ["bin", "dev", "proc", "sys", "results"]
            .iter()
            .chain(directories)
        {
            archive.directory(directory)?;
        }
        // The kernel opens /dev/console for /init's standard streams before anything is
        // mounted.
        archive.character_device("dev/console", 0o600, (5, 1))?;
        archive.file("init", 0o755, guest.init)?;
        archive.file("bin/busybox", 0o755, guest.busybox)?;
        archive.file("bin/memleak", 0o755, guest.memleak)?;
        Ok(archive)
    }

    pub fn directory(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, DIRECTORY | 0o755, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, permissions: u32, contents: &[u8]) -> io::Result<()> {
        self.entry(path, REGULAR | permissions, (0, 0), contents)
    }

    pub fn character_device(
        &mut self,
        path: &str,
        permissions: u32,
        device: (u32, u32),
    ) -> io::Result<()> {
        self.entry(path, CHARACTER_DEVICE | permissions, device, &[])
    }

    /// Writes the trailer that ends the archive and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        (major, minor): (u32, u32),
        contents: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(contents.len())
            .map_err(|_| io::Error::other(format!("{path} is over 4 GiB")))?;
        let name_size = path.len() as u32 + 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & DIRECTORY != 0 { 2 } else { 1 },
            0, // mtime: fixed, so the same inputs give the same archive
            size,
            0, // device of the archived file
            0,
            major,
            minor,
            name_size,
            0, // checksum, unused by "070701"
        ];
        self.next_inode += 1;
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(path.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name_size as usize)?;
        self.out.write_all(contents)?;
        self.pad(contents.len())
    }

    /// Headers and file data start on 4-byte boundaries.
    fn pad(&mut self, written: usize) -> io::Result<()> {
        self.out.write_all(&[0; 3][..(4 - written % 4) % 4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], index: usize) -> u32 {
        let start = 6 + index * 8;
        u32::from_str_radix(std::str::from_utf8(&header[start..start + 8]).unwrap(), 16).unwrap()
    }

    #[test]
    fn entries_are_aligned_and_carry_mode_device_and_data() {
        let mut archive = Initramfs::new(Vec::new());
        archive
            .character_device("dev/console", 0o600, (5, 1))
            .unwrap();
        archive.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let bytes = archive.finish().unwrap();

        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(field(&bytes, 1), CHARACTER_DEVICE | 0o600);
        assert_eq!((field(&bytes, 9), field(&bytes, 10)), (5, 1));
        assert_eq!(field(&bytes, 11), "dev/console".len() as u32 + 1);
        // 110-byte header + 12-byte name = 122, padded to 124.
        assert_eq!(&bytes[110..122], b"dev/console\0");
        let init = &bytes[124..];
        assert_eq!(&init[..6], b"070701");
        assert_eq!(field(init, 1), REGULAR | 0o755);
        assert_eq!(field(init, 6), 10);
        // 110 + "init\0" = 115, padded to 116; the data follows.
        assert_eq!(&init[116..126], b"#!/bin/sh\n");
        let trailer = &init[128..];
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
        assert_eq!(bytes.len() % 4, 0);
    }
}
