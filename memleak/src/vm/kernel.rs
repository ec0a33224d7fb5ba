//! The guest kernel: Debian's current linux-image-amd64 and the headers to build modules for
//! it, downloaded with apt (not installed) and unpacked into memleak's cache directory.
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{apt::Apt, run_quietly};

/// How the kernel inside a bzImage may be compressed: xz (Debian 11 and 12), zstd (Debian 12's
/// backported 6.12).
struct Compression {
    /// The bytes its stream starts with.
    magic: &'static [u8],
    program: &'static str,
    args: &'static [&'static str],
    /// Whether the decompressor stops at the end of the stream and its status says whether it
    /// worked: xz does (`--single-stream`); zstd reads on into the bzImage's trailer and fails
    /// after writing the whole frame, so only the ELF check of its output judges it.
    status_tells: bool,
}

const COMPRESSIONS: [Compression; 2] = [
    Compression {
        magic: &[0xfd, b'7', b'z', b'X', b'Z', 0x00],
        program: "xz",
        args: &["--decompress", "--stdout", "--single-stream"],
        status_tells: true,
    },
    Compression {
        magic: &[0x28, 0xb5, 0x2f, 0xfd],
        program: "zstd",
        args: &["--decompress", "--stdout"],
        status_tells: false,
    },
];

/// A kernel to boot and build modules for: a tree modules build against (Debian's unpacked
/// headers, or a whole build tree) with an uncompressed `vmlinux` next to its Makefile (module
/// BTF is generated against it, and qemu boots it).
pub struct Kernel {
    pub release: String,
    pub tree: PathBuf,
    /// The compressed kernel as Debian ships it, when there is one: booting it runs the
    /// decompressor, which places the kernel at random (KASLR).
    pub bzimage: Option<PathBuf>,
}

impl Kernel {
    pub fn vmlinux(&self) -> PathBuf {
        self.tree.join("vmlinux")
    }
}

/// The kernel linux-image-amd64 currently points at in `apt`'s suite, from the cache or
/// downloaded into it.
pub fn fetch(apt: &mut Apt, cache: &Path) -> Result<Kernel> {
    let release = match current_release(apt) {
        Ok(release) => release,
        Err(_) => {
            apt.update_once()?;
            current_release(apt)?
        }
    };
    let unpacked = cache.join(&release);
    if !unpacked.is_dir()
        && let Err(error) = download_and_unpack(apt, &release, &unpacked)
    {
        // Stale package lists name files the archive no longer has.
        if apt.updated() {
            return Err(error);
        }
        log::warn!("{error:#}; retrying with fresh package lists");
        apt.update_once()?;
        return fetch(apt, cache);
    }
    Ok(Kernel {
        tree: unpacked.join(format!("usr/src/linux-headers-{release}")),
        bzimage: Some(unpacked.join(format!("boot/vmlinuz-{release}"))),
        release,
    })
}

/// `6.1.0-56-amd64`, from `linux-image-amd64`'s dependency on `linux-image-6.1.0-56-amd64`.
fn current_release(apt: &Apt) -> Result<String> {
    let depends = apt.cache(&["depends", "linux-image-amd64"])?;
    dependencies(&depends, "linux-image-")
        .into_iter()
        .next()
        .context("linux-image-amd64 depends on no linux-image-* package")
}

/// The names after `prefix` of the `Depends:` lines of `apt-cache depends` output.
fn dependencies(depends: &str, prefix: &str) -> Vec<String> {
    depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .filter_map(|package| package.strip_prefix(prefix))
        .map(str::to_owned)
        .collect()
}

fn download_and_unpack(apt: &Apt, release: &str, unpacked: &Path) -> Result<()> {
    let headers = format!("linux-headers-{release}");
    // linux-headers-RELEASE depends on the -common headers and on linux-kbuild-X.Y.
    let headers_depends = apt.cache(&["depends", &headers])?;
    let mut packages = vec![format!("linux-image-{release}"), headers];
    for prefix in ["linux-headers-", "linux-kbuild-"] {
        packages.extend(
            dependencies(&headers_depends, prefix)
                .into_iter()
                .map(|suffix| format!("{prefix}{suffix}")),
        );
    }
    ensure!(
        packages.len() == 4,
        "expected linux-headers-{release} to depend on one -common headers package and one \
         linux-kbuild package, found: {}",
        packages[2..].join(" ")
    );

    // Everything happens in a staging directory that is renamed at the end, so an interrupted
    // run leaves no half-unpacked kernel that a later run would trust.
    let staging = PathBuf::from(format!("{}.partial", unpacked.display()));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    let debs = staging.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    log::info!("downloading {}", packages.join(" "));
    apt.download(&packages, &debs)?;

    for entry in fs::read_dir(&debs).with_context(|| format!("listing {}", debs.display()))? {
        let deb = entry?.path();
        let name = deb.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("linux-image-") {
            // Only the kernel; the image package's modules are 400 MB the guest does not need.
            unpack_boot(&deb, &staging)?;
        } else {
            let status = Command::new("dpkg-deb")
                .arg("--extract")
                .arg(&deb)
                .arg(&staging)
                .status()
                .context("running dpkg-deb")?;
            ensure!(
                status.success(),
                "dpkg-deb --extract {name} failed ({status})"
            );
        }
    }
    fs::remove_dir_all(&debs)?;

    let headers_dir = staging.join(format!("usr/src/linux-headers-{release}"));
    point_makefile_at(&headers_dir, &unpacked.join("usr/src/"))?;
    let vmlinuz = staging.join(format!("boot/vmlinuz-{release}"));
    let compressed =
        fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    decompress_kernel(&compressed, &headers_dir.join("vmlinux"))?;
    fs::rename(&staging, unpacked)
        .with_context(|| format!("renaming {} to {}", staging.display(), unpacked.display()))
}

