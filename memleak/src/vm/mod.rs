//! Booting a kernel under qemu with memleak inside: Debian's kernels downloaded with apt and
//! cached (or a kernel the user built), a busybox initramfs, results sent back on a second
//! serial port. `memleak vm` (a module's tests under memleak) and memleak's own VM test
//! (`cargo xtask vm-test`) are its two clients. Why this and not virtme-ng or vmtest:
//! docs/module-ci.md.
pub mod apt;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod module_ci;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use self::{apt::Apt, kernel::Kernel};

/// The Debian kernels memleak boots by name, each the current `linux-image-amd64` of its suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebianKernel {
    /// Debian 11's 5.10.
    Bullseye,
    /// Debian 12's 6.1.
    Bookworm,
    /// Debian 12's backported 6.12.
    BookwormBackports,
}

impl DebianKernel {
    pub const EACH: [Self; 3] = [Self::Bullseye, Self::Bookworm, Self::BookwormBackports];

    /// `5.10`, `6.1`, `6.12`: how the command line names it.
    pub fn series(self) -> &'static str {
        match self {
            Self::Bullseye => "5.10",
            Self::Bookworm => "6.1",
            Self::BookwormBackports => "6.12",
        }
    }

    pub fn from_series(series: &str) -> Option<Self> {
        Self::EACH
            .into_iter()
            .find(|kernel| kernel.series() == series)
    }

    /// The suite of Debian's archive it comes from.
    pub fn suite(self) -> &'static str {
        match self {
            Self::Bullseye => "bullseye",
            Self::Bookworm => "bookworm",
            Self::BookwormBackports => "bookworm-backports",
        }
    }

    /// The kernel and its headers, from `cache` or downloaded into it (through a private apt
    /// configuration: the host's sources are not touched, and need not be Debian 12's).
    pub fn fetch(self, cache: &Path) -> Result<Kernel> {
        let suite = self.suite();
        let mut apt = Apt::private(&cache.join(format!("apt-{suite}")), suite)?;
        kernel::fetch(&mut apt, cache)
    }
}

/// `$MEMLEAK_CACHE/vm`, by default ~/.cache/memleak/vm (where scripts/bootstrap.sh caches too).
pub fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("MEMLEAK_CACHE") {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/memleak"),
    };
    let cache = base.join("vm");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    Ok(cache)
}

/// Whether an ELF executable needs a program interpreter (a dynamic loader and a C library):
/// a static binary, static-pie included, has no PT_INTERP program header. The guest has no C
/// library, so the memleak put into it must be static.
pub fn needs_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u64 = 3;
    ensure!(
        elf.len() > 64 && elf.starts_with(b"\x7fELF") && elf[4] == 2 && elf[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let number = |at: usize, width: usize| -> Result<u64> {
        let bytes = elf.get(at..at + width).context("a truncated ELF file")?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0u64, |value, &byte| (value << 8) | u64::from(byte)))
    };
    let table = usize::try_from(number(0x20, 8)?)?;
    let entry_size = usize::try_from(number(0x36, 2)?)?;
    let entries = number(0x38, 2)?;
    for index in 0..usize::try_from(entries)? {
        if number(table + index * entry_size, 4)? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs `command`, showing the end of its output only when it fails.
pub fn run_quietly(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        tail(&output.stdout),
        tail(&output.stderr)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_dynamic_executables_from_static_ones() {
        // Unit tests run on the host's glibc target: this binary names its loader. The static
        // release binary is checked by tests/tests/dist.rs.
        let this = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(needs_interpreter(&this).unwrap());
        assert!(needs_interpreter(&[0x7f, b'E', b'L', b'F']).is_err());
        assert!(needs_interpreter(&[0u8; 128]).is_err());
        // A header whose program table lies past the end of the file.
        let mut truncated = this[..64].to_vec();
        truncated.extend([0u8; 8]);
        assert!(needs_interpreter(&truncated).is_err());
    }

    #[test]
    fn names_debian_kernels_by_series() {
        for kernel in DebianKernel::EACH {
            assert_eq!(DebianKernel::from_series(kernel.series()), Some(kernel));
        }
        assert_eq!(DebianKernel::from_series("6.6"), None);
        assert_eq!(DebianKernel::Bookworm.suite(), "bookworm");
    }
}