fn unpack_boot(deb: &Path, into: &Path) -> Result<()> {
    let mut tar_stream = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("running dpkg-deb")?;
    let stream = tar_stream.stdout.take().context("dpkg-deb has no stdout")?;
    let tar = Command::new("tar")
        .arg("--extract")
        .arg("--directory")
        .arg(into)
        .arg("./boot")
        .stdin(stream)
        .status()
        .context("running tar")?;
    let dpkg = tar_stream.wait()?;
    ensure!(
        dpkg.success() && tar.success(),
        "unpacking /boot from {} failed (dpkg-deb {dpkg}, tar {tar})",
        deb.display()
    );
    Ok(())
}

/// The per-flavour headers' Makefile includes the -common headers by their installed path,
/// /usr/src/...; these are unpacked elsewhere.
fn point_makefile_at(headers_dir: &Path, usr_src: &Path) -> Result<()> {
    let makefile = headers_dir.join("Makefile");
    let text =
        fs::read_to_string(&makefile).with_context(|| format!("reading {}", makefile.display()))?;
    ensure!(
        text.contains("/usr/src/"),
        "{} does not include anything from /usr/src/: {text}",
        makefile.display()
    );
    let rewritten = text.replace("/usr/src/", &usr_src.to_string_lossy());
    fs::write(&makefile, rewritten).with_context(|| format!("writing {}", makefile.display()))
}

/// Writes the ELF kernel inside a bzImage: the first compressed stream after the setup code
/// whose kind is the earliest found. qemu boots it directly through its PVH entry point, which
/// skips the decompressor (slow under TCG).
fn decompress_kernel(bzimage: &[u8], vmlinux: &Path) -> Result<()> {
    let (start, compression) = COMPRESSIONS
        .iter()
        .filter_map(|compression| {
            let start = bzimage
                .windows(compression.magic.len())
                .position(|window| window == compression.magic)?;
            Some((start, compression))
        })
        .min_by_key(|&(start, _)| start)
        .context("the kernel image holds no xz or zstd stream (not a bzImage?)")?;
    let program = compression.program;
    let output =
        fs::File::create(vmlinux).with_context(|| format!("creating {}", vmlinux.display()))?;
    let mut decompressor = Command::new(program)
        .args(compression.args)
        .stdin(Stdio::piped())
        .stdout(output)
        // zstd complains about the bzImage's trailer after the frame; what it wrote is checked
        // below.
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let mut input = decompressor
        .stdin
        .take()
        .with_context(|| format!("{program} has no stdin"))?;
    // The decompressor may stop reading after the stream; the bzImage's trailer may then meet
    // a closed pipe.
    match input.write_all(&bzimage[start..]) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(error).with_context(|| format!("writing to {program}"));
        }
        _ => drop(input),
    }
    let status = decompressor
        .wait()
        .with_context(|| format!("waiting for {program}"))?;
    ensure!(
        !compression.status_tells || status.success(),
        "{program} failed to decompress the kernel ({status})"
    );
    let written = fs::read(vmlinux).with_context(|| format!("reading {}", vmlinux.display()))?;
    if !written.starts_with(b"\x7fELF") || written.len() < 1 << 20 {
        bail!(
            "decompressing the kernel with {program} ({status}) gave {} bytes that are not an \
             ELF kernel",
            written.len()
        );
    }
    Ok(())
}

/// Builds the out-of-tree module in `source` against `kernel`'s tree, in `build_dir`, and
/// returns the path of the .ko.
pub fn build_module(
    kernel: &Kernel,
    source: &Path,
    build_dir: &Path,
    name: &str,
) -> Result<PathBuf> {
    fs::create_dir_all(build_dir).with_context(|| format!("creating {}", build_dir.display()))?;
    for entry in fs::read_dir(source).with_context(|| format!("listing {}", source.display()))? {
        let path = entry?.path();
        let target = build_dir.join(path.file_name().unwrap_or_default());
        // Unchanged sources keep their build-directory timestamps, so make rebuilds nothing.
        if fs::read(&target).ok() != Some(fs::read(&path)?) {
            fs::copy(&path, &target)
                .with_context(|| format!("copying {} to {}", path.display(), target.display()))?;
        }
    }
    run_quietly(
        Command::new("make")
            .arg("-C")
            .arg(&kernel.tree)
            .arg(format!("M={}", build_dir.display()))
            // Debian's kbuild package has no resolve_btfids; a module without BTF ids needs none.
            .arg("RESOLVE_BTFIDS=true")
            // The host's compiler (HOST_PACKAGES): Debian 11's headers name gcc-10, which
            // Debian 12 does not have; a module this simple builds the same with gcc-12.
            .arg("CC=gcc-12")
            .arg("modules"),
    )
    .with_context(|| {
        format!(
            "building the {name} module against {}",
            kernel.tree.display()
        )
    })?;
    let module = build_dir.join(format!("{name}.ko"));
    ensure!(module.exists(), "make built no {}", module.display());
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_release_from_apt_cache_depends() {
        let depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(dependencies(depends, "linux-image-"), ["6.1.0-56-amd64"]);
        let headers = "linux-headers-6.1.0-56-amd64\n  Depends: linux-headers-6.1.0-56-common\n  \
                       Depends: linux-kbuild-6.1\n  Depends: linux-compiler-gcc-12-x86\n";
        assert_eq!(dependencies(headers, "linux-headers-"), ["6.1.0-56-common"]);
        assert_eq!(dependencies(headers, "linux-kbuild-"), ["6.1"]);
        assert!(dependencies("linux-image-amd64\n", "linux-image-").is_empty());
    }
}
